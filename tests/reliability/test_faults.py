"""Faults, with real processes: the daemon, Mosquitto, the simulator over the virtual radio.

Every family counts what it measured (``figures``) and asserts the outcome the design
promises: nothing written on a device is lost, nothing is accepted twice, the outbox
drains, the store stays sound, updates finish; and where no protocol could succeed (a
link that drops before a session can carry one record, 5 % of bytes corrupted), that the
gateway stays up, stores nothing false, backs off and reports what it can.

The families: a broker outage during collection; the daemon killed with SIGKILL at
moments biased towards transfers and update pushes; links dropped every K frames and
corrupted fragments or bytes; devices that reboot mid-update, answer slowly, run hours
fast or slow, overflow their log. Besides, the store's close() against its worker thread.

The default run has a small variant of each family (about a minute in all). The
full-size runs are marked ``soak``, about ten minutes on two cores, one after the other::

    LOCKGW_FIGURES=figures.jsonl .venv/bin/pytest tests/reliability/test_faults.py \\
        -m soak -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gateway.store import Store, StoreError
from simulators.registry import CommandFailed
from tests.conftest import Schemas
from tests.installation import KEY, WAIT
from tests.reliability.conftest import Figures
from tests.reliability.harness import (
    Rig,
    integrity_problems,
    outbox_depth,
    rig,
    stored_events,
    tally,
)

BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 2.0
FAILED_EVENTS = ("session_failed", "connect_failed")
FAST_RETRIES = {"backoff_initial": f"{BACKOFF_INITIAL}s", "backoff_max": f"{BACKOFF_MAX}s"}


def _seconds(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(entry["timestamp"])).timestamp()


# ----------------------------------------------------------------------- link drops


async def _link_drops(
    root: Path, schemas: Schemas, figures: Figures, *, ks: list[int], events: int, within: float
) -> None:
    """One device per K, its link dropped after every K frames, ``events`` in its log."""
    async with rig(root, schemas, locks=len(ks), scheduler={"slots": 4, **FAST_RETRIES}) as r:
        k_of = dict(zip(r.devices, ks, strict=True))
        for device, k in k_of.items():
            await r.command(cmd="fault", device_id=device, fill_log=events, drop_after_frames=k)
        started = time.monotonic()
        await r.start()
        handshake, can_progress = await _drain_progressing(r, k_of, within)
        elapsed = time.monotonic() - started
        entries = _log_entries(r)
        written = await r.written()
        counted = tally(r.registry, written)
        per_k: dict[str, dict[str, int]] = {}
        for device, k in k_of.items():
            mine = [e for e in entries if e.get("device_id") == device]
            per_k[str(k)] = {
                "collected": len(r.registry.events.get(device, {})),
                "written": written[device],
                "sessions": sum(e["event"] == "session_started" for e in mine),
                "failed": sum(e["event"] == "session_failed" for e in mine),
            }
        stuck = [device for device, k in k_of.items() if k not in can_progress]
        retry_gaps: dict[str, float] = {}
        for device in stuck:
            # No protocol progresses over this link: nothing collected, nothing invented,
            # and the gateway keeps trying at a backed-off pace, not in a tight loop.
            assert device not in r.registry.events
            attempts = sorted(
                _seconds(e)
                for e in entries
                if e.get("device_id") == device
                and e["event"] in ("session_failed", "connect_failed")
            )
            assert len(attempts) >= 2, (k_of[device], attempts)
            span = attempts[-1] - attempts[0]
            assert len(attempts) - 1 <= span / (BACKOFF_INITIAL / 2) + 1
            # Not abandoned either: tried again within the backoff ceiling plus the wait
            # for a free connection slot (the other links hold them).
            longest = max(b - a for a, b in itertools.pairwise(attempts))
            assert longest < BACKOFF_MAX + 30.0, (k_of[device], longest)
            retry_gaps[str(k_of[device])] = round(longest, 1)
        for device in r.devices:
            if device in stuck:
                continue
            sequences = sorted(r.registry.events[device])
            assert sequences == list(range(written[device])), "no gap, no duplicate"
        assert r.registry.gaps == []
        assert not [a for a in r.registry.alarms if a["alarm"] in ("chain_broken", "log_gap")]
        failures = [e for e in entries if e["event"] == "session_failed"]
        assert all(e.get("error_code") not in (None, "[redacted]") for e in failures)
        assert r.daemon is not None
        assert r.daemon.returncode is None
    progressing = sorted(can_progress)
    figures(
        "link_drops",
        ks=ks,
        events_per_device=events,
        handshake_frames=handshake,
        # A session needs the handshake, one LogRead and a batch of at least one record,
        # which is one fragment at MTU 247 (172 bytes before framing and the AEAD tag).
        smallest_k_needed=handshake + 2,
        smallest_k_progressing=progressing[0] if progressing else None,
        ks_without_progress=sorted(k for k in ks if k not in can_progress),
        written=counted.written,
        collected=counted.unique,
        lost_on_progressing_links=counted.lost - sum(written[d] for d in stuck),
        duplicates=counted.duplicates,
        redelivered=counted.redelivered,
        seconds=round(elapsed, 1),
        per_k=per_k,
        longest_retry_interval_without_progress=retry_gaps,
    )


async def _drain_progressing(r: Rig, k_of: dict[str, int], within: float) -> tuple[int, set[int]]:
    """Wait until every device whose link can carry a session has been drained.

    The handshake's frame count is what the devices measured; a link carrying fewer than
    the handshake, one LogRead and a one-fragment batch cannot progress."""
    deadline = time.monotonic() + within
    while True:
        status = await r.status()
        measured = {s["handshake_frames"].get("normal") for s in status.values()} - {None}
        if measured:
            assert len(measured) == 1, measured
            [handshake] = measured
            can_progress = {k for k in k_of.values() if k >= handshake + 2}
            pending = [
                device
                for device, k in k_of.items()
                if k in can_progress
                and sorted(r.registry.events.get(device, {}))
                != list(range(status[device]["next_sequence"]))
            ]
            # Where the link also carries the acknowledgement that follows (one frame
            # more), the device's log is freed too, even when the acknowledgement of the
            # last batch was lost: a later visit acknowledges what the gateway holds.
            pending += [
                device
                for device, k in k_of.items()
                if k >= handshake + 3 and status[device]["records_waiting"]
            ]
            if not pending:
                return handshake, can_progress
        else:
            pending = list(k_of)
        if time.monotonic() > deadline:
            detail = {k_of[d]: len(r.registry.events.get(d, {})) for d in pending}
            msg = f"links not drained within {within} s: {detail}"
            raise AssertionError(msg)
        await asyncio.sleep(0.5)


def _log_entries(r: Rig) -> list[dict[str, Any]]:
    entries = []
    for line in r.log.path.read_bytes().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "event" in entry:
            entries.append(entry)
    return entries


async def test_link_drops_sample(tmp_path: Path, schemas: Schemas, figures: Figures) -> None:
    await _link_drops(
        tmp_path, schemas, figures, ks=[1, 2, 3, 5, 8, 13, 21, 34, 50], events=50, within=45
    )


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_link_drops_every_k(tmp_path: Path, schemas: Schemas, figures: Figures) -> None:
    await _link_drops(tmp_path, schemas, figures, ks=list(range(1, 51)), events=300, within=480)


async def _corruption(
    root: Path, schemas: Schemas, figures: Figures, *, devices: int, events: int
) -> None:
    """5 % of the fragments a device sends have one bit flipped (the simulator's knob is
    per fragment); then, on one more device, 5 % of the bytes (each byte independently)."""
    fragment_probability = 0.05
    byte_probability = 0.05
    async with rig(root, schemas, locks=devices + 1, scheduler=FAST_RETRIES) as r:
        noisy, hopeless = r.devices[:devices], r.devices[devices]
        for index, device in enumerate(noisy):
            await r.command(
                cmd="fault",
                device_id=device,
                fill_log=events,
                corrupt_probability=fragment_probability,
                seed=index,
            )
        await r.command(
            cmd="fault", device_id=hopeless, fill_log=events, corrupt_byte_probability=0.05
        )
        started = time.monotonic()
        await r.start()
        deadline = time.monotonic() + 60 + devices * events / 20
        while True:
            written = await r.written()
            counted = tally(r.registry, {d: written[d] for d in noisy})
            if counted.unique == counted.written or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        elapsed = time.monotonic() - started
        for _ in range(3):  # the hopeless link is tried again and again, never trusted
            entry = await r.log.wait_for(
                lambda e: e.get("event") in FAILED_EVENTS and e.get("device_id") == hopeless,
                WAIT,
            )
            assert entry is not None
        entries = _log_entries(r)
        failures = Counter(
            str(e.get("error_code"))
            for e in entries
            if e["event"] == "session_failed" and e.get("device_id") in noisy
        )
        hopeless_codes = Counter(
            str(e.get("error_code"))
            for e in entries
            if e["event"] in FAILED_EVENTS and e.get("device_id") == hopeless
        )
        hopeless_attempts = sum(hopeless_codes.values())
        hopeless_handshakes = sum(
            e["event"] == "session_started" and e.get("device_id") == hopeless for e in entries
        )
        assert counted.lost == counted.duplicates == counted.gaps == 0, counted
        assert hopeless not in r.registry.events
        assert not [a for a in r.registry.alarms if a["alarm"] in ("chain_broken", "log_gap")]
        assert r.registry.failures == []
    figures(
        "link_corruption",
        devices=devices,
        events_per_device=events,
        corrupted_fragments=fragment_probability,
        # One byte of a corrupted fragment: the byte share is the fragment share over the
        # fragment length, 0.05 / 244 for full fragments at MTU 247.
        corrupted_bytes_at_full_fragments=round(fragment_probability / 244, 6),
        written=counted.written,
        collected=counted.unique,
        lost=counted.lost,
        duplicates=counted.duplicates,
        redelivered=counted.redelivered,
        sessions_failed_by_code=dict(failures),
        seconds=round(elapsed, 1),
        # 5 % of bytes: a fragment of n bytes arrives intact with probability 0.95 ** n,
        # and every fragment is authenticated.
        per_byte_probability=byte_probability,
        intact_fragment_probability_20_bytes=round(0.95**20, 3),
        intact_fragment_probability_244_bytes=float(f"{0.95**244:.2g}"),
        per_byte_sessions_attempted=hopeless_attempts,
        per_byte_handshakes_completed=hopeless_handshakes,
        per_byte_failed_by_code=dict(hopeless_codes),
        per_byte_collected=0,
    )


async def test_link_corruption_small(tmp_path: Path, schemas: Schemas, figures: Figures) -> None:
    await _corruption(tmp_path, schemas, figures, devices=3, events=150)


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_link_corruption(tmp_path: Path, schemas: Schemas, figures: Figures) -> None:
    await _corruption(tmp_path, schemas, figures, devices=10, events=400)


# ------------------------------------------------------------------- broker outage


async def _broker_outage(
    root: Path, schemas: Schemas, figures: Figures, *, devices: int, events: int, outage: float
) -> None:
    """Mosquitto stopped during collection for ``outage`` seconds, then started again."""
    async with rig(root, schemas, locks=devices) as r:
        await r.each(r.devices, cmd="fault", fill_log=events)
        started = time.monotonic()
        await r.start()
        first = await r.log.wait_for(lambda e: e.get("event") == "log_read", WAIT)
        assert first is not None, "collection never started"
        r.broker.stop()
        stopped = time.monotonic()
        at_stop = stored_events(r.store)
        peak = 0
        while time.monotonic() - stopped < outage:
            peak = max(peak, outbox_depth(r.store))
            await asyncio.sleep(0.25)
        at_restart = stored_events(r.store)
        r.broker.start()
        restarted = time.monotonic()
        counted = await r.all_collected(60 + devices * events / 200)
        collected = time.monotonic()
        depth = await r.drained(WAIT)
        drained = time.monotonic()
        assert depth == 0, "the outbox drained"
        assert counted.lost == 0
        assert counted.duplicates == 0
        assert counted.gaps == 0
        assert r.registry.gaps == []
        assert at_restart > at_stop, "collection went on into the store during the outage"
    figures(
        "broker_outage",
        devices=devices,
        events_per_device=events,
        written=counted.written,
        received=counted.received,
        unique=counted.unique,
        lost=counted.lost,
        duplicates=counted.duplicates,
        redelivered=counted.redelivered,
        outage_seconds=round(restarted - stopped, 1),
        stored_during_outage=at_restart - at_stop,
        outbox_peak=peak,
        outbox_after=depth,
        seconds_to_all_received_after_restart=round(collected - restarted, 1),
        seconds_to_drained_after_restart=round(drained - restarted, 1),
        seconds_total=round(drained - started, 1),
    )


async def test_broker_outage_small(tmp_path: Path, schemas: Schemas, figures: Figures) -> None:
    await _broker_outage(tmp_path, schemas, figures, devices=5, events=50, outage=2.0)


@pytest.mark.soak
@pytest.mark.timeout(900)
async def test_broker_outage_50_devices(tmp_path: Path, schemas: Schemas, figures: Figures) -> None:
    await _broker_outage(tmp_path, schemas, figures, devices=50, events=500, outage=5.0)


# ------------------------------------------------------------------------ SIGKILL


def _moment(phases: dict[str, str]) -> str:
    """What the daemon was doing when it died, from its log: the busiest phase wins."""
    for phase, name in (("update", "mid_update"), ("transfer", "mid_transfer")):
        if phase in phases.values():
            return name
    return "mid_session" if phases else "idle"


async def _produce(r: Rig, rng: random.Random, stop: asyncio.Event) -> int:
    """Door traffic on random devices until ``stop``; how many commands were sent."""
    sent = 0
    while not stop.is_set():
        device = rng.choice(r.devices)
        await r.command(cmd="door", device_id=device, state=rng.choice(["open", "closed"]))
        sent += 1
        await asyncio.sleep(rng.uniform(0.02, 0.1))
    return sent


async def _revoke(r: Rig, update_id: str) -> bool:
    """One revocation from the registry; whether a gateway accepted it."""
    now = int(time.time())
    try:
        answer = await r.registry.revoke(
            update_id, [KEY], now + 90 * 86400, now + 7 * 86400, timeout=WAIT
        )
    except CommandFailed:
        return False  # the gateway died before answering: the registry sends a newer one
    return bool(answer["status"] == "ok")


async def _sigkill(
    root: Path, schemas: Schemas, figures: Figures, *, devices: int, kills: int, seed: int
) -> None:
    rng = random.Random(seed)
    moments: Counter[str] = Counter()
    aims: Counter[str] = Counter()
    integrity_ok = 0
    revokes: dict[str, asyncio.Task[bool]] = {}
    unfinished_at_a_kill: set[str] = set()
    stop = asyncio.Event()
    async with rig(root, schemas, locks=devices, scheduler=FAST_RETRIES) as r:
        await r.each(r.devices, cmd="fault", fill_log=100)
        producer = asyncio.create_task(_produce(r, random.Random(seed + 1), stop))
        started = time.monotonic()
        try:
            for index in range(kills):
                await r.start()
                aim = rng.choices(["transfer", "update", "anywhere"], weights=[4, 3, 3])[0]
                aims[aim] += 1
                if aim == "transfer":
                    waiting = {d: s["records_waiting"] for d, s in (await r.status()).items()}
                    device = rng.choice(r.devices)
                    if waiting[device] < 500:
                        await r.command(
                            cmd="fault", device_id=device, fill_log=rng.randint(50, 400)
                        )
                    await r.log.wait_for(lambda e: e.get("event") == "log_read", 5.0)
                elif aim == "update":
                    await r.online()
                    update_id = f"revoke-{index}"
                    revokes[update_id] = asyncio.create_task(_revoke(r, update_id))
                    await r.log.wait_for(lambda e: e.get("event") == "update_push", 5.0)
                else:
                    await asyncio.sleep(rng.uniform(0.0, 2.5))
                await asyncio.sleep(rng.uniform(0.0, 0.05))
                await r.kill()
                r.log.read()  # everything the daemon wrote before it died
                moments[_moment(r.log.phases)] += 1
                unfinished_at_a_kill |= {
                    update_id
                    for update_id in r.registry.progress
                    if r.registry.coverage(update_id)["applied"] < devices
                }
                problems = integrity_problems(r.store)
                assert problems == [], (index, problems)
                integrity_ok += 1
        finally:
            stop.set()
            await producer
        await r.start()
        await r.online()
        final = "revoke-final"
        assert await _revoke(r, final)
        accepted = {u for u, task in revokes.items() if task.done() and task.result()}
        await asyncio.gather(*revokes.values())
        accepted |= {u for u, task in revokes.items() if task.result()}
        tracked = accepted | set(r.registry.progress) | {final}
        await r.registry.wait_for(
            lambda: all(r.registry.coverage(u)["applied"] == devices for u in tracked),
            60,
            "every update applied on every device",
        )
        counted = await r.all_collected(120)
        depth = await r.drained(WAIT)
        status = await r.status()
        versions = {s["revocation_version"] for s in status.values()}
        assert versions == {r.registry.revocation_version}, versions
        assert counted.lost == 0
        assert counted.duplicates == 0
        assert counted.gaps == 0
        assert depth == 0
        assert r.registry.gaps == []
        failed = [
            (u, d, p.error_code)
            for u, by_device in r.registry.progress.items()
            for d, p in by_device.items()
            if p.state != "applied"
        ]
        assert failed == []
        assert integrity_problems(r.store) == []
        elapsed = time.monotonic() - started
    figures(
        "sigkill",
        devices=devices,
        kills=kills,
        aimed=dict(aims),
        mid_transfer=moments["mid_transfer"],
        mid_update=moments["mid_update"],
        mid_session=moments["mid_session"],
        idle=moments["idle"],
        events=counted.written,
        received=counted.received,
        lost=counted.lost,
        duplicates=counted.duplicates,
        redelivered=counted.redelivered,
        integrity_ok=integrity_ok,
        updates_sent=len(revokes) + 1,
        updates_accepted=len(tracked),
        updates_unfinished_at_a_kill=len(unfinished_at_a_kill),
        updates_resumed=len(unfinished_at_a_kill & tracked),
        revocation_version=r.registry.revocation_version,
        seconds=round(elapsed, 1),
    )


async def test_sigkill_small(tmp_path: Path, schemas: Schemas, figures: Figures) -> None:
    await _sigkill(tmp_path, schemas, figures, devices=3, kills=5, seed=7)


@pytest.mark.soak
@pytest.mark.timeout(1200)
async def test_sigkill_200_times(tmp_path: Path, schemas: Schemas, figures: Figures) -> None:
    await _sigkill(tmp_path, schemas, figures, devices=6, kills=210, seed=2026)


# ------------------------------------------------------------------------ devices


def _applied(r: Rig, device: str, event: str = "REVOCATION_LIST_APPLIED") -> Counter[str]:
    """How many times the device logged applying each version (its payload)."""
    return Counter(
        e["payload"] for e in r.registry.events.get(device, {}).values() if e["event"] == event
    )


async def _applied_everywhere(r: Rig, update_id: str, devices: int) -> None:
    await r.registry.wait_for(
        lambda: r.registry.coverage(update_id)["applied"] == devices,
        WAIT,
        f"{update_id} applied on every device",
    )


async def _reboots_mid_update(
    root: Path, schemas: Schemas, figures: Figures, *, reboots: int
) -> None:
    """Power off while an update is on its way, on again later.

    The device holds each answer back for a second, so the power goes off before the
    device applied the update, or after it did but before its answer left: the gateway
    then learns only at the next visit that the update is there."""
    outcomes: Counter[str] = Counter()
    rounds: list[tuple[float, str]] = []
    async with rig(root, schemas, locks=2, scheduler=FAST_RETRIES) as r:
        victim, _ = r.devices
        await r.start()
        await r.online()
        for index in range(reboots):
            await r.command(cmd="fault", device_id=victim, answer_delay=1.0)
            update_id = f"revoke-reboot-{index}"
            revoke = asyncio.create_task(_revoke(r, update_id))
            pushed = await r.log.wait_for(_pushing(victim, update_id), WAIT)
            assert pushed is not None
            await asyncio.sleep(REBOOT_AFTER[index % len(REBOOT_AFTER)])
            await r.command(cmd="power", device_id=victim, on=False)
            [summary] = (await r.command(cmd="status", device_id=victim))["devices"]
            held = summary["revocation_version"] == r.registry.revocation_version
            seen: list[str] = []

            def ended(entry: dict[str, Any], seen: list[str] = seen) -> bool:
                if entry.get("device_id") != victim:
                    return False
                seen.append(str(entry["event"]))
                return entry["event"] in (*FAILED_EVENTS, "session_done")

            assert await r.log.wait_for(ended, WAIT) is not None
            answered = "log_read" in seen or "session_done" in seen
            if not held:
                outcome = "not_applied_when_cut"
            else:
                outcome = "applied_answer_lost" if not answered else "applied_and_answered"
            outcomes[outcome] += 1
            rounds.append((REBOOT_AFTER[index % len(REBOOT_AFTER)], outcome))
            await r.command(cmd="fault", device_id=victim, clear=True)
            await r.command(cmd="power", device_id=victim, on=True)
            assert await revoke
            await _applied_everywhere(r, update_id, 2)
        counted = await r.all_collected(WAIT)
        status = await r.status()
        applied = _applied(r, victim)
    # Each version applied exactly once on the device that rebooted, none failed.
    assert all(count == 1 for count in applied.values()), applied
    assert len(applied) == reboots
    assert {s["revocation_version"] for s in status.values()} == {reboots}
    assert counted.lost == counted.duplicates == 0
    assert all(p.state == "applied" for by in r.registry.progress.values() for p in by.values()), (
        r.registry.progress
    )
    assert outcomes["applied_answer_lost"] >= 1, outcomes
    figures(
        "device_reboot_mid_update",
        reboots=reboots,
        **outcomes,
        updates_applied_once=sum(count == 1 for count in applied.values()),
        applied_twice=sum(count > 1 for count in applied.values()),
        failed=0,
        lost=counted.lost,
        duplicates=counted.duplicates,
        outcomes_by_seconds_after_push={
            str(after): dict(Counter(outcome for at, outcome in rounds if at == after))
            for after in REBOOT_AFTER
        },
    )


def _pushing(device: str, update_id: str) -> Callable[[dict[str, Any]], bool]:
    """Matches the daemon's log line of pushing ``update_id`` to ``device``."""

    def match(entry: dict[str, Any]) -> bool:
        return entry.get("update_id") == update_id and entry.get("device_id") == device

    return match


