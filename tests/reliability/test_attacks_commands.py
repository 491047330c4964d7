"""Attacks on the registry command topic of a running daemon (`lockgw run`, real Mosquitto).

Abuse: malformed JSON, not a JWS, wrong types in the arguments, an unknown operation and
an oversized payload are each answered with their typed error code on the responses
topic and change nothing in the store; then a flood of thousands of commands from one
client: the daemon stays up, answers a legitimate command afterwards, and its memory
(VmRSS from /proc) stays bounded.

Replay: one signed command sent twice, and a third time after a daemon restart: only the
first is carried out, the others are answered ``replayed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiomqtt
import pytest

from gateway.commands import MAX_COMMAND_SIZE
from tests.broker import Mosquitto
from tests.installation import Installation, install, pair_all, start_daemon, stop_daemon
from tests.processes import SimProcess
from tests.reliability.conftest import Figures

WAIT: Final = 30.0
FLOOD: Final = 3000
RSS_BOUND_KIB: Final = 64 * 1024
"""How much the daemon's resident memory may grow over the flood."""


@dataclass
class Responses:
    """Every response the gateway published, in order."""

    items: list[dict[str, Any]] = field(default_factory=list)
    online: asyncio.Event = field(default_factory=asyncio.Event)

    def by_id(self, command_id: str) -> list[dict[str, Any]]:
        return [r for r in self.items if r["id"] == command_id]

    async def wait(self, check: Any, what: str, within: float = WAIT) -> None:
        deadline = time.monotonic() + within
        while not check():
            if time.monotonic() > deadline:
                msg = f"timed out waiting for {what}; last responses: {self.items[-3:]}"
                raise AssertionError(msg)
            await asyncio.sleep(0.02)


@dataclass
class Site:
    installation: Installation
    client: aiomqtt.Client
    responses: Responses
    log: Path
    daemon: asyncio.subprocess.Process | None = None

    @property
    def commands(self) -> str:
        return f"lockgw/gw/{self.installation.gateway_id}/commands"

    @property
    def store(self) -> Path:
        return self.installation.root / "state" / "lockgw.sqlite3"

    async def start(self) -> None:
        self.responses.online.clear()
        self.daemon = await start_daemon(self.installation.config, self.log)
        async with asyncio.timeout(WAIT):
            await self.responses.online.wait()

    async def stop(self) -> int:
        assert self.daemon is not None
        code = await stop_daemon(self.daemon)
        self.daemon = None
        return code

    async def send(self, payload: bytes, qos: int = 1) -> None:
        await self.client.publish(self.commands, payload, qos=qos)

    async def answer(self, payload: bytes, what: str) -> dict[str, Any]:
        """Send ``payload`` and return the one response it gets."""
        count = len(self.responses.items)
        await self.send(payload)
        await self.responses.wait(lambda: len(self.responses.items) > count, what)
        await asyncio.sleep(0.2)  # a second answer would show here
        [answer] = self.responses.items[count:]
        return answer

    def rss_kib(self) -> int:
        assert self.daemon is not None
        status = Path(f"/proc/{self.daemon.pid}/status").read_text(encoding="utf-8")
        [line] = [line for line in status.splitlines() if line.startswith("VmRSS:")]
        return int(line.split()[1])

    def snapshot(self) -> tuple[list[Any], list[Any], list[Any]]:
        """What commands could change: devices (their identity, lists, pairing), updates
        and their propagation; read through a second sqlite3 connection."""
        connection = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True)
        try:
            devices = connection.execute(
                "SELECT device_id, kind, signing_key, noise_key, site_id, paired_at, "
                "decommissioned_at, access_version, revocation_version FROM devices "
                "ORDER BY device_id"
            ).fetchall()
            updates = connection.execute("SELECT * FROM updates ORDER BY update_id").fetchall()
            propagation = connection.execute(
                "SELECT * FROM propagation ORDER BY update_id, device_id"
            ).fetchall()
        finally:
            connection.close()
        return devices, updates, propagation


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    """A gateway with one paired lock, its daemon running, and a client on its topics."""
    broker = Mosquitto(tmp_path / "broker")
    broker.start()
    sim = await SimProcess.start(
        "--locks", "1", "--serve", "tcp-server:127.0.0.1:0", "--advertising-interval", "0.05"
    )  # fmt: skip
    try:
        installation = install(tmp_path / "gw", transport=sim.ready["transport"], broker=broker)
        await pair_all(installation, sim)
        responses = Responses()
        gateway = installation.gateway_id
        async with aiomqtt.Client(
            broker.host, broker.port, identifier=f"registry-{uuid.uuid4().hex[:6]}"
        ) as client:
            await client.subscribe(f"lockgw/gw/{gateway}/responses", qos=1)
            await client.subscribe(f"lockgw/gw/{gateway}/status", qos=1)

            async def listen() -> None:
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    body = json.loads(message.payload)
                    if message.topic.matches(f"lockgw/gw/{gateway}/status"):
                        if body["state"] == "online":
                            responses.online.set()
                    else:
                        responses.items.append(body)

            listener = asyncio.create_task(listen())
            current = Site(installation, client, responses, tmp_path / "daemon.log")
            try:
                await current.start()
                yield current
            finally:
                if current.daemon is not None:
                    code = await current.stop()
                    assert code == 0, current.log.read_text()[-3000:]
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
    finally:
        await sim.finish()
        broker.stop()


