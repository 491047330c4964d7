"""The daemon end to end: `lockgw run` and the simulator as real processes, a real broker.

The gateway is installed as an operator would install it (authority, keys, signing
request, certificate, configuration: all through the `lockgw` CLI), its devices are paired
by a technician before it starts, and the registry is played by an MQTT client in the test
that signs its commands, de-duplicates events and re-verifies every batch against the
device's registered key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from gateway import cli
from gateway.keys import load_credentials, load_signing_key
from gateway.pairing import WorkOrder, pair_device
from gateway.radio.bumble import BumbleRadio
from gateway.store import Store
from gateway.topics import Topics
from gateway.worker import BlockingWorker
from protocols.identity import load_signing_public, parse_device_id
from protocols.logrecords import (
    ChainState,
    LogBatch,
    decode_checkpoint,
    decode_record,
    verify_batch,
)
from protocols.pairing import LabelPayload
from tests.broker import Mosquitto
from tests.conftest import Registry, Schemas
from tests.processes import REPO_ROOT, SimProcess

GATEWAY_ID = "gw-north-1"
SITE = 42
KEY = 4711
WAIT = 30.0


@dataclass
class Installation:
    root: Path
    config: Path
    registry: Registry


def install(root: Path, *, transport: str, broker: Mosquitto) -> Installation:
    """A gateway installation made with the CLI, as an operator would make it."""
    root.mkdir(parents=True, exist_ok=True)
    steps = [
        ["authority", "init", "--key", "authority.key", "--public", "authority.pub"],
        ["keys", "generate", "--id", GATEWAY_ID, "--key", "gateway.key", "--request", "gw.req"],
        ["authority", "issue", "--key", "authority.key", "--request", "gw.req",
         "--out", "gateway.cert", "--sites", str(SITE)],
        ["authority", "registry-key", "--subject", "registry", "--key", "registry.key",
         "--request", "registry.req"],
        ["authority", "issue", "--key", "authority.key", "--request", "registry.req",
         "--out", "registry.cert", "--organisation-wide"],
    ]  # fmt: skip
    for step in steps:
        argv = [str(root / part) if part.endswith((".key", ".pub", ".req", ".cert")) else part
                for part in step]  # fmt: skip
        assert cli.main(argv) == 0, step
    config = root / "gateway.toml"
    config.write_text(
        f"""
[gateway]
id = "{GATEWAY_ID}"
state_dir = "state"
key_file = "gateway.key"
certificate_file = "gateway.cert"
authority_key_file = "authority.pub"

[radio]
backend = "bumble"
transport = "{transport}"
mtu = 247

[scheduler]
slots = 2
backoff_initial = "500ms"
backoff_max = "3s"

[mqtt]
host = "{broker.host}"
port = {broker.port}
tls = false
reconnect_min = "200ms"
reconnect_max = "2s"

[logging]
format = "json"

[metrics]
enabled = false
""",
        encoding="utf-8",
    )
    registry = Registry(
        authority=load_signing_key(root / "authority.key"),
        key=load_signing_key(root / "registry.key"),
        gateway_id=GATEWAY_ID,
        certificate=(root / "registry.cert").read_bytes(),
    )
    return Installation(root, config, registry)


async def pair_all(installation: Installation, sim: SimProcess) -> None:
    """The technician's visit: pair every simulated device before the daemon starts."""
    root = installation.root
    credentials = load_credentials(
        root / "gateway.key", root / "gateway.cert", root / "authority.pub"
    )
    (root / "state").mkdir(exist_ok=True)
    store = Store.open(root / "state" / "lockgw.sqlite3")
    try:
        async with BumbleRadio(sim.ready["transport"]) as radio, BlockingWorker("store") as worker:
            for device in sim.ready["devices"]:
                label = LabelPayload.parse(device["label"])
                await pair_device(
                    radio=radio,
                    address=device["address"],
                    device_id=label.device_id,
                    code=label.code,
                    site_id=SITE,
                    order=WorkOrder(f"WO-{device['device_id'][:6]}", "owner-consent-1"),
                    credentials=credentials,
                    store=store,
                    worker=worker,
                    topics=Topics("lockgw", GATEWAY_ID),
                )
    finally:
        store.close()


