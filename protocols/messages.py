"""Application messages carried inside the Noise session.

Every plaintext is ``type (u8) | request id (u16) | body``. The gateway sends requests and
the device answers each with the matching response, or with :class:`ErrorReply`, under
the same request id. Signed objects (updates, log batches, certificates) travel as opaque
length-prefixed bytes and are decoded by their own codecs, so one signature always covers
the exact bytes that were signed. construct stays inside this module.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, Final

import construct as c

from protocols import PROTOCOL_VERSION
from protocols._codec import build, parse_exact
from protocols.enums import AlarmFlags, DeviceKind
from protocols.errors import DecodeError, ErrorCode, LocalProtocolError

MAX_ERROR_TEXT: Final = 200


class MessageType(IntEnum):
    """First byte of every session plaintext."""

    DEVICE_HELLO = 0x01
    GATEWAY_HELLO = 0x02
    TIME_SYNC = 0x10
    TIME_SYNC_RESULT = 0x11
    STATUS_REQUEST = 0x12
    STATUS = 0x13
    LOG_READ = 0x20
    LOG_BATCH = 0x21
    LOG_ACK = 0x22
    LOG_ACKED = 0x23
    AUTH_UPDATE = 0x30
    UPDATE_RESULT = 0x31
    PROVISION = 0x40
    PROVISIONED = 0x41
    DECOMMISSION = 0x42
    DECOMMISSIONED = 0x43
    ERROR = 0x7F


class DoorState(IntEnum):
    UNKNOWN = 0
    CLOSED = 1
    OPEN = 2


class LockState(IntEnum):
    UNKNOWN = 0
    LOCKED = 1
    UNLOCKED = 2
    JAMMED = 3


@dataclass(frozen=True)
class DeviceStatus:
    """What a device reports about itself: in its hello and in answer to a status request."""

    battery_percent: int  # 0..100, 255 when unknown
    door: DoorState
    lock: LockState
    alarms: AlarmFlags
    clock: int  # device time, unix seconds; 0 while the clock is unset
    time_floor: int  # the device never sets its clock below this
    access_version: int
    revocation_version: int
    next_sequence: int  # sequence number the next log record will get
    oldest_sequence: int  # oldest record still held
    records_waiting: int


@dataclass(frozen=True)
class DeviceHello:
    """Handshake message 2 payload: who the device is, proven by its keys."""

    protocol_version: int
    kind: DeviceKind
    device_id: bytes
    signing_key: bytes  # Ed25519 public, 32 bytes
    binding_signature: bytes  # signing key over the Noise static key
    paired: bool
    site_id: int  # 0 while unpaired
    firmware: str
    status: DeviceStatus


@dataclass(frozen=True)
class GatewayHello:
    """Handshake message 3 payload: the gateway's certificate (empty when pairing) and time."""

    certificate: bytes
    gateway_time: int


@dataclass(frozen=True)
class TimeSync:
    """Set the device clock to the gateway's; milliseconds, so drift is measurable."""

    gateway_time_ms: int


@dataclass(frozen=True)
class TimeSyncResult:
    device_time_before_ms: int  # 0 when the clock was unset
    device_time_after_ms: int


@dataclass(frozen=True)
class StatusRequest:
    pass


@dataclass(frozen=True)
class Status:
    status: DeviceStatus


@dataclass(frozen=True)
class LogRead:
    from_sequence: int
    max_records: int


@dataclass(frozen=True)
class LogBatchMessage:
    batch: bytes  # protocols.logrecords batch encoding


@dataclass(frozen=True)
class LogAck:
    """The gateway has durably stored every record up to and including this sequence."""

    up_to_sequence: int


@dataclass(frozen=True)
class LogAcked:
    up_to_sequence: int
    freed: int


@dataclass(frozen=True)
class AuthUpdate:
    update: bytes  # protocols.envelopes signed update encoding


@dataclass(frozen=True)
class UpdateResult:
    """The device applied the update; versions it holds now."""

    access_version: int
    revocation_version: int


@dataclass(frozen=True)
class Provision:
    """Sent in a pairing session: the trust anchor and where the device is mounted."""

    device_id: bytes  # the id the gateway paired, so a mix-up is caught
    authority_key: bytes  # Ed25519 public, 32 bytes
    site_id: int
    time: int


@dataclass(frozen=True)
class Provisioned:
    device_id: bytes


@dataclass(frozen=True)
class Decommission:
    device_id: bytes


@dataclass(frozen=True)
class Decommissioned:
    device_id: bytes


@dataclass(frozen=True)
class ErrorReply:
    """A typed refusal of one request; the session stays up."""

    code: ErrorCode
    message: str


