"""A fake of bleak's public API, for testing the bleak backend without Bluetooth or D-Bus.

:class:`FakeBleakScanner` and :class:`FakeBleakClient` have the signatures of
``bleak.BleakScanner`` and ``bleak.BleakClient`` (the canary tests compare them) and behave as
bleak's BlueZ backend does in what the radio relies on. They deal in bleak's real data
classes: ``BLEDevice``, ``AdvertisementData``, ``BleakGATTServiceCollection``,
``BleakGATTService`` and ``BleakGATTCharacteristic``. :class:`FakeBluetooth` is the world
they live in: peripherals that advertise, accept connections, take writes and notify, with
faults to inject.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from bleak.args import SizedBuffer
from bleak.args.bluez import BlueZClientArgs, BlueZNotifyArgs, BlueZScannerArgs
from bleak.args.corebluetooth import CBScannerArgs, CBStartNotifyArgs
from bleak.args.winrt import WinRTClientArgs
from bleak.assigned_numbers import CharacteristicPropertyName
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import (
    BleakCharacteristicNotFoundError,
    BleakDBusError,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
    BleakGATTProtocolErrorCode,
)
from bleak.uuids import normalize_uuid_16

from gateway.radio.bleak import BleakRadio
from protocols.gatt import (
    ATT_HEADER_SIZE,
    COMPANY_ID,
    MAX_ATTRIBUTE_VALUE_SIZE,
    NOTIFY_CHARACTERISTIC_UUID,
    SERVICE_UUID,
    WRITE_CHARACTERISTIC_UUID,
)

GENERIC_ATTRIBUTE_SERVICE = normalize_uuid_16(0x1801)
IN_PROGRESS = "org.bluez.Error.InProgress"
FAILED = "org.bluez.Error.Failed"

WriteProperties = tuple[CharacteristicPropertyName, ...]


def _bluez_path(address: str) -> str:
    return "/org/bluez/hci0/dev_" + address.upper().replace(":", "_")


@dataclass(eq=False)
class FakePeripheral:
    """A lockgw device as bleak sees it through BlueZ, with faults to inject."""

    address: str
    local_name: str | None = "lockgw-fake"
    manufacturer_data: dict[int, bytes] = field(default_factory=lambda: {COMPANY_ID: b"\x01ok"})
    rssi: int = -60
    mtu: int = 247
    """The ATT MTU BlueZ negotiated; the characteristics report ``mtu - 3`` as their
    ``max_write_without_response_size``, as BlueZ 5.62+ does (20 before)."""
    advertising: bool = True
    """Advertises once whenever a scanner starts (more with :meth:`FakeBluetooth.advertise`)."""
    serves_lockgw: bool = True
    write_properties: WriteProperties | None = ("write", "write-without-response")
    """None: no write characteristic at all."""
    notify_properties: WriteProperties | None = ("notify",)
    connect_error: BaseException | None = None
    connect_delay: float = 0.0
    connect_hangs: bool = False
    ignores_timeout: bool = False
    """A client that overruns its own timeout (a stalled D-Bus)."""
    aborts_first_attempt: bool = False
    """bleak's BlueZ backend retries ``le-connection-abort-by-local`` inside connect() and
    calls the disconnected callback for the aborted attempt."""
    drops_as_connected: bool = False
    """The link drops as connect() returns: the callback comes before the caller resumes."""
    notify_error: BaseException | None = None
    drops_during_notify_setup: bool = False
    write_error: BaseException | None = None
    write_hangs: bool = False
    drops_during_write: bool = False

    writes: list[tuple[bytes, bool]] = field(default_factory=list)
    client: FakeBleakClient | None = None

    def notify(self, value: bytes) -> None:
        """Send one notification on the notify characteristic."""
        assert self.client is not None, "not connected"
        self.client.deliver(NOTIFY_CHARACTERISTIC_UUID, value)

    def drop(self) -> None:
        """The peripheral (or the radio) ends the connection."""
        assert self.client is not None, "not connected"
        self.client.drop()

    def services(self, requested: set[str] | None) -> BleakGATTServiceCollection:
        """The GATT database as bleak's BlueZ backend builds it, filtered by ``requested``
        (the client's ``services=`` argument) as BlueZ's manager does."""
        collection = BleakGATTServiceCollection()
        collection.add_service(BleakGATTService(None, 1, GENERIC_ATTRIBUTE_SERVICE))
        if not self.serves_lockgw or (requested is not None and SERVICE_UUID not in requested):
            return collection
        service = BleakGATTService(None, 10, SERVICE_UUID)
        collection.add_service(service)
        characteristics = [
            (11, WRITE_CHARACTERISTIC_UUID, self.write_properties),
            (13, NOTIFY_CHARACTERISTIC_UUID, self.notify_properties),
        ]
        for handle, uuid_, properties in characteristics:
            if properties is not None:
                collection.add_characteristic(
                    BleakGATTCharacteristic(
                        None,
                        handle,
                        uuid_,
                        list(properties),
                        # bleak's BlueZ manager: the characteristic's MTU property minus 3,
                        # read on every access.
                        lambda: self.mtu - ATT_HEADER_SIZE,
                        service,
                    )
                )
        return collection


class FakeBleakScanner:
    """``bleak.BleakScanner`` for a :class:`FakeBluetooth` (bound by a subclass)."""

    world: ClassVar[FakeBluetooth]

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None = None,
        service_uuids: list[str] | None = None,
        scanning_mode: Literal["active", "passive"] = "active",
        *,
        bluez: BlueZScannerArgs | None = None,
        cb: CBScannerArgs | None = None,
        backend: type[BaseBleakScanner] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.world.scanner_init_error is not None:
            raise self.world.scanner_init_error
        # As BaseBleakScanner.register_detection_callback checks it.
        if detection_callback is not None and (
            len(inspect.signature(detection_callback).parameters) != 2
        ):
            msg = "callback must be callable with 2 parameters"
            raise TypeError(msg)
        self.detection_callback = detection_callback
        self.service_uuids = service_uuids
        self.scanning_mode = scanning_mode
        self.bluez = bluez
        self.extra = {"cb": cb, "backend": backend, **kwargs}
        self.running = False
        self.starts = 0
        self.stops = 0
        self.world.scanners.append(self)

    async def start(self) -> None:
        """Start discovery; like BlueZ, refuse a second discovery from the same process."""
        await asyncio.sleep(0)  # the D-Bus round trip
        if self.world.scan_start_error is not None:
            raise self.world.scan_start_error
        if any(other.running for other in self.world.scanners):
            raise BleakDBusError(IN_PROGRESS, ["Operation already in progress"])
        self.running = True
        self.starts += 1
        asyncio.get_running_loop().call_soon(self.world.advertise_all)

    async def stop(self) -> None:
        """Stop discovery."""
        await asyncio.sleep(0)
        self.running = False
        self.stops += 1

    def see(self, device: BLEDevice, advertisement_data: AdvertisementData) -> None:
        """Deliver one advertisement to the detection callback."""
        if self.running and self.detection_callback is not None:
            result = self.detection_callback(device, advertisement_data)
            assert result is None, "the fake calls synchronous detection callbacks only"


class FakeBleakClient:
    """``bleak.BleakClient`` for a :class:`FakeBluetooth` (bound by a subclass)."""

    world: ClassVar[FakeBluetooth]

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        disconnected_callback: Callable[[FakeBleakClient], None] | None = None,
        services: Iterable[str] | None = None,
        *,
        timeout: float = 30,
        pair: bool = False,
        bluez: BlueZClientArgs | None = None,
        winrt: WinRTClientArgs | None = None,
        backend: type[BaseBleakClient] | None = None,
        **kwargs: Any,
    ) -> None:
        self.ble_device = address_or_ble_device
        self.disconnected_callback = disconnected_callback
        self.requested_services = None if services is None else set(services)
        self.timeout = timeout
        self.pair = pair
        self.bluez = bluez
        self.extra = {"winrt": winrt, "backend": backend, **kwargs}
        self.peripheral: FakePeripheral | None = None
        self.connected = False
        self.cancelled_pending = False
        self.disconnect_calls = 0
        self.disconnected_callbacks = 0
        self._services: BleakGATTServiceCollection | None = None
        self._notify: dict[int, Callable[[bytearray], object]] = {}
        self.connect_kwargs: dict[str, Any] = {}
        self.notify_args: dict[str, Any] = {}
        self.world.clients.append(self)

    @property
    def address(self) -> str:
        """The device's address."""
        device = self.ble_device
        return device.address if isinstance(device, BLEDevice) else device

    @property
    def is_connected(self) -> bool:
        """As bleak: False from the moment the drop was seen."""
        return self.connected

    @property
    def services(self) -> BleakGATTServiceCollection:
        """As bleak: raises before discovery (and after a disconnect)."""
        if self._services is None:
            msg = "Service Discovery has not been performed yet"
            raise BleakError(msg)
        return self._services

    async def connect(self, **kwargs: Any) -> None:
        """Connect and discover services within ``timeout``, as the BlueZ backend does:
        on timeout or cancellation it calls Disconnect, cancelling the pending connection."""
        self.connect_kwargs = kwargs
        if not isinstance(self.ble_device, BLEDevice):
            msg = "the fake wants a BLEDevice, as bleak recommends"
            raise AssertionError(msg)
        peripheral = self.world.peripheral_for(self.ble_device)
        self.world.pending_connects += 1
        self.world.max_pending_connects = max(
            self.world.max_pending_connects, self.world.pending_connects
        )
        try:
            timeout = None if peripheral.ignores_timeout else self.timeout
            async with asyncio.timeout(timeout):
                await asyncio.sleep(peripheral.connect_delay)
                if peripheral.connect_hangs:
                    await asyncio.get_running_loop().create_future()
                if peripheral.connect_error is not None:
                    raise peripheral.connect_error
                if peripheral.aborts_first_attempt and self.disconnected_callback is not None:
                    self.disconnected_callback(self)  # the aborted attempt, retried inside
                    await asyncio.sleep(0)
        except BaseException:
            self.cancelled_pending = True
            raise
        finally:
            self.world.pending_connects -= 1
        self.connected = True
        self.peripheral = peripheral
        peripheral.client = self
        self._services = peripheral.services(self.requested_services)
        if peripheral.drops_as_connected:
            self.drop()

    async def disconnect(self) -> None:
        """Disconnect if connected; the disconnected callback fires then, as on BlueZ."""
        self.disconnect_calls += 1
        if self.connected:
            await asyncio.sleep(0)
            self.drop()

    async def write_gatt_char(
        self,
        char_specifier: BleakGATTCharacteristic | int | str | uuid.UUID,
        data: SizedBuffer,
        response: bool | None = None,
    ) -> None:
        """One write. Stricter than bleak: ``response`` must be explicit."""
        if response is None:
            msg = "response= left for bleak to guess"
            raise AssertionError(msg)
        characteristic = self._resolve(char_specifier)
        if not self.connected:
            msg = "Not connected"
            raise BleakError(msg)
        peripheral = self._peripheral()
        await asyncio.sleep(0)
        if peripheral.write_hangs:
            await asyncio.get_running_loop().create_future()
        if peripheral.drops_during_write:
            self.drop()
        if not self.connected:
            raise BleakDBusError(FAILED, ["Not connected"])
        if peripheral.write_error is not None:
            raise peripheral.write_error
        value = bytes(data)
        kind = "write" if response else "write-without-response"
        if kind not in characteristic.properties:
            raise BleakGATTProtocolError(BleakGATTProtocolErrorCode.WRITE_NOT_PERMITTED)
        limit = (
            MAX_ATTRIBUTE_VALUE_SIZE if response else characteristic.max_write_without_response_size
        )
        if len(value) > limit:
            code = BleakGATTProtocolErrorCode.INVALID_ATTRIBUTE_VALUE_LENGTH
            raise BleakGATTProtocolError(code)
        peripheral.writes.append((value, response))

    async def start_notify(
        self,
        char_specifier: BleakGATTCharacteristic | int | str | uuid.UUID,
        callback: Callable[[BleakGATTCharacteristic, bytearray], Awaitable[None] | None],
        *,
        bluez: BlueZNotifyArgs | None = None,
        cb: CBStartNotifyArgs | None = None,
        **kwargs: Any,
    ) -> None:
        """Subscribe; bleak binds the characteristic as the callback's first argument."""
        self.notify_args = {"bluez": bluez, "cb": cb, **kwargs}
        if not self.connected:
            msg = "Not connected"
            raise BleakError(msg)
        characteristic = self._resolve(char_specifier)
        if inspect.iscoroutinefunction(callback):
            msg = "the fake supports synchronous notification callbacks only"
            raise NotImplementedError(msg)
        peripheral = self._peripheral()
        await asyncio.sleep(0)
        if peripheral.drops_during_notify_setup:
            self.drop()
        if not self.connected:
            raise BleakDBusError(FAILED, ["Not connected"])
        if peripheral.notify_error is not None:
            raise peripheral.notify_error
        self._notify[characteristic.handle] = functools.partial(callback, characteristic)

    # ---------------------------------------------------------------- driven by the peripheral

    def deliver(self, uuid_: str, value: bytes) -> None:
        """A notification arrives: bleak passes a fresh bytearray."""
        characteristic = self.services.get_characteristic(uuid_)
        assert characteristic is not None
        callback = self._notify.get(characteristic.handle)
        assert callback is not None, "not subscribed"
        callback(bytearray(value))

    def drop(self) -> None:
        """The link is down: bleak resets services, then calls the callback once."""
        if not self.connected:
            return
        self.connected = False
        self._services = None
        self._notify.clear()
        if self.peripheral is not None and self.peripheral.client is self:
            self.peripheral.client = None
        if self.disconnected_callback is not None:
            self.disconnected_callbacks += 1
            self.disconnected_callback(self)

    def _peripheral(self) -> FakePeripheral:
        assert self.peripheral is not None
        return self.peripheral

    def _resolve(
        self, char_specifier: BleakGATTCharacteristic | int | str | uuid.UUID
    ) -> BleakGATTCharacteristic:
        if isinstance(char_specifier, BleakGATTCharacteristic):
            return char_specifier
        characteristic = self.services.get_characteristic(char_specifier)
        if characteristic is None:
            raise BleakCharacteristicNotFoundError(char_specifier)
        return characteristic


class FakeBluetooth:
    """The world of the fakes: peripherals, and the scanners and clients made for them."""

    def __init__(self) -> None:
        self.peripherals: dict[str, FakePeripheral] = {}
        self.devices: dict[str, BLEDevice] = {}
        self.scanners: list[FakeBleakScanner] = []
        self.clients: list[FakeBleakClient] = []
        self.scanner_init_error: BaseException | None = None
        self.scan_start_error: BaseException | None = None
        self.pending_connects = 0
        self.max_pending_connects = 0

        world = self

        class Scanner(FakeBleakScanner):
            pass

        class Client(FakeBleakClient):
            pass

        Scanner.world = world
        Client.world = world
        self.scanner_class: type[FakeBleakScanner] = Scanner
        self.client_class: type[FakeBleakClient] = Client

    def radio(self, adapter: str | None = None) -> BleakRadio:
        """A BleakRadio on this world's fakes."""
        return BleakRadio(
            adapter, scanner_factory=self.scanner_class, client_factory=self.client_class
        )

    def add(self, address: str, **kwargs: Any) -> FakePeripheral:
        """A new peripheral (keyword arguments as FakePeripheral's)."""
        peripheral = FakePeripheral(address, **kwargs)
        self.peripherals[address.upper()] = peripheral
        return peripheral

    def device(self, peripheral: FakePeripheral) -> BLEDevice:
        """The one BLEDevice bleak keeps per device (it updates it on every advertisement)."""
        key = peripheral.address.upper()
        device = self.devices.get(key)
        if device is None:
            path = _bluez_path(peripheral.address)
            device = BLEDevice(peripheral.address, peripheral.local_name, {"path": path})
            self.devices[key] = device
        return device

    def advertise(self, peripheral: FakePeripheral) -> None:
        """One advertisement (with its scan response, merged as BlueZ does)."""
        device = self.device(peripheral)
        advertisement = AdvertisementData(
            local_name=peripheral.local_name,
            manufacturer_data=dict(peripheral.manufacturer_data),
            service_data={},
            service_uuids=[SERVICE_UUID] if peripheral.serves_lockgw else [],
            tx_power=None,
            rssi=peripheral.rssi,
            platform_data=(_bluez_path(peripheral.address), {}),
        )
        for scanner in list(self.scanners):
            scanner.see(device, advertisement)

    def advertise_all(self) -> None:
        """Every advertising peripheral advertises once."""
        for peripheral in list(self.peripherals.values()):
            if peripheral.advertising:
                self.advertise(peripheral)

    def peripheral_for(self, device: BLEDevice) -> FakePeripheral:
        """The peripheral behind a BLEDevice; BleakDeviceNotFoundError if BlueZ forgot it."""
        peripheral = self.peripherals.get(device.address.upper())
        if peripheral is None or self.devices.get(device.address.upper()) is not device:
            msg = f"Device with address {device.address} was not found."
            raise BleakDeviceNotFoundError(device.address, msg)
        return peripheral

    def forget(self, peripheral: FakePeripheral) -> None:
        """BlueZ removes the device object (scan stopped long ago): its BLEDevice is stale."""
        self.devices.pop(peripheral.address.upper(), None)

    @property
    def scanner(self) -> FakeBleakScanner:
        """The one scanner the radio made."""
        assert len(self.scanners) == 1, self.scanners
        return self.scanners[0]

    @property
    def client(self) -> FakeBleakClient:
        """The client made last."""
        return self.clients[-1]
