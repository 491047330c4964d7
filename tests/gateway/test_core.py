"""The gateway's own stack over the Bumble virtual radio, against simulated devices.

BumbleRadio, DeviceSession, pairing, the log pipeline, the update service and the
scheduler run exactly as in the daemon, with a real SQLite store; the devices are
VirtualDevices behind Bumble GATT peripherals. No mocks anywhere.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from bumble.transport.common import AsyncPipeSink
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client.parser import text_string_to_metric_families

from gateway.authority import SigningRequest, gateway_signing_request, issue
from gateway.device_session import DeviceError, DeviceSession, DeviceUnavailable, SessionError
from gateway.keys import GatewayCredentials, GatewayKeys
from gateway.metrics import Metrics
from gateway.pairing import WorkOrder, pair_device
from gateway.pipeline import LogPipeline
from gateway.radio.base import RadioError
from gateway.radio.bumble import BumbleRadio
from gateway.scheduler import Scheduler, SchedulerSettings
from gateway.store import PropagationState, Store
from gateway.topics import Topics
from gateway.updates import UpdateService
from gateway.worker import BlockingWorker
from protocols.access import Activation
from protocols.enums import DeviceKind, EventType, Reason
from protocols.envelopes import (
    AccessEntry,
    AuthorisationUpdate,
    RevocationEntry,
    ScheduleWindow,
    Scope,
    Target,
    UpdateKind,
    encode_certificate,
)
from protocols.errors import ErrorCode
from protocols.logrecords import (
    ChainState,
    LogBatch,
    decode_checkpoint,
    decode_record,
    verify_batch,
)
from protocols.messages import DeviceStatus, Status, StatusRequest
from protocols.pairing import LabelPayload, PairingCode
from protocols.session import GatewaySessionConfig, SessionMode
from simulators.node import Fleet, SimulatedDevice
from simulators.radio import ScalableLink, VirtualController

SITE = 42
KEY = 4711
ALWAYS = ScheduleWindow(days=0x7F, start_minute=0, end_minute=1440)


@dataclass
class Gateway:
    radio: BumbleRadio
    store: Store
    reader: Store  # the test's own connection: the store serves one thread at a time
    worker: BlockingWorker
    credentials: GatewayCredentials
    authority: Ed25519PrivateKey
    topics: Topics
    pipeline: LogPipeline
    updates: UpdateService
    metrics: Metrics

    async def pair(
        self, device: SimulatedDevice, *, mtu: int = 247, code: PairingCode | None = None
    ) -> None:
        label = LabelPayload.parse(device.label)
        await pair_device(
            radio=self.radio,
            address=device.address,
            device_id=label.device_id,
            code=code or label.code,
            site_id=SITE,
            order=WorkOrder("WO-1", "consent-77"),
            credentials=self.credentials,
            store=self.store,
            worker=self.worker,
            topics=self.topics,
            mtu=mtu,
            request_timeout=5.0,
        )

    def scheduler(self, **settings: float) -> Scheduler:
        return Scheduler(
            radio=self.radio,
            store=self.store,
            worker=self.worker,
            credentials=self.credentials,
            pipeline=self.pipeline,
            updates=self.updates,
            topics=self.topics,
            metrics=self.metrics,
            settings=SchedulerSettings(
                slots=2,
                connect_timeout=5.0,
                idle_timeout=5.0,
                **settings,  # type: ignore[arg-type]  # test overrides
            ),
        )

    async def session(self, device: SimulatedDevice, *, mtu: int = 247) -> DeviceSession:
        record = await self.worker.run(self.store.get_device, device.device_id)
        assert record is not None
        link = await self.radio.connect(device.address, mtu=mtu, timeout=5.0)
        config = GatewaySessionConfig(
            noise_key=self.credentials.keys.noise_key,
            device_id=record.device_id,
            now=int(time.time()),
            mode=SessionMode.NORMAL,
            certificate=self.credentials.certificate_bytes,
            pinned_signing_key=record.signing_key,
            pinned_noise_key=record.noise_key,
        )
        session = DeviceSession(link, config, timeout=5.0)
        await session.open()
        return session

    async def status(self, device: SimulatedDevice) -> DeviceStatus:
        """One session: open, ask for the status, close."""
        session = await self.session(device)
        try:
            return (await session.request(StatusRequest(), Status)).status
        finally:
            await session.close()

    async def collect(self, device: SimulatedDevice) -> None:
        """One session that collects the device's log into the store."""
        record = await self.worker.run(self.store.get_device, device.device_id)
        assert record is not None
        session = await self.session(device)
        try:
            await self.pipeline.collect(session, record)
        finally:
            await session.close()