Message = (
    DeviceHello
    | GatewayHello
    | TimeSync
    | TimeSyncResult
    | StatusRequest
    | Status
    | LogRead
    | LogBatchMessage
    | LogAck
    | LogAcked
    | AuthUpdate
    | UpdateResult
    | Provision
    | Provisioned
    | Decommission
    | Decommissioned
    | ErrorReply
)

REQUESTS: Final[dict[type[Message], type[Message]]] = {
    TimeSync: TimeSyncResult,
    StatusRequest: Status,
    LogRead: LogBatchMessage,
    LogAck: LogAcked,
    AuthUpdate: UpdateResult,
    Provision: Provisioned,
    Decommission: Decommissioned,
}
"""Each request type a gateway may send, and the response a device answers it with."""

# --- wire layouts -------------------------------------------------------------------------

_Id = c.Bytes(8)
_Key = c.Bytes(32)
_Blob = c.Prefixed(c.Int16ub, c.GreedyBytes)

_STATUS = c.Struct(
    "battery_percent" / c.Int8ub,
    "door" / c.Int8ub,
    "lock" / c.Int8ub,
    "alarms" / c.Int8ub,
    "clock" / c.Int32ub,
    "time_floor" / c.Int32ub,
    "access_version" / c.Int32ub,
    "revocation_version" / c.Int32ub,
    "next_sequence" / c.Int32ub,
    "oldest_sequence" / c.Int32ub,
    "records_waiting" / c.Int32ub,
)

_BODIES: Final[dict[MessageType, c.Construct[Any, Any]]] = {
    MessageType.DEVICE_HELLO: c.Struct(
        "protocol_version" / c.Int8ub,
        "kind" / c.Int8ub,
        "device_id" / _Id,
        "signing_key" / _Key,
        "binding_signature" / c.Bytes(64),
        "paired" / c.Int8ub,
        "site_id" / c.Int32ub,
        "firmware" / c.PascalString(c.Int8ub, "utf8"),
        "status" / _STATUS,
    ),
    MessageType.GATEWAY_HELLO: c.Struct("certificate" / _Blob, "gateway_time" / c.Int32ub),
    MessageType.TIME_SYNC: c.Struct("gateway_time_ms" / c.Int64ub),
    MessageType.TIME_SYNC_RESULT: c.Struct(
        "device_time_before_ms" / c.Int64ub, "device_time_after_ms" / c.Int64ub
    ),
    MessageType.STATUS_REQUEST: c.Struct(),
    MessageType.STATUS: c.Struct("status" / _STATUS),
    MessageType.LOG_READ: c.Struct("from_sequence" / c.Int32ub, "max_records" / c.Int16ub),
    MessageType.LOG_BATCH: c.Struct("batch" / _Blob),
    MessageType.LOG_ACK: c.Struct("up_to_sequence" / c.Int32ub),
    MessageType.LOG_ACKED: c.Struct("up_to_sequence" / c.Int32ub, "freed" / c.Int32ub),
    MessageType.AUTH_UPDATE: c.Struct("update" / _Blob),
    MessageType.UPDATE_RESULT: c.Struct(
        "access_version" / c.Int32ub, "revocation_version" / c.Int32ub
    ),
    MessageType.PROVISION: c.Struct(
        "device_id" / _Id, "authority_key" / _Key, "site_id" / c.Int32ub, "time" / c.Int32ub
    ),
    MessageType.PROVISIONED: c.Struct("device_id" / _Id),
    MessageType.DECOMMISSION: c.Struct("device_id" / _Id),
    MessageType.DECOMMISSIONED: c.Struct("device_id" / _Id),
    MessageType.ERROR: c.Struct("code" / c.Int8ub, "message" / c.PascalString(c.Int8ub, "utf8")),
}

_CLASSES: Final[dict[MessageType, type[Message]]] = {
    MessageType.DEVICE_HELLO: DeviceHello,
    MessageType.GATEWAY_HELLO: GatewayHello,
    MessageType.TIME_SYNC: TimeSync,
    MessageType.TIME_SYNC_RESULT: TimeSyncResult,
    MessageType.STATUS_REQUEST: StatusRequest,
    MessageType.STATUS: Status,
    MessageType.LOG_READ: LogRead,
    MessageType.LOG_BATCH: LogBatchMessage,
    MessageType.LOG_ACK: LogAck,
    MessageType.LOG_ACKED: LogAcked,
    MessageType.AUTH_UPDATE: AuthUpdate,
    MessageType.UPDATE_RESULT: UpdateResult,
    MessageType.PROVISION: Provision,
    MessageType.PROVISIONED: Provisioned,
    MessageType.DECOMMISSION: Decommission,
    MessageType.DECOMMISSIONED: Decommissioned,
    MessageType.ERROR: ErrorReply,
}
_TYPES: Final = {cls: kind for kind, cls in _CLASSES.items()}
_KNOWN_ALARMS: Final = sum(AlarmFlags)
_HEADER = c.Struct("type" / c.Int8ub, "request_id" / c.Int16ub)
HEADER_SIZE: Final = 3


