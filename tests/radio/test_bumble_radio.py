"""The Bumble radio backend against simulated devices on the virtual radio, all in Bumble.

No mocks: a BumbleRadio central and VirtualPeripherals run full Bumble host stacks on
virtual controllers of one ScalableLink; the cross-process tests serve a controller over
HCI/TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from bumble.controller import Controller
from bumble.device import AdvertisingType, Device
from bumble.hci import Address, HCI_ErrorCode
from bumble.transport.common import AsyncPipeSink

from gateway.radio.base import (
    CONNECT_CANCEL_GRACE,
    MAX_ATTRIBUTE_VALUE_SIZE,
    RadioConnectError,
    RadioDisconnectedError,
    RadioError,
    RadioTimeoutError,
    ScanResult,
    max_fragment_size,
)
from gateway.radio.bumble import BumbleLink, BumbleRadio
from protocols.gatt import COMPANY_ID
from simulators.radio import (
    PeripheralStateError,
    ScalableLink,
    VirtualController,
    VirtualPeripheral,
    advertising_data,
    attach_remote_host,
)

if TYPE_CHECKING:
    from .conftest import PeripheralFactory

REPO_ROOT = Path(__file__).resolve().parents[2]
MTUS = [23, 185, 517]
FRAGMENT_COUNT = 200
SCAN_TIMEOUT = 10.0
"""Generous: devices advertise every 100 ms, a scan sees them in well under a second."""


def dropped_event(peripheral: VirtualPeripheral) -> asyncio.Event:
    """Set when the peripheral's current (or next) connection ends."""
    event = asyncio.Event()
    peripheral.add_disconnection_callback(event.set)
    return event


def fragments(count: int, size: int, seed: int) -> list[bytes]:
    """Distinct fragments of exactly ``size`` bytes, numbered so order errors show."""
    rng = random.Random(seed)
    return [index.to_bytes(2, "big") + rng.randbytes(size - 2) for index in range(count)]


async def scan_for(
    radio: BumbleRadio, addresses: set[str], within: float = SCAN_TIMEOUT
) -> dict[str, ScanResult]:
    """Scan until every address was seen; the first result per address."""
    found: dict[str, ScanResult] = {}
    async with asyncio.timeout(within), contextlib.aclosing(radio.scan()) as results:
        async for result in results:
            if result.address in addresses:
                found.setdefault(result.address, result)
                if len(found) == len(addresses):
                    return found
    msg = "scan ended early"
    raise AssertionError(msg)


async def connected_pair(
    central: BumbleRadio, make_peripheral: PeripheralFactory, mtu: int = 517
) -> tuple[VirtualPeripheral, BumbleLink, asyncio.Queue[bytes]]:
    peripheral = await make_peripheral()
    written: asyncio.Queue[bytes] = asyncio.Queue()
    peripheral.on_fragment = written.put_nowait
    link = await central.connect(peripheral.address, mtu=mtu)
    return peripheral, link, written


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------


async def test_scan_finds_device_with_manufacturer_data_name_and_rssi(
    central: BumbleRadio, make_peripheral: PeripheralFactory
) -> None:
    peripheral = await make_peripheral(
        advertising_data=advertising_data(b"\x01\x02lock", local_name="door-7")
    )

    result = (await scan_for(central, {peripheral.address}))[peripheral.address]

    assert result.manufacturer_data == {COMPANY_ID: b"\x01\x02lock"}
    assert result.local_name == "door-7"
    assert result.connectable
    assert result.rssi == -50  # Bumble's virtual controller reports every advert at -50 dBm


async def test_scan_sees_new_advertising_data(
    central: BumbleRadio, make_peripheral: PeripheralFactory
) -> None:
    peripheral = await make_peripheral(advertising_data=advertising_data(b"old"))
    await scan_for(central, {peripheral.address})

    await peripheral.set_advertising_data(advertising_data(b"new"))

    async with asyncio.timeout(SCAN_TIMEOUT), contextlib.aclosing(central.scan()) as results:
        async for result in results:
            if result.manufacturer_data.get(COMPANY_ID) == b"new":
                break


