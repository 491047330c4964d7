"""Bumble backend of the radio layer: a Bumble host stack in the central role.

``BumbleRadio("usb:0")`` drives a USB dongle directly (no BlueZ), ``BumbleRadio(
"tcp-client:127.0.0.1:PORT")`` a controller served by a simulator process, and
:meth:`BumbleRadio.from_hci` an in-process controller (tests attach one to a virtual link).

Bumble's objects are barely typed; they stay ``Any`` inside this module and only plain bytes,
strings and :class:`~gateway.radio.base.ScanResult` leave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, Final, Self, TypeVar

from bumble import core, hci
from bumble.device import Device, Peer
from bumble.gatt import GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR, Characteristic
from bumble.transport import open_transport

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
    MAX_ATT_MTU,
    MIN_ATT_MTU,
    NOTIFY_CHARACTERISTIC_UUID,
    SERVICE_UUID,
    WRITE_CHARACTERISTIC_UUID,
)

__all__ = ["BumbleLink", "BumbleRadio"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

DEFAULT_DEVICE_NAME: Final = "lockgw"

_BUMBLE_ERRORS: Final = (core.BaseBumbleError, OSError)
"""Everything Bumble raises (its own hierarchy) plus transport/socket errors. The builtin
TimeoutError is an OSError."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _translate(exc: BaseException, default: type[RadioError], context: str) -> RadioError:
    """Map a Bumble (or socket) exception onto the gateway's radio errors."""
    message = f"{context}: {_describe(exc)}"
    if isinstance(exc, (core.TimeoutError, core.CommandTimeoutError, TimeoutError)):
        return RadioTimeoutError(message)
    return default(message)


async def _bumble_call(awaitable: Awaitable[_T]) -> _T:
    """Await a Bumble GATT operation (callers check the link is up before starting one).

    Quirk: on disconnection Bumble cancels the future of the pending ATT request
    (``gatt_client.Client.on_disconnection``), which surfaces in the awaiting task as a
    CancelledError although nobody cancelled that task. Tell the two apart with
    ``Task.cancelling()`` and turn Bumble's into RadioDisconnectedError.
    """
    try:
        return await awaitable
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling() == 0:
            msg = "link lost during a GATT operation"
            raise RadioDisconnectedError(msg) from None
        raise


def _scan_result(advertisement: Any) -> ScanResult:
    """Build a ScanResult from a ``bumble.device.Advertisement``."""
    data = advertisement.data  # bumble.core.AdvertisingData
    manufacturer: dict[int, bytes] = {}
    for raw in data.get_all(core.AdvertisingData.MANUFACTURER_SPECIFIC_DATA, raw=True):
        if len(raw) >= 2:
            manufacturer.setdefault(int.from_bytes(raw[:2], "little"), bytes(raw[2:]))
    local_name: str | None = None
    for ad_type in (
        core.AdvertisingData.COMPLETE_LOCAL_NAME,
        core.AdvertisingData.SHORTENED_LOCAL_NAME,
    ):
        names = data.get_all(ad_type, raw=True)
        if names:
            local_name = bytes(names[0]).decode("utf-8", errors="replace")
            break
    return ScanResult(
        address=str(advertisement.address),
        rssi=int(advertisement.rssi),
        manufacturer_data=types.MappingProxyType(manufacturer),
        local_name=local_name,
        connectable=bool(advertisement.is_connectable),
    )


