"""A minimal GATEWAY-role driver for the simulator tests: a Bumble central and a Session.

Test code only, and not the gateway's: it scans, connects with a requested MTU, discovers
the lockgw service, subscribes, and runs a ``protocols`` Session in the GATEWAY role over
the link, much as ``simulators/demo.py`` does over a pipe. Failures are typed:
:class:`SessionError` carries the protocol's :class:`ErrorCode`, :class:`LinkDropped`
means the radio link went down, :class:`ConnectFailed` that no usable link came up.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Final, Self, TypeVar

from bumble import core, hci
from bumble.device import Device, Peer
from bumble.gatt import GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR
from bumble.transport import open_transport
from bumble.transport.common import AsyncPipeSink
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocols.advert import Advert, parse_advertising_data
from protocols.envelopes import (
    AuthorisationUpdate,
    Role,
    Scope,
    decode_certificate,
    encode_certificate,
    encode_update,
    issue_certificate,
    sign_update,
)
from protocols.errors import DecodeError, ErrorCode
from protocols.gatt import (
    MAX_ATT_MTU,
    NOTIFY_CHARACTERISTIC_UUID,
    SERVICE_UUID,
    WRITE_CHARACTERISTIC_UUID,
    max_fragment_size,
)
from protocols.identity import load_signing_public
from protocols.logrecords import ChainState, VerifiedBatch, decode_batch, verify_batch
from protocols.messages import (
    AuthUpdate,
    LogAck,
    LogBatchMessage,
    LogRead,
    Message,
    Provision,
    Provisioned,
)
from protocols.pairing import parse_code_or_label
from protocols.session import (
    GatewaySessionConfig,
    HandshakeComplete,
    MessageReceived,
    Session,
    SessionFailed,
    SessionMode,
)
from simulators.device import VirtualDevice
from simulators.radio import ScalableLink, VirtualController

_T = TypeVar("_T")

SITE_ID: Final = 42
DAY: Final = 86_400
CONNECT_TIMEOUT: Final = 5.0
ANSWER_TIMEOUT: Final = 10.0
SCAN_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 5.0
_WRITE_UUID: Final = core.UUID(WRITE_CHARACTERISTIC_UUID)
_NOTIFY_UUID: Final = core.UUID(NOTIFY_CHARACTERISTIC_UUID)


class DriverError(Exception):
    """Something the gateway would report: no link, a dropped link, a failed session."""


class ConnectFailed(DriverError):
    """No usable link: the connection timed out, or dropped while being set up."""


class LinkDropped(DriverError):
    """The radio link went down."""


class SessionError(DriverError):
    """The session ended with a typed protocol error; ``by_peer`` if the device said so."""

    def __init__(self, code: ErrorCode, message: str, *, by_peer: bool) -> None:
        super().__init__(f"{code.name}{' (by the device)' if by_peer else ''}: {message}")
        self.code = code
        self.by_peer = by_peer


# --------------------------------------------------------------------------------------------
# Keys and certificates, as an authority would issue them
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """An authority and one gateway: its keys and its encoded certificate."""

    authority: Ed25519PrivateKey
    signing_key: Ed25519PrivateKey
    noise_key: X25519PrivateKey
    certificate: bytes

    @classmethod
    def issue(
        cls,
        *,
        authority: Ed25519PrivateKey | None = None,
        now: int | None = None,
        sites: Iterable[int] = (SITE_ID,),
        devices: Iterable[bytes] = (),
        not_before: int | None = None,
        not_after: int | None = None,
    ) -> Credentials:
        """A gateway certificate valid from an hour ago for a day, for ``sites``."""
        now = int(time.time()) if now is None else now
        authority = authority or Ed25519PrivateKey.generate()
        signing, noise = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
        certificate = issue_certificate(
            authority,
            role=Role.GATEWAY,
            subject="test-gateway",
            serial=1,
            signing_key=signing.public_key(),
            noise_key=noise.public_key(),
            scope=Scope(sites=frozenset(sites), devices=frozenset(devices)),
            not_before=now - 3600 if not_before is None else not_before,
            not_after=now + DAY if not_after is None else not_after,
        )
        return cls(authority, signing, noise, encode_certificate(certificate))

    @property
    def authority_public(self) -> bytes:
        """The authority's raw public key, as Provision carries it."""
        return self.authority.public_key().public_bytes_raw()

    def sign(self, update: AuthorisationUpdate) -> AuthUpdate:
        """The update signed by this gateway, as an AuthUpdate request."""
        certificate = decode_certificate(self.certificate)
        signed = sign_update(update, key=self.signing_key, certificate=certificate)
        return AuthUpdate(encode_update(signed))


@dataclass(frozen=True)
class PinnedDevice:
    """What pairing taught the gateway about a device."""

    device_id: bytes
    signing_key: bytes
    noise_key: bytes


