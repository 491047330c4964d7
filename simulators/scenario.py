"""Care-visit traffic for a site, reproducible from a seed, on an accelerated clock.

A site has residents, each with a door lock and perhaps a key safe and a medicine cabinet,
and an office key cabinet holding residents' keys. Staff work in three shifts; each staff
key carries a 2-factor activation renewed at the start of every shift, and the access list
gives each key its shift's schedule (:meth:`Scenario.access_entries`).

Each resident is visited in the morning, at lunch and in the evening, and sometimes on a
night patrol. A visit: the key is fetched from the office cabinet (sometimes), the staff
key is presented at the door, the door opens and closes, the key safe or the medicine
cabinet is opened (sometimes), the staff member leaves and locks up, the key goes back.
Now and then a key is refused (an activation not renewed, a colleague from another shift)
and a colleague with the right key comes instead; rarely a device is tampered with or its
battery runs low.

:class:`Scenario` generates the :class:`Action` list; :func:`apply` performs one action on
a fleet's device; :class:`SimClock` is a clock running ``speed`` times real time, which
devices use as their host time so that a simulated day passes in seconds;
:class:`ScenarioRunner` applies the actions as simulated time passes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from protocols.access import Activation, Decision
from protocols.enums import DeviceKind, Reason
from protocols.envelopes import AccessEntry, ScheduleWindow
from protocols.identity import DeviceIdentity
from protocols.messages import DoorState, LockState
from protocols.pairing import PairingCode
from simulators.device import DeviceClock, VirtualDevice
from simulators.node import Fleet

__all__ = [
    "Action",
    "ActionKind",
    "Outcome",
    "Rates",
    "Resident",
    "Scenario",
    "ScenarioRunner",
    "Shift",
    "SimClock",
    "Site",
    "StaffKey",
    "apply",
]

logger = logging.getLogger(__name__)

DAY: Final = 86_400
ALL_DAYS: Final = 0x7F


# --------------------------------------------------------------------------------------------
# The accelerated clock
# --------------------------------------------------------------------------------------------


class SimClock:
    """Simulated time: ``start`` (unix seconds) plus ``speed`` simulated seconds per real
    second. Call it (or :meth:`now`) as a :class:`~simulators.device.DeviceClock` source.

    Speed 0 stops the clock; :meth:`set` and :meth:`advance` move it by hand. Tests that
    step through a scenario use those; a simulator process lets it run.
    """

    def __init__(
        self,
        start: float | None = None,
        speed: float = 1.0,
        *,
        real: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (math.isfinite(speed) and speed >= 0):
            msg = f"speed must be a finite number >= 0, got {speed!r}"
            raise ValueError(msg)
        self._real = real
        self._base_real = real()
        self._base = time.time() if start is None else float(start)
        self._speed = float(speed)
        self._waiters: list[asyncio.Future[None]] = []

    def now(self) -> float:
        """Simulated unix time."""
        return self._base + (self._real() - self._base_real) * self._speed

    def __call__(self) -> float:
        return self.now()

    @property
    def speed(self) -> float:
        """Simulated seconds per real second; setting it keeps the current time."""
        return self._speed

    @speed.setter
    def speed(self, value: float) -> None:
        """Change the rate from now on; the simulated time so far stays."""
        if not (math.isfinite(value) and value >= 0):
            msg = f"speed must be a finite number >= 0, got {value!r}"
            raise ValueError(msg)
        now = self.now()  # the time so far stays; only the rate changes
        self._speed = float(value)
        self.set(now)

    def set(self, simulated: float) -> None:
        """Jump to ``simulated``. Devices never log backwards (their floor holds), but a
        jump back makes their clocks disagree with their logs: jump forward."""
        self._base_real = self._real()
        self._base = float(simulated)
        self._moved()

    def advance(self, seconds: float) -> None:
        """Jump ``seconds`` ahead."""
        self.set(self.now() + seconds)

    def real_delay(self, simulated: float) -> float:
        """Real seconds until ``simulated`` (0 if it has passed, inf if the clock stands)."""
        ahead = simulated - self.now()
        if ahead <= 0:
            return 0.0
        return math.inf if self._speed == 0 else ahead / self._speed

    async def sleep_until(self, simulated: float) -> None:
        """Until the clock reads ``simulated``; a jump or a change of speed wakes the
        sleeper to reckon again (a stopped clock waits for one)."""
        loop = asyncio.get_running_loop()
        while (delay := self.real_delay(simulated)) > 0:
            moved: asyncio.Future[None] = loop.create_future()
            self._waiters.append(moved)
            try:
                await asyncio.wait([moved], timeout=None if math.isinf(delay) else delay)
            finally:
                moved.cancel()
                self._waiters.remove(moved)

    def _moved(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


# --------------------------------------------------------------------------------------------
# The site
# --------------------------------------------------------------------------------------------


class Shift(StrEnum):
    """A staff shift; its schedule windows in :data:`SHIFT_MINUTES`."""

    DAY = "day"
    EVENING = "evening"
    NIGHT = "night"

    @property
    def minutes(self) -> tuple[tuple[int, int], ...]:
        """The shift's (start, end) local minutes; the first window starts it."""
        return SHIFT_MINUTES[self]

    @property
    def windows(self) -> tuple[ScheduleWindow, ...]:
        """The shift's schedule windows in an access entry, every day of the week."""
        return tuple(ScheduleWindow(ALL_DAYS, start, end) for start, end in self.minutes)

    @property
    def length(self) -> int:
        """Seconds an instance of the shift lasts."""
        return sum(end - start for start, end in self.minutes) * 60

    def covers(self, minute: int) -> bool:
        """Whether local ``minute`` of the day is within the shift's hours."""
        return any(start <= minute < end for start, end in self.minutes)

    def instance(self, when: int, day_start: int) -> tuple[int, int]:
        """Start and end (unix seconds) of the instance of this shift covering ``when``,
        on the calendar of days beginning at ``day_start``."""
        day = day_start + (when - day_start) // DAY * DAY
        start = day + self.minutes[0][0] * 60
        if start > when:  # the instance that began the day before (night shift)
            start -= DAY
        return start, start + self.length


