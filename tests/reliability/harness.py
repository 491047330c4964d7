"""What the fault families share: an installation of real processes, counted at the registry.

A :class:`Rig` is one gateway installation made with the CLI (:mod:`tests.installation`),
a real Mosquitto, the simulator as a process with its devices paired, the reference
registry counting every event it receives, and the daemon (``lockgw run``), which a test
starts, stops, or kills with SIGKILL as often as it likes. The store is read through a
connection of the test's own (:func:`outbox_depth`, :func:`integrity_problems`), never the
daemon's.

:class:`DaemonLog` reads the daemon's JSON log (structlog on its stdout) and tells what the
gateway was doing at a given moment: which device sessions were open, and in which phase
(pushing an update, transferring log records).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gateway.authority import SigningRequest, issue
from protocols.envelopes import Scope, encode_certificate
from simulators.registry import ReferenceRegistry
from tests.broker import Mosquitto
from tests.conftest import Schemas
from tests.installation import (
    WAIT,
    Installation,
    install,
    make_registry,
    online,
    pair_all,
    start_daemon,
    stop_daemon,
)
from tests.processes import SimProcess

STORE: Final = Path("state") / "lockgw.sqlite3"
"""The daemon's store, under the installation's root."""

PHASE_EVENTS: Final[Mapping[str, str | None]] = {
    "session_started": "session",
    "update_push": "update",
    "log_read": "transfer",
    "session_done": None,
    "session_failed": None,
    "connect_failed": None,
    "log_verification_failed": None,
}
"""Daemon log events that move one device's session from one phase to the next."""


class CountingRegistry(ReferenceRegistry):
    """The reference registry, also counting every event received (duplicates included)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.received: Counter[str] = Counter()
        self.event_messages = 0

    def _dispatch(self, schema: str, gateway: str, levels: list[str], body: dict[str, Any]) -> None:
        if schema == "events":
            self.event_messages += 1
            self.received[str(body["device_id"])] += len(body["events"])
        super()._dispatch(schema, gateway, levels, body)


@dataclass(frozen=True)
class Tally:
    """Events of every device, as the devices count them and as the registry received them."""

    written: int
    """Events the devices wrote (the sum of their next sequence numbers)."""
    received: int
    """Events the registry received, redeliveries included."""
    unique: int
    """Distinct (device, sequence) pairs the registry accepted."""
    lost: int
    """Events written on a device that the registry does not hold."""
    duplicates: int
    """(device, sequence) pairs held twice after de-duplication. The registry keys events
    by sequence, so this is 0 by construction; what a fault really produced shows in
    :attr:`redelivered`, each copy re-verified against the chain by the registry (a copy
    that differed would be in its ``failures``, which every rig asserts empty)."""
    gaps: int
    """Devices whose accepted sequences are not one contiguous run from 0."""

    @property
    def redelivered(self) -> int:
        return self.received - self.unique


def tally(registry: CountingRegistry, next_sequence: Mapping[str, int]) -> Tally:
    """Compare what every device wrote (``next_sequence`` per device) with the registry."""
    unique = lost = gaps = duplicates = 0
    for device, written in next_sequence.items():
        held = sorted(registry.events.get(device, {}))
        unique += len(held)
        duplicates += len(held) - len(set(held))
        lost += len(set(range(written)) - set(held))
        gaps += held != list(range(len(held)))
    return Tally(
        written=sum(next_sequence.values()),
        received=sum(registry.received[d] for d in next_sequence),
        unique=unique,
        lost=lost,
        duplicates=duplicates,
        gaps=gaps,
    )


def outbox_depth(store: Path) -> int:
    """Messages waiting in the store's outbox, read through a connection of our own."""
    with contextlib.closing(sqlite3.connect(store, timeout=10.0)) as connection:
        (count,) = connection.execute("SELECT count(*) FROM outbox").fetchone()
    return int(count)


def stored_events(store: Path) -> int:
    """Events in the store, read through a connection of our own."""
    with contextlib.closing(sqlite3.connect(store, timeout=10.0)) as connection:
        (count,) = connection.execute("SELECT count(*) FROM events").fetchone()
    return int(count)


