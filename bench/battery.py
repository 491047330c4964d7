"""Battery cost of a week of care visits: lockgw's advert-driven visits against polling.

Counts, per device and day, connections and radio-on seconds (connected time) of

(a) lockgw: the gateway's own ``Scheduler`` decides when to visit which device, from the
    devices' adverts: every advert is encoded as a device sends it and handed to
    ``Scheduler.on_advert``, and the slots are filled by ``Scheduler._next_device`` (the
    need and priority rules of ``gateway/scheduler.py``), on a virtual clock
    (``Scheduler(clock=...)``) that runs the week in seconds. Updates are real too: the
    revocation is signed and stored by ``UpdateService`` in a SQLite store, and the
    scheduler reads what is pending with ``Scheduler.reload``. Sessions are not run: each
    lasts what the timing model says a session of its kind lasts (below) and then does to
    the device and to the scheduler's view what ``Scheduler._visit`` does (records
    collected, versions applied, ``last_session``);
(b) a polling bridge: it connects to every device every P seconds, whatever the device
    has to say, with P chosen so that its worst-case revocation latency equals lockgw's.

Session lengths come from the model (``simulators.timing.TYPICAL_LOCK``) applied to the
traffic of real sessions: first, a short calibration runs a status visit, a log collection
(one care visit's records) and a revocation through the gateway's own stack over the timed
virtual radio, and records each session's PDUs.

Devices advertise on every change of state (a care visit's events) and after every
session; the advert reaches the gateway after a random part of the advertising interval.
Between those, adverts repeat what the gateway already knows; they are not delivered, and
the slots are re-examined every minute of virtual time instead of every second (routine
visits start up to a minute late; nothing else changes).

Run from the repository root::

    .venv/bin/python -m bench.battery
    .venv/bin/python -m bench.battery --devices 50 --days 7 --json battery.json
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import math
import random
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench._common import (
    SITE,
    Trace,
    TrafficRecorder,
    gateway_credentials,
    gateway_side,
    quiet_logs,
    report,
)
from gateway.pipeline import LogPipeline
from gateway.radio.base import ScanResult
from gateway.radio.bumble import BumbleRadio
from gateway.scheduler import DeviceView, Scheduler, SchedulerSettings
from gateway.store import DeviceRecord, PropagationState, Store
from gateway.topics import Topics
from gateway.updates import Priority, UpdateService
from gateway.worker import BlockingWorker
from protocols.advert import Advert, encode_manufacturer_payload
from protocols.enums import AlarmFlags, DeviceKind
from protocols.envelopes import AuthorisationUpdate, RevocationEntry, Target, UpdateKind
from protocols.gatt import COMPANY_ID
from protocols.logrecords import chain_genesis
from simulators.node import Fleet, SimulatedDevice
from simulators.radio import ScalableLink
from simulators.timing import TYPICAL_LOCK, BleTiming, exchanges_from_trace, sequence_bound

DAY = 86_400.0
DISPATCH_EVERY = 60.0
"""Virtual seconds between re-examinations of the slots when nothing else happens."""
WEEK_START = 1_767_571_200.0
"""Monday 5 January 2026, 00:00 UTC: the virtual week."""


# -- calibration: real sessions, timed by the model ------------------------------------------


@dataclass(frozen=True)
class SessionCosts:
    """Seconds of traffic (first data event to last PDU) of each kind of session."""

    status: float
    collection: float
    revocation: float
    records_per_collection: int


async def _wait_for_session(recorder: TrafficRecorder, since: float, budget: float) -> Trace:
    deadline = time.monotonic() + budget
    while True:
        done = [t for t in recorder.since(since) if t.ended is not None]
        if done:
            await asyncio.sleep(0.5)  # anything the visit left to do starts a new trace
            return done[0]
        if time.monotonic() > deadline:
            msg = "calibration session did not happen"
            raise RuntimeError(msg)
        await asyncio.sleep(0.1)


async def calibrate(timing: BleTiming, budget: float) -> SessionCosts:
    """One door lock on the timed radio and the gateway's stack: time a status visit, a
    log collection of one care visit's records and a revocation."""
    link = ScalableLink(timing)
    fleet = Fleet(link, advertising_interval=timing.advertising_interval)
    [lock] = fleet.create(DeviceKind.DOOR_LOCK)
    recorder = TrafficRecorder(link, fleet)
    await fleet.start()
    try:
        async with gateway_side(fleet) as gateway:
            gateway.pair_directly(fleet)
            scheduler = gateway.scheduler(1)
            task = asyncio.create_task(scheduler.run())
            try:
                # The first visit (the scheduler has not seen the alarms yet); then idle.
                await _wait_for_session(recorder, 0.0, budget)
                for _ in range(round(budget / 0.2)):
                    if not (lock.device.advert().records_waiting or lock.connected):
                        break
                    await asyncio.sleep(0.2)

                async def nothing(*_: object) -> None:
                    return None

                began = time.time()
                await scheduler.request(lock.device_id, Priority.STATUS, nothing)
                status = await _wait_for_session(recorder, began, budget)

                began = time.time()
                care_visit(lock)
                records = lock.device.advert().records_waiting
                collection = await _wait_for_session(recorder, began, budget)

                began = time.time()
                update = revocation(1, Target.device(lock.device_id), int(began))
                await gateway.updates.submit("calibrate-revocation", update)
                await scheduler.reload()
                revoke = await _wait_for_session(recorder, began, budget)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await fleet.stop()

    def traffic(trace: Trace) -> float:
        return timing.session_time(exchanges_from_trace(trace.pdus))

    return SessionCosts(traffic(status), traffic(collection), traffic(revoke), records)


