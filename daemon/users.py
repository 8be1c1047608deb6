"""Resolve the user an agent runs as; refuse root unless the config allows it."""

from __future__ import annotations

import grp
import os
import pwd
from dataclasses import dataclass

from daemon.errors import FailedPrecondition, InvalidArgument


@dataclass(frozen=True)
class AgentUser:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]


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
