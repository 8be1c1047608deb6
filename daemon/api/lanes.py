"""Where each RPC's blocking work runs: a lane for stops, one for the rest, the recorder.

The API serves every call on one asyncio loop (grpc.aio): a call waiting for
its request, a stop in its grace period, an event or log follower whose
client does not read, each is a suspended coroutine holding no thread
(FIELD-NOTES "Serving the API": grpcio's synchronous server gave each of
them a pool worker until 64 of them blocked every kill).

Blocking domain work runs in thread pools, one per kind of work:

* an admission lane per socket: verification of the signed commands that
  stop. Anyone who can reach a socket can send garbage; it is verified
  here, in a bounded queue that refuses (RESOURCE_EXHAUSTED) rather than
  grows, so unverified work never queues in front of a verified kill, and a
  flood of the control socket never fills the emergency socket's queue;
* the stop lane: stop, kill, estop and freeze, nothing else. Only verified
  stop commands reach it, each holding a thread for a few milliseconds (a
  kill written and verified), or for the verification timeout when a
  process is stuck in D state;
* the work lane: runs, thaws, renews, resets and every read. A slow launch
  or a large listing waits here, never in front of a kill;
* the recorder (daemon.commands.recorder): audit records and replay entries
  of stops, after the kill, so the stop lane never waits on the disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from daemon.commands.recorder import Recorder
from daemon.errors import Overloaded

T = TypeVar("T")

ADMISSION_WORKERS = 2
# Signed commands a socket lets wait for verification; past it, refused.
ADMISSION_QUEUE = 256
STOP_WORKERS = 16
WORK_WORKERS = 8
# How long a stop's reply waits for its audit record before saying it is
# pending: a disk that hangs (a stuck NFS server, a failing device) must not
# hold the answer to a kill that has happened.
RECORD_WAIT_S = 2.0


class Admission:
    """One socket's verification queue for stop commands: a small pool, a bounded queue.

    Used from the API's loop thread only, so the count needs no lock.
    """

    def __init__(self, name: str, *, workers: int = ADMISSION_WORKERS,
                 limit: int = ADMISSION_QUEUE) -> None:
        self.name = name
        self._limit = limit
        self._waiting = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"agentd-admit-{name}")

    async def run(self, fn: Callable[[], T]) -> T:
        """fn (verification) on this socket's pool. Raises Overloaded when the queue is full."""
        if self._waiting >= self._limit:
            raise Overloaded(
                f"{self._waiting} signed commands already wait for verification on the "
                f"{self.name} socket; retry, or use the emergency socket (agentctl "
                "--stop-socket) if this one is being flooded")
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        finally:
            self._waiting -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class Lanes:
    def __init__(self, recorder: Recorder, *, stop_workers: int = STOP_WORKERS,
                 work_workers: int = WORK_WORKERS) -> None:
        self.recorder = recorder
        self._stop = concurrent.futures.ThreadPoolExecutor(
            max_workers=stop_workers, thread_name_prefix="agentd-stop")
        self._work = concurrent.futures.ThreadPoolExecutor(
            max_workers=work_workers, thread_name_prefix="agentd-work")
        self.control = Admission("control")
        self.emergency = Admission("emergency")

    async def stop(self, fn: Callable[[], T]) -> T:
        """Run fn on the stop lane."""
        return await asyncio.get_running_loop().run_in_executor(self._stop, fn)

    async def work(self, fn: Callable[[], T]) -> T:
        """Run fn on the work lane."""
        return await asyncio.get_running_loop().run_in_executor(self._work, fn)

    async def record(self, fn: Callable[[], bool]) -> bool:
        """Run fn (it writes records; True once durable) on the recorder thread.

        False if it has not finished within RECORD_WAIT_S: it still runs, in
        order, and the reply says the record is pending.
        """
        done = asyncio.wrap_future(self.recorder.submit(fn))
        # Retrieved whatever happens, so an exception after the timeout is not
        # reported as never retrieved; the recorder has logged it.
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(done), RECORD_WAIT_S)
        except TimeoutError:
            return False

    def close(self) -> None:
        self.control.close()
        self.emergency.close()
        self._stop.shutdown(wait=True)
        self._work.shutdown(wait=True)
