"""Simulated devices on the virtual radio, driven by a Bumble central in the GATEWAY role.

No mocks: the devices are VirtualDevices behind Bumble GATT peripherals on a ScalableLink;
the central is a Bumble host on the same link running a protocols Session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocols.access import Activation
from protocols.enums import AlarmFlags, DeviceKind, EventType, Reason
from protocols.envelopes import (
    AccessEntry,
    AuthorisationUpdate,
    ScheduleWindow,
    Target,
    UpdateKind,
)
from protocols.errors import ErrorCode
from protocols.logrecords import ChainState
from protocols.messages import (
    ErrorReply,
    LogRead,
    Status,
    StatusRequest,
    TimeSync,
    TimeSyncResult,
    UpdateResult,
)
from simulators.device import DeviceClock, VirtualDevice
from simulators.faults import Faults, apply_device_fault, drift_clock, fill_log
from simulators.node import Fleet, SimulatedDevice, parse_kind

from .radio_central import (
    SITE_ID,
    Central,
    ConnectFailed,
    Credentials,
    LinkDropped,
    PinnedDevice,
    SessionError,
    open_session,
    pair,
)

MTUS = [23, 185, 517]
ALWAYS = ScheduleWindow(days=0x7F, start_minute=0, end_minute=1440)
KEY = 4711
CORRUPTION_CODES = {
    ErrorCode.DECRYPT_FAILED,
    ErrorCode.FRAGMENT_TRUNCATED,
    ErrorCode.FRAGMENT_OUT_OF_ORDER,
    ErrorCode.FRAGMENT_OVERSIZED,
    # A flipped bit in the channel byte: an unknown channel, or ABORT / HANDSHAKE in the
    # middle of the transport phase.
    ErrorCode.MALFORMED,
    ErrorCode.UNEXPECTED_MESSAGE,
    ErrorCode.HANDSHAKE_FAILED,
}


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    fleet = Fleet()
    yield fleet
    await fleet.stop()


@pytest.fixture
async def central(fleet: Fleet) -> AsyncIterator[Central]:
    central = await Central.on_link(fleet.link)
    yield central
    await central.close()


@pytest.fixture
def credentials() -> Credentials:
    return Credentials.issue()


async def started_lock(fleet: Fleet, **faults: object) -> SimulatedDevice:
    [device] = fleet.create(DeviceKind.DOOR_LOCK)
    device.faults.update(faults)
    await device.start()
    return device


@pytest.fixture
async def paired(
    fleet: Fleet, central: Central, credentials: Credentials
) -> tuple[SimulatedDevice, PinnedDevice]:
    """A door lock on the radio, paired and provisioned over it."""
    device = await started_lock(fleet)
    pinned = await pair(central, device.address, device.label, credentials)
    return device, pinned


def access_update(version: int, *keys: int) -> AuthorisationUpdate:
    now = int(time.time())
    return AuthorisationUpdate(
        kind=UpdateKind.ACCESS_FULL,
        target=Target.site(SITE_ID),
        version=version,
        base_version=0,
        issued_at=now - 60,
        expires_at=now + 3600,
        access=tuple(AccessEntry(key, now - 3600, now + 86400, (ALWAYS,)) for key in keys),
    )


def activation(key_id: int = KEY) -> Activation:
    return Activation(key_id, int(time.time()) + 3600)


# --------------------------------------------------------------------------------------------
# The journey: pairing, provisioning, a normal session, the log
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mtu", MTUS)
async def test_pairing_then_a_session_then_the_verified_log(
    fleet: Fleet, central: Central, credentials: Credentials, mtu: int
) -> None:
    device = await started_lock(fleet)
    seen = await central.scan_for([device.address])
    assert seen[device.address].pairing_mode
    assert seen[device.address].device_id == device.device_id

    pinned = await pair(central, device.address, device.label, credentials, mtu=mtu)

    assert device.device.paired
    assert device.device.site_id == SITE_ID
    assert pinned.noise_key == device.device.identity.noise_public
    # The advert follows: out of pairing mode once the session is over.
    await central.scan(
        until=lambda seen: device.address in seen and not seen[device.address].pairing_mode
    )

    session = await open_session(central, device.address, pinned, credentials, mtu=mtu)
    async with session.link:
        assert session.link.mtu == mtu
        assert isinstance(await session.request(StatusRequest()), Status)
        sync = await session.request(TimeSync(int(time.time() * 1000)))
        assert isinstance(sync, TimeSyncResult)
        update = await session.request(credentials.sign(access_update(1, KEY)))
        assert update == UpdateResult(access_version=1, revocation_version=0)
        assert device.present_key(KEY, activation()).granted
        device.open_door(KEY)
        device.close_door(KEY)

        verified = await session.collect_log(pinned)

    events = [record.event for record in verified.records]
    assert events[0] is EventType.BOOT
    assert EventType.PAIRED in events[1:3]  # after TIME_SET if provisioning moved the clock
    assert events[-5:] == [
        EventType.ACCESS_GRANTED,
        EventType.UNLOCKED,
        EventType.DOOR_OPENED,
        EventType.DOOR_CLOSED,
        EventType.LOCKED,
    ]
    assert device.device.log.waiting == 0  # acknowledged
    advert = await central.scan(
        until=lambda seen: (
            device.address in seen
            and seen[device.address].access_version == 1
            and seen[device.address].records_waiting == 0
        )
    )
    assert advert[device.address].alarms is AlarmFlags.NONE
    if mtu == 23:
        assert session.received > 10  # the log came in many small fragments


async def test_a_second_session_continues_the_chain(
    central: Central, credentials: Credentials, paired: tuple[SimulatedDevice, PinnedDevice]
) -> None:
    device, pinned = paired
    first = await open_session(central, device.address, pinned, credentials)
    async with first.link:
        state = (await first.collect_log(pinned)).state
    device.jam()
    second = await open_session(central, device.address, pinned, credentials, mtu=185)
    async with second.link:
        verified = await second.collect_log(pinned, state)
    assert [record.event for record in verified.records] == [EventType.JAMMED]
    assert verified.records[0].sequence == state.next_sequence


async def test_a_wrong_pairing_code_is_refused(
    fleet: Fleet, central: Central, credentials: Credentials
) -> None:
    device = await started_lock(fleet)
    other = VirtualDevice(DeviceKind.DOOR_LOCK)
    forged = device.label.rsplit(":", 1)[0] + ":" + other.pairing_code.text().replace("-", "")

    with pytest.raises(SessionError) as refused:
        await pair(central, device.address, forged, credentials)

    assert refused.value.code is ErrorCode.BAD_PAIRING_CODE
    assert refused.value.by_peer
    assert not device.device.paired
    assert device.last_failure is ErrorCode.BAD_PAIRING_CODE


# --------------------------------------------------------------------------------------------
# The device judges the gateway's certificate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadCertificate:
    """How a gateway certificate is wrong, and the refusal the device answers with."""

    code: ErrorCode
    sites: tuple[int, ...] = (SITE_ID,)
    valid_from: int = -3600  # seconds from now
    valid_for: int = 7200
    own_authority: bool = True


@pytest.mark.parametrize(
    "bad",
    [
        BadCertificate(ErrorCode.CERT_EXPIRED, valid_from=-7200, valid_for=7140),
        BadCertificate(ErrorCode.CERT_NOT_YET_VALID, valid_from=3600),
        BadCertificate(ErrorCode.CERT_OUT_OF_SCOPE, sites=(SITE_ID + 1,)),
        BadCertificate(ErrorCode.CERT_BAD_SIGNATURE, own_authority=False),
    ],
    ids=lambda bad: bad.code.name,
)
async def test_device_refuses_a_gateway_certificate(
    central: Central,
    credentials: Credentials,
    paired: tuple[SimulatedDevice, PinnedDevice],
    bad: BadCertificate,
) -> None:
    device, pinned = paired
    now = int(time.time())
    wrong = Credentials.issue(
        authority=credentials.authority if bad.own_authority else Ed25519PrivateKey.generate(),
        sites=bad.sites,
        not_before=now + bad.valid_from,
        not_after=now + bad.valid_from + bad.valid_for,
    )

    session = await open_session(central, device.address, pinned, wrong)
    async with session.link:
        # The device judges the certificate in handshake message 3 and refuses in clear.
        with pytest.raises(SessionError) as refused:
            await session.request(StatusRequest())

    assert refused.value.code is bad.code
    assert refused.value.by_peer
    assert device.last_failure is bad.code
    # A good certificate still opens a session afterwards.
    good = await open_session(central, device.address, pinned, credentials)
    async with good.link:
        assert isinstance(await good.request(StatusRequest()), Status)


# --------------------------------------------------------------------------------------------
# Faults: each is a typed failure at the gateway, never accepted data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
async def test_a_corrupted_answer_fails_typed(
    central: Central,
    credentials: Credentials,
    paired: tuple[SimulatedDevice, PinnedDevice],
    seed: int,
) -> None:
    device, pinned = paired
    session = await open_session(central, device.address, pinned, credentials, mtu=23)
    async with session.link:
        assert isinstance(await session.request(StatusRequest()), Status)
        device.faults.update({"corrupt_next": 1, "seed": seed})
        with pytest.raises(SessionError) as failed:
            await session.request(LogRead(from_sequence=0, max_records=1000))
    assert failed.value.code in CORRUPTION_CODES
    assert not failed.value.by_peer  # the gateway caught it
    assert device.faults.corrupt_next == 0


async def test_corrupted_handshakes_fail_typed(
    central: Central, credentials: Credentials, paired: tuple[SimulatedDevice, PinnedDevice]
) -> None:
    device, pinned = paired
    device.faults.update({"corrupt_probability": 1.0, "seed": 3})
    codes = set()
    for _ in range(4):
        try:
            session = await open_session(central, device.address, pinned, credentials, mtu=23)
            async with session.link:
                await session.request(StatusRequest())
        except SessionError as failed:
            codes.add(failed.code)
        else:
            pytest.fail("a session with every answer corrupted went through")
    assert codes <= CORRUPTION_CODES


async def test_a_truncated_answer_is_a_fragment_error(
    central: Central, credentials: Credentials, paired: tuple[SimulatedDevice, PinnedDevice]
) -> None:
    device, pinned = paired
    session = await open_session(central, device.address, pinned, credentials, mtu=185)
    async with session.link:
        device.faults.truncate_next = 1
        with pytest.raises(SessionError) as failed:
            await session.request(StatusRequest())
    assert failed.value.code is ErrorCode.FRAGMENT_TRUNCATED


@pytest.mark.parametrize("frames", [0, 1, 2, 5])
async def test_a_dropped_link_during_pairing(
    fleet: Fleet, central: Central, credentials: Credentials, frames: int
) -> None:
    device = await started_lock(fleet, drop_after_frames=frames)

    with pytest.raises(LinkDropped):
        await pair(central, device.address, device.label, credentials, mtu=23)

    assert not device.device.paired
    device.faults.clear()
    await pair(central, device.address, device.label, credentials, mtu=23)
    assert device.device.paired


async def test_a_dropped_link_mid_session(
    central: Central, credentials: Credentials, paired: tuple[SimulatedDevice, PinnedDevice]
) -> None:
    device, pinned = paired
    session = await open_session(central, device.address, pinned, credentials, mtu=23)
    async with session.link:
        await session.request(StatusRequest())
        # The request's fragments and a few of the answer's, then the link goes down.
        device.faults.drop_after_frames = device.frames + 5
        with pytest.raises(LinkDropped):
            await session.request(LogRead(from_sequence=0, max_records=1000))
    assert not session.link.connected


async def test_a_slow_device_still_answers(
    central: Central, credentials: Credentials, paired: tuple[SimulatedDevice, PinnedDevice]
) -> None:
    device, pinned = paired
    device.faults.answer_delay = 0.05
    loop = asyncio.get_running_loop()
    started = loop.time()

    session = await open_session(central, device.address, pinned, credentials, mtu=185)
    async with session.link:
        assert isinstance(await session.request(StatusRequest()), Status)
        verified = await session.collect_log(pinned)

    assert verified.records
    assert loop.time() - started >= session.received * 0.05


async def test_a_refusing_device_cannot_be_connected(
    central: Central, credentials: Credentials, paired: tuple[SimulatedDevice, PinnedDevice]
) -> None:
    device, pinned = paired
    device.faults.refuse_connections = True
    accepted = device.connections

    with pytest.raises(ConnectFailed):
        await open_session(central, device.address, pinned, credentials)

    assert device.connections == accepted
    device.faults.refuse_connections = False
    session = await open_session(central, device.address, pinned, credentials)
    async with session.link:
        assert isinstance(await session.request(StatusRequest()), Status)


async def test_jam_on_open_jams_the_lock_and_says_so(
    central: Central, credentials: Credentials, paired: tuple[SimulatedDevice, PinnedDevice]
) -> None:
    device, pinned = paired
    session = await open_session(central, device.address, pinned, credentials)
    async with session.link:
        await session.request(credentials.sign(access_update(1, KEY)))
    device.faults.jam_on_open = True

    decision = device.present_key(KEY, activation())

    assert decision.reason is Reason.LOCK_JAMMED
    seen = await central.scan(
        until=lambda seen: (
            device.address in seen and AlarmFlags.JAMMED in seen[device.address].alarms
        )
    )
    assert seen[device.address].device_id == device.device_id


async def test_device_faults_show_in_the_advert(
    central: Central, paired: tuple[SimulatedDevice, PinnedDevice]
) -> None:
    device, _ = paired
    apply_device_fault(device.device, "drain_battery", 85)
    apply_device_fault(device.device, "fill_log", device.device.log.capacity + 5)
    device.changed()
    wanted = AlarmFlags.BATTERY_LOW | AlarmFlags.LOG_OVERFLOW | AlarmFlags.LOG_NEARLY_FULL

    seen = await central.scan(
        until=lambda seen: device.address in seen and seen[device.address].alarms == wanted
    )
    assert seen[device.address].battery_percent == 15


def test_clock_drift_keeps_the_reading_and_changes_the_rate() -> None:
    now = [1_800_000_000.0]
    device = VirtualDevice(DeviceKind.KEY_SAFE, clock=DeviceClock(source=lambda: now[0]))
    now[0] += 1000
    before = device.clock.now()
    drift_clock(device, 1000.0)  # a millisecond fast per second
    assert device.clock.now() == before
    now[0] += 10_000
    assert before is not None
    assert device.clock.now() == pytest.approx(before + 10_010)


def test_fill_log_overflows_and_the_overflow_is_reported() -> None:
    device = VirtualDevice(DeviceKind.DOOR_LOCK, log_capacity=20)
    fill_log(device, 30)
    assert device.log.waiting == 20
    assert AlarmFlags.LOG_OVERFLOW in device.alarms()


def test_fault_values_are_checked_before_anything_changes() -> None:
    faults = Faults()
    for bad in (
        {"drop_after_frames": -1},
        {"corrupt_probability": 1.5},
        {"answer_delay": True},
        {"refuse_connections": 1},
        {"corrupt_next": 2, "no_such_fault": 1},
    ):
        with pytest.raises(ValueError, match=r"must|unknown"):
            faults.update(bad)
    assert not faults.active
    faults.update({"corrupt_next": 2, "answer_delay": 0.5})
    assert faults.to_json() == {"corrupt_next": 2, "answer_delay": 0.5}
    faults.clear()
    assert faults.to_json() == {}
    with pytest.raises(ValueError, match="unknown device fault"):
        apply_device_fault(VirtualDevice(DeviceKind.KEY_SAFE), "melt", 1)


def test_corruption_is_reproducible_from_the_seed() -> None:
    data = bytes(range(64))
    first = Faults(corrupt_probability=0.5, seed=9)
    second = Faults(corrupt_probability=0.5, seed=9)
    outputs = [first.mangle(data) for _ in range(20)]
    assert outputs == [second.mangle(data) for _ in range(20)]
    flipped = [out for out in outputs if out != data]
    assert flipped
    # Exactly one bit differs in each corrupted fragment.
    for out in flipped:
        diff = int.from_bytes(out, "big") ^ int.from_bytes(data, "big")
        assert diff.bit_count() == 1


# --------------------------------------------------------------------------------------------
# Power and persistence
# --------------------------------------------------------------------------------------------


async def test_a_device_switched_off_is_gone_and_comes_back(
    fleet: Fleet, central: Central, credentials: Credentials
) -> None:
    device = await started_lock(fleet)
    other = await started_lock(fleet)
    await central.scan_for([device.address, other.address])

    await device.stop()

    seen = await central.scan(duration=0.5)
    assert other.address in seen
    assert device.address not in seen
    with pytest.raises(ConnectFailed):
        await central.connect(device.address, within=0.5)

    await device.start()
    await central.scan_for([device.address])
    await pair(central, device.address, device.label, credentials)  # and it answers


async def test_fleet_save_and_load_keep_ids_addresses_pairing_and_the_chain(
    fleet: Fleet,
    central: Central,
    credentials: Credentials,
    paired: tuple[SimulatedDevice, PinnedDevice],
    tmp_path: Path,
) -> None:
    device, pinned = paired
    safe = fleet.create(DeviceKind.KEY_SAFE)[0]
    session = await open_session(central, device.address, pinned, credentials)
    async with session.link:
        await session.request(credentials.sign(access_update(1, KEY)))
        state: ChainState = (await session.collect_log(pinned, acknowledge=False)).state
    device.present_key(KEY, activation())
    assert fleet.save(tmp_path) == 2
    await central.close()
    await fleet.stop()

    restarted = Fleet()
    loaded = restarted.load(tmp_path)
    try:
        assert {d.device_id for d in loaded} == {device.device_id, safe.device_id}
        again = restarted.get(device.device_id)
        assert again.address == device.address
        assert again.device.paired
        assert again.device.access.access_version == 1
        assert again.label == device.label
        assert restarted.load(tmp_path) == []  # already there
        await restarted.start()
        new_central = await Central.on_link(restarted.link)
        try:
            # The pinned keys still open a session: the identity survived the restart.
            session = await open_session(new_central, again.address, pinned, credentials)
            async with session.link:
                verified = await session.collect_log(pinned, state)
        finally:
            await new_central.close()
    finally:
        await restarted.stop()
    assert [r.event for r in verified.records] == [EventType.ACCESS_GRANTED, EventType.UNLOCKED]


def test_fleet_finds_devices_by_id_and_kind(tmp_path: Path) -> None:
    fleet = Fleet()
    locks = fleet.create(DeviceKind.DOOR_LOCK, 2)
    [cabinet] = fleet.create(DeviceKind.KEY_CABINET)
    assert len(fleet) == 3
    assert fleet.get(cabinet.device_id) is cabinet
    assert fleet.find(bytes(8)) is None
    assert fleet.of_kind(DeviceKind.DOOR_LOCK) == locks
    with pytest.raises(KeyError, match="no device"):
        fleet.get(bytes(8))
    with pytest.raises(ValueError, match="already"):
        fleet.add(locks[0].device)
    assert parse_kind("key-cabinet") is DeviceKind.KEY_CABINET
    with pytest.raises(ValueError, match="unknown device kind"):
        parse_kind("toaster")
    (tmp_path / "0123456789abcdef.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match="not a simulated device"):
        fleet.load(tmp_path)


async def test_errors_in_a_session_are_answers_not_failures(
    central: Central, credentials: Credentials, paired: tuple[SimulatedDevice, PinnedDevice]
) -> None:
    device, pinned = paired
    session = await open_session(central, device.address, pinned, credentials)
    async with session.link:
        answer = await session.request(LogRead(from_sequence=10_000, max_records=1))
        assert isinstance(answer, ErrorReply)
        assert answer.code is ErrorCode.LOG_CURSOR_INVALID
        assert isinstance(await session.request(StatusRequest()), Status)
    assert device.last_failure is None
