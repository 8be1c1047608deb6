"""An admission lane queues a bounded number of verifications and refuses the rest."""

from __future__ import annotations

import asyncio
import threading

import pytest

from daemon.api.lanes import Admission
from daemon.errors import Overloaded


def test_a_full_admission_queue_refuses_at_once_and_recovers() -> None:
    release = threading.Event()
    lane = Admission("control", workers=1, limit=2)

    async def scenario() -> list[str]:
        held = [asyncio.ensure_future(lane.run(release.wait)) for _ in range(2)]
        await asyncio.sleep(0)  # both are queued now
        with pytest.raises(Overloaded, match=r"2 signed commands already wait .* emergency"):
            await lane.run(lambda: "never")
        release.set()
        await asyncio.gather(*held)
        return [await lane.run(lambda: "served")]

    try:
        assert asyncio.run(scenario()) == ["served"]
    finally:
        release.set()
        lane.close()
