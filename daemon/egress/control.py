"""The daemon's side of the egress service: start it, hand it agents, cut them, restart it.

One reader thread owns the control socket's receiving end: it passes the
service's events to on_event, answers waiters (ping, add), flushes sends
that found the socket full, and notices the service's death (EOF), then
restarts it and adds every agent again from the dup()s of their sockets
kept here. cut() and remove() never block: they are called right after a
kill is written, and a stuck service must not hold up the caller.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from daemon import children
from daemon.egress import wire
from daemon.egress.allowlist import Allowlist

log = logging.getLogger(__name__)

ADD_TIMEOUT_S = 5.0
_RESTART_BACKOFF_S = 1.0  # a service that dies at once is not restarted in a tight loop


class EgressError(RuntimeError):
    """The service refused an agent or did not answer; the message says which."""


@dataclass
class _Agent:
    name: str
    allow: Allowlist
    fds: dict[str, int]  # our dup()s, closed on remove/stop
    byte_cap: int
    # Bytes its flows moved, from the service's close events: a restarted
    # service is told, so that a restart never hands out the cap again.
    used: int = 0


class EgressService:
    """The client of one egress service process."""

    def __init__(self, *, resolvers: list[tuple[str, int]], private_ok: list[str],
                 on_event: Callable[[dict[str, Any]], None]) -> None:
        self._resolvers = list(resolvers)
        self._private_ok = list(private_ok)
        self._on_event = on_event
        self._lock = threading.Lock()
        self._agents: dict[str, _Agent] = {}
        self._queue: collections.deque[bytes] = collections.deque()
        self._waiters: dict[str, tuple[threading.Event, list[dict[str, Any]]]] = {}
        self._seq = itertools.count(1)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._reader: threading.Thread | None = None
        self._restarting = False

    # ------------------------------------------------------------ process
    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-I", "-m", "daemon.egress.service",
                "--control-fd", str(theirs.fileno())]
        for host, port in self._resolvers:
            argv += ["--resolver", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        for net in self._private_ok:
            argv += ["--private-ok", net]
        try:
            # Through children.spawn: the daemon's subreaper then leaves this
            # child to its Popen, which gets its real exit status.
            self._proc = children.spawn(lambda: subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, close_fds=True, pass_fds=(theirs.fileno(),),
                start_new_session=True, cwd="/"))
        except OSError as err:
            ours.close()
            raise EgressError(f"cannot start the egress service: {err.strerror}") from err
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours

    def start(self) -> None:
        """Spawn the service and its reader thread. Raises EgressError."""
        self._spawn()
        self._reader = threading.Thread(target=self._read_loop, name="egress-control",
                                        daemon=True)
        self._reader.start()

    def alive(self) -> bool:
        return (not self._restarting and self._proc is not None
                and self._proc.poll() is None)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        """End the service (EOF on its control socket, then SIGKILL after 5 s) and the reader."""
        self._stopping = True
        self._wake()
        if self._reader is not None:
            self._reader.join(10)
        self._end_process()
        with self._lock:
            for agent in self._agents.values():
                _close_all(agent.fds)
            self._agents.clear()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _end_process(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    # ------------------------------------------------------------ requests
    def ping(self, timeout: float) -> bool:
        """Whether the service answers a ping within timeout seconds."""
        seq = next(self._seq)
        try:
            return self._request({"op": "ping", "seq": seq}, f"pong:{seq}", timeout) is not None
        except EgressError:
            return False

    def add(self, agent_id: str, name: str, allow: Allowlist, fds: dict[str, int],
            byte_cap: int = 0) -> None:
        """Hand the service an agent's sockets (role -> fd; the caller keeps its own fds).

        Raises EgressError if the service refuses them or does not answer
        within 5 s; nothing is kept then.
        """
        agent = _Agent(name, allow, {role: os.dup(fd) for role, fd in fds.items()}, byte_cap)
        with self._lock:
            old = self._agents.pop(agent_id, None)
            self._agents[agent_id] = agent
        if old is not None:
            _close_all(old.fds)
        try:
            answer = self._send_add(agent_id, agent, ADD_TIMEOUT_S)
        except EgressError:
            self._forget(agent_id, agent)
            raise
        if answer.get("kind") != "added":
            self._forget(agent_id, agent)
            raise EgressError(f"egress service refused {agent_id}: {answer.get('error')}")

    def cut(self, agent_id: str, *, empty: bool) -> None:
        """Close every flow of the agent now; empty=True also empties its allowlist. Never
        blocks."""
        with self._lock:
            agent = self._agents.get(agent_id)
            if agent is not None and empty:
                agent.allow = Allowlist()  # a restart must not give it back
        self._send_nowait({"op": "cut", "agent": agent_id, "empty": empty})

    def remove(self, agent_id: str) -> None:
        """Close the agent's flows, forget it, close its sockets. Never blocks."""
        with self._lock:
            agent = self._agents.pop(agent_id, None)
        self._send_nowait({"op": "remove", "agent": agent_id})
        if agent is not None:
            _close_all(agent.fds)

    def _forget(self, agent_id: str, agent: _Agent) -> None:
        with self._lock:
            if self._agents.get(agent_id) is agent:
                del self._agents[agent_id]
        _close_all(agent.fds)

    # ------------------------------------------------------------ sending
    def _send_add(self, agent_id: str, agent: _Agent, timeout: float) -> dict[str, Any]:
        roles = list(agent.fds)
        msg = {"op": "add", "agent": agent_id, "name": agent.name,
               "allow": agent.allow.texts(), "byte_cap": agent.byte_cap, "roles": roles}
        answer = self._request(msg, f"add:{agent_id}", timeout,
                               fds=[agent.fds[r] for r in roles])
        if answer is None:
            raise EgressError(f"egress service did not answer adding {agent_id} in "
                              f"{timeout:g} s")
        return answer

    def _request(self, msg: dict[str, Any], key: str, timeout: float,
                 fds: list[int] | None = None) -> dict[str, Any] | None:
        done = threading.Event()
        box: list[dict[str, Any]] = []
        with self._lock:
            self._waiters[key] = (done, box)
        try:
            deadline = time.monotonic() + timeout
            self._send_blocking(msg, fds, deadline)
            done.wait(max(0.0, deadline - time.monotonic()))
            return box[0] if box else None
        finally:
            with self._lock:
                self._waiters.pop(key, None)

    def _send_blocking(self, msg: dict[str, Any], fds: list[int] | None,
                       deadline: float) -> None:
        # Only add and ping wait (never on the kill path): behind queued
        # cuts, so the order of messages is kept.
        while True:
            with self._lock:
                sock = self._sock
                if sock is not None and not self._queue:
                    try:
                        wire.send(sock, msg, fds)
                        return
                    except BlockingIOError:
                        pass
                    except OSError as err:
                        raise EgressError(f"egress service unreachable: {err}") from err
            if time.monotonic() > deadline:
                raise EgressError("egress service's control socket stayed full")
            time.sleep(0.005)

    def _send_nowait(self, msg: dict[str, Any]) -> None:
        data = wire.encode(msg)
        with self._lock:
            if not self._queue and self._sock is not None:
                try:
                    self._sock.send(data)
                    return
                except BlockingIOError:
                    pass
                except OSError:
                    return  # the service is dead; the restart re-adds from our state
            self._queue.append(data)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # full: it is awake already
            os.write(self._wake_w, b"\0")

    def _flush(self) -> None:
        with self._lock:
            while self._queue and self._sock is not None:
                try:
                    self._sock.send(self._queue[0])
                except BlockingIOError:
                    return
                except OSError:
                    self._queue.clear()
                    return
                self._queue.popleft()

    # ------------------------------------------------------------ reader thread
    def _read_loop(self) -> None:
        while not self._stopping:
            sock = self._sock
            if sock is None:
                return
            self._serve(sock)
            if self._stopping:
                return
            self._restart()

    def _serve(self, sock: socket.socket) -> None:
        """Read events until the service's EOF (or stop)."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._wake_r, selectors.EVENT_READ)
            sel.register(sock, selectors.EVENT_READ)
            while not self._stopping:
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._queue else 0)
                sel.modify(sock, want)
                for key, mask in sel.select(1.0):
                    if key.fileobj == self._wake_r:
                        while True:
                            try:
                                os.read(self._wake_r, 512)
                            except BlockingIOError:
                                break
                        continue
                    if mask & selectors.EVENT_WRITE:
                        self._flush()
                    if mask & selectors.EVENT_READ and not self._read_some(sock):
                        return

    def _read_some(self, sock: socket.socket) -> bool:
        while True:
            try:
                got = wire.recv(sock)
            except BlockingIOError:
                return True
            except ValueError as err:
                log.warning("egress service sent a bad message: %s", err)
                continue
            except OSError:
                return False
            if got is None:
                return False
            msg, fds = got
            _close_all(dict(enumerate(fds)))  # the service never sends fds; none kept
            self._dispatch(msg)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg.get("kind")
        key = None
        if kind == "pong":
            key = f"pong:{msg.get('seq')}"
        elif kind in ("added", "error") and msg.get("op", "add") == "add":
            key = f"add:{msg.get('agent')}"
        if key is not None:
            with self._lock:
                waiter = self._waiters.get(key)
            if waiter is not None:
                waiter[1].append(msg)
                waiter[0].set()
                return
            if kind in ("pong", "added"):
                return
        if kind == "flow" and msg.get("phase") == "close":
            with self._lock:
                agent = self._agents.get(str(msg.get("agent", "")))
                if agent is not None:
                    agent.used += int(msg.get("bytes_out") or 0) + int(msg.get("bytes_in") or 0)
        self._deliver(msg)

    def _deliver(self, msg: dict[str, Any]) -> None:
        try:
            self._on_event(msg)
        except Exception:  # the callback's bug must not end the reader thread
            log.exception("egress on_event failed for %s", msg.get("kind"))

    def _restart(self) -> None:
        self._restarting = True
        try:
            started = time.monotonic()
            self._end_process()
            with self._lock:
                self._queue.clear()  # cuts and removes were applied to our state already
            while not self._stopping:
                try:
                    self._spawn()
                    break
                except EgressError as err:
                    log.error("%s; retrying", err)
                    time.sleep(_RESTART_BACKOFF_S)
            if self._stopping:
                return
            if time.monotonic() - started < _RESTART_BACKOFF_S:
                time.sleep(_RESTART_BACKOFF_S)
        finally:
            self._restarting = False
        self._readd_all()

    def _readd_all(self) -> None:
        # The reader thread itself re-adds: it must read the answers too, so
        # it sends them all first and then reads, without the waiters.
        with self._lock:
            agents = list(self._agents.items())
        sock = self._sock
        failed: list[str] = []
        for agent_id, agent in agents:
            roles = list(agent.fds)
            msg = {"op": "add", "agent": agent_id, "name": agent.name,
                   "allow": agent.allow.texts(), "byte_cap": agent.byte_cap, "roles": roles,
                   "used": agent.used}
            try:
                assert sock is not None
                sock.setblocking(True)
                wire.send(sock, msg, [agent.fds[r] for r in roles])
            except OSError:
                failed.append(agent_id)
            finally:
                if sock is not None:
                    sock.setblocking(False)
        self._deliver({"kind": "egress_restarted", "agents": len(agents) - len(failed),
                       "failed": failed})


def _close_all(fds: dict[Any, int]) -> None:
    for fd in fds.values():
        try:
            os.close(fd)
        except OSError:
            log.warning("egress: closing fd %d failed", fd)