def message_type(message: Message) -> MessageType:
    return _TYPES[type(message)]


def encode_message(request_id: int, message: Message) -> bytes:
    """``type | request id | body``; a value that does not fit is a local error."""
    if not 0 <= request_id <= 0xFFFF:
        msg = "a request id is a u16"
        raise LocalProtocolError(ErrorCode.MALFORMED, msg)
    kind = message_type(message)
    if isinstance(message, ErrorReply) and len(message.message.encode()) > MAX_ERROR_TEXT:
        message = ErrorReply(message.code, _truncate_utf8(message.message, MAX_ERROR_TEXT))
    header = build(_HEADER, {"type": kind, "request_id": request_id}, "message header")
    return header + build(_BODIES[kind], _to_fields(message), kind.name)


def decode_message(data: bytes) -> tuple[int, Message]:
    """Parse one plaintext into ``(request id, message)``; bad bytes raise :class:`DecodeError`."""
    if len(data) < HEADER_SIZE:
        msg = "message shorter than its header"
        raise DecodeError(msg)
    raw_type, request_id = data[0], int.from_bytes(data[1:3], "big")
    try:
        kind = MessageType(raw_type)
    except ValueError as exc:
        msg = f"unknown message type 0x{raw_type:02x}"
        raise DecodeError(msg, ErrorCode.UNKNOWN_MESSAGE) from exc
    parsed = parse_exact(_BODIES[kind], data[HEADER_SIZE:], kind.name)
    return request_id, _from_fields(kind, parsed)


def _to_fields(message: Message) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in fields(message):
        value = getattr(message, item.name)
        if isinstance(value, DeviceStatus):
            value = _to_fields_status(value)
        elif isinstance(value, bool):
            value = int(value)
        values[item.name] = value
    return values


def _to_fields_status(status: DeviceStatus) -> dict[str, Any]:
    return {item.name: int(getattr(status, item.name)) for item in fields(status)}


def _from_fields(kind: MessageType, parsed: Any) -> Message:
    try:
        if kind is MessageType.DEVICE_HELLO:
            return _device_hello(parsed)
        if kind is MessageType.STATUS:
            return Status(_status(parsed.status))
        if kind is MessageType.ERROR:
            if len(parsed.message.encode()) > MAX_ERROR_TEXT:
                msg = f"ERROR: text over {MAX_ERROR_TEXT} bytes"
                raise DecodeError(msg)
            return ErrorReply(ErrorCode(parsed.code), parsed.message)
        cls = _CLASSES[kind]
        return cls(**{item.name: parsed[item.name] for item in fields(cls)})
    except ValueError as exc:  # an enum value this version does not know
        msg = f"{kind.name}: {exc}"
        raise DecodeError(msg) from exc


def _device_hello(parsed: Any) -> DeviceHello:
    if parsed.paired not in (0, 1):
        msg = "DEVICE_HELLO: paired is 0 or 1"
        raise DecodeError(msg)
    if parsed.protocol_version != PROTOCOL_VERSION:
        msg = f"device speaks protocol version {parsed.protocol_version}"
        raise DecodeError(msg, ErrorCode.UNSUPPORTED_VERSION)
    return DeviceHello(
        protocol_version=parsed.protocol_version,
        kind=DeviceKind(parsed.kind),
        device_id=parsed.device_id,
        signing_key=parsed.signing_key,
        binding_signature=parsed.binding_signature,
        paired=bool(parsed.paired),
        site_id=parsed.site_id,
        firmware=parsed.firmware,
        status=_status(parsed.status),
    )


def _status(parsed: Any) -> DeviceStatus:
    alarms = parsed.alarms
    if alarms & ~_KNOWN_ALARMS:
        msg = f"unknown alarm bits 0x{alarms:02x}"
        raise ValueError(msg)
    return DeviceStatus(
        battery_percent=parsed.battery_percent,
        door=DoorState(parsed.door),
        lock=LockState(parsed.lock),
        alarms=AlarmFlags(alarms),
        clock=parsed.clock,
        time_floor=parsed.time_floor,
        access_version=parsed.access_version,
        revocation_version=parsed.revocation_version,
        next_sequence=parsed.next_sequence,
        oldest_sequence=parsed.oldest_sequence,
        records_waiting=parsed.records_waiting,
    )


def _truncate_utf8(text: str, limit: int) -> str:
    return text.encode()[:limit].decode(errors="ignore")
