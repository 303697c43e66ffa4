"""Loopback inside `unshare -n`: the demo's server and client talk over 127.0.0.1 and nothing else.

A new network namespace has one interface, `lo`, and it is down. The demo brings it up with the
same ioctl `ip link set lo up` uses (no iproute2 needed); the namespace has no other interface,
so nothing can leave the machine.
"""

from __future__ import annotations

import socket
import struct

from appliance.demo.steps import DemoError

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_works() -> bool:
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            probe.listen()
            socket.create_connection(probe.getsockname(), timeout=2).close()
        return True
    except OSError:
        return False


def ensure_loopback() -> None:
    """Bring `lo` up if it is down (a fresh namespace); DemoError if it cannot be."""
    if loopback_works():
        return
    import fcntl

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH14s", b"lo", 0, b"")
            flags = struct.unpack("16sH", fcntl.ioctl(sock, SIOCGIFFLAGS, request)[:18])[1]
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14s", b"lo", flags | IFF_UP, b""))
    except OSError as exc:
        raise DemoError(f"the loopback interface is down and cannot be brought up: {exc.strerror}",
                        hint="run the demo as root (or where user namespaces are allowed), or outside `unshare -n`"
                        ) from None
    if not loopback_works():
        raise DemoError("the loopback interface is up but 127.0.0.1 does not answer",
                        hint="run the demo outside `unshare -n`")
