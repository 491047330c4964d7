"""Revocation against the physical limit: N devices, K connection slots, a timed radio.

Everything runs in this process on the virtual radio timed by the typical-lock model
(``simulators.timing.TYPICAL_LOCK``: LE 1M, 30 ms connection interval, 4 packets per event,
no DLE, MTU 247, an advert a second). The gateway side is the daemon's own BumbleRadio,
DeviceSession, Scheduler, UpdateService, LogPipeline and SQLite store (``bench._common``);
the devices are simulated locks paired through their model. Figures, each as measured
beside the model's bound:

1. transfers over the timed radio (notifications one way, writes with response the other)
   against ``BleTiming.transfer_time`` / ``session_time``: the radio keeps the model's rules;
2. a fleet-wide revocation: from submitting it to the last device's confirmation, against
   ``sequence_bound`` for N sessions on K slots, each session's traffic as recorded on the
   link and timed by the model (bar: at most 1.15 x);
3. an urgent revocation for one device while every slot is busy with routine log
   collection: the delay until its session starts (its connection is up), against one
   routine session plus the worst wait for the device's advert and the connection set-up.

Run from the repository root (it stops by itself within a few minutes)::

    .venv/bin/python -m bench.revocation
    .venv/bin/python -m bench.revocation --json revocation.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bumble.transport.common import AsyncPipeSink

from bench._common import (
    SITE,
    GatewaySide,
    Trace,
    TrafficRecorder,
    gateway_side,
    load_average,
    quiet_logs,
    report,
)
from gateway.radio.bumble import BumbleRadio
from gateway.scheduler import Scheduler
from gateway.store import PropagationState
from protocols.enums import DeviceKind
from protocols.envelopes import AuthorisationUpdate, RevocationEntry, Target, UpdateKind
from simulators.node import Fleet, SimulatedDevice
from simulators.radio import ScalableLink, VirtualController, VirtualPeripheral
from simulators.timing import BEST_CASE, TYPICAL_LOCK, BleTiming, exchanges_from_trace
from simulators.timing import sequence_bound as sequence_bound_of

Row = tuple[str, float, float, str]
REVOKED_KEY = 4711
POLL = 0.2


# -- 1. transfers --------------------------------------------------------------------------


async def transfers(timing: BleTiming, name: str, fragments: int) -> list[Row]:
    """One device, one connection: ``fragments`` full notifications to the gateway, then
    as many writes with response from it."""
    link = ScalableLink(timing)
    peripheral = VirtualPeripheral(link, advertising_interval=timing.advertising_interval)
    received: asyncio.Queue[bytes] = asyncio.Queue()
    peripheral.on_fragment = received.put_nowait
    controller = VirtualController("gateway", link=link)
    rows: list[Row] = []
    async with peripheral, BumbleRadio.from_hci(controller, AsyncPipeSink(controller)) as radio:
        connection = await radio.connect(peripheral.address, mtu=517, timeout=10.0)
        size = connection.max_fragment_size
        fragment = bytes(size)
        loop = asyncio.get_running_loop()

        began = loop.time()
        for _ in range(fragments):
            await peripheral.notify(fragment)
        for _ in range(fragments):
            await connection.receive()
        measured = loop.time() - began
        bound = timing.transfer_time(fragments * size)
        rows.append((f"{name}: notify {fragments} x {size} B", measured, bound, "s"))

        began = loop.time()
        for _ in range(fragments):
            await connection.write(fragment)
        measured = loop.time() - began
        for _ in range(fragments):
            received.get_nowait()
        # A Write Request of the fragment, its one-octet Write Response in the next event.
        bound = timing.session_time([(size, 1)] * fragments)
        rows.append((f"{name}: write {fragments} x {size} B", measured, bound, "s"))
        await connection.disconnect()
    link.remove_controller(controller)
    return rows


# -- 2 and 3. revocations --------------------------------------------------------------------


def revocation(version: int, target: Target) -> AuthorisationUpdate:
    now = int(time.time())
    return AuthorisationUpdate(
        kind=UpdateKind.REVOCATION,
        target=target,
        version=version,
        base_version=0,
        issued_at=now - 10,
        expires_at=now + 3600,
        revocations=(RevocationEntry(REVOKED_KEY, now + 90 * 86400),),
    )


def session_bounds(timing: BleTiming, traces: Sequence[Trace]) -> list[float]:
    """Each traced session's traffic timed by the model, from the first data event until
    the termination that frees its slot."""
    return [
        timing.session_time(exchanges_from_trace(trace.pdus), terminate=True) for trace in traces
    ]


async def until(check: Callable[[], bool], budget: float, what: str) -> None:
    """Poll ``check()`` until true; RuntimeError after ``budget`` seconds."""
    deadline = time.monotonic() + budget
    while not check():
        if time.monotonic() > deadline:
            msg = f"{what}: not reached in {budget:g} s"
            raise RuntimeError(msg)
        await asyncio.sleep(POLL)


async def fleet_revocation(
    gateway: GatewaySide,
    scheduler: Scheduler,
    recorder: TrafficRecorder,
    timing: BleTiming,
    args: argparse.Namespace,
) -> tuple[list[Row], list[str], asyncio.Task[None]]:
    """Figure 2: revoke a key on every device, in steady state: the scheduler has heard
    every device's adverts and made its start-up visits before the revocation is
    submitted. It keeps running (the task returned) for figure 3."""
    task = asyncio.create_task(scheduler.run(), name="scheduler")
    await until(
        lambda: (
            len(scheduler.views) == args.devices
            and all(view.last_session and view.advert_interval for view in scheduler.views.values())
            and scheduler.busy_slots == 0
        ),
        args.budget,
        "start-up visits",
    )
    began, cpu = time.time(), time.process_time()
    devices = await gateway.updates.submit("revoke-all", revocation(1, Target.site(SITE)))
    await scheduler.reload()
    propagation = gateway.reader.propagation("revoke-all")

    def confirmed() -> bool:
        nonlocal propagation
        propagation = gateway.reader.propagation("revoke-all")
        return all(row.state is PropagationState.APPLIED for row in propagation.values())

    await until(confirmed, args.budget, "fleet revocation")
    cpu = time.process_time() - cpu
    finished = max(row.updated_at for row in propagation.values())
    measured = finished - began
    traces = [t for t in recorder.since(began) if t.started <= finished]
    bounds = session_bounds(timing, traces)
    session = statistics.mean(bounds)
    count = len(devices)
    bound = sequence_bound_of(timing, count, args.slots, session)
    targeted = sequence_bound_of(timing, count, args.slots, session, initiator="targeted")
    durations = [t.ended - t.started for t in traces if t.ended is not None]
    rounds = -(-count // args.slots)
    interval, setup = timing.advertising_interval, timing.connection_setup
    per_slot = rounds * (setup + session)
    # The bound as first written: no advert wait between a slot's sessions (only before
    # the first) and sessions ending at their last PDU, not at the termination.
    traffic = statistics.mean(
        timing.session_time(exchanges_from_trace(trace.pdus)) for trace in traces
    )
    earlier = max(
        rounds * (setup + traffic) + interval / (count + 1),
        sum(interval / (waiting + 1) for waiting in range(count, 0, -1)) + count * setup + traffic,
    )
    notes = [
        (
            f"fleet revocation: {count} devices, {args.slots} slots, {len(traces)} sessions;"
            f" per session (first data event to the termination) model {session:.3f} s, measured"
            f" connection {statistics.mean(durations):.3f} s mean; CPU {cpu:.1f} s"
            f" of {measured:.1f} s"
        ),
        (
            f"  bound {bound:.1f} s: slots {rounds} x ({setup:.4f} +"
            f" {session:.3f}) = {per_slot:.1f} s plus the busiest slot's advert waits,"
            f" connecting to any waiting device; naming one device per connection (half an"
            f" advertising interval each) {targeted:.1f} s"
        ),
        (
            f"  against the bound without advert waits between a slot's sessions and without"
            f" the termination ({earlier:.1f} s): {measured / earlier:.2f}"
        ),
    ]
    rows: list[Row] = [
        ("fleet revocation, all confirmed", measured, bound, "s"),
        ("  the same, vs one-device-per-connection bound", measured, targeted, "s"),
    ]
    return rows, notes, task


async def urgent_revocations(
    *,
    gateway: GatewaySide,
    scheduler: Scheduler,
    fleet: Fleet,
    recorder: TrafficRecorder,
    timing: BleTiming,
    args: argparse.Namespace,
) -> tuple[list[Row], list[str]]:
    """Figure 3: every device logs a door event, so the slots fill with log collections;
    then, one at a time, a revocation for one device that is not being visited."""
    began = time.time()
    for device in fleet:
        device.open_door()
        device.close_door()
    delays: list[float] = []
    for trial in range(args.trials):
        await until(lambda: scheduler.busy_slots == args.slots, args.budget, "all slots busy")
        await asyncio.sleep(0.5)  # the slots' sessions under way, not all just starting
        target = pick_idle(scheduler, fleet)
        update_id = f"revoke-urgent-{trial}"
        submitted = time.time()
        await gateway.updates.submit(
            update_id, revocation(2 + trial, Target.device(target.device_id))
        )
        await scheduler.reload()
        address = target.address

        def session_started() -> bool:
            return any(t.peripheral == address for t in recorder.since(submitted))  # noqa: B023  # called within the iteration

        await until(session_started, args.budget, "urgent session")
        started = min(t.started for t in recorder.since(submitted) if t.peripheral == address)
        delays.append(started - submitted)
        await until(
            lambda: applied(gateway, update_id),  # noqa: B023  # awaited within the iteration
            args.budget,
            "urgent revocation confirmed",
        )
    routine = [t for t in recorder.since(began) if t.ended is not None and len(t.pdus) > 0]
    session = max(session_bounds(timing, routine))
    slot_busy = timing.expected_connect_time() + session
    bound = slot_busy + timing.worst_connect_time()
    # If the other slots' connects are queued at the radio ahead of it (one initiator, a
    # first-come first-served lock in BumbleRadio), each may hold it for a worst connect.
    queued = bound + (args.slots - 1) * timing.worst_connect_time()
    rows: list[Row] = [
        (f"urgent revocation start, mean of {len(delays)}", statistics.mean(delays), bound, "s"),
        ("urgent revocation start, max", max(delays), bound, "s"),
        ("  the same, vs bound with connects queued ahead", max(delays), queued, "s"),
    ]
    notes = [
        (
            f"urgent: bound = one routine session (expected connect"
            f" {timing.expected_connect_time():.3f} s + longest traffic {session:.3f} s)"
            f" + worst connect to the target {timing.worst_connect_time():.3f} s;"
            f" delays {', '.join(f'{d:.2f}' for d in delays)} s"
        ),
    ]
    return rows, notes


def applied(gateway: GatewaySide, update_id: str) -> bool:
    """Whether every device ``update_id`` is for confirmed it."""
    rows = gateway.reader.propagation(update_id).values()
    return all(row.state is PropagationState.APPLIED for row in rows)


def pick_idle(scheduler: Scheduler, fleet: Fleet) -> SimulatedDevice:
    """A device not connected and not being visited."""
    for device in fleet:
        view = scheduler.views.get(device.device_id)
        if view is not None and not view.busy and not device.connected:
            return device
    msg = "every device is busy"
    raise RuntimeError(msg)


async def revocations(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    timing = TYPICAL_LOCK
    link = ScalableLink(timing)
    fleet = Fleet(link, advertising_interval=timing.advertising_interval)
    fleet.create(DeviceKind.DOOR_LOCK, args.devices)
    recorder = TrafficRecorder(link, fleet)
    await fleet.start()
    try:
        async with gateway_side(fleet) as gateway:
            gateway.pair_directly(fleet)
            scheduler = gateway.scheduler(args.slots)
            rows, notes, task = await fleet_revocation(gateway, scheduler, recorder, timing, args)
            try:
                more_rows, more_notes = await urgent_revocations(
                    gateway=gateway,
                    scheduler=scheduler,
                    fleet=fleet,
                    recorder=recorder,
                    timing=timing,
                    args=args,
                )
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    finally:
        await fleet.stop()
    return rows + more_rows, notes + more_notes


async def bench(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    if not args.skip_transfers:
        rows += await transfers(TYPICAL_LOCK, "typical", args.fragments)
        rows += await transfers(BEST_CASE, "best", args.fragments)
    more_rows, more_notes = await revocations(args)
    return rows + more_rows, notes + more_notes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.revocation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--slots", type=int, default=5)
    parser.add_argument("--trials", type=int, default=5, help="urgent revocations to time")
    parser.add_argument("--fragments", type=int, default=40, help="fragments per transfer")
    parser.add_argument("--skip-transfers", action="store_true")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per wait, at most")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.devices < args.slots + 1 or args.slots < 1 or args.trials < 1:
        parser.error("need slots >= 1, devices > slots, trials >= 1")
    quiet_logs()
    load_before = load_average()
    rows, notes = asyncio.run(bench(args))
    report(
        f"bench.revocation: {args.devices} devices, {args.slots} slots, typical-lock timing"
        f" (load average at start {load_before})",
        rows,
        notes,
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
