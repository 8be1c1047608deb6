"""Sandbox profiles: what an agent is granted, loaded strictly from TOML files.

A profile is one file, POLICY_DIR/NAME.toml. Keys it does not set keep the
built-in ``default`` profile's values, so a file lists only what differs;
POLICY_DIR/default.toml, if present, replaces the built-in default and so
also moves the line above which a run counts as an escalation.

    description = "web research agent"
    user = "dynamic"              # or a named unprivileged user
    memory = "1G"                 # bytes or 64K / 512M / 1G; 0: no limit
    cpus = 0.5                    # CPUs; 0: no limit
    pids = 256                    # 0: no limit
    nofile = 1024                 # RLIMIT_NOFILE, soft and hard
    scratch = "256M"              # size cap of /scratch (and /tmp, which lives in it)
    network = "none"              # or "allowlist" (with allow), or "host"
    allow = ["api.anthropic.com:443", "*.githubusercontent.com:443", "10.1.2.0/24:5432"]
    egress_byte_cap = "1G"        # allowlist: bytes in and out over the run; 0: none
    bind_ro = ["/srv/data"]       # host paths, shown read-only at the same path
    bind_rw = ["/srv/out"]        # host paths, writable at the same path
    env_allow = ["PATH", "HOME", "LANG"]
    entrypoint_sha256 = ""        # pin: argv[0] must hash to this

Loading is strict: an unknown key, a value of the wrong type or out of
range, or a file that group or others may write is an error naming the
file and the key (PolicyError), and every run is refused until it is fixed,
as with a broken trust store.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agentd.v1 import agentd_pb2

from daemon.config import Config
from daemon.egress.allowlist import Allowlist
from daemon.errors import InvalidArgument, PolicyError

DEFAULT = "default"
DYNAMIC = "dynamic"
# In order of reach: an agent's network is looser than the default's when later here.
NETWORKS = ("none", "allowlist", "host")
MIB = 1024 * 1024
DEFAULT_SCRATCH_BYTES = 256 * MIB
MIN_SCRATCH_BYTES = 1 * MIB
MIN_MEMORY_BYTES = 4 * MIB
MIN_NOFILE = 16
MAX_NOFILE = 1 << 20  # fs.nr_open's default: the kernel refuses more
# What agents may see of the daemon's environment for them (the values are
# the daemon's, never its own environment's); AGENTD_* are always set.
DEFAULT_ENV_ALLOW = ("PATH", "HOME", "LANG", "TERM", "TZ", "USER", "LOGNAME", "TMPDIR")

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\$?$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_KEYS = frozenset({"description", "user", "memory", "cpus", "pids", "nofile", "scratch",
                   "network", "bind_ro", "bind_rw", "env_allow", "entrypoint_sha256",
                   "allow", "egress_byte_cap"})


@dataclass(frozen=True)
class Profile:
    """One sandbox profile, complete: every field has its value."""

    name: str
    user: str = DYNAMIC
    memory_bytes: int = 0  # 0: no limit
    cpu_millis: int = 0  # 0: no limit
    pids_max: int = 1024  # 0: no limit
    nofile: int = 1024
    scratch_bytes: int = DEFAULT_SCRATCH_BYTES
    network: str = "none"
    # network "allowlist": canonical entries (daemon.egress.allowlist), and a cap.
    allow: tuple[str, ...] = ()
    egress_byte_cap: int = 0
    bind_ro: tuple[str, ...] = ()
    bind_rw: tuple[str, ...] = ()
    env_allow: tuple[str, ...] = DEFAULT_ENV_ALLOW
    entrypoint_sha256: str = ""
    description: str = ""


def builtin_default(cfg: Config) -> Profile:
    """The ``default`` profile when no default.toml replaces it.

    The user and the limits come from the daemon's own settings
    (default_user, default_memory_bytes, default_pids_max, agent_nofile),
    so a config that set them keeps its meaning.
    """
    return Profile(name=DEFAULT, user=cfg.default_user, memory_bytes=cfg.default_memory_bytes,
                   pids_max=cfg.default_pids_max, nofile=cfg.agent_nofile,
                   description="built in: no network, system files only, private scratch")


# ------------------------------------------------------------------ parsing
def parse_size(value: object, *, where: str) -> int:
    """Bytes from an integer or "64K" / "512M" / "1G". Raises PolicyError."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise PolicyError(f"{where} must be a size: bytes, or a number with K, M, G or T "
                      f"(like \"512M\"), not {value!r}")


