"""The daemon's side of systemd's service protocol: readiness, status and the watchdog.

:func:`notify` implements ``sd_notify(3)`` without libsystemd: one datagram of
newline-separated ``KEY=value`` assignments to the unix socket named by
``$NOTIFY_SOCKET`` (an abstract socket when the name starts with ``@``). Outside systemd
the variable is unset and every call is a no-op that returns False, so the daemon needs
no "am I under systemd?" switch.

The unit (``systemd/lockgw.service``) is ``Type=notify`` with ``WatchdogSec=``: systemd
waits for ``READY=1`` before it counts the service as started, and restarts it when the
``WATCHDOG=1`` pings stop. :func:`watchdog_task` sends those pings *from the event loop*,
so a loop blocked by a stuck call stops them and gets the process restarted, which is the
point; a ping from a helper thread would keep a dead loop alive forever.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Final

from gateway.logs import get_logger

__all__ = [
    "SEND_TIMEOUT",
    "notify",
    "ready",
    "status",
    "stopping",
    "watchdog_interval",
    "watchdog_task",
]

SEND_TIMEOUT: Final = 1.0
"""Seconds a notification may block when systemd's socket queue is full; it is sent from
the event loop, so it must not wait long."""

_log = get_logger()


def _address(name: str) -> str | None:
    if name.startswith("@"):
        # Abstract namespace: a leading NUL instead of "@", no file on disk.
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None  # e.g. "vsock:...", which a service on the host never receives


def notify(message: str) -> bool:
    """Send ``message`` (``"READY=1"``, ``"STATUS=..."``) to systemd.

    Returns True when it was sent, False when ``$NOTIFY_SOCKET`` is unset (not under
    systemd, or a unit type that does not listen) or the send failed; failures are logged
    and otherwise ignored, since a missing notification must not stop the daemon.
    """
    name = os.environ.get("NOTIFY_SOCKET")
    if not name:
        return False
    address = _address(name)
    if address is None:
        _log.warning("sd_notify socket not supported", notify_socket=name)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        _log.warning("sd_notify failed", notify_socket=name, error=str(exc))
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Tell systemd start-up is complete (``READY=1``), optionally with a status line."""
    if status_text is None:
        return notify("READY=1")
    return notify(f"READY=1\nSTATUS={_one_line(status_text)}")


def stopping() -> bool:
    """Tell systemd the daemon is shutting down (``STOPPING=1``)."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Set the free-form status shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def _one_line(text: str) -> str:
    # A newline would start a new assignment: "x\nSTOPPING=1" must stay a status text.
    return " ".join(text.splitlines())


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None when systemd
    expects none from this process (unset, invalid, or ``$WATCHDOG_PID`` names another)."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        microseconds = int(usec)
    except ValueError:
        _log.warning("ignoring invalid WATCHDOG_USEC", watchdog_usec=usec)
        return None
    if microseconds <= 0:
        return None
    return microseconds / 2_000_000


async def watchdog_task(healthy: Callable[[], bool] | None = None) -> None:
    """Ping systemd's watchdog (``WATCHDOG=1``) at half its timeout until cancelled.

    Returns at once when no watchdog is expected (:func:`watchdog_interval`). With
    ``healthy``, a ping is sent only while ``healthy()`` is true, so the daemon can tie
    the watchdog to more than a turning loop (for instance, the database thread answering).
    """
    interval = watchdog_interval()
    if interval is None:
        return
    while True:
        if healthy is None or healthy():
            notify("WATCHDOG=1")
        else:
            _log.warning("withholding watchdog ping: daemon unhealthy")
        await asyncio.sleep(interval)
