"""Care-visit traffic: reproducible, plausible, and what it leaves in the devices' logs."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from protocols.enums import DeviceKind, EventType, Reason
from protocols.envelopes import AuthorisationUpdate, Target, UpdateKind
from protocols.logrecords import ChainState, LogRecord, decode_batch, verify_batch
from protocols.messages import LogBatchMessage, LogRead, UpdateResult
from protocols.session import SessionMode
from simulators.device import DeviceClock, VirtualDevice
from simulators.node import Fleet
from simulators.scenario import (
    DAY,
    Action,
    ActionKind,
    Rates,
    Scenario,
    ScenarioRunner,
    Shift,
    SimClock,
    Site,
    apply,
)

from .radio_central import SITE_ID, Central, Credentials, provision_directly

START = 1_800_000_000 - 1_800_000_000 % DAY  # a midnight, UTC


def install_access(scenario: Scenario, fleet: Fleet, now: int) -> None:
    """Pair every device in its model and give it the scenario's access list, signed."""
    credentials = Credentials.issue(now=now)
    update = AuthorisationUpdate(
        kind=UpdateKind.ACCESS_FULL,
        target=Target.site(SITE_ID),
        version=1,
        base_version=0,
        issued_at=now - 60,
        expires_at=now + DAY,
        access=scenario.access_entries(now - DAY, now + 30 * DAY),
    )
    for device in fleet:
        provision_directly(device.device, credentials, now=now)
        answer = device.device.handle(credentials.sign(update), mode=SessionMode.NORMAL)
        assert isinstance(answer, UpdateResult)


def verified_log(device: VirtualDevice) -> list[LogRecord]:
    answer = device.handle(LogRead(0, 1000), mode=SessionMode.NORMAL)
    assert isinstance(answer, LogBatchMessage)
    verified = verify_batch(
        decode_batch(answer.batch),
        device_id=device.device_id,
        device_key=device.identity.signing_key.public_key(),
        state=ChainState.genesis(device.device_id),
    )
    return list(verified.records)


# --------------------------------------------------------------------------------------------
# The actions
# --------------------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_actions_and_devices() -> None:
    first = Scenario(11, 6, 2, START)
    again = Scenario(11, 6, 2, START)
    assert first.actions() == again.actions()
    assert first.site == again.site
    built = [device.device_id for device in first.build_devices()]
    assert sorted(built) == sorted(first.site.device_ids())
    assert built == [device.device_id for device in again.build_devices()]
    other = Scenario(12, 6, 2, START)
    assert other.actions() != first.actions()
    assert other.site.device_ids() != first.site.device_ids()


def test_actions_are_sorted_within_the_days_and_start_time() -> None:
    start = START + 10 * 3600  # 10:00: the morning is over
    actions = Scenario(5, 8, 2, start).actions()
    times = [action.time for action in actions]
    assert times == sorted(times)
    assert start <= times[0]
    assert times[-1] < START + 2 * DAY


def test_counts_per_day_are_plausible() -> None:
    residents, days = 12, 5
    scenario = Scenario(3, residents, days, START)
    actions = scenario.actions()
    for day in range(days):
        begin, end = START + day * DAY, START + (day + 1) * DAY
        today = [a for a in actions if begin <= a.time < end]
        door_visits = {
            a.visit
            for a in today
            if a.kind is ActionKind.PRESENT_KEY
            and a.device_id in {r.door_lock for r in scenario.site.residents}
        }
        # Three visits a resident a day, a night patrol for some (the patrol after
        # midnight counts on the next day).
        assert 2.8 * residents <= len(door_visits) <= 4.2 * residents
        counts = Counter(a.kind for a in today)
        assert counts[ActionKind.OPEN_DOOR] == counts[ActionKind.CLOSE_DOOR]
        assert counts[ActionKind.PRESENT_KEY] >= counts[ActionKind.OPEN_DOOR]
        assert 0 < counts[ActionKind.TAKE_KEY] < len(door_visits)
        assert counts[ActionKind.TAMPER] <= 2
    expected = Counter(a.expect for a in actions if a.kind is ActionKind.PRESENT_KEY)
    denials = expected[Reason.ACTIVATION_EXPIRED] + expected[Reason.OUTSIDE_SCHEDULE]
    assert 0 < denials < 0.1 * expected[Reason.VALID_KEY]
    assert set(expected) == {Reason.VALID_KEY, Reason.ACTIVATION_EXPIRED, Reason.OUTSIDE_SCHEDULE}


