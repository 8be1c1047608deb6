"""The egress service is a lower layer: its process imports no gRPC, protobuf or daemon upper
layer (a flaw there must not be able to reach the daemon's state, and it starts fast)."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import REPO


def test_service_imports_only_its_own_package() -> None:
    code = ("import sys, daemon.egress.service; "
            "print('\\n'.join(m for m in sys.modules if m.split('.')[0] in "
            "('grpc', 'google', 'agentd', 'daemon')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    assert [m for m in out if not m.startswith("daemon.egress") and m != "daemon"] == []
    assert "daemon.egress.control" not in out
