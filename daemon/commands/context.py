"""What every command needs: the registry, the gate, the recorder, the configuration."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.audit import AuditLog
from daemon.commands.gate import CommandGate
from daemon.commands.recorder import Recorder
from daemon.config import Config
from daemon.supervisor.core import Supervisor


@dataclass(frozen=True)
class Ctx:
    sup: Supervisor
    gate: CommandGate
    recorder: Recorder
    cfg: Config

    @property
    def audit(self) -> AuditLog:
        return self.recorder.audit