async def test_scan_with_duration_ends_and_stops_scanning(
    central: BumbleRadio,
    central_controller: VirtualController,
    link: ScalableLink,
    make_peripheral: PeripheralFactory,
) -> None:
    peripheral = await make_peripheral()
    loop = asyncio.get_running_loop()
    started = loop.time()

    addresses = {result.address async for result in central.scan(duration=0.5)}

    assert 0.5 <= loop.time() - started < 2.0
    assert peripheral.address in addresses
    assert not central_controller.le_scan_enable
    assert link.listening_controllers == frozenset()


async def test_adverts_reach_only_scanning_controllers(
    central: BumbleRadio,
    central_controller: VirtualController,
    link: ScalableLink,
    make_peripheral: PeripheralFactory,
) -> None:
    peripherals = [await make_peripheral() for _ in range(3)]
    assert link.listening_controllers == frozenset()

    async with contextlib.aclosing(central.scan()) as results:
        await anext(results)
        assert link.listening_controllers == {central_controller}
        # Two scans at once share the controller's one scan.
        async with contextlib.aclosing(central.scan()) as more:
            await anext(more)
        assert link.listening_controllers == {central_controller}

    assert link.listening_controllers == frozenset()
    assert all(p.controller not in link.listening_controllers for p in peripherals)


async def test_stock_bumble_controller_works_on_scalable_link(
    link: ScalableLink, make_peripheral: PeripheralFactory
) -> None:
    """A plain bumble Controller (which does not report its scan state) still gets adverts."""
    peripheral = await make_peripheral()
    controller = Controller("stock", link=link)
    try:
        async with BumbleRadio.from_hci(controller, AsyncPipeSink(controller)) as radio:
            await scan_for(radio, {peripheral.address})
            written: asyncio.Queue[bytes] = asyncio.Queue()
            peripheral.on_fragment = written.put_nowait
            async with await radio.connect(peripheral.address) as radio_link:
                await radio_link.write(b"stock")
                assert await written.get() == b"stock"
    finally:
        link.remove_controller(controller)


async def test_two_hundred_devices_are_all_seen_and_connectable(
    central: BumbleRadio, make_peripheral: PeripheralFactory
) -> None:
    peripherals = await asyncio.gather(
        *(
            make_peripheral(advertising_data=advertising_data(index.to_bytes(2, "big")))
            for index in range(200)
        )
    )
    loop = asyncio.get_running_loop()
    started = loop.time()

    found = await scan_for(central, {p.address for p in peripherals})

    assert loop.time() - started < SCAN_TIMEOUT  # about 0.3 s on a laptop
    for index, peripheral in enumerate(peripherals):
        assert found[peripheral.address].manufacturer_data == {COMPANY_ID: index.to_bytes(2, "big")}

    for peripheral in (peripherals[0], peripherals[99], peripherals[199]):
        written: asyncio.Queue[bytes] = asyncio.Queue()
        peripheral.on_fragment = written.put_nowait
        async with await central.connect(peripheral.address) as radio_link:
            await radio_link.write(peripheral.address.encode())
            assert await written.get() == peripheral.address.encode()
            await peripheral.notify(b"pong")
            assert await radio_link.receive() == b"pong"


# --------------------------------------------------------------------------------------------
# MTU and traffic
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mtu", MTUS)
async def test_mtu_is_negotiated(
    central: BumbleRadio, make_peripheral: PeripheralFactory, mtu: int
) -> None:
    peripheral, radio_link, _ = await connected_pair(central, make_peripheral, mtu)

    assert radio_link.mtu == mtu
    assert peripheral.mtu == mtu
    assert radio_link.max_fragment_size == min(mtu - 3, MAX_ATTRIBUTE_VALUE_SIZE)
    assert peripheral.is_subscribed  # connect() returns only after subscribing


async def test_mtu_is_capped_by_the_device(
    central: BumbleRadio, make_peripheral: PeripheralFactory
) -> None:
    peripheral = await make_peripheral(max_mtu=100)

    radio_link = await central.connect(peripheral.address, mtu=517)

    assert radio_link.mtu == peripheral.mtu == 100