def care_visit(device: SimulatedDevice) -> None:
    """A carer comes in: the door opens and closes behind them."""
    device.open_door(1)
    device.close_door(1)


def revocation(version: int, target: Target, now: int) -> AuthorisationUpdate:
    return AuthorisationUpdate(
        kind=UpdateKind.REVOCATION,
        target=target,
        version=version,
        base_version=0,
        issued_at=now - 10,
        expires_at=now + 3600,
        revocations=(RevocationEntry(4711, now + 90 * 86400),),
    )


# -- the week -------------------------------------------------------------------------------


@dataclass
class SimDevice:
    """What the week needs of a device: its advert's contents and its uncollected records;
    what it cost: connections and connected seconds."""

    device_id: bytes
    address: str
    schedule: list[tuple[float, int]]
    records: list[float] = field(default_factory=list)
    revocation_version: int = 0
    connections: int = 0
    radio_on: float = 0.0

    def scan_result(self) -> ScanResult:
        advert = Advert(
            device_id=self.device_id,
            kind=DeviceKind.DOOR_LOCK,
            pairing_mode=False,
            battery_percent=80,
            alarms=AlarmFlags(0),
            access_version=0,
            revocation_version=self.revocation_version,
            records_waiting=len(self.records),
        )
        return ScanResult(
            address=self.address,
            rssi=-60,
            manufacturer_data=types.MappingProxyType(
                {COMPANY_ID: encode_manufacturer_payload(advert)}
            ),
            local_name=None,
            connectable=True,
        )


def care_schedule(rng: random.Random, days: int) -> list[tuple[float, int]]:
    """(virtual time, records) at one resident's door over ``days``: 3 or 4 visits a day
    between 07:00 and 22:00, each an arrival (key, door open, door closed: 3 records within
    20 s) and a departure 15 to 45 minutes later (door open, closed: 2 records)."""
    events: list[tuple[float, int]] = []
    for day in range(days):
        base = WEEK_START + day * DAY
        for _ in range(rng.choice((3, 4))):
            arrival = base + rng.uniform(7 * 3600, 22 * 3600)
            events += [(arrival, 1), (arrival + 3, 1), (arrival + 20, 1)]
            departure = arrival + rng.uniform(15 * 60, 45 * 60)
            events += [(departure, 1), (departure + 15, 1)]
    return sorted(events)


def session_traffic(costs: SessionCosts, *, collecting: bool, revoking: bool) -> float:
    """A visit is a status visit, plus a log collection and a revocation if it does them."""
    traffic = costs.status
    if collecting:
        traffic += costs.collection - costs.status
    if revoking:
        traffic += costs.revocation - costs.status
    return traffic


