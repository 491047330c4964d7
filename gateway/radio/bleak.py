"""Bleak backend of the radio layer: the operating system's Bluetooth stack through bleak.

On Linux that is BlueZ over D-Bus (``BleakRadio("hci0")`` picks the adapter), the production
set-up of a gateway; bleak's macOS and Windows backends work too, minus the adapter choice.
The backend is thin and uses bleak's public API as its maintainers intend:

* one shared :class:`bleak.BleakScanner` per radio, running while at least one
  :meth:`BleakRadio.scan` is iterated. BlueZ allows one discovery session per D-Bus client
  (``start_discovery`` in BlueZ's ``src/adapter.c`` answers a second one with
  ``org.bluez.Error.InProgress``) and bleak shares one D-Bus connection for all scanners, so
  a second, independent scanner would fail while the first runs;
* :meth:`BleakRadio.connect` hands :class:`bleak.BleakClient` the ``BLEDevice`` last seen in
  a scan, never a bare address: with an address bleak scans again inside ``connect()``
  (slow, and it collides with a running scan). An address not seen yet is looked up with the
  shared scanner within the connect timeout;
* one connection attempt per :meth:`BleakRadio.connect`: retries and backoff live in one
  layer, the daemon's scheduler.

bleak's objects never leave this module; only bytes, strings and
:class:`~gateway.radio.base.ScanResult` cross the boundary, and bleak's exceptions are
translated into the :class:`~gateway.radio.base.RadioError` family.

``scanner_factory`` and ``client_factory`` default to bleak's classes; tests pass fakes with
the same signatures (see :class:`ScannerFactory` and :class:`ClientFactory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import types
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable
from typing import Any, Final, Literal, Protocol

from bleak import BleakClient, BleakScanner
from bleak.args.bluez import BlueZClientArgs, BlueZScannerArgs
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.backends.service import BleakGATTServiceCollection
from bleak.exc import BleakDeviceNotFoundError, BleakError

from gateway.radio.base import (
    CLOSE_TIMEOUT,
    CONNECT_CANCEL_GRACE,
    DEFAULT_CONNECT_TIMEOUT,
    DISCONNECT_TIMEOUT,
    OPEN_TIMEOUT,
    SCAN_STOP_TIMEOUT,
    WRITE_TIMEOUT,
    Link,
    Notifications,
    Radio,
    RadioConnectError,
    RadioDisconnectedError,
    RadioError,
    RadioTimeoutError,
    ScanFanout,
    ScanResult,
)
from protocols.gatt import (
    ATT_HEADER_SIZE,
    MAX_ATT_MTU,
    MIN_ATT_MTU,
    NOTIFY_CHARACTERISTIC_UUID,
    SERVICE_UUID,
    WRITE_CHARACTERISTIC_UUID,
    max_fragment_size,
)

__all__ = [
    "BleakLink",
    "BleakRadio",
    "ClientAPI",
    "ClientFactory",
    "ScannerAPI",
    "ScannerFactory",
]

logger = logging.getLogger(__name__)


DEVICE_CACHE_SIZE: Final = 4096
"""``BLEDevice`` objects kept for :meth:`BleakRadio.connect`, least recently advertised
dropped first: phones nearby rotate random addresses, so an unbounded cache would grow for as
long as the daemon runs."""

SCAN_START_TIMEOUT: Final = OPEN_TIMEOUT
"""Starting the scanner. bleak has no separate "open" step: its first scan makes the D-Bus
connection to BlueZ and loads BlueZ's object tree, which is the work of opening an adapter."""

_BLEAK_ERRORS: Final = (BleakError, EOFError, OSError)
"""What bleak lets through: its own hierarchy (BleakDBusError, BleakGATTProtocolError,
BleakDeviceNotFoundError, BleakCharacteristicNotFoundError, ...); EOFError, which dbus-fast
sets on pending calls when the D-Bus connection closes under them; OSError from the D-Bus
socket; and TimeoutError (an OSError) from bleak's own timeouts."""