@dataclass
class RegistryClient:
    """The central registry's view: every message, events de-duplicated and re-verified."""

    registry: Registry
    broker: Mosquitto
    schemas: Schemas
    messages: list[aiomqtt.Message] = field(default_factory=list)
    validated: dict[str, int] = field(default_factory=dict)
    keys: dict[str, bytes] = field(default_factory=dict)
    chains: dict[str, ChainState] = field(default_factory=dict)
    events: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)
    duplicates: int = 0
    responses: dict[str | None, dict[str, Any]] = field(default_factory=dict)
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    status: str | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Stay subscribed across broker restarts, with a persistent session."""
        while True:
            try:
                async with self._client() as client:
                    await client.subscribe("lockgw/#", qos=1)
                    async for message in client.messages:
                        self._take(message)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.1)

    def _client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            identifier="registry-test",
            clean_session=False,
            protocol=aiomqtt.ProtocolVersion.V311,
        )

    def _take(self, message: aiomqtt.Message) -> None:
        self.messages.append(message)
        topic = str(message.topic)
        if topic.endswith("/commands") or not isinstance(message.payload, bytes):
            return  # the registry's own signed commands, or a cleared retained topic
        schema = _schema_for(topic)
        body = self.schemas.validate(schema, message.payload)  # every payload, as published
        self.validated[schema] = self.validated.get(schema, 0) + 1
        if topic.endswith("/status"):
            self.status = body["state"]
        elif topic.endswith("/registrations") and body["action"] == "registered":
            self.keys[body["device_id"]] = bytes.fromhex(body["signing_key"])
        elif topic.endswith("/events"):
            self._events(body)
        elif topic.endswith("/responses"):
            self.responses[body["id"]] = body
        elif topic.endswith("/progress"):
            self.progress[body["update_id"]] = body
        self.wake.set()

    def _events(self, body: dict[str, Any]) -> None:
        device = body["device_id"]
        stored = self.events.setdefault(device, {})
        if all(event["sequence"] in stored for event in body["events"]):
            self.duplicates += 1
            return
        raw = body["raw"]
        data = bytes.fromhex(raw["records"])
        batch = LogBatch(
            start_sequence=raw["start_sequence"],
            start_head=bytes.fromhex(raw["start_head"]),
            records=tuple(decode_record(data[i : i + 30]) for i in range(0, len(data), 30)),
            checkpoint=decode_checkpoint(bytes.fromhex(raw["checkpoint"])),
        )
        device_id = parse_device_id(device)
        verified = verify_batch(
            batch,
            device_id=device_id,
            device_key=load_signing_public(self.keys[device]),
            state=self.chains.get(device, ChainState.genesis(device_id)),
        )
        self.chains[device] = verified.state
        for event in body["events"]:
            stored[event["sequence"]] = event

    async def until(self, condition: Callable[[], bool], what: str, within: float = WAIT) -> None:
        async with asyncio.timeout(within):
            while not condition():
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        await self.wake.wait()
        assert condition(), what

    async def command(
        self, client: aiomqtt.Client, op: str, args: dict[str, Any], *, fleet: bool = False
    ) -> dict[str, Any]:
        claims = self.registry.claims(op, args, gateway="*" if fleet else GATEWAY_ID)
        topic = "lockgw/fleet/commands" if fleet else f"lockgw/gw/{GATEWAY_ID}/commands"
        await client.publish(topic, self.registry.sign(claims), qos=1)
        await self.until(lambda: claims["id"] in self.responses, f"a response to {op}")
        return self.responses[claims["id"]]

    def kinds(self, device: str) -> list[tuple[str, str, int]]:
        return [
            (e["event"], e["reason"], e["key_id"])
            for _, e in sorted(self.events.get(device, {}).items())
        ]


def _schema_for(topic: str) -> str:
    for suffix, schema in [
        ("/status", "status"),
        ("/registrations", "registration"),
        ("/events", "events"),
        ("/responses", "response"),
        ("/progress", "progress"),
        ("/alarms", "alarm"),
        ("/state", "device-state"),
    ]:
        if topic.endswith(suffix):
            return schema
    msg = f"no schema for topic {topic}"
    raise AssertionError(msg)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    mosquitto = Mosquitto(tmp_path / "broker", persistence=True)
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


async def start_daemon(config: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as output:  # the child keeps its own copy of the descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "run", "--config", str(config),
            cwd=REPO_ROOT, stdout=output, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip


async def stop_daemon(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(15):
            return await process.wait()
    except TimeoutError:
        process.kill()
        return await process.wait()


async def test_daemon_collects_revokes_and_survives_a_broker_outage(
    tmp_path: Path, broker: Mosquitto, schemas: Schemas
) -> None:
    sim = await SimProcess.start(
        "--locks", "2", "--serve", "tcp-server:127.0.0.1:0", "--advertising-interval", "0.05"
    )
    log = tmp_path / "daemon.log"
    daemon: asyncio.subprocess.Process | None = None
    registry: RegistryClient | None = None
    listener: asyncio.Task[None] | None = None
    try:
        installation = install(tmp_path / "gw", transport=sim.ready["transport"], broker=broker)
        await pair_all(installation, sim)
        devices = [device["device_id"] for device in sim.ready["devices"]]
        registry = RegistryClient(installation.registry, broker, schemas)
        listener = asyncio.create_task(registry.run())
        daemon = await start_daemon(installation.config, log)
        async with aiomqtt.Client(
            broker.host, broker.port, identifier=f"sender-{uuid.uuid4().hex[:6]}"
        ) as sender:
            await registry.until(lambda: registry.status == "online", "the gateway online")
            # Pairing happened while the daemon was down: the registrations waited in the
            # outbox and arrive now, with the keys the registry verifies events against.
            await registry.until(lambda: set(registry.keys) == set(devices), "registrations")
            await registry.until(
                lambda: all(("PAIRED", "REMOTE", 0) in registry.kinds(d) for d in devices),
                "the pairing events collected and verified",
            )

            now = int(time.time())
            access = {
                "update_id": "access-1", "target": {"kind": "site", "site_id": SITE},
                "mode": "full", "version": 1, "base_version": 0,
                "entries": [{"key_id": KEY, "valid_from": now - 3600, "valid_until": now + 86400,
                             "windows": [{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                                          "start": "00:00", "end": "24:00"}]}],
                "removed": [], "expires_at": now + 3600,
            }  # fmt: skip
            answer = await registry.command(sender, "set_access", access)
            assert answer["status"] == "ok", answer
            await registry.until(
                lambda: (
                    registry.progress.get("access-1", {}).get("summary", {}).get("applied") == 2
                ),
                "the access list applied on both locks",
            )
            for device in devices:
                reply = await sim.command(cmd="present_key", device_id=device, key_id=KEY,
                                          activation_expires_at=now + 3600)  # fmt: skip
                assert reply["granted"], reply

            revoke = {
                "update_id": "revoke-4711", "version": 1, "target": {"kind": "fleet"},
                "revocations": [{"key_id": KEY, "prune_after": now + 90 * 86400}],
                "expires_at": now + 3600,
            }  # fmt: skip
            answer = await registry.command(sender, "revoke", revoke, fleet=True)
            assert answer["status"] == "ok", answer
            await registry.until(
                lambda: (
                    registry.progress.get("revoke-4711", {}).get("summary", {}).get("applied") == 2
                ),
                "the revocation applied on both locks",
            )
            for device in devices:
                reply = await sim.command(cmd="present_key", device_id=device, key_id=KEY,
                                          activation_expires_at=now + 3600)  # fmt: skip
                assert not reply["granted"]
                assert reply["reason"] == "KEY_REVOKED"
            await registry.until(
                lambda: all(
                    ("ACCESS_DENIED", "KEY_REVOKED", KEY) in registry.kinds(d) for d in devices
                ),
                "the refusals reach the registry",
            )

            await sender.publish(f"lockgw/gw/{GATEWAY_ID}/commands", b"not a command", qos=1)
            await registry.until(
                lambda: (
                    registry.responses.get(None, {}).get("error", {}).get("code") == "malformed"
                ),
                "the garbage command answered with a typed error",
            )

        # The broker goes away while the locks keep logging; nothing may be lost.
        before = {device: len(registry.events.get(device, {})) for device in devices}
        broker.stop()
        for _ in range(15):
            for device in devices:
                await sim.command(cmd="door", device_id=device, state="open")
                await sim.command(cmd="door", device_id=device, state="closed")
        await asyncio.sleep(2.0)  # collected into the store while the broker is down
        broker.start()
        await registry.until(
            lambda: all(len(registry.events.get(d, {})) >= before[d] + 30 for d in devices),
            "every event logged during the outage",
            within=60,
        )
        for device in devices:
            sequences = sorted(registry.events[device])
            assert sequences == list(range(len(sequences))), "no gap, no duplicate"
        assert daemon.returncode is None, log.read_text()
    finally:
        if daemon is not None:
            code = await stop_daemon(daemon)
            assert code == 0, log.read_text()[-3000:]
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        await sim.finish()
    assert registry is not None
    assert {"status", "registration", "events", "response", "progress", "device-state"} <= set(
        registry.validated
    ), registry.validated
    await asyncio.sleep(0)  # the offline status is retained for anyone who asks now
    async with aiomqtt.Client(broker.host, broker.port, identifier="late") as late:
        await late.subscribe(f"lockgw/gw/{GATEWAY_ID}/status", qos=1)
        async with asyncio.timeout(5):
            async for message in late.messages:
                assert isinstance(message.payload, bytes)
                assert json.loads(message.payload)["state"] == "offline"
                break


def test_bad_configuration_exits_78_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nid = "Bad Id!"\n[mqtt]\nhost = "x"\n', encoding="utf-8")
    assert cli.main(["run", "--config", str(config)]) == cli.EX_CONFIG
    assert cli.main(["check-config", "--config", str(tmp_path / "absent.toml")]) == cli.EX_CONFIG