class Week:
    """The week, event by event, with lockgw's scheduler deciding the visits."""

    def __init__(
        self,
        *,
        scheduler: Scheduler,
        store: Store,
        worker: BlockingWorker,
        devices: list[SimDevice],
        costs: SessionCosts,
        timing: BleTiming,
        rng: random.Random,
    ) -> None:
        self.scheduler, self.store, self.worker = scheduler, store, worker
        self.devices = devices
        self.by_id = {device.device_id: device for device in devices}
        self.costs, self.timing, self.rng = costs, timing, rng
        self.now = WEEK_START
        self.queue: list[tuple[float, int, str, Any]] = []
        self.sequence = 0
        self.busy = 0
        self.initiator_free = WEEK_START
        self.revocation: tuple[str, int, float] | None = None
        self.revoked_last: float | None = None

    def at(self, when: float, what: str, detail: Any = None) -> None:
        self.sequence += 1
        heapq.heappush(self.queue, (when, self.sequence, what, detail))

    def advertise_soon(self, device: SimDevice) -> None:
        """The device's advert reaches the gateway within one advertising interval."""
        self.at(self.now + self.rng.uniform(0, self.timing.advertising_interval), "advert", device)

    async def run(self, end: float, revocation_at: float) -> None:
        for device in self.devices:
            for when, records in device.schedule:
                self.at(when, "records", (device, records))
            self.advertise_soon(device)
        self.at(revocation_at, "revocation")
        tick = WEEK_START
        while tick < end:
            tick += DISPATCH_EVERY
            self.at(tick, "tick")
        while self.queue and self.queue[0][0] <= end:
            when, _, what, detail = heapq.heappop(self.queue)
            self.now = when
            if what == "records":
                device, count = detail
                device.records += [when] * count
                self.advertise_soon(device)
            elif what == "advert":
                self.scheduler.on_advert(detail.scan_result())
            elif what == "connected":
                self.connected(detail)
            elif what == "end":
                await self.ended(detail)
            elif what == "revocation":
                await self.revoke()
            self.dispatch()

    def dispatch(self) -> None:
        """Fill the free slots as ``Scheduler._dispatch`` does, with the scheduler's choice."""
        while self.busy < self.scheduler.settings.slots:
            view = self.scheduler._next_device(self.now)  # noqa: SLF001  # the scheduler's own decision, on a virtual clock
            if view is None:
                return
            view.busy = True
            self.busy += 1
            # One connection is initiated at a time; it waits for the device's next advert.
            start = max(self.now, self.initiator_free)
            wait = self.rng.uniform(0, self.timing.advertising_interval)
            self.initiator_free = start + wait + self.timing.connection_setup
            self.at(self.initiator_free, "connected", (view, self.by_id[view.device_id]))

    def connected(self, detail: tuple[DeviceView, SimDevice]) -> None:
        """The session runs for what the model gives its traffic."""
        view, device = detail
        collected = [t for t in device.records if t <= self.now]
        revoking = self.revocation is not None and device.revocation_version < self.revocation[1]
        traffic = session_traffic(self.costs, collecting=bool(collected), revoking=revoking)
        device.connections += 1
        device.radio_on += self.timing.connection_setup + traffic
        device.records = device.records[len(collected) :]
        self.at(self.now + traffic, "end", (view, device, revoking))

    async def ended(self, detail: tuple[DeviceView, SimDevice, bool]) -> None:
        """What ``Scheduler._visit`` leaves behind: the update confirmed, the view updated."""
        view, device, revoking = detail
        if revoking and self.revocation is not None:
            update_id, version, _ = self.revocation
            device.revocation_version = version
            await self.worker.run(
                self.store.set_propagation,
                update_id,
                device.device_id,
                PropagationState.APPLIED,
                now=self.now,
            )
            await self.scheduler.reload()
            self.revoked_last = self.now
        view.visited_alarms = AlarmFlags(0)
        view.last_session = self.now
        view.busy = False
        self.busy -= 1
        self.advertise_soon(device)  # advertising again after the disconnection

    async def revoke(self) -> None:
        update = revocation(1, Target.site(SITE), int(time.time()))
        await self.scheduler.updates.submit("revoke-week", update)
        self.revocation = ("revoke-week", 1, self.now)
        await self.scheduler.reload()


