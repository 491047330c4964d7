"""A virtual lockgw device: the DEVICE half of the protocol plus the state a real one keeps.

Door locks, key safes, medicine cabinets and key cabinets share one model here; their kind
decides which door events a granted key produces. Every rule comes from ``protocols/``:
the session, update verification, the access decision and the log chain. The model does no
I/O, so the same object answers over an in-memory pipe in a unit test and over the Bumble
virtual radio in a simulator process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from protocols import PROTOCOL_VERSION, access
from protocols.access import AccessState, Activation, Decision
from protocols.advert import Advert
from protocols.enums import AlarmFlags, DeviceKind, EventType, Reason
from protocols.envelopes import UpdateKind, decode_update, verify_update
from protocols.errors import ErrorCode, ProtocolError
from protocols.identity import DeviceIdentity, load_signing_public
from protocols.logrecords import DeviceLog, encode_batch
from protocols.messages import (
    AuthUpdate,
    Decommission,
    Decommissioned,
    DeviceHello,
    DeviceStatus,
    DoorState,
    ErrorReply,
    LockState,
    LogAck,
    LogAcked,
    LogBatchMessage,
    LogRead,
    Message,
    Provision,
    Provisioned,
    Status,
    StatusRequest,
    TimeSync,
    TimeSyncResult,
    UpdateResult,
)
from protocols.pairing import PairingCode
from protocols.session import (
    DeviceSessionConfig,
    MessageReceived,
    Session,
    SessionFailed,
    SessionMode,
    SessionState,
)

FIRMWARE: Final = "lockgw-sim 0.1"
BATTERY_LOW_PERCENT: Final = 20
LOG_NEARLY_FULL: Final = 0.8  # share of the ring buffer that raises the alarm
MAX_LOG_READ: Final = 1000
STATE_FORMAT: Final = 1

_OPENED: Final = {
    DeviceKind.DOOR_LOCK: EventType.UNLOCKED,
    DeviceKind.KEY_SAFE: EventType.KEY_SAFE_OPENED,
    DeviceKind.MEDICINE_CABINET: EventType.MEDICINE_CABINET_OPENED,
    DeviceKind.KEY_CABINET: EventType.UNLOCKED,
}
_CLOSED: Final = {
    DeviceKind.DOOR_LOCK: EventType.LOCKED,
    DeviceKind.KEY_SAFE: EventType.KEY_SAFE_CLOSED,
    DeviceKind.MEDICINE_CABINET: EventType.MEDICINE_CABINET_CLOSED,
    DeviceKind.KEY_CABINET: EventType.LOCKED,
}


@dataclass
class DeviceClock:
    """A device's real-time clock: host time plus an offset, running fast or slow by drift.

    It may be unset (after a battery change); the device then still accepts a re-sync.
    """

    source: Callable[[], float] = time.time
    offset: float = 0.0
    drift_ppm: float = 0.0
    is_set: bool = True
    _drift_epoch: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self._drift_epoch = self.source()

    def now(self) -> float | None:
        if not self.is_set:
            return None
        host = self.source()
        return host + self.offset + (host - self._drift_epoch) * self.drift_ppm / 1e6

    def set(self, device_time: float) -> None:
        host = self.source()
        self._drift_epoch = host
        self.offset = device_time - host
        self.is_set = True

    def lose_time(self) -> None:
        self.is_set = False


class VirtualDevice:
    """One simulated device: identity, trust anchor, lists, log, clock, and hardware state."""

    def __init__(
        self,
        kind: DeviceKind,
        *,
        identity: DeviceIdentity | None = None,
        pairing_code: PairingCode | None = None,
        log_capacity: int = 2000,
        clock: DeviceClock | None = None,
        local_offset_minutes: int = 0,
        key_cabinet_slots: int = 8,
    ) -> None:
        self.kind = kind
        self.identity = identity or DeviceIdentity.generate()
        self.pairing_code = pairing_code or PairingCode.generate()
        self.clock = clock or DeviceClock()
        self.local_offset_minutes = local_offset_minutes
        self.log = DeviceLog(self.identity.device_id, log_capacity)
        self.authority_key: bytes | None = None
        self.site_id = 0
        self.access = AccessState()
        self.battery_percent = 100
        self.door = DoorState.CLOSED
        self.lock = LockState.LOCKED
        self.tamper = False
        self.jammed = False
        self.slots: dict[int, int] = dict.fromkeys(range(1, key_cabinet_slots + 1), 0)
        """Key cabinet: slot -> key id of the staff member holding its key (0 = in the slot)."""
        self._log(EventType.BOOT, Reason.POWER_ON)

    # -- what the gateway sees without connecting --------------------------------------------

    @property
    def device_id(self) -> bytes:
        return self.identity.device_id

    @property
    def paired(self) -> bool:
        return self.authority_key is not None

    def alarms(self) -> AlarmFlags:
        flags = AlarmFlags.NONE
        if self.battery_percent < BATTERY_LOW_PERCENT:
            flags |= AlarmFlags.BATTERY_LOW
        if self.tamper:
            flags |= AlarmFlags.TAMPER
        if self.jammed:
            flags |= AlarmFlags.JAMMED
        if not self.clock.is_set:
            flags |= AlarmFlags.CLOCK_UNSET
        if self.log.waiting >= self.log.capacity * LOG_NEARLY_FULL:
            flags |= AlarmFlags.LOG_NEARLY_FULL
        if self.log.lost_unreported:
            flags |= AlarmFlags.LOG_OVERFLOW
        if self.door is DoorState.OPEN and self.lock is LockState.LOCKED:
            flags |= AlarmFlags.DOOR_HELD_OPEN
        return flags

    def advert(self) -> Advert:
        return Advert(
            device_id=self.device_id,
            kind=self.kind,
            pairing_mode=not self.paired,
            battery_percent=self.battery_percent,
            alarms=self.alarms(),
            access_version=self.access.access_version,
            revocation_version=self.access.revocation_version,
            records_waiting=self.log.waiting,
        )

    def status(self) -> DeviceStatus:
        return DeviceStatus(
            battery_percent=self.battery_percent,
            door=self.door,
            lock=self.lock,
            alarms=self.alarms(),
            clock=self._clock_seconds() or 0,
            time_floor=self.log.time_floor,
            access_version=self.access.access_version,
            revocation_version=self.access.revocation_version,
            next_sequence=self.log.next_sequence,
            oldest_sequence=self.log.oldest_sequence,
            records_waiting=self.log.waiting,
        )

    def session_config(self) -> DeviceSessionConfig:
        """What a new session needs; the clock (or its floor) judges certificates."""
        authority = load_signing_public(self.authority_key) if self.authority_key else None
        return DeviceSessionConfig(
            identity=self.identity,
            hello=DeviceHello(
                protocol_version=PROTOCOL_VERSION,
                kind=self.kind,
                device_id=self.device_id,
                signing_key=self.identity.signing_public,
                binding_signature=self.identity.binding_signature(),
                paired=self.paired,
                site_id=self.site_id,
                firmware=FIRMWARE,
                status=self.status(),
            ),
            now=self._clock_seconds() or self.log.time_floor,
            authority_key=authority,
            pairing_code=None if self.paired else self.pairing_code,
        )

    # -- answering the gateway ---------------------------------------------------------------

    def handle(self, message: Message, *, mode: SessionMode) -> Message:
        """The response to one request; refusals are typed :class:`ErrorReply` answers."""
        try:
            return self._dispatch(message, mode)
        except ProtocolError as exc:
            return ErrorReply(exc.code, exc.message)

    def _dispatch(self, message: Message, mode: SessionMode) -> Message:
        if isinstance(message, Provision):
            return self._provision(message, mode)
        if mode is SessionMode.PAIRING:
            return ErrorReply(ErrorCode.NOT_PAIRED, "provision the device first")
        if isinstance(message, StatusRequest):
            return Status(self.status())
        if isinstance(message, TimeSync):
            return self._time_sync(message)
        if isinstance(message, LogRead):
            return self._log_read(message)
        if isinstance(message, LogAck):
            freed = self.log.acknowledge(message.up_to_sequence)
            return LogAcked(up_to_sequence=message.up_to_sequence, freed=freed)
        if isinstance(message, AuthUpdate):
            return self._apply_update(message)
        if isinstance(message, Decommission):
            return self._decommission(message)
        return ErrorReply(ErrorCode.UNEXPECTED_MESSAGE, f"{type(message).__name__} unsupported")

    def _provision(self, message: Provision, mode: SessionMode) -> Message:
        if mode is not SessionMode.PAIRING or self.paired:
            return ErrorReply(ErrorCode.ALREADY_PAIRED, "the device is already paired")
        if message.device_id != self.device_id:
            return ErrorReply(ErrorCode.PEER_KEY_MISMATCH, "provisioning names another device")
        load_signing_public(message.authority_key)  # refuses a malformed trust anchor
        self._set_time(message.time)
        self.authority_key = message.authority_key
        self.site_id = message.site_id
        self._log(EventType.PAIRED, Reason.REMOTE, payload=message.site_id.to_bytes(4, "big"))
        return Provisioned(device_id=self.device_id)

    def _time_sync(self, message: TimeSync) -> Message:
        before = self.clock.now()
        target = message.gateway_time_ms / 1000
        if not self._set_time(target):
            return ErrorReply(ErrorCode.TIME_BELOW_FLOOR, "time is below the device's floor")
        after = self.clock.now()
        assert after is not None  # just set
        return TimeSyncResult(
            device_time_before_ms=round(before * 1000) if before is not None else 0,
            device_time_after_ms=round(after * 1000),
        )

    def _set_time(self, target: float) -> bool:
        """Set the clock unless that would wind it below the floor; every change is logged."""
        floor = self.log.time_floor
        previous = self._clock_seconds()
        if int(target) < floor:
            self._log(
                EventType.TIME_SET_REFUSED, Reason.TIME_BELOW_FLOOR, payload=_u32(int(target))
            )
            return False
        self.clock.set(target)
        if previous != int(target):
            self._log(EventType.TIME_SET, Reason.TIME_SYNC, payload=_u32(previous or 0))
        return True

    def _log_read(self, message: LogRead) -> Message:
        if not 1 <= message.max_records <= MAX_LOG_READ:
            return ErrorReply(ErrorCode.MALFORMED, f"max_records is 1..{MAX_LOG_READ}")
        batch = self.log.read(
            message.from_sequence,
            message.max_records,
            key=self.identity.signing_key,
            now=self._time_for_records(),
        )
        return LogBatchMessage(batch=encode_batch(batch))

    def _apply_update(self, message: AuthUpdate) -> Message:
        assert self.authority_key is not None  # only NORMAL sessions get here
        now = self._clock_seconds()
        try:
            if now is None:
                raise ProtocolError(ErrorCode.TIME_BELOW_FLOOR, "the clock is unset")
            update = verify_update(
                decode_update(message.update),
                authority_key=self._authority(),
                device_id=self.device_id,
                site_id=self.site_id,
                now=now,
                access_version=self.access.access_version,
                revocation_version=self.access.revocation_version,
            )
        except ProtocolError as exc:
            self._log(EventType.UPDATE_REFUSED, Reason.NONE, payload=bytes([exc.code]))
            raise
        self.access = access.apply_update(self.access, update)
        applied = (
            EventType.REVOCATION_LIST_APPLIED
            if update.kind is UpdateKind.REVOCATION
            else EventType.ACCESS_LIST_APPLIED
        )
        self._log(applied, Reason.REMOTE, payload=_u32(update.version))
        return UpdateResult(
            access_version=self.access.access_version,
            revocation_version=self.access.revocation_version,
        )

    def _decommission(self, message: Decommission) -> Message:
        if message.device_id != self.device_id:
            return ErrorReply(ErrorCode.PEER_KEY_MISMATCH, "decommission names another device")
        self._log(EventType.DECOMMISSIONED, Reason.REMOTE)
        self.factory_reset()
        return Decommissioned(device_id=self.device_id)

    def factory_reset(self) -> None:
        """Forget the trust anchor and lists; back in pairing mode with the label's code.

        The log chain continues rather than restarting at genesis: the device id stays the
        same, and a second history under one id would collide with the first wherever it
        was stored. Decommissioning collects the log first, so nothing is held back.
        """
        self.authority_key = None
        self.site_id = 0
        self.access = AccessState()
        self._log(EventType.BOOT, Reason.POWER_ON)

    # -- what happens at the door ------------------------------------------------------------

    def present_key(self, key_id: int, activation: Activation | None) -> Decision:
        """A staff key held to the reader: decide, log the decision and its reason, act."""
        decision = access.decide(
            self.access,
            key_id=key_id,
            activation=activation,
            now=self._clock_seconds(),
            local_offset_minutes=self.local_offset_minutes,
        )
        if decision.granted and self.jammed:
            decision = Decision(granted=False, reason=Reason.LOCK_JAMMED)
            self._log(EventType.ACCESS_DENIED, decision.reason, key_id=key_id)
            self._log(EventType.FAILED_TO_OPEN, Reason.LOCK_JAMMED, key_id=key_id)
            return decision
        granted = EventType.ACCESS_GRANTED if decision.granted else EventType.ACCESS_DENIED
        self._log(granted, decision.reason, key_id=key_id)
        if decision.granted:
            self.lock = LockState.UNLOCKED
            self._log(_OPENED[self.kind], Reason.VALID_KEY, key_id=key_id)
        return decision

    def open_door(self, key_id: int = 0) -> None:
        self.door = DoorState.OPEN
        self._log(EventType.DOOR_OPENED, Reason.MANUAL, key_id=key_id)

    def close_door(self, key_id: int = 0) -> None:
        self.door = DoorState.CLOSED
        self._log(EventType.DOOR_CLOSED, Reason.MANUAL, key_id=key_id)
        if self.lock is LockState.UNLOCKED:
            self.lock = LockState.LOCKED
            self._log(_CLOSED[self.kind], Reason.MANUAL, key_id=key_id)

    def take_from_slot(self, slot: int, key_id: int, *, dongle: bool = False) -> None:
        """Key cabinet: a staff member takes a resident's key (or a 2-factor dongle)."""
        self._check_slot(slot, key_out=False)
        self.slots[slot] = key_id
        event = EventType.DONGLE_TAKEN if dongle else EventType.KEY_TAKEN
        self._log(event, Reason.VALID_KEY, key_id=key_id, payload=bytes([slot]))

    def return_to_slot(self, slot: int, *, dongle: bool = False) -> None:
        self._check_slot(slot, key_out=True)
        key_id, self.slots[slot] = self.slots[slot], 0
        event = EventType.DONGLE_RETURNED if dongle else EventType.KEY_RETURNED
        self._log(event, Reason.MANUAL, key_id=key_id, payload=bytes([slot]))

    def set_tamper(self) -> None:
        self.tamper = True
        self._log(EventType.TAMPER, Reason.NONE)

    def jam(self) -> None:
        self.jammed = True
        self.lock = LockState.JAMMED
        self._log(EventType.JAMMED, Reason.LOCK_JAMMED)

    def drain_battery(self, percent: int) -> None:
        was_low = self.battery_percent < BATTERY_LOW_PERCENT
        self.battery_percent = max(0, self.battery_percent - percent)
        if not was_low and self.battery_percent < BATTERY_LOW_PERCENT:
            self._log(EventType.BATTERY_LOW, Reason.NONE, payload=bytes([self.battery_percent]))

    def change_battery(self) -> None:
        """A new battery: full charge, but the clock has lost its time."""
        self.battery_percent = 100
        self.clock.lose_time()
        self._log(EventType.BOOT, Reason.BATTERY_CHANGE)

    # -- persistence -------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """A JSON-friendly snapshot, secrets included: it is the device's flash memory."""
        signing, noise = self.identity.secret_bytes()
        return {
            "format": STATE_FORMAT,
            "kind": int(self.kind),
            "signing_key": signing.hex(),
            "noise_key": noise.hex(),
            "pairing_secret": self.pairing_code.secret.hex(),
            "authority_key": self.authority_key.hex() if self.authority_key else None,
            "site_id": self.site_id,
            "access": access.to_json(self.access),
            "log": self.log.to_state(),
            "clock": {
                "offset": self.clock.offset,
                "drift_ppm": self.clock.drift_ppm,
                "is_set": self.clock.is_set,
            },
            "battery_percent": self.battery_percent,
            "door": int(self.door),
            "lock": int(self.lock),
            "tamper": self.tamper,
            "jammed": self.jammed,
            "slots": {str(slot): key for slot, key in self.slots.items()},
            "local_offset_minutes": self.local_offset_minutes,
        }

    @classmethod
    def from_state(
        cls, state: dict[str, Any], *, clock_source: Callable[[], float] = time.time
    ) -> VirtualDevice:
        if state.get("format") != STATE_FORMAT:
            msg = f"unknown device state format {state.get('format')!r}"
            raise ValueError(msg)
        clock = DeviceClock(
            source=clock_source,
            offset=float(state["clock"]["offset"]),
            drift_ppm=float(state["clock"]["drift_ppm"]),
            is_set=bool(state["clock"]["is_set"]),
        )
        device = cls(
            DeviceKind(state["kind"]),
            identity=DeviceIdentity.from_secret_bytes(
                bytes.fromhex(state["signing_key"]), bytes.fromhex(state["noise_key"])
            ),
            pairing_code=PairingCode(bytes.fromhex(state["pairing_secret"])),
            clock=clock,
            local_offset_minutes=int(state["local_offset_minutes"]),
        )
        device.log = DeviceLog.from_state(state["log"])
        device.authority_key = (
            bytes.fromhex(state["authority_key"]) if state["authority_key"] else None
        )
        device.site_id = int(state["site_id"])
        device.access = access.from_json(state["access"])
        device.battery_percent = int(state["battery_percent"])
        device.door = DoorState(state["door"])
        device.lock = LockState(state["lock"])
        device.tamper = bool(state["tamper"])
        device.jammed = bool(state["jammed"])
        device.slots = {int(slot): int(key) for slot, key in state["slots"].items()}
        return device

    # -- internals ---------------------------------------------------------------------------

    def _authority(self) -> Ed25519PublicKey:
        assert self.authority_key is not None
        return load_signing_public(self.authority_key)

    def _clock_seconds(self) -> int | None:
        now = self.clock.now()
        return int(now) if now is not None else None

    def _time_for_records(self) -> int:
        # Without a clock the device stamps records with its floor: never earlier than a
        # record it already wrote, so the log's times stay monotonic.
        return max(self._clock_seconds() or 0, self.log.time_floor)

    def _log(
        self, event: EventType, reason: Reason, *, key_id: int = 0, payload: bytes = b""
    ) -> None:
        self.log.append(self._time_for_records(), event, reason, key_id=key_id, payload=payload)

    def _check_slot(self, slot: int, *, key_out: bool) -> None:
        if slot not in self.slots:
            msg = f"no slot {slot}"
            raise ValueError(msg)
        if bool(self.slots[slot]) != key_out:
            state = "already out" if self.slots[slot] else "already in its slot"
            msg = f"the key of slot {slot} is {state}"
            raise ValueError(msg)


def _u32(value: int) -> bytes:
    return max(0, min(value, 0xFFFF_FFFF)).to_bytes(4, "big")


class DeviceConnection:
    """The device's end of one connection: a DEVICE-role session answered by the model."""

    def __init__(self, device: VirtualDevice, *, mtu: int) -> None:
        self.device = device
        self.session = Session.device(device.session_config(), mtu=mtu)
        self.failure: SessionFailed | None = None

    def receive(self, fragment: bytes) -> list[bytes]:
        """Take one fragment from the gateway; return the fragments to send back."""
        self.session.receive_fragment(fragment)
        for event in self.session.events():
            if isinstance(event, MessageReceived):
                assert self.session.mode is not None  # requests arrive only after the handshake
                response = self.device.handle(event.message, mode=self.session.mode)
                self.session.send_response(event.request_id, response)
            elif isinstance(event, SessionFailed):
                self.failure = event
        return self.session.data_to_send()

    @property
    def closed(self) -> bool:
        return self.session.state is SessionState.CLOSED