def test_intended_decisions_follow_shifts_and_activations() -> None:
    scenario = Scenario(8, 10, 3, START)
    shifts = {key.key_id: key.shift for key in scenario.staff}
    for action in scenario.actions():
        if action.kind is not ActionKind.PRESENT_KEY:
            continue
        assert action.activation_expires_at is not None
        minute = action.time % DAY // 60
        in_hours = shifts[action.key_id].covers(minute)
        if action.expect is Reason.VALID_KEY:
            assert in_hours
            assert action.time < action.activation_expires_at
        elif action.expect is Reason.ACTIVATION_EXPIRED:
            assert action.time >= action.activation_expires_at
        else:
            assert action.expect is Reason.OUTSIDE_SCHEDULE
            assert not in_hours


def test_shift_instances_cross_midnight() -> None:
    one_am = START + DAY + 3600
    assert Shift.NIGHT.instance(one_am, START) == (START + 22 * 3600, START + DAY + 8 * 3600)
    assert Shift.DAY.instance(START + 7 * 3600, START) == (START + 6 * 3600, START + 16 * 3600)
    assert Shift.NIGHT.covers(23 * 60)
    assert not Shift.DAY.covers(23 * 60)


def test_a_site_over_existing_devices() -> None:
    devices = [
        VirtualDevice(kind)
        for kind in (
            DeviceKind.DOOR_LOCK,
            DeviceKind.DOOR_LOCK,
            DeviceKind.KEY_SAFE,
            DeviceKind.KEY_CABINET,
            DeviceKind.MEDICINE_CABINET,
        )
    ]
    site = Site.from_devices(devices)
    first, second = site.residents
    assert first.door_lock == devices[0].device_id
    assert first.key_safe == devices[2].device_id
    assert first.medicine_cabinet == devices[4].device_id
    assert first.key_slot == 1
    assert (second.key_safe, second.medicine_cabinet, second.key_slot) == (None, None, 2)
    assert site.key_cabinet == devices[3].device_id
    actions = Scenario(1, site, 1, START).actions()
    assert {a.device_id for a in actions} <= set(site.device_ids())
    assert Scenario(1, site, 1, START).actions() == actions


# --------------------------------------------------------------------------------------------
# Applying them
# --------------------------------------------------------------------------------------------


async def test_a_simulated_day_leaves_the_expected_chained_log() -> None:
    clock = SimClock(START, speed=0)  # stepped by hand
    scenario = Scenario(21, 3, 1, START, rates=Rates(expired_activation=0.1, wrong_shift=0.1))
    fleet = Fleet(clock_source=clock)
    for device in scenario.build_devices(clock):
        fleet.add(device)
    install_access(scenario, fleet, START)
    runner = ScenarioRunner(scenario.actions(), fleet, clock)

    for action in scenario.actions():
        clock.set(action.time)
        runner.apply_due()

    assert runner.done == len(scenario.actions())
    assert runner.unexpected == []
    assert runner.skipped == 0
    intended = Counter(
        (a.device_id, a.expect) for a in scenario.actions() if a.kind is ActionKind.PRESENT_KEY
    )
    for simulated in fleet:
        records = verified_log(simulated.device)  # the hash chain and checkpoint verify
        events = Counter(record.event for record in records)
        granted = intended[simulated.device_id, Reason.VALID_KEY]
        denied = sum(
            count
            for (device_id, reason), count in intended.items()
            if device_id == simulated.device_id and reason is not Reason.VALID_KEY
        )
        assert events[EventType.ACCESS_GRANTED] == granted
        assert events[EventType.ACCESS_DENIED] == denied
        assert events[EventType.DOOR_OPENED] == events[EventType.DOOR_CLOSED] == granted
        if simulated.kind is DeviceKind.DOOR_LOCK:
            assert events[EventType.UNLOCKED] == events[EventType.LOCKED] == granted
            assert granted >= 6  # three visits, in and out
        if simulated.kind is DeviceKind.KEY_CABINET:
            assert events[EventType.KEY_TAKEN] >= events[EventType.KEY_RETURNED] > 0
        times = [record.time for record in records]
        assert times == sorted(times)
        assert START <= times[-1] < START + DAY + 3600


