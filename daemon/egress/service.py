"""The egress service process: `python -m daemon.egress.service --control-fd N`.

A separate process so that a bug or a flood in flow handling can never
stall the daemon's kill path, and so that it can be restarted on its own
(daemon.egress.control does so and hands it every agent's sockets again).
It imports the standard library, idna, dnslib and this package only: no
gRPC, no protobuf, nothing of the daemon above it.

Control messages (daemon -> service), one JSON object per packet:
  {"op": "add", "agent": ID, "name": NAME, "allow": [TEXT...], "byte_cap": N,
   "roles": [ROLE...]}   with one fd per role, in order, by SCM_RIGHTS
  {"op": "cut", "agent": ID, "empty": BOOL}
  {"op": "remove", "agent": ID}
  {"op": "ping", "seq": N}
Answers and events (service -> daemon): {"kind": "pong", "seq": N},
{"kind": "added", "agent": ID} or {"kind": "error", "agent": ID, "error": TEXT},
and the flow / dns / dropped_events events of docs/egress.md. Events are
sent without ever blocking: when the socket is full they queue (bounded),
and past that they are counted and reported as dropped_events.
The service exits when the control socket closes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import faulthandler
import ipaddress
import os
import signal
import socket
import sys
from typing import Any

from daemon.egress import wire
from daemon.egress.allowlist import Allowlist
from daemon.egress.flows import AgentEgress, Settings
from daemon.egress.upstream import host_resolvers

ROLES = frozenset({"tcp4", "tcp6", "dns4", "dns6", "proxy"})
EVENT_QUEUE = 4096  # events held while the daemon is slow to read; more are counted


class EventSink:
    """Non-blocking sends to the control socket, with a bounded queue and drop counts."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._queue: collections.deque[bytes] = collections.deque()
        # Answers to the daemon (pong, added, error): never dropped, and sent
        # before any queued event, so that an agent's flood of events cannot
        # keep another agent from launching (the daemon waits for "added").
        self._replies: collections.deque[bytes] = collections.deque()
        self._dropped: collections.Counter[str] = collections.Counter()
        # Of those, the denials: the daemon still counts them (egress_denied).
        self._dropped_denied: collections.Counter[str] = collections.Counter()
        self._waiting = False

    def reply(self, message: dict[str, Any]) -> None:
        self._replies.append(wire.encode(message))
        self._arm()

    def emit(self, event: dict[str, Any]) -> None:
        try:
            data = wire.encode(event)
        except ValueError:
            # Over the packet limit (it never should be: reasons are capped):
            # counted as dropped, never raised into the flow that sent it.
            self._drop(event)
            self._arm()
            return
        if self._queue or self._dropped or self._replies:
            self._enqueue(event, data)
            return
        try:
            self._sock.send(data)
        except BlockingIOError:
            self._enqueue(event, data)
        except OSError:
            pass  # the daemon is gone; the control reader ends the service

    def _drop(self, event: dict[str, Any]) -> None:
        agent = str(event.get("agent", ""))
        self._dropped[agent] += 1
        if event.get("verdict") in ("denied", "refused"):
            self._dropped_denied[agent] += 1

    def _enqueue(self, event: dict[str, Any], data: bytes) -> None:
        if len(self._queue) >= EVENT_QUEUE:
            self._drop(event)
        else:
            self._queue.append(data)
        self._arm()

    def _arm(self) -> None:
        if not self._waiting:
            self._waiting = True
            asyncio.get_running_loop().add_writer(self._sock.fileno(), self._flush)

    def _flush(self) -> None:
        try:
            while self._replies:
                self._sock.send(self._replies[0])
                self._replies.popleft()
            while self._queue:
                self._sock.send(self._queue[0])
                self._queue.popleft()
                if self._replies:
                    return self._flush()
            while self._dropped:
                agent, n = next(iter(self._dropped.items()))
                self._sock.send(wire.encode({"kind": "dropped_events", "agent": agent,
                                             "count": n,
                                             "denied": self._dropped_denied.get(agent, 0)}))
                del self._dropped[agent]
                self._dropped_denied.pop(agent, None)
        except BlockingIOError:
            return
        except OSError:
            self._queue.clear()
            self._replies.clear()
            self._dropped.clear()
            self._dropped_denied.clear()
        asyncio.get_running_loop().remove_writer(self._sock.fileno())
        self._waiting = False


