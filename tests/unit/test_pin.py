"""The entrypoint's hash: computed once per version of a file, never reused for another."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from daemon.sandbox import pin


def test_a_changed_file_is_hashed_again_even_with_its_old_mtime(tmp_path: Path) -> None:
    exe = tmp_path / "agent"
    exe.write_bytes(b"#!/bin/sh\necho one\n")
    first = pin.resolve(str(exe), "/usr/bin")
    assert first.sha256 == hashlib.sha256(exe.read_bytes()).hexdigest()
    assert pin.resolve(str(exe), "/usr/bin").sha256 == first.sha256  # the cached one
    st = exe.stat()
    # Same size, content changed, mtime put back: only ctime tells them apart.
    with exe.open("r+b") as f:
        f.write(b"#!/bin/sh\necho two\n")
    os.utime(exe, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = pin.resolve(str(exe), "/usr/bin")
    assert again.sha256 == hashlib.sha256(b"#!/bin/sh\necho two\n").hexdigest()
    assert again.sha256 != first.sha256


def test_a_file_renamed_over_the_path_is_hashed_again(tmp_path: Path) -> None:
    exe = tmp_path / "agent"
    exe.write_bytes(b"v1")
    assert pin.resolve(str(exe), "").sha256 == hashlib.sha256(b"v1").hexdigest()
    new = tmp_path / "agent.new"
    new.write_bytes(b"v2")
    new.replace(exe)
    assert pin.resolve(str(exe), "").sha256 == hashlib.sha256(b"v2").hexdigest()
