"""Which roles may do which action: the one table, read by verify()."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from daemon.auth.truststore import Role

ACTION_ROLES: Mapping[str, frozenset[Role]] = MappingProxyType(
    {
        "run": frozenset({Role.ADMIN, Role.OPERATOR}),
        # Anyone who may be paged must be able to stop an agent, and to stop
        # them all at once.
        "stop": frozenset({Role.ADMIN, Role.OPERATOR, Role.ONCALL, Role.SUPERVISOR}),
        "kill": frozenset({Role.ADMIN, Role.OPERATOR, Role.ONCALL}),
        "estop": frozenset({Role.ADMIN, Role.OPERATOR, Role.ONCALL}),
        # A lease is held by humans or their control plane, never the agent.
        "renew": frozenset({Role.ADMIN, Role.OPERATOR, Role.SUPERVISOR}),
        # Clears the latch only (it restarts nothing); reset_signatures in the
        # config says how many distinct principals must sign.
        "reset": frozenset({Role.ADMIN, Role.OPERATOR}),
        # Freezing only stops an agent where it stands: whoever may stop it may
        # freeze it. Thawing lets a suspect agent run again: not on-call alone.
        "freeze": frozenset({Role.ADMIN, Role.OPERATOR, Role.ONCALL, Role.SUPERVISOR}),
        "thaw": frozenset({Role.ADMIN, Role.OPERATOR}),
        # A cut only takes an agent's network away (daemon.commands.cut).
        "cut": frozenset({Role.ADMIN, Role.OPERATOR, Role.ONCALL, Role.SUPERVISOR}),
    }
)

# Actions that must keep working while the replay cache is degraded: a
# replayed stop or kill can only end an agent, never start one.
STOP_ACTIONS: frozenset[str] = frozenset({"stop", "kill", "estop", "freeze", "cut"})


def roles_for(action: str) -> frozenset[Role]:
    """The roles that may perform `action`; empty (nobody) for an unknown action."""
    return ACTION_ROLES.get(action, frozenset())


def allows(roles: Iterable[Role], action: str) -> bool:
    """Whether any of `roles` may perform `action`."""
    return not roles_for(action).isdisjoint(roles)
