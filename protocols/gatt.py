"""GATT identifiers and advertising constants of the lockgw service."""

from __future__ import annotations

from typing import Final

SERVICE_UUID: Final = "6c6f636b-6777-4000-8000-00000000a001"
"""The one lockgw GATT service every device serves."""

WRITE_CHARACTERISTIC_UUID: Final = "6c6f636b-6777-4000-8000-00000000a002"
"""Gateway to device: write (with or without response), one fragment per write."""

NOTIFY_CHARACTERISTIC_UUID: Final = "6c6f636b-6777-4000-8000-00000000a003"
"""Device to gateway: notify, one fragment per notification."""

COMPANY_ID: Final = 0xFFFF
"""Bluetooth SIG company identifier in the manufacturer data; 0xFFFF is the value the SIG
reserves for testing, to be replaced by the vendor's own assigned identifier."""

ATT_HEADER_SIZE: Final = 3
"""Opcode and handle in front of every ATT write and notification value."""

MIN_ATT_MTU: Final = 23
MAX_ATT_MTU: Final = 517

MAX_ATTRIBUTE_VALUE_SIZE: Final = 512
"""Core spec Vol 3 Part F 3.2.9: an attribute value is at most 512 octets, whatever the MTU.
With the largest MTU (517) a fragment is therefore 512 octets, not MTU - 3 = 514; servers
reject longer writes with Invalid Attribute Value Length."""


def max_fragment_size(mtu: int) -> int:
    """The largest write or notification value at ``mtu``: ``min(mtu - 3, 512)``."""
    return min(mtu - ATT_HEADER_SIZE, MAX_ATTRIBUTE_VALUE_SIZE)