def credentials_for(
    authority: Ed25519PrivateKey,
    *,
    not_after_days: int = 30,
    sites: frozenset[int] = frozenset({SITE}),
) -> GatewayCredentials:
    keys = GatewayKeys.generate()
    request = SigningRequest.from_bytes(gateway_signing_request(keys, "gw-test"))
    now = int(time.time())
    certificate = issue(
        authority,
        request,
        scope=Scope(sites=sites),
        not_before=now - 3600,
        validity_days=not_after_days,
    )
    return GatewayCredentials(
        keys, certificate, encode_certificate(certificate), authority.public_key()
    )


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = Fleet(ScalableLink(), advertising_interval=0.02)
    yield fleet
    await fleet.stop()


@pytest.fixture
async def gateway(fleet: Fleet, tmp_path: Path) -> AsyncIterator[Gateway]:
    controller = VirtualController("gateway", link=fleet.link)
    radio = BumbleRadio.from_hci(controller, AsyncPipeSink(controller))
    authority = Ed25519PrivateKey.generate()
    credentials = credentials_for(authority)
    topics = Topics("lockgw", "gw-test")
    metrics = Metrics(version="test")
    async with radio, BlockingWorker("store") as worker:
        store = Store.open(tmp_path / "lockgw.sqlite3")
        reader = Store.open(tmp_path / "lockgw.sqlite3")
        try:
            yield Gateway(
                radio=radio,
                store=store,
                reader=reader,
                worker=worker,
                credentials=credentials,
                authority=authority,
                topics=topics,
                pipeline=LogPipeline(store, worker, topics, batch_size=50, metrics=metrics),
                updates=UpdateService(store, worker, credentials, topics),
                metrics=metrics,
            )
        finally:
            reader.close()
            store.close()
    fleet.link.remove_controller(controller)


async def started(
    fleet: Fleet, kind: DeviceKind = DeviceKind.DOOR_LOCK, count: int = 1
) -> list[SimulatedDevice]:
    devices = fleet.create(kind, count)
    await fleet.start(devices)
    return devices


def outbox_kinds(store: Store) -> list[str]:
    return [row.kind for row in store.outbox_peek(1000)]