SHIFT_MINUTES: Final[dict[Shift, tuple[tuple[int, int], ...]]] = {
    Shift.DAY: ((360, 960),),  # 06:00-16:00
    Shift.EVENING: ((840, 1440),),  # 14:00-24:00
    Shift.NIGHT: ((1320, 1440), (0, 480)),  # 22:00-08:00: no window crosses midnight
}
"""Local (start, end) minutes of each shift; the first window starts the shift."""


@dataclass(frozen=True)
class StaffKey:
    """A staff member's key and the shift it belongs to."""

    key_id: int
    shift: Shift


@dataclass(frozen=True)
class Resident:
    """A resident's devices: a door lock, perhaps a key safe and a medicine cabinet, and
    the slot of their key in the office key cabinet (None: no key kept there)."""

    name: str
    door_lock: bytes
    key_safe: bytes | None = None
    medicine_cabinet: bytes | None = None
    key_slot: int | None = None


@dataclass(frozen=True)
class Site:
    """The residents and the office key cabinet of one site."""

    residents: tuple[Resident, ...]
    key_cabinet: bytes | None = None

    @classmethod
    def from_devices(cls, devices: Iterable[VirtualDevice]) -> Site:
        """Lay a site out over existing devices: a resident per door lock; key safes and
        medicine cabinets to the first residents in turn; the first key cabinet is the
        office's, its slots hold the first residents' keys."""
        by_kind: dict[DeviceKind, list[VirtualDevice]] = {kind: [] for kind in DeviceKind}
        for device in devices:
            by_kind[device.kind].append(device)
        cabinets = by_kind[DeviceKind.KEY_CABINET]
        slots = sorted(cabinets[0].slots) if cabinets else []
        residents = []
        for index, lock in enumerate(by_kind[DeviceKind.DOOR_LOCK]):
            safes, medicine = by_kind[DeviceKind.KEY_SAFE], by_kind[DeviceKind.MEDICINE_CABINET]
            residents.append(
                Resident(
                    name=f"resident-{index + 1:02d}",
                    door_lock=lock.device_id,
                    key_safe=safes[index].device_id if index < len(safes) else None,
                    medicine_cabinet=medicine[index].device_id if index < len(medicine) else None,
                    key_slot=slots[index] if index < len(slots) else None,
                )
            )
        return cls(tuple(residents), cabinets[0].device_id if cabinets else None)

    def device_ids(self) -> list[bytes]:
        """Every device of the site: the key cabinet first, then each resident's."""
        ids = [self.key_cabinet] if self.key_cabinet is not None else []
        for resident in self.residents:
            ids += [
                i for i in (resident.door_lock, resident.key_safe, resident.medicine_cabinet) if i
            ]
        return ids


