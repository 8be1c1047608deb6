"""Egress: hold one allowed flow open, then see what a cut (or a kill, or a freeze) leaves.

Prints "connected" once its flow to echo.agentd.test is up. With "probe" in
its targets, it then makes that many denied attempts, slowly (a tripwire on
egress_denied must end it). Otherwise it waits on the flow: after a cut the
flow must be closed under it and a new connection refused.
"""
import socket
import time

from escapelib import Blocked, attempt, done, hold, targets

t = targets()
PORT = t["ports"]["echo"]

s = socket.create_connection(("echo.agentd.test", PORT), timeout=10)
s.sendall(f"{t['tag']} hold\n".encode())
s.settimeout(10)
assert s.recv(4096), "the allowed flow did not echo"
print("connected", flush=True)

if t.get("probe"):
    for i in range(int(t["probe"])):
        with socket.socket() as probe:
            probe.settimeout(2)
            try:
                probe.connect((f"192.0.2.{i % 250 + 1}", 443))
                probe.recv(1)
            except OSError:
                pass
        time.sleep(0.2)
    hold()


def flow_after_cut():
    s.settimeout(120)
    try:
        data = s.recv(1)
    except ConnectionResetError:
        data = b""
    if not data:
        raise Blocked("closed")
    return "flow-still-open"


def reconnect():
    try:
        with socket.create_connection(("echo.agentd.test", PORT), timeout=10) as again:
            again.sendall(b"again\n")
            again.settimeout(5)
            if again.recv(16):
                return "echoed"
    except socket.gaierror as err:
        raise Blocked(f"gaierror-{err.errno}") from None
    except (ConnectionResetError, TimeoutError):
        pass
    raise Blocked("closed")


attempt("flow-after-cut", flow_after_cut)
attempt("reconnect-after-cut", reconnect)
done()
