"""The Agentd service on the API's asyncio loop: each RPC to its lane (daemon.api.lanes).

Errors are mapped to gRPC statuses here and only here. A handler never lets
an exception escape: the daemon must never crash on input.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeVar, cast

import grpc
from agentd.v1 import agentd_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from daemon.api import convert, logs
from daemon.api.lanes import Admission, Lanes
from daemon.auth import VerifiedCommand
from daemon.commands import cut, estop, freeze, kill, renew, reset, run, stop, transaction
from daemon.commands.context import Ctx
from daemon.errors import AgentdError, Overloaded
from daemon.events import RING_SIZE, Event, EventBus
from daemon.supervisor.agent import Agent

log = logging.getLogger(__name__)
T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

# Event streams and log streams hold no thread, but each holds a little
# memory and a stream of its connection, and a log stream two open files: a
# bound all the same (a log stream whose client does not read holds them).
MAX_EVENT_STREAMS = 16
MAX_LOG_STREAMS = 128
# How often a follower with nothing to send looks again.
EVENTS_POLL_S = 0.05
# A refusal's reply waits this long at most for its audit record.
_REJECTION_RECORD_WAIT_S = 2.0
# While a stop's grace period runs: how often the cgroup is looked at.
_GRACE_POLL_MIN_S, _GRACE_POLL_MAX_S = 0.002, 0.05


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class Servicer:
    """One method per RPC: async def NAME(request, context)."""

    def __init__(self, ctx: Ctx, lanes: Lanes, info: Callable[[], agentd_pb2.InfoResponse],
                 *, events: EventBus, admission: Admission | None = None,
                 max_event_streams: int = MAX_EVENT_STREAMS) -> None:
        """admission: the socket's verification queue for stops (default: the control's)."""
        self.ctx = ctx
        self.sup = ctx.sup
        self.lanes = lanes
        self.admission = admission or lanes.control
        self.info = info
        self.events = events
        self._max_event_streams = max_event_streams
        self._event_streams = 0
        self._log_streams = 0
        # Stops under way, kept until done (the loop holds only weak references).
        self._stops: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------- helpers
    def _agent(self, a: Agent) -> agentd_pb2.Agent:
        return convert.agent(a, self.sup.enforcer.remaining(a, "lease"),
                             self.sup.sampler.sampled_at(a))

    async def _carried_through(self, go: Coroutine[Any, Any, T]) -> T:
        """Run a stop to its end whatever the client does.

        A client that goes away (Ctrl-C, a deadline) cancels its call; a stop
        must not stop half way (SIGTERM sent, the kill after the grace period
        never written, or the kill written and never recorded). The stop runs
        as a task of its own; the call only waits for it.
        """
        task = asyncio.get_running_loop().create_task(go)
        self._stops.add(task)
        task.add_done_callback(_finished)
        task.add_done_callback(self._stops.discard)
        return await asyncio.shield(task)

    async def drain(self, timeout: float) -> None:
        """Wait up to timeout for stops under way (at shutdown, before the loop ends)."""
        if self._stops:
            await asyncio.wait(set(self._stops), timeout=timeout)

    async def _admit(self, request: agentd_pb2.Envelope, rpc: str, fn: Callable[[], T]) -> T:
        """Verify a stop on this socket's admission lane (bounded: refuses when full)."""
        try:
            return await self.admission.run(fn)
        except Overloaded as err:
            self.ctx.gate.reject(request, rpc, err)
            raise

    async def _act(self, vc: VerifiedCommand, target: str, fn: Callable[[], T]) -> T:
        """fn on the stop lane; an admitted stop that fails to act is recorded as failed."""
        try:
            return await self.lanes.stop(fn)
        except Exception as err:
            failed = err  # bound for the recorder thread: `err` is unset after the block
            await self.lanes.record(
                lambda: transaction.record_failed(self.ctx, vc, target, failed))
            raise

    async def _call(self, context: Context, go: Awaitable[T]) -> T:
        try:
            return await go
        except AgentdError as err:
            if err.audit_written is not None:
                # Answer once the refusal is on record, unless the disk is slow.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.wrap_future(err.audit_written),
                                           _REJECTION_RECORD_WAIT_S)
            await _abort(context, err.code, err.message)
        except Exception:
            log.exception("internal error")
            await _abort(context, grpc.StatusCode.INTERNAL,
                         "internal error in agentd; see its log")

    # --------------------------------------------------------------- reads
    async def Info(self, request: agentd_pb2.InfoRequest,
                   context: Context) -> agentd_pb2.InfoResponse:
        # On the loop: every field is an in-memory read, and an on-call
        # engineer's kill asks Info for its audience first; it must not
        # queue behind the work lane.
        async def go() -> agentd_pb2.InfoResponse:
            return self.info()

        return await self._call(context, go())

    async def ListAgents(self, request: agentd_pb2.ListAgentsRequest,
                         context: Context) -> agentd_pb2.ListAgentsResponse:
        return await self._call(context, self.lanes.work(
            lambda: agentd_pb2.ListAgentsResponse(
                agents=[self._agent(a) for a in self.sup.agents()])))

    async def GetAgent(self, request: agentd_pb2.GetAgentRequest,
                       context: Context) -> agentd_pb2.Agent:
        return await self._call(context, self.lanes.work(
            lambda: self._agent(self.sup.get(request.name))))

    # --------------------------------------------------------------- stops
    async def Kill(self, request: agentd_pb2.Envelope,
                   context: Context) -> agentd_pb2.KillResult:
        async def go() -> agentd_pb2.KillResult:
            admitted = await self._admit(request, "kill", lambda: kill.admit(self.ctx, request))
            k = await self._act(admitted[0], admitted[1].name,
                                lambda: kill.act(self.ctx, admitted))
            durable = await self.lanes.record(lambda: kill.record(self.ctx, k))
            return _pending(convert.kill_result(k.agent, k.outcome), durable)

        return await self._call(context, self._carried_through(go()))

    async def Stop(self, request: agentd_pb2.Envelope,
                   context: Context) -> agentd_pb2.KillResult:
        async def go() -> agentd_pb2.KillResult:
            admitted = await self._admit(request, "stop", lambda: stop.admit(self.ctx, request))
            vc, (agent, _) = admitted
            s = await self._act(vc, agent.name, lambda: stop.begin(self.ctx, admitted))
            if s.term.outcome is None:
                # The grace period holds a coroutine, not a thread. Whatever
                # happens to the wait, the stop finishes (kills what is left).
                with contextlib.suppress(Exception):
                    await _wait_empty(s.agent, time.monotonic() + s.grace_s)
            out = await self._act(vc, agent.name, lambda: stop.finish(self.ctx, s))
            durable = await self.lanes.record(lambda: stop.record(self.ctx, s, out))
            return _pending(convert.kill_result(s.agent, out), durable)

        return await self._call(context, self._carried_through(go()))

    async def Estop(self, request: agentd_pb2.Envelope,
                    context: Context) -> agentd_pb2.EstopResult:
        async def go() -> agentd_pb2.EstopResult:
            vc = await self._admit(request, "estop", lambda: estop.admit(self.ctx, request))
            e = await self._act(vc, "*", lambda: estop.act(self.ctx, vc))
            durable = await self.lanes.record(lambda: estop.record(self.ctx, e))
            agents = [convert.kill_result(x.agent, x.outcome) for x in e.result.results]
            return agentd_pb2.EstopResult(
                agents_killed=len(agents),
                processes_killed=sum(a.processes_killed for a in agents),
                duration_ms=e.result.duration_ms,
                all_verified_empty=all(a.verified_empty for a in agents),
                agents=agents, latched=self.sup.latch.latched, audit_pending=not durable)

        return await self._call(context, self._carried_through(go()))

    async def Freeze(self, request: agentd_pb2.Envelope,
                     context: Context) -> agentd_pb2.Agent:
        async def go() -> agentd_pb2.Agent:
            admitted = await self._admit(request, "freeze",
                                         lambda: freeze.admit(self.ctx, request))
            f = await self._act(admitted[0], admitted[1].name,
                                lambda: freeze.act(self.ctx, admitted))
            await self.lanes.record(lambda: freeze.record(self.ctx, f))
            return self._agent(freeze.check_done(f))

        return await self._call(context, self._carried_through(go()))

    async def Cut(self, request: agentd_pb2.Envelope,
                  context: Context) -> agentd_pb2.Agent:
        async def go() -> agentd_pb2.Agent:
            admitted = await self._admit(request, "cut", lambda: cut.admit(self.ctx, request))
            c = await self._act(admitted[0], admitted[1].name,
                                lambda: cut.act(self.ctx, admitted))
            await self.lanes.record(lambda: cut.record(self.ctx, c))
            return self._agent(c.agent)

        return await self._call(context, self._carried_through(go()))

    # ----------------------------------------------- starts and loosenings
    async def Thaw(self, request: agentd_pb2.Envelope,
                   context: Context) -> agentd_pb2.Agent:
        return await self._call(context, self.lanes.work(
            lambda: self._agent(freeze.thaw(self.ctx, request))))

    async def Run(self, request: agentd_pb2.Envelope,
                  context: Context) -> agentd_pb2.Agent:
        return await self._call(context, self.lanes.work(
            lambda: self._agent(run.run(self.ctx, request))))

    async def Renew(self, request: agentd_pb2.Envelope,
                    context: Context) -> agentd_pb2.LeaseResult:
        def go() -> agentd_pb2.LeaseResult:
            r = renew.run(self.ctx, request)
            return agentd_pb2.LeaseResult(
                name=r.agent.name, id=r.agent.id, ttl_ms=r.ttl_ms,
                remaining_ms=r.remaining_s * 1e3,
                expires_at=timestamp(time.time() + r.remaining_s))

        return await self._call(context, self.lanes.work(go))

    async def Reset(self, request: agentd_pb2.Envelope,
                    context: Context) -> agentd_pb2.ResetResult:
        def go() -> agentd_pb2.ResetResult:
            principals = reset.run(self.ctx, request)
            return agentd_pb2.ResetResult(latched=self.sup.latch.latched,
                                          principals=list(principals))

        return await self._call(context, self.lanes.work(go))

    # ------------------------------------------------------------- streams
    async def Events(self, request: agentd_pb2.EventsRequest,
                     context: Context) -> AsyncIterator[agentd_pb2.Event]:
        """The backlog asked for, then (follow) new events until the client goes away.

        At most max_event_streams at once; the rest are refused at once
        (RESOURCE_EXHAUSTED), never queued.
        """
        if self._event_streams >= self._max_event_streams:
            await _abort(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"agentd serves at most {self._max_event_streams} event streams at once and "
                "all are in use; end a follower (agentctl events -f) or try again later")
        self._event_streams += 1
        try:
            backlog = min(request.backlog, RING_SIZE)
            with self.events.subscribe(backlog, request.agent or None,
                                        follow=request.follow) as sub:
                while not context.done():
                    event = sub.next(timeout=0)
                    if event is not None:
                        yield _event_message(event)
                    elif sub.closed:
                        return  # backlog only, or the daemon is stopping
                    else:
                        await asyncio.sleep(EVENTS_POLL_S)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("internal error in an event stream")
            await _abort(context, grpc.StatusCode.INTERNAL,
                         "internal error in agentd; see its log")
        finally:
            self._event_streams -= 1

    async def Logs(self, request: agentd_pb2.LogsRequest,
                   context: Context) -> AsyncIterator[agentd_pb2.LogChunk]:
        """The tail of the agent's stdout and stderr, then (follow) new output until it ends."""
        try:
            agent = self.sup.get(request.name)
        except AgentdError as err:
            await _abort(context, err.code, err.message)
        if self._log_streams >= MAX_LOG_STREAMS:
            await _abort(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"agentd serves at most {MAX_LOG_STREAMS} log streams at once and all are in "
                "use; end a follower (agentctl logs -f) or try again later")
        self._log_streams += 1
        steps = logs.chunks(agent, tail_bytes=request.tail_bytes, follow=request.follow,
                            active=lambda: not context.done())
        try:
            while True:
                # Each step reads files: on the work lane, never on this loop.
                step = await self.lanes.work(lambda: next(steps, _END))
                if step is _END:
                    return
                if step is None:
                    await asyncio.sleep(logs.POLL_S)
                    continue
                name, data = cast(logs.Chunk, step)
                yield agentd_pb2.LogChunk(stream=name, data=data)
        except asyncio.CancelledError:
            raise
        except AgentdError as err:
            await _abort(context, err.code, err.message)
        except Exception:
            log.exception("internal error in a log stream")
            await _abort(context, grpc.StatusCode.INTERNAL,
                         "internal error in agentd; see its log")
        finally:
            self._log_streams -= 1
            # Closes its files; if a step still runs in the work lane, the
            # generator is closed when it is collected instead.
            with contextlib.suppress(ValueError):
                steps.close()


