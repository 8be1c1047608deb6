"""run: launch an agent in its cgroup and sandbox, as the signed command says."""

from __future__ import annotations

from agentd.v1 import agentd_pb2

from daemon.auth import VerifiedCommand
from daemon.auth.truststore import Role
from daemon.commands import transaction
from daemon.commands.context import Ctx
from daemon.errors import AgentdError, EstopDuringLaunch
from daemon.supervisor import runspec
from daemon.supervisor.agent import Agent
from daemon.users import DYNAMIC


def run(ctx: Ctx, envelope: agentd_pb2.Envelope) -> Agent:
    """Admit, commit, launch. Raises AgentdError (audited)."""
    def precheck(vc: VerifiedCommand) -> runspec.RunSpec:
        admin = any(Role.ADMIN in k.roles for k in vc.signers)
        return ctx.sup.check_run(vc.command.run, admin=admin, reason=vc.command.reason)

    vc, spec = ctx.gate.admit(envelope, "run", precheck)
    action = vc.command.run
    profile = spec.profile
    transaction.commit(
        ctx, vc, action.name, argv=list(action.argv),
        user=spec.user.name if spec.user else DYNAMIC, lease_ms=spec.lease_ms,
        max_runtime_ms=spec.max_runtime_ms, policy=profile.name, network=profile.network,
        # What of the host it sees: a writable workspace is how a run leaves
        # notes for the next one, so it is always on record with its path.
        bind_ro=list(profile.bind_ro), bind_rw=list(profile.bind_rw),
        entrypoint=spec.entrypoint.path,
        entrypoint_sha256=spec.entrypoint.sha256 or f"unreadable: {spec.entrypoint.error}",
        **({"escalation": list(spec.looser)} if spec.looser else {}))
    try:
        agent = ctx.sup.launch(action, spec, ",".join(vc.principals))
    except EstopDuringLaunch as err:
        transaction.result(ctx, vc, ok=False, error=err.message, agent_id=err.agent_id)
        raise
    except AgentdError as err:
        transaction.result(ctx, vc, ok=False, error=err.message)
        raise
    transaction.result(ctx, vc, ok=True, name=agent.name, agent_id=agent.id,
                       main_pid=agent.main_pid, cgroups=agent.cgroup.paths(),
                       user=agent.user.name, sandbox=_checks_text(agent))
    return agent


def _checks_text(agent: Agent) -> list[str]:
    """The sandbox checks for the audit record: "name ok|FAILED: detail"."""
    if agent.sandbox is None:
        return []
    return [f"{c.name} {'ok' if c.ok else 'FAILED'}: {c.detail}" for c in agent.sandbox.checks]