REBOOT_AFTER = (0.5, 0.0, 0.25, 0.75)
"""Seconds from the update's push to the power going off, in turn."""


async def test_device_reboots_mid_update(
    tmp_path: Path, schemas: Schemas, figures: Figures
) -> None:
    await _reboots_mid_update(tmp_path, schemas, figures, reboots=4)


@pytest.mark.soak
@pytest.mark.timeout(600)
async def test_device_reboots_mid_update_many(
    tmp_path: Path, schemas: Schemas, figures: Figures
) -> None:
    await _reboots_mid_update(tmp_path, schemas, figures, reboots=40)


IDLE_TIMEOUT = 1.0


async def test_device_answers_slowly(tmp_path: Path, schemas: Schemas, figures: Figures) -> None:
    """Below the gateway's idle timeout a slow device is collected; above it every session
    times out, backs off, stores nothing, and the device is collected once it recovers."""
    scheduler = {"session_idle_timeout": f"{IDLE_TIMEOUT}s", **FAST_RETRIES}
    async with rig(tmp_path, schemas, locks=2, scheduler=scheduler) as r:
        slow, slower = r.devices
        await r.command(cmd="fault", device_id=slow, fill_log=20, answer_delay=IDLE_TIMEOUT * 0.4)
        await r.command(cmd="fault", device_id=slower, fill_log=20, answer_delay=IDLE_TIMEOUT * 1.5)
        started = time.monotonic()
        await r.start()
        written = await r.written()
        await r.registry.wait_for(
            lambda: len(r.registry.events.get(slow, {})) == written[slow],
            WAIT,
            "the slow device collected",
        )
        below_seconds = time.monotonic() - started
        timed_out = 0
        while timed_out < 3:
            entry = await r.log.wait_for(
                lambda e: e.get("event") in FAILED_EVENTS and e.get("device_id") == slower, WAIT
            )
            assert entry is not None
            assert entry["error_code"] == "BUSY", entry  # the idle timeout, typed
            timed_out += 1
        assert slower not in r.registry.events
        await r.command(cmd="fault", device_id=slower, clear=True)
        counted = await r.all_collected(WAIT)
        assert counted.lost == counted.duplicates == counted.gaps == 0
    figures(
        "device_slow",
        idle_timeout=IDLE_TIMEOUT,
        delay_below=IDLE_TIMEOUT * 0.4,
        seconds_to_collect_below=round(below_seconds, 1),
        delay_above=IDLE_TIMEOUT * 1.5,
        sessions_timed_out_above=timed_out,
        collected_while_above=0,
        collected_after_recovery=counted.unique,
        lost=counted.lost,
        duplicates=counted.duplicates,
    )


