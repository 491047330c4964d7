"""Run blocking store work off the event loop, one call at a time, in order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Self, TypeVar

_T = TypeVar("_T")


class BlockingWorker:
    """One dedicated thread for a resource that must be used from one thread at a time.

    The SQLite store commits with ``synchronous=FULL``, so a commit waits for the disk;
    doing that on the event loop would stall every radio session and the MQTT client.
    Calls run in submission order, so a commit and the acknowledgement that follows it
    are never reordered.
    """

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, function: Callable[..., _T], /, *args: object, **kwargs: object) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))

    def close(self) -> None:
        """Finish queued calls, then stop the thread."""
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await asyncio.to_thread(self.close)
