"""The reference registry against a real Mosquitto, fed hand-built gateway messages.

The messages are what a gateway publishes: registrations, and event batches made by a
device's own log (:class:`protocols.logrecords.DeviceLog`, signed checkpoints) in the
pipeline's published form (:func:`gateway.pipeline.events_payload`), sent by a plain MQTT
client. Command round trips are covered end to end against the real daemon in
tests/test_daemon.py; here only what the registry signs and sends is looked at.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.pipeline import events_payload
from protocols.enums import EventType, Reason
from protocols.identity import public_bytes
from protocols.logrecords import DeviceLog, LogBatch
from simulators.registry import (
    CommandFailed,
    DecommissionRefused,
    DeviceProgress,
    GapReport,
    ReferenceRegistry,
)
from tests.broker import Mosquitto
from tests.conftest import Registry, Schemas

WAIT = 5.0
SITE = 42


@dataclass
class Lock:
    """A device's log and key, as a gateway would collect from it."""

    device_id: bytes = field(default_factory=lambda: os.urandom(8))
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    log: DeviceLog = field(init=False)

    def __post_init__(self) -> None:
        self.log = DeviceLog(self.device_id, capacity=100)

    @property
    def hex(self) -> str:
        return self.device_id.hex()

    def append(self, count: int) -> None:
        for _ in range(count):
            self.log.append(int(time.time()), EventType.DOOR_OPENED, Reason.NONE)

    def read(self, from_sequence: int, count: int) -> LogBatch:
        return self.log.read(from_sequence, count, key=self.key, now=int(time.time()))

    def registration(self, gateway: str) -> bytes:
        body = {
            "message_id": f"{gateway}:{uuid.uuid4().hex[:8]}", "gateway": gateway,
            "action": "registered", "device_id": self.hex, "kind": "door_lock",
            "signing_key": public_bytes(self.key).hex(), "noise_key": os.urandom(32).hex(),
            "site_id": SITE, "work_order": "WO-1", "consent_reference": "CR-1",
            "time": time.time(),
        }  # fmt: skip
        return json.dumps(body).encode()

    def events(self, gateway: str, batch: LogBatch) -> bytes:
        return events_payload(gateway, self.hex, batch, batch.records)


def events_topic(gateway: str, lock: Lock) -> str:
    return f"lockgw/gw/{gateway}/devices/{lock.hex}/events"


def make_reference(
    broker: Mosquitto,
    registry: Registry,
    schemas: Schemas,
    protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V311,
) -> ReferenceRegistry:
    """The reference registry with ``registry``'s keys, checking every payload."""
    return ReferenceRegistry(
        host=broker.host,
        port=broker.port,
        key=registry.key,
        certificate=registry.certificate,
        authority=registry.authority.public_key(),
        client_id=f"registry-{uuid.uuid4().hex[:6]}",
        validator=schemas,
        reconnect_delay=0.05,
        protocol=protocol,
    )


@contextlib.asynccontextmanager
async def running(reference: ReferenceRegistry) -> AsyncIterator[ReferenceRegistry]:
    """``reference.run()`` as a task, connected and subscribed on entry, cancelled on exit."""
    connections = reference.connections
    task = asyncio.create_task(reference.run())
    try:
        await reference.wait_for(
            lambda: reference.connections > connections, WAIT, "the registry connected"
        )
        yield reference
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def central(
    broker: Mosquitto, registry: Registry, schemas: Schemas
) -> AsyncIterator[ReferenceRegistry]:
    """The reference registry, running and subscribed."""
    async with running(make_reference(broker, registry, schemas)) as reference:
        yield reference
    assert reference.invalid == []  # every hand-built payload matched its schema


@pytest.fixture
async def gateway_client(broker: Mosquitto) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(broker.host, broker.port, identifier="gateway-sim") as client:
        yield client


async def test_duplicates_counted_once_gaps_reported_and_early_batches_wait(
    central: ReferenceRegistry, gateway_client: aiomqtt.Client
) -> None:
    lock = Lock()
    lock.append(8)
    first = lock.read(0, 3)
    # The batch overtakes its registration: it waits for the key, unverified.
    await gateway_client.publish(events_topic("gw-a", lock), lock.events("gw-a", first), qos=1)
    await gateway_client.publish("lockgw/gw/gw-a/registrations", lock.registration("gw-a"), qos=1)
    await gateway_client.publish(events_topic("gw-a", lock), lock.events("gw-a", first), qos=1)
    # Records 3 and 4 are never delivered: the next batch is re-anchored, the gap reported.
    lock.log.acknowledge(4)
    later = lock.read(5, 3)
    assert later.start_sequence == 5
    await gateway_client.publish(events_topic("gw-a", lock), lock.events("gw-a", later), qos=1)
    await gateway_client.publish(events_topic("gw-a", lock), lock.events("gw-a", later), qos=1)

    await central.wait_for(lambda: central.duplicates == 2, WAIT, "both repeats seen")
    assert sorted(central.events[lock.hex]) == [0, 1, 2, 5, 6, 7]
    assert central.gaps == [GapReport(lock.hex, "gw-a", first_missing=3, count=2)]
    assert central.failures == []
    assert central.registrations[lock.hex].gateway == "gw-a"
    assert central.registrations[lock.hex].signing_key == public_bytes(lock.key)