# --------------------------------------------------------------------------------------------
# The central
# --------------------------------------------------------------------------------------------


async def _race(awaitable: Awaitable[_T], dropped: asyncio.Future[None]) -> _T:
    """Await a Bumble operation unless the link drops first.

    Bumble cancels the future of a pending ATT request when the link drops; in a task of
    our own that shows as the task's cancellation, which is told apart from ours here.
    """
    if dropped.done():
        if isinstance(awaitable, Coroutine):
            awaitable.close()  # never awaited: no "coroutine was never awaited" warning
        msg = "link is down"
        raise LinkDropped(msg)
    task = asyncio.ensure_future(awaitable)
    try:
        waiters: set[asyncio.Future[Any]] = {task, dropped}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        msg = "link dropped during a GATT operation"
        raise LinkDropped(msg)
    return task.result()


class GattLink:
    """One GATT connection to a lockgw device: write fragments, receive notifications."""

    def __init__(self, connection: Any, device: Any) -> None:
        self._connection = connection
        self.address = str(connection.peer_address)
        self.mtu = 23
        self._write_handle = 0
        self._received: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.dropped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.disconnect_reason: int | None = None
        connection.on(connection.EVENT_DISCONNECTION, self._on_disconnection)
        if device.connections.get(connection.handle) is not connection:
            # The link dropped before connect() returned to us (a device that disconnects
            # at once, over HCI/TCP): its disconnection event is gone, and GATT requests
            # would go nowhere until their 30 s timeout.
            self._on_disconnection(hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR)

    @property
    def max_fragment_size(self) -> int:
        """The largest fragment the link's MTU allows."""
        return max_fragment_size(self.mtu)

    @property
    def connected(self) -> bool:
        """Until the link drops."""
        return not self.dropped.done()

    async def set_up(self, mtu: int) -> None:
        """Exchange the MTU, discover the lockgw service and subscribe."""
        peer = Peer(self._connection)
        self.mtu = int(await _race(peer.request_mtu(mtu), self.dropped))
        services = await _race(peer.discover_service(SERVICE_UUID), self.dropped)
        if not services:
            msg = f"{self.address} serves no lockgw service"
            raise ConnectFailed(msg)
        characteristics = await _race(
            peer.discover_characteristics(
                uuids=[WRITE_CHARACTERISTIC_UUID, NOTIFY_CHARACTERISTIC_UUID],
                service=services[0],
            ),
            self.dropped,
        )
        write = next((c for c in characteristics if c.uuid == _WRITE_UUID), None)
        notify = next((c for c in characteristics if c.uuid == _NOTIFY_UUID), None)
        if write is None or notify is None:
            msg = f"{self.address}: the lockgw characteristics are missing"
            raise ConnectFailed(msg)
        self._write_handle = int(write.handle)
        await _race(peer.discover_descriptors(notify), self.dropped)
        if notify.get_descriptor(GATT_CLIENT_CHARACTERISTIC_CONFIGURATION_DESCRIPTOR) is None:
            msg = f"{self.address}: the notify characteristic has no CCCD"
            raise ConnectFailed(msg)
        await _race(peer.subscribe(notify, self._on_notification, prefer_notify=True), self.dropped)

    def _on_notification(self, value: bytes) -> None:
        if self.connected:
            self._received.put_nowait(bytes(value))

    def _on_disconnection(self, reason: int = 0) -> None:
        if self.connected:
            self.disconnect_reason = reason
            self.dropped.set_result(None)
            self._received.put_nowait(None)  # after the notifications that did arrive

    async def write(self, fragment: bytes) -> None:
        """One fragment, as a Write Request: the response paces us to the device."""
        if len(fragment) > self.max_fragment_size:
            msg = f"fragment of {len(fragment)} bytes exceeds {self.max_fragment_size}"
            raise ValueError(msg)
        client = self._connection.gatt_client
        await _race(
            client.write_value(self._write_handle, fragment, with_response=True), self.dropped
        )

    async def receive(self, within: float = ANSWER_TIMEOUT) -> bytes:
        """The next notified fragment; :class:`LinkDropped` once the link is down."""
        async with asyncio.timeout(within):
            item = await self._received.get()
        if item is None:
            self._received.put_nowait(None)
            msg = f"link to {self.address} dropped (reason 0x{self.disconnect_reason or 0:02X})"
            raise LinkDropped(msg)
        return item

    async def disconnect(self) -> None:
        """Disconnect (a no-op once down)."""
        if not self.connected:
            return
        with contextlib.suppress(core.BaseBumbleError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._connection.disconnect()
        self._on_disconnection(hci.HCI_ErrorCode.CONNECTION_TERMINATED_BY_LOCAL_HOST_ERROR)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.disconnect()


class Central:
    """A Bumble host in the central role, on a virtual link or over an HCI transport."""

    def __init__(self, source: Any, sink: Any, *, on_close: Callable[[], Awaitable[None]]) -> None:
        self._device = Device.with_hci(
            "test-gateway", hci.Address.generate_static_address(), source, sink
        )
        self._on_close = on_close
        self._links: set[GattLink] = set()

    @classmethod
    async def on_link(cls, link: ScalableLink) -> Central:
        """A central with its own controller on ``link``."""
        controller = VirtualController("test-central", link=link)

        async def close() -> None:
            controller.power_down(hci.HCI_ErrorCode.CONNECTION_TIMEOUT_ERROR)
            with contextlib.suppress(ValueError, KeyError):
                link.remove_controller(controller)

        central = cls(controller, AsyncPipeSink(controller), on_close=close)
        await central.open()
        return central

    @classmethod
    async def over_transport(cls, moniker: str) -> Central:
        """A central whose controller is reached over ``moniker`` (``tcp-client:...``)."""
        transport = await open_transport(moniker)

        async def close() -> None:
            await transport.close()

        central = cls(transport.source, transport.sink, on_close=close)
        await central.open()
        return central

    async def open(self) -> None:
        """Power the host on."""
        await self._device.power_on()

    async def close(self) -> None:
        """Drop the links, stop scanning, power off and release the controller."""
        for link in list(self._links):
            await link.disconnect()
        with contextlib.suppress(core.BaseBumbleError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if self._device.is_scanning:
                    await self._device.stop_scanning()
                await self._device.power_off()
        await self._on_close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def scan(
        self,
        *,
        duration: float | None = None,
        until: Callable[[dict[str, Advert]], bool] | None = None,
        within: float = SCAN_TIMEOUT,
    ) -> dict[str, Advert]:
        """The latest lockgw advert of every address heard: for ``duration`` seconds, or
        until ``until(seen)`` holds (TimeoutError after ``within`` seconds)."""
        seen: dict[str, Advert] = {}
        done = asyncio.Event()

        def on_advertisement(advertisement: Any) -> None:
            try:
                advert = parse_advertising_data(bytes(advertisement.data_bytes))
            except DecodeError:
                return
            if advert is not None:
                seen[str(advertisement.address)] = advert
                if until is not None and until(seen):
                    done.set()

        self._device.on(Device.EVENT_ADVERTISEMENT, on_advertisement)
        await self._device.start_scanning(filter_duplicates=False)
        try:
            if until is None:
                await asyncio.sleep(SCAN_TIMEOUT if duration is None else duration)
            else:
                async with asyncio.timeout(within):
                    await done.wait()
        finally:
            self._device.remove_listener(Device.EVENT_ADVERTISEMENT, on_advertisement)
            await self._device.stop_scanning()
        return seen

    async def scan_for(
        self, addresses: Iterable[str], within: float = SCAN_TIMEOUT
    ) -> dict[str, Advert]:
        """Scan until every one of ``addresses`` was heard; their adverts."""
        wanted = set(addresses)
        seen = await self.scan(until=lambda seen: wanted <= seen.keys(), within=within)
        return {address: seen[address] for address in wanted}

    async def connect(
        self, address: str, *, mtu: int = MAX_ATT_MTU, within: float = CONNECT_TIMEOUT
    ) -> GattLink:
        """Connect, exchange the MTU, discover the service and subscribe."""
        try:
            connection = await self._device.connect(
                hci.Address(address), transport=core.PhysicalTransport.LE, timeout=within
            )
        except (core.BaseBumbleError, TimeoutError) as exc:
            msg = f"connecting to {address}: {type(exc).__name__} {exc}"
            raise ConnectFailed(msg) from exc
        link = GattLink(connection, self._device)
        self._links.add(link)
        link.dropped.add_done_callback(lambda _: self._links.discard(link))
        try:
            await link.set_up(mtu)
        except LinkDropped as exc:
            msg = f"{address} dropped the link while it was set up"
            raise ConnectFailed(msg) from exc
        except BaseException:
            await link.disconnect()
            raise
        return link


# --------------------------------------------------------------------------------------------
# The session over a link
# --------------------------------------------------------------------------------------------


class GatewaySession:
    """A GATEWAY-role :class:`Session` over a :class:`GattLink`."""

    def __init__(self, link: GattLink, config: GatewaySessionConfig) -> None:
        self.link = link
        self.session = Session.gateway(config, mtu=link.mtu)
        self.sent = 0
        self.received = 0

    async def _flush(self) -> None:
        for fragment in self.session.data_to_send():
            await self.link.write(fragment)
            self.sent += 1

    async def _fail(self, event: SessionFailed) -> SessionError:
        # The session queued its reason for the device; tell it if the link still stands.
        with contextlib.suppress(LinkDropped):
            await self._flush()
        return SessionError(event.error.code, event.error.message, by_peer=event.by_peer)

    async def _events(self, within: float) -> list[HandshakeComplete | MessageReceived]:
        """Feed fragments until the session has something to say."""
        while True:
            events = self.session.events()
            for event in events:
                if isinstance(event, SessionFailed):
                    raise await self._fail(event)
            if events:
                return [e for e in events if not isinstance(e, SessionFailed)]
            fragment = await self.link.receive(within)
            # The device must cut its answers to the link's MTU (faults only shorten them).
            assert len(fragment) <= self.link.max_fragment_size, len(fragment)
            self.received += 1
            self.session.receive_fragment(fragment)

    async def open(self, within: float = ANSWER_TIMEOUT) -> HandshakeComplete:
        """Run the handshake; the device may still refuse message 3, which the first
        :meth:`request` then reports."""
        self.session.start()
        await self._flush()
        for event in await self._events(within):
            if isinstance(event, HandshakeComplete):
                await self._flush()  # message 3
                return event
        msg = "handshake ended without completing"
        raise DriverError(msg)

    async def request(self, message: Message, within: float = ANSWER_TIMEOUT) -> Message:
        """Send one request and return the device's answer (an ErrorReply is an answer)."""
        request_id = self.session.send_request(message)
        await self._flush()
        while True:
            for event in await self._events(within):
                if isinstance(event, MessageReceived) and event.request_id == request_id:
                    return event.message

    async def collect_log(
        self, pinned: PinnedDevice, state: ChainState | None = None, *, acknowledge: bool = True
    ) -> VerifiedBatch:
        """Read the whole log from ``state`` (default: genesis), verify it, acknowledge it."""
        state = state or ChainState.genesis(pinned.device_id)
        answer = await self.request(LogRead(from_sequence=state.next_sequence, max_records=1000))
        if not isinstance(answer, LogBatchMessage):
            msg = f"log read refused: {answer}"
            raise DriverError(msg)
        verified = verify_batch(
            decode_batch(answer.batch),
            device_id=pinned.device_id,
            device_key=load_signing_public(pinned.signing_key),
            state=state,
        )
        if acknowledge and verified.records:
            await self.request(LogAck(up_to_sequence=verified.state.next_sequence - 1))
        return verified


async def pair(
    central: Central,
    address: str,
    label: str,
    credentials: Credentials,
    *,
    mtu: int = MAX_ATT_MTU,
    site_id: int = SITE_ID,
    now: int | None = None,
) -> PinnedDevice:
    """Pair with the code on the label, provision the device, and pin its keys."""
    now = int(time.time()) if now is None else now
    code, device_id = parse_code_or_label(label)
    if device_id is None:
        msg = "pairing needs the QR payload, which names the device"
        raise ValueError(msg)
    async with await central.connect(address, mtu=mtu) as link:
        config = GatewaySessionConfig(
            noise_key=credentials.noise_key,
            device_id=device_id,
            now=now,
            mode=SessionMode.PAIRING,
            pairing_code=code,
        )
        session = GatewaySession(link, config)
        done = await session.open()
        answer = await session.request(
            Provision(device_id, credentials.authority_public, site_id, now)
        )
        if not isinstance(answer, Provisioned):
            msg = f"provisioning refused: {answer}"
            raise DriverError(msg)
        assert done.device is not None
        assert session.session.peer_static_key is not None
        return PinnedDevice(device_id, done.device.signing_key, session.session.peer_static_key)


async def open_session(
    central: Central,
    address: str,
    pinned: PinnedDevice,
    credentials: Credentials,
    *,
    mtu: int = MAX_ATT_MTU,
    now: int | None = None,
) -> GatewaySession:
    """Connect and run a normal (certificate-checked) handshake; disconnect the returned
    session's link when done."""
    link = await central.connect(address, mtu=mtu)
    config = GatewaySessionConfig(
        noise_key=credentials.noise_key,
        device_id=pinned.device_id,
        now=int(time.time()) if now is None else now,
        certificate=credentials.certificate,
        pinned_signing_key=pinned.signing_key,
        pinned_noise_key=pinned.noise_key,
    )
    session = GatewaySession(link, config)
    try:
        await session.open()
    except BaseException:
        await link.disconnect()
        raise
    return session


def provision_directly(
    device: VirtualDevice, credentials: Credentials, *, site_id: int = SITE_ID, now: int
) -> PinnedDevice:
    """Pair a device through its model, without the radio: for set-ups (many devices to
    open sessions with), not for testing pairing itself."""
    answer = device.handle(
        Provision(device.device_id, credentials.authority_public, site_id, now),
        mode=SessionMode.PAIRING,
    )
    if not isinstance(answer, Provisioned):
        msg = f"provisioning refused: {answer}"
        raise DriverError(msg)
    return PinnedDevice(
        device.device_id, device.identity.signing_public, device.identity.noise_public
    )
