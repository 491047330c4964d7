"""The bleak backend against a fake of bleak's public API (no adapter, no D-Bus here).

The fakes (tests/radio/fake_bleak.py) replace ``BleakScanner`` and ``BleakClient`` through
BleakRadio's factory parameters and use bleak's real data classes. The canary tests at the end
pin the bleak signatures and attributes the backend relies on, and the fakes' signatures to
bleak's, so neither the backend nor the fake can drift from bleak unnoticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
import types
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, get_args

import pytest
from bleak import BleakClient, BleakScanner
from bleak.assigned_numbers import CharacteristicPropertyName
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import (
    BleakBluetoothNotAvailableError,
    BleakBluetoothNotAvailableReason,
    BleakCharacteristicNotFoundError,
    BleakDBusError,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
    BleakGATTProtocolErrorCode,
)

import gateway.radio.bleak as backend
from gateway.radio.base import (
    CONNECT_CANCEL_GRACE,
    DEFAULT_CONNECT_TIMEOUT,
    Link,
    RadioConnectError,
    RadioDisconnectedError,
    RadioError,
    RadioTimeoutError,
    ScanResult,
)
from gateway.radio.bleak import BleakLink, BleakRadio, ClientFactory, ScannerFactory
from protocols.gatt import (
    COMPANY_ID,
    NOTIFY_CHARACTERISTIC_UUID,
    SERVICE_UUID,
)

from .fake_bleak import FakeBleakClient, FakeBleakScanner, FakeBluetooth, FakePeripheral

# The fakes are checked against the factory protocols by mypy here, as bleak's classes are in
# gateway/radio/bleak.py (the defaults of BleakRadio's parameters).
_SCANNER_FACTORY: ScannerFactory = FakeBleakScanner
_CLIENT_FACTORY: ClientFactory = FakeBleakClient

ADDRESS = "C0:FF:EE:00:00:01"
OTHER = "C0:FF:EE:00:00:02"
WITHIN = 5.0
"""Generous bound on anything the fakes do at once."""


@pytest.fixture
def world() -> FakeBluetooth:
    return FakeBluetooth()


@pytest.fixture
async def radio(world: FakeBluetooth) -> AsyncIterator[BleakRadio]:
    async with world.radio() as radio:
        yield radio


async def scan_for(radio: BleakRadio, *addresses: str) -> dict[str, ScanResult]:
    """Scan until every address was seen (the fake peripherals advertise as the scan
    starts); the first result per address."""
    found: dict[str, ScanResult] = {}
    async with asyncio.timeout(WITHIN), contextlib.aclosing(radio.scan()) as results:
        async for result in results:
            if result.address in addresses:
                found.setdefault(result.address, result)
                if len(found) == len(addresses):
                    break
    return found


async def connected(
    world: FakeBluetooth, radio: BleakRadio, address: str = ADDRESS, **kwargs: Any
) -> tuple[FakePeripheral, BleakLink]:
    """A peripheral (keyword arguments as FakePeripheral's), seen and connected."""
    peripheral = world.add(address, **kwargs)
    await scan_for(radio, address)
    link = await radio.connect(address)
    return peripheral, link


def up(link: Link) -> bool:
    """``link.is_connected``, read afresh (mypy would keep it narrowed across awaits)."""
    return link.is_connected


def scanning_now(world: FakeBluetooth) -> bool:
    """Whether the radio's scanner runs, read afresh (as :func:`up`)."""
    return world.scanner.running


async def settle() -> None:
    """Let background tasks (the release of a dropped client) run."""
    for _ in range(5):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], iterations: int = 100) -> None:
    """Wait until ``condition()`` holds: the fakes act within a few loop iterations."""
    for _ in range(iterations):
        if condition():
            return
        await asyncio.sleep(0)
    pytest.fail(f"not within {iterations} event loop iterations")


# --------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------