@pytest.mark.parametrize("mtu", MTUS)
async def test_writes_of_maximum_size_arrive_in_order(
    central: BumbleRadio, make_peripheral: PeripheralFactory, mtu: int
) -> None:
    _, radio_link, written = await connected_pair(central, make_peripheral, mtu)
    sent = fragments(FRAGMENT_COUNT, max_fragment_size(mtu), seed=mtu)

    for fragment in sent:
        await radio_link.write(fragment)

    assert [written.get_nowait() for _ in range(FRAGMENT_COUNT)] == sent
    assert written.empty()
    with pytest.raises(ValueError, match="exceeds"):
        await radio_link.write(bytes(max_fragment_size(mtu) + 1))


@pytest.mark.parametrize("mtu", MTUS)
async def test_notifications_of_maximum_size_arrive_in_order(
    central: BumbleRadio, make_peripheral: PeripheralFactory, mtu: int
) -> None:
    peripheral, radio_link, _ = await connected_pair(central, make_peripheral, mtu)
    sent = fragments(FRAGMENT_COUNT, max_fragment_size(mtu), seed=-mtu)

    for fragment in sent:
        await peripheral.notify(fragment)
    received = [await radio_link.receive() for _ in range(FRAGMENT_COUNT)]

    assert received == sent
    with pytest.raises(ValueError, match="exceeds"):
        await peripheral.notify(bytes(max_fragment_size(mtu) + 1))


async def test_empty_fragments_pass(
    central: BumbleRadio, make_peripheral: PeripheralFactory
) -> None:
    peripheral, radio_link, written = await connected_pair(central, make_peripheral)

    await radio_link.write(b"")
    await peripheral.notify(b"")

    assert await written.get() == b""
    assert await radio_link.receive() == b""


# --------------------------------------------------------------------------------------------
# Disconnection
# --------------------------------------------------------------------------------------------


async def test_disconnect_by_central(
    central: BumbleRadio, make_peripheral: PeripheralFactory
) -> None:
    peripheral, radio_link, _ = await connected_pair(central, make_peripheral)
    dropped: list[str] = []
    radio_link.add_disconnect_callback(lambda: dropped.append("central"))
    peripheral.add_disconnection_callback(lambda: dropped.append("peripheral"))
    peripheral_dropped = dropped_event(peripheral)

    await radio_link.disconnect()
    await radio_link.disconnect()  # idempotent

    assert not radio_link.is_connected
    assert "central" in dropped
    with pytest.raises(RadioDisconnectedError):
        await radio_link.receive()
    with pytest.raises(RadioDisconnectedError):
        await radio_link.receive()  # and stays so
    with pytest.raises(RadioDisconnectedError):
        await radio_link.write(b"late")
    async with asyncio.timeout(5):
        await peripheral_dropped.wait()
    assert not peripheral.is_connected
    assert dropped.count("peripheral") == 1
    late: list[str] = []
    radio_link.add_disconnect_callback(lambda: late.append("late"))
    assert late == ["late"]  # a callback added after the drop runs at once

    # The device advertises again and takes a new connection.
    async with await central.connect(peripheral.address, mtu=185) as again:
        assert again.mtu == 185
        await peripheral.notify(b"back")
        assert await again.receive() == b"back"
    assert not again.is_connected


async def test_disconnect_by_peripheral_drains_then_raises(
    central: BumbleRadio, make_peripheral: PeripheralFactory
) -> None:
    peripheral, radio_link, _ = await connected_pair(central, make_peripheral)
    dropped = asyncio.Event()
    radio_link.add_disconnect_callback(dropped.set)
    receiving = asyncio.create_task(radio_link.receive())
    await asyncio.sleep(0)

    await peripheral.notify(b"one")
    await peripheral.notify(b"two")
    await peripheral.disconnect()
    async with asyncio.timeout(5):
        await dropped.wait()

    assert await receiving == b"one"
    assert await radio_link.receive() == b"two"
    with pytest.raises(RadioDisconnectedError):
        await radio_link.receive()
    assert not radio_link.is_connected
    assert not peripheral.is_connected
    with pytest.raises(PeripheralStateError):
        await peripheral.notify(b"nobody")