async def eventually(check: Callable[[], bool | Awaitable[bool]], *, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        result = check()
        if await result if isinstance(result, Awaitable) else result:
            return
        await asyncio.sleep(0.05)
    msg = "condition not reached in time"
    raise AssertionError(msg)


@pytest.mark.parametrize("mtu", [23, 185, 517])
async def test_pairing_then_collection_over_any_mtu(
    gateway: Gateway, fleet: Fleet, mtu: int
) -> None:
    [lock] = await started(fleet)
    await gateway.pair(lock, mtu=mtu)
    record = gateway.reader.get_device(lock.device_id)
    assert record is not None
    assert record.signing_key == lock.device.identity.signing_public
    assert record.noise_key == lock.device.identity.noise_public
    assert lock.device.paired
    assert lock.device.site_id == SITE
    assert outbox_kinds(gateway.reader) == ["registration"]
    registration = json.loads(gateway.reader.outbox_peek(1)[0].payload)
    assert registration["consent_reference"] == "consent-77"

    for _ in range(60):  # more than one batch of 50
        lock.open_door()
        lock.close_door()
    session = await gateway.session(lock, mtu=mtu)
    try:
        result = await gateway.pipeline.collect(session, record)
    finally:
        await session.close()
    assert result.batches >= 3
    assert result.gaps == 0
    stored = gateway.reader.events_for(lock.device_id, time_from=None, time_to=None)
    assert [row.sequence for row in stored] == list(range(len(stored)))
    assert lock.device.log.waiting == 0  # acknowledged only after the commit
    # What the store holds re-verifies from genesis, as an auditor would check it.
    state = ChainState.genesis(lock.device_id)
    for batch in gateway.reader.batches_for(lock.device_id):
        records = tuple(
            decode_record(batch.raw_records[i : i + 30])
            for i in range(0, len(batch.raw_records), 30)
        )
        state = verify_batch(
            LogBatch(
                batch.start_sequence, batch.start_head, records, decode_checkpoint(batch.checkpoint)
            ),
            device_id=lock.device_id,
            device_key=lock.device.identity.signing_key.public_key(),
            state=state,
        ).state
    assert state.next_sequence == len(stored)
    assert outbox_kinds(gateway.reader).count("events") == result.batches


async def test_wrong_pairing_code_leaves_device_unpaired_and_store_empty(
    gateway: Gateway, fleet: Fleet
) -> None:
    [lock] = await started(fleet)
    with pytest.raises(SessionError) as caught:
        await gateway.pair(lock, code=PairingCode.generate())
    assert caught.value.code is ErrorCode.BAD_PAIRING_CODE
    assert not lock.device.paired
    assert gateway.reader.list_devices() == []
    assert gateway.reader.outbox_depth() == 0


async def test_device_refuses_expired_and_out_of_scope_certificates(
    gateway: Gateway, fleet: Fleet
) -> None:
    [lock] = await started(fleet)
    await gateway.pair(lock)
    for credentials, code in [
        (
            credentials_for(gateway.authority, sites=frozenset({SITE + 1})),
            ErrorCode.CERT_OUT_OF_SCOPE,
        ),
    ]:
        gateway.credentials = credentials
        with pytest.raises(SessionError) as caught:
            await gateway.status(lock)
        assert caught.value.code is code
        assert caught.value.by_peer
    # An expired certificate: the lock judges it by its own clock, a year from now.
    gateway.credentials = credentials_for(gateway.authority)
    lock.device.clock.set(time.time() + 365 * 86400)
    with pytest.raises(SessionError) as caught:
        await gateway.status(lock)
    assert caught.value.code is ErrorCode.CERT_EXPIRED


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({"drop_after_frames": 3}, DeviceUnavailable),
        ({"corrupt_next": 1, "seed": 7}, SessionError),
        ({"truncate_next": 1}, SessionError),
        ({"refuse_connections": True}, (RadioError, DeviceError)),
    ],
    ids=["drop", "corrupt", "truncate", "refuse"],
)
async def test_faults_end_in_typed_errors_and_nothing_is_stored(
    gateway: Gateway,
    fleet: Fleet,
    fault: dict[str, object],
    expected: type[Exception] | tuple[type[Exception], ...],
) -> None:
    [lock] = await started(fleet)
    await gateway.pair(lock)
    for _ in range(20):
        lock.open_door()
    record = gateway.reader.get_device(lock.device_id)
    assert record is not None
    before = gateway.reader.events_for(lock.device_id, time_from=None, time_to=None)
    lock.faults.update(fault)
    with pytest.raises(expected):
        await gateway.collect(lock)
    assert gateway.reader.events_for(lock.device_id, time_from=None, time_to=None) == before
    lock.faults.clear()
    # Afterwards the same device collects cleanly: no corruption was stored.
    await gateway.collect(lock)
    assert lock.device.log.waiting == 0


async def test_slow_device_still_completes(gateway: Gateway, fleet: Fleet) -> None:
    [lock] = await started(fleet)
    await gateway.pair(lock)
    lock.faults.update({"answer_delay": 0.05})
    status = await gateway.status(lock)
    assert status.records_waiting > 0