def integrity_problems(store: Path) -> list[str]:
    """What ``PRAGMA integrity_check`` and ``foreign_key_check`` report; [] when sound."""
    with contextlib.closing(sqlite3.connect(store, timeout=10.0)) as connection:
        problems = [str(m) for (m,) in connection.execute("PRAGMA integrity_check") if m != "ok"]
        problems += [str(row) for row in connection.execute("PRAGMA foreign_key_check")]
    return problems


def configure(installation: Installation, section: str, **values: object) -> None:
    """Set ``values`` in ``[section]`` of the installation's configuration file."""
    lines = installation.config.read_text(encoding="utf-8").splitlines()
    rendered = [f"{name} = {json.dumps(value)}" for name, value in values.items()]
    header = f"[{section}]"
    if header not in lines:
        lines += ["", header]
    start = lines.index(header) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
    kept = [line for line in lines[start:end] if line.split("=")[0].strip() not in values]
    installation.config.write_text(
        "\n".join([*lines[:start], *rendered, *kept, *lines[end:]]) + "\n", encoding="utf-8"
    )


@dataclass
class DaemonLog:
    """The daemon's JSON log, read from where the previous reading stopped."""

    path: Path
    offset: int = 0
    phases: dict[str, str] = field(default_factory=dict)
    """Device id -> the phase of its open session (``session``, ``update``, ``transfer``)."""
    events: Counter[str] = field(default_factory=Counter)

    def read(self) -> list[dict[str, Any]]:
        """The complete lines written since the last read, decoded (other text skipped)."""
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        entries = []
        for line in data[:end].splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        for entry in entries:
            name = str(entry.get("event", ""))
            self.events[name] += 1
            if name in PHASE_EVENTS and "device_id" in entry:
                phase = PHASE_EVENTS[name]
                if phase is None:
                    self.phases.pop(entry["device_id"], None)
                else:
                    self.phases[entry["device_id"]] = phase
        return entries

    def restarted(self) -> None:
        """A new daemon process: no session of the old one is open any more."""
        self.read()
        self.phases.clear()

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], within: float
    ) -> dict[str, Any] | None:
        """The first new line for which ``predicate`` holds, or None after ``within`` s."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            for entry in self.read():
                if predicate(entry):
                    return entry
            await asyncio.sleep(0.01)
        return None


@dataclass
class Rig:
    """One installation of real processes; see the module documentation."""

    root: Path
    broker: Mosquitto
    sim: SimProcess
    installation: Installation
    registry: CountingRegistry
    devices: list[str]
    log: DaemonLog
    daemon: asyncio.subprocess.Process | None = None
    starts: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """The simulator answers one command at a time, in order."""

    @property
    def store(self) -> Path:
        return self.installation.root / STORE

    async def start(self) -> None:
        """Start the daemon (a new process) and wait until the registry sees it online."""
        assert self.daemon is None or self.daemon.returncode is not None
        self.log.restarted()
        self.daemon = await start_daemon(self.installation.config, self.log.path)
        self.starts += 1

    async def online(self, within: float = WAIT) -> None:
        registry = self.registry
        await registry.wait_for(lambda: online(registry), within, "the gateway online")

    async def stop(self) -> int:
        """SIGTERM the daemon; its exit code."""
        assert self.daemon is not None
        code = await stop_daemon(self.daemon)
        self.daemon = None
        return code

    async def kill(self) -> None:
        """SIGKILL the daemon: nothing flushed, nothing closed."""
        assert self.daemon is not None
        if self.daemon.returncode is None:
            self.daemon.kill()
        await self.daemon.wait()
        self.daemon = None

    async def command(self, **command: object) -> dict[str, Any]:
        """One simulator command; it must succeed."""
        async with self.lock:
            answer = await self.sim.command(**command)
        assert answer["ok"], answer
        return answer

    async def each(self, devices: Iterable[str], **command: object) -> None:
        for device in devices:
            await self.command(device_id=device, **command)

    async def status(self) -> dict[str, dict[str, Any]]:
        """Every device's summary from the simulator, by device id."""
        answer = await self.command(cmd="status")
        return {entry["device_id"]: entry for entry in answer["devices"]}

    async def written(self) -> dict[str, int]:
        """Events every device has written so far (its next sequence number)."""
        return {device: entry["next_sequence"] for device, entry in (await self.status()).items()}

    async def all_collected(self, within: float, what: str = "every event collected") -> Tally:
        """Wait until the registry holds every event the devices wrote; the tally."""
        deadline = time.monotonic() + within
        while True:
            written = await self.written()
            counted = tally(self.registry, written)
            if counted.unique == counted.written and counted.lost == 0:
                return counted
            if time.monotonic() > deadline:
                msg = f"{what}: not within {within} s: {counted}"
                raise AssertionError(msg)
            await asyncio.sleep(0.25)

    async def drained(self, within: float) -> int:
        """Wait until the store's outbox is empty; its depth then (0)."""
        deadline = time.monotonic() + within
        while True:
            depth = outbox_depth(self.store)
            if not depth or time.monotonic() > deadline:
                return depth
            await asyncio.sleep(0.25)  # another process's file: no event to wait for


