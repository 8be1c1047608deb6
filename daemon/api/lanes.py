"""Where each RPC's blocking work runs: a lane for stops, one for the rest, the recorder.

The API serves every call on one asyncio loop (grpc.aio): a call waiting for
its request, a stop in its grace period, an event or log follower whose
client does not read, each is a suspended coroutine holding no thread
(FIELD-NOTES "Serving the API": grpcio's synchronous server gave each of
them a pool worker until 64 of them blocked every kill).

Blocking domain work runs in thread pools, one per kind of work:

* the stop lane: stop, kill, estop and freeze, nothing else. Only signed
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

T = TypeVar("T")

STOP_WORKERS = 16
WORK_WORKERS = 8
# How long a stop's reply waits for its audit record before saying it is
# pending: a disk that hangs (a stuck NFS server, a failing device) must not
# hold the answer to a kill that has happened.
RECORD_WAIT_S = 2.0


class Lanes:
    def __init__(self, recorder: Recorder, *, stop_workers: int = STOP_WORKERS,
                 work_workers: int = WORK_WORKERS) -> None:
        self.recorder = recorder
        self._stop = concurrent.futures.ThreadPoolExecutor(
            max_workers=stop_workers, thread_name_prefix="agentd-stop")
        self._work = concurrent.futures.ThreadPoolExecutor(
            max_workers=work_workers, thread_name_prefix="agentd-work")

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
        self._stop.shutdown(wait=True)
        self._work.shutdown(wait=True)
