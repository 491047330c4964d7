"""A guard against cancellations lost inside libraries on Python 3.11.

On Python 3.11, ``asyncio.wait_for`` returns the awaited result and drops a cancellation
that arrives in the same loop step (CPython gh-86296, fixed in 3.12). aiomqtt awaits
CONNACK, SUBACK and PUBACK that way and Bumble its HCI commands: a SIGTERM just as the
broker or the controller answers would be lost, and the daemon would run on instead of
stopping. Calling :func:`reraise_lost_cancellation` right after such an await restores it.
"""

from __future__ import annotations

import asyncio


def reraise_lost_cancellation() -> None:
    """Raise CancelledError if this task was cancelled but an await swallowed it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