async def test_tampered_batch_is_a_failure_naming_the_sequence_and_not_accepted(
    central: ReferenceRegistry, gateway_client: aiomqtt.Client
) -> None:
    lock = Lock()
    lock.append(4)
    await gateway_client.publish("lockgw/gw/gw-a/registrations", lock.registration("gw-a"), qos=1)
    genuine = lock.read(0, 4)
    body = json.loads(lock.events("gw-a", genuine))
    records = bytearray(bytes.fromhex(body["raw"]["records"]))
    records[1 * 30 + 20] ^= 0x01  # a payload byte of record 1
    body["raw"]["records"] = records.hex()
    topic = events_topic("gw-a", lock)
    await gateway_client.publish(topic, json.dumps(body).encode(), qos=1)
    # Raw records intact, but the decoded events claim something else.
    lied = json.loads(lock.events("gw-a", genuine))
    lied["events"][2]["event"] = "ACCESS_GRANTED"
    await gateway_client.publish(topic, json.dumps(lied).encode(), qos=1)

    await central.wait_for(lambda: len(central.failures) == 2, WAIT, "two failures")
    altered, mismatch = central.failures
    assert (altered.device_id, altered.sequence, altered.code) == (lock.hex, 1, "LOG_ALTERED")
    assert altered.message_id == f"{lock.hex}:0-3"
    assert (mismatch.sequence, mismatch.code) == (2, "EVENTS_MISMATCH")
    assert lock.hex not in central.events or not central.events[lock.hex]

    # Nothing of the bad batches was accepted: the genuine one still continues the chain.
    await gateway_client.publish(topic, lock.events("gw-a", genuine), qos=1)
    await central.wait_for(lambda: len(central.events.get(lock.hex, {})) == 4, WAIT, "accepted")
    assert central.duplicates == 0
    # And once accepted, a tampered repeat is re-verified too, not waved through as a repeat.
    await gateway_client.publish(topic, json.dumps(body).encode(), qos=1)
    await central.wait_for(lambda: len(central.failures) == 3, WAIT, "the repeat refused")
    assert central.failures[-1].code == "LOG_ALTERED"
    assert central.duplicates == 0


def progress(gateway: str, update_id: str, devices: dict[str, tuple[str, str | None]]) -> bytes:
    entries = {d: {"state": s, "error_code": e, "version": 1} for d, (s, e) in devices.items()}
    summary = dict.fromkeys(("applied", "pending", "failed", "unreachable"), 0)
    for state, _ in devices.values():
        summary[state] += 1
    body = {"update_id": update_id, "gateway": gateway, "devices": entries, "summary": summary}
    return json.dumps(body).encode()


async def test_progress_from_two_gateways_merged_per_device(
    central: ReferenceRegistry, gateway_client: aiomqtt.Client
) -> None:
    one, two, three = (os.urandom(8).hex() for _ in range(3))
    for gateway in ("gw-a", "gw-b"):
        status = {"state": "online", "gateway": gateway, "since": time.time(), "version": "0.1"}
        await gateway_client.publish(
            f"lockgw/gw/{gateway}/status", json.dumps(status).encode(), qos=1, retain=True
        )
    topic = "lockgw/gw/{}/updates/rev-1/progress"
    a = progress("gw-a", "rev-1", {one: ("applied", None), two: ("pending", None)})
    await gateway_client.publish(topic.format("gw-a"), a, qos=1, retain=True)
    b = progress("gw-b", "rev-1", {three: ("failed", "UPDATE_ROLLBACK")})
    await gateway_client.publish(topic.format("gw-b"), b, qos=1, retain=True)
    await central.wait_for(
        lambda: central.coverage("rev-1") == {
            "applied": 1, "pending": 1, "failed": 1, "unreachable": 0
        },
        WAIT,
        "both gateways' reports",
    )  # fmt: skip
    a = progress("gw-a", "rev-1", {one: ("applied", None), two: ("applied", None)})
    await gateway_client.publish(topic.format("gw-a"), a, qos=1, retain=True)
    await central.wait_for(lambda: central.coverage("rev-1")["applied"] == 2, WAIT, "update")
    assert central.coverage("rev-1") == {"applied": 2, "pending": 0, "failed": 1, "unreachable": 0}
    assert central.progress["rev-1"][three] == DeviceProgress(
        "failed", "UPDATE_ROLLBACK", "gw-b", version=1
    )
    assert central.progress["rev-1"][two].gateway == "gw-a"
    assert {g: s.state for g, s in central.gateways.items()} == {"gw-a": "online", "gw-b": "online"}


def claims_of(payload: bytes) -> dict[str, Any]:
    """The claims of a signed command (the JWS payload segment)."""
    segment = payload.split(b".")[1]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(segment + b"=" * 4))
    return decoded


async def test_revocations_are_cumulative_with_registry_versions(
    central: ReferenceRegistry, gateway_client: aiomqtt.Client
) -> None:
    lock = Lock()
    await gateway_client.publish("lockgw/gw/gw-a/registrations", lock.registration("gw-a"), qos=1)
    await central.wait_for(lambda: lock.hex in central.registrations, WAIT, "registration")
    await gateway_client.subscribe("lockgw/fleet/commands", qos=1)
    now = int(time.time())
    # No gateway answers here (the round trip is tests/test_daemon.py's): a typed timeout.
    with pytest.raises(CommandFailed):
        await central.revoke("rev-1", [11], prune_after=now + 600, expires_at=now + 60, timeout=0.3)
    with pytest.raises(CommandFailed):
        await central.revoke("rev-2", [12], prune_after=now + 600, expires_at=now + 60, timeout=0.3)
    with pytest.raises(ValueError, match="not above"):
        await central.revoke("rev-3", [13], prune_after=now + 600, expires_at=now, version=2)

    sent = []
    async with asyncio.timeout(WAIT):
        async for message in gateway_client.messages:
            assert isinstance(message.payload, bytes)
            sent.append(claims_of(message.payload))
            if len(sent) == 2:
                break
    assert [c["gateway"] for c in sent] == ["*", "*"]
    assert [c["args"]["version"] for c in sent] == [1, 2]
    assert [[r["key_id"] for r in c["args"]["revocations"]] for c in sent] == [[11], [11, 12]]
    assert len({c["jti"] for c in sent}) == 2
    # The registered device in the fleet target that no gateway reported on is pending.
    assert central.coverage("rev-2") == {"applied": 0, "pending": 1, "failed": 0, "unreachable": 0}


async def test_decommission_refused_while_another_service_needs_the_lock(
    central: ReferenceRegistry,
) -> None:
    device = os.urandom(8).hex()
    central.services[device] = {"medication"}
    with pytest.raises(DecommissionRefused, match="medication"):
        await central.decommission("gw-a", device, "moved out")
    with pytest.raises(ValueError, match="reason"):
        await central.decommission("gw-a", device, " ", override="resident moved")
    with pytest.raises(CommandFailed):  # allowed with an override; nobody answers here
        await central.decommission(
            "gw-a", device, "moved out", override="resident moved", timeout=0.3
        )


@pytest.mark.parametrize(
    "protocol", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5], ids=["3.1.1", "5"]
)
async def test_persistent_session_survives_a_broker_restart_and_its_own_absence(
    broker: Mosquitto, registry: Registry, schemas: Schemas, protocol: aiomqtt.ProtocolVersion
) -> None:
    lock = Lock()
    lock.append(4)
    reference = make_reference(broker, registry, schemas, protocol)
    async with running(reference), aiomqtt.Client(broker.host, broker.port) as gateway:
        await gateway.publish("lockgw/gw/gw-a/registrations", lock.registration("gw-a"), qos=1)
        await reference.wait_for(lambda: lock.hex in reference.registrations, WAIT, "registered")
    # The registry is away: what the gateway publishes meanwhile waits in its session,
    # across a broker restart (the broker persists sessions and queued messages).
    async with aiomqtt.Client(broker.host, broker.port) as gateway:
        await gateway.publish(
            events_topic("gw-a", lock), lock.events("gw-a", lock.read(0, 2)), qos=1
        )
    broker.stop()
    broker.start()
    async with running(reference):
        await reference.wait_for(
            lambda: len(reference.events.get(lock.hex, {})) == 2, WAIT, "the queued batch"
        )
        # A broker restart while it runs: it reconnects and subscribes again.
        broker.stop()
        broker.start()
        await reference.wait_for(lambda: reference.connections == 3, WAIT, "reconnected")
        async with aiomqtt.Client(broker.host, broker.port) as gateway:
            await gateway.publish(
                events_topic("gw-a", lock), lock.events("gw-a", lock.read(2, 2)), qos=1
            )
            await reference.wait_for(
                lambda: len(reference.events[lock.hex]) == 4, WAIT, "the next batch"
            )
    assert reference.failures == []
    assert reference.invalid == []
