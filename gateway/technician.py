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


class NoDeviceError(LookupError):
    """No device, or no single device, waits in pairing mode where one was expected."""


async def find_in_pairing_mode(
    radio: Radio, device_id: bytes | None, *, within: float
) -> tuple[bytes, str]:
    """The device id and address of the device to pair.

    With ``device_id`` (typed, or read from the label's QR code), wait until that device is
    heard in pairing mode; without, there must be exactly one device in pairing mode.
    """
    candidates: dict[bytes, str] = {}
    async for seen, _first in scan_devices(radio, within):
        advert = seen.advert
        if device_id is not None and advert.device_id == device_id:
            if not advert.pairing_mode:
                msg = f"{seen.device_id} is already paired"
                raise NoDeviceError(msg)
            return advert.device_id, seen.address
        if device_id is None and advert.pairing_mode:
            candidates[advert.device_id] = seen.address
    if device_id is not None:
        msg = f"{format_device_id(device_id)} was not heard in pairing mode within {within:g} s"
        raise NoDeviceError(msg)
    if len(candidates) != 1:
        names = ", ".join(sorted(format_device_id(found) for found in candidates)) or "none"
        msg = f"{len(candidates)} devices wait in pairing mode ({names}): name one with --device"
        raise NoDeviceError(msg)
    [(found, address)] = candidates.items()
    return found, address