DRIFT = 3 * 3600


async def test_device_clock_drifted_by_hours(
    tmp_path: Path, schemas: Schemas, figures: Figures
) -> None:
    """Clocks three hours behind and ahead, with door events logged at the wrong time, at
    a gateway installed a day ago."""
    async with rig(tmp_path, schemas, locks=2, certificate_age=86400) as r:
        behind, ahead = r.devices
        await r.command(cmd="fault", device_id=behind, shift_clock=-DRIFT, fill_log=10)
        await r.command(cmd="fault", device_id=ahead, shift_clock=DRIFT, fill_log=10)
        await r.start()
        counted = await r.all_collected(WAIT)
        alarms = await _drift_alarms(r, {behind, ahead})
        status = await r.status()
        now = time.time()
        assert counted.lost == counted.duplicates == counted.gaps == 0
    # Behind: wound forward to the gateway's time. Ahead: a clock never goes back below
    # the time of its newest record (it logged three hours ahead), so the gateway reports
    # the drift it cannot correct, and collects the log all the same.
    assert abs(status[behind]["clock"] - now) < 60
    assert alarms[behind]["corrected"] is True
    assert abs(alarms[behind]["drift_ms"] / 1000 + DRIFT) < 60
    assert alarms[ahead]["corrected"] is False
    assert alarms[ahead]["error_code"] == "TIME_BELOW_FLOOR"
    assert abs(alarms[ahead]["drift_ms"] / 1000 - DRIFT) < 60
    figures(
        "device_clock_drift",
        drift_seconds=DRIFT,
        behind_corrected=alarms[behind]["corrected"],
        behind_clock_error_after=round(status[behind]["clock"] - now),
        ahead_corrected=alarms[ahead]["corrected"],
        ahead_clock_error_after=round(status[ahead]["clock"] - now),
        collected=counted.unique,
        lost=counted.lost,
        duplicates=counted.duplicates,
    )