async def lockgw_week(
    devices: list[SimDevice],
    costs: SessionCosts,
    timing: BleTiming,
    args: argparse.Namespace,
) -> float:
    """Run the week with the gateway's scheduler on a virtual clock (no radio is opened);
    returns the seconds from the revocation to its last confirmation."""
    rng = random.Random(args.seed + 1)  # noqa: S311  # a reproducible simulation, not a secret
    credentials = gateway_credentials(Ed25519PrivateKey.generate())
    topics = Topics("lockgw", "gw-bench")
    with tempfile.TemporaryDirectory(prefix="lockgw-battery-") as directory:
        async with BlockingWorker("store") as worker:
            store = Store.open(Path(directory) / "lockgw.sqlite3")
            try:
                for device in devices:
                    store.upsert_device(
                        DeviceRecord(
                            device_id=device.device_id,
                            kind=int(DeviceKind.DOOR_LOCK),
                            address=device.address,
                            signing_key=bytes(32),
                            noise_key=bytes(32),
                            site_id=SITE,
                            paired_at=int(WEEK_START),
                            chain_next_sequence=0,
                            chain_head=chain_genesis(device.device_id),
                            reachable=True,
                            last_heard=WEEK_START,
                        )
                    )
                updates = UpdateService(store, worker, credentials, topics)
                week: Week | None = None
                scheduler = Scheduler(
                    radio=BumbleRadio("unused"),  # never opened: sessions are not run
                    store=store,
                    worker=worker,
                    credentials=credentials,
                    pipeline=LogPipeline(store, worker, topics),
                    updates=updates,
                    topics=topics,
                    settings=SchedulerSettings(slots=args.slots),
                    clock=lambda: WEEK_START if week is None else week.now,
                )
                await scheduler.reload()
                week = Week(
                    scheduler=scheduler,
                    store=store,
                    worker=worker,
                    devices=devices,
                    costs=costs,
                    timing=timing,
                    rng=rng,
                )
                revocation_at = WEEK_START + REVOCATION_DAY * DAY + 14 * 3600
                await week.run(WEEK_START + args.days * DAY, revocation_at)
            finally:
                store.close()
    if week.revocation is None or week.revoked_last is None:
        return math.nan
    return week.revoked_last - week.revocation[2]


# -- the polling bridge ----------------------------------------------------------------------


def polling_week(
    devices: list[SimDevice],
    costs: SessionCosts,
    timing: BleTiming,
    period: float,
    args: argparse.Namespace,
) -> list[tuple[int, float]]:
    """(connections, connected seconds) per device of a bridge connecting to every device
    every ``period`` seconds: a status visit, plus the records and the revocation waiting."""
    rng = random.Random(args.seed + 2)  # noqa: S311  # a reproducible simulation, not a secret
    end = WEEK_START + args.days * DAY
    revocation_at = WEEK_START + REVOCATION_DAY * DAY + 14 * 3600
    results = []
    for device in devices:
        record_times = [when for when, count in device.schedule for _ in range(count)]
        poll = WEEK_START + rng.uniform(0, period)
        collected = 0
        revoked = False
        connections, radio_on = 0, 0.0
        while poll < end:
            waiting = sum(1 for when in record_times[collected:] if when <= poll)
            revoking = not revoked and poll >= revocation_at
            traffic = session_traffic(costs, collecting=waiting > 0, revoking=revoking)
            connections += 1
            radio_on += timing.connection_setup + traffic
            collected += waiting
            revoked = revoked or revoking
            poll += period
        results.append((connections, radio_on))
    return results


# -- figures --------------------------------------------------------------------------------

REVOCATION_DAY = 2
"""The revocation comes on the third day, at 14:00."""


@dataclass(frozen=True)
class Latency:
    """Worst-case revocation latency for one device, from the model and the settings."""

    connect: float
    routine: float
    revocation: float
    slots: int

    @property
    def lockgw(self) -> float:
        """A slot frees after one routine session at most (its connect and traffic); the
        other slots' connects may be queued ahead (one initiator); then the device's own
        connect and the revocation session."""
        return (
            (self.connect + self.routine)
            + (self.slots - 1) * self.connect
            + (self.connect + self.revocation)
        )

    def polling(self, period: float) -> float:
        """The revocation arrives just after the device's poll: the next poll, its
        connect, the push."""
        return period + self.connect + self.revocation

    @property
    def equal_period(self) -> float:
        """The polling period with the same worst case as lockgw."""
        return self.lockgw - self.connect - self.revocation


