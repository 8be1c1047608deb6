"""The agent's filesystem view: what bwrap is told to mount, and the mountinfo check, offline.

The view is built on fake roots (a tmp directory laid out like a host), and
the check's comparison runs on fake mountinfo tables; tests/test_sandbox.py
and tests/escape hold both against the real kernel.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemon.config import Config, from_mapping
from daemon.errors import ConfigError, PolicyError
from daemon.sandbox import bwrap, mountinfo
from daemon.sandbox.bwrap import Hidden, Mount
from daemon.sandbox.policy import Policies, Profile, in_code_root, looser

BASE = Profile(name="default")


def _host(root: Path) -> Path:
    """A merged-/usr host with data in /home, /srv, /opt, /var and secrets in /etc."""
    for d in ("usr/bin", "usr/lib", "etc/ssh", "etc/ssl/private", "etc/ssl/certs", "home/u",
              "srv/agents/a", "opt", "var/lib/app", "mnt", "boot", "root"):
        (root / d).mkdir(parents=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("sbin", "usr/bin")):
        os.symlink(target, root / link)
    for f in ("etc/passwd", "etc/shadow", "etc/hostname", "etc/machine-id",
              "etc/ssh/ssh_config", "etc/ssh/ssh_host_ed25519_key",
              "etc/ssh/ssh_host_ed25519_key.pub", "home/u/notes.txt"):
        (root / f).write_text("x")
    return root


def _by_path(view: list[Mount]) -> dict[str, Mount]:
    return {m.path: m for m in view}


def test_the_default_view_is_the_system_only(tmp_path: Path) -> None:
    root = _host(tmp_path)
    view = _by_path(bwrap.view(BASE, hidden=[], uid=os.getuid(), root=str(root)))
    assert view["/usr"] == Mount("/usr", "bind", str(root / "usr"))
    assert view["/etc"].kind == "bind" and not view["/etc"].writable
    assert (view["/bin"].kind, view["/bin"].source) == ("symlink", "usr/bin")
    assert view["/lib"].kind == "symlink"
    for private in ("/proc", "/dev", "/dev/shm", "/run", "/scratch", "/var/tmp"):
        assert view[private].kind in ("proc", "dev", "tmpfs"), private
    for data in ("/home", "/srv", "/opt", "/var", "/var/lib", "/mnt", "/boot", "/root",
                 "/sys"):
        assert data not in view, data
    writable = {p for p, m in view.items() if m.writable}
    assert writable == {"/proc", "/dev/shm", "/scratch", "/var/tmp"}


def test_etc_secrets_are_masked_and_ordinary_files_kept(tmp_path: Path) -> None:
    root = _host(tmp_path)
    view = _by_path(bwrap.view(BASE, hidden=[], uid=os.getuid(), root=str(root)))
    for f in ("/etc/shadow", "/etc/hostname", "/etc/machine-id",
              "/etc/ssh/ssh_host_ed25519_key", "/etc/ssh/ssh_host_ed25519_key.pub"):
        assert view[f].kind == "mask" and view[f].source == "/dev/null" and view[f].why, f
    assert view["/etc/ssl/private"].kind == "hide"
    for kept in ("/etc/passwd", "/etc/ssh/ssh_config", "/etc/ssl/certs"):
        assert kept not in view
    # Masks come after every bind, so that no bind shows them again.
    kinds = [m.kind for m in bwrap.view(BASE, hidden=[], uid=os.getuid(), root=str(root))]
    assert kinds.index("mask") > max(i for i, k in enumerate(kinds) if k == "bind")


def test_daemon_files_are_hidden_only_where_the_view_shows_them(tmp_path: Path) -> None:
    root = _host(tmp_path)
    (root / "etc" / "agentd-x").mkdir()
    hidden = [Hidden("/etc/agentd-x", True), Hidden("/var/lib/app", True)]
    view = _by_path(bwrap.view(Profile(name="x", bind_ro=("/srv/agents",)), hidden=hidden,
                               uid=os.getuid(), root=str(root)))
    assert view["/etc/agentd-x"].kind == "hide"
    assert "/var/lib/app" not in view  # not in the view: nothing to hide
    assert view["/srv/agents"] == Mount("/srv/agents", "bind", "/srv/agents")


def test_bwrap_binds_the_view_and_nothing_else() -> None:
    argv = bwrap.argv(Profile(name="x", bind_ro=("/srv",), bind_rw=("/opt",)), ["/bin/true"],
                      seccomp_fd=7, hidden=[], uid=61234)
    pairs = [(argv[i + 1], argv[i + 2]) for i, a in enumerate(argv)
             if a in ("--ro-bind", "--bind")]
    assert ("/usr", "/usr") in pairs and ("/etc", "/etc") in pairs
    assert ("/srv", "/srv") in pairs and argv[argv.index("/opt") - 1] == "--bind"
    assert not any(src in ("/home", "/root", "/var", "/mnt", "/sys") for src, _ in pairs)


def test_binds_may_not_land_on_the_sandboxs_own_places_or_secrets() -> None:
    assert "whole host" in bwrap.check_bind("/", [])
    for own in ("/proc", "/proc/1", "/dev/shm", "/tmp", "/tmp/x", "/scratch"):
        assert "sandbox's own" in bwrap.check_bind(own, []), own
    if os.path.exists("/etc/shadow"):
        assert "secrets" in bwrap.check_bind("/etc/shadow", [])
    assert bwrap.check_bind("/usr", []) == ""


# --------------------------------------------------------------- code roots
def test_a_read_only_bind_under_a_code_root_is_not_looser() -> None:
    roots = ("/opt/agents", "/srv/agents")
    assert looser(Profile(name="x", bind_ro=("/opt/agents/a", "/srv/agents")), BASE,
                  roots) == []
    assert looser(Profile(name="x", bind_ro=("/opt/agents2",)), BASE, roots) == [
        "bind_ro /opt/agents2"]
    assert looser(Profile(name="x", bind_ro=("/home/u",)), BASE, roots) == ["bind_ro /home/u"]
    # A writable workspace is an escalation wherever it lies.
    assert looser(Profile(name="x", bind_rw=("/opt/agents/a",)), BASE, roots) == [
        "bind_rw /opt/agents/a"]
    assert in_code_root("/opt/agents", roots) and not in_code_root("/opt", roots)


def test_code_roots_setting() -> None:
    cfg = from_mapping({"code_roots": ["/opt/agents", "/srv/agents"]}, source="t")
    assert cfg.code_roots == ("/opt/agents", "/srv/agents")
    assert Config().code_roots == ()
    for bad, words in ((["/"], "whole host"), (["rel"], "absolute"), (["/a/../b"], "absolute"),
                       ("/opt", "list of strings")):
        with pytest.raises(ConfigError, match=words):
            from_mapping({"code_roots": bad}, source="t")


def test_a_writable_workspace_is_never_a_default(tmp_path: Path) -> None:
    d = tmp_path / "policies"
    d.mkdir(mode=0o755)
    (d / "default.toml").write_text('bind_rw = ["/srv/notes"]\n')
    os.chmod(d / "default.toml", 0o644)
    with pytest.raises(PolicyError, match="never a default"):
        Policies(Config(policy_dir=d)).current()


# --------------------------------------------------------------- mountinfo
_TABLE = r"""65 42 0:40 /newroot / ro,nosuid,nodev,relatime - tmpfs tmpfs rw,uid=65000
66 65 254:0 /usr /usr ro,nosuid,nodev,relatime - ext4 /dev/vda rw
67 65 254:0 /etc /etc ro,nosuid,nodev,relatime - ext4 /dev/vda rw
68 67 0:6 /null /etc/shadow ro,nosuid,nodev,relatime - devtmpfs devtmpfs rw
70 65 0:42 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
71 65 0:43 / /dev ro,nosuid,nodev,relatime - tmpfs tmpfs rw
72 71 0:6 /null /dev/null rw,nosuid,relatime - devtmpfs devtmpfs rw
78 71 0:44 / /dev/pts rw,nosuid,noexec,relatime - devpts devpts rw
79 71 0:45 / /dev/shm rw,nosuid,nodev,relatime - tmpfs tmpfs rw,size=980k
80 65 0:46 / /run ro,nosuid,nodev,relatime - tmpfs tmpfs rw
81 65 0:47 / /scratch rw,nosuid,nodev,relatime - tmpfs tmpfs rw,size=980k
82 65 0:48 / /var/tmp rw,nosuid,nodev,relatime - tmpfs tmpfs rw,size=100k
83 65 254:0 /srv/my\040code /srv/my\040code ro,relatime - ext4 /dev/vda rw
"""
_VIEW = [Mount("/", "root", "t"), Mount("/usr", "bind", "/usr"), Mount("/etc", "bind", "/etc"),
         Mount("/bin", "symlink", "usr/bin"),
         Mount("/proc", "proc", "p", writable=True), Mount("/dev", "dev", "d"),
         Mount("/dev/shm", "tmpfs", "t", writable=True), Mount("/run", "tmpfs", "t"),
         Mount("/scratch", "tmpfs", "t", writable=True),
         Mount("/var/tmp", "tmpfs", "t", writable=True),
         Mount("/srv/my code", "bind", "/srv/my code"),
         Mount("/etc/shadow", "mask", "/dev/null")]


# The daemon's own table: / on 254:0, devtmpfs on /dev.
_HOST = mountinfo.parse("""1 0 254:0 / / rw,relatime - ext4 /dev/vda rw
2 1 0:6 / /dev rw,nosuid - devtmpfs devtmpfs rw
""")


def test_mountinfo_parse_unescapes_and_reads_the_per_mount_flag() -> None:
    entries = mountinfo.parse(_TABLE)
    assert entries[0] == mountinfo.Entry("/", "/newroot", "tmpfs", True, "0:40")
    assert entries[-1].mount_point == "/srv/my code"
    assert not next(e for e in entries if e.mount_point == "/scratch").read_only


def test_a_bind_shows_its_sources_filesystem_and_path() -> None:
    assert mountinfo.origin(_HOST, "/usr") == ("254:0", "/usr")
    assert mountinfo.origin(_HOST, "/dev/null") == ("0:6", "/null")
    nested = mountinfo.parse("1 0 254:0 / / rw - ext4 a rw\n3 1 8:1 /data /srv rw - ext4 b rw\n")
    assert mountinfo.origin(nested, "/srv/agents") == ("8:1", "/data/agents")


def test_mountinfo_matching_the_view_passes() -> None:
    assert mountinfo.compare(_VIEW, mountinfo.parse(_TABLE), _HOST) == []


def test_a_mount_the_view_does_not_name_fails() -> None:
    extra = _TABLE + "90 65 254:0 /home /home ro,relatime - ext4 /dev/vda rw\n"
    assert mountinfo.compare(_VIEW, mountinfo.parse(extra), _HOST) == [
        "unexpected mount /home (ext4 /home)"]


def test_a_missing_mask_or_a_writable_read_only_mount_fails() -> None:
    lines = [line for line in _TABLE.splitlines() if "/etc/shadow" not in line]
    table = "\n".join(lines).replace("/usr /usr ro,", "/usr /usr rw,")
    problems = mountinfo.compare(_VIEW, mountinfo.parse(table), _HOST)
    assert problems == ["/usr is writable, not read-only",
                        "/etc/shadow (mask /dev/null) is not mounted"]


def test_a_bind_or_mask_from_elsewhere_fails() -> None:
    table = (_TABLE.replace("254:0 /usr /usr", "254:0 /home /usr")
             .replace("0:6 /null /etc/shadow", "254:0 /etc/shadow /etc/shadow"))
    assert mountinfo.compare(_VIEW, mountinfo.parse(table), _HOST) == [
        "/usr shows 254:0 /home, not the host's /usr (254:0 /usr)",
        "/etc/shadow shows 254:0 /etc/shadow, not the host's /dev/null (0:6 /null)"]


def test_a_tmpfs_where_a_bind_should_be_and_a_writable_carried_mount_fail() -> None:
    view = [*_VIEW, Mount("/opt/a", "hide", "t")]
    host = [*_HOST, *mountinfo.parse("5 1 0:51 / /usr/local rw - ext4 x rw\n")]
    table = _TABLE + ("91 65 0:50 / /opt/a ro - ext4 /dev/vda rw\n"
                      "92 66 0:51 / /usr/local rw - ext4 /dev/vdb rw\n")
    assert mountinfo.submounts(host, view) == {"/usr/local": False}
    assert mountinfo.compare(view, mountinfo.parse(table), host) == [
        "/opt/a is ext4, not tmpfs", "/usr/local (carried by a read-only bind) is writable"]