async def _abort(context: Context, code: grpc.StatusCode,
                 message: str) -> NoReturn:
    await context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


_END = object()  # the end of a log stream's steps


def _finished(task: asyncio.Task[Any]) -> None:
    """Retrieve a stop's outcome even when its caller has gone (else asyncio logs it as lost)."""
    if not task.cancelled() and task.exception() is not None:
        err = task.exception()
        if not isinstance(err, AgentdError):
            log.error("a stop whose client had gone failed", exc_info=err)


def _pending(result: agentd_pb2.KillResult, durable: bool) -> agentd_pb2.KillResult:
    result.audit_pending = not durable
    return result


async def _wait_empty(agent: Agent, deadline: float) -> bool:
    """Wait, without a thread, until the agent's cgroup is empty or deadline passes."""
    delay = _GRACE_POLL_MIN_S
    while agent.cgroup.populated():
        now = time.monotonic()
        if now >= deadline:
            return False
        await asyncio.sleep(min(delay, deadline - now))
        delay = min(delay * 2, _GRACE_POLL_MAX_S)
    return True


def _event_message(e: Event) -> agentd_pb2.Event:
    return agentd_pb2.Event(
        seq=e.seq, at=timestamp(e.at), kind=e.kind, type=e.type, agent=e.agent,
        agent_id=e.agent_id, message=e.message, fields_json=e.fields_json,
    )
