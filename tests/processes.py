"""Real processes the end-to-end tests drive: the simulator, and the gateway daemon."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0  # a cold interpreter imports Bumble and cryptography


class SimProcess:
    """``python -m simulators`` with its stdin and stdout as pipes."""

    def __init__(self, process: asyncio.subprocess.Process, errors: IO[bytes]) -> None:
        self.process = process
        self.errors = errors
        self.ready: dict[str, Any] = {}

    @classmethod
    async def start(cls, *args: str) -> SimProcess:
        # The child's stderr goes to a file of its own: a child inheriting the test
        # runner's stderr could still be writing there after the run has ended.
        errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed by finish()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "simulators",
            *args,
            cwd=REPO_ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=errors,
            # A status line of hundreds of devices is longer than the default 64 KiB.
            limit=16 * 1024 * 1024,
        )
        sim = cls(process, errors)
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
        self.errors.close()
        return self.process.returncode

    def stderr_text(self) -> str:
        """What the simulator wrote to stderr so far, for a failing test's message."""
        self.errors.seek(0)
        return self.errors.read().decode(errors="replace")
