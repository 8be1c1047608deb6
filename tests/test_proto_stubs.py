"""The committed gRPC stubs match what `make proto` would generate now."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GENERATED = ["agentd_pb2.py", "agentd_pb2.pyi", "agentd_pb2_grpc.py", "agentd_pb2_grpc.pyi"]


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools is a dev dependency")
    bindir = Path(sys.executable).parent
    plugins = {name: bindir / f"protoc-gen-{name}" for name in ("mypy", "mypy_grpc")}
    if not all(p.exists() for p in plugins.values()):
        pytest.skip("mypy-protobuf's protoc plugins are not installed next to this Python")
    out = tmp_path / "out"
    src = tmp_path / "src"
    shutil.copytree(REPO / "proto", src, ignore=shutil.ignore_patterns("*.py", "*.pyi"))
    out.mkdir()
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{src}", f"--python_out={out}",
         f"--grpc_python_out={out}", f"--mypy_out={out}", f"--mypy_grpc_out={out}",
         f"--plugin=protoc-gen-mypy={plugins['mypy']}",
         f"--plugin=protoc-gen-mypy_grpc={plugins['mypy_grpc']}",
         str(src / "agentd" / "v1" / "agentd.proto")],
        check=True, capture_output=True,
    )
    stale = [
        name for name in GENERATED
        if (out / "agentd" / "v1" / name).read_bytes()
        != (REPO / "proto" / "agentd" / "v1" / name).read_bytes()
    ]
    assert not stale, f"stale generated stubs {stale}: run 'make proto' and commit the result"