@contextlib.asynccontextmanager
async def rig(
    root: Path,
    schemas: Schemas,
    *,
    locks: int,
    scheduler: Mapping[str, object] | None = None,
    log: Mapping[str, object] | None = None,
    persistence: bool = True,
    certificate_age: float | None = None,
) -> AsyncIterator[Rig]:
    """A paired installation, its registry listening; the daemon not yet started.

    ``certificate_age``: the gateway's certificate is re-issued by the same authority as
    valid since that many seconds ago, as that of a gateway installed some time before
    (the CLI issues certificates valid from five minutes ago).

    On leaving, the daemon (if running) is stopped with SIGTERM and must exit 0, and the
    registry must have refused nothing: every payload matched its schema and every batch
    re-verified against the device's key.
    """
    broker = Mosquitto(root / "broker", persistence=persistence)
    broker.start()
    sim: SimProcess | None = None
    listener: asyncio.Task[None] | None = None
    running: Rig | None = None
    try:
        sim = await SimProcess.start(
            "--locks", str(locks), "--serve", "tcp-server:127.0.0.1:0",
            "--advertising-interval", "0.05",
        )  # fmt: skip
        installation = install(root / "gw", transport=sim.ready["transport"], broker=broker)
        if certificate_age is not None:
            _reissue(installation, certificate_age)
        configure(installation, "scheduler", **(scheduler or {}))
        configure(installation, "log", **(log or {}))
        await pair_all(installation, sim)
        registry = make_registry(installation, broker, schemas, factory=CountingRegistry)
        listener = asyncio.create_task(registry.run())
        running = Rig(
            root=root,
            broker=broker,
            sim=sim,
            installation=installation,
            registry=registry,
            devices=[device["device_id"] for device in sim.ready["devices"]],
            log=DaemonLog(root / "daemon.log"),
        )
        running.log.path.touch()
        yield running
        if running.daemon is not None:
            code = await running.stop()
            assert code == 0, running.log.path.read_text()[-3000:]
        assert registry.invalid == [], registry.invalid[:5]
        assert registry.failures == [], registry.failures[:5]
    finally:
        if running is not None and running.daemon is not None:
            with contextlib.suppress(ProcessLookupError):
                running.daemon.kill()
            await running.daemon.wait()
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        if sim is not None:
            await sim.finish()
        broker.stop()


def _reissue(installation: Installation, age: float) -> None:
    root = installation.root
    request = SigningRequest.from_bytes((root / "gw.req").read_bytes())
    certificate = issue(
        installation.registry.authority,
        request,
        scope=Scope(sites=frozenset({installation.site})),
        not_before=int(time.time() - age),
        validity_days=365,
    )
    (root / "gateway.cert").write_bytes(encode_certificate(certificate))