_LINK_FATAL: Final = (EOFError, ConnectionError)
"""A lost D-Bus connection: no GATT operation can succeed on that client any more, although
bleak still reports it connected (it only watches the device's Connected property)."""


# --------------------------------------------------------------------------------------------
# The part of bleak's API this backend uses, as protocols: bleak's classes satisfy them (the
# defaults below are type-checked against them) and so must the test fakes.
# --------------------------------------------------------------------------------------------


class ScannerAPI(Protocol):
    """What the radio uses of a :class:`bleak.BleakScanner`."""

    async def start(self) -> None:
        """Start scanning; advertisements go to the detection callback."""

    async def stop(self) -> None:
        """Stop scanning."""


class ScannerFactory(Protocol):
    """The :class:`bleak.BleakScanner` constructor, as far as the radio calls it."""

    def __call__(
        self,
        detection_callback: Callable[[BLEDevice, AdvertisementData], None] | None = ...,
        service_uuids: list[str] | None = ...,
        scanning_mode: Literal["active", "passive"] = ...,
        *,
        bluez: BlueZScannerArgs = ...,
    ) -> ScannerAPI:
        """A scanner calling ``detection_callback(device, advertisement_data)``."""


class ClientAPI(Protocol):
    """What a link uses of a :class:`bleak.BleakClient`."""

    @property
    def is_connected(self) -> bool:
        """Whether bleak considers the device connected."""

    @property
    def services(self) -> BleakGATTServiceCollection:
        """The discovered services; raises BleakError before discovery."""

    async def connect(self) -> None:
        """Connect and discover the services, within the constructor's ``timeout``."""

    async def disconnect(self) -> None:
        """Disconnect (a no-op if not connected) and release the client's resources."""

    async def write_gatt_char(
        self, char_specifier: BleakGATTCharacteristic, data: bytes, *, response: bool
    ) -> None:
        """One write, with response (ATT Write Request) or without (Write Command)."""

    async def start_notify(
        self,
        char_specifier: BleakGATTCharacteristic,
        callback: Callable[[BleakGATTCharacteristic, bytearray], None],
    ) -> None:
        """Subscribe; ``callback(characteristic, value)`` runs for every notification."""


class ClientFactory(Protocol):
    """The :class:`bleak.BleakClient` constructor, as far as the radio calls it.

    bleak calls ``disconnected_callback(client)`` whenever the link goes down, whichever side
    dropped it (and also during its own internal connection retries).
    """

    def __call__(
        self,
        address_or_ble_device: BLEDevice,
        disconnected_callback: Callable[[object], None] | None = ...,
        services: Iterable[str] | None = ...,
        *,
        timeout: float = ...,
        bluez: BlueZClientArgs = ...,
    ) -> ClientAPI:
        """A client for ``address_or_ble_device``, not yet connected."""


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _translate(exc: BaseException, default: type[RadioError], context: str) -> RadioError:
    """Map a bleak (or D-Bus, or socket) exception onto the gateway's radio errors."""
    message = f"{context}: {_describe(exc)}"
    if isinstance(exc, TimeoutError):  # asyncio.TimeoutError is TimeoutError since 3.11
        return RadioTimeoutError(message)
    return default(message)


def _scan_result(device: BLEDevice, advertisement: AdvertisementData) -> ScanResult:
    """Build a ScanResult from what bleak reports for one advertisement.

    bleak's AdvertisementData has no connectable flag (BlueZ does not expose one either), so
    every result claims ``connectable=True``; :meth:`BleakRadio.connect` is the real test.
    On BlueZ the data is BlueZ's merged view of the device: advertisements and scan responses
    seen so far.
    """
    return ScanResult(
        address=device.address,
        rssi=int(advertisement.rssi),
        manufacturer_data=types.MappingProxyType(
            {int(company): bytes(data) for company, data in advertisement.manufacturer_data.items()}
        ),
        local_name=advertisement.local_name,
        connectable=True,
    )


