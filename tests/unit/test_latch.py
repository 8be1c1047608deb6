"""The estop latch file: whatever cannot be read counts as latched (fail closed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.errors import FailedPrecondition
from daemon.supervisor.latch import Latch


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "estop.latch"


def test_no_file_is_not_latched(path: Path) -> None:
    latch = Latch(path)
    assert not latch.latched
    latch.refuse_run(1)  # nothing to refuse


def test_engaged_latch_survives_a_reload(path: Path) -> None:
    latch = Latch(path)
    latch.engage("agent threatened staff", "carol")
    latch.persist()
    again = Latch(path)
    assert again.state is not None
    assert (again.state.reason, again.state.by) == ("agent threatened staff", "carol")
    assert again.clear() is not None
    assert not path.exists() and not Latch(path).latched


@pytest.mark.parametrize("content", [
    b"{not json", b"\xff\xfe", b"", b"null", b"[]", b'"latched"',
    b'{"at": 1.0, "reason": "x"}',  # no "by"
    b'{"at": "yesterday", "reason": "x", "by": "y"}',
], ids=["garbage", "not-utf8", "empty", "null", "list", "string", "missing-key", "bad-time"])
def test_an_unparsable_latch_file_counts_as_latched(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    latch = Latch(path)
    assert latch.latched
    assert latch.state is not None and latch.state.by == "agentd"
    assert f"latch file {path} unreadable" in latch.state.reason
    with pytest.raises(FailedPrecondition, match="emergency stop is latched"):
        latch.refuse_run(2)


def test_an_unreadable_latch_file_counts_as_latched(path: Path) -> None:
    # A directory in its place: read fails with EISDIR even for root, whom
    # file modes do not stop.
    path.mkdir()
    latch = Latch(path)
    assert latch.latched
    assert latch.state is not None and "Is a directory" in latch.state.reason