async def test_waiting_receivers_are_woken_by_a_drop(
    central: BumbleRadio, make_peripheral: PeripheralFactory
) -> None:
    peripheral, radio_link, _ = await connected_pair(central, make_peripheral)
    receivers = [asyncio.create_task(radio_link.receive()) for _ in range(3)]
    await asyncio.sleep(0)

    await peripheral.stop()  # powered off: the central sees the link drop

    async with asyncio.timeout(5):
        results = await asyncio.gather(*receivers, return_exceptions=True)
    assert all(isinstance(result, RadioDisconnectedError) for result in results)


async def test_closing_the_radio_drops_its_links(
    central: BumbleRadio, make_peripheral: PeripheralFactory
) -> None:
    peripheral, radio_link, _ = await connected_pair(central, make_peripheral)
    peripheral_dropped = dropped_event(peripheral)

    await central.close()
    await central.close()  # idempotent

    assert not radio_link.is_connected
    with pytest.raises(RadioDisconnectedError):
        await radio_link.receive()
    with pytest.raises(RadioError):
        await central.connect(peripheral.address)
    async with asyncio.timeout(5):
        await peripheral_dropped.wait()


# --------------------------------------------------------------------------------------------
# Connection failures
# --------------------------------------------------------------------------------------------


async def test_connect_to_absent_device_times_out_and_radio_recovers(
    central: BumbleRadio, make_peripheral: PeripheralFactory
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()

    with pytest.raises((RadioConnectError, RadioTimeoutError)):
        await central.connect("C0:FF:EE:C0:FF:EE", timeout=1.0)

    elapsed = loop.time() - started
    assert 1.0 <= elapsed < 1.0 + CONNECT_CANCEL_GRACE
    # The controller stopped initiating: the next connection works.
    peripheral = await make_peripheral()
    async with await central.connect(peripheral.address, timeout=5.0) as radio_link:
        assert radio_link.is_connected


async def test_cancelled_connect_leaves_the_radio_usable(
    central: BumbleRadio, make_peripheral: PeripheralFactory
) -> None:
    connecting = asyncio.create_task(central.connect("C0:FF:EE:C0:FF:EE", timeout=30.0))
    await asyncio.sleep(0.2)

    connecting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await connecting

    peripheral = await make_peripheral()
    async with await central.connect(peripheral.address, timeout=5.0) as radio_link:
        assert radio_link.is_connected


async def test_concurrent_connects_while_scanning(
    central: BumbleRadio, make_peripheral: PeripheralFactory
) -> None:
    peripherals = [await make_peripheral() for _ in range(4)]
    async with contextlib.aclosing(central.scan()) as results:
        await anext(results)

        links = await asyncio.gather(
            *(central.connect(p.address, mtu=64 + index) for index, p in enumerate(peripherals))
        )

        assert [radio_link.mtu for radio_link in links] == [64, 65, 66, 67]
        assert [p.central_address for p in peripherals] == [central.address] * 4
        await asyncio.gather(*(p.notify(p.address.encode()) for p in peripherals))
        for peripheral, radio_link in zip(peripherals, links, strict=True):
            assert await radio_link.receive() == peripheral.address.encode()
        with pytest.raises(RadioConnectError, match="already connected"):
            await central.connect(peripherals[0].address)


async def test_connect_to_device_without_lockgw_service_fails(
    central: BumbleRadio, link: ScalableLink
) -> None:
    controller = VirtualController("foreign", link=link)
    address = link.allocate_static_address()
    device = Device.with_hci("foreign", address, controller, AsyncPipeSink(controller))
    await device.power_on()
    await device.start_advertising(
        advertising_type=AdvertisingType.UNDIRECTED_CONNECTABLE_SCANNABLE,
        advertising_interval_min=100,
        advertising_interval_max=100,
    )
    torn_down = asyncio.Event()
    device.on(
        Device.EVENT_CONNECTION,
        lambda connection: connection.on(connection.EVENT_DISCONNECTION, lambda _: torn_down.set()),
    )
    try:
        with pytest.raises(RadioConnectError, match="lockgw service"):
            await central.connect(str(address), timeout=5.0)
        async with asyncio.timeout(5):
            await torn_down.wait()  # the half-made link was disconnected
    finally:
        controller.power_down(
            HCI_ErrorCode.REMOTE_DEVICE_TERMINATED_CONNECTION_DUE_TO_POWER_OFF_ERROR
        )
        link.remove_controller(controller)
        await device.power_off()


async def test_bad_arguments_and_closed_radio(central_controller: VirtualController) -> None:
    radio = BumbleRadio.from_hci(central_controller, AsyncPipeSink(central_controller))
    with pytest.raises(RadioError, match="not open"):
        await radio.connect("C0:00:00:00:00:01")
    with pytest.raises(RadioError, match="not open"):
        await anext(radio.scan())
    async with radio:
        with pytest.raises(ValueError, match="MTU"):
            await radio.connect("C0:00:00:00:00:01", mtu=22)
        with pytest.raises(ValueError, match="not a Bluetooth address"):
            await radio.connect("lock-7")
        with pytest.raises(ValueError, match="timeout"):
            await radio.connect("C0:00:00:00:00:01", timeout=0)


async def test_open_fails_when_transport_refuses() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        radio = BumbleRadio(f"tcp-client:127.0.0.1:{port}")
        with pytest.raises(RadioError, match="opening"):
            await radio.open()


# --------------------------------------------------------------------------------------------
# A host in another process
# --------------------------------------------------------------------------------------------


async def test_remote_host_over_hci_tcp(
    link: ScalableLink, make_peripheral: PeripheralFactory
) -> None:
    """In-process version of the two-process set-up: the radio reaches its controller on the
    virtual link through Bumble's tcp-server/tcp-client transports."""
    peripheral = await make_peripheral(advertising_data=advertising_data(b"remote"))
    written: asyncio.Queue[bytes] = asyncio.Queue()
    peripheral.on_fragment = written.put_nowait
    peripheral_dropped = dropped_event(peripheral)
    remote = await attach_remote_host(link, "tcp-server:127.0.0.1:0")
    async with remote, BumbleRadio(f"tcp-client:127.0.0.1:{remote.port}") as radio:
        found = await scan_for(radio, {peripheral.address})
        assert found[peripheral.address].manufacturer_data == {COMPANY_ID: b"remote"}
        radio_link = await radio.connect(peripheral.address, mtu=247)
        assert radio_link.mtu == 247
        await radio_link.write(b"over tcp")
        assert await written.get() == b"over tcp"
        await peripheral.notify(b"back over tcp")
        assert await radio_link.receive() == b"back over tcp"

        await remote.close()  # the controller vanishes: HCI transport lost

        with pytest.raises(RadioDisconnectedError):
            async with asyncio.timeout(5):
                await radio_link.receive()
        async with asyncio.timeout(5):
            await peripheral_dropped.wait()
        with pytest.raises(RadioError, match="transport lost"):
            await radio.connect(peripheral.address)


async def test_device_simulator_in_another_process() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "simulators.radio",
        "--serve",
        "tcp-server:127.0.0.1:0",  # port 0: the simulator reports the port it got
        "--devices",
        "2",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,  # never the runner's own stderr (see tests/processes.py)
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(20):
            ready = json.loads(await process.stdout.readline())
        devices: list[str] = ready["devices"]
        async with BumbleRadio(ready["transport"]) as radio:
            found = await scan_for(radio, set(devices))
            assert found[devices[1]].manufacturer_data == {COMPANY_ID: b"\x00\x01"}
            assert found[devices[1]].local_name == "lockgw-sim-1"
            async with await radio.connect(devices[0], mtu=185) as radio_link:
                assert radio_link.mtu == 185
                for fragment in fragments(50, radio_link.max_fragment_size, seed=7):
                    await radio_link.write(fragment)
                    assert await radio_link.receive() == fragment  # echoed
    finally:
        if process.returncode is None:
            process.terminate()
        try:
            async with asyncio.timeout(10):
                await process.communicate()
        except TimeoutError:
            process.kill()
            await process.communicate()
    assert process.returncode == 0  # shut down cleanly on SIGTERM


def test_addresses_are_distinct_random_static() -> None:
    link = ScalableLink()
    addresses = {link.allocate_static_address() for _ in range(1000)}
    assert len(addresses) == 1000
    assert all(address.is_static for address in addresses)
    assert all(isinstance(address, Address) for address in addresses)
