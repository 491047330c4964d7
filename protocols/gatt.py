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