def test_apply_respects_the_door() -> None:
    fleet = Fleet()
    [lock] = fleet.create(DeviceKind.DOOR_LOCK)
    [cabinet] = fleet.create(DeviceKind.KEY_CABINET)
    opened = apply(Action(START, lock.device_id, ActionKind.OPEN_DOOR), fleet)
    assert not opened.applied  # locked: nobody presented a key
    closed = apply(Action(START, lock.device_id, ActionKind.CLOSE_DOOR), fleet)
    assert not closed.applied
    decision = apply(
        Action(START, lock.device_id, ActionKind.PRESENT_KEY, key_id=5, activation_expires_at=1),
        fleet,
    ).decision
    assert decision is not None
    assert decision.reason is Reason.KEY_UNKNOWN
    returned = apply(Action(START, cabinet.device_id, ActionKind.RETURN_KEY, slot=1), fleet)
    assert not returned.applied
    assert "already in its slot" in returned.note
    assert apply(Action(START, lock.device_id, ActionKind.DRAIN_BATTERY, percent=90), fleet).applied
    assert lock.device.battery_percent == 10
    with pytest.raises(KeyError):
        apply(Action(START, bytes(8), ActionKind.TAMPER), fleet)


async def test_the_runner_keeps_pace_with_an_accelerated_clock_and_adverts_follow() -> None:
    now = int(time.time())
    start = now - now % DAY + 6 * 3600  # 06:00 today: the morning round is ahead
    clock = SimClock(start, speed=4 * 3600 / 0.8)  # four simulated hours in 0.8 s
    scenario = Scenario(2, 2, 1, start)
    due = [a for a in scenario.actions() if a.time < start + 4 * 3600]
    fleet = Fleet(clock_source=clock)
    for device in scenario.build_devices(clock):
        fleet.add(device)
    runner = ScenarioRunner(due, fleet, clock)
    loop = asyncio.get_running_loop()
    async with fleet:
        central = await Central.on_link(fleet.link)
        try:
            began = loop.time()
            await runner.run()
            elapsed = loop.time() - began
            assert runner.done == len(due) > 10
            assert 0.3 < elapsed < 3.0
            # Unprovisioned devices know no keys: every key is refused, and logged.
            assert set(runner.decisions) == {Reason.KEY_UNKNOWN}
            locks = fleet.of_kind(DeviceKind.DOOR_LOCK)
            wanted = {lock.address: lock.device.log.waiting for lock in locks}
            seen = await central.scan(
                until=lambda seen: all(
                    address in seen and seen[address].records_waiting == waiting
                    for address, waiting in wanted.items()
                )
            )
            assert all(seen[address].records_waiting > 1 for address in wanted)
        finally:
            await central.close()


async def test_the_sim_clock_runs_fast_jumps_and_wakes_sleepers() -> None:
    real = [100.0]
    clock = SimClock(START, speed=60, real=lambda: real[0])
    assert clock() == START
    real[0] += 2
    assert clock.now() == START + 120
    clock.speed = 0
    real[0] += 100
    assert clock.now() == START + 120
    assert clock.real_delay(START + 180) == float("inf")
    sleeper = asyncio.create_task(clock.sleep_until(START + 180))
    await asyncio.sleep(0.01)
    assert not sleeper.done()
    clock.advance(60)
    await asyncio.wait_for(sleeper, 1)
    clock.speed = 2
    assert clock.real_delay(START + 190) == pytest.approx(5)
    with pytest.raises(ValueError, match="speed"):
        SimClock(START, speed=-1)


def test_devices_on_the_sim_clock_log_simulated_time() -> None:
    clock = SimClock(START, speed=0)
    device = VirtualDevice(DeviceKind.DOOR_LOCK, clock=DeviceClock(source=clock))
    clock.advance(5 * 3600)
    device.open_door()
    assert verified_log(device)[-1].time == START + 5 * 3600
