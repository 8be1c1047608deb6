"""Sandbox policies, overrides, escalation, bwrap's command line and the seccomp filter, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from agentd.v1 import agentd_pb2

from daemon.config import Config
from daemon.errors import InvalidArgument, PolicyError
from daemon.sandbox import bwrap, seccomp
from daemon.sandbox.bwrap import Hidden
from daemon.sandbox.policy import Policies, Profile, apply, looser, parse, parse_size

BASE = Profile(name="default", memory_bytes=1 << 30, pids_max=256, nofile=1024)


def _store(tmp_path: Path, files: dict[str, str]) -> Policies:
    d = tmp_path / "policies"
    d.mkdir(mode=0o755)
    for name, text in files.items():
        (d / name).write_text(text)
        os.chmod(d / name, 0o644)
    return Policies(Config(policy_dir=d))


# ----------------------------------------------------------------- parsing
@pytest.mark.parametrize(("text", "size"), [(0, 0), (4096, 4096), ("64K", 65536),
                                            ("512M", 512 << 20), ("1G", 1 << 30),
                                            ("1.5g", 3 << 29), ("2MiB", 2 << 20)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text, where="x") == size


def test_a_profile_keeps_the_defaults_it_does_not_set() -> None:
    p = parse({"network": "host", "memory": "2G", "bind_rw": ["/srv/out"]}, name="wide",
              source="wide.toml", base=BASE)
    assert (p.name, p.network, p.memory_bytes, p.bind_rw) == ("wide", "host", 2 << 30,
                                                               ("/srv/out",))
    assert (p.pids_max, p.nofile, p.user) == (256, 1024, "dynamic")


@pytest.mark.parametrize(("data", "words"), [
    ({"netwrok": "none"}, "wide.toml: unknown key 'netwrok'"),
    ({"network": "bridge"}, "wide.toml: network must be one of none, allowlist, host"),
    ({"memory": "lots"}, "wide.toml: memory must be a size"),
    ({"memory": 1024}, "below the 4 MiB floor"),
    ({"pids": -1}, "wide.toml: pids must be an integer"),
    ({"nofile": 4}, "wide.toml: nofile must be an integer from 16"),
    ({"bind_ro": ["relative/path"]}, "must be an absolute, normalised path"),
    ({"bind_rw": ["/srv/../etc"]}, "must be an absolute, normalised path"),
    ({"env_allow": ["AGENTD_X"]}, "AGENTD_* are the daemon's"),
    ({"user": "Not A User"}, "wide.toml: user must be"),
    ({"entrypoint_sha256": "abc"}, "64 lowercase hex digits"),
])
def test_bad_values_name_file_and_key(data: dict[str, object], words: str) -> None:
    with pytest.raises(PolicyError, match=words.replace("*", r"\*")):
        parse(data, name="wide", source="wide.toml", base=BASE)


# ------------------------------------------------------------------- store
def test_store_default_file_replaces_the_builtin_and_is_the_base(tmp_path: Path) -> None:
    store = _store(tmp_path, {"default.toml": "pids = 64\n", "web.toml": 'network = "host"\n',
                              "README": "not a policy"})
    assert sorted(store.current()) == ["default", "web"]
    assert store.default().pids_max == 64
    assert store.get("web").pids_max == 64  # its base is the site's default
    with pytest.raises(InvalidArgument, match="known policies: default, web"):
        store.get("nope")


def test_store_rereads_a_changed_file_and_refuses_a_broken_one(tmp_path: Path) -> None:
    store = _store(tmp_path, {"web.toml": "pids = 10\n"})
    assert store.get("web").pids_max == 10
    (tmp_path / "policies" / "web.toml").write_text("pids = 10\nbogus = 1\n")
    with pytest.raises(PolicyError, match=r"web.toml: unknown key 'bogus'"):
        store.get("")


def test_store_refuses_files_others_may_write(tmp_path: Path) -> None:
    store = _store(tmp_path, {"web.toml": "pids = 10\n"})
    os.chmod(tmp_path / "policies" / "web.toml", 0o666)
    with pytest.raises(PolicyError, match="writable by group or others"):
        store.current()


def test_store_refuses_bad_policy_names(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not a valid policy name"):
        _store(tmp_path, {"Bad Name.toml": ""}).current()


# -------------------------------------------------------- overrides, looser
def _run(**overrides: object) -> agentd_pb2.RunAction:
    action = agentd_pb2.RunAction(name="a", argv=["/bin/true"])
    for key, value in overrides.items():
        if key in ("memory_bytes", "pids_max"):
            setattr(action.resources, key, value)
        elif key == "user":
            action.user = str(value)
        elif isinstance(value, list):
            getattr(action.overrides, key).extend(value)
        else:
            setattr(action.overrides, key, value)
    return action


@pytest.mark.parametrize(("overrides", "dimension"), [
    ({"network": "host"}, "network host"),
    ({"bind_rw": ["/srv"]}, "bind_rw /srv"),
    ({"bind_ro": ["/srv"]}, "bind_ro /srv"),
    ({"memory_bytes": 2 << 30}, "memory"),
    ({"pids_max": 1000}, "pids"),
    ({"nofile": 4096}, "nofile"),
    ({"scratch_bytes": 1 << 40}, "scratch"),
    ({"user": "nobody"}, "user nobody (default dynamic)"),
    ({"env": ["SECRET=x"]}, "env SECRET"),
])
def test_each_looser_dimension_is_named(overrides: dict[str, object], dimension: str) -> None:
    profile, _ = apply(BASE, _run(**overrides))
    found = looser(profile, BASE)
    assert len(found) == 1 and found[0].startswith(dimension), found


def test_tighter_is_not_looser() -> None:
    profile, env = apply(BASE, _run(memory_bytes=64 << 20, pids_max=8, nofile=64,
                                    scratch_bytes=2 << 20, env=["LANG=C"]))
    assert looser(profile, BASE) == []
    assert env == {"LANG": "C"}


def test_unlimited_where_the_default_limits_is_looser() -> None:
    assert looser(Profile(name="x", memory_bytes=0, pids_max=256), BASE) == [
        f"memory unlimited (default {1 << 30})"]


@pytest.mark.parametrize(("overrides", "words"), [
    ({"network": "bridge"}, "network must be one of"),
    ({"bind_ro": ["rel"]}, "absolute, normalised"),
    ({"scratch_bytes": 10}, "1 MiB floor"),
    ({"env": ["NOEQUALS"]}, "not NAME=VALUE"),
    ({"env": ["AGENTD_AGENT_ID=x"]}, "set by the daemon"),
    ({"entrypoint_sha256": "xyz"}, "64 hex digits"),
])
def test_bad_overrides_are_invalid_arguments(overrides: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        apply(BASE, _run(**overrides))


# ------------------------------------------------------------------- bwrap
def test_bwrap_command_line() -> None:
    argv = bwrap.argv(Profile(name="x"), ["/bin/true", "-x"], seccomp_fd=7, hidden=[],
                      uid=61234)
    assert argv[0] == bwrap.BWRAP and argv[-3:] == ["--", "/bin/true", "-x"]
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc",
                 "--new-session", "--proc", "--dev"):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[argv.index("--seccomp") + 1] == "7"
    # Every writable tmpfs is capped (--size applies to the next --tmpfs), and
    # bwrap's own root and /dev are remounted read-only after the mounts.
    capped = {argv[i + 3] for i, a in enumerate(argv)
              if a == "--size" and argv[i + 2] == "--tmpfs"}
    assert {"/scratch", "/dev/shm"} <= capped
    assert "/var/tmp" in capped or not Path("/var/tmp").is_dir()
    remounted = {argv[i + 1] for i, a in enumerate(argv) if a == "--remount-ro"}
    assert {"/", "/dev", "/run"} <= remounted
    assert "--uid" not in argv  # never remap: bwrap runs as the agent's own uid
    host = bwrap.argv(Profile(name="x", network="host"), ["/bin/true"], seccomp_fd=7,
                      hidden=[], uid=61234)
    assert "--unshare-net" not in host


def test_hidden_paths_skip_what_a_hidden_directory_already_covers(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "trusted_keys").write_text("")
    hidden = bwrap.hidden_paths([(state, False), (tmp_path / "trusted_keys", True),
                                 (Path("/etc/passwd"), True)])
    assert Hidden(str(tmp_path), True) in hidden
    assert all(h.path != str(state) for h in hidden)  # inside tmp_path
    assert Hidden("/etc/passwd", False) in hidden  # /etc itself is never blanked


def test_binds_may_not_touch_hidden_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bwrap, "OWN", ("/proc", "/dev", "/scratch"))  # tmp_path is in /tmp
    hidden = [Hidden(str(tmp_path / "state"), True)]
    (tmp_path / "state").mkdir()
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "state", tmp_path / "link")
    assert bwrap.check_bind(str(tmp_path / "data"), hidden) == ""
    assert "agents never see" in bwrap.check_bind(str(tmp_path), hidden)
    assert "agents never see" in bwrap.check_bind(str(tmp_path / "state"), hidden)
    assert "real path" in bwrap.check_bind(str(tmp_path / "link"), hidden)
    assert "does not exist" in bwrap.check_bind(str(tmp_path / "nope"), hidden)


# ----------------------------------------------------------------- seccomp
def test_seccomp_filter_is_whole_bpf_and_covers_the_list() -> None:
    data = seccomp.bpf()
    assert data and len(data) % 8 == 0
    names = seccomp.denied_names()
    for must in ("ptrace", "mount", "umount2", "pivot_root", "setns", "keyctl", "add_key",
                 "request_key", "bpf", "perf_event_open", "kexec_load", "init_module",
                 "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct",
                 "settimeofday", "clock_settime", "adjtimex", "open_by_handle_at",
                 "userfaultfd", "iopl", "ioperm", "syslog"):
        assert must in names
    fd = seccomp.bpf_fd()
    try:
        assert os.read(fd, len(data) + 1) == data
        with pytest.raises(PermissionError):
            os.write(fd, b"x" * 8)  # sealed
    finally:
        os.close(fd)


# ------------------------------------------------------------------ allowlists
def test_allow_implies_allowlist_and_is_looser_than_none() -> None:
    run = agentd_pb2.RunAction(name="a", argv=["/bin/true"])
    run.overrides.allow.extend(["API.Example.com:443", "10.1.2.0/24:5432"])
    profile, _ = apply(BASE, run)
    assert profile.network == "allowlist"
    assert profile.allow == ("api.example.com:443", "10.1.2.0/24:5432")
    found = looser(profile, BASE)
    assert "network allowlist" in found
    assert any(f.startswith("allow api.example.com:443") for f in found)


def test_allow_within_the_defaults_list_is_not_looser() -> None:
    default = Profile(name="default", network="allowlist",
                      allow=("*.example.com:443", "pypi.org:443"))
    run = agentd_pb2.RunAction(name="a", argv=["/bin/true"])
    run.overrides.allow.append("api.example.com:443")
    profile, _ = apply(default, run)
    assert looser(profile, default) == []
    run.overrides.allow.append("api.example.com:80")
    profile, _ = apply(default, run)
    assert looser(profile, default) == ["allow api.example.com:80"]


@pytest.mark.parametrize(("entry", "words"), [
    ("api.example.com", "no port"),
    ("evil\0.example.com:443", "allow entry"),
    ("*.com:443", "wildcard"),
])
def test_bad_allow_entries_are_refused(entry: str, words: str) -> None:
    run = agentd_pb2.RunAction(name="a", argv=["/bin/true"])
    run.overrides.allow.append(entry)
    with pytest.raises(InvalidArgument, match=words):
        apply(BASE, run)


def test_allow_with_host_network_is_refused() -> None:
    run = agentd_pb2.RunAction(name="a", argv=["/bin/true"])
    run.overrides.network = "host"
    run.overrides.allow.append("api.example.com:443")
    with pytest.raises(InvalidArgument, match="needs network"):
        apply(BASE, run)


def test_profile_allow_needs_allowlist_network() -> None:
    with pytest.raises(PolicyError, match="allow needs network"):
        parse({"allow": ["api.example.com:443"]}, name="p", source="p.toml", base=BASE)
    p = parse({"network": "allowlist", "allow": ["api.example.com:443"],
               "egress_byte_cap": "1G"}, name="p", source="p.toml", base=BASE)
    assert p.allow == ("api.example.com:443",) and p.egress_byte_cap == 1 << 30