@dataclass(frozen=True)
class Rates:
    """How often things happen; probabilities per visit unless said otherwise."""

    night_patrol: float = 0.3  # per resident and night
    cabinet_key: float = 0.25  # the resident's key is fetched from the office
    key_safe: float = 0.15  # the key safe is opened (residents who have one)
    medicine: float = 0.6  # the medicine cabinet is opened (residents who have one)
    expired_activation: float = 0.02  # a staff key whose activation was not renewed
    wrong_shift: float = 0.02  # a colleague from another shift tries first
    tamper: float = 0.002  # per device and day
    low_battery: float = 0.005  # per device and day, at most once per device


# --------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------


class ActionKind(StrEnum):
    """What happens at a device."""

    PRESENT_KEY = "present_key"
    OPEN_DOOR = "open_door"
    CLOSE_DOOR = "close_door"
    TAKE_KEY = "take_key"
    RETURN_KEY = "return_key"
    TAMPER = "tamper"
    DRAIN_BATTERY = "drain_battery"


@dataclass(frozen=True)
class Action:
    """One thing that happens at one device at a (simulated) time.

    ``activation_expires_at`` is the activation the key carries (PRESENT_KEY; None: none);
    ``expect`` is the decision the scenario means the device to take, given the access
    list of :meth:`Scenario.access_entries` and a clock on simulated time.
    """

    time: int
    device_id: bytes
    kind: ActionKind
    key_id: int = 0
    activation_expires_at: int | None = None
    slot: int = 0
    percent: int = 0
    visit: int = 0
    expect: Reason | None = None


@dataclass(frozen=True)
class Outcome:
    """What applying an action did: the decision for a key, or why nothing happened."""

    applied: bool
    decision: Decision | None = None
    note: str = ""


def apply(action: Action, fleet: Fleet) -> Outcome:
    """Perform ``action`` on its device in ``fleet`` (KeyError if the fleet lacks it).

    The door is physical: a locked door does not open, a closed one does not close again;
    such actions, and a key cabinet slot that is not as expected, are skipped, not errors.
    """
    device = fleet.get(action.device_id)
    state = device.device
    kind = action.kind
    if kind is ActionKind.PRESENT_KEY:
        activation = (
            None
            if action.activation_expires_at is None
            else Activation(action.key_id, action.activation_expires_at)
        )
        return Outcome(applied=True, decision=device.present_key(action.key_id, activation))
    if kind is ActionKind.OPEN_DOOR:
        if state.lock is not LockState.UNLOCKED or state.door is DoorState.OPEN:
            return Outcome(applied=False, note="the door is locked or already open")
        device.open_door(action.key_id)
        return Outcome(applied=True)
    if kind is ActionKind.CLOSE_DOOR:
        if state.door is not DoorState.OPEN:
            return Outcome(applied=False, note="the door is already closed")
        device.close_door(action.key_id)
        return Outcome(applied=True)
    if kind in (ActionKind.TAKE_KEY, ActionKind.RETURN_KEY):
        try:
            if kind is ActionKind.TAKE_KEY:
                device.take_from_slot(action.slot, action.key_id)
            else:
                device.return_to_slot(action.slot)
        except ValueError as exc:
            return Outcome(applied=False, note=str(exc))
        return Outcome(applied=True)
    if kind is ActionKind.TAMPER:
        device.set_tamper()
        return Outcome(applied=True)
    device.drain_battery(action.percent)
    return Outcome(applied=True)


# --------------------------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------------------------

# Visit slots: (earliest start, latest start) in local minutes, the shift that covers them,
# and how long a visit takes (minutes).
_VISITS: Final = (
    ("morning", 7 * 60, 9 * 60 + 30, Shift.DAY, (15, 40)),
    ("lunch", 11 * 60 + 30, 13 * 60 + 30, Shift.DAY, (10, 25)),
    ("evening", 17 * 60, 20 * 60, Shift.EVENING, (15, 35)),
)
_NIGHT: Final = ("night", 23 * 60, 28 * 60, Shift.NIGHT, (5, 15))  # 23:00 to 04:00
_STAFF_KEY_BASE: Final = {Shift.DAY: 1000, Shift.EVENING: 2000, Shift.NIGHT: 3000}
_RESIDENTS_PER_STAFF: Final = 6


