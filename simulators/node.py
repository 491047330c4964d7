"""Simulated devices on the virtual radio: the device model behind a real GATT peripheral.

A :class:`SimulatedDevice` joins a :class:`~simulators.device.VirtualDevice` (the DEVICE
role of the protocol, sans-IO) to a :class:`~simulators.radio.VirtualPeripheral` (Bumble
host and controller on a :class:`~simulators.radio.ScalableLink`): every connection gets
its own :class:`~simulators.device.DeviceConnection`, every written fragment goes through
it, and every fragment it answers with is notified back, in order, through the device's
:class:`~simulators.faults.Faults`. The advert follows the device's state.

A :class:`Fleet` holds many of them on one link and keeps their state in a directory, one
JSON file per device, so a simulator process can be restarted with the same devices.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Self

from bumble import core

from protocols.access import Activation, Decision
from protocols.advert import build_advertising_data
from protocols.enums import AlarmFlags, DeviceKind
from protocols.errors import ErrorCode
from protocols.gatt import MAX_ATT_MTU, MIN_ATT_MTU
from protocols.identity import format_device_id
from protocols.pairing import LabelPayload
from protocols.session import SessionState
from simulators.device import DeviceClock, DeviceConnection, VirtualDevice
from simulators.faults import Faults
from simulators.radio import (
    DEFAULT_ADVERTISING_INTERVAL,
    PeripheralStateError,
    ScalableLink,
    VirtualPeripheral,
)

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "ADVERT_REFRESH_DELAY",
    "FAILED_SESSION_GRACE",
    "Fleet",
    "SimulatedDevice",
    "kind_name",
    "parse_kind",
]

logger = logging.getLogger(__name__)

ADVERT_REFRESH_DELAY: Final = 0.05
"""Seconds between a change of state and the new advert: changes in one burst (a visit at
the door, a session's requests) cost one HCI command, not one each."""
FAILED_SESSION_GRACE: Final = 2.0
"""After a failed session the device drops the link if the gateway has not done so by
then; the grace lets the error notification reach the gateway first."""
START_BATCH: Final = 50
"""Devices a fleet powers on at once: bounded so a thousand HCI resets do not pile up."""
STATE_FILE_FORMAT: Final = 1
_STATE_FILE_NAME: Final = re.compile(r"[0-9a-f]{16}\.json")


def kind_name(kind: DeviceKind) -> str:
    """``door_lock``, ``key_safe``, ...: how files and commands name a kind."""
    return kind.name.lower()


def parse_kind(text: str) -> DeviceKind:
    """The kind named ``door_lock``, ``key-safe``, ``KEY_CABINET``...; ValueError otherwise."""
    try:
        return DeviceKind[text.strip().upper().replace("-", "_")]
    except KeyError:
        names = ", ".join(kind_name(kind) for kind in DeviceKind)
        msg = f"unknown device kind {text!r} (one of {names})"
        raise ValueError(msg) from None


@dataclass
class _Connection:
    """One central's connection: its session and the fragments waiting for it."""

    session: DeviceConnection
    fragments: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    frames: int = 0
    worker: asyncio.Task[None] | None = None
    grace: asyncio.TimerHandle | None = None  # drops the link some time after a failure
    dropping: bool = False
    established: bool = False


class SimulatedDevice:
    """One device on the radio: advertises its state, serves sessions, misbehaves on demand.

    Local events (a key at the door, the door, the battery) go through the methods here
    rather than straight to :attr:`device`, so faults apply and the advert follows; after
    changing :attr:`device` directly, call :meth:`changed`.
    """

    def __init__(
        self,
        device: VirtualDevice,
        link: ScalableLink,
        *,
        faults: Faults | None = None,
        advertising_interval: float = DEFAULT_ADVERTISING_INTERVAL,
        address: str | None = None,
        max_mtu: int = MAX_ATT_MTU,
    ) -> None:
        self._device = device
        self._faults = faults if faults is not None else Faults()
        self._advertised = self._advert_data()
        self._peripheral = VirtualPeripheral(
            link,
            advertising_data=self._advertised,
            address=address,
            name=f"lockgw-{kind_name(device.kind)}",
            max_mtu=max_mtu,
            advertising_interval=advertising_interval,
        )
        self._peripheral.on_fragment = self._on_fragment
        self._peripheral.add_connection_callback(self._on_connection)
        self._peripheral.add_disconnection_callback(self._on_disconnection)
        self._current: _Connection | None = None
        self._refresh: asyncio.TimerHandle | None = None
        self._hci_tasks: set[asyncio.Task[None]] = set()
        self._workers: set[asyncio.Task[None]] = set()
        self.connections = 0
        """Connections accepted since start-up (refused ones do not count)."""
        self.last_failure: ErrorCode | None = None
        """Why the latest failed session failed, as the device saw it."""
        self.handshake_frames: dict[str, int] = {}
        """Frames (received plus sent) the latest completed handshake of each session mode
        (``normal``, ``pairing``) took: what a link must carry before a first request."""

    def __repr__(self) -> str:
        return f"SimulatedDevice({format_device_id(self.device_id)}, {self.address})"

    # -- identity and state ------------------------------------------------------------------

    @property
    def device(self) -> VirtualDevice:
        """The device model: identity, lists, log, clock, hardware state."""
        return self._device

    @property
    def faults(self) -> Faults:
        """The device's misbehaviour; change it at any time."""
        return self._faults

    @property
    def peripheral(self) -> VirtualPeripheral:
        """The Bumble GATT peripheral the device speaks through."""
        return self._peripheral

    @property
    def device_id(self) -> bytes:
        """The 8-byte device id (from the device's signing key)."""
        return self._device.device_id

    @property
    def kind(self) -> DeviceKind:
        """Door lock, key safe, medicine cabinet or key cabinet."""
        return self._device.kind

    @property
    def address(self) -> str:
        """The random static address the device advertises under; fixed for its lifetime."""
        return self._peripheral.address

    @property
    def label(self) -> str:
        """The QR payload on the device's sticker (``LOCKGW1:<id>:<code>``): a secret."""
        return LabelPayload(self.device_id, self._device.pairing_code).text()

    @property
    def powered(self) -> bool:
        """Switched on: advertising or connected."""
        return self._peripheral.is_started

    @property
    def connected(self) -> bool:
        """Whether a central is connected right now."""
        return self._peripheral.is_connected

    @property
    def frames(self) -> int:
        """Fragments received and sent in the current connection (0 when there is none),
        as ``drop_after_frames`` counts them."""
        return 0 if self._current is None else self._current.frames

    def summary(self) -> dict[str, Any]:
        """The device's state for people and test scripts; no secrets."""
        device = self._device
        now = device.clock.now()
        alarms = device.alarms()
        return {
            "device_id": format_device_id(self.device_id),
            "kind": kind_name(device.kind),
            "address": self.address,
            "powered": self.powered,
            "connected": self.connected,
            "paired": device.paired,
            "site_id": device.site_id,
            "battery_percent": device.battery_percent,
            "door": device.door.name.lower(),
            "lock": device.lock.name.lower(),
            "alarms": [flag.name for flag in AlarmFlags if flag in alarms],
            "clock": None if now is None else int(now),
            "access_version": device.access.access_version,
            "revocation_version": device.access.revocation_version,
            "records_waiting": device.log.waiting,
            "next_sequence": device.log.next_sequence,
            "connections": self.connections,
            "last_failure": None if self.last_failure is None else self.last_failure.name,
            "handshake_frames": dict(self.handshake_frames),
            "faults": self._faults.to_json(),
        }

    # -- power -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Power on: advertise the current state and accept connections."""
        if self.powered:
            return
        self._advertised = self._advert_data()
        await self._peripheral.set_advertising_data(self._advertised)
        await self._peripheral.start()

    async def stop(self) -> None:
        """Power off: drop any connection, stop advertising, leave the radio."""
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        self._end_connection()
        # HCI commands under way (an advert update, a disconnection) are let finish, not
        # cancelled: Bumble's host would be left with a cancelled command future that the
        # controller's answer then fails to complete.
        await asyncio.gather(*self._hci_tasks, *self._workers, return_exceptions=True)
        await self._peripheral.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- what happens at the device ----------------------------------------------------------

    def present_key(self, key_id: int, activation: Activation | None) -> Decision:
        """A staff key at the reader; with ``jam_on_open`` the lock jams first."""
        if self._faults.jam_on_open and not self._device.jammed:
            self._device.jam()
        decision = self._device.present_key(key_id, activation)
        self.changed()
        return decision

    def open_door(self, key_id: int = 0) -> None:
        """The door (or lid) opens; logged with the key that opened it."""
        self._device.open_door(key_id)
        self.changed()

    def close_door(self, key_id: int = 0) -> None:
        """The door closes, and an unlocked lock locks again."""
        self._device.close_door(key_id)
        self.changed()

    def take_from_slot(self, slot: int, key_id: int, *, dongle: bool = False) -> None:
        """Key cabinet: ``key_id`` takes the key (or dongle) of ``slot``."""
        self._device.take_from_slot(slot, key_id, dongle=dongle)
        self.changed()

    def return_to_slot(self, slot: int, *, dongle: bool = False) -> None:
        """Key cabinet: the key (or dongle) of ``slot`` comes back."""
        self._device.return_to_slot(slot, dongle=dongle)
        self.changed()

    def set_tamper(self) -> None:
        """Someone forces the device: the TAMPER alarm is set and logged."""
        self._device.set_tamper()
        self.changed()

    def jam(self) -> None:
        """The bolt jams: keys are refused with LOCK_JAMMED."""
        self._device.jam()
        self.changed()

    def drain_battery(self, percent: int) -> None:
        """Take ``percent`` points off the battery."""
        self._device.drain_battery(percent)
        self.changed()

    def change_battery(self) -> None:
        """A new battery: full, but the clock has lost its time."""
        self._device.change_battery()
        self.changed()

    def changed(self) -> None:
        """The device's state changed: advertise it shortly (bursts coalesce)."""
        if self._refresh is not None or not self.powered:
            return  # a refresh is due anyway, or start() builds the advert afresh
        loop = asyncio.get_running_loop()
        self._refresh = loop.call_later(ADVERT_REFRESH_DELAY, self._refresh_due)

    # -- the advert --------------------------------------------------------------------------

    def _advert_data(self) -> bytes:
        return build_advertising_data(self._device.advert())

    def _refresh_due(self) -> None:
        self._refresh = None
        data = self._advert_data()
        if data != self._advertised and self.powered:
            self._advertised = data
            self._spawn_hci(self._advertise(data))

    async def _advertise(self, data: bytes) -> None:
        try:
            await self._peripheral.set_advertising_data(data)
        except core.BaseBumbleError as exc:
            # Only while powering off; start() advertises the state afresh.
            logger.debug("%r: advert not updated: %s", self, exc)

    # -- sessions ----------------------------------------------------------------------------

    def _on_connection(self, _central: str) -> None:
        if self._faults.refuse_connections:
            self._spawn_hci(self._peripheral.disconnect())
            return
        self.connections += 1
        # Fragments are cut to the MTU in force when each answer is sent (see _serve): the
        # central exchanges MTUs after connecting, before it writes.
        session = DeviceConnection(self._device, mtu=self._peripheral.mtu or MIN_ATT_MTU)
        current = _Connection(session)
        worker = asyncio.ensure_future(self._serve(current))
        self._workers.add(worker)
        worker.add_done_callback(self._task_done)
        current.worker = worker
        self._current = current

    def _on_fragment(self, fragment: bytes) -> None:
        if self._current is not None:
            self._current.fragments.put_nowait(fragment)

    def _on_disconnection(self) -> None:
        self._end_connection()
        self.changed()  # a session may have changed lists, log or pairing

    def _end_connection(self) -> None:
        current, self._current = self._current, None
        if current is None:
            return
        if current.grace is not None:
            current.grace.cancel()
        if current.worker is not None:
            # It waits for a fragment, sleeps out a delay or hands a notification to the
            # host: no HCI command, so cancelling is safe.
            current.worker.cancel()

    async def _serve(self, current: _Connection) -> None:
        """Answer one connection's fragments in order, through the faults."""
        faults = self._faults
        while True:
            fragment = await current.fragments.get()
            if faults.drops_after(current.frames):
                self._disconnect(current)
                return
            current.frames += 1
            mtu = self._peripheral.mtu
            if mtu is not None:
                current.session.session.mtu = mtu  # follows a renegotiated MTU
            answers = current.session.receive(fragment)
            if not current.established and current.session.session.state is (
                SessionState.ESTABLISHED
            ):
                current.established = True
                mode = current.session.session.mode
                if mode is not None:
                    self.handshake_frames[mode.name.lower()] = current.frames
            for answer in answers:
                if faults.drops_after(current.frames):
                    self._disconnect(current)
                    return
                data = faults.mangle(answer)
                if faults.answer_delay > 0:
                    await asyncio.sleep(faults.answer_delay)
                try:
                    await self._peripheral.notify(data)
                except (PeripheralStateError, core.BaseBumbleError) as exc:
                    logger.debug("%r: answer not sent: %s", self, exc)
                    return  # the link is gone (or the central never subscribed)
                current.frames += 1
            if answers:
                self.changed()
            failure = current.session.failure
            if failure is not None and current.grace is None:
                self.last_failure = failure.error.code
                logger.info("%r: session failed: %s", self, failure.error)
                loop = asyncio.get_running_loop()
                current.grace = loop.call_later(FAILED_SESSION_GRACE, self._disconnect, current)

    def _disconnect(self, current: _Connection) -> None:
        """Drop ``current``'s link, if it is still the device's connection."""
        if self._current is current and not current.dropping:
            current.dropping = True
            self._spawn_hci(self._peripheral.disconnect())

    def _spawn_hci(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run a short HCI exchange in the background; :meth:`stop` waits for it."""
        task = asyncio.ensure_future(coroutine)
        self._hci_tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._hci_tasks.discard(task)
        self._workers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("%r: task failed", self, exc_info=task.exception())


class Fleet:
    """Many simulated devices on one link: create, start and stop them, find them by id,
    and keep their state in a directory.

    ``clock_source`` is the host time of every device's clock (a
    :class:`~simulators.scenario.SimClock` runs them fast).
    """

    def __init__(
        self,
        link: ScalableLink | None = None,
        *,
        clock_source: Callable[[], float] = time.time,
        advertising_interval: float = DEFAULT_ADVERTISING_INTERVAL,
    ) -> None:
        self.link = link if link is not None else ScalableLink()
        self.clock_source = clock_source
        self.advertising_interval = advertising_interval
        self._devices: dict[bytes, SimulatedDevice] = {}

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[SimulatedDevice]:
        return iter(list(self._devices.values()))

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    # -- membership --------------------------------------------------------------------------

    def add(
        self, device: VirtualDevice, *, address: str | None = None, faults: Faults | None = None
    ) -> SimulatedDevice:
        """Put ``device`` on the radio (not yet powered on: see :meth:`start`)."""
        if device.device_id in self._devices:
            msg = f"device {format_device_id(device.device_id)} is already in the fleet"
            raise ValueError(msg)
        simulated = SimulatedDevice(
            device,
            self.link,
            faults=faults,
            advertising_interval=self.advertising_interval,
            address=address,
        )
        self._devices[device.device_id] = simulated
        return simulated

    def create(self, kind: DeviceKind, count: int = 1, **options: Any) -> list[SimulatedDevice]:
        """``count`` new, unpaired devices of ``kind``; ``options`` go to VirtualDevice."""
        return [
            self.add(VirtualDevice(kind, clock=DeviceClock(source=self.clock_source), **options))
            for _ in range(count)
        ]

    def get(self, device_id: bytes) -> SimulatedDevice:
        """The device with this id; :class:`KeyError` if there is none."""
        try:
            return self._devices[device_id]
        except KeyError:
            msg = f"no device {format_device_id(device_id)} in the fleet"
            raise KeyError(msg) from None

    def find(self, device_id: bytes) -> SimulatedDevice | None:
        """The device with this id, or None."""
        return self._devices.get(device_id)

    def of_kind(self, kind: DeviceKind) -> list[SimulatedDevice]:
        """The devices of ``kind``, in the order they were added."""
        return [device for device in self._devices.values() if device.kind is kind]

    # -- power -------------------------------------------------------------------------------

    async def start(self, devices: Iterable[SimulatedDevice] | None = None) -> None:
        """Power on ``devices`` (default: all), a batch at a time."""
        pending = [d for d in (self if devices is None else devices) if not d.powered]
        for index in range(0, len(pending), START_BATCH):
            await asyncio.gather(*(d.start() for d in pending[index : index + START_BATCH]))

    async def stop(self) -> None:
        """Power every device off."""
        devices = list(self._devices.values())
        for index in range(0, len(devices), START_BATCH):
            await asyncio.gather(*(d.stop() for d in devices[index : index + START_BATCH]))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- persistence -------------------------------------------------------------------------

    def save(self, directory: Path) -> int:
        """Write every device's state to ``directory/<device id>.json``; returns how many.

        Each file is replaced atomically, so a crash mid-save leaves the previous state.
        The files hold the devices' secrets: keep the directory private.
        """
        directory.mkdir(parents=True, exist_ok=True)
        for simulated in self._devices.values():
            document = {
                "format": STATE_FILE_FORMAT,
                "device_id": format_device_id(simulated.device_id),
                "kind": kind_name(simulated.kind),
                "address": simulated.address,
                "device": simulated.device.to_state(),
            }
            path = directory / f"{format_device_id(simulated.device_id)}.json"
            partial = path.with_name(path.name + ".tmp")
            partial.write_text(json.dumps(document, indent=1), encoding="utf-8")
            partial.replace(path)
        return len(self._devices)

    def load(self, directory: Path) -> list[SimulatedDevice]:
        """Add the devices saved in ``directory`` (those not already in the fleet).

        Raises :class:`ValueError` for a file that is not a device state.
        """
        loaded: list[SimulatedDevice] = []
        if not directory.is_dir():
            return loaded
        for path in sorted(directory.glob("*.json")):
            if not _STATE_FILE_NAME.fullmatch(path.name):
                continue  # not a device's file (the simulator keeps its clock there too)
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
                if document.get("format") != STATE_FILE_FORMAT:
                    msg = f"unknown state file format {document.get('format')!r}"
                    raise ValueError(msg)
                device = VirtualDevice.from_state(
                    document["device"], clock_source=self.clock_source
                )
                address = str(document["address"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                msg = f"{path}: not a simulated device's state: {exc}"
                raise ValueError(msg) from exc
            if device.device_id not in self._devices:
                loaded.append(self.add(device, address=address))
        return loaded
