"""Misbehaviour on demand, per simulated device.

A :class:`Faults` object sits between a device's session and its radio (see
:class:`simulators.node.SimulatedDevice`): it drops the link after a number of frames,
flips bits in or cuts bytes off outgoing fragments, answers slowly, refuses connections,
or jams the lock when a key is presented. Every fault is one the protocol must catch: a
flipped bit ends the session at the gateway with ``DECRYPT_FAILED`` (or a ``FRAGMENT_*``
error when it lands in a fragment header), a cut fragment with ``FRAGMENT_*``, a dropped
link as a radio disconnection. Nothing here produces data the gateway could accept.

The helpers at the bottom misbehave on the device model itself: a drifting clock, a log
filled to overflowing, a flat battery.

Randomness comes from ``random.Random(seed)``, so a failing run can be replayed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeGuard

from protocols.enums import EventType, Reason
from simulators.device import VirtualDevice

__all__ = [
    "DEVICE_FAULTS",
    "Faults",
    "apply_device_fault",
    "drain_battery",
    "drift_clock",
    "fill_log",
    "shift_clock",
]

_DEFAULTS: Final[dict[str, Any]] = {
    "drop_after_frames": None,
    "corrupt_probability": 0.0,
    "corrupt_byte_probability": 0.0,
    "corrupt_next": 0,
    "truncate_next": 0,
    "answer_delay": 0.0,
    "refuse_connections": False,
    "jam_on_open": False,
}
MAX_ANSWER_DELAY: Final = 60.0
"""Longer than any gateway waits for an answer; beyond it a delay is a typo."""


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true/false arrive as bools, which are ints to isinstance.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


@dataclass
class Faults:
    """The misbehaviour of one simulated device; change the fields at any time.

    * ``drop_after_frames``: let N frames (fragments received plus sent) pass in each
      connection, then disconnect instead of handling or sending the next one.
    * ``corrupt_probability``: chance that an outgoing fragment gets one random bit
      flipped; ``corrupt_next``: flip a bit in each of the next N outgoing fragments.
      The share of corrupted *bytes* this gives is the probability over the fragment
      length (at most one byte per fragment).
    * ``corrupt_byte_probability``: chance that each byte of an outgoing fragment gets
      one random bit flipped, independently of the others: the share of corrupted bytes.
    * ``truncate_next``: cut the last byte off each of the next N outgoing fragments.
    * ``answer_delay``: seconds to wait before each notification.
    * ``refuse_connections``: disconnect every central as soon as it connects.
    * ``jam_on_open``: the lock jams when a key is presented (before the decision).
    * ``seed``: seeds the random choices (which fragment, which bit).
    """

    drop_after_frames: int | None = None
    corrupt_probability: float = 0.0
    corrupt_byte_probability: float = 0.0
    corrupt_next: int = 0
    truncate_next: int = 0
    answer_delay: float = 0.0
    refuse_connections: bool = False
    jam_on_open: bool = False
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.update({name: getattr(self, name) for name in (*_DEFAULTS, "seed")})

    # -- changing the knobs ------------------------------------------------------------------

    def update(self, values: Mapping[str, object]) -> None:
        """Set knobs by name, as a command on the simulator's stdin names them.

        Raises :class:`ValueError` for an unknown name or a bad value, before changing
        anything. Setting ``seed`` restarts the random sequence.
        """
        checked: dict[str, object] = {}
        for name, value in values.items():
            checked[name] = self._check(name, value)
        for name, value in checked.items():
            setattr(self, name, value)
        if "seed" in checked:
            self._rng = random.Random(self.seed)  # noqa: S311  # replayable faults, no secrets

    @staticmethod
    def _check(name: str, value: object) -> object:
        if name == "drop_after_frames":
            if value is not None and not (_is_int(value) and value >= 0):
                msg = "drop_after_frames must be null or a count >= 0"
                raise ValueError(msg)
            return value
        if name in ("corrupt_next", "truncate_next", "seed"):
            if not _is_int(value) or (name != "seed" and value < 0):
                msg = f"{name} must be an integer" + ("" if name == "seed" else " >= 0")
                raise ValueError(msg)
            return value
        if name in ("corrupt_probability", "corrupt_byte_probability"):
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                msg = f"{name} must be 0..1"
                raise ValueError(msg)
            return float(value)
        if name == "answer_delay":
            if not _is_number(value) or not 0.0 <= value <= MAX_ANSWER_DELAY:
                msg = f"answer_delay must be 0..{MAX_ANSWER_DELAY} seconds"
                raise ValueError(msg)
            return float(value)
        if name in ("refuse_connections", "jam_on_open"):
            if not isinstance(value, bool):
                msg = f"{name} must be true or false"
                raise ValueError(msg)
            return value
        msg = f"unknown fault {name!r}"
        raise ValueError(msg)

    def clear(self) -> None:
        """Back to a well-behaved device (the random sequence goes on)."""
        for name, value in _DEFAULTS.items():
            setattr(self, name, value)

    @property
    def active(self) -> bool:
        """Whether any knob is set."""
        return any(getattr(self, name) != value for name, value in _DEFAULTS.items())

    def to_json(self) -> dict[str, Any]:
        """The knobs that differ from a well-behaved device."""
        return {
            name: getattr(self, name)
            for name, value in _DEFAULTS.items()
            if getattr(self, name) != value
        }

    # -- applying them -----------------------------------------------------------------------

    def drops_after(self, frames: int) -> bool:
        """Whether the link goes down now that ``frames`` frames have passed."""
        return self.drop_after_frames is not None and frames >= self.drop_after_frames

    def mangle(self, fragment: bytes) -> bytes:
        """The outgoing ``fragment`` as this device sends it: maybe cut short, maybe with
        one bit flipped."""
        data = bytearray(fragment)
        if self.truncate_next > 0:
            self.truncate_next -= 1
            del data[-1:]
        corrupt = False
        if self.corrupt_next > 0:
            self.corrupt_next -= 1
            corrupt = True
        elif self.corrupt_probability > 0.0:
            corrupt = self._rng.random() < self.corrupt_probability
        if corrupt and data:
            bit = self._rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
        if self.corrupt_byte_probability > 0.0:
            for index in range(len(data)):
                if self._rng.random() < self.corrupt_byte_probability:
                    data[index] ^= 1 << self._rng.randrange(8)
        return bytes(data)


# --------------------------------------------------------------------------------------------
# Faults of the device model
# --------------------------------------------------------------------------------------------


def drift_clock(device: VirtualDevice, ppm: float) -> None:
    """Let the device's clock run fast (positive) or slow by ``ppm`` from now on.

    The clock keeps its current reading: only its rate changes, as a cold crystal's would.
    """
    clock = device.clock
    current = clock.now()
    clock.drift_ppm = float(ppm)
    if current is not None:
        clock.set(current)  # restarts the drift from the current reading


def shift_clock(device: VirtualDevice, seconds: float) -> None:
    """Set the device's clock ``seconds`` ahead (negative: behind) of what it reads now, as a
    clock that drifted for months would stand. The change is not logged: the device does
    not know. An unset clock stays unset."""
    clock = device.clock
    current = clock.now()
    if current is not None:
        clock.set(max(0.0, current + seconds))


def fill_log(device: VirtualDevice, count: int) -> None:
    """Append ``count`` filler records (the door worked without anyone visiting), so the
    log nears capacity or overflows before the gateway collects it."""
    if count < 0:
        msg = "fill_log needs a count >= 0"
        raise ValueError(msg)
    now = device.clock.now()
    # Records never go back in time: the device stamps them with its floor at the latest.
    stamp = max(int(now) if now is not None else 0, device.log.time_floor)
    events = (EventType.DOOR_OPENED, EventType.DOOR_CLOSED)
    for index in range(count):
        device.log.append(stamp, events[index % 2], Reason.MANUAL)


def drain_battery(device: VirtualDevice, percent: int) -> None:
    """Take ``percent`` points off the battery (logged once it runs low)."""
    if percent < 0:
        msg = "drain_battery needs percent >= 0"
        raise ValueError(msg)
    device.drain_battery(percent)


def _drift(device: VirtualDevice, value: object) -> None:
    if not _is_number(value):
        msg = "drift_ppm must be a number"
        raise ValueError(msg)
    drift_clock(device, float(value))


def _shift(device: VirtualDevice, value: object) -> None:
    if not _is_number(value):
        msg = "shift_clock must be a number of seconds"
        raise ValueError(msg)
    shift_clock(device, float(value))


def _fill(device: VirtualDevice, value: object) -> None:
    if not _is_int(value):
        msg = "fill_log must be a count"
        raise ValueError(msg)
    fill_log(device, value)


def _drain(device: VirtualDevice, value: object) -> None:
    if not _is_int(value):
        msg = "drain_battery must be a percentage"
        raise ValueError(msg)
    drain_battery(device, value)


DEVICE_FAULTS: Final[Mapping[str, Callable[[VirtualDevice, object], None]]] = {
    "drift_ppm": _drift,
    "shift_clock": _shift,
    "fill_log": _fill,
    "drain_battery": _drain,
}
"""Faults of the device model by the name a command uses, each taking the value given."""


def apply_device_fault(device: VirtualDevice, name: str, value: object) -> None:
    """Apply one of :data:`DEVICE_FAULTS`; :class:`ValueError` for a bad name or value."""
    helper = DEVICE_FAULTS.get(name)
    if helper is None:
        msg = f"unknown device fault {name!r}"
        raise ValueError(msg)
    helper(device, value)