class Service:
    def __init__(self, control: socket.socket, settings: Settings) -> None:
        self.control = control
        self.settings = settings
        self.events = EventSink(control)
        self.agents: dict[str, AgentEgress] = {}

    def _add(self, msg: dict[str, Any], fds: list[int]) -> None:
        agent_id = str(msg["agent"])
        roles = [str(r) for r in msg["roles"]]
        if len(roles) != len(fds) or not set(roles) <= ROLES or len(set(roles)) != len(roles):
            raise ValueError(f"roles {roles} do not match the {len(fds)} fds sent")
        allow = Allowlist.of(msg["allow"])
        socks = {role: socket.socket(fileno=fd) for role, fd in zip(roles, fds, strict=True)}
        fds.clear()  # owned by the sockets now
        for s in socks.values():
            s.setblocking(False)
        old = self.agents.pop(agent_id, None)
        if old is not None:
            old.remove()
        agent = AgentEgress(agent_id, str(msg.get("name", agent_id)), allow, socks=socks,
                            byte_cap=int(msg.get("byte_cap", 0)), settings=self.settings,
                            emit=self.events.emit)
        # Re-added after a restart: what its flows already moved counts.
        agent.bytes_used = max(0, int(msg.get("used", 0)))
        self.agents[agent_id] = agent
        agent.start()

    def handle(self, msg: dict[str, Any], fds: list[int]) -> None:
        op = msg.get("op")
        agent_id = str(msg.get("agent", ""))
        try:
            if op == "add":
                self._add(msg, fds)
                self.events.reply({"kind": "added", "agent": agent_id})
            elif op == "cut":
                agent = self.agents.get(agent_id)
                if agent is not None:
                    agent.cut(empty=bool(msg.get("empty")))
            elif op == "remove":
                agent = self.agents.pop(agent_id, None)
                if agent is not None:
                    agent.remove()
            elif op == "ping":
                self.events.reply({"kind": "pong", "seq": msg.get("seq")})
            else:
                raise ValueError(f"unknown op {op!r}")
        except (ValueError, KeyError, TypeError, OSError) as err:
            self.events.reply({"kind": "error", "agent": agent_id, "op": op,
                              "error": f"{type(err).__name__}: {err}"})
        finally:
            for fd in fds:
                os.close(fd)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        closed: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            while True:
                try:
                    got = wire.recv(self.control)
                except BlockingIOError:
                    return
                except (ValueError, OSError) as err:
                    self.events.emit({"kind": "error", "agent": "", "error": str(err)})
                    if isinstance(err, OSError):
                        got = None
                    else:
                        continue
                if got is None:
                    if not closed.done():
                        closed.set_result(None)
                    return
                self.handle(*got)

        loop.add_reader(self.control.fileno(), readable)
        try:
            await closed
        finally:
            loop.remove_reader(self.control.fileno())
            for agent in self.agents.values():
                agent.remove()


def _args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m daemon.egress.service")
    ap.add_argument("--control-fd", type=int, required=True)
    ap.add_argument("--resolver", action="append", default=[], metavar="IP:PORT",
                    help="upstream DNS server (repeatable); default: /etc/resolv.conf's")
    ap.add_argument("--private-ok", action="append", default=[], metavar="CIDR",
                    help="private range that flows may reach (repeatable)")
    return ap.parse_args(argv)


def parse_resolver(text: str) -> tuple[str, int]:
    """'IP:PORT' or '[IPv6]:PORT' or a bare IP (port 53). Raises ValueError."""
    if text.startswith("["):
        host, _, port = text[1:].partition("]:")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, "53"
    ipaddress.ip_address(host)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"resolver {text!r}: bad port")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    args = _args(sys.argv[1:] if argv is None else argv)
    # `kill -USR1 PID` prints every thread's stack to stderr: a stuck
    # service can be looked into before it is restarted.
    faulthandler.register(signal.SIGUSR1)
    resolvers = [parse_resolver(r) for r in args.resolver] or host_resolvers()
    settings = Settings(resolvers=resolvers,
                        private_ok=tuple(ipaddress.ip_network(n) for n in args.private_ok))
    control = socket.socket(fileno=args.control_fd)
    control.setblocking(False)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Service(control, settings).run())


if __name__ == "__main__":
    main()
