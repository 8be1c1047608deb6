"""Resolve the user an agent runs as; refuse root unless the config allows it."""

from __future__ import annotations

import grp
import itertools
import os
import pwd
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from daemon.errors import FailedPrecondition, InvalidArgument

DYNAMIC = "dynamic"


@dataclass(frozen=True)
class AgentUser:
    name: str  # a passwd name, or "dynamic:UID"
    uid: int
    gid: int
    groups: tuple[int, ...]
    dynamic: bool = False

    @property
    def login(self) -> str:
        """USER and LOGNAME for the agent's environment."""
        return f"agent-{self.uid}" if self.dynamic else self.name


def allocate_dynamic(in_use: Iterable[int], low: int, high: int) -> AgentUser:
    """A fresh uid (and gid of the same number) for one agent, like systemd's DynamicUser=.

    Picked at random from [low, high], skipping any uid or gid in the passwd
    or group database and any uid in_use by a running agent; never root.
    Raises FailedPrecondition when the range is used up.
    """
    taken = set(in_use)
    low = max(low, 1)
    candidates = [secrets.randbelow(high - low + 1) + low for _ in range(64)]
    for uid in itertools.chain(candidates, range(low, high + 1)):
        if uid in taken or _known(uid):
            continue
        return AgentUser(name=f"{DYNAMIC}:{uid}", uid=uid, gid=uid, groups=(), dynamic=True)
    raise FailedPrecondition(
        f"no free dynamic uid left in {low}-{high}: every one is in use by a running agent "
        "or in the passwd or group database")


def _known(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        pass
    try:
        grp.getgrgid(uid)
        return True
    except KeyError:
        return False


def resolve(name: str, *, allow_root: bool) -> AgentUser:
    """Look up a user by name or numeric uid. Raises InvalidArgument / FailedPrecondition."""
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError) as err:
        raise InvalidArgument(f"user {name!r} does not exist on this host") from err
    if entry.pw_uid == 0 and not allow_root:
        raise FailedPrecondition(
            f"refusing to run an agent as root (user {name!r}); "
            "set allow_root_agents = true in the daemon config if you really mean it"
        )
    groups = tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    if not allow_root and 0 in groups:
        root_group = grp.getgrgid(0).gr_name
        raise FailedPrecondition(
            f"user {name!r} is in group {root_group!r} (gid 0); pick an unprivileged user"
        )
    return AgentUser(name=entry.pw_name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups)