async def test_scheduler_pushes_revocation_first_and_collects(
    gateway: Gateway, fleet: Fleet
) -> None:
    locks = await started(fleet, count=3)
    for lock in locks:
        await gateway.pair(lock)
    now = int(time.time())
    access = AuthorisationUpdate(
        kind=UpdateKind.ACCESS_FULL,
        target=Target.site(SITE),
        version=1,
        base_version=0,
        issued_at=now - 10,
        expires_at=now + 3600,
        access=(AccessEntry(KEY, now - 100, now + 86400, (ALWAYS,)),),
    )
    assert len(await gateway.updates.submit("access-1", access)) == 3
    scheduler = gateway.scheduler()
    task = asyncio.create_task(scheduler.run())
    try:
        await eventually(
            lambda: all(
                row.state is PropagationState.APPLIED
                for row in gateway.reader.propagation("access-1").values()
            )
        )
        activation = Activation(KEY, now + 3600)
        assert all(lock.present_key(KEY, activation).granted for lock in locks)
        revocation = AuthorisationUpdate(
            kind=UpdateKind.REVOCATION,
            target=Target.fleet(),
            version=1,
            base_version=0,
            issued_at=now - 10,
            expires_at=now + 3600,
            revocations=(RevocationEntry(KEY, now + 90 * 86400),),
        )
        await gateway.updates.submit("revoke-4711", revocation)
        await scheduler.reload()
        await eventually(
            lambda: all(
                row.state is PropagationState.APPLIED
                for row in gateway.reader.propagation("revoke-4711").values()
            )
        )
        for lock in locks:
            decision = lock.present_key(KEY, activation)
            assert not decision.granted
            assert decision.reason is Reason.KEY_REVOKED
            lock.changed()
        # The refusal reaches the store through the adverts' waiting records.
        await eventually(
            lambda: all(
                any(
                    row.event == EventType.ACCESS_DENIED and row.reason == Reason.KEY_REVOKED
                    for row in gateway.reader.events_for(
                        lock.device_id, time_from=None, time_to=None
                    )
                )
                for lock in locks
            )
        )
        progress = [row for row in gateway.reader.outbox_peek(1000) if row.kind == "progress"]
        assert json.loads(progress[-1].payload)["summary"]["applied"] == 3
        samples = {
            (sample.name, sample.labels.get("outcome")): sample.value
            for family in text_string_to_metric_families(gateway.metrics.exposition().decode())
            for sample in family.samples
        }
        assert samples[("lockgw_sessions_total", "ok")] >= 6  # two visits to each lock
        assert samples[("lockgw_log_records_total", None)] > 0
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_unheard_device_is_reported_unreachable_and_catches_up(
    gateway: Gateway, fleet: Fleet
) -> None:
    [lock] = await started(fleet)
    await gateway.pair(lock)
    await lock.stop()  # switched off
    scheduler = gateway.scheduler(unreachable_after=0.5)
    task = asyncio.create_task(scheduler.run())
    try:
        now = int(time.time())
        revocation = AuthorisationUpdate(
            kind=UpdateKind.REVOCATION,
            target=Target.fleet(),
            version=2,
            base_version=0,
            issued_at=now - 10,
            expires_at=now + 3600,
            revocations=(RevocationEntry(KEY, now + 86400),),
        )
        await gateway.updates.submit("revoke-2", revocation)
        await scheduler.reload()
        await eventually(
            lambda: (
                gateway.reader.propagation("revoke-2")[lock.device_id].state
                is PropagationState.UNREACHABLE
            )
        )
        assert "alarm" in outbox_kinds(gateway.reader)
        await lock.start()  # back on: the pending update goes out
        await eventually(
            lambda: (
                gateway.reader.propagation("revoke-2")[lock.device_id].state
                is PropagationState.APPLIED
            )
        )
        assert lock.device.access.revocation_version == 2
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_lock_that_lost_its_time_is_synced_before_the_update(
    gateway: Gateway, fleet: Fleet
) -> None:
    [lock] = await started(fleet)
    await gateway.pair(lock)
    lock.change_battery()  # the clock is unset: it would refuse any update
    lock.changed()
    now = int(time.time())
    revocation = AuthorisationUpdate(
        kind=UpdateKind.REVOCATION,
        target=Target.fleet(),
        version=1,
        base_version=0,
        issued_at=now,
        expires_at=now + 3600,
        revocations=(RevocationEntry(KEY, now + 86400),),
    )
    await gateway.updates.submit("revoke-after-battery", revocation)
    scheduler = gateway.scheduler()
    task = asyncio.create_task(scheduler.run())
    try:
        await eventually(
            lambda: (
                gateway.reader.propagation("revoke-after-battery")[lock.device_id].state
                is PropagationState.APPLIED
            )
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert lock.device.clock.is_set
    alarms = [
        json.loads(row.payload) for row in gateway.reader.outbox_peek(1000) if row.kind == "alarm"
    ]
    assert any(
        alarm["alarm"] == "clock_drift" and not alarm["detail"]["clock_was_set"] for alarm in alarms
    )
