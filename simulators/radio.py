"""The virtual radio: Bumble controllers on a scalable in-process link.

* :class:`ScalableLink` replaces ``bumble.link.LocalLink`` for hundreds of devices, and
  optionally times connections as a real radio would (:class:`simulators.timing.BleTiming`).
* :class:`VirtualController` is a ``bumble.controller.Controller`` that keeps the link told
  whether it listens to advertising, and fixes two gaps of Bumble's controller.
* :class:`VirtualPeripheral` is one simulated device serving the lockgw GATT service.
* :func:`attach_remote_host` lets a host in another process (the gateway's
  ``BumbleRadio("tcp-client:...")``) join the link as a central, through a controller served
  on an HCI transport (``tcp-server:...``).

Two processes::

    python -m simulators.radio --serve tcp-server:127.0.0.1:0 --devices 3
    # prints one JSON line: {"transport": "tcp-client:127.0.0.1:PORT", "devices": [...]}
    # the gateway side then opens BumbleRadio("tcp-client:127.0.0.1:PORT")

Simulators reach the gateway only over the radio: nothing here imports ``gateway``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Self

from bumble import core, hci, ll
from bumble.controller import Controller
from bumble.device import AdvertisingType, Device
from bumble.gatt import Characteristic, CharacteristicValue, Service
from bumble.link import LocalLink
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink

from protocols.gatt import (
    COMPANY_ID,
    MAX_ATT_MTU,
    MIN_ATT_MTU,
    NOTIFY_CHARACTERISTIC_UUID,
    SERVICE_UUID,
    WRITE_CHARACTERISTIC_UUID,
    max_fragment_size,
)

if TYPE_CHECKING:
    from types import TracebackType

    from simulators.timing import BleTiming

__all__ = [
    "DEFAULT_ADVERTISING_INTERVAL",
    "PeripheralStateError",
    "RemoteHost",
    "ScalableLink",
    "VirtualController",
    "VirtualPeripheral",
    "advertising_data",
    "attach_remote_host",
    "main",
]

logger = logging.getLogger(__name__)

# Timing of the simulated devices, in seconds.
DEFAULT_ADVERTISING_INTERVAL: Final = 0.1
"""Advertising interval of a simulated device. A central connects on the next advert of its
peer, so this bounds the connection latency; 200 devices at 100 ms are 2000 adverts/s to
every scanner."""
STOP_TIMEOUT: Final = 5.0
"""Waiting for a graceful disconnection or HCI command while a device stops."""

MAX_LEGACY_ADVERTISING_DATA: Final = 31

ATT_CID: Final = 0x0004
"""L2CAP channel of the Attribute Protocol (Core Vol 3 Part A 2.1)."""
ATT_EXCHANGE_MTU_OPCODES: Final = frozenset({0x02, 0x03})
"""ATT_EXCHANGE_MTU_REQ and ATT_EXCHANGE_MTU_RSP (Core Vol 3 Part F 3.4.2)."""


class PeripheralStateError(RuntimeError):
    """The simulated device cannot do that now (not started, not connected, not subscribed)."""


def _is_zero(address: hci.Address) -> bool:
    return bytes(address) == bytes(6)


def _wants_advertising(controller: Controller) -> bool:
    """Whether a controller does anything with advertising PDUs right now: scanning, initiating
    a connection (Bumble's controller connects on the next advert of its peer), or syncing to
    periodic advertising. Mirrors the checks in ``Controller.on_advertising_pdu``."""
    return bool(
        controller.le_scan_enable
        or controller.pending_le_connection is not None
        or controller.pending_periodic_advertising_syncs
        or controller.established_periodic_advertising_syncs
    )


def advertising_data(
    manufacturer_data: bytes | None = None,
    *,
    company_id: int = COMPANY_ID,
    local_name: str | None = None,
) -> bytes:
    """Legacy advertising data: LE-only general-discoverable flags, manufacturer specific data
    (``company_id`` little-endian, then ``manufacturer_data``) and the complete local name."""
    structures: list[tuple[int, bytes]] = [
        (core.AdvertisingData.FLAGS, bytes([0x06])),  # LE General Discoverable, no BR/EDR
    ]
    if manufacturer_data is not None:
        structures.append(
            (
                core.AdvertisingData.MANUFACTURER_SPECIFIC_DATA,
                company_id.to_bytes(2, "little") + manufacturer_data,
            )
        )
    if local_name is not None:
        structures.append((core.AdvertisingData.COMPLETE_LOCAL_NAME, local_name.encode()))
    data = bytes(core.AdvertisingData(structures))
    if len(data) > MAX_LEGACY_ADVERTISING_DATA:
        msg = f"advertising data of {len(data)} bytes exceeds {MAX_LEGACY_ADVERTISING_DATA}"
        raise ValueError(msg)
    return data


# --------------------------------------------------------------------------------------------
# Link and controller
# --------------------------------------------------------------------------------------------


class VirtualController(Controller):
    """A Bumble controller for the virtual radio.

    * Tells a :class:`ScalableLink` after every HCI command (and after it connected on an
      advert) whether it listens to advertising PDUs, so the link delivers adverts to
      listeners only.
    * LE Create Connection Cancel: Bumble 0.0.236 answers success but keeps initiating and
      never sends the LE Connection Complete (Unknown Connection Identifier) the spec
      requires, so ``Device.connect(timeout=...)`` hangs after its timeout and every later
      connect fails with Command Disallowed. Fixed here.
    * On a timed :class:`ScalableLink` its host hears of a connection it initiated after the
      link's connection set-up time, as the peer does.
    * HCI Reset: Bumble's is a no-op. Here it drops the controller's connections (the peers see
      a supervision timeout) and stops advertising, scanning and initiating, as a real
      controller does, so a host that reconnects over HCI/TCP starts clean.
    """

    _connection_setup: float | None = None
    """While initiating on a timed link: how long our LE Connection Complete is held."""

    def __init__(
        self,
        name: str,
        *,
        link: LocalLink,
        host_source: Any = None,
        host_sink: Any = None,
        public_address: hci.Address | str | None = None,
    ) -> None:
        super().__init__(
            name,
            host_source=host_source,
            host_sink=host_sink,
            link=link,
            public_address=public_address,
        )

    def _listening_changed(self) -> None:
        if isinstance(self.link, ScalableLink):
            self.link.update_listening(self)

    def on_hci_command_packet(self, command: hci.HCI_Command) -> None:
        super().on_hci_command_packet(command)
        self._listening_changed()

    def create_le_connection(self, peer_address: hci.Address) -> None:
        timing = self.link.timing if isinstance(self.link, ScalableLink) else None
        # With a timed link, our host hears of the connection when the peer does: after the
        # set-up (see ScalableLink.send_advertising_pdu, which delays CONNECT_IND as long).
        self._connection_setup = None if timing is None else timing.connection_setup
        try:
            super().create_le_connection(peer_address)
        finally:
            self._connection_setup = None
        self._listening_changed()

    def send_hci_packet(self, packet: hci.HCI_Packet) -> None:
        delay = self._connection_setup
        if delay and isinstance(packet, hci.HCI_LE_Connection_Complete_Event):
            asyncio.get_running_loop().call_later(delay, super().send_hci_packet, packet)
            return
        super().send_hci_packet(packet)

    def on_hci_le_create_connection_cancel_command(
        self, _command: hci.HCI_LE_Create_Connection_Cancel_Command
    ) -> hci.HCI_StatusReturnParameters:
        pending = self.pending_le_connection
        if pending is None:
            return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.COMMAND_DISALLOWED_ERROR)
        self.pending_le_connection = None
        event = hci.HCI_LE_Connection_Complete_Event(
            status=hci.HCI_ErrorCode.UNKNOWN_CONNECTION_IDENTIFIER_ERROR,
            connection_handle=0,
            role=hci.Role.CENTRAL,
            peer_address_type=pending.peer_address.address_type,
            peer_address=pending.peer_address,
            connection_interval=0,
            peripheral_latency=0,
            supervision_timeout=0,
            central_clock_accuracy=0,
        )
        # After the Command Complete that the caller sends for our return value.
        asyncio.get_running_loop().call_soon(self.send_hci_packet, event)
        return hci.HCI_StatusReturnParameters(hci.HCI_ErrorCode.SUCCESS)

    def on_hci_reset_command(
        self, command: hci.HCI_Reset_Command
    ) -> hci.HCI_StatusReturnParameters:
        self.power_down(hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR)
        return super().on_hci_reset_command(command)

    def power_down(self, reason: int) -> None:
        """Drop every LE connection (peers get LL_TERMINATE_IND with ``reason``, our host
        nothing) and stop advertising, scanning and initiating."""
        for connection in list(self.le_connections.values()):
            connection.send_ll_control_pdu(ll.TerminateInd(reason))
        self.le_connections.clear()
        self.le_legacy_advertiser.stop()
        for advertising_set in self.advertising_sets.values():
            advertising_set.stop()
        self.advertising_sets.clear()
        self.le_scan_enable = False
        self.pending_le_connection = None
        self._listening_changed()


class ScalableLink(LocalLink):
    """``bumble.link.LocalLink`` for hundreds of controllers.

    Same controller-facing interface (``add_controller``, ``remove_controller``,
    ``on_address_changed``, ``send_advertising_pdu``, ``send_acl_data``,
    ``send_ll_control_pdu``, ``send_lmp_packet``) and the same behaviour, except whom it
    delivers to:

    * advertising PDUs (ADV_IND, extended) go only to controllers that listen: scanning,
      initiating a connection or syncing to periodic advertising. :class:`VirtualController`
      reports that after each HCI command; a stock ``Controller`` is asked on every PDU.
    * CONNECT_IND goes to the one controller that advertises under the target address, and
      ACL data and LL control PDUs to the owner of the destination address, looked up in a
      dict (LocalLink scans every controller and every connection each time).

    Lookups that miss fall back to LocalLink's scan, so odd cases behave as before.

    With a ``timing`` (:class:`simulators.timing.BleTiming`; None, the default, delivers
    at once as LocalLink does) the link times LE connections by the model's rules:

    * CONNECT_IND reaches the advertiser ``connection_setup`` after the initiator sent it
      (which it does on the target's next advert), and the initiator's host gets its LE
      Connection Complete then too; that moment is the anchor of the first connection event.
    * ACL data (whole L2CAP PDUs, as Bumble's controllers pass them) goes out in LL packets
      of at most ``data_length`` octets, at most ``packets_per_interval`` per direction per
      connection event, in the first event that starts after the controller got it. A PDU
      arrives when its last packet has been sent (anchor plus the airtime of the packets
      before it in that event).
    * ATT Exchange MTU requests and responses offer at most ``att_mtu``.

    * A :class:`VirtualPeripheral` starts advertising at a random phase of its interval.

    LL control PDUs (termination, encryption) are not delayed; timed data still under way
    when a connection ends is dropped. :attr:`on_acl_pdu`, if set,
    sees every LE ACL PDU (source, destination, PDU) as the link takes it, timed or not.
    """

    def __init__(self, timing: BleTiming | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # LocalLink.__init__ is unannotated
        self.timing = timing
        self.on_acl_pdu: Callable[[hci.Address, hci.Address, bytes], None] | None = None
        self._paced: dict[frozenset[hci.Address], _PacedConnection] = {}
        self._owners: dict[hci.Address, Controller] = {}
        self._owned: dict[Controller, set[hci.Address]] = {}
        self._listeners: set[Controller] = set()
        self._unobserved: set[Controller] = set()
        self._allocated: set[hci.Address] = set()

    # -- bookkeeping -------------------------------------------------------------------

    def _claim(self, controller: Controller, address: hci.Address) -> None:
        if _is_zero(address) or self._owners.get(address) is controller:
            return
        self._owners[address] = controller
        self._owned.setdefault(controller, set()).add(address)

    def add_controller(self, controller: Controller) -> None:
        super().add_controller(controller)
        self._claim(controller, controller.public_address)
        self._claim(controller, controller.random_address)
        if isinstance(controller, VirtualController):
            self.update_listening(controller)
        else:
            self._unobserved.add(controller)

    def remove_controller(self, controller: Controller) -> None:
        super().remove_controller(controller)
        self._listeners.discard(controller)
        self._unobserved.discard(controller)
        for address in self._owned.pop(controller, set()):
            if self._owners.get(address) is controller:
                del self._owners[address]

    def on_address_changed(self, controller: Controller) -> None:
        super().on_address_changed(controller)  # type: ignore[no-untyped-call]  # unannotated
        if controller in self.controllers:
            # Old addresses stay claimed: connections made under them still need routing.
            self._claim(controller, controller.random_address)

    def update_listening(self, controller: Controller) -> None:
        """Re-evaluate whether ``controller`` gets advertising PDUs."""
        if controller in self.controllers and _wants_advertising(controller):
            self._listeners.add(controller)
        else:
            self._listeners.discard(controller)

    @property
    def listening_controllers(self) -> frozenset[Controller]:
        """The controllers advertising PDUs are delivered to right now."""
        return frozenset(self._listeners | {c for c in self._unobserved if _wants_advertising(c)})

    def allocate_static_address(self) -> hci.Address:
        """A random static address no other device on this link has or was given."""
        while True:
            address = hci.Address.generate_static_address()
            if address not in self._allocated and address not in self._owners:
                self._allocated.add(address)
                return address

    # -- delivery ----------------------------------------------------------------------

    def find_le_controller(self, address: hci.Address) -> Controller | None:
        controller = self._owners.get(address)
        if controller is not None:
            return controller
        return super().find_le_controller(address)

    def send_advertising_pdu(
        self, sender_controller: Controller, packet: ll.AdvertisingPdu
    ) -> None:
        if sender_controller not in self.controllers:
            return  # a removed controller's last advertising timer
        loop = asyncio.get_running_loop()
        if isinstance(packet, ll.ConnectInd):
            target = self._owners.get(packet.advertiser_address)
            if target is None:
                super().send_advertising_pdu(sender_controller, packet)
            elif target is not sender_controller:
                if self.timing is None:
                    loop.call_soon(target.on_ll_advertising_pdu, packet)
                else:
                    loop.call_later(
                        self.timing.connection_setup, self._connect_timed, target, packet
                    )
            return
        if isinstance(packet, (ll.AdvInd, ll.AdvExtInd)):
            self._claim(sender_controller, packet.advertiser_address)
            for controller in self._listeners:
                if controller is not sender_controller:
                    loop.call_soon(controller.on_ll_advertising_pdu, packet)
            for controller in self._unobserved:
                if controller is not sender_controller and _wants_advertising(controller):
                    loop.call_soon(controller.on_ll_advertising_pdu, packet)
            return
        super().send_advertising_pdu(sender_controller, packet)

    # -- timing --------------------------------------------------------------------------

    def _connect_timed(self, target: Controller, packet: ll.ConnectInd) -> None:
        """CONNECT_IND reaches ``target`` after the set-up: the first connection event."""
        pair = frozenset((packet.initiator_address, packet.advertiser_address))
        self._paced[pair] = _PacedConnection(asyncio.get_running_loop().time())
        target.on_ll_advertising_pdu(packet)

    def send_acl_data(
        self,
        sender_controller: Controller,
        destination_address: hci.Address,
        transport: core.PhysicalTransport,
        data: bytes,
    ) -> None:
        timing = self.timing
        if transport != core.PhysicalTransport.LE or (timing is None and self.on_acl_pdu is None):
            super().send_acl_data(sender_controller, destination_address, transport, data)
            return
        source_address = sender_controller.random_address
        if timing is not None:
            data = _cap_att_mtu(data, timing.att_mtu)
        if self.on_acl_pdu is not None:
            self.on_acl_pdu(source_address, destination_address, data)
        destination = self.find_le_controller(destination_address)
        if destination is None:
            return
        loop = asyncio.get_running_loop()
        if timing is None:
            loop.call_soon(destination.on_link_acl_data, source_address, transport, data)
            return
        now = loop.time()
        pair = frozenset((source_address, destination_address))
        paced = self._paced.get(pair)
        if paced is None:  # a connection made before the link was timed
            paced = self._paced[pair] = _PacedConnection(now)
        when = paced.schedule(timing, source_address, len(data), now)
        loop.call_at(when, self._deliver, pair, paced, destination, source_address, data)

    def _deliver(
        self,
        pair: frozenset[hci.Address],
        paced: _PacedConnection,
        destination: Controller,
        source_address: hci.Address,
        data: bytes,
    ) -> None:
        """A timed PDU's last packet is through; nothing arrives after the connection
        ended (LL_TERMINATE_IND) or was replaced by a new one between the same devices."""
        if self._paced.get(pair) is paced:
            destination.on_link_acl_data(source_address, core.PhysicalTransport.LE, data)

    def send_ll_control_pdu(
        self,
        sender_address: hci.Address,
        receiver_address: hci.Address,
        packet: ll.ControlPdu,
    ) -> None:
        if isinstance(packet, ll.TerminateInd):
            self._paced.pop(frozenset((sender_address, receiver_address)), None)
        super().send_ll_control_pdu(sender_address, receiver_address, packet)


def _cap_att_mtu(pdu: bytes, att_mtu: int) -> bytes:
    """``pdu`` with the MTU of an ATT Exchange MTU request or response lowered to
    ``att_mtu``; any other PDU as it is. L2CAP basic frame: length (2), channel (2), then
    the ATT PDU: opcode (1), MTU (2, little-endian)."""
    if (
        len(pdu) < 7
        or int.from_bytes(pdu[2:4], "little") != ATT_CID
        or pdu[4] not in ATT_EXCHANGE_MTU_OPCODES
    ):
        return pdu
    mtu = int.from_bytes(pdu[5:7], "little")
    if mtu <= att_mtu:
        return pdu
    return pdu[:5] + att_mtu.to_bytes(2, "little") + pdu[7:]


@dataclass
class _Direction:
    """Where the next LL packet from one side of a connection can go."""

    event: int = 0
    """Index of the connection event it may go in, at the earliest."""
    used: int = 0
    """Packets that event already carries from this side."""
    elapsed: float = 0.0
    """Seconds of that event those packets take (packet, T_IFS, acknowledgement, T_IFS)."""


@dataclass
class _PacedConnection:
    """The connection events of one timed connection: anchor of the first, per side the
    packets already placed."""

    anchor: float
    sides: dict[hci.Address, _Direction] = field(default_factory=dict)

    def schedule(self, timing: BleTiming, source: hci.Address, octets: int, now: float) -> float:
        """Place a PDU of ``octets`` from ``source`` handed over at ``now``; loop time at
        which its last packet has been sent."""
        side = self.sides.setdefault(source, _Direction())
        interval = timing.connection_interval
        earliest = max(0, math.ceil((now - self.anchor) / interval - 1e-9))
        if earliest > side.event:
            side.event, side.used, side.elapsed = earliest, 0, 0.0
        end = 0.0
        for length in timing.ll_packets(octets):
            if side.used >= timing.packets_per_interval:
                side.event, side.used, side.elapsed = side.event + 1, 0, 0.0
            end = side.elapsed + timing.packet_airtime(length)
            side.elapsed += timing.packet_slot(length)
            side.used += 1
        return self.anchor + side.event * interval + end


# --------------------------------------------------------------------------------------------
# Peripheral
# --------------------------------------------------------------------------------------------


class VirtualPeripheral:
    """One simulated lockgw device: a Bumble Device on its own :class:`VirtualController`.

    Serves the lockgw service (write characteristic: WRITE and WRITE_WITHOUT_RESPONSE; notify
    characteristic: NOTIFY with its CCCD), negotiates the ATT MTU up to ``max_mtu`` and
    advertises connectably with ``advertising_data`` whenever it is not connected.

    Every value written is passed to :attr:`on_fragment`, in order. :meth:`notify` sends one
    fragment to the subscribed central.
    """

    def __init__(
        self,
        link: LocalLink,
        *,
        advertising_data: bytes = b"",
        address: str | None = None,
        name: str = "lockgw-sim",
        max_mtu: int = MAX_ATT_MTU,
        advertising_interval: float = DEFAULT_ADVERTISING_INTERVAL,
    ) -> None:
        if len(advertising_data) > MAX_LEGACY_ADVERTISING_DATA:
            msg = f"advertising data exceeds {MAX_LEGACY_ADVERTISING_DATA} bytes"
            raise ValueError(msg)
        if not MIN_ATT_MTU <= max_mtu <= MAX_ATT_MTU:
            msg = f"MTU {max_mtu} outside {MIN_ATT_MTU}..{MAX_ATT_MTU}"
            raise ValueError(msg)
        self._link = link
        if address is not None:
            self._address = hci.Address(address)
        elif isinstance(link, ScalableLink):
            self._address = link.allocate_static_address()
        else:
            self._address = hci.Address.generate_static_address()
        self._name = name
        self._max_mtu = max_mtu
        self._advertising_data = advertising_data
        self._advertising_interval = advertising_interval
        self.on_fragment: Callable[[bytes], None] | None = None
        """Called with every value written to the write characteristic, in order."""
        self._controller: VirtualController | None = None
        self._device: Any = None
        self._notify_characteristic: Any = None
        self._connection: Any = None
        self._subscribed = False
        self._connection_callbacks: list[Callable[[str], None]] = []
        self._disconnection_callbacks: list[Callable[[], None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"VirtualPeripheral({self.address})"

    # -- state -------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The random static address, as a scanner reports it."""
        return str(self._address)

    @property
    def controller(self) -> VirtualController | None:
        return self._controller

    @property
    def is_started(self) -> bool:
        return self._device is not None

    @property
    def is_connected(self) -> bool:
        return self._connection is not None

    @property
    def is_subscribed(self) -> bool:
        """Whether the connected central enabled notifications."""
        return self._connection is not None and self._subscribed

    @property
    def central_address(self) -> str | None:
        return None if self._connection is None else str(self._connection.peer_address)

    @property
    def mtu(self) -> int | None:
        """ATT MTU of the current connection (23 until the central exchanges MTUs)."""
        return None if self._connection is None else int(self._connection.att_mtu)

    @property
    def max_fragment_size(self) -> int | None:
        mtu = self.mtu
        return None if mtu is None else max_fragment_size(mtu)

    def add_connection_callback(self, callback: Callable[[str], None]) -> None:
        """``callback(central_address)`` on every connection."""
        self._connection_callbacks.append(callback)

    def add_disconnection_callback(self, callback: Callable[[], None]) -> None:
        """``callback()`` on every disconnection, whichever side dropped the link."""
        self._disconnection_callbacks.append(callback)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Power on and advertise."""
        if self._device is not None:
            return
        controller = VirtualController(f"sim-{self.address}", link=self._link)
        device = Device.with_hci(self._name, self._address, controller, AsyncPipeSink(controller))
        device.gatt_server.max_mtu = self._max_mtu  # the exchange yields min(request, this)

        props = Characteristic.Properties
        write: Characteristic[bytes] = Characteristic(
            WRITE_CHARACTERISTIC_UUID,
            props.WRITE | props.WRITE_WITHOUT_RESPONSE,
            Characteristic.WRITEABLE,
            CharacteristicValue(write=self._on_write),
        )
        notify: Characteristic[bytes] = Characteristic(
            NOTIFY_CHARACTERISTIC_UUID, props.NOTIFY, Characteristic.READABLE, b""
        )
        notify.on(Characteristic.EVENT_SUBSCRIPTION, self._on_subscription)
        device.add_service(Service(SERVICE_UUID, [write, notify]))  # adds the CCCD
        device.on(Device.EVENT_CONNECTION, self._on_connection)

        self._controller, self._device, self._notify_characteristic = controller, device, notify
        try:
            await device.power_on()
            if isinstance(self._link, ScalableLink) and self._link.timing is not None:
                # Devices powered on at different moments advertise at unrelated phases;
                # started together they would all advertise in step, and a central would
                # wait a whole interval for each of them in turn.
                await asyncio.sleep(random.uniform(0.0, self._advertising_interval))  # noqa: S311  # a phase, not a secret
            await device.start_advertising(
                advertising_type=AdvertisingType.UNDIRECTED_CONNECTABLE_SCANNABLE,
                advertising_data=self._advertising_data,
                advertising_interval_min=self._advertising_interval * 1000,
                advertising_interval_max=self._advertising_interval * 1000,
                auto_restart=False,  # re-advertising is ours, see _on_disconnection
            )
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Disconnect (the central sees "remote device powered off"), stop advertising and
        leave the link."""
        device, controller = self._device, self._controller
        if device is None or controller is None:
            return
        self._device = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        controller.power_down(
            hci.HCI_ErrorCode.REMOTE_DEVICE_TERMINATED_CONNECTION_DUE_TO_POWER_OFF_ERROR
        )
        with contextlib.suppress(ValueError, KeyError):
            self._link.remove_controller(controller)
        with contextlib.suppress(core.BaseBumbleError, TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                await device.power_off()  # host flush: our own connection ends, callbacks run
        self._controller = None
        self._connection = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def set_advertising_data(self, data: bytes) -> None:
        """Advertise ``data`` from now on (also after the next disconnection)."""
        if len(data) > MAX_LEGACY_ADVERTISING_DATA:
            msg = f"advertising data exceeds {MAX_LEGACY_ADVERTISING_DATA} bytes"
            raise ValueError(msg)
        self._advertising_data = data
        device = self._device
        if device is None:
            return
        device.advertising_data = data
        if device.legacy_advertising_set is not None:
            await device.legacy_advertising_set.set_advertising_data(data)

    # -- traffic -----------------------------------------------------------------------

    async def notify(self, fragment: bytes) -> None:
        """Send one notification to the connected, subscribed central."""
        connection = self._connection
        if self._device is None or connection is None:
            msg = f"{self!r} is not connected"
            raise PeripheralStateError(msg)
        if not self._subscribed:
            msg = f"{self!r}: the central has not enabled notifications"
            raise PeripheralStateError(msg)
        data = bytes(fragment)
        limit = max_fragment_size(int(connection.att_mtu))
        if len(data) > limit:
            msg = f"notification of {len(data)} bytes exceeds {limit}"
            raise ValueError(msg)
        await self._device.notify_subscriber(connection, self._notify_characteristic, data)

    async def disconnect(self) -> None:
        """Disconnect the central (it sees "remote user terminated"); no-op if not connected."""
        connection = self._connection
        if connection is None:
            return
        with contextlib.suppress(core.BaseBumbleError):
            async with asyncio.timeout(STOP_TIMEOUT):
                await connection.disconnect()

    # -- Bumble events -----------------------------------------------------------------

    def _on_write(self, _connection: Any, value: bytes) -> None:
        if self.on_fragment is None:
            logger.debug("%r: no on_fragment, dropping %d bytes", self, len(value))
            return
        try:
            self.on_fragment(bytes(value))
        except Exception:
            logger.exception("%r: on_fragment failed", self)

    def _on_subscription(self, bearer: Any, notify_enabled: bool, _indicate_enabled: bool) -> None:  # noqa: FBT001  # Bumble's event signature
        if bearer is self._connection:
            self._subscribed = notify_enabled

    def _on_connection(self, connection: Any) -> None:
        if connection.role != hci.Role.PERIPHERAL:
            return
        self._connection = connection
        self._subscribed = False
        connection.on(connection.EVENT_DISCONNECTION, self._on_disconnection)
        central = str(connection.peer_address)
        for callback in list(self._connection_callbacks):
            try:
                callback(central)
            except Exception:
                logger.exception("%r: connection callback failed", self)

    def _on_disconnection(self, _reason: int = 0) -> None:
        self._connection = None
        self._subscribed = False
        if self._device is not None:
            self._spawn(self._advertise_again())
        for callback in list(self._disconnection_callbacks):
            try:
                callback()
            except Exception:
                logger.exception("%r: disconnection callback failed", self)

    async def _advertise_again(self) -> None:
        device = self._device
        if device is None or device.legacy_advertising_set is None:
            return
        try:
            await device.legacy_advertising_set.start()
        except core.BaseBumbleError:
            logger.exception("%r: could not advertise again", self)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# --------------------------------------------------------------------------------------------
# A host in another process
# --------------------------------------------------------------------------------------------


class RemoteHost:
    """A controller on the link whose host is reached over an HCI transport."""

    def __init__(self, link: LocalLink, controller: VirtualController, transport: Any) -> None:
        self._link = link
        self._controller: VirtualController | None = controller
        self._transport = transport

    @property
    def controller(self) -> VirtualController | None:
        return self._controller

    @property
    def port(self) -> int | None:
        """The TCP port a ``tcp-server:`` transport listens on (useful with port 0)."""
        server = getattr(self._transport, "server", None)
        if server is None or not server.sockets:
            return None
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Leave the link (the host's connections drop) and close the transport.

        Quirk: Bumble's tcp-server Transport.close() leaves the listening socket and the
        accepted connection open; they are closed here.
        """
        controller, self._controller = self._controller, None
        if controller is None:
            return
        controller.power_down(hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR)
        with contextlib.suppress(ValueError, KeyError):
            self._link.remove_controller(controller)
        await self._transport.close()
        accepted = getattr(self._transport.sink, "transport", None)
        if accepted is not None:
            accepted.close()
        server = getattr(self._transport, "server", None)
        if server is not None:
            server.close()
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


async def attach_remote_host(
    link: LocalLink, transport_moniker: str, *, name: str = "remote-host"
) -> RemoteHost:
    """Put a :class:`VirtualController` on ``link`` and serve its HCI on ``transport_moniker``
    (e.g. ``tcp-server:127.0.0.1:0``), as Bumble's ``controllers`` app does. A host that opens
    the other end (``BumbleRadio("tcp-client:127.0.0.1:PORT")``) is then a device on the same
    virtual radio. Close the returned :class:`RemoteHost` (or use ``async with``) when done."""
    transport = await open_transport(transport_moniker)
    controller = VirtualController(
        name, link=link, host_source=transport.source, host_sink=transport.sink
    )
    return RemoteHost(link, controller, transport)


# --------------------------------------------------------------------------------------------
# Command line: a virtual radio with echoing devices, served to another process
# --------------------------------------------------------------------------------------------


async def _echo(peripheral: VirtualPeripheral, fragments: asyncio.Queue[bytes]) -> None:
    """Notify back every fragment written, in order."""
    while True:
        fragment = await fragments.get()
        try:
            await peripheral.notify(fragment)
        except (PeripheralStateError, ValueError, core.BaseBumbleError) as exc:
            logger.warning("%r: echo dropped: %s", peripheral, exc)


async def _serve(moniker: str, device_count: int) -> None:
    link = ScalableLink()
    peripherals: list[VirtualPeripheral] = []
    echo_tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    remote = await attach_remote_host(link, moniker)
    try:
        for index in range(device_count):
            peripheral = VirtualPeripheral(
                link,
                advertising_data=advertising_data(
                    index.to_bytes(2, "big"), local_name=f"lockgw-sim-{index}"
                ),
                name=f"lockgw-sim-{index}",
            )
            fragments: asyncio.Queue[bytes] = asyncio.Queue()
            peripheral.on_fragment = fragments.put_nowait
            await peripheral.start()
            peripherals.append(peripheral)
            echo_tasks.append(asyncio.create_task(_echo(peripheral, fragments)))
        host = moniker.split(":")[1] if moniker.startswith("tcp-server:") else None
        if host in ("_", "0.0.0.0"):  # noqa: S104  # listening on every interface
            host = "127.0.0.1"
        ready = {
            "transport": f"tcp-client:{host}:{remote.port}" if remote.port else None,
            "devices": [p.address for p in peripherals],
        }
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        for task in echo_tasks:
            task.cancel()
        await asyncio.gather(*echo_tasks, return_exceptions=True)
        for peripheral in peripherals:
            await peripheral.stop()
        await remote.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.radio",
        description="Run a virtual radio with echoing lockgw devices and serve a controller "
        "on it to a host in another process. Prints one JSON line when ready.",
    )
    parser.add_argument(
        "--serve",
        required=True,
        metavar="MONIKER",
        help="Bumble transport for the host's controller, e.g. tcp-server:127.0.0.1:0",
    )
    parser.add_argument("--devices", type=int, default=1, help="number of echoing devices")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    asyncio.run(_serve(args.serve, args.devices))


if __name__ == "__main__":
    main()