async def test_scan_yields_results_with_manufacturer_data(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    world.add(ADDRESS, manufacturer_data={COMPANY_ID: b"\x01lock"}, rssi=-42, local_name="door")
    world.add(OTHER, manufacturer_data={}, local_name=None)

    found = await scan_for(radio, ADDRESS, OTHER)

    assert found[ADDRESS] == ScanResult(
        address=ADDRESS,
        rssi=-42,
        manufacturer_data={COMPANY_ID: b"\x01lock"},
        local_name="door",
        connectable=True,  # bleak reports no connectable flag
    )
    assert isinstance(found[ADDRESS].manufacturer_data, types.MappingProxyType)
    assert found[OTHER].manufacturer_data == {}
    assert found[OTHER].local_name is None
    assert world.scanner.scanning_mode == "active"
    assert world.scanner.bluez == {}
    assert not world.scanner.running  # stopped once the last consumer left


async def test_scan_sees_repeated_adverts_and_ends_after_duration(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    peripheral = world.add(ADDRESS)
    async with asyncio.timeout(WITHIN), contextlib.aclosing(radio.scan(duration=0.2)) as results:
        first = await anext(results)  # advertised as the scan started
        peripheral.rssi = -80
        world.advertise(peripheral)
        second = await anext(results)
        with pytest.raises(StopAsyncIteration):
            await anext(results)
    assert (first.rssi, second.rssi) == (-60, -80)
    assert (world.scanner.starts, world.scanner.stops) == (1, 1)
    assert not world.scanner.running


async def test_concurrent_scans_share_the_one_scanner(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    # The fake refuses a second running scanner, as BlueZ refuses a second discovery.
    world.add(ADDRESS)
    first, second = await asyncio.gather(scan_for(radio, ADDRESS), scan_for(radio, ADDRESS))
    assert first[ADDRESS].address == second[ADDRESS].address == ADDRESS
    assert len(world.scanners) == 1
    assert not world.scanner.running


async def test_scan_start_failure_is_a_radio_error_and_the_radio_recovers(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    world.add(ADDRESS)
    cause = BleakBluetoothNotAvailableError(
        "No Bluetooth adapters found.", BleakBluetoothNotAvailableReason.NO_BLUETOOTH
    )
    world.scan_start_error = cause
    with pytest.raises(RadioError) as caught:
        await scan_for(radio, ADDRESS)
    assert caught.value.__cause__ is cause

    world.scan_start_error = None
    assert ADDRESS in await scan_for(radio, ADDRESS)


async def test_adapter_is_passed_as_bluez_argument(world: FakeBluetooth) -> None:
    world.add(ADDRESS)
    async with world.radio("hci1") as radio:
        await scan_for(radio, ADDRESS)
        async with await radio.connect(ADDRESS):
            pass
    assert world.scanner.bluez == {"adapter": "hci1"}
    assert world.client.bluez == {"adapter": "hci1"}


async def test_open_failure_is_a_radio_error(world: FakeBluetooth) -> None:
    cause = BleakError("Unsupported platform: Plan9")
    world.scanner_init_error = cause
    radio = world.radio()
    with pytest.raises(RadioError) as caught:
        await radio.open()
    assert caught.value.__cause__ is cause


# --------------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------------


async def test_connect_passes_the_scanned_ble_device(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    peripheral = world.add(ADDRESS)
    await scan_for(radio, ADDRESS)

    async with await radio.connect(ADDRESS.lower()) as link:  # any spelling of the address
        client = world.client
        assert client.ble_device is world.device(peripheral)  # the object the scan reported
        assert isinstance(client.ble_device, BLEDevice)
        assert client.requested_services == {SERVICE_UUID}
        assert 0 < client.timeout <= DEFAULT_CONNECT_TIMEOUT
        assert client.bluez == {}
        assert client.pair is False
        assert link.address == ADDRESS
        assert up(link)
    assert not up(link)
    assert len(world.scanners) == 1  # no second scanner, no find_device_by_address


async def test_connect_to_an_address_not_seen_yet_scans_for_it(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    peripheral = world.add(ADDRESS)
    async with await radio.connect(ADDRESS) as link:
        assert up(link)
        assert world.client.ble_device is world.device(peripheral)
    assert (world.scanner.starts, world.scanner.stops) == (1, 1)


async def test_connect_to_a_silent_device_fails_within_the_timeout(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    world.add(ADDRESS, advertising=False)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RadioConnectError, match="not seen advertising"):
        await radio.connect(ADDRESS, timeout=0.2)
    assert 0.2 <= loop.time() - started < WITHIN
    assert world.clients == []
    assert not world.scanner.running


async def test_stale_ble_device_is_forgotten_and_found_again(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    peripheral = world.add(ADDRESS)
    await scan_for(radio, ADDRESS)
    world.forget(peripheral)  # BlueZ dropped the device object after the scan stopped

    with pytest.raises(RadioConnectError) as caught:
        await radio.connect(ADDRESS)
    assert isinstance(caught.value.__cause__, BleakDeviceNotFoundError)

    async with await radio.connect(ADDRESS) as link:  # scans afresh
        assert up(link)
    assert world.scanner.starts == 2


async def test_device_cache_is_bounded(
    world: FakeBluetooth, radio: BleakRadio, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend, "DEVICE_CACHE_SIZE", 2)
    addresses = [f"C0:FF:EE:00:01:0{index}" for index in range(3)]
    for address in addresses:
        world.add(address)
    await scan_for(radio, *addresses)
    for address in addresses:
        world.peripherals[address].advertising = False
    with pytest.raises(RadioConnectError, match="not seen advertising"):
        await radio.connect(addresses[0], timeout=0.05)  # evicted, and silent now
    async with await radio.connect(addresses[2]):
        pass


async def test_bleak_retrying_inside_connect_is_not_a_drop(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    peripheral, link = await connected(world, radio, aborts_first_attempt=True)
    await settle()
    assert up(link)
    assert world.client.disconnect_calls == 0
    peripheral.notify(b"still here")
    assert await link.receive() == b"still here"
    await link.disconnect()


async def test_drop_as_the_connection_completes_is_a_connect_error(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    world.add(ADDRESS, drops_as_connected=True)
    with pytest.raises(RadioConnectError, match="dropped"):
        await radio.connect(ADDRESS)
    assert world.client.disconnect_calls == 1  # released all the same


async def test_drop_during_set_up_is_a_connect_error(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    world.add(ADDRESS, drops_during_notify_setup=True)
    with pytest.raises(RadioConnectError):
        await radio.connect(ADDRESS)
    assert world.client.disconnect_calls == 1  # awaited before connect() raised
    world.peripherals[ADDRESS].drops_during_notify_setup = False
    async with await radio.connect(ADDRESS) as link:  # nothing left behind
        assert up(link)


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        pytest.param(
            BleakDeviceNotFoundError(ADDRESS, "Device was not found."),
            RadioConnectError,
            id="device-not-found",
        ),
        pytest.param(
            BleakDBusError("org.bluez.Error.Failed", ["le-connection-abort-by-local"]),
            RadioConnectError,
            id="dbus-error",
        ),
        pytest.param(BleakError("Bleak requires BlueZ >= 5.55."), RadioConnectError, id="bleak"),
        pytest.param(
            BleakBluetoothNotAvailableError(
                "adapter off", BleakBluetoothNotAvailableReason.POWERED_OFF
            ),
            RadioConnectError,
            id="bluetooth-off",
        ),
        pytest.param(TimeoutError(), RadioTimeoutError, id="timeout"),
        pytest.param(EOFError(), RadioConnectError, id="dbus-connection-closed"),
        pytest.param(ConnectionRefusedError(111, "refused"), RadioConnectError, id="dbus-socket"),
    ],
)
async def test_connect_errors_are_translated(
    world: FakeBluetooth,
    radio: BleakRadio,
    cause: BaseException,
    expected: type[RadioError],
) -> None:
    world.add(ADDRESS, connect_error=cause)
    await scan_for(radio, ADDRESS)
    with pytest.raises(expected) as caught:
        await radio.connect(ADDRESS)
    assert type(caught.value) is expected
    assert caught.value.__cause__ is cause
    assert world.client.cancelled_pending
    assert world.client.disconnect_calls == 1


@pytest.mark.parametrize(
    "cause",
    [
        pytest.param(BleakCharacteristicNotFoundError(NOTIFY_CHARACTERISTIC_UUID), id="no-char"),
        pytest.param(
            BleakDBusError("org.bluez.Error.NotPermitted", ["Notify not permitted"]),
            id="dbus-error",
        ),
        pytest.param(EOFError(), id="dbus-connection-closed"),
    ],
)
async def test_subscription_errors_are_connect_errors(
    world: FakeBluetooth, radio: BleakRadio, cause: BaseException
) -> None:
    world.add(ADDRESS, notify_error=cause)
    with pytest.raises(RadioConnectError) as caught:
        await radio.connect(ADDRESS)
    assert caught.value.__cause__ is cause
    assert world.client.disconnect_calls == 1
    assert not world.client.is_connected


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        pytest.param({"serves_lockgw": False}, "does not serve", id="no-service"),
        pytest.param({"write_properties": None}, "no writable", id="no-write-char"),
        pytest.param({"write_properties": ("read",)}, "no writable", id="write-char-read-only"),
        pytest.param({"notify_properties": None}, "no notifying", id="no-notify-char"),
        pytest.param({"notify_properties": ("indicate",)}, "no notifying", id="indicate-only"),
    ],
)
async def test_missing_service_or_characteristic_is_a_connect_error(
    world: FakeBluetooth, radio: BleakRadio, fault: dict[str, Any], message: str
) -> None:
    world.add(ADDRESS, **fault)
    with pytest.raises(RadioConnectError, match=message):
        await radio.connect(ADDRESS)
    assert world.client.disconnect_calls == 1
    assert not world.client.is_connected


async def test_connect_timeout_is_bleaks_own_and_cancels_the_attempt(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    world.add(ADDRESS, connect_hangs=True)
    await scan_for(radio, ADDRESS)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RadioTimeoutError) as caught:
        await radio.connect(ADDRESS, timeout=0.2)
    assert 0.2 <= loop.time() - started < 0.2 + CONNECT_CANCEL_GRACE
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert world.client.timeout <= 0.2  # what was left of the budget
    assert world.client.cancelled_pending  # bleak cancels the pending connection


async def test_connect_guard_stops_a_bleak_that_overruns(
    world: FakeBluetooth, radio: BleakRadio, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend, "CONNECT_CANCEL_GRACE", 0.1)
    world.add(ADDRESS, connect_hangs=True, ignores_timeout=True)
    await scan_for(radio, ADDRESS)
    with pytest.raises(RadioTimeoutError):
        await radio.connect(ADDRESS, timeout=0.1)
    assert world.client.cancelled_pending


async def test_cancelled_connect_leaves_the_radio_usable(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    world.add(ADDRESS, connect_hangs=True)
    world.add(OTHER)
    await scan_for(radio, ADDRESS, OTHER)
    task = asyncio.create_task(radio.connect(ADDRESS))
    await until(lambda: world.pending_connects == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert world.client.cancelled_pending
    async with await radio.connect(OTHER) as link:
        assert up(link)
    world.peripherals[ADDRESS].connect_hangs = False
    async with await radio.connect(ADDRESS) as link:  # not "already connecting"
        assert up(link)


async def test_connects_are_one_at_a_time_and_not_duplicated(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    world.add(ADDRESS, connect_delay=0.05)
    world.add(OTHER, connect_delay=0.05)
    await scan_for(radio, ADDRESS, OTHER)

    first, second = await asyncio.gather(radio.connect(ADDRESS), radio.connect(OTHER))
    assert world.max_pending_connects == 1

    with pytest.raises(RadioConnectError, match="already"):
        await radio.connect(ADDRESS.lower())
    await first.disconnect()
    await second.disconnect()


async def test_bad_arguments_and_closed_radio(world: FakeBluetooth) -> None:
    radio = world.radio()
    with pytest.raises(RadioError):
        await radio.connect(ADDRESS)
    with pytest.raises(RadioError):
        await anext(aiter(radio.scan()))
    async with radio:
        with pytest.raises(ValueError, match="MTU"):
            await radio.connect(ADDRESS, mtu=22)
        with pytest.raises(ValueError, match="MTU"):
            await radio.connect(ADDRESS, mtu=518)
        with pytest.raises(ValueError, match="timeout"):
            await radio.connect(ADDRESS, timeout=0)
        with pytest.raises(ValueError, match="duration"):
            await anext(aiter(radio.scan(duration=-1)))
    await radio.close()  # idempotent


# --------------------------------------------------------------------------------------------
# MTU, writes and notifications
# --------------------------------------------------------------------------------------------


class MtuCase(NamedTuple):
    negotiated: int
    requested: int
    properties: tuple[CharacteristicPropertyName, ...]
    mtu: int
    fragment: int
    response: bool


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            MtuCase(247, 517, ("write", "write-without-response"), 247, 244, True), id="both"
        ),
        pytest.param(MtuCase(517, 517, ("write",), 517, 512, True), id="attribute-cap"),
        pytest.param(MtuCase(247, 185, ("write",), 185, 182, True), id="capped-by-request"),
        pytest.param(MtuCase(23, 517, ("write",), 23, 20, True), id="old-bluez"),
        pytest.param(MtuCase(247, 517, ("write-without-response",), 247, 244, False), id="command"),
        pytest.param(
            MtuCase(517, 517, ("write-without-response",), 517, 512, False), id="command-cap"
        ),
    ],
)
async def test_mtu_and_fragment_size(
    world: FakeBluetooth, radio: BleakRadio, case: MtuCase
) -> None:
    peripheral = world.add(ADDRESS, mtu=case.negotiated, write_properties=case.properties)
    async with await radio.connect(ADDRESS, mtu=case.requested) as link:
        assert (link.mtu, link.max_fragment_size) == (case.mtu, case.fragment)
        assert link.writes_with_response is case.response

        await link.write(bytes(case.fragment))
        await link.write(b"")
        with pytest.raises(ValueError, match="exceeds"):
            await link.write(bytes(case.fragment + 1))
    # Every write said which kind it was; the oversize one never reached bleak.
    assert peripheral.writes == [(bytes(case.fragment), case.response), (b"", case.response)]


async def test_notifications_arrive_in_order_as_bytes(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    peripheral, link = await connected(world, radio)
    values = [index.to_bytes(2, "big") * 10 for index in range(200)]
    for value in values:
        peripheral.notify(value)
    received = [await link.receive() for _ in values]
    assert received == values
    assert all(type(value) is bytes for value in received)
    await link.disconnect()


async def test_drop_by_peripheral_drains_then_raises(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    peripheral, link = await connected(world, radio)
    calls: list[str] = []
    link.add_disconnect_callback(lambda: calls.append("down"))
    peripheral.notify(b"one")
    peripheral.notify(b"two")
    peripheral.drop()

    assert not up(link)
    assert calls == ["down"]
    assert await link.receive() == b"one"
    assert await link.receive() == b"two"
    for _ in range(2):
        with pytest.raises(RadioDisconnectedError):
            await link.receive()
    with pytest.raises(RadioDisconnectedError):
        await link.write(b"late")

    client = world.client
    await until(lambda: client.disconnect_calls == 1)  # released without being asked
    await settle()
    await link.disconnect()  # a no-op now
    assert client.disconnect_calls == 1
    assert calls == ["down"]

    async with await radio.connect(ADDRESS) as again:  # the radio forgot the old link
        assert up(again)


async def test_waiting_receivers_are_woken_by_a_drop(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    peripheral, link = await connected(world, radio)
    receivers = [asyncio.create_task(link.receive()) for _ in range(3)]
    await settle()
    peripheral.drop()
    async with asyncio.timeout(WITHIN):
        outcomes = await asyncio.gather(*receivers, return_exceptions=True)
    assert all(isinstance(outcome, RadioDisconnectedError) for outcome in outcomes)


async def test_disconnect_is_idempotent_and_callbacks_fire_once(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    _, link = await connected(world, radio)
    calls: list[int] = []
    link.add_disconnect_callback(lambda: calls.append(1))
    link.add_disconnect_callback(lambda: calls.append(2))

    await asyncio.gather(link.disconnect(), link.disconnect())
    await link.disconnect()

    assert calls == [1, 2]
    assert world.client.disconnect_calls == 1
    assert world.client.disconnected_callbacks == 1  # bleak fired it; the link took it once
    late: list[int] = []
    link.add_disconnect_callback(lambda: late.append(3))
    assert late == [3]  # on a link that is down: at once
    with pytest.raises(RadioDisconnectedError):
        await link.receive()


async def test_a_failing_disconnect_callback_does_not_stop_the_others(
    world: FakeBluetooth, radio: BleakRadio, caplog: pytest.LogCaptureFixture
) -> None:
    peripheral, link = await connected(world, radio)
    calls: list[str] = []

    def broken() -> None:
        msg = "callback bug"
        raise RuntimeError(msg)

    link.add_disconnect_callback(broken)
    link.add_disconnect_callback(lambda: calls.append("ok"))
    peripheral.drop()
    assert calls == ["ok"]
    assert "disconnect callback" in caplog.text


@pytest.mark.parametrize(
    ("cause", "expected"),
    [
        pytest.param(
            BleakGATTProtocolError(BleakGATTProtocolErrorCode.WRITE_REQUEST_REJECTED),
            RadioError,
            id="att-error",
        ),
        pytest.param(
            BleakDBusError("org.bluez.Error.Failed", ["Operation failed"]),
            RadioError,
            id="dbus-error",
        ),
        pytest.param(TimeoutError(), RadioTimeoutError, id="timeout"),
    ],
)
async def test_write_errors_on_a_live_link(
    world: FakeBluetooth,
    radio: BleakRadio,
    cause: BaseException,
    expected: type[RadioError],
) -> None:
    peripheral, link = await connected(world, radio)
    peripheral.write_error = cause
    with pytest.raises(expected) as caught:
        await link.write(b"x")
    assert type(caught.value) is expected
    assert caught.value.__cause__ is cause
    assert up(link)  # the daemon decides what a failed write means
    peripheral.write_error = None
    await link.write(b"y")
    await link.disconnect()


async def test_write_timeout(
    world: FakeBluetooth, radio: BleakRadio, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backend, "WRITE_TIMEOUT", 0.05)
    _, link = await connected(world, radio, write_hangs=True)
    with pytest.raises(RadioTimeoutError):
        await link.write(b"x")
    assert up(link)
    await link.disconnect()


async def test_drop_during_a_write_is_a_disconnected_error(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    _, link = await connected(world, radio, drops_during_write=True)
    with pytest.raises(RadioDisconnectedError) as caught:
        await link.write(b"x")
    assert isinstance(caught.value.__cause__, BleakDBusError)
    assert not up(link)


@pytest.mark.parametrize(
    "cause",
    [pytest.param(EOFError(), id="eof"), pytest.param(BrokenPipeError(), id="broken-pipe")],
)
async def test_lost_dbus_connection_takes_the_link_down(
    world: FakeBluetooth, radio: BleakRadio, cause: BaseException
) -> None:
    peripheral, link = await connected(world, radio)
    calls: list[str] = []
    link.add_disconnect_callback(lambda: calls.append("down"))
    peripheral.write_error = cause
    with pytest.raises(RadioDisconnectedError) as caught:
        await link.write(b"x")
    assert caught.value.__cause__ is cause
    assert not up(link)
    assert calls == ["down"]
    await until(lambda: world.client.disconnect_calls == 1)
    await settle()
    assert world.client.disconnect_calls == 1


async def test_closing_the_radio_drops_links_and_ends_scans(
    world: FakeBluetooth, radio: BleakRadio
) -> None:
    _, link = await connected(world, radio)
    calls: list[str] = []
    link.add_disconnect_callback(lambda: calls.append("down"))

    async def consume() -> None:
        async for _ in radio.scan():
            pass

    scanning = asyncio.create_task(consume())
    await until(lambda: scanning_now(world))

    await radio.close()

    assert calls == ["down"]
    assert world.client.disconnect_calls == 1
    assert not scanning_now(world)
    with pytest.raises(RadioError, match="closed"):
        await scanning
    with pytest.raises(RadioError):
        await radio.connect(ADDRESS)

    await radio.open()  # and again
    async with await radio.connect(ADDRESS) as again:
        assert up(again)


# --------------------------------------------------------------------------------------------
# Canary: the bleak API the backend relies on, and the fakes' fidelity to it
# --------------------------------------------------------------------------------------------

P = inspect.Parameter


def parameters(function: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(function).parameters)


def can_pass(function: Callable[..., Any], name: str, *, by_keyword: bool) -> bool:
    """Whether ``function`` takes parameter ``name`` (by keyword, or else positionally)."""
    parameter = parameters(function).get(name)
    if parameter is None:
        return False
    if by_keyword:
        return parameter.kind in {P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY}
    return parameter.kind in {P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD}


def test_bleak_is_the_major_version_the_backend_was_written_for() -> None:
    assert importlib.metadata.version("bleak").split(".")[0] == "3"


def test_canary_bleak_client_calls() -> None:
    # BleakClient(ble_device, disconnected_callback=..., services=[...], timeout=...,
    # bluez={"adapter": ...}); the device goes positionally, the rest by keyword.
    init = BleakClient.__init__
    assert list(parameters(init))[1] == "address_or_ble_device"
    assert can_pass(init, "address_or_ble_device", by_keyword=False)
    for name in ("disconnected_callback", "services", "timeout", "bluez"):
        assert can_pass(init, name, by_keyword=True), name
    # connect() and disconnect() take no required argument.
    for method in (BleakClient.connect, BleakClient.disconnect):
        required = [
            p
            for p in parameters(method).values()
            if p.name != "self" and p.default is P.empty and p.kind not in {P.VAR_KEYWORD}
        ]
        assert required == [], method
    # write_gatt_char(characteristic, data, response=...) and start_notify(char, callback).
    assert can_pass(BleakClient.write_gatt_char, "char_specifier", by_keyword=False)
    assert can_pass(BleakClient.write_gatt_char, "data", by_keyword=False)
    assert can_pass(BleakClient.write_gatt_char, "response", by_keyword=True)
    assert can_pass(BleakClient.start_notify, "char_specifier", by_keyword=False)
    assert can_pass(BleakClient.start_notify, "callback", by_keyword=False)
    for name in ("is_connected", "services"):
        assert isinstance(inspect.getattr_static(BleakClient, name), property), name


def test_canary_bleak_scanner_calls() -> None:
    # BleakScanner(detection_callback=..., scanning_mode="active", bluez={"adapter": ...}).
    init = BleakScanner.__init__
    for name in ("detection_callback", "scanning_mode", "bluez"):
        assert can_pass(init, name, by_keyword=True), name
    assert parameters(init)["scanning_mode"].default == "active"
    for method in (BleakScanner.start, BleakScanner.stop):
        assert list(parameters(method)) == ["self"], method


def test_canary_bleak_data_classes() -> None:
    # What _scan_result reads, and what the radio caches.
    assert {"local_name", "manufacturer_data", "rssi"} <= set(AdvertisementData._fields)
    assert "connectable" not in AdvertisementData._fields, "bleak reports it now: use it"
    assert "address" in BLEDevice.__slots__
    # What set_up reads from the services.
    for name in ("max_write_without_response_size", "properties", "uuid", "handle"):
        assert isinstance(inspect.getattr_static(BleakGATTCharacteristic, name), property), name
    assert can_pass(BleakGATTServiceCollection.get_service, "specifier", by_keyword=False)
    assert can_pass(BleakGATTService.get_characteristic, "uuid", by_keyword=False)
    # Property names the backend tests for.
    for name in ("write", "write-without-response", "notify"):
        assert name in get_args(CharacteristicPropertyName), name
    assert (
        "CharacteristicPropertyName"
        in BleakGATTCharacteristic.__init__.__annotations__["properties"]
    )


def test_canary_bleak_exceptions() -> None:
    for exception in (
        BleakDeviceNotFoundError,
        BleakCharacteristicNotFoundError,
        BleakDBusError,
        BleakGATTProtocolError,
        BleakBluetoothNotAvailableError,
    ):
        assert issubclass(exception, BleakError), exception
    assert issubclass(asyncio.TimeoutError, TimeoutError)  # what bleak's timeouts raise
    assert issubclass(TimeoutError, OSError)


@pytest.mark.parametrize(
    ("real", "fake"),
    [
        pytest.param(BleakScanner.__init__, FakeBleakScanner.__init__, id="scanner-init"),
        pytest.param(BleakScanner.start, FakeBleakScanner.start, id="scanner-start"),
        pytest.param(BleakScanner.stop, FakeBleakScanner.stop, id="scanner-stop"),
        pytest.param(BleakClient.__init__, FakeBleakClient.__init__, id="client-init"),
        pytest.param(BleakClient.connect, FakeBleakClient.connect, id="client-connect"),
        pytest.param(BleakClient.disconnect, FakeBleakClient.disconnect, id="client-disconnect"),
        pytest.param(BleakClient.write_gatt_char, FakeBleakClient.write_gatt_char, id="write"),
        pytest.param(BleakClient.start_notify, FakeBleakClient.start_notify, id="start-notify"),
    ],
)
def test_fakes_have_bleaks_signatures(real: Callable[..., Any], fake: Callable[..., Any]) -> None:
    real_parameters = parameters(real)
    fake_parameters = parameters(fake)
    assert list(fake_parameters) == list(real_parameters)
    for name, parameter in real_parameters.items():
        assert fake_parameters[name].kind == parameter.kind, name
        has_default = parameter.default is not P.empty
        assert (fake_parameters[name].default is not P.empty) == has_default, name
    assert inspect.iscoroutinefunction(fake) == inspect.iscoroutinefunction(real)


def test_fakes_have_bleaks_properties() -> None:
    for name in ("is_connected", "services", "address"):
        assert isinstance(inspect.getattr_static(BleakClient, name), property), name
        assert isinstance(inspect.getattr_static(FakeBleakClient, name), property), name
