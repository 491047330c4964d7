"""The lockgw advert: what a device says about itself without a connection, sans-IO.

From the advert alone the gateway decides whether a device needs a visit: it is unpaired,
raises an alarm, holds an old access or revocation list, or has log records waiting. The
advert is the manufacturer-specific data (AD type 0xFF) under :data:`COMPANY_ID` in a
legacy advertising PDU of at most 31 bytes.

Manufacturer payload, after the two-byte little-endian company identifier that the Core
specification puts first (everything inside the payload is big-endian), 23 bytes::

    offset  size  field
         0     1  protocol version (PROTOCOL_VERSION)
         1     1  device kind (DeviceKind)
         2     1  state flags: bit 0 PAIRING_MODE, bits 7..1 reserved, zero
         3     8  device id
        11     1  battery percent 0..100, 0xFF unknown
        12     1  alarm flags (AlarmFlags)
        13     4  access list version held, u32
        17     4  revocation list version held, u32
        21     2  log records waiting, u16, saturating at 65535
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, TypeGuard

import construct

from protocols import PROTOCOL_VERSION
from protocols._codec import build, parse_exact
from protocols.enums import AlarmFlags, DeviceKind
from protocols.errors import DecodeError, ErrorCode, LocalProtocolError
from protocols.gatt import COMPANY_ID

__all__ = [
    "ADVERTISING_DATA_MAX_SIZE",
    "AD_TYPE_FLAGS",
    "AD_TYPE_MANUFACTURER_DATA",
    "DEVICE_ID_SIZE",
    "MANUFACTURER_PAYLOAD_SIZE",
    "Advert",
    "build_advertising_data",
    "decode_manufacturer_payload",
    "encode_manufacturer_payload",
    "parse_advertising_data",
]

DEVICE_ID_SIZE: Final = 8
"""Bytes of the device identifier."""

MANUFACTURER_PAYLOAD_SIZE: Final = 23
"""Bytes of the manufacturer payload, without the company identifier."""

ADVERTISING_DATA_MAX_SIZE: Final = 31
"""Bytes of advertising data a legacy advertising PDU carries."""

AD_TYPE_FLAGS: Final = 0x01
AD_TYPE_MANUFACTURER_DATA: Final = 0xFF

_FLAGS_LE_GENERAL_DISCOVERABLE: Final = 0x02
_FLAGS_BR_EDR_NOT_SUPPORTED: Final = 0x04

_STATE_PAIRING_MODE: Final = 0x01
_BATTERY_UNKNOWN: Final = 0xFF
_MAX_BATTERY_PERCENT: Final = 100
_MAX_U16: Final = 0xFFFF
_MAX_U32: Final = 0xFFFF_FFFF

_KNOWN_KINDS: Final = frozenset(kind.value for kind in DeviceKind)
# Every bit an AlarmFlags member defines; IntFlag keeps unknown bits instead of refusing them.
_KNOWN_ALARMS: Final = sum(flag.value for flag in AlarmFlags)

_PAYLOAD: Final = construct.Struct(
    "version" / construct.Int8ub,
    "kind" / construct.Int8ub,
    "state" / construct.Int8ub,
    "device_id" / construct.Bytes(DEVICE_ID_SIZE),
    "battery" / construct.Int8ub,
    "alarms" / construct.Int8ub,
    "access_version" / construct.Int32ub,
    "revocation_version" / construct.Int32ub,
    "records_waiting" / construct.Int16ub,
)

# The AD structure's value for manufacturer data: the company identifier is little-endian,
# as the Core specification (Supplement, part A, 1.4) lays it down, unlike our payload.
_MANUFACTURER_VALUE: Final = construct.Struct(
    "company_id" / construct.Int16ul,
    "payload" / construct.GreedyBytes,
)

_AD_STRUCTURE: Final = construct.Prefixed(
    construct.Int8ub,
    construct.Struct("ad_type" / construct.Int8ub, "value" / construct.GreedyBytes),
)

_FLAGS_AD: Final = build(
    _AD_STRUCTURE,
    {
        "ad_type": AD_TYPE_FLAGS,
        "value": bytes([_FLAGS_LE_GENERAL_DISCOVERABLE | _FLAGS_BR_EDR_NOT_SUPPORTED]),
    },
    "flags AD structure",
)


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass, but True as a version number is a bug, not a value.
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse(message: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.MALFORMED, message)


@dataclass(frozen=True)
class Advert:
    """What a device advertises about itself; always encodable once constructed.

    ``battery_percent`` is ``None`` when the device does not know its charge.
    ``records_waiting`` may exceed 65535; it is sent as 65535, which is all the gateway
    needs to decide on a visit. Bad values raise :class:`LocalProtocolError`.
    """

    device_id: bytes
    kind: DeviceKind
    pairing_mode: bool
    battery_percent: int | None
    alarms: AlarmFlags
    access_version: int
    revocation_version: int
    records_waiting: int

    def __post_init__(self) -> None:
        """Check every field, and normalise plain ints to the enum types."""
        device_id: object = self.device_id
        if not isinstance(device_id, bytes) or len(device_id) != DEVICE_ID_SIZE:
            msg = f"device_id must be {DEVICE_ID_SIZE} bytes, got {device_id!r}"
            raise _refuse(msg)
        # Plain ints are accepted and normalised, so that decoded and constructed adverts
        # compare and print alike.
        kind: object = self.kind
        if not _is_int(kind) or kind not in _KNOWN_KINDS:
            msg = f"kind must be a DeviceKind, got {kind!r}"
            raise _refuse(msg)
        object.__setattr__(self, "kind", DeviceKind(kind))
        pairing_mode: object = self.pairing_mode
        if not isinstance(pairing_mode, bool):
            msg = f"pairing_mode must be a bool, got {pairing_mode!r}"
            raise _refuse(msg)
        battery: object = self.battery_percent
        if battery is not None and not (_is_int(battery) and 0 <= battery <= _MAX_BATTERY_PERCENT):
            msg = f"battery_percent must be None or 0..{_MAX_BATTERY_PERCENT}, got {battery!r}"
            raise _refuse(msg)
        alarms: object = self.alarms
        if not _is_int(alarms) or alarms & ~_KNOWN_ALARMS:
            msg = f"alarms must be AlarmFlags, got {alarms!r}"
            raise _refuse(msg)
        object.__setattr__(self, "alarms", AlarmFlags(alarms))
        for name in ("access_version", "revocation_version"):
            value: object = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= _MAX_U32:
                msg = f"{name} must be 0..{_MAX_U32}, got {value!r}"
                raise _refuse(msg)
        records: object = self.records_waiting
        if not _is_int(records) or records < 0:
            msg = f"records_waiting must be a non-negative int, got {records!r}"
            raise _refuse(msg)


def encode_manufacturer_payload(advert: Advert) -> bytes:
    """The 23-byte manufacturer payload of ``advert``, without the company identifier."""
    value: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "kind": int(advert.kind),
        "state": _STATE_PAIRING_MODE if advert.pairing_mode else 0,
        "device_id": advert.device_id,
        "battery": _BATTERY_UNKNOWN if advert.battery_percent is None else advert.battery_percent,
        "alarms": int(advert.alarms),
        "access_version": advert.access_version,
        "revocation_version": advert.revocation_version,
        # Saturates: "very many" is all the gateway needs to know to plan a visit.
        "records_waiting": min(advert.records_waiting, _MAX_U16),
    }
    return build(_PAYLOAD, value, "advert payload")


def decode_manufacturer_payload(data: bytes) -> Advert:
    """Decode a manufacturer payload (without company identifier) into an :class:`Advert`.

    This is what bleak hands over in ``AdvertisementData.manufacturer_data[COMPANY_ID]``.
    Raises :class:`DecodeError`: ``UNSUPPORTED_VERSION`` for another protocol version,
    ``MALFORMED`` for a wrong length, unknown kind, reserved state bit, battery value
    101..254 or unknown alarm bit.
    """
    raw: object = data
    if not isinstance(raw, bytes | bytearray | memoryview):
        msg = f"advert payload: expected bytes, got {type(raw).__name__}"
        raise DecodeError(msg)
    data = bytes(raw)
    # The version comes first and is checked first: a later version may have another length.
    if data and data[0] != PROTOCOL_VERSION:
        msg = f"advert protocol version {data[0]}, expected {PROTOCOL_VERSION}"
        raise DecodeError(msg, ErrorCode.UNSUPPORTED_VERSION)
    fields = parse_exact(_PAYLOAD, data, "advert payload")
    if fields.kind not in _KNOWN_KINDS:
        msg = f"advert: unknown device kind {fields.kind:#04x}"
        raise DecodeError(msg)
    if fields.state & ~_STATE_PAIRING_MODE:
        msg = f"advert: reserved state flag bits set in {fields.state:#04x}"
        raise DecodeError(msg)
    battery: int = fields.battery
    if _MAX_BATTERY_PERCENT < battery < _BATTERY_UNKNOWN:
        msg = f"advert: battery percent {battery} out of range"
        raise DecodeError(msg)
    if fields.alarms & ~_KNOWN_ALARMS:
        msg = f"advert: unknown alarm flag bits in {fields.alarms:#04x}"
        raise DecodeError(msg)
    return Advert(
        device_id=bytes(fields.device_id),
        kind=DeviceKind(fields.kind),
        pairing_mode=bool(fields.state & _STATE_PAIRING_MODE),
        battery_percent=None if battery == _BATTERY_UNKNOWN else battery,
        alarms=AlarmFlags(fields.alarms),
        access_version=fields.access_version,
        revocation_version=fields.revocation_version,
        records_waiting=fields.records_waiting,
    )


def build_advertising_data(advert: Advert) -> bytes:
    """The advertising data of ``advert``: a Flags AD structure, then the manufacturer one.

    Flags is ``0x06`` (LE General Discoverable, BR/EDR not supported). The result is 30
    bytes, within the 31 of a legacy advertising PDU.
    """
    value = build(
        _MANUFACTURER_VALUE,
        {"company_id": COMPANY_ID, "payload": encode_manufacturer_payload(advert)},
        "manufacturer data",
    )
    manufacturer = build(
        _AD_STRUCTURE,
        {"ad_type": AD_TYPE_MANUFACTURER_DATA, "value": value},
        "manufacturer AD structure",
    )
    return _FLAGS_AD + manufacturer


def parse_advertising_data(data: bytes) -> Advert | None:
    """Find and decode the lockgw advert in advertising data (a run of AD structures).

    Each AD structure is a length byte, then that many bytes: the AD type and its value.
    A length of zero ends the data early (Core specification, vol. 3, part C, 11); what
    follows it is padding and is ignored. The first manufacturer-specific structure under
    :data:`COMPANY_ID` is decoded; ``None`` means there is none.

    Raises :class:`DecodeError` for a structure that runs past the end of the data, a
    manufacturer structure too short for its company identifier, or a lockgw payload that
    does not decode (a device sending garbage is worth an alarm, not silence). Input longer
    than 31 bytes is walked the same way, so advertising and scan response data may be
    passed together.
    """
    raw: object = data
    if not isinstance(raw, bytes | bytearray | memoryview):
        msg = f"advertising data: expected bytes, got {type(raw).__name__}"
        raise DecodeError(msg)
    data = bytes(raw)
    position = 0
    while position < len(data):
        length = data[position]
        if length == 0:
            break
        end = position + 1 + length
        if end > len(data):
            msg = (
                f"advertising data: AD structure at offset {position} declares {length} "
                f"bytes, only {len(data) - position - 1} remain"
            )
            raise DecodeError(msg)
        structure = parse_exact(_AD_STRUCTURE, data[position:end], "AD structure")
        position = end
        if structure.ad_type != AD_TYPE_MANUFACTURER_DATA:
            continue
        manufacturer = parse_exact(_MANUFACTURER_VALUE, structure.value, "manufacturer data")
        if manufacturer.company_id == COMPANY_ID:
            return decode_manufacturer_payload(manufacturer.payload)
    return None
