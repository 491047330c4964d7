"""The virtual device model: its answers, its refusals, its log, and its saved state."""

from __future__ import annotations

import io
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocols.access import Activation
from protocols.enums import AlarmFlags, DeviceKind, EventType, Reason
from protocols.envelopes import (
    AccessEntry,
    AuthorisationUpdate,
    RevocationEntry,
    Role,
    ScheduleWindow,
    Scope,
    Target,
    UpdateKind,
    encode_update,
    issue_certificate,
    sign_update,
)
from protocols.errors import ErrorCode
from protocols.logrecords import ChainState, LogRecord, decode_batch, verify_batch
from protocols.messages import (
    AuthUpdate,
    Decommission,
    Decommissioned,
    ErrorReply,
    LogAck,
    LogAcked,
    LogBatchMessage,
    LogRead,
    Message,
    Provision,
    Provisioned,
    StatusRequest,
    TimeSync,
    TimeSyncResult,
    UpdateResult,
)
from protocols.session import SessionMode
from simulators import demo
from simulators.device import DeviceClock, VirtualDevice

NOW = 1_800_000_000
SITE = 7
ALWAYS = ScheduleWindow(days=0x7F, start_minute=0, end_minute=1440)


class FakeTime:
    """A settable host clock: the simulator's time source, not a mock of the device."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def host() -> FakeTime:
    return FakeTime(NOW)


@pytest.fixture
def authority() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def paired_device(
    authority: Ed25519PrivateKey, host: FakeTime, kind: DeviceKind = DeviceKind.DOOR_LOCK
) -> VirtualDevice:
    device = VirtualDevice(kind, clock=DeviceClock(source=host), log_capacity=50)
    answer = device.handle(
        Provision(device.device_id, authority.public_key().public_bytes_raw(), SITE, NOW),
        mode=SessionMode.PAIRING,
    )
    assert answer == Provisioned(device.device_id)
    return device


def signed(authority: Ed25519PrivateKey, update: AuthorisationUpdate) -> AuthUpdate:
    gateway_key = Ed25519PrivateKey.generate()
    certificate = issue_certificate(
        authority,
        role=Role.GATEWAY,
        subject="gw",
        serial=1,
        signing_key=gateway_key.public_key(),
        noise_key=X25519PrivateKey.generate().public_key(),
        scope=Scope(sites=frozenset({SITE})),
        not_before=NOW - 10,
        not_after=NOW + 86400,
    )
    return AuthUpdate(encode_update(sign_update(update, key=gateway_key, certificate=certificate)))


def access_list(version: int, *keys: int, expires_at: int = NOW + 3600) -> AuthorisationUpdate:
    return AuthorisationUpdate(
        kind=UpdateKind.ACCESS_FULL,
        target=Target.site(SITE),
        version=version,
        base_version=0,
        issued_at=expires_at - 3600,
        expires_at=expires_at,
        access=tuple(AccessEntry(key, NOW - 100, NOW + 86400, (ALWAYS,)) for key in keys),
    )


def collect(device: VirtualDevice) -> list[LogRecord]:
    answer = device.handle(LogRead(from_sequence=0, max_records=1000), mode=SessionMode.NORMAL)
    assert isinstance(answer, LogBatchMessage)
    verified = verify_batch(
        decode_batch(answer.batch),
        device_id=device.device_id,
        device_key=device.identity.signing_key.public_key(),
        state=ChainState.genesis(device.device_id),
    )
    return list(verified.records)


def events(device: VirtualDevice) -> list[tuple[EventType, Reason]]:
    return [(record.event, record.reason) for record in collect(device)]


def test_provisioning_pairs_once(authority: Ed25519PrivateKey, host: FakeTime) -> None:
    device = paired_device(authority, host)
    assert device.paired
    assert not device.advert().pairing_mode
    again = device.handle(
        Provision(device.device_id, bytes(32), SITE, NOW), mode=SessionMode.PAIRING
    )
    assert isinstance(again, ErrorReply)
    assert again.code is ErrorCode.ALREADY_PAIRED
    assert (EventType.PAIRED, Reason.REMOTE) in events(device)


def test_unpaired_device_answers_only_provisioning(host: FakeTime) -> None:
    device = VirtualDevice(DeviceKind.KEY_SAFE, clock=DeviceClock(source=host))
    answer = device.handle(StatusRequest(), mode=SessionMode.PAIRING)
    assert isinstance(answer, ErrorReply)
    assert answer.code is ErrorCode.NOT_PAIRED


def test_signed_update_applies_and_rollback_is_refused_and_logged(
    authority: Ed25519PrivateKey, host: FakeTime
) -> None:
    device = paired_device(authority, host)
    assert device.handle(signed(authority, access_list(2, 11)), mode=SessionMode.NORMAL) == (
        UpdateResult(access_version=2, revocation_version=0)
    )
    refused = device.handle(signed(authority, access_list(2, 11, 12)), mode=SessionMode.NORMAL)
    assert isinstance(refused, ErrorReply)
    assert refused.code is ErrorCode.UPDATE_ROLLBACK
    assert device.access.access_version == 2
    assert 12 not in device.access.entries
    logged = [record for record in collect(device) if record.event is EventType.UPDATE_REFUSED]
    assert logged[-1].payload[0] == ErrorCode.UPDATE_ROLLBACK


def test_expired_update_is_refused(authority: Ed25519PrivateKey, host: FakeTime) -> None:
    device = paired_device(authority, host)
    stale = signed(authority, access_list(1, 11, expires_at=NOW - 1))
    answer = device.handle(stale, mode=SessionMode.NORMAL)
    assert isinstance(answer, ErrorReply)
    assert answer.code is ErrorCode.UPDATE_EXPIRED


def test_revoked_key_is_refused_at_the_door_and_logged(
    authority: Ed25519PrivateKey, host: FakeTime
) -> None:
    device = paired_device(authority, host)
    device.handle(signed(authority, access_list(1, 4711)), mode=SessionMode.NORMAL)
    activation = Activation(4711, NOW + 3600)
    assert device.present_key(4711, activation).granted
    revocation = AuthorisationUpdate(
        kind=UpdateKind.REVOCATION,
        target=Target.fleet(),
        version=1,
        base_version=0,
        issued_at=NOW - 1,
        expires_at=NOW + 60,
        revocations=(RevocationEntry(4711, NOW + 86400 * 90),),
    )
    device.handle(signed(authority, revocation), mode=SessionMode.NORMAL)
    decision = device.present_key(4711, activation)
    assert not decision.granted
    assert decision.reason is Reason.KEY_REVOKED
    assert events(device)[-1] == (EventType.ACCESS_DENIED, Reason.KEY_REVOKED)


def test_clock_cannot_be_wound_below_the_floor(
    authority: Ed25519PrivateKey, host: FakeTime
) -> None:
    device = paired_device(authority, host)
    device.change_battery()
    assert AlarmFlags.CLOCK_UNSET in device.alarms()
    assert device.present_key(1, None).reason is Reason.CLOCK_UNSET
    floor = device.log.time_floor
    early = device.handle(TimeSync((floor - 3600) * 1000), mode=SessionMode.NORMAL)
    assert isinstance(early, ErrorReply)
    assert early.code is ErrorCode.TIME_BELOW_FLOOR
    assert not device.clock.is_set
    good = device.handle(TimeSync((floor + 5) * 1000), mode=SessionMode.NORMAL)
    assert good == TimeSyncResult(device_time_before_ms=0, device_time_after_ms=(floor + 5) * 1000)
    logged = events(device)
    assert (EventType.TIME_SET_REFUSED, Reason.TIME_BELOW_FLOOR) in logged
    assert logged[-1] == (EventType.TIME_SET, Reason.TIME_SYNC)


def test_drift_is_reported_and_corrected(authority: Ed25519PrivateKey, host: FakeTime) -> None:
    device = paired_device(authority, host)
    device.clock.drift_ppm = 500.0
    host.now += 10_000
    answer = device.handle(TimeSync(int(host.now * 1000)), mode=SessionMode.NORMAL)
    assert isinstance(answer, TimeSyncResult)
    assert answer.device_time_before_ms - answer.device_time_after_ms == pytest.approx(5000, abs=2)


def test_log_ack_frees_and_overflow_is_an_event(
    authority: Ed25519PrivateKey, host: FakeTime
) -> None:
    device = paired_device(authority, host)
    for _ in range(30):
        device.open_door()
        device.close_door()
    assert AlarmFlags.LOG_OVERFLOW in device.alarms()
    answer = device.handle(LogRead(0, 1000), mode=SessionMode.NORMAL)
    assert isinstance(answer, LogBatchMessage)
    batch = decode_batch(answer.batch)
    assert batch.records[-1].event is EventType.LOG_OVERFLOW
    last = batch.records[-1].sequence
    acked = device.handle(LogAck(last), mode=SessionMode.NORMAL)
    assert acked == LogAcked(up_to_sequence=last, freed=len(batch.records))
    assert device.log.waiting == 0


def test_key_cabinet_slots_log_who_took_what(authority: Ed25519PrivateKey, host: FakeTime) -> None:
    cabinet = paired_device(authority, host, DeviceKind.KEY_CABINET)
    cabinet.take_from_slot(3, key_id=4711)
    cabinet.take_from_slot(4, key_id=4711, dongle=True)
    with pytest.raises(ValueError, match="already out"):
        cabinet.take_from_slot(3, key_id=1)
    cabinet.return_to_slot(3)
    records = collect(cabinet)[-3:]
    assert [(r.event, r.key_id, r.payload[0]) for r in records] == [
        (EventType.KEY_TAKEN, 4711, 3),
        (EventType.DONGLE_TAKEN, 4711, 4),
        (EventType.KEY_RETURNED, 4711, 3),
    ]


def test_jammed_lock_refuses_with_reason(authority: Ed25519PrivateKey, host: FakeTime) -> None:
    device = paired_device(authority, host)
    device.handle(signed(authority, access_list(1, 5)), mode=SessionMode.NORMAL)
    device.jam()
    decision = device.present_key(5, Activation(5, NOW + 60))
    assert decision.reason is Reason.LOCK_JAMMED
    assert events(device)[-1] == (EventType.FAILED_TO_OPEN, Reason.LOCK_JAMMED)


def test_decommission_resets_to_pairing_mode(authority: Ed25519PrivateKey, host: FakeTime) -> None:
    device = paired_device(authority, host)
    answer = device.handle(Decommission(device.device_id), mode=SessionMode.NORMAL)
    assert answer == Decommissioned(device.device_id)
    assert not device.paired
    assert device.advert().pairing_mode
    assert device.access.access_version == 0


def test_state_survives_save_and_load(authority: Ed25519PrivateKey, host: FakeTime) -> None:
    device = paired_device(authority, host)
    device.handle(signed(authority, access_list(3, 9)), mode=SessionMode.NORMAL)
    device.present_key(9, Activation(9, NOW + 60))
    before = collect(device)
    saved = json.loads(json.dumps(device.to_state()))
    restored = VirtualDevice.from_state(saved, clock_source=host)
    assert restored.device_id == device.device_id
    assert restored.pairing_code == device.pairing_code
    assert restored.access == device.access
    assert collect(restored) == before
    restored.open_door()
    assert collect(restored)[:-1] == before  # the chain continues across the restart


def test_answers_are_typed_for_every_request(authority: Ed25519PrivateKey, host: FakeTime) -> None:
    device = paired_device(authority, host)
    bad: list[Message] = [
        LogRead(from_sequence=10_000, max_records=10),
        LogRead(from_sequence=0, max_records=0),
        LogAck(up_to_sequence=10_000),
        AuthUpdate(b"not an update"),
        Decommission(bytes(8)),
    ]
    for request in bad:
        answer = device.handle(request, mode=SessionMode.NORMAL)
        assert isinstance(answer, ErrorReply), request


def test_demo_walks_through_and_exits_zero() -> None:
    out = io.StringIO()
    assert demo.Demo(out, mtu=23).run() == 0
    text = out.getvalue()
    assert "A mistyped code is refused (BAD_PAIRING_CODE)" in text
    assert "stays shut (KEY_REVOKED)" in text
    assert "LOG_ALTERED" in text