def _int(value: object, *, where: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise PolicyError(f"{where} must be an integer from {low} to {high}, not {value!r}")
    return value


def _str_list(value: object, *, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where} must be a list of strings")
    return tuple(dict.fromkeys(value))  # de-duplicated, order kept


def check_path(path: str, *, where: str, error: type[Exception] = PolicyError) -> str:
    """An absolute, normalised path (no "..", no "//", no trailing "/"), or raise error."""
    if not path.startswith("/") or os.path.normpath(path) != path or path.startswith("//"):
        raise error(f"{where}: {path!r} must be an absolute, normalised path")
    return path


def parse(data: Mapping[str, Any], *, name: str, source: str, base: Profile) -> Profile:
    """A Profile from one file's parsed TOML; unset keys keep base's values. Raises PolicyError."""
    values: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{source}: {key}"
        if key not in _KEYS:
            raise PolicyError(f"{source}: unknown key {key!r}; known keys: "
                              f"{', '.join(sorted(_KEYS))}")
        if key == "description":
            if not isinstance(value, str):
                raise PolicyError(f"{where} must be a string")
            values["description"] = value
        elif key == "user":
            if not isinstance(value, str) or not (value == DYNAMIC or _USER_RE.match(value)):
                raise PolicyError(f"{where} must be \"dynamic\" or a user name, not {value!r}")
            values["user"] = value
        elif key == "memory":
            size = parse_size(value, where=where)
            if size and size < MIN_MEMORY_BYTES:
                raise PolicyError(f"{where}: {size} bytes is below the 4 MiB floor (0: no limit)")
            values["memory_bytes"] = size
        elif key == "cpus":
            if not isinstance(value, int | float) or isinstance(value, bool) or not (
                    value == 0 or 0.01 <= value <= 4096):
                raise PolicyError(f"{where} must be a number of CPUs from 0.01 (0: no limit)")
            values["cpu_millis"] = round(value * 1000)
        elif key == "pids":
            values["pids_max"] = _int(value, where=where, low=0, high=4_194_304)
        elif key == "nofile":
            values["nofile"] = _int(value, where=where, low=MIN_NOFILE, high=MAX_NOFILE)
        elif key == "scratch":
            size = parse_size(value, where=where)
            if size < MIN_SCRATCH_BYTES:
                raise PolicyError(f"{where}: {size} bytes is below the 1 MiB floor")
            values["scratch_bytes"] = size
        elif key == "network":
            if value not in NETWORKS:
                raise PolicyError(f"{where} must be one of {', '.join(NETWORKS)}, not {value!r}")
            values["network"] = value
        elif key == "allow":
            values["allow"] = _allow(_str_list(value, where=where), where=where,
                                     error=PolicyError)
        elif key == "egress_byte_cap":
            values["egress_byte_cap"] = parse_size(value, where=where)
        elif key in ("bind_ro", "bind_rw"):
            values[key] = tuple(check_path(p, where=where) for p in _str_list(value, where=where))
        elif key == "env_allow":
            names = _str_list(value, where=where)
            for n in names:
                if not _ENV_RE.match(n) or n.startswith("AGENTD_"):
                    raise PolicyError(f"{where}: {n!r} is not an environment variable name "
                                      "an agent may be given (AGENTD_* are the daemon's)")
            values["env_allow"] = names
        elif key == "entrypoint_sha256":
            if not isinstance(value, str) or not (value == "" or _SHA256_RE.match(value)):
                raise PolicyError(f"{where} must be 64 lowercase hex digits")
            values["entrypoint_sha256"] = value
    out = replace(base, name=name, **values)
    if "allow" in data and out.network != "allowlist":
        raise PolicyError(f"{source}: allow needs network = \"allowlist\" "
                          f"(this profile's network is {out.network!r})")
    return out


def _allow(entries: Iterable[str], *, where: str, error: type[Exception]) -> tuple[str, ...]:
    """Allowlist entries in canonical form, or error naming the bad one."""
    try:
        return tuple(Allowlist.of(entries).texts())
    except ValueError as err:
        raise error(f"{where}: {err}") from None


def load_file(path: Path, *, base: Profile) -> Profile:
    """Read one profile file. Raises PolicyError naming the file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise PolicyError(f"cannot read policy {path}: {err.strerror}") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise PolicyError(f"policy {path} is not valid TOML: {err}") from err
    return parse(data, name=path.stem, source=str(path), base=base)


# -------------------------------------------------------------------- store
class Policies:
    """The profiles in the policy directory, re-read when a file changes.

    Like the trust store, the directory is re-read without a restart, and a
    broken file refuses every run (PolicyError, FAILED_PRECONDITION) rather
    than fall back to something the admin did not write.
    """

    def __init__(self, cfg: Config) -> None:
        self.dir = cfg.policy_dir
        self.builtin = builtin_default(cfg)
        self._lock = threading.Lock()
        self._seen: tuple[tuple[str, int, int, int], ...] | None = None
        self._profiles: dict[str, Profile] = {DEFAULT: self.builtin}

    def current(self) -> dict[str, Profile]:
        """Every profile by name, ``default`` included. Raises PolicyError."""
        files = self._files()
        stamp = tuple((p.name, *_stamp(p)) for p in files)
        with self._lock:
            if stamp == self._seen:
                return self._profiles
        default = self.builtin
        by_name = {p.stem: p for p in files}
        if DEFAULT in by_name:
            path = by_name.pop(DEFAULT)
            default = load_file(path, base=self.builtin)
            if default.bind_rw:
                # A writable workspace carries notes from one run to the
                # next: it is named by a run or a profile, never given to all.
                raise PolicyError(f"{path}: bind_rw: a writable workspace is never a default; "
                                  "name it in another profile or pass --bind-rw")
        profiles = {DEFAULT: default}
        for name, path in sorted(by_name.items()):
            profiles[name] = load_file(path, base=default)
        with self._lock:
            self._seen, self._profiles = stamp, profiles
        return profiles

    def _files(self) -> list[Path]:
        try:
            st = self.dir.stat()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise PolicyError(
                f"cannot read the policy directory {self.dir}: {err.strerror}") from err
        _refuse_writable(self.dir, st)
        out = []
        for entry in sorted(os.scandir(self.dir), key=lambda e: e.name):
            if not entry.name.endswith(".toml"):
                continue
            path = Path(entry.path)
            if not NAME_RE.match(path.stem):
                raise PolicyError(f"{path}: {path.stem!r} is not a valid policy name "
                                  "(1-63 of a-z 0-9 _ . - starting with a letter or digit)")
            _refuse_writable(path, path.stat())
            out.append(path)
        return out

    def default(self) -> Profile:
        return self.current()[DEFAULT]

    def get(self, name: str) -> Profile:
        """The profile called name ("" is default). Raises InvalidArgument, PolicyError."""
        profiles = self.current()
        profile = profiles.get(name or DEFAULT)
        if profile is None:
            raise InvalidArgument(
                f"no sandbox policy named {name!r}; known policies: "
                f"{', '.join(sorted(profiles))} (files NAME.toml in {self.dir})")
        return profile


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _refuse_writable(path: Path, st: os.stat_result) -> None:
    # Whoever may write a policy may grant agents anything it allows.
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PolicyError(f"{path} is writable by group or others; run 'chmod go-w {path}'")


# ---------------------------------------------------------------- overrides
def apply(profile: Profile, action: agentd_pb2.RunAction) -> tuple[Profile, dict[str, str]]:
    """The profile with a run's overrides applied, and the run's extra environment.

    Raises InvalidArgument for a malformed override. Whether the result is
    allowed is looser()'s business, not this function's.
    """
    o = action.overrides
    values: dict[str, Any] = {}
    if action.user:
        if not (action.user == DYNAMIC or _USER_RE.match(action.user)
                or action.user.isdigit()):
            raise InvalidArgument(f"user {action.user!r} is not a user name")
        values["user"] = action.user
    if o.HasField("network"):
        if o.network not in NETWORKS:
            raise InvalidArgument(f"network must be one of {', '.join(NETWORKS)}, "
                                  f"not {o.network!r}")
        values["network"] = o.network
    if o.allow:
        network = values.get("network", profile.network)
        if network == "none" and not o.HasField("network"):
            network = values["network"] = "allowlist"
        if network != "allowlist":
            raise InvalidArgument(f"--allow needs network \"allowlist\"; this run's network "
                                  f"is {network!r}")
        extra = _allow(o.allow, where="--allow", error=InvalidArgument)
        values["allow"] = tuple(Allowlist.of((*profile.allow, *extra)).texts())
    if o.HasField("egress_byte_cap"):
        values["egress_byte_cap"] = o.egress_byte_cap
    for key in ("bind_ro", "bind_rw"):
        extra = tuple(check_path(p, where=f"--{key.replace('_', '-')}", error=InvalidArgument)
                      for p in getattr(o, key))
        if extra:
            values[key] = tuple(dict.fromkeys(getattr(profile, key) + extra))
    if o.HasField("scratch_bytes"):
        if o.scratch_bytes < MIN_SCRATCH_BYTES:
            raise InvalidArgument(f"scratch size {o.scratch_bytes} bytes is below the 1 MiB floor")
        values["scratch_bytes"] = o.scratch_bytes
    if o.HasField("nofile"):
        if not MIN_NOFILE <= o.nofile <= MAX_NOFILE:
            raise InvalidArgument(f"nofile must be from {MIN_NOFILE} to {MAX_NOFILE}")
        values["nofile"] = o.nofile
    if o.HasField("entrypoint_sha256"):
        pin = o.entrypoint_sha256.lower()
        if not _SHA256_RE.match(pin):
            raise InvalidArgument("the entrypoint pin must be a sha256: 64 hex digits")
        values["entrypoint_sha256"] = pin
    r = action.resources
    if r.memory_bytes:
        values["memory_bytes"] = r.memory_bytes
    if r.pids_max:
        values["pids_max"] = r.pids_max
    if r.cpu_millis:
        values["cpu_millis"] = r.cpu_millis
    env: dict[str, str] = {}
    for item in o.env:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_RE.match(key) or "\0" in value:
            raise InvalidArgument(f"--env {item[:80]!r} is not NAME=VALUE")
        if key.startswith("AGENTD_"):
            raise InvalidArgument(f"--env {key}: AGENTD_* variables are set by the daemon")
        env[key] = value
    if env:
        values["env_allow"] = tuple(dict.fromkeys(profile.env_allow + tuple(env)))
    return replace(profile, **values), env


def in_code_root(path: str, code_roots: Iterable[str]) -> bool:
    """Whether path is one of code_roots or lies below one."""
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in code_roots)


def looser(p: Profile, default: Profile, code_roots: Iterable[str] = ()) -> list[str]:
    """Each way p grants more than default, in words; empty when p is no looser.

    Every dimension counts: a run that is tighter in one way and looser in
    another is looser. The default view shows no host data, so a bind the
    default lacks is looser, except a read-only one at or below one of the
    daemon's code_roots (config): that is how agents get their code.
    """
    code_roots = tuple(code_roots)
    out: list[str] = []
    if NETWORKS.index(p.network) > NETWORKS.index(default.network):
        out.append(f"network {p.network}")
    if p.network == "allowlist":
        theirs = Allowlist.of(default.allow if default.network == "allowlist" else ())
        extra = [e.text for e in Allowlist.of(p.allow).entries
                 if not theirs.covers(Allowlist((e,)))]
        if extra:
            out.append(f"allow {' '.join(extra)}")
        if default.egress_byte_cap and (p.egress_byte_cap == 0
                                        or p.egress_byte_cap > default.egress_byte_cap):
            out.append(f"egress_byte_cap {p.egress_byte_cap or 'none'} "
                       f"(default {default.egress_byte_cap})")
    if p.user not in (default.user, DYNAMIC):
        out.append(f"user {p.user} (default {default.user})")
    for key, label in (("memory_bytes", "memory"), ("cpu_millis", "cpu"),
                       ("pids_max", "pids")):
        mine, theirs = getattr(p, key), getattr(default, key)
        if theirs and (mine == 0 or mine > theirs):
            out.append(f"{label} {mine or 'unlimited'} (default {theirs})")
    if p.nofile > default.nofile:
        out.append(f"nofile {p.nofile} (default {default.nofile})")
    if p.scratch_bytes > default.scratch_bytes:
        out.append(f"scratch {p.scratch_bytes} bytes (default {default.scratch_bytes})")
    for key in ("bind_ro", "bind_rw"):
        extra = [b for b in getattr(p, key) if b not in getattr(default, key)
                 and not (key == "bind_ro" and in_code_root(b, code_roots))]
        if extra:
            out.append(f"{key} {' '.join(extra)}")
    env = [n for n in p.env_allow if n not in default.env_allow]
    if env:
        out.append(f"env {' '.join(env)}")
    if default.entrypoint_sha256 and p.entrypoint_sha256 != default.entrypoint_sha256:
        out.append("entrypoint pin removed or changed")
    return out


def agent_env(p: Profile, base: Mapping[str, str], extra: Mapping[str, str],
              own: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment: base and extra cut to p.env_allow, plus own (AGENTD_*)."""
    env = {k: v for k, v in {**base, **extra}.items() if k in p.env_allow}
    env.update(own)
    return env