def _address_key(address: str) -> str:
    """BlueZ spells addresses in upper case; callers may not."""
    return address.upper()


class _State(enum.Enum):
    NEW = enum.auto()
    """Client created, its connect() has not returned: bleak may call the disconnected
    callback for attempts it retries itself, so the callback is ignored."""
    UP = enum.auto()
    DOWN = enum.auto()


# --------------------------------------------------------------------------------------------
# Link
# --------------------------------------------------------------------------------------------


class BleakLink(Link):
    """A bleak connection to one lockgw device, made by :meth:`BleakRadio.connect`.

    Writes use Write Request (``response=True``) when the characteristic allows it: the ATT
    response paces the sender to the device (one fragment in flight, so a slow lock cannot be
    overrun), reports the device's ATT errors, and lets a write fail on a dead link instead of
    vanishing. Command traffic to locks is small, so the round trip per fragment costs little.
    Write Without Response (``response=False``) is used only if the device offers nothing
    else. ``response=`` is always explicit: bleak's guess from the properties is deprecated.

    The MTU is read the way bleak documents as portable: the write characteristic's
    ``max_write_without_response_size`` is ATT_MTU - 3 on BlueZ (the characteristic's ``MTU``
    property), CoreBluetooth (maximumWriteValueLength) and WinRT (MaxPduSize).
    ``BleakClient.mtu_size`` is not used: on BlueZ it warns and answers 23 unless the private
    ``_acquire_mtu()`` hack ran. BlueZ older than 5.62 has no ``MTU`` property and
    reports 20, so fragments stay at 20 bytes there: slower, never wrong.
    """

    def __init__(
        self,
        device: BLEDevice,
        *,
        client_factory: ClientFactory,
        bluez: BlueZClientArgs,
        on_down: Callable[[BleakLink], None],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
    ) -> None:
        """A link to ``device``, not connected yet: :meth:`open_client` and :meth:`set_up`
        follow. ``on_down(link)`` is called once when the link goes down; ``spawn`` runs a
        background task its owner keeps track of."""
        self._device = device
        self._address = device.address
        self._client_factory = client_factory
        self._bluez = bluez
        self._on_down = on_down
        self._spawn = spawn
        self._client: ClientAPI | None = None
        self._state = _State.NEW
        self._mtu: int = MIN_ATT_MTU
        self._fragment_size = max_fragment_size(MIN_ATT_MTU)
        self._write_char: BleakGATTCharacteristic | None = None
        self._with_response = True
        self._notifications = Notifications(self._address)
        self._release: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"BleakLink({self._address!r}, {self._state.name})"

    # ---------------------------------------------------------------------------- set-up

    # bleak's own connect timeout: on expiry bleak cancels the pending connection at BlueZ,
    # which an outer asyncio.timeout cannot do.
    async def open_client(self, *, timeout: float) -> None:  # noqa: ASYNC109 - passed to bleak, which cancels at BlueZ
        """Create the bleak client and connect it (one attempt; bleak's connect includes
        service discovery, limited to the lockgw service). Raises bleak's exceptions.

        This is the one place to swap for ``bleak_retry_connector.establish_connection(
        BleakClient, device, name, disconnected_callback=..., max_attempts=1, ...)``.
        """
        self._client = self._client_factory(
            self._device,
            disconnected_callback=self._on_client_disconnected,
            services=[SERVICE_UUID],
            timeout=timeout,
            bluez=self._bluez,
        )
        await self._client.connect()
        if not self._client.is_connected:
            # The drop was reported before this task resumed after connect().
            msg = f"{self._address} dropped the link as it was established"
            raise RadioDisconnectedError(msg)
        self._state = _State.UP

    async def set_up(self, mtu: int) -> None:
        """Find the lockgw characteristics, size fragments and subscribe to notifications.

        ``mtu`` caps the link's MTU: bleak cannot ask for a particular ATT MTU (the OS
        negotiates its own maximum), so the link reports ``min(negotiated, mtu)``. Raises
        RadioConnectError, RadioDisconnectedError or bleak's exceptions.
        """
        client = self._require_client()
        service = client.services.get_service(SERVICE_UUID)
        if service is None:
            msg = f"{self._address} does not serve the lockgw service {SERVICE_UUID}"
            raise RadioConnectError(msg)
        # Looked up within the service, not the whole collection: another service may reuse
        # a UUID, which makes bleak's collection-wide lookup raise.
        write_char = service.get_characteristic(WRITE_CHARACTERISTIC_UUID)
        notify_char = service.get_characteristic(NOTIFY_CHARACTERISTIC_UUID)
        if write_char is None or not {"write", "write-without-response"} & set(
            write_char.properties
        ):
            msg = f"{self._address}: no writable characteristic {WRITE_CHARACTERISTIC_UUID}"
            raise RadioConnectError(msg)
        if notify_char is None or "notify" not in notify_char.properties:
            msg = f"{self._address}: no notifying characteristic {NOTIFY_CHARACTERISTIC_UUID}"
            raise RadioConnectError(msg)

        self._write_char = write_char
        self._with_response = "write" in write_char.properties
        without_response_size = int(write_char.max_write_without_response_size)
        negotiated = min(max(without_response_size + ATT_HEADER_SIZE, MIN_ATT_MTU), MAX_ATT_MTU)
        self._mtu = min(negotiated, mtu)
        # One write is one ATT PDU. With response, BlueZ would quietly turn anything longer
        # than MTU - 3 into a prepared (long) write, so the MTU bounds both kinds of writes.
        self._fragment_size = max_fragment_size(self._mtu)
        if not self._with_response:
            self._fragment_size = min(self._fragment_size, without_response_size)

        await client.start_notify(notify_char, self._on_notification)
        if self._state is not _State.UP:
            msg = f"link {self._address} is down"
            raise RadioDisconnectedError(msg)

    def _require_client(self) -> ClientAPI:
        if self._client is None or self._state is not _State.UP:
            msg = f"link {self._address} is down"
            raise RadioDisconnectedError(msg)
        return self._client

    # ---------------------------------------------------------------------------- events

    def _on_notification(self, _sender: BleakGATTCharacteristic, value: bytearray) -> None:
        if self._state is _State.UP:
            self._notifications.put(value)

    def _on_client_disconnected(self, _client: object) -> None:
        if self._state is not _State.UP:
            return  # NEW: bleak's own retry, or a failure connect() reports; DOWN: done
        logger.debug("link %s dropped", self._address)
        self._mark_down()
        # bleak (BlueZ) releases a client's D-Bus connection only in disconnect(), also
        # after the peer dropped the link: do it now rather than when someone remembers.
        self._start_release()

    def _mark_down(self) -> None:
        if self._state is _State.DOWN:
            return
        self._state = _State.DOWN
        self._on_down(self)
        self._notifications.end()

    # ---------------------------------------------------------------------------- Link API

    @property
    def address(self) -> str:
        return self._address

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def max_fragment_size(self) -> int:
        """Largest fragment :meth:`write` accepts: ``min(mtu - 3, 512)``, and no more than
        the characteristic's ``max_write_without_response_size`` when writing without
        response."""
        return self._fragment_size

    @property
    def is_connected(self) -> bool:
        return self._state is _State.UP

    @property
    def writes_with_response(self) -> bool:
        """Whether :meth:`write` uses Write Request (True) or Write Command (False)."""
        return self._with_response

    def add_disconnect_callback(self, callback: Callable[[], None]) -> None:
        self._notifications.add_callback(callback)

    async def write(self, fragment: bytes) -> None:
        data = bytes(fragment)
        if len(data) > self.max_fragment_size:
            msg = f"fragment of {len(data)} bytes exceeds {self.max_fragment_size} (MTU {self.mtu})"
            raise ValueError(msg)
        client = self._require_client()
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await client.write_gatt_char(
                    self._write_char_or_fail(), data, response=self._with_response
                )
        except _BLEAK_ERRORS as exc:
            if isinstance(exc, _LINK_FATAL) and self._state is _State.UP:
                logger.warning("link %s lost its D-Bus connection: %s", self._address, exc)
                self._mark_down()
                self._start_release()
            if self._state is not _State.UP or not client.is_connected:
                # The drop may have happened while we awaited; bleak then says "Not
                # connected" or the D-Bus call fails.
                msg = f"link {self._address} lost during a write"
                raise RadioDisconnectedError(msg) from exc
            raise _translate(exc, RadioError, f"writing to {self._address}") from exc

    def _write_char_or_fail(self) -> BleakGATTCharacteristic:
        if self._write_char is None:
            msg = f"link {self._address} is not set up"
            raise RadioError(msg)
        return self._write_char

    async def receive(self) -> bytes:
        return await self._notifications.receive()

    async def disconnect(self) -> None:
        """Disconnect; on a link that is already down this only waits for the client's
        resources to be released. Never raises bleak's errors: the link is down after."""
        if self._client is None:
            self._mark_down()
            return
        await asyncio.shield(self._start_release())

    def _start_release(self) -> asyncio.Task[None]:
        """The one task that disconnects the client and releases it (idempotent)."""
        if self._release is None:
            self._release = self._spawn(self._release_client())
        return self._release

    async def _release_client(self) -> None:
        client = self._client
        try:
            if client is not None:
                async with asyncio.timeout(DISCONNECT_TIMEOUT):
                    await client.disconnect()
        except _BLEAK_ERRORS as exc:
            # Not confirmed in time, or D-Bus failed. bleak has torn the client down anyway
            # (its disconnect() cleans up in `finally`); the device may linger connected at
            # BlueZ, which the next client to it finds and reuses.
            level = logging.WARNING if self._state is _State.UP else logging.DEBUG
            logger.log(level, "disconnecting %s: %s", self._address, _describe(exc))
        finally:
            self._mark_down()


