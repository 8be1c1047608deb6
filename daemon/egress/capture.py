"""Where a captured connection was going: netfilter's SO_ORIGINAL_DST.

Read by the egress service for every captured flow, and by the daemon's
launch probe (daemon.egress.netns) to check the capture before an agent runs.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from daemon.egress.allowlist import IPAddress

SO_ORIGINAL_DST = 80  # <linux/netfilter_ipv4.h>; IP6T_SO_ORIGINAL_DST is 80 too


def original_dst(sock: socket.socket) -> tuple[IPAddress, int]:
    """The address and port a redirected connection was opened to. Raises OSError."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port = struct.unpack_from(">H", raw, 2)[0]
        return ipaddress.IPv6Address(raw[8:24]), port
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from(">H", raw, 2)[0]
    return ipaddress.IPv4Address(raw[4:8]), port
