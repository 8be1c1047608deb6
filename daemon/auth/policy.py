"""Which roles may do which action: the one table, read by verify()."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from daemon.auth.truststore import Role

ACTION_ROLES: Mapping[str, frozenset[Role]] = MappingProxyType(
    {
        "run": frozenset({Role.ADMIN, Role.OPERATOR}),
        # Anyone who may be paged must be able to stop an agent.
        "stop": frozenset({Role.ADMIN, Role.OPERATOR, Role.ONCALL}),
        "kill": frozenset({Role.ADMIN, Role.OPERATOR, Role.ONCALL}),
    }
)

# Actions that must keep working while the replay cache is degraded: a
# replayed stop or kill can only end an agent, never start one.
STOP_ACTIONS: frozenset[str] = frozenset({"stop", "kill"})


def roles_for(action: str) -> frozenset[Role]:
    """The roles that may perform `action`; empty (nobody) for an unknown action."""
    return ACTION_ROLES.get(action, frozenset())


def allows(roles: Iterable[Role], action: str) -> bool:
    """Whether any of `roles` may perform `action`."""
    return not roles_for(action).isdisjoint(roles)