async def test_device_clock_behind_a_new_certificate(
    tmp_path: Path, schemas: Schemas, figures: Figures
) -> None:
    """A clock three hours behind a certificate issued minutes ago: the device refuses the
    gateway's certificate as not yet valid, so no session (and no time sync) is possible;
    the gateway reports it once, keeps trying at a backed-off pace, stores nothing."""
    async with rig(tmp_path, schemas, locks=1, scheduler=FAST_RETRIES) as r:
        [device] = r.devices
        await r.command(cmd="fault", device_id=device, shift_clock=-DRIFT)
        await r.start()
        alarms = await _drift_alarms(r, {device})
        refused = 0
        while refused < 3:
            entry = await r.log.wait_for(lambda e: e.get("event") in FAILED_EVENTS, WAIT)
            assert entry is not None
            assert entry["error_code"] == "CERT_NOT_YET_VALID", entry
            refused += 1
        reported = [a for a in r.registry.alarms if a["alarm"] == "clock_drift"]
        assert device not in r.registry.events
    assert alarms[device] == {
        "drift_ms": None,
        "clock_was_set": True,
        "corrected": False,
        "error_code": "CERT_NOT_YET_VALID",
    }
    assert len(reported) == 1, "reported once, not at every attempt"
    figures(
        "device_clock_behind_new_certificate",
        drift_seconds=-DRIFT,
        certificate_valid_since_seconds=300,
        sessions_refused=refused,
        alarms=len(reported),
        collected=0,
    )


