"""What a field technician sees of the devices in range, from their adverts alone.

Scanning never connects: a device's advert already says what it is, whether it waits in
pairing mode, its battery, alarms, list versions and waiting log records.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gateway.radio.base import Radio, ScanResult
from protocols.advert import Advert, decode_manufacturer_payload
from protocols.enums import AlarmFlags
from protocols.errors import ProtocolError
from protocols.gatt import COMPANY_ID
from protocols.identity import format_device_id


@dataclass(frozen=True)
class SeenDevice:
    """One device in range, as its latest advert describes it."""

    address: str
    rssi: int
    advert: Advert

    @property
    def device_id(self) -> str:
        return format_device_id(self.advert.device_id)

    def row(self) -> dict[str, Any]:
        """The fields a technician reads, for a table or a JSON document."""
        advert = self.advert
        return {
            "device": "unpaired (pairing mode)" if advert.pairing_mode else self.device_id,
            "device_id": self.device_id,
            "kind": advert.kind.name.lower(),
            "battery": advert.battery_percent,
            "rssi": self.rssi,
            "access": advert.access_version,
            "revocation": advert.revocation_version,
            "waiting": advert.records_waiting,
            "alarms": ",".join(
                (flag.name or "").lower() for flag in AlarmFlags if flag and flag in advert.alarms
            )
            or "-",
            "address": self.address,
        }


def lockgw_advert(result: ScanResult) -> Advert | None:
    """The lockgw advert in ``result``, or None for other devices and garbled adverts."""
    payload = result.manufacturer_data.get(COMPANY_ID)
    if payload is None:
        return None
    try:
        return decode_manufacturer_payload(payload)
    except ProtocolError:
        return None


async def scan_devices(radio: Radio, duration: float) -> AsyncIterator[tuple[SeenDevice, bool]]:
    """Every lockgw advert heard for ``duration`` seconds; True with a device's first one."""
    seen: set[bytes] = set()
    async with contextlib.aclosing(radio.scan(duration=duration)) as results:
        async for result in results:
            advert = lockgw_advert(result)
            if advert is None:
                continue
            first = advert.device_id not in seen
            seen.add(advert.device_id)
            yield SeenDevice(result.address, result.rssi, advert), first