class BumbleLink(Link):
    """A GATT connection to one lockgw device, made by :meth:`BumbleRadio.connect`.

    Writes use Write Request (with response) when the characteristic allows it: the ATT
    response paces the sender to the device (one fragment in flight, so a slow lock cannot
    be overrun), reports the device's ATT errors, and lets a write fail on a dead link
    instead of vanishing. Command traffic to locks is small, so the round trip per fragment
    costs little. Write Without Response is used only if the device offers nothing else.
    """

    def __init__(self, connection: Any, on_down: Callable[[BumbleLink], None]) -> None:
        """Wrap a connected ``bumble.device.Connection``; :meth:`set_up` must follow.
        ``on_down(link)`` is called once when the link goes down."""
        self._on_down = on_down
        self._connection = connection
        self._address = str(connection.peer_address)
        self._mtu: int = MIN_ATT_MTU
        self._write_handle: int | None = None
        self._with_response = True
        self._notifications = Notifications(self._address)
        self._connected = True
        self._disconnecting: asyncio.Task[None] | None = None
        connection.on(connection.EVENT_DISCONNECTION, self._on_disconnection)

    # ---------------------------------------------------------------------------- set-up

    async def _call(self, awaitable: Awaitable[_T]) -> _T:
        """One GATT procedure of the set-up; fails fast on a link that is already down
        (Bumble would send the request into the void and wait 30 s for its answer)."""
        if not self._connected:
            if isinstance(awaitable, Coroutine):
                awaitable.close()
            msg = f"link {self._address} is down"
            raise RadioDisconnectedError(msg)
        return await _bumble_call(awaitable)

    async def set_up(self, mtu: int) -> None:
        """Exchange the MTU, discover the lockgw service and subscribe; raises RadioError."""
        peer = Peer(self._connection)
        self._mtu = int(await self._call(peer.request_mtu(mtu)))

        services = await self._call(peer.discover_service(SERVICE_UUID))
        if not services:
            msg = f"{self._address} does not serve the lockgw service {SERVICE_UUID}"
            raise RadioConnectError(msg)
        characteristics = await self._call(
            peer.discover_characteristics(
                uuids=[WRITE_CHARACTERISTIC_UUID, NOTIFY_CHARACTERISTIC_UUID],
                service=services[0],
            )
        )
        write_uuid = core.UUID(WRITE_CHARACTERISTIC_UUID)
        notify_uuid = core.UUID(NOTIFY_CHARACTERISTIC_UUID)
        write_char = next((c for c in characteristics if c.uuid == write_uuid), None)
        notify_char = next((c for c in characteristics if c.uuid == notify_uuid), None)

        props = Characteristic.Properties
        if write_char is None or not write_char.properties & (
            props.WRITE | props.WRITE_WITHOUT_RESPONSE
        ):
            msg = f"{self._address}: no writable characteristic {WRITE_CHARACTERISTIC_UUID}"
            raise RadioConnectError(msg)
        if notify_char is None or not notify_char.properties & props.NOTIFY:
            msg = f"{self._address}: no notifying characteristic {NOTIFY_CHARACTERISTIC_UUID}"
            raise RadioConnectError(msg)
        self._write_handle = int(write_char.handle)
        self._with_response = bool(write_char.properties & props.WRITE)

        # Bumble's subscribe() only logs a warning and returns when the CCCD is missing.
        await self._call(peer.discover_descriptors(notify_char))
        if notify_char.get_descriptor(GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR) is None:
            msg = f"{self._address}: notify characteristic has no CCCD"
            raise RadioConnectError(msg)
        await self._call(peer.subscribe(notify_char, self._on_notification, prefer_notify=True))

    # ---------------------------------------------------------------------------- events

    def _on_notification(self, value: bytes) -> None:
        if self._connected:
            self._notifications.put(value)

    def mark_down(self, reason: int) -> None:
        """The connection is already gone although no disconnection event reached us."""
        self._on_disconnection(reason)

    def _on_disconnection(self, reason: int = 0) -> None:
        if not self._connected:
            return
        self._connected = False
        logger.debug("link %s down, reason 0x%02X", self._address, reason)
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
    def is_connected(self) -> bool:
        return self._connected

    def _link_lost(self) -> bool:
        return not self._connected

    def add_disconnect_callback(self, callback: Callable[[], None]) -> None:
        self._notifications.add_callback(callback)

    async def write(self, fragment: bytes) -> None:
        data = bytes(fragment)
        if len(data) > self.max_fragment_size:
            msg = f"fragment of {len(data)} bytes exceeds {self.max_fragment_size} (MTU {self.mtu})"
            raise ValueError(msg)
        if not self._connected:
            msg = f"link {self._address} is down"
            raise RadioDisconnectedError(msg)
        client = self._connection.gatt_client
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                await _bumble_call(
                    client.write_value(self._write_handle, data, with_response=self._with_response)
                )
        except RadioError:
            raise
        except _BUMBLE_ERRORS as exc:
            if self._link_lost():  # the drop may have happened while we awaited
                msg = f"link {self._address} lost during a write"
                raise RadioDisconnectedError(msg) from exc
            raise _translate(exc, RadioError, f"writing to {self._address}") from exc

    async def receive(self) -> bytes:
        return await self._notifications.receive()

    async def disconnect(self) -> None:
        if not self._connected:
            return
        if self._disconnecting is None:
            self._disconnecting = asyncio.create_task(self._disconnect())
        await asyncio.shield(self._disconnecting)

    async def _disconnect(self) -> None:
        try:
            async with asyncio.timeout(DISCONNECT_TIMEOUT):
                await self._connection.disconnect()
        except _BUMBLE_ERRORS as exc:
            if self._connected:
                # The controller did not confirm. Consider the link gone anyway so no caller
                # waits on it; a controller in that state is beyond saving by this link.
                logger.warning("disconnecting %s failed: %s", self._address, _describe(exc))
        self._on_disconnection(hci.HCI_ErrorCode.CONNECTION_TERMINATED_BY_LOCAL_HOST_ERROR)


