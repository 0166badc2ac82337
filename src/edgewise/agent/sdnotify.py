"""systemd's notify protocol with a plain socket (no dependency): READY=1, WATCHDOG=1, STATUS=..., STOPPING=1.

systemd passes ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) to a
``Type=notify`` service; one datagram per message, newline-separated ``KEY=VALUE``
lines. With ``WatchdogSec=`` it also passes ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``)
and kills the service when no ``WATCHDOG=1`` arrives within that time. Outside
systemd (no ``$NOTIFY_SOCKET``) every call is a cheap no-op.

    >>> notify("READY=1", env={})
    False
    >>> watchdog_interval({"WATCHDOG_USEC": "20000000"})
    10.0
"""

from __future__ import annotations

import os
import socket
from typing import Mapping


def _address(raw: str) -> str:
    return "\0" + raw[1:] if raw.startswith("@") else raw


def notify(message: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send one notify datagram; True when it was sent, False when there is no socket or it failed."""
    env = os.environ if env is None else env
    raw = env.get("NOTIFY_SOCKET")
    if not raw or not (raw.startswith("/") or raw.startswith("@")):
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8", "replace"), _address(raw))
        return True
    except OSError:
        return False  # systemd gone or socket not reachable: the watchdog will say so, we must not crash


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled advises),
    or None when no watchdog is asked for (or it is meant for another process)."""
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2e6
