"""Network: reach listeners the test runs on the host's loopback, and other families.

Under network = none the agent has its own network namespace: 127.0.0.1 is
its own loopback, where nothing listens, so every connection must fail and
the host's listeners must see nothing. Abstract Unix sockets belong to a
network namespace too: the host's must be out of reach. AF_VSOCK is not isolated by network
namespaces, so the socket family itself must be unavailable; raw packet
sockets need CAP_NET_RAW.
"""
import socket

from escapelib import attempt, done, fact, new_socket, targets

t = targets()


def tcp(host, port):
    def go():
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(t["token"].encode())
            return f"connected-{s.getpeername()[0]}"
    return go


def udp(host, port):
    def go():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(t["token"].encode(), (host, port))
            # A send on the agent's own loopback "works"; the host's receiver decides.
            return "sent"
    return go


def abstract(name):
    def go():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(3)
            s.connect(b"\0" + name.encode())
            return "connected"
    return go


fact("interfaces", ",".join(name for _, name in socket.if_nameindex()))
attempt("tcp-127.0.0.1", tcp("127.0.0.1", t["tcp_port"]))
if t.get("tcp6_port"):
    attempt("tcp-::1", tcp("::1", t["tcp6_port"]))
attempt("tcp-localhost-name", tcp("localhost", t["tcp_port"]))
attempt("udp-127.0.0.1", udp("127.0.0.1", t["udp_port"]))
for name in t["abstract"]:
    attempt(f"abstract-unix:@{name}", abstract(name))
attempt("vsock-socket", new_socket(socket.AF_VSOCK, socket.SOCK_STREAM))
attempt("packet-raw-socket", new_socket(socket.AF_PACKET, socket.SOCK_RAW))
attempt("inet-raw-socket", new_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
done()