class Scenario:
    """Care traffic at a site for ``days`` days from ``start_time``, from ``seed``.

    ``residents`` is either a count, and the scenario lays out a site of its own (see
    :meth:`build_devices`), or a :class:`Site` over existing devices. Days run from
    midnight (UTC, the devices' default local time) of ``start_time``'s day; nothing
    happens before ``start_time``. The same arguments always give the same actions.
    """

    def __init__(
        self,
        seed: int,
        residents: int | Site,
        days: int,
        start_time: float,
        *,
        rates: Rates | None = None,
        staff_per_shift: int | None = None,
    ) -> None:
        if days < 0:
            msg = "days must be >= 0"
            raise ValueError(msg)
        self.seed = seed
        self.days = days
        self.start_time = int(start_time)
        self.day_start = self.start_time - self.start_time % DAY
        self.rates = rates or Rates()
        self._devices: dict[bytes, tuple[DeviceKind, DeviceIdentity, PairingCode]] = {}
        if isinstance(residents, Site):
            self.site = residents
        else:
            self.site = self._generate_site(residents)
        count = len(self.site.residents)
        per_shift = staff_per_shift or max(1, math.ceil(count / _RESIDENTS_PER_STAFF))
        self.staff: tuple[StaffKey, ...] = tuple(
            StaffKey(_STAFF_KEY_BASE[shift] + number, shift)
            for shift in Shift
            for number in range(1, per_shift + 1)
        )
        self._actions: list[Action] | None = None
        self._drained: set[bytes] = set()  # devices whose battery already ran low

    # -- the site ----------------------------------------------------------------------------

    def _rng(self, purpose: str) -> random.Random:
        # A stream per purpose: laying out the site does not shift the visits' randomness.
        # String seeds are hashed with SHA-512, so they give the same stream in every run.
        return random.Random(f"lockgw-scenario/{self.seed}/{purpose}")  # noqa: S311  # simulated traffic, not secrets

    def _new_device(self, rng: random.Random, kind: DeviceKind) -> bytes:
        # Identities from the seed, so the actions name the same device ids in every run.
        # Fine for simulated devices only: their "secret" keys follow from a public seed.
        identity = DeviceIdentity.from_secret_bytes(rng.randbytes(32), rng.randbytes(32))
        self._devices[identity.device_id] = (kind, identity, PairingCode(rng.randbytes(10)))
        return identity.device_id

    def _generate_site(self, count: int) -> Site:
        if count < 1:
            msg = "a site needs at least one resident"
            raise ValueError(msg)
        rng = self._rng("site")
        cabinet = self._new_device(rng, DeviceKind.KEY_CABINET)
        residents = []
        for index in range(count):
            lock = self._new_device(rng, DeviceKind.DOOR_LOCK)
            safe = self._new_device(rng, DeviceKind.KEY_SAFE) if rng.random() < 0.4 else None
            medicine = (
                self._new_device(rng, DeviceKind.MEDICINE_CABINET) if rng.random() < 0.5 else None
            )
            residents.append(Resident(f"resident-{index + 1:02d}", lock, safe, medicine, index + 1))
        return Site(tuple(residents), cabinet)

    def build_devices(self, clock_source: Callable[[], float] = time.time) -> list[VirtualDevice]:
        """New, unpaired devices for the site this scenario laid out (none for a given
        :class:`Site`): the key cabinet has a slot per resident."""
        slots = max(8, len(self.site.residents))
        return [
            VirtualDevice(
                kind,
                identity=identity,
                pairing_code=code,
                clock=DeviceClock(source=clock_source),
                key_cabinet_slots=slots,
            )
            for kind, identity, code in self._devices.values()
        ]

    def access_entries(self, valid_from: int, valid_until: int) -> tuple[AccessEntry, ...]:
        """The access list the actions assume: every staff key, its shift's windows."""
        return tuple(
            AccessEntry(key.key_id, valid_from, valid_until, key.shift.windows)
            for key in self.staff
        )

    # -- the actions -------------------------------------------------------------------------

    def actions(self) -> list[Action]:
        """Every action, sorted by time (ties keep the order they were generated in)."""
        if self._actions is None:
            self._actions = self._generate()
        return list(self._actions)

    def __iter__(self) -> Iterator[Action]:
        return iter(self.actions())

    def per_day(self) -> list[Counter[ActionKind]]:
        """Counts of each kind of action, per day of the scenario."""
        days: list[Counter[ActionKind]] = [Counter() for _ in range(self.days)]
        for action in self.actions():
            days[(action.time - self.day_start) // DAY][action.kind] += 1
        return days

    def _generate(self) -> list[Action]:
        rng = self._rng("traffic")
        self._drained = set()
        actions: list[Action] = []
        visit = 0
        end = self.day_start + self.days * DAY
        for day in range(self.days):
            midnight = self.day_start + day * DAY
            for resident in self.site.residents:
                slots = list(_VISITS)
                if rng.random() < self.rates.night_patrol:
                    slots.append(_NIGHT)
                for _name, earliest, latest, shift, (shortest, longest) in slots:
                    visit += 1
                    start = midnight + rng.randint(earliest * 60, latest * 60)
                    duration = rng.randint(shortest * 60, longest * 60)
                    actions += self._visit(
                        rng,
                        visit=visit,
                        resident=resident,
                        shift=shift,
                        start=start,
                        duration=duration,
                    )
            actions += self._rare_events(rng, midnight)
        kept = [a for a in actions if self.start_time <= a.time < end]
        kept.sort(key=lambda action: action.time)
        return kept

    def _activation(self, key: StaffKey, when: int) -> int:
        """When the activation renewed at the start of the key's current shift expires."""
        _start, finish = key.shift.instance(when, self.day_start)
        return finish

    def _present(
        self, when: int, device: bytes, key: StaffKey, visit: int, expires: int | None = None
    ) -> Action:
        expires = self._activation(key, when) if expires is None else expires
        return Action(
            when,
            device,
            ActionKind.PRESENT_KEY,
            key_id=key.key_id,
            activation_expires_at=expires,
            visit=visit,
            expect=self._expected(key, when, expires),
        )

    def _expected(self, key: StaffKey, when: int, expires: int) -> Reason:
        if when >= expires:
            return Reason.ACTIVATION_EXPIRED
        minute = (when - self.day_start) % DAY // 60
        return Reason.VALID_KEY if key.shift.covers(minute) else Reason.OUTSIDE_SCHEDULE

    def _open_close(
        self, rng: random.Random, when: int, device: bytes, key: StaffKey, visit: int
    ) -> tuple[list[Action], int]:
        """Key, door open, door closed (and locked); returns the actions and when it's done."""
        opened = when + rng.randint(3, 8)
        closed = opened + rng.randint(8, 25)
        return [
            self._present(when, device, key, visit),
            Action(opened, device, ActionKind.OPEN_DOOR, key_id=key.key_id, visit=visit),
            Action(closed, device, ActionKind.CLOSE_DOOR, key_id=key.key_id, visit=visit),
        ], closed

    def _visit(
        self,
        rng: random.Random,
        *,
        visit: int,
        resident: Resident,
        shift: Shift,
        start: int,
        duration: int,
    ) -> list[Action]:
        on_shift = [key for key in self.staff if key.shift is shift]
        key = rng.choice(on_shift)
        actions: list[Action] = []
        cabinet = self.site.key_cabinet
        fetch = (
            cabinet is not None
            and resident.key_slot is not None
            and rng.random() < self.rates.cabinet_key
        )
        if fetch:
            assert cabinet is not None
            assert resident.key_slot is not None
            at_office = start - rng.randint(10 * 60, 20 * 60)
            steps, done = self._open_close(rng, at_office, cabinet, key, visit)
            steps.insert(
                2,
                Action(
                    done - 2,
                    cabinet,
                    ActionKind.TAKE_KEY,
                    key_id=key.key_id,
                    slot=resident.key_slot,
                    visit=visit,
                ),
            )
            actions += steps

        at_door = start
        denial = rng.random()
        if denial < self.rates.expired_activation + self.rates.wrong_shift:
            if denial < self.rates.expired_activation:
                # Yesterday's activation: the staff member did not renew it this shift.
                first, expires = key, self._activation(key, start) - DAY
            else:
                minute = (start - self.day_start) % DAY // 60
                others = [k for k in self.staff if not k.shift.covers(minute)]
                first = rng.choice(others) if others else key
                expires = start + 4 * 3600  # a valid activation, but the wrong hours
            actions.append(self._present(start, resident.door_lock, first, visit, expires))
            at_door = start + rng.randint(5 * 60, 15 * 60)  # a colleague comes instead

        entry, inside = self._open_close(rng, at_door, resident.door_lock, key, visit)
        actions += entry
        leave = at_door + duration
        if resident.key_safe is not None and rng.random() < self.rates.key_safe:
            steps, _ = self._open_close(
                rng, at_door - rng.randint(30, 90), resident.key_safe, key, visit
            )
            actions += steps
        if resident.medicine_cabinet is not None and rng.random() < self.rates.medicine:
            when = inside + rng.randint(60, max(61, duration - 120))
            steps, _ = self._open_close(
                rng, min(when, leave - 60), resident.medicine_cabinet, key, visit
            )
            actions += steps
        exit_steps, gone = self._open_close(rng, leave, resident.door_lock, key, visit)
        actions += exit_steps

        if fetch:
            assert cabinet is not None
            assert resident.key_slot is not None
            back = gone + rng.randint(10 * 60, 20 * 60)
            steps, done = self._open_close(rng, back, cabinet, key, visit)
            steps.insert(
                2,
                Action(
                    done - 2, cabinet, ActionKind.RETURN_KEY, slot=resident.key_slot, visit=visit
                ),
            )
            actions += steps
        return actions

    def _rare_events(self, rng: random.Random, midnight: int) -> list[Action]:
        actions = []
        for device in self.site.device_ids():
            if rng.random() < self.rates.tamper:
                when = midnight + rng.randrange(DAY)
                actions.append(Action(when, device, ActionKind.TAMPER))
            if device not in self._drained and rng.random() < self.rates.low_battery:
                self._drained.add(device)
                when = midnight + rng.randrange(DAY)
                actions.append(Action(when, device, ActionKind.DRAIN_BATTERY, percent=85))
        return actions


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


class ScenarioRunner:
    """Applies a scenario's actions to a fleet as its :class:`SimClock` reaches them."""

    def __init__(self, actions: Sequence[Action], fleet: Fleet, clock: SimClock) -> None:
        self.actions = actions
        self.fleet = fleet
        self.clock = clock
        self.applied = 0
        self.skipped = 0
        self.decisions: Counter[Reason] = Counter()
        self.unexpected: list[tuple[Action, Outcome]] = []
        """PRESENT_KEY actions whose decision differed from the scenario's intent (the
        device holds another access list, or none)."""

    @property
    def done(self) -> int:
        """Actions handled so far, applied or skipped."""
        return self.applied + self.skipped

    def apply_due(self) -> int:
        """Apply every action whose time has come; returns how many."""
        now = self.clock.now()
        count = 0
        while self.done < len(self.actions) and self.actions[self.done].time <= now:
            self._apply(self.actions[self.done])
            count += 1
        return count

    async def run(self) -> None:
        """Apply the actions as simulated time passes; returns after the last one."""
        while self.done < len(self.actions):
            await self.clock.sleep_until(self.actions[self.done].time)
            self.apply_due()

    def _apply(self, action: Action) -> None:
        try:
            outcome = apply(action, self.fleet)
        except KeyError:
            outcome = Outcome(applied=False, note="no such device in the fleet")
        if not outcome.applied:
            self.skipped += 1
            logger.debug("skipped %s: %s", action, outcome.note)
            return
        self.applied += 1
        if outcome.decision is not None:
            self.decisions[outcome.decision.reason] += 1
            if action.expect is not None and outcome.decision.reason is not action.expect:
                self.unexpected.append((action, outcome))

    def progress(self) -> dict[str, object]:
        """For a status report."""
        return {
            "actions": len(self.actions),
            "applied": self.applied,
            "skipped": self.skipped,
            "simulated_time": int(self.clock.now()),
            "decisions": {reason.name: count for reason, count in self.decisions.items()},
            "unexpected_decisions": len(self.unexpected),
        }
