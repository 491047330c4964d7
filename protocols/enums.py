"""Wire enumerations shared by adverts, messages, log records and access decisions."""

from __future__ import annotations

from enum import IntEnum, IntFlag


class DeviceKind(IntEnum):
    """What a device is; one byte in adverts and the device hello."""

    DOOR_LOCK = 1
    KEY_SAFE = 2
    MEDICINE_CABINET = 3
    KEY_CABINET = 4


class AlarmFlags(IntFlag):
    """Conditions a device reports in its advert and status; one byte."""

    NONE = 0
    BATTERY_LOW = 0x01
    TAMPER = 0x02
    JAMMED = 0x04
    CLOCK_UNSET = 0x08
    LOG_NEARLY_FULL = 0x10
    LOG_OVERFLOW = 0x20
    DOOR_HELD_OPEN = 0x40


class EventType(IntEnum):
    """Type of an event log record; one byte."""

    BOOT = 0x01
    ACCESS_GRANTED = 0x02
    ACCESS_DENIED = 0x03
    DOOR_OPENED = 0x04
    DOOR_CLOSED = 0x05
    LOCKED = 0x06
    UNLOCKED = 0x07
    JAMMED = 0x08
    FAILED_TO_OPEN = 0x09
    TAMPER = 0x0A
    BATTERY_LOW = 0x0B
    KEY_SAFE_OPENED = 0x0C
    KEY_SAFE_CLOSED = 0x0D
    MEDICINE_CABINET_OPENED = 0x0E
    MEDICINE_CABINET_CLOSED = 0x0F
    KEY_TAKEN = 0x10
    KEY_RETURNED = 0x11
    DONGLE_TAKEN = 0x12
    DONGLE_RETURNED = 0x13
    ACCESS_LIST_APPLIED = 0x14
    REVOCATION_LIST_APPLIED = 0x15
    UPDATE_REFUSED = 0x16
    TIME_SET = 0x17
    TIME_SET_REFUSED = 0x18
    LOG_OVERFLOW = 0x19
    PAIRED = 0x1A
    DECOMMISSIONED = 0x1B


class Reason(IntEnum):
    """Why an event happened or a decision was taken; one byte."""

    NONE = 0x00
    # Access decisions.
    VALID_KEY = 0x01
    KEY_UNKNOWN = 0x02
    KEY_REVOKED = 0x03
    ACTIVATION_MISSING = 0x04
    ACTIVATION_EXPIRED = 0x05
    OUTSIDE_VALIDITY = 0x06
    OUTSIDE_SCHEDULE = 0x07
    CLOCK_UNSET = 0x08
    LOCK_JAMMED = 0x09
    # Time changes.
    TIME_SYNC = 0x10
    TIME_BELOW_FLOOR = 0x11
    # Other causes.
    MANUAL = 0x20
    REMOTE = 0x21
    POWER_ON = 0x22
    BATTERY_CHANGE = 0x23