async def bench(args: argparse.Namespace) -> None:
    timing = TYPICAL_LOCK
    began = time.perf_counter()
    costs = await calibrate(timing, args.budget)
    calibrated = time.perf_counter() - began

    rng = random.Random(args.seed)  # noqa: S311  # a reproducible simulation, not a secret
    devices = [
        SimDevice(
            rng.randbytes(8),
            f"C0:00:00:00:{index // 256:02X}:{index % 256:02X}",
            care_schedule(rng, args.days),
        )
        for index in range(args.devices)
    ]
    began = time.perf_counter()
    revocation_latency = await lockgw_week(devices, costs, timing, args)
    simulated = time.perf_counter() - began
    lockgw = [(device.connections, device.radio_on) for device in devices]

    latency = Latency(
        connect=timing.worst_connect_time(),
        routine=max(costs.status, costs.collection),
        revocation=costs.revocation,
        slots=args.slots,
    )
    sweep = sequence_bound(timing, args.devices, args.slots, costs.status, initiator="targeted")
    period = max(latency.equal_period, sweep)
    polling = polling_week(
        [SimDevice(d.device_id, d.address, d.schedule) for d in devices],
        costs,
        timing,
        period,
        args,
    )

    days: int = args.days
    per_day = len(devices) * days

    def mean(values: list[tuple[int, float]], index: int) -> float:
        return sum(value[index] for value in values) / per_day

    # The same arithmetic with the configuration's caps in place of the model's lengths:
    # a session may hold its slot for max_session, a connect may take connect_timeout.
    settings = SchedulerSettings(slots=args.slots)
    capped = Latency(
        connect=settings.connect_timeout,
        routine=settings.max_session,
        revocation=costs.revocation,
        slots=args.slots,
    )
    capped_period = max(capped.equal_period, sweep)
    capped_polls = DAY / capped_period
    rows = [
        ("connections per device per day", mean(polling, 0), mean(lockgw, 0), ""),
        (
            "  the same, polling P from the configuration's caps",
            capped_polls,
            mean(lockgw, 0),
            "",
        ),
        ("radio-on (connected) s per device per day", mean(polling, 1), mean(lockgw, 1), "s"),
        (
            "worst-case revocation latency, one device",
            latency.polling(period),
            latency.lockgw,
            "s",
        ),
    ]
    notes = [
        (
            f"{args.devices} door locks, {days} days, 3-4 care visits a day (5 records each),"
            f" a site-wide revocation on day {REVOCATION_DAY + 1} at 14:00; {args.slots} slots;"
            f" typical-lock timing; seed {args.seed}"
        ),
        (
            f"session traffic (model, from real sessions recorded on the timed radio): status"
            f" {costs.status:.3f} s, collection of {costs.records_per_collection} records"
            f" {costs.collection:.3f} s, revocation {costs.revocation:.3f} s; set-up"
            f" {timing.connection_setup:.4f} s; calibration took {calibrated:.1f} s"
        ),
        (
            f"lockgw worst case = ({latency.connect:.3f} + {latency.routine:.3f})"
            f" + ({args.slots} - 1) x {latency.connect:.3f} + ({latency.connect:.3f} +"
            f" {latency.revocation:.3f}) = {latency.lockgw:.2f} s"
            f" [a slot frees after one routine session; queued connects; its own connect and"
            f" session]"
        ),
        (
            f"polling worst case = P + {latency.connect:.3f} + {latency.revocation:.3f}; equal"
            f" when P = {latency.equal_period:.2f} s; one sweep of {args.devices} devices needs"
            f" {sweep:.2f} s, so P = {period:.2f} s"
        ),
        (
            f"with the configuration's caps (connect_timeout {settings.connect_timeout:g} s,"
            f" max_session {settings.max_session:g} s) lockgw's worst case is"
            f" {capped.lockgw:.1f} s, P = {capped_period:.1f} s: {capped_polls:.0f} polls"
            f" per device per day"
        ),
        (
            f"lockgw: the site-wide revocation was confirmed by every device in"
            f" {revocation_latency:.1f} s (virtual); the week took {simulated:.1f} s to simulate"
        ),
    ]
    report(
        f"bench.battery: {args.devices} devices, {days} days",
        rows,
        notes,
        args.json,
        columns=("polling", "lockgw", "polling/lockgw"),
        extra={
            "polling_period_s": period,
            "equal_latency_period_s": latency.equal_period,
            "sweep_s": sweep,
            "session_traffic_s": {
                "status": costs.status,
                "collection": costs.collection,
                "revocation": costs.revocation,
            },
            "lockgw_revocation_confirmed_s": revocation_latency,
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.battery",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--slots", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per calibration wait")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.days < REVOCATION_DAY + 1 or args.slots < 1:
        parser.error(f"need devices >= 1, days >= {REVOCATION_DAY + 1}, slots >= 1")
    quiet_logs()
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