# --------------------------------------------------------------------------------------------
# Radio
# --------------------------------------------------------------------------------------------


class BleakRadio(Radio):
    """The central: the OS Bluetooth stack through bleak.

    ``adapter`` names the adapter on BlueZ (``"hci0"``), passed to bleak as
    ``bluez={"adapter": ...}`` (bleak 3 deprecates the ``adapter=`` keyword); None uses
    BlueZ's first powered adapter, and other platforms have only one. Scans are active (local
    names usually live in scan responses; bleak's passive mode on BlueZ needs advertisement
    monitor patterns).

    :meth:`open` creates the shared scanner only; bleak has no adapter to open, so a missing
    or powered-off adapter shows at the first scan or connect.
    """

    def __init__(
        self,
        adapter: str | None = None,
        *,
        scanner_factory: ScannerFactory = BleakScanner,
        client_factory: ClientFactory = BleakClient,
    ) -> None:
        self._adapter = adapter
        self._scanner_factory = scanner_factory
        self._client_factory = client_factory
        self._bluez_scanner: BlueZScannerArgs = {} if adapter is None else {"adapter": adapter}
        self._bluez_client: BlueZClientArgs = {} if adapter is None else {"adapter": adapter}
        self._scanner: ScannerAPI | None = None
        self._scanning = False
        self._scan_lock = asyncio.Lock()
        self._scans = ScanFanout()
        self._devices: OrderedDict[str, BLEDevice] = OrderedDict()
        self._links: set[BleakLink] = set()
        self._pending: set[str] = set()  # address keys being connected
        self._connect_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"BleakRadio({self._adapter!r})"

    # ---------------------------------------------------------------------------- open/close

    async def open(self) -> None:
        if self._scanner is not None:
            return
        try:
            self._scanner = self._scanner_factory(
                detection_callback=self._on_advertisement,
                scanning_mode="active",
                bluez=self._bluez_scanner,
            )
        except BleakError as exc:  # e.g. no bleak backend for this platform
            raise _translate(exc, RadioError, f"opening {self!r}") from exc

    async def close(self) -> None:
        scanner, self._scanner = self._scanner, None
        if scanner is None:
            return
        links = list(self._links)
        await asyncio.gather(*(link.disconnect() for link in links), return_exceptions=True)
        self._scans.end()
        async with self._scan_lock:
            if self._scanning:
                self._scanning = False
                try:
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await scanner.stop()
                except _BLEAK_ERRORS as exc:
                    logger.warning("stopping the scan of %r: %s", self, _describe(exc))
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        self._devices.clear()

    def _require_scanner(self) -> ScannerAPI:
        if self._scanner is None:
            msg = f"{self!r} is not open"
            raise RadioError(msg)
        return self._scanner

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # The event loop keeps only weak references to tasks: hold them until done.
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ---------------------------------------------------------------------------- scanning

    def _on_advertisement(self, device: BLEDevice, advertisement_data: AdvertisementData) -> None:
        # bleak calls this from its D-Bus signal handler: no awaiting, no raising.
        key = _address_key(device.address)
        self._devices[key] = device  # bleak updates one BLEDevice per device; keep the latest
        self._devices.move_to_end(key)
        while len(self._devices) > DEVICE_CACHE_SIZE:
            self._devices.popitem(last=False)
        if not self._scans.wanted:
            return
        result = _scan_result(device, advertisement_data)
        self._scans.publish(result)

    async def scan(self, *, duration: float | None = None) -> AsyncGenerator[ScanResult, None]:
        self._require_scanner()
        results = self._scans.results(repr(self), duration, self._update_scanning)
        async with contextlib.aclosing(results):
            async for result in results:
                yield result

    async def _update_scanning(self) -> None:
        """Scan while at least one consumer iterates, with the one shared scanner."""
        async with self._scan_lock:
            scanner = self._scanner
            if scanner is None:
                return
            try:
                if self._scans.wanted and not self._scanning:
                    async with asyncio.timeout(SCAN_START_TIMEOUT):
                        await scanner.start()
                    self._scanning = True
                elif not self._scans.wanted and self._scanning:
                    # Considered stopped even if stop() fails: bleak forgets the session
                    # before it asks BlueZ (bleak/backends/bluezdbus/scanner.py, stop()).
                    self._scanning = False
                    async with asyncio.timeout(SCAN_STOP_TIMEOUT):
                        await scanner.stop()
            except _BLEAK_ERRORS as exc:
                raise _translate(exc, RadioError, "starting or stopping the scan") from exc

    # ---------------------------------------------------------------------------- connecting

    async def connect(
        self,
        address: str,
        *,
        mtu: int = MAX_ATT_MTU,
        # The radio API's own timeout (as in bleak): on expiry bleak cancels the pending
        # connection at BlueZ, which an outer asyncio.timeout cannot do.
        timeout: float = DEFAULT_CONNECT_TIMEOUT,  # noqa: ASYNC109 - the radio cancels at the controller
        on_established: Callable[[], None] | None = None,
    ) -> BleakLink:
        """Connect to ``address`` (as a :class:`ScanResult` spells it).

        The ``BLEDevice`` comes from the scans; an address not seen yet is looked up with the
        shared scanner, and that scan counts against ``timeout``. A device not seen
        advertising in time is a RadioConnectError. The timeout covers the look-up, bleak's
        connect and service discovery, and the subscription; bleak gets what is left of it as
        its own ``timeout``, and a guard ``CONNECT_CANCEL_GRACE`` later stops a bleak that
        overruns.
        """
        if not MIN_ATT_MTU <= mtu <= MAX_ATT_MTU:
            msg = f"MTU {mtu} outside {MIN_ATT_MTU}..{MAX_ATT_MTU}"
            raise ValueError(msg)
        if timeout <= 0:
            msg = f"timeout must be positive, not {timeout}"
            raise ValueError(msg)
        self._require_scanner()
        key = _address_key(address)
        if key in self._pending or any(_address_key(ln.address) == key for ln in self._links):
            msg = f"already connected or connecting to {address}"
            raise RadioConnectError(msg)
        deadline = asyncio.get_running_loop().time() + timeout
        self._pending.add(key)
        try:
            return await self._connect(address, key, mtu, deadline, on_established)
        finally:
            self._pending.discard(key)

    async def _connect(
        self,
        address: str,
        key: str,
        mtu: int,
        deadline: float,
        on_established: Callable[[], None] | None,
    ) -> BleakLink:
        loop = asyncio.get_running_loop()
        link: BleakLink | None = None
        try:
            async with asyncio.timeout_at(deadline + CONNECT_CANCEL_GRACE):
                device = await self._device_for(address, key, deadline)
                link = BleakLink(
                    device,
                    client_factory=self._client_factory,
                    bluez=self._bluez_client,
                    on_down=self._links.discard,
                    spawn=self._spawn,
                )
                # One LE connection pending at a time: BlueZ/the controller initiate one
                # connection at a time and answer concurrent attempts with errors.
                async with self._connect_lock:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        msg = f"no time left to connect to {address}"
                        raise RadioTimeoutError(msg)
                    await link.open_client(timeout=remaining)
                if on_established is not None:
                    # bleak's connect includes service discovery: the earliest point seen.
                    on_established()
                self._links.add(link)
                await link.set_up(mtu)
        except asyncio.CancelledError:
            if link is not None:
                self._spawn(link.disconnect())  # not awaited: we are being cancelled
            raise
        except Exception as exc:
            if link is not None:
                # Awaited, so an immediate retry cannot meet this client's teardown.
                await link.disconnect()
            raise self._connect_error(exc, address, key) from exc
        return link

    def _connect_error(self, exc: Exception, address: str, key: str) -> Exception:
        """The exception connect() raises for ``exc``: RadioConnectError or
        RadioTimeoutError for anything bleak or the radio raised; other exceptions (bugs)
        unchanged."""
        if isinstance(exc, (RadioConnectError, RadioTimeoutError)):
            return exc
        if isinstance(exc, RadioDisconnectedError):
            return RadioConnectError(f"{address} dropped the link while it was being set up")
        if isinstance(exc, RadioError):
            return RadioConnectError(f"connecting to {address}: {exc}")
        if isinstance(exc, BleakDeviceNotFoundError):
            # BlueZ forgot the device (it drops unconnected devices some time after the
            # scan stops): forget our BLEDevice too, so the next attempt scans afresh.
            self._devices.pop(key, None)
        if isinstance(exc, _BLEAK_ERRORS):
            return _translate(exc, RadioConnectError, f"connecting to {address}")
        return exc

    async def _device_for(self, address: str, key: str, deadline: float) -> BLEDevice:
        """The BLEDevice last seen for ``address``, or one found by scanning until
        ``deadline``. A scan, not ``BleakScanner.find_device_by_address``: that starts a
        second discovery, which BlueZ refuses while the shared scanner runs."""
        device = self._devices.get(key)
        if device is not None:
            return device
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining > 0:
            async with contextlib.aclosing(self.scan(duration=remaining)) as results:
                async for result in results:
                    if _address_key(result.address) == key:
                        break
        device = self._devices.get(key)
        if device is None:
            msg = f"{address} was not seen advertising"
            raise RadioConnectError(msg)
        return device