async def _drift_alarms(r: Rig, devices: set[str]) -> dict[str, dict[str, Any]]:
    """The clock_drift alarm detail of each of ``devices``, once all have one."""
    await r.registry.wait_for(
        lambda: (
            {a["device_id"] for a in r.registry.alarms if a["alarm"] == "clock_drift"} >= devices
        ),
        WAIT,
        "the drifts reported",
    )
    return {a["device_id"]: a["detail"] for a in r.registry.alarms if a["alarm"] == "clock_drift"}


async def test_device_log_overflows(tmp_path: Path, schemas: Schemas, figures: Figures) -> None:
    """More records than the ring buffer holds before the gateway comes: the loss is
    reported (a gap alarm with its count, the overflow alarm) and nothing is collected
    twice, then or later."""
    async with rig(tmp_path, schemas, locks=1) as r:
        [device] = r.devices
        capacity = 2000  # the simulated lock's ring buffer
        await r.command(cmd="fault", device_id=device, fill_log=capacity + 300)
        await r.start()
        await r.registry.wait_for(lambda: bool(r.registry.gaps), WAIT, "the gap reported")
        await r.registry.wait_for(
            lambda: {"log_gap", "log_overflow"} <= {a["alarm"] for a in r.registry.alarms},
            WAIT,
            "the gap and overflow alarms",
        )
        written = (await r.written())[device]
        [gap] = r.registry.gaps
        held = sorted(r.registry.events[device])
        await r.command(cmd="fault", device_id=device, fill_log=50)
        await r.registry.wait_for(
            lambda: len(r.registry.events[device]) == len(held) + 50, WAIT, "the later records"
        )
        later = sorted(r.registry.events[device])
    assert gap.first_missing == 0  # never collected before: the loss starts at the start
    assert gap.count >= written - capacity  # at least what the ring buffer could not hold
    assert held == list(range(gap.first_missing + gap.count, written))
    assert later == list(range(gap.first_missing + gap.count, written + 50))
    assert r.registry.received[device] == len(later), "nothing received twice"
    figures(
        "device_log_overflow",
        capacity=capacity,
        written=written + 50,
        overwritten_reported=gap.count,
        collected=len(later),
        received=r.registry.received[device],
        duplicates=r.registry.received[device] - len(later),
        alarms=sorted({a["alarm"] for a in r.registry.alarms}),
    )