@pytest.mark.timeout(240)
async def test_abusive_commands_are_answered_typed_and_change_nothing(
    site: Site, figures: Figures
) -> None:
    registry = site.installation.registry
    responses = site.responses
    # A legitimate command first: the daemon answers, and the store is settled.
    hello = registry.claims("get_state")
    await site.send(registry.sign(hello))
    await responses.wait(lambda: responses.by_id(hello["id"]), "the first answer")
    assert responses.by_id(hello["id"])[0]["status"] == "ok"
    before = site.snapshot()

    malformed_json = b'{"id": "c-json", "op": "get_state", '
    cases: list[tuple[str, bytes, str, str | None]] = [
        ("malformed_json", malformed_json, "malformed", None),
        ("not_a_jws", b"not a command", "malformed", None),
        (
            "wrong_types",
            registry.sign(registry.claims("get_state", {"device_id": 5}, id="c-types")),
            "bad_args",
            "c-types",
        ),
        (
            "wrong_types_string_number",
            registry.sign(
                registry.claims(
                    "pull_logs",
                    {"device_id": "00" * 8, "from": "0", "to": 1},
                    id="c-types-2",
                )
            ),
            "bad_args",
            "c-types-2",
        ),
        (
            "unknown_op",
            registry.sign(registry.claims("open_every_door", {}, id="c-op")),
            "unknown_op",
            "c-op",
        ),
        (
            "oversized",
            registry.sign(
                registry.claims("get_state", {"pad": "x" * MAX_COMMAND_SIZE}, id="c-big")
            ),
            "too_large",
            None,
        ),
    ]
    codes: dict[str, str] = {}
    for name, payload, expected, command_id in cases:
        answer = await site.answer(payload, name)
        assert answer["status"] == "error", (name, answer)
        assert answer["error"]["code"] == expected, (name, answer)
        assert answer["id"] == command_id, (name, answer)
        codes[name] = answer["error"]["code"]
    assert len(cases[-1][1]) > MAX_COMMAND_SIZE
    assert site.snapshot() == before, "a refused command changed the store"

    # The flood: thousands of commands from one client, as fast as the broker takes them.
    rss_before = site.rss_kib()
    rss_peak = rss_before
    sampling = True

    async def sample() -> None:
        nonlocal rss_peak
        while sampling:
            rss_peak = max(rss_peak, site.rss_kib())
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    first = len(responses.items)
    started = time.monotonic()
    signed_garbage = registry.sign(registry.claims("get_state", {"device_id": 5}))
    for index in range(FLOOD):
        kind = index % 3
        if kind == 0:
            payload = b"flood " + str(index).encode()
        elif kind == 1:
            payload = registry.sign(registry.claims("open_every_door", {}, id=f"f-{index}"))
        else:
            payload = signed_garbage  # the same signed command again and again
        await site.send(payload, qos=0 if index % 2 else 1)
    sent_in = time.monotonic() - started
    with contextlib.suppress(AssertionError):
        await responses.wait(lambda: len(responses.items) - first >= FLOOD, "the flood answered")
    answered = len(responses.items) - first
    sampling = False
    await sampler
    flood_codes = Counter(r["error"]["code"] for r in responses.items[first:] if r["error"])
    assert site.daemon is not None
    assert site.daemon.returncode is None, "the daemon died"

    # A legitimate command afterwards is still answered.
    after = registry.claims("get_state")
    await site.send(registry.sign(after))
    await responses.wait(lambda: responses.by_id(after["id"]), "the answer after the flood")
    assert responses.by_id(after["id"])[0]["status"] == "ok"
    rss_after = site.rss_kib()
    assert site.snapshot() == before, "the flood changed the store"
    assert rss_peak - rss_before < RSS_BOUND_KIB, (rss_before, rss_peak)
    # Every command reached the daemon was answered once, with a typed code only.
    assert answered <= FLOOD
    assert set(flood_codes) <= {"malformed", "unknown_op", "bad_args", "replayed", "busy"}
    assert (
        flood_codes["busy"]
        + flood_codes["malformed"]
        + flood_codes["unknown_op"]
        + flood_codes["bad_args"]
        + flood_codes["replayed"]
        == answered
    )
    figures(
        "command_abuse",
        cases=len(cases),
        codes=codes,
        state_changes=0,
        flood_sent=FLOOD,
        flood_seconds=round(sent_in, 2),
        flood_answered=answered,
        flood_codes=dict(flood_codes),
        daemon_up=True,
        rss_kib={"before": rss_before, "peak": rss_peak, "after": rss_after},
    )


@pytest.mark.timeout(240)
async def test_a_replayed_command_is_refused_also_after_a_restart(
    site: Site, figures: Figures
) -> None:
    registry = site.installation.registry
    responses = site.responses
    claims = registry.claims("get_state")
    command = registry.sign(claims)

    await site.send(command)
    await responses.wait(lambda: len(responses.by_id(claims["id"])) == 1, "the first answer")
    await site.send(command)
    await responses.wait(lambda: len(responses.by_id(claims["id"])) == 2, "the replay's answer")
    assert await site.stop() == 0, site.log.read_text()[-3000:]
    await site.start()
    await site.send(command)
    await responses.wait(lambda: len(responses.by_id(claims["id"])) == 3, "after the restart")

    answers = responses.by_id(claims["id"])
    assert answers[0]["status"] == "ok"
    codes = [a["error"]["code"] for a in answers[1:]]
    assert codes == ["replayed", "replayed"]
    figures(
        "replay",
        channel="mqtt",
        attempts=2,
        accepted=sum(1 for a in answers[1:] if a["status"] == "ok"),
        codes={"same_daemon": codes[0], "after_restart": codes[1]},
    )