class BumbleRadio(Radio):
    """The central: a Bumble Device on an HCI transport.

    ``transport`` is a Bumble transport moniker opened with ``bumble.transport.open_transport``
    (``usb:0``, ``tcp-client:127.0.0.1:PORT``, ``serial:/dev/ttyACM0``, ...). ``address`` is
    the random static address to use (one is generated if None). ``active_scan`` asks for scan
    responses (local names usually live there).
    """

    def __init__(
        self,
        transport: str,
        *,
        address: str | None = None,
        name: str = DEFAULT_DEVICE_NAME,
        active_scan: bool = True,
    ) -> None:
        self._moniker = transport
        self._hci: tuple[Any, Any] | None = None
        self._own_address = address
        self._name = name
        self._active_scan = active_scan
        self._transport: Any = None
        self._device: Any = None
        self._links: set[BumbleLink] = set()
        self._scans = ScanFanout()
        self._scan_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()
        self._expected_peer: Any = None  # hci.Address of the connection being made
        self._transport_lost = False
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def from_hci(
        cls,
        hci_source: Any,
        hci_sink: Any,
        *,
        address: str | None = None,
        name: str = DEFAULT_DEVICE_NAME,
        active_scan: bool = True,
    ) -> Self:
        """A radio on an already opened HCI source/sink pair (Bumble TransportSource and
        TransportSink), e.g. ``(controller, AsyncPipeSink(controller))`` for an in-process
        ``bumble.controller.Controller`` on a virtual link. Closing the radio does not close
        them; their owner does."""
        radio = cls("<hci source/sink>", address=address, name=name, active_scan=active_scan)
        radio._hci = (hci_source, hci_sink)
        return radio

    def __repr__(self) -> str:
        return f"BumbleRadio({self._moniker!r})"

    # ---------------------------------------------------------------------------- open/close

    @property
    def address(self) -> str | None:
        """Our own (random static) address once open."""
        return None if self._device is None else str(self._device.random_address)

    async def open(self) -> None:
        if self._device is not None:
            return
        self._transport_lost = False
        try:
            async with asyncio.timeout(OPEN_TIMEOUT):
                if self._hci is None:
                    self._transport = await open_transport(self._moniker)
                    source, sink = self._transport.source, self._transport.sink
                else:
                    source, sink = self._hci
                address = (
                    hci.Address(self._own_address)
                    if self._own_address is not None
                    else hci.Address.generate_static_address()
                )
                device = Device.with_hci(self._name, address, source, sink)
                device.on(Device.EVENT_ADVERTISEMENT, self._on_advertisement)
                device.on(Device.EVENT_CONNECTION, self._on_device_connection)
                await device.power_on()
        except _BUMBLE_ERRORS as exc:
            await self._close_transport()
            raise _translate(exc, RadioError, f"opening {self._moniker}") from exc
        except BaseException:
            await self._close_transport()
            raise
        self._device = device
        # Bumble sources resolve `terminated` when the transport drops (the host then flushes
        # every connection, which ends our links).
        terminated = getattr(source, "terminated", None)
        if isinstance(terminated, asyncio.Future):
            terminated.add_done_callback(lambda _: self._on_transport_lost(device))

    async def close(self) -> None:
        device, self._device = self._device, None
        if device is None:
            await self._close_transport()
            return
        links = list(self._links)
        await asyncio.gather(*(link.disconnect() for link in links), return_exceptions=True)
        self._scans.end()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if device.is_scanning and not self._transport_lost:
                    await device.stop_scanning()
                await device.power_off()  # flushes the host: remaining links see a drop
        except _BUMBLE_ERRORS as exc:
            logger.warning("closing %r: %s", self, _describe(exc))
        await self._close_transport()

    async def _close_transport(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            with contextlib.suppress(*_BUMBLE_ERRORS):
                await transport.close()

    def _require_device(self) -> Any:
        if self._device is None:
            msg = f"{self!r} is not open"
            raise RadioError(msg)
        if self._transport_lost:
            msg = f"{self!r}: HCI transport lost; close and open the radio again"
            raise RadioError(msg)
        return self._device

    def _on_transport_lost(self, device: Any) -> None:
        if device is not self._device:
            return  # a transport of an earlier session, closed since
        self._transport_lost = True
        logger.warning("%r: HCI transport lost", self)
        self._scans.end()

    # ---------------------------------------------------------------------------- scanning

    def _on_advertisement(self, advertisement: Any) -> None:
        if not self._scans.wanted:
            return
        result = _scan_result(advertisement)
        self._scans.publish(result)

    async def scan(self, *, duration: float | None = None) -> AsyncGenerator[ScanResult, None]:
        self._require_device()
        results = self._scans.results(repr(self), duration, self._update_scanning)
        async with contextlib.aclosing(results):
            async for result in results:
                yield result

    async def _update_scanning(self) -> None:
        """Scan while at least one consumer iterates; Bumble allows one scan at a time."""
        async with self._scan_lock:
            device = self._device
            if device is None:
                return
            try:
                if self._scans.wanted and not device.is_scanning:
                    await device.start_scanning(active=self._active_scan, filter_duplicates=False)
                elif not self._scans.wanted and device.is_scanning:
                    async with asyncio.timeout(SCAN_STOP_TIMEOUT):
                        await device.stop_scanning()
            except _BUMBLE_ERRORS as exc:
                raise _translate(exc, RadioError, "starting or stopping the scan") from exc

    # ---------------------------------------------------------------------------- connecting

    def _on_device_connection(self, connection: Any) -> None:
        """Disconnect central connections nobody waits for: a connection that completed
        although its connect() had already given up (timeout or cancellation)."""
        if connection.role != hci.Role.CENTRAL or connection.peer_address == self._expected_peer:
            return
        logger.warning("dropping unexpected connection to %s", connection.peer_address)
        self._spawn(self._drop(connection))

    async def _drop(self, connection: Any) -> None:
        with contextlib.suppress(*_BUMBLE_ERRORS):
            async with asyncio.timeout(DISCONNECT_TIMEOUT):
                await connection.disconnect()

    async def _cancel_connecting(self, device: Any) -> None:
        """Stop a controller still initiating after Bumble's connect() was cancelled."""
        with contextlib.suppress(*_BUMBLE_ERRORS):
            async with asyncio.timeout(DISCONNECT_TIMEOUT):
                await device.send_sync_command(hci.HCI_LE_Create_Connection_Cancel_Command())

    def _spawn(self, coroutine: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def connect(
        self,
        address: str,
        *,
        mtu: int = MAX_ATT_MTU,
        # The radio API's own timeout (as in bleak): on expiry the pending connection must be
        # cancelled at the controller, which an outer asyncio.timeout cannot do.
        timeout: float = DEFAULT_CONNECT_TIMEOUT,  # noqa: ASYNC109 - the radio cancels at the controller
        on_established: Callable[[], None] | None = None,
    ) -> BumbleLink:
        if not MIN_ATT_MTU <= mtu <= MAX_ATT_MTU:
            msg = f"MTU {mtu} outside {MIN_ATT_MTU}..{MAX_ATT_MTU}"
            raise ValueError(msg)
        if timeout <= 0:
            msg = f"timeout must be positive, not {timeout}"
            raise ValueError(msg)
        try:
            peer_address = hci.Address(address)  # random unless suffixed "/P"
        except (ValueError, core.InvalidArgumentError) as exc:
            msg = f"not a Bluetooth address: {address!r}"
            raise ValueError(msg) from exc
        device = self._require_device()
        if any(link.address == str(peer_address) for link in self._links):
            msg = f"already connected to {address}"
            raise RadioConnectError(msg)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        link: BumbleLink | None = None
        established = False
        try:
            # The guard outlives `timeout` by CONNECT_CANCEL_GRACE: at `timeout` Bumble
            # cancels the pending connection and waits for the controller to confirm, which
            # a faulty controller never does.
            async with asyncio.timeout_at(deadline + CONNECT_CANCEL_GRACE):
                connection = await self._create_connection(device, peer_address, deadline)
                if on_established is not None:
                    on_established()
                link = BumbleLink(connection, on_down=self._links.discard)
                self._links.add(link)
                if device.connections.get(connection.handle) is not connection:
                    # Dropped between the connection event and our subscribing to its
                    # disconnection (seen over HCI/TCP): the event is gone, so say it here.
                    link.mark_down(hci.HCI_ErrorCode.CONNECTION_TERMINATED_BY_LOCAL_HOST_ERROR)
                await link.set_up(mtu)
            established = True
        except RadioDisconnectedError as exc:
            msg = f"{address} dropped the link while it was being set up"
            raise RadioConnectError(msg) from exc
        except RadioError:
            raise
        except _BUMBLE_ERRORS as exc:
            raise _translate(exc, RadioConnectError, f"connecting to {address}") from exc
        finally:
            if not established and link is not None:
                self._spawn(link.disconnect())
        return link

    async def _create_connection(self, device: Any, peer_address: Any, deadline: float) -> Any:
        """The LE connection itself, established by ``deadline`` (loop time) or cancelled."""
        async with self._connect_lock:  # one LE connection may be pending at a time
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                msg = f"no time left to connect to {peer_address}"
                raise RadioTimeoutError(msg)
            self._expected_peer = peer_address
            try:
                return await device.connect(
                    peer_address, transport=core.PhysicalTransport.LE, timeout=remaining
                )
            except asyncio.CancelledError:
                # Bumble leaves the controller initiating when connect() is cancelled (by
                # the guard in connect() or by our caller): tell it to stop.
                self._spawn(self._cancel_connecting(device))
                raise
            finally:
                self._expected_peer = None
