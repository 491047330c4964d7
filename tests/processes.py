"""Real processes the end-to-end tests drive: the simulator, and the gateway daemon."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0  # a cold interpreter imports Bumble and cryptography


class SimProcess:
    """``python -m simulators`` with its stdin and stdout as pipes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.ready: dict[str, Any] = {}

    @classmethod
    async def start(cls, *args: str) -> SimProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "simulators",
            *args,
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        sim = cls(process)
        sim.ready = await sim.line(START_TIMEOUT)
        return sim

    async def line(self, within: float = 10.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        async with asyncio.timeout(within):
            text = await self.process.stdout.readline()
        assert text, "the simulator closed its stdout"
        document: dict[str, Any] = json.loads(text)
        return document

    async def command(self, **command: object) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        return await self.line()

    async def finish(self, *, via_eof: bool = False) -> int:
        """SIGTERM (or EOF on stdin); the exit code."""
        if self.process.returncode is None:
            if via_eof:
                assert self.process.stdin is not None
                self.process.stdin.close()
            else:
                self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(15):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode
