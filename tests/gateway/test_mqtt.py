"""The MQTT bridge against a real Mosquitto: outbox, outages, last will, commands, TLS.

No mocks: the bridge runs over a real store and a real broker, and the tests watch with
aiomqtt clients of their own, the way the registry and operators would. Every message a
test observes is checked against the JSON Schemas of docs/schemas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import sqlite3
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Self

import aiomqtt
import pytest

from gateway.commands import Command, CommandError, CommandVerifier, PullLogsArgs
from gateway.mqtt import (
    MAX_RESPONSE_SIZE,
    MqttBridge,
    MqttSettings,
    MqttTls,
    backoff_delay,
    response_payload,
    status_payload,
)
from gateway.store import OutboxMessage, Store
from gateway.topics import Topics
from protocols.logrecords import chain_genesis
from tests.broker import Mosquitto, TlsFiles
from tests.conftest import GATEWAY_ID, GatewayStore, Registry, Schemas
from tests.gateway.store_crash_worker import (
    DEVICE_ID,
    Batch,
    build_batch,
    device_record,
)
from tests.gateway.test_commands import REFUSALS, REVOKE_ARGS

TOPICS: Final = Topics("lockgw", GATEWAY_ID)
DEVICE_HEX: Final = DEVICE_ID.hex()
WAIT: Final = 15.0
"""Longest wait for anything the broker should deliver; generous for loaded machines."""

SCHEMA_FOR_TOPIC: Final = (
    (re.compile(r"^lockgw/gw/[^/]+/status$"), "status"),
    (re.compile(r"^lockgw/gw/[^/]+/devices/[0-9a-f]{16}/state$"), "device-state"),
    (re.compile(r"^lockgw/gw/[^/]+/devices/[0-9a-f]{16}/events$"), "events"),
    (re.compile(r"^lockgw/gw/[^/]+/alarms$"), "alarm"),
    (re.compile(r"^lockgw/gw/[^/]+/updates/[^/]+/progress$"), "progress"),
    (re.compile(r"^lockgw/gw/[^/]+/registrations$"), "registration"),
    (re.compile(r"^lockgw/gw/[^/]+/responses$"), "response"),
)
COMMAND_TOPIC: Final = re.compile(r"^lockgw/(gw/[^/]+|fleet)/commands$")
NO_DELAY: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
"""Test clients wait for answers one by one; Nagle's algorithm would add 40 ms to each."""


async def eventually(
    condition: Callable[[], bool], what: str, within: float = WAIT, poll: float = 0.01
) -> None:
    """Wait until ``condition()`` holds; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(poll)


# ---------------------------------------------------------------------------- observer


@dataclass(frozen=True)
class Seen:
    """One message an observer received, decoded (None for command payloads)."""

    topic: str
    payload: bytes
    retain: bool
    body: dict[str, Any] | None


class Observer:
    """A client of the test: subscribes, records and schema-checks every message.

    With ``reconnect`` it comes back after the broker restarts (``ready`` is set again
    once it has re-subscribed), so that it can witness what the gateway re-sends.
    """

    def __init__(
        self,
        broker: Mosquitto,
        schemas: Schemas,
        *,
        topics: Iterable[str] = ("lockgw/#",),
        protocol: str = "5",
        tls_context: ssl.SSLContext | None = None,
        reconnect: bool = False,
    ) -> None:
        self.broker = broker
        self.schemas = schemas
        self.topics = tuple(topics)
        self.protocol = (
            aiomqtt.ProtocolVersion.V5 if protocol == "5" else aiomqtt.ProtocolVersion.V311
        )
        self.tls_context = tls_context
        self.reconnect = reconnect
        self.seen: list[Seen] = []
        self.errors: list[str] = []
        self.ready = asyncio.Event()
        self.client: aiomqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        await self.wait_ready()
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert not self.errors, self.errors

    async def wait_ready(self) -> None:
        """Wait until subscribed (again)."""
        try:
            async with asyncio.timeout(WAIT):
                await self.ready.wait()
        except TimeoutError:
            pytest.fail(f"observer could not subscribe to {self.broker}")

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    self.broker.host,
                    self.broker.port,
                    protocol=self.protocol,
                    tls_context=self.tls_context,
                    timeout=5,
                    socket_options=[NO_DELAY],
                ) as client:
                    for topic in self.topics:
                        await client.subscribe(topic, qos=1)
                    self.client = client
                    self.ready.set()
                    async for message in client.messages:
                        self._record(message)
            except aiomqtt.MqttError:
                self.client = None
                self.ready.clear()
                if not self.reconnect:
                    raise
                await asyncio.sleep(0.01)

    def _record(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else b""
        body: dict[str, Any] | None = None
        if not COMMAND_TOPIC.match(topic) and payload:
            for pattern, schema in SCHEMA_FOR_TOPIC:
                if pattern.match(topic):
                    try:
                        body = self.schemas.validate(schema, payload)
                    except (AssertionError, ValueError) as exc:
                        self.errors.append(f"{topic}: {exc}")
                    break
            else:
                self.errors.append(f"{topic}: no schema for this topic")
        self.seen.append(Seen(topic, payload, bool(message.retain), body))

    def bodies(self, topic: str) -> list[dict[str, Any]]:
        """Decoded payloads seen on ``topic``, in order."""
        return [seen.body for seen in self.seen if seen.topic == topic and seen.body is not None]

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish as this client (commands of the test registry)."""
        await eventually(lambda: self.client is not None, "the observer's connection")
        assert self.client is not None
        await self.client.publish(topic, payload, qos=qos)


def client_tls(files: TlsFiles, *, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(files.ca_cert))
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


# ------------------------------------------------------------------------------ bridge


@dataclass
class Handler:
    """The command handler of the tests: records calls and answers as told."""

    answer: Callable[[Command], Awaitable[dict[str, Any]]] | None = None
    calls: list[Command] = field(default_factory=list)

    async def __call__(self, command: Command) -> dict[str, Any]:
        self.calls.append(command)
        if self.answer is not None:
            return await self.answer(command)
        return {"op": command.op, "args": sent_args(command)}


def sent_args(command: Command) -> dict[str, Any]:
    """The command's arguments under the keys the registry sent them with."""
    args = asdict(command.args)
    if isinstance(command.args, PullLogsArgs):
        args["from"], args["to"] = args.pop("time_from"), args.pop("time_to")
    return args


class Bridges:
    """Starts bridges over the test's store; every one still running is stopped at the end."""

    def __init__(self, gateway_store: GatewayStore, registry: Registry) -> None:
        self.gateway_store = gateway_store
        self.registry = registry
        self.tasks: dict[MqttBridge, asyncio.Task[None]] = {}

    async def start(
        self,
        broker: Mosquitto,
        *,
        handler: Handler | None = None,
        verifier: CommandVerifier | None = None,
        store: Store | None = None,
        wait: bool = True,
        **settings: Any,
    ) -> MqttBridge:
        """A running bridge to ``broker``; connected, unless ``wait`` is False."""
        options: dict[str, Any] = {
            "host": broker.host,
            "port": broker.port,
            "gateway_id": GATEWAY_ID,
            "reconnect_min": 0.05,
            "reconnect_max": 0.2,
            "ack_timeout": 5.0,
            "keepalive": 5,
        }
        options.update(settings)
        if verifier is None:
            verifier = CommandVerifier(
                self.registry.authority.public_key(), GATEWAY_ID, self.gateway_store.remember
            )
        bridge = MqttBridge(
            MqttSettings(**options),
            self.gateway_store.worker,
            store or self.gateway_store.store,
            verifier,
            handler or Handler(),
        )
        task = asyncio.create_task(bridge.run())
        self.tasks[bridge] = task
        if wait:
            await eventually(lambda: bridge.connected or task.done(), "the bridge to connect")
            if task.done():
                task.result()  # raises what stopped it
        return bridge

    async def stop(self, bridge: MqttBridge) -> None:
        """Cancel the bridge, as the daemon does at shutdown, and wait for it."""
        task = self.tasks.pop(bridge)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def bridges(gateway_store: GatewayStore, registry: Registry) -> AsyncIterator[Bridges]:
    """The test's bridges, stopped cleanly at the end."""
    running = Bridges(gateway_store, registry)
    yield running
    for bridge in list(running.tasks):
        await running.stop(bridge)


def outbox_depth(gateway_store: GatewayStore) -> Callable[[], Awaitable[int]]:
    return lambda: gateway_store.worker.run(gateway_store.store.outbox_depth)


# ------------------------------------------------------------------------ payloads


def events_payload(batch: Batch) -> bytes:
    """An events message as the log pipeline writes it, leaving message_id to the bridge."""
    body = {
        "message_id": None,
        "gateway": GATEWAY_ID,
        "device_id": DEVICE_HEX,
        "events": [
            {
                "sequence": record.sequence,
                "time": record.time,
                "event": record.event.name,
                "reason": record.reason.name,
                "key_id": record.key_id,
                "payload": record.payload.hex(),
            }
            for record in batch.records
        ],
        "raw": {
            "start_sequence": batch.start_sequence,
            "start_head": batch.start_head.hex(),
            "records": batch.raw_records.hex(),
            "checkpoint": batch.checkpoint.hex(),
        },
    }
    return json.dumps(body).encode()


def alarm_message(number: int) -> OutboxMessage:
    body = {
        "message_id": None,
        "gateway": GATEWAY_ID,
        "device_id": DEVICE_HEX,
        "alarm": "battery_low" if number % 2 else "tamper",
        "detail": {"number": number},
        "time": time.time(),
    }
    return OutboxMessage(topic=TOPICS.alarms, payload=json.dumps(body).encode(), kind="alarm")


def registration_message() -> OutboxMessage:
    device = device_record()
    body = {
        "message_id": None,
        "gateway": GATEWAY_ID,
        "action": "registered",
        "device_id": DEVICE_HEX,
        "kind": "door_lock",
        "signing_key": device.signing_key.hex(),
        "noise_key": device.noise_key.hex(),
        "site_id": device.site_id,
        "work_order": "WO-1",
        "consent_reference": "CR-1",
        "time": time.time(),
    }
    return OutboxMessage(
        topic=TOPICS.registrations, payload=json.dumps(body).encode(), kind="registration"
    )


def progress_message(update_id: str, state: str) -> OutboxMessage:
    body = {
        "update_id": update_id,
        "gateway": GATEWAY_ID,
        "devices": {DEVICE_HEX: {"state": state, "error_code": None, "version": 43}},
        "summary": {
            "applied": int(state == "applied"),
            "pending": int(state == "pending"),
            "failed": 0,
            "unreachable": 0,
        },
    }
    return OutboxMessage(
        topic=TOPICS.update_progress(update_id),
        payload=json.dumps(body).encode(),
        kind="progress",
        retain=True,
    )


def state_payload(battery: int) -> bytes:
    body = {
        "gateway": GATEWAY_ID,
        "device_id": DEVICE_HEX,
        "kind": "door_lock",
        "site_id": 7,
        "battery": battery,
        "door": "closed",
        "lock": "locked",
        "alarms": ["battery_low"] if battery < 20 else [],
        "access_version": 3,
        "revocation_version": 1,
        "last_heard": time.time(),
        "reachable": True,
    }
    return json.dumps(body).encode()


def message_ids(observer: Observer) -> list[str]:
    assert not observer.errors, observer.errors  # fail at once on a schema violation
    return [
        seen.body["message_id"]
        for seen in observer.seen
        if seen.body is not None and "message_id" in seen.body
    ]


# ------------------------------------------------------------------------- unit level


def test_backoff_is_jittered_and_bounded() -> None:
    rng = random.Random(7)
    for attempt in range(1, 12):
        delays = [backoff_delay(attempt, 0.5, 30.0, rng) for _ in range(200)]
        assert min(delays) >= 0.5
        assert max(delays) <= min(30.0, 0.5 * 2**attempt)
        assert len(set(delays)) > 100  # jittered, not a fixed step
    assert backoff_delay(1_000_000, 0.5, 30.0, rng) <= 30.0


def test_settings_refuse_what_would_break_the_topic_tree() -> None:
    for bad in ("gw/1", "gw+", "#", "", "*"):
        with pytest.raises(ValueError, match="gateway_id"):
            MqttSettings(host="h", gateway_id=bad)
    with pytest.raises(ValueError, match="prefix"):
        MqttSettings(host="h", gateway_id="gw-1", prefix="$SYS")
    with pytest.raises(ValueError, match="reconnect"):
        MqttSettings(host="h", gateway_id="gw-1", reconnect_min=5, reconnect_max=1)
    with pytest.raises(ValueError, match="cert_file"):
        MqttTls(cert_file=Path("c.pem"))
    settings = MqttSettings(host="h", gateway_id="gw-1", password="secret")  # noqa: S106 - a test value
    assert "secret" not in repr(settings)
    assert settings.effective_client_id == "lockgw-gw-1"


def test_status_and_response_payloads_match_their_schemas(schemas: Schemas) -> None:
    schemas.validate("status", status_payload("online", GATEWAY_ID, 1.5))
    schemas.validate("status", status_payload("offline", GATEWAY_ID, 2.5))
    ok = schemas.validate("response", response_payload("c-1", GATEWAY_ID, "get_state", result={}))
    assert (ok["status"], ok["error"]) == ("ok", None)
    error = CommandError("expired", "command expired")
    refused = schemas.validate("response", response_payload(None, GATEWAY_ID, None, error=error))
    assert refused["error"] == {"code": "expired", "message": "command expired"}


# ------------------------------------------------------------------------------- outbox


async def test_the_outbox_is_drained_in_order_and_deleted_only_after_puback(
    mosquitto: Mosquitto,
    schemas: Schemas,
    gateway_store: GatewayStore,
    bridges: Bridges,
) -> None:
    store = gateway_store.store
    store.upsert_device(device_record())
    depth = outbox_depth(gateway_store)
    async with Observer(mosquitto, schemas) as observer:
        bridge = await bridges.start(mosquitto, publish_batch=7)
        await eventually(lambda: bool(observer.bodies(TOPICS.status)), "the online status")

        # Freeze the broker: the bridge sends, but no PUBACK comes back.
        mosquitto.pause()
        head = chain_genesis(DEVICE_ID)
        batches: list[Batch] = []
        for start in range(0, 40, 10):
            batch = build_batch(start_sequence=start, start_head=head, count=10)
            head = batch.head
            batches.append(batch)
            await gateway_store.worker.run(
                store.commit_batch,
                DEVICE_ID,
                start_sequence=batch.start_sequence,
                start_head=batch.start_head,
                checkpoint=batch.checkpoint,
                raw_records=batch.raw_records,
                records=batch.records,
                new_next_sequence=batch.next_sequence,
                new_head=batch.head,
                outbox=[
                    OutboxMessage(
                        topic=TOPICS.device_events(DEVICE_HEX),
                        payload=events_payload(batch),
                        kind="events",
                        event_sequences=batch.sequences,
                    )
                ],
                received_at=time.time(),
            )
        others = [alarm_message(n) for n in range(5)]
        others += [registration_message(), progress_message("rev-1", "applied")]
        await gateway_store.worker.run(store.enqueue, others, now=time.time())
        total = len(batches) + len(others)
        bridge.notify_outbox()
        await eventually(lambda: bridge.counters.published >= 8, "publishes to the frozen broker")
        await asyncio.sleep(0.3)
        assert await depth() == total  # sent, not acknowledged: nothing deleted
        acked_before = bridge.counters.acked
        events = await gateway_store.worker.run(store.events_for, DEVICE_ID)
        assert all(event.published_at is None for event in events)

        mosquitto.resume()
        with_ids = total - 1  # progress is state, not an event: it has no message_id
        await eventually(lambda: len(message_ids(observer)) >= with_ids, "every outbox message")
        await eventually_async(depth, 0, "an empty outbox")
        assert bridge.counters.acked >= acked_before + total
        progress = TOPICS.update_progress("rev-1")
        await eventually(lambda: bool(observer.bodies(progress)), "the progress message")

        # In id order, each with the id the bridge filled in, none twice (no outage here).
        ids = message_ids(observer)
        numbers = [int(message_id.split(":")[1]) for message_id in ids]
        assert all(message_id.startswith(f"{GATEWAY_ID}:") for message_id in ids)
        assert numbers == sorted(numbers)
        assert len(set(numbers)) == with_ids
        # The events carried are now marked published.
        events = await gateway_store.worker.run(store.events_for, DEVICE_ID)
        assert len(events) == 40
        assert all(event.published_at is not None for event in events)
        # The retained progress message is retained for newcomers.
    async with Observer(mosquitto, schemas, topics=[TOPICS.update_progress("rev-1")]) as newcomer:
        await eventually(lambda: bool(newcomer.seen), "the retained progress")
        assert newcomer.seen[0].retain


async def eventually_async(
    probe: Callable[[], Awaitable[int]], expected: int, what: str, within: float = WAIT
) -> None:
    """Like :func:`eventually`, for a value read through the store's worker."""
    deadline = time.monotonic() + within
    while (value := await probe()) != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}: {value} != {expected}")
        await asyncio.sleep(0.02)


class GatedStore(Store):
    """A real store whose ``outbox_done`` can be held by the test (on the worker thread).

    While the gate is closed, the drain stops after the broker acknowledged a batch and
    before the rows are deleted: the moment the test needs to stop the broker knowing
    that everything the broker has acknowledged also reached the observer. (Messages a
    broker without persistence acknowledged and then lost in its own crash are the
    broker's loss, and no gateway can tell.)
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        super().__init__(connection)
        self.gate = threading.Event()
        self.gate.set()
        self.held = threading.Event()

    def outbox_done(self, ids: Sequence[int], now: float) -> int:
        """Delete acknowledged rows, once the gate is open."""
        if not self.gate.is_set():
            self.held.set()
            self.gate.wait(timeout=WAIT)
        return super().outbox_done(ids, now)


async def test_a_broker_outage_loses_nothing(
    tmp_path: Path,
    mosquitto: Mosquitto,
    schemas: Schemas,
    gateway_store: GatewayStore,
    bridges: Bridges,
) -> None:
    total = 600
    store = GatedStore.open(tmp_path / "gated.db")
    assert isinstance(store, GatedStore)  # Store.open builds the class it is called on
    try:
        messages = [alarm_message(n) for n in range(total)]
        await gateway_store.worker.run(store.enqueue, messages, now=time.time())

        async def depth() -> int:
            return await gateway_store.worker.run(store.outbox_depth)

        async with Observer(mosquitto, schemas, reconnect=True) as observer:
            # Backoff fixed at 0.3 s: after a failed attempt the test has that long to
            # restart the broker and re-subscribe before the bridge is back.
            bridge = await bridges.start(
                mosquitto, store=store, publish_batch=10, reconnect_min=0.3, reconnect_max=0.3
            )
            await eventually(lambda: len(message_ids(observer)) >= 50, "the drain under way")
            store.gate.clear()
            await eventually(store.held.is_set, "the drain to hold after a batch")
            # Everything the broker acknowledged (but the online status) has arrived.
            await eventually(
                lambda: len(set(message_ids(observer))) == bridge.counters.acked - 1,
                "the acknowledged messages at the observer",
            )
            mosquitto.stop()
            store.gate.set()
            await eventually(lambda: not bridge.connected, "the bridge to notice")
            left = await depth()
            assert 0 < left < total, "the broker must stop mid-drain"

            failures = bridge.counters.connect_failures
            await eventually(
                lambda: bridge.counters.connect_failures >= failures + 2,
                "attempts during the outage",
            )
            failed = bridge.counters.connect_failures
            await eventually(
                lambda: bridge.counters.connect_failures > failed, "a failed attempt", poll=0.002
            )
            mosquitto.start()  # the same port
            await observer.wait_ready()
            await eventually(lambda: bridge.connected, "the bridge to reconnect")
            await eventually_async(depth, 0, "an empty outbox")
            await eventually(
                lambda: len(set(message_ids(observer))) >= total, "every message after the outage"
            )
    finally:
        store.close()
    ids = message_ids(observer)
    assert set(ids) == {f"{GATEWAY_ID}:{number}" for number in range(1, total + 1)}
    # Duplicates only by message_id: a repeat carries the same content.
    first: dict[str, bytes] = {}
    for seen in observer.seen:
        if seen.body is not None and "message_id" in seen.body:
            assert first.setdefault(seen.body["message_id"], seen.payload) == seen.payload
    assert bridge.counters.reconnects == 1
    # The restarted broker (no persistence) learnt the online status again.
    assert observer.bodies(TOPICS.status)[-1]["state"] == "online"


async def test_messages_in_flight_when_the_broker_dies_are_sent_again(
    mosquitto: Mosquitto, schemas: Schemas, gateway_store: GatewayStore, bridges: Bridges
) -> None:
    bridge = await bridges.start(mosquitto, reconnect_min=0.2, reconnect_max=0.2)
    async with Observer(mosquitto, schemas, reconnect=True) as observer:
        mosquitto.pause()
        messages = [alarm_message(n) for n in range(20)]
        await gateway_store.worker.run(gateway_store.store.enqueue, messages, now=time.time())
        bridge.notify_outbox()
        await eventually(lambda: bridge.counters.published >= 21, "publishes in flight")
        mosquitto.kill()  # frozen: it never acknowledged, never forwarded
        assert await outbox_depth(gateway_store)() == 20
        await eventually(lambda: not bridge.connected, "the bridge to notice")
        mosquitto.start()
        await observer.wait_ready()
        await eventually(lambda: len(set(message_ids(observer))) >= 20, "every message")
        await eventually_async(outbox_depth(gateway_store), 0, "an empty outbox")


ACL: Final = f"""\
topic read lockgw/#
topic write lockgw/gw/{GATEWAY_ID}/status
topic write lockgw/gw/{GATEWAY_ID}/responses
topic write lockgw/gw/{GATEWAY_ID}/devices/#
"""
"""Anonymous clients may read everything, but the gateway may not publish alarms."""


async def test_a_message_the_broker_refuses_stays_in_the_outbox(
    tmp_path: Path, schemas: Schemas, gateway_store: GatewayStore, bridges: Bridges
) -> None:
    broker = Mosquitto(tmp_path / "acl-broker", acl=ACL)
    broker.start()
    try:
        state = OutboxMessage(
            topic=TOPICS.device_state(DEVICE_HEX), payload=state_payload(50), kind="state"
        )
        await gateway_store.worker.run(
            gateway_store.store.enqueue, [alarm_message(1), state], now=time.time()
        )
        async with Observer(broker, schemas) as observer:
            bridge = await bridges.start(broker, protocol="5", reconnect_max=0.1)
            await eventually(lambda: bridge.counters.refused >= 3, "refusals, retried")
            # The allowed message went through; the refused one is kept, not lost.
            assert observer.bodies(TOPICS.device_state(DEVICE_HEX))
            assert not observer.bodies(TOPICS.alarms)
            (left,) = await gateway_store.worker.run(gateway_store.store.outbox_peek, 10)
            assert left.kind == "alarm"
            assert bridge.connected
            assert bridge.counters.reconnects == 0
    finally:
        broker.stop()


async def test_an_unpublishable_outbox_row_does_not_block_the_rest(
    mosquitto: Mosquitto, schemas: Schemas, gateway_store: GatewayStore, bridges: Bridges
) -> None:
    broken = OutboxMessage(topic=f"{TOPICS.base}/devices/+/state", payload=b"{}", kind="bug")
    messages = [alarm_message(1), broken, alarm_message(2)]
    await gateway_store.worker.run(gateway_store.store.enqueue, messages, now=time.time())
    async with Observer(mosquitto, schemas) as observer:
        bridge = await bridges.start(mosquitto)
        await eventually(lambda: len(message_ids(observer)) >= 2, "the good rows")
        (left,) = await gateway_store.worker.run(gateway_store.store.outbox_peek, 10)
        assert left.kind == "bug"  # kept for inspection
        assert bridge.counters.unpublishable == 1
        assert bridge.connected


async def test_retained_state_is_republished_after_a_broker_restart(
    mosquitto: Mosquitto, schemas: Schemas, bridges: Bridges
) -> None:
    bridge = await bridges.start(mosquitto)
    topic = TOPICS.device_state(DEVICE_HEX)
    assert await bridge.publish_retained(topic, state_payload(80))
    assert await bridge.publish_retained(topic, state_payload(15))
    with pytest.raises(ValueError, match="not a topic of this gateway"):
        await bridge.publish_retained("lockgw/gw/other/devices/x/state", b"{}")
    mosquitto.stop()
    await eventually(lambda: not bridge.connected, "the bridge to notice")
    mosquitto.start()
    await eventually(lambda: bridge.connected, "the bridge to reconnect")
    async with Observer(mosquitto, schemas, topics=[topic, TOPICS.status]) as newcomer:
        await eventually(lambda: len(newcomer.seen) >= 2, "retained state and status")
        state = newcomer.bodies(topic)
        assert [body["battery"] for body in state] == [15]  # the latest only
        assert all(seen.retain for seen in newcomer.seen)
        assert newcomer.bodies(TOPICS.status)[0]["state"] == "online"


# ------------------------------------------------------------------- status and will


async def test_online_is_retained_and_a_clean_shutdown_says_offline(
    mosquitto: Mosquitto, schemas: Schemas, bridges: Bridges
) -> None:
    bridge = await bridges.start(mosquitto)
    async with Observer(mosquitto, schemas, topics=[TOPICS.status]) as observer:
        await eventually(lambda: bool(observer.seen), "the retained status")
        assert observer.seen[0].retain
        online = observer.bodies(TOPICS.status)[0]
        assert online["state"] == "online"
        assert online["gateway"] == GATEWAY_ID

        await bridges.stop(bridge)
        assert not bridge.connected
        await eventually(lambda: len(observer.seen) >= 2, "the offline status")
        offline = observer.bodies(TOPICS.status)[1]
        assert offline["state"] == "offline"
        assert offline["since"] >= online["since"]
        await asyncio.sleep(0.2)
        assert len(observer.seen) == 2  # a clean disconnect: no last will on top
    async with Observer(mosquitto, schemas, topics=[TOPICS.status]) as newcomer:
        await eventually(lambda: bool(newcomer.seen), "the retained status")
        assert newcomer.seen[0].retain
        assert newcomer.bodies(TOPICS.status)[0]["state"] == "offline"
    assert "disconnected" in mosquitto.log_text()


async def test_the_last_will_reports_a_lost_connection(
    mosquitto: Mosquitto, schemas: Schemas, bridges: Bridges
) -> None:
    # Backoff of 1 s: long enough to look at the retained will before the bridge returns.
    bridge = await bridges.start(mosquitto, reconnect_min=1.0, reconnect_max=1.0)
    async with Observer(mosquitto, schemas, topics=[TOPICS.status]) as observer:
        await eventually(lambda: bool(observer.seen), "the online status")
        client = bridge._client
        assert client is not None
        sock = client._client.socket()
        assert isinstance(sock, socket.socket)
        # Kill the TCP connection under the client: no DISCONNECT reaches the broker.
        sock.shutdown(socket.SHUT_RDWR)
        await eventually(lambda: len(observer.seen) >= 2, "the last will")
        will = observer.bodies(TOPICS.status)[1]
        assert will["state"] == "offline"
        async with Observer(mosquitto, schemas, topics=[TOPICS.status]) as newcomer:
            await eventually(lambda: bool(newcomer.seen), "the retained will")
            assert newcomer.seen[0].retain
            assert newcomer.bodies(TOPICS.status)[0]["state"] == "offline"
        await eventually(lambda: len(observer.seen) >= 3, "the bridge to come back")
        assert observer.bodies(TOPICS.status)[2]["state"] == "online"
    assert bridge.counters.reconnects == 1


# ----------------------------------------------------------------------------- commands


class Requester(Observer):
    """The registry's side: sends commands, collects responses."""

    async def ask(self, payload: bytes, *, fleet: bool = False, qos: int = 1) -> dict[str, Any]:
        """Send a command and return the next response."""
        before = len(self.bodies(TOPICS.responses))
        await self.publish(TOPICS.fleet_commands if fleet else TOPICS.commands, payload, qos)
        await eventually(
            lambda: len(self.bodies(TOPICS.responses)) > before, "the response to a command"
        )
        return self.bodies(TOPICS.responses)[before]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_a_valid_command_gets_the_handlers_result(
    protocol: str,
    mosquitto: Mosquitto,
    schemas: Schemas,
    registry: Registry,
    bridges: Bridges,
) -> None:
    handler = Handler()
    bridge = await bridges.start(mosquitto, handler=handler, protocol=protocol)
    async with Requester(
        mosquitto, schemas, topics=[TOPICS.responses], protocol=protocol
    ) as requester:
        claims = registry.claims("pull_logs", {"device_id": DEVICE_HEX, "from": 3, "to": 9})
        response = await requester.ask(registry.sign(claims))
        assert response == {
            "id": claims["id"],
            "gateway": GATEWAY_ID,
            "op": "pull_logs",
            "status": "ok",
            "result": {
                "op": "pull_logs",
                "args": {"device_id": DEVICE_HEX, "from": 3, "to": 9},
            },
            "error": None,
        }
        fleet = await requester.ask(
            registry.command("revoke", REVOKE_ARGS, gateway="*"), fleet=True
        )
        assert fleet["status"] == "ok"
    assert [command.op for command in handler.calls] == ["pull_logs", "revoke"]
    assert bridge.counters.commands_ok == 2
    assert bridge.connected


async def test_every_refusal_is_answered_and_executes_nothing(
    mosquitto: Mosquitto,
    schemas: Schemas,
    registry: Registry,
    gateway_store: GatewayStore,
    bridges: Bridges,
) -> None:
    handler = Handler()
    bridge = await bridges.start(mosquitto, handler=handler)
    async with Requester(mosquitto, schemas, topics=[TOPICS.responses]) as requester:
        for case, (forge, code) in sorted(REFUSALS.items()):
            response = await requester.ask(forge(registry))
            assert (response["status"], response["error"]["code"]) == ("error", code), case
            assert response["result"] is None
            assert bridge.connected, case
        # The fleet topic takes only commands for every gateway.
        addressed = await requester.ask(registry.command("revoke", REVOKE_ARGS), fleet=True)
        assert addressed["error"]["code"] == "wrong_gateway"
        assert handler.calls == []

        # A replay: accepted once, refused after, also by a restarted gateway.
        payload = registry.command("get_state", {"device_id": DEVICE_HEX})
        assert (await requester.ask(payload))["status"] == "ok"
        assert (await requester.ask(payload))["error"]["code"] == "replayed"
        assert len(handler.calls) == 1
    refused = bridge.counters.commands_refused
    assert refused["malformed"] >= 10
    assert refused["bad_signature"] >= 3
    assert refused["replayed"] == 1

    # Restart: a new verifier and bridge over the store reopened from disk.
    await bridges.stop(bridge)
    with Store.open(gateway_store.path) as reopened:

        async def remember(jti: str, expires_at: float, now: float) -> bool:
            return await gateway_store.worker.run(reopened.remember_command, jti, expires_at, now)

        verifier = CommandVerifier(registry.authority.public_key(), GATEWAY_ID, remember)
        restarted = await bridges.start(mosquitto, handler=handler, verifier=verifier)
        async with Requester(mosquitto, schemas, topics=[TOPICS.responses]) as requester:
            assert (await requester.ask(payload))["error"]["code"] == "replayed"
        assert restarted.counters.commands_refused == {"replayed": 1}
        await bridges.stop(restarted)
    assert len(handler.calls) == 1


async def test_handler_failures_are_typed_responses_and_the_bridge_stays_up(
    mosquitto: Mosquitto, schemas: Schemas, registry: Registry, bridges: Bridges
) -> None:
    async def answer(command: Command) -> dict[str, Any]:
        match getattr(command.args, "device_id", None):
            case "0000000000000001":
                code, message = "unknown_device", "no such device"
                raise CommandError(code, message)
            case "0000000000000002":
                message = "a bug in the handler"
                raise RuntimeError(message)
            case "0000000000000003":
                await asyncio.sleep(5)
            case "0000000000000004":
                return "not a dict"  # type: ignore[return-value]  # a broken handler, on purpose
            case "0000000000000005":
                return {"export": "x" * MAX_RESPONSE_SIZE}  # e.g. a pull over a year
        return {"fine": True}

    handler = Handler(answer)
    bridge = await bridges.start(mosquitto, handler=handler, command_timeout=0.3)
    async with Requester(mosquitto, schemas, topics=[TOPICS.responses]) as requester:
        codes = []
        for device in ("0000000000000001", "0000000000000002", "0000000000000003"):
            response = await requester.ask(registry.command("get_state", {"device_id": device}))
            codes.append(response["error"]["code"])
        for device in ("0000000000000004", "0000000000000005"):
            response = await requester.ask(registry.command("get_state", {"device_id": device}))
            codes.append(response["error"]["code"])
        assert codes == ["unknown_device", "internal", "timeout", "internal", "response_too_large"]
        # The internal error tells nothing of the bug.
        assert "bug" not in json.dumps(requester.bodies(TOPICS.responses))
        ok = await requester.ask(registry.command())
        assert ok["result"] == {"fine": True}
    assert bridge.connected
    assert bridge.counters.commands_ok == 1


async def test_a_flood_of_garbage_is_answered_with_bounded_memory(
    mosquitto: Mosquitto, schemas: Schemas, registry: Registry, bridges: Bridges
) -> None:
    flood, queue_bound, running = 500, 20, 4
    handler = Handler()
    bridge = await bridges.start(
        mosquitto,
        handler=handler,
        receive_maximum=10,
        max_queued_commands=queue_bound,
        max_concurrent_commands=running,
    )
    rng = random.Random(5)
    async with Requester(mosquitto, schemas, topics=[TOPICS.responses]) as requester:
        client = requester.client
        assert client is not None
        for _ in range(flood):
            garbage = rng.randbytes(rng.randint(0, 300))
            await client.publish(TOPICS.commands, garbage, qos=1)
        await eventually(
            lambda: len(requester.bodies(TOPICS.responses)) >= flood, "every garbage answered"
        )
        responses = requester.bodies(TOPICS.responses)
        assert len(responses) == flood
        # Read and refused, or (beyond the queue's bound) refused unread; never dropped.
        assert {r["error"]["code"] for r in responses} <= {"malformed", "busy"}
        assert all(r["id"] is None for r in responses)
        # Mosquitto 2.0.11 does not keep to our Receive Maximum once we acknowledge, so
        # the bound that holds is the gateway's own: its queue plus what is running.
        assert bridge.counters.command_backlog_max <= queue_bound + running
        assert bridge._client is not None
        assert len(bridge._client.messages) == 0
        ok = await requester.ask(registry.command())
        assert ok["status"] == "ok"
    assert bridge.connected
    refused = bridge.counters.commands_refused
    assert refused["malformed"] + refused["busy"] == flood
    assert len(handler.calls) == 1


async def test_commands_beyond_the_queue_bound_are_answered_busy(
    mosquitto: Mosquitto, schemas: Schemas, registry: Registry, bridges: Bridges
) -> None:
    release = asyncio.Event()

    async def answer(command: Command) -> dict[str, Any]:
        await release.wait()
        return {"op": command.op}

    sent, queue_bound = 30, 5
    bridge = await bridges.start(
        mosquitto,
        handler=Handler(answer),
        max_concurrent_commands=1,
        max_queued_commands=queue_bound,
        receive_maximum=10,
    )
    async with Requester(mosquitto, schemas, topics=[TOPICS.responses]) as requester:
        for _ in range(sent):
            await requester.publish(TOPICS.commands, registry.command())
        # One runs (blocked), five wait; the rest is answered busy at once, unread.
        await eventually(
            lambda: len(requester.bodies(TOPICS.responses)) >= sent - 1 - queue_bound,
            "the busy answers",
        )
        assert bridge.counters.command_backlog_max <= 1 + queue_bound
        release.set()
        await eventually(lambda: len(requester.bodies(TOPICS.responses)) >= sent, "all answers")
        responses = requester.bodies(TOPICS.responses)
    statuses = [(r["status"], r["error"] and r["error"]["code"]) for r in responses]
    assert statuses.count(("ok", None)) == 1 + queue_bound
    assert statuses.count(("error", "busy")) == sent - 1 - queue_bound
    assert bridge.connected


async def test_the_response_of_an_executed_command_survives_a_connection_loss(
    mosquitto: Mosquitto,
    schemas: Schemas,
    registry: Registry,
    gateway_store: GatewayStore,
    bridges: Bridges,
) -> None:
    release = asyncio.Event()

    async def answer(command: Command) -> dict[str, Any]:
        await release.wait()
        return {"done": command.op}

    bridge = await bridges.start(mosquitto, handler=Handler(answer))
    async with Requester(mosquitto, schemas, topics=[TOPICS.responses]) as requester:
        claims = registry.claims("time_sync", {"device_id": DEVICE_HEX})
        await requester.publish(TOPICS.commands, registry.sign(claims))
        await eventually(lambda: bridge._in_progress == 1, "the command to run")
        client = bridge._client
        assert client is not None
        sock = client._client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)
        await eventually(lambda: not bridge.connected, "the connection loss")
        release.set()  # the command finishes while the gateway is offline
        await eventually(lambda: bool(requester.bodies(TOPICS.responses)), "the stored response")
        (response,) = requester.bodies(TOPICS.responses)
        assert (response["id"], response["result"]) == (claims["id"], {"done": "time_sync"})
    await eventually_async(outbox_depth(gateway_store), 0, "an empty outbox")


# ----------------------------------------------------------------------------------- TLS


async def test_tls_with_a_client_certificate(
    mosquitto_tls: Mosquitto,
    tls_files: TlsFiles,
    schemas: Schemas,
    registry: Registry,
    bridges: Bridges,
) -> None:
    tls = MqttTls(
        ca_file=tls_files.ca_cert, cert_file=tls_files.client_cert, key_file=tls_files.client_key
    )
    bridge = await bridges.start(mosquitto_tls, tls=tls)
    context = client_tls(tls_files, cert=tls_files.client_cert, key=tls_files.client_key)
    async with Requester(
        mosquitto_tls, schemas, topics=[TOPICS.status, TOPICS.responses], tls_context=context
    ) as requester:
        await eventually(lambda: bool(requester.bodies(TOPICS.status)), "the status over TLS")
        assert requester.bodies(TOPICS.status)[0]["state"] == "online"
        assert (await requester.ask(registry.command()))["status"] == "ok"
    assert bridge.connected
    assert f"u'{GATEWAY_ID}'" in mosquitto_tls.log_text()  # the certificate's name


async def test_tls_refuses_plain_tcp_and_foreign_certificates(
    mosquitto_tls: Mosquitto, tls_files: TlsFiles, bridges: Bridges
) -> None:
    attempts = {
        "plain TCP": None,
        "no client certificate": client_tls(tls_files, cert=None, key=None),
        "certificate of another CA": client_tls(
            tls_files, cert=tls_files.other_client_cert, key=tls_files.other_client_key
        ),
    }
    for name, context in attempts.items():
        # The broker drops these connections during the TLS handshake; aiomqtt then
        # waits for a CONNACK that never comes, hence the short timeout.
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(
                mosquitto_tls.host, mosquitto_tls.port, tls_context=context, timeout=0.5
            ):
                pytest.fail(f"{name}: connected")
    # ...and for the reasons expected, not a slow handshake.
    log = mosquitto_tls.log_text()
    assert "wrong version number" in log  # plain MQTT bytes on a TLS port
    assert "peer did not return a certificate" in log
    assert "certificate verify failed" in log  # the foreign CA
    # The bridge without its certificate keeps trying, and never gets in.
    bridge = await bridges.start(
        mosquitto_tls, tls=MqttTls(ca_file=tls_files.ca_cert), wait=False, ack_timeout=0.5
    )
    await eventually(lambda: bridge.counters.connect_failures >= 2, "refused attempts")
    assert not bridge.connected
