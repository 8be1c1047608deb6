"""Parsing /proc/net/{tcp,tcp6,udp}, address decoding, prefixes: known answers, no root."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from daemon import config
from daemon.errors import ConfigError
from daemon.monitor import procfs
from daemon.monitor.sampler import parse_prefixes

# Captured on a little-endian x86-64 host (Linux 6.x) with a listener on
# 127.0.0.1:58895 and a connection to it from port 35288; the SYN_SENT tcp row
# and the unconnected udp row were written by hand in the kernel's format.
TCP = b"""\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:07E8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1076 1 000000006e6a28eb 100 0 0 10 0
   1: 0100007F:E60F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1181237 1 0000000037e12609 100 0 0 10 0
   2: 0100007F:E60F 0100007F:89D8 01 00000000:00000000 00:00000000 00000000     0        0 1181239 1 00000000792c6e36 20 0 0 10 -1
   3: 0100007F:89D8 0100007F:E60F 01 00000000:00000000 00:00000000 00000000     0        0 1181238 2 00000000714fda3b 20 0 0 10 -1
   4: 0A000002:C350 5DB8D822:01BB 02 00000001:00000000 01:00000064 00000000  1000        0 1181250 1 0000000000000000 100 0 0 10 -1
"""  # noqa: E501
TCP6 = b"""\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:D4DF 00000000000000000000000000000000:0000 0A 00000000:00000001 00:00000000 00000000     0        0 1181240 2 00000000140b6bef 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:D967 0000000000000000FFFF00000100007F:D764 01 00000000:00000000 00:00000000 00000000     0        0 0 1 00000000fe2d41d5 20 0 0 10 -1
   4: 00000000000000000000000001000000:DDD2 00000000000000000000000001000000:D4DF 01 00000000:00000000 00:00000000 00000000     0        0 1181241 2 00000000af0928bd 20 0 0 10 -1
"""  # noqa: E501
UDP = b"""\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
14170: 020200C0:871E 0302010A:0035 01 00000000:00000000 00:00000000 00000000     0        0 1181244 2 000000005533088b 0
14171: 00000000:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1181245 2 000000005533088c 0
"""  # noqa: E501

little_endian_only = pytest.mark.skipif(sys.byteorder != "little",
                                        reason="the captured tables are from a little-endian host")


@little_endian_only
def test_tcp_table() -> None:
    rows = {e.inode: e for e in procfs.parse_net_table(TCP, "tcp")}

    listening, connected = rows[1181237], rows[1181238]
    assert (listening.proto, listening.local, listening.remote, listening.state) == (
        "tcp", "127.0.0.1:58895", "", procfs.TCP_LISTEN)
    assert (connected.local, connected.remote, connected.state) == (
        "127.0.0.1:35288", "127.0.0.1:58895", 0x01)
    assert rows[1181250].remote == "34.216.184.93:443"
    assert rows[1181250].state == procfs.TCP_SYN_SENT
    assert rows[1076].local == "0.0.0.0:2024"


@little_endian_only
def test_tcp6_table_and_mapped_ipv4() -> None:
    rows = procfs.parse_net_table(TCP6, "tcp6")

    assert [e.proto for e in rows] == ["tcp"] * 3
    assert rows[0].local == "[::1]:54495"
    assert rows[0].remote == ""
    assert rows[1].remote == "127.0.0.1:55140"  # ::ffff:127.0.0.1, shown as the IPv4 peer
    assert rows[2].remote == "[::1]:54495"


@little_endian_only
def test_connections_count_only_the_agents_connected_sockets() -> None:
    table = {e.inode: e for t, raw in (("tcp", TCP), ("tcp6", TCP6), ("udp", UDP))
             for e in procfs.parse_net_table(raw, t)}
    # 1181237 listens, 1181245 is an unconnected UDP socket, 999 is unknown (unix socket).
    mine = {1181237, 1181238, 1181250, 1181241, 1181244, 1181245, 999}

    count, remotes = procfs.connections(table, mine)

    assert count == 4  # established, SYN_SENT, IPv6 established, connected UDP
    assert remotes == ["10.1.2.3:53", "127.0.0.1:58895", "34.216.184.93:443", "[::1]:54495"]


@pytest.mark.parametrize("bad", ["0100007F", "0100007G:0050", "01000:0050", ""])
def test_malformed_endpoints_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        procfs.decode_endpoint(bad)


def test_malformed_lines_are_skipped() -> None:
    raw = TCP.splitlines()[0] + (b"\n   0: garbage\n   1: 0100007F:0050 0 ZZ 0 0 0 0 0 1\n"
                                 b"   2: 0100007F:0050 0100007F:ZZZZ 01 0 0 0 0 0 7\n")

    rows = procfs.parse_net_table(raw, "tcp")

    assert [e.inode for e in rows] == [7]  # its bad address shows when decoded
    assert procfs.connections({7: rows[0]}, [7]) == (0, [])


def test_own_connection_is_found_live() -> None:
    """The parser against the kernel's current table: this process's own loopback pair."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            inode = os.fstat(client.fileno()).st_ino
            held = procfs.fds(os.getpid(), procfs.Prefixes(["/"]))
            table = procfs.net_tables(os.getpid())

            count, remotes = procfs.connections(table, [inode])

    assert inode in held.sockets
    assert (count, remotes) == (1, [f"127.0.0.1:{port}"])


def test_prefixes() -> None:
    assert parse_prefixes(" /tmp, /var/tmp/ ,/dev,,") == ("/tmp", "/var/tmp", "/dev")
    assert parse_prefixes("/") == ("/",)
    with pytest.raises(ValueError, match="tmp"):
        parse_prefixes("/ok,tmp")
    tmp = procfs.Prefixes(["/tmp", "/var/tmp/"])
    assert tmp.covers("/tmp/x/y")
    assert tmp.covers("/tmp")
    assert tmp.covers("/var/tmp/x")
    assert not tmp.covers("/tmpfoo/x")
    assert not tmp.covers("/var/tmpx")
    assert procfs.Prefixes(["/"]).covers("/etc/passwd")
    assert not procfs.Prefixes([]).covers("/etc/passwd")


def test_config_refuses_relative_write_prefixes() -> None:
    assert config.from_mapping({"allowed_write_prefixes": "/tmp, /scratch"},
                               source="t").allowed_write_prefixes == "/tmp, /scratch"
    with pytest.raises(ConfigError, match="allowed_write_prefixes must list absolute paths"):
        config.from_mapping({"allowed_write_prefixes": "/tmp,scratch"}, source="t")


def test_a_vanished_process_reads_as_nothing() -> None:
    pid = 2**22 + 1  # above pid_max's ceiling: never a live process
    assert procfs.cmdline(pid) == ""
    assert procfs.exe(pid) is None
    assert procfs.fds(pid, procfs.Prefixes([])).sockets == set()
    assert procfs.net_tables(pid) == {}