# ------------------------------------------------------------------------- store


def test_store_close_waits_for_the_transaction_under_way(tmp_path: Path) -> None:
    """Closing the store from another thread while its worker is inside SQLite waits for
    that transaction instead of freeing the connection under it (which crashed the process
    once, under load)."""
    store = Store.open(tmp_path / "lockgw.sqlite3")
    inside, release = threading.Event(), threading.Event()

    def hold() -> int:
        inside.set()
        release.wait(10)
        return 0

    # A hook that runs inside SQLite, during the INSERT of kv_set's transaction.
    connection = store._connection()  # the store's own connection, where the hook must be
    connection.create_function("hold", 0, hold)
    connection.execute("CREATE TEMP TRIGGER held AFTER INSERT ON kv BEGIN SELECT hold(); END")
    with ThreadPoolExecutor(max_workers=2) as pool:
        writing = pool.submit(store.kv_set, "key", b"value")
        assert inside.wait(10)
        closing = pool.submit(store.close)
        # A negative can only be shown by waiting: close() has not returned meanwhile.
        with pytest.raises(FutureTimeout):
            closing.result(timeout=0.5)
        release.set()
        writing.result(timeout=10)
        closing.result(timeout=10)
    with pytest.raises(StoreError, match="closed"):
        store.kv_get("key")
    with Store.open(tmp_path / "lockgw.sqlite3") as reopened:
        assert reopened.kv_get("key") == b"value"
        assert reopened.integrity_check() == []
