"""The lockgw session: one state machine that runs in both roles, GATEWAY and DEVICE.

Bytes in, events out, bytes to send, as in h11: the caller feeds each received ATT
fragment to :meth:`Session.receive_fragment`, takes events from :meth:`Session.next_event`
and writes whatever :meth:`Session.data_to_send` returns. Nothing here touches a radio.

A session is a Noise handshake followed by encrypted request/response messages:

* normal sessions run Noise_XX: the gateway checks the device's keys against the ones it
  pinned at pairing; the device checks the gateway's certificate against its authority
  key, for validity and scope;
* pairing sessions run Noise_XXpsk3 with the PSK derived from the label's pairing code;
  the device's keys are learned and pinned, then the gateway provisions the trust anchor.

Every framed message starts with a channel byte (:class:`Channel`). Any error ends the
session: it is queued to the peer (in clear before the handshake completes, encrypted
after) and surfaces as one :class:`SessionFailed` event.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Final, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocols import PROTOCOL_VERSION
from protocols.envelopes import Certificate, Role, decode_certificate, verify_certificate
from protocols.errors import (
    CertificateError,
    CryptoError,
    DecodeError,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from protocols.framing import Reassembler, fragment
from protocols.gatt import MAX_ATT_MTU
from protocols.identity import DeviceIdentity, device_id_from_key, verify_binding
from protocols.messages import (
    REQUESTS,
    DeviceHello,
    ErrorReply,
    GatewayHello,
    Message,
    decode_message,
    encode_message,
)
from protocols.noise import HandshakeState, TransportState
from protocols.pairing import PairingCode

_Hello = TypeVar("_Hello", DeviceHello, GatewayHello)

NORMAL_PROTOCOL: Final = "Noise_XX_25519_ChaChaPoly_SHA256"
PAIRING_PROTOCOL: Final = "Noise_XXpsk3_25519_ChaChaPoly_SHA256"
SESSION_REQUEST_ID: Final = 0xFFFF
"""Request id of an :class:`ErrorReply` that ends the whole session."""
MAX_PLAINTEXT: Final = 65535 - 16
"""A Noise message is at most 65535 bytes, 16 of them the tag."""


class SessionRole(Enum):
    GATEWAY = "gateway"
    DEVICE = "device"


class SessionMode(IntEnum):
    """Second byte of handshake message 1; also bound into the Noise prologue."""

    NORMAL = 1
    PAIRING = 2


class Channel(IntEnum):
    """First byte of every framed message."""

    HANDSHAKE = 0x01
    TRANSPORT = 0x02
    ABORT = 0x03  # one clear-text error code; only before the handshake completes


class SessionState(Enum):
    IDLE = "idle"
    AWAITING_DEVICE_HELLO = "awaiting device hello"  # gateway: sent message 1
    AWAITING_GATEWAY_HELLO = "awaiting gateway hello"  # device: sent message 2
    CONFIRMING = "confirming"  # gateway: sent message 3, the device has not yet accepted it
    ESTABLISHED = "established"
    CLOSED = "closed"


class _Input(Enum):
    START = "start"
    HANDSHAKE = "handshake"
    TRANSPORT = "transport"
    ABORT = "abort"
    SEND = "send"


_G, _D = SessionRole.GATEWAY, SessionRole.DEVICE
_S = SessionState

TRANSITIONS: Final[dict[tuple[SessionRole, SessionState, _Input], SessionState]] = {
    (_G, _S.IDLE, _Input.START): _S.AWAITING_DEVICE_HELLO,
    (_G, _S.AWAITING_DEVICE_HELLO, _Input.HANDSHAKE): _S.CONFIRMING,
    (_G, _S.AWAITING_DEVICE_HELLO, _Input.ABORT): _S.CLOSED,
    # The initiator's handshake ends with message 3, but only the device can check the
    # certificate (or, pairing, the PSK) in it: until its first encrypted answer the device
    # may still refuse, and can only say so in clear.
    (_G, _S.CONFIRMING, _Input.SEND): _S.CONFIRMING,
    (_G, _S.CONFIRMING, _Input.TRANSPORT): _S.ESTABLISHED,
    (_G, _S.CONFIRMING, _Input.ABORT): _S.CLOSED,
    (_G, _S.ESTABLISHED, _Input.TRANSPORT): _S.ESTABLISHED,
    (_G, _S.ESTABLISHED, _Input.SEND): _S.ESTABLISHED,
    (_D, _S.IDLE, _Input.HANDSHAKE): _S.AWAITING_GATEWAY_HELLO,
    (_D, _S.AWAITING_GATEWAY_HELLO, _Input.HANDSHAKE): _S.ESTABLISHED,
    (_D, _S.AWAITING_GATEWAY_HELLO, _Input.ABORT): _S.CLOSED,
    (_D, _S.ESTABLISHED, _Input.TRANSPORT): _S.ESTABLISHED,
    (_D, _S.ESTABLISHED, _Input.SEND): _S.ESTABLISHED,
}
"""Every legal move: (role, state, input) to the next state. Anything else is refused."""


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HandshakeComplete:
    """The peer is authenticated.

    ``device`` is set in the gateway role, ``gateway`` in the device role.
    """

    mode: SessionMode
    handshake_hash: bytes
    device: DeviceHello | None = None
    gateway: GatewayPeer | None = None


@dataclass(frozen=True)
class GatewayPeer:
    """What a device learned about the gateway in the handshake."""

    certificate: Certificate | None  # None in a pairing session
    gateway_time: int


@dataclass(frozen=True)
class MessageReceived:
    """A request (device role) or the response to one (gateway role)."""

    request_id: int
    message: Message


@dataclass(frozen=True)
class SessionFailed:
    """The session is over. ``by_peer`` says whether the peer reported the error."""

    error: ProtocolError
    by_peer: bool


Event = HandshakeComplete | MessageReceived | SessionFailed


# --- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewaySessionConfig:
    """What the gateway brings to a session with one device."""

    noise_key: X25519PrivateKey = field(repr=False)
    device_id: bytes
    now: int
    mode: SessionMode = SessionMode.NORMAL
    certificate: bytes = b""  # the encoded gateway certificate; required for NORMAL
    pinned_signing_key: bytes | None = None  # NORMAL: the device keys pinned at pairing
    pinned_noise_key: bytes | None = None
    pairing_code: PairingCode | None = field(default=None, repr=False)  # PAIRING only

    def __post_init__(self) -> None:
        if self.mode is SessionMode.NORMAL:
            if not self.certificate or not self.pinned_signing_key or not self.pinned_noise_key:
                msg = "a normal session needs the certificate and the pinned device keys"
                raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, msg)
        elif self.pairing_code is None:
            msg = "a pairing session needs the pairing code"
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, msg)


@dataclass(frozen=True)
class DeviceSessionConfig:
    """What a device brings to a session: its identity, its hello, and its trust anchor."""

    identity: DeviceIdentity = field(repr=False)
    hello: DeviceHello
    now: int  # device clock for certificate checks; its time floor while the clock is unset
    authority_key: Ed25519PublicKey | None = None  # None while unpaired
    pairing_code: PairingCode | None = field(default=None, repr=False)  # set in pairing mode


# --- the session ----------------------------------------------------------------------------


class Session:
    """One end of one lockgw session; construct with :meth:`gateway` or :meth:`device`."""

    def __init__(
        self,
        role: SessionRole,
        *,
        gateway_config: GatewaySessionConfig | None = None,
        device_config: DeviceSessionConfig | None = None,
        mtu: int = MAX_ATT_MTU,
    ) -> None:
        self.role = role
        self.state = SessionState.IDLE
        self._gateway_config = gateway_config
        self._device_config = device_config
        self._mtu = mtu
        self._reassembler = Reassembler(mtu=MAX_ATT_MTU)
        self._handshake: HandshakeState | None = None
        self._transport: TransportState | None = None
        self._events: deque[Event] = deque()
        self._outgoing: list[bytes] = []
        self._next_request_id = 1
        self._pending: dict[int, type[Message]] = {}
        self.mode: SessionMode | None = None
        self.peer_device: DeviceHello | None = None
        self.peer_gateway: GatewayPeer | None = None
        self.peer_static_key: bytes | None = None
        """The peer's Noise static public key, once the handshake authenticated it."""
        self.error: ProtocolError | None = None

    @classmethod
    def gateway(cls, config: GatewaySessionConfig, *, mtu: int = MAX_ATT_MTU) -> Session:
        return cls(SessionRole.GATEWAY, gateway_config=config, mtu=mtu)

    @classmethod
    def device(cls, config: DeviceSessionConfig, *, mtu: int = MAX_ATT_MTU) -> Session:
        return cls(SessionRole.DEVICE, device_config=config, mtu=mtu)

    # -- inputs ----------------------------------------------------------------------------

    @property
    def mtu(self) -> int:
        return self._mtu

    @mtu.setter
    def mtu(self, value: int) -> None:
        """The ATT MTU may be renegotiated mid-session; later fragments follow it."""
        self._mtu = value

    def start(self) -> None:
        """Gateway: begin the handshake (message 1 is then in :meth:`data_to_send`)."""
        self._advance(_Input.START)
        config = self._require_gateway_config()
        self.mode = config.mode
        self._handshake = self._new_handshake(
            config.mode, initiator=True, static=config.noise_key, psk=self._gateway_psk()
        )
        message = self._handshake.write_message()
        self._queue(bytes([Channel.HANDSHAKE, PROTOCOL_VERSION, config.mode]) + message)

    def receive_fragment(self, data: bytes) -> None:
        """Feed one received ATT fragment; events and replies follow from it."""
        if self.state is SessionState.CLOSED:
            return
        try:
            message = self._reassembler.feed(data)
            if message is not None:
                self._receive_message(message)
        except ProtocolError as exc:
            self._fail(exc, by_peer=False)

    def send_request(self, message: Message) -> int:
        """Gateway: send a request; returns its request id, which the response carries."""
        if self.role is not SessionRole.GATEWAY or type(message) not in REQUESTS:
            msg = f"{type(message).__name__} is not a request a gateway sends"
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, msg)
        request_id = self._next_request_id
        self._next_request_id = request_id % (SESSION_REQUEST_ID - 1) + 1
        self._send_encrypted(request_id, message)
        self._pending[request_id] = REQUESTS[type(message)]
        return request_id

    def send_response(self, request_id: int, message: Message) -> None:
        """Device: answer a pending request with its response type or an :class:`ErrorReply`."""
        expected = self._pending.get(request_id)
        if self.role is not SessionRole.DEVICE or expected is None:
            msg = f"no pending request {request_id} to answer"
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, msg)
        if not isinstance(message, expected | ErrorReply):
            msg = f"request {request_id} is answered with {expected.__name__}"
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, msg)
        self._send_encrypted(request_id, message)
        del self._pending[request_id]

    def close(self) -> None:
        """End the session locally; nothing more is sent or accepted."""
        self.state = SessionState.CLOSED
        self._transport = None
        self._handshake = None

    # -- outputs ---------------------------------------------------------------------------

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[Event]:
        """Drain every queued event."""
        drained = list(self._events)
        self._events.clear()
        return drained

    def data_to_send(self) -> list[bytes]:
        """Drain the fragments to write, each one ATT write or notification."""
        out, self._outgoing = self._outgoing, []
        return out

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    # -- internals -------------------------------------------------------------------------

    def _advance(self, event: _Input) -> None:
        next_state = TRANSITIONS.get((self.role, self.state, event))
        if next_state is None:
            what = f"{event.value} in state {self.state.value} ({self.role.value})"
            if event in (_Input.START, _Input.SEND):
                raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"cannot {what}")
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, f"unexpected {what}")
        self.state = next_state

    def _receive_message(self, message: bytes) -> None:
        try:
            channel = Channel(message[0])
        except ValueError as exc:
            msg = f"unknown channel 0x{message[0]:02x}"
            raise DecodeError(msg) from exc
        body = message[1:]
        if channel is Channel.ABORT:
            self._receive_abort(body)
        elif channel is Channel.HANDSHAKE:
            self._receive_handshake(body)
        else:
            self._receive_transport(body)

    def _receive_abort(self, body: bytes) -> None:
        self._advance(_Input.ABORT)
        try:
            code = ErrorCode(body[0]) if len(body) == 1 else ErrorCode.HANDSHAKE_FAILED
        except ValueError:
            code = ErrorCode.HANDSHAKE_FAILED
        self._fail(RemoteProtocolError(code, "peer aborted the handshake"), by_peer=True)

    def _receive_handshake(self, body: bytes) -> None:
        previous = self.state
        self._advance(_Input.HANDSHAKE)
        if self.role is SessionRole.DEVICE and previous is SessionState.IDLE:
            self._device_read_first(body)
        elif self.role is SessionRole.DEVICE:
            self._device_read_third(body)
        else:
            self._gateway_read_second(body)

    def _receive_transport(self, body: bytes) -> None:
        self._advance(_Input.TRANSPORT)
        assert self._transport is not None  # ESTABLISHED always holds transport keys
        plaintext = self._transport.decrypt(body)
        request_id, message = decode_message(plaintext)
        if request_id == SESSION_REQUEST_ID and isinstance(message, ErrorReply):
            raise _PeerEnded(message)
        if self.role is SessionRole.GATEWAY:
            self._gateway_accept_response(request_id, message)
        else:
            self._device_accept_request(request_id, message)
        self._events.append(MessageReceived(request_id, message))

    def _gateway_accept_response(self, request_id: int, message: Message) -> None:
        expected = self._pending.pop(request_id, None)
        if expected is None or not isinstance(message, expected | ErrorReply):
            msg = f"{type(message).__name__} answers no pending request"
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, msg)

    def _device_accept_request(self, request_id: int, message: Message) -> None:
        response = REQUESTS.get(type(message))
        if response is None or request_id in self._pending or request_id == SESSION_REQUEST_ID:
            msg = f"{type(message).__name__} with request id {request_id} is not a new request"
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, msg)
        self._pending[request_id] = response

    # gateway side of the handshake

    def _gateway_read_second(self, body: bytes) -> None:
        config = self._require_gateway_config()
        handshake = self._require_handshake()
        hello = self._decode_hello(handshake.read_message(body), DeviceHello)
        remote_static = handshake.remote_static
        assert remote_static is not None  # XX sends the responder's static in message 2
        if device_id_from_key(hello.signing_key) != hello.device_id:
            msg = "the device id does not derive from the device's key"
            raise RemoteProtocolError(ErrorCode.PEER_KEY_MISMATCH, msg)
        verify_binding(hello.signing_key, remote_static, hello.binding_signature)
        if hello.device_id != config.device_id:
            msg = "a different device answered"
            raise RemoteProtocolError(ErrorCode.PEER_KEY_MISMATCH, msg)
        if config.mode is SessionMode.NORMAL and (
            hello.signing_key != config.pinned_signing_key
            or remote_static != config.pinned_noise_key
        ):
            msg = "the device's keys differ from the ones pinned at pairing"
            raise RemoteProtocolError(ErrorCode.PEER_KEY_MISMATCH, msg)
        if config.mode is SessionMode.PAIRING and hello.paired:
            raise RemoteProtocolError(ErrorCode.ALREADY_PAIRED, "the device is already paired")
        certificate = config.certificate if config.mode is SessionMode.NORMAL else b""
        payload = encode_message(0, GatewayHello(certificate=certificate, gateway_time=config.now))
        self._queue(bytes([Channel.HANDSHAKE]) + handshake.write_message(payload))
        self.peer_device = hello
        self._complete(handshake)

    # device side of the handshake

    def _device_read_first(self, body: bytes) -> None:
        config = self._require_device_config()
        if len(body) < 2:
            msg = "handshake message 1 shorter than its header"
            raise DecodeError(msg)
        if body[0] != PROTOCOL_VERSION:
            msg = f"gateway speaks protocol version {body[0]}"
            raise RemoteProtocolError(ErrorCode.UNSUPPORTED_VERSION, msg)
        try:
            mode = SessionMode(body[1])
        except ValueError as exc:
            msg = f"unknown session mode {body[1]}"
            raise DecodeError(msg) from exc
        refusal = None
        if mode is SessionMode.NORMAL and config.authority_key is None:
            refusal = ErrorCode.NOT_PAIRED
        elif mode is SessionMode.PAIRING and config.authority_key is not None:
            refusal = ErrorCode.ALREADY_PAIRED
        elif mode is SessionMode.PAIRING and config.pairing_code is None:
            refusal = ErrorCode.NOT_IN_PAIRING_MODE
        if refusal is not None:
            raise RemoteProtocolError(refusal, f"device refuses a {mode.name.lower()} session")
        self.mode = mode
        psk = None
        if mode is SessionMode.PAIRING:
            assert config.pairing_code is not None  # mode PAIRING implies a code, see config
            psk = config.pairing_code.psk(config.identity.device_id)
        self._handshake = self._new_handshake(
            mode, initiator=False, static=config.identity.noise_key, psk=psk
        )
        self._handshake.read_message(body[2:])
        payload = encode_message(0, config.hello)
        self._queue(bytes([Channel.HANDSHAKE]) + self._handshake.write_message(payload))

    def _device_read_third(self, body: bytes) -> None:
        config = self._require_device_config()
        handshake = self._require_handshake()
        try:
            plaintext = handshake.read_message(body)
        except CryptoError as exc:
            if self.mode is SessionMode.PAIRING:
                # In a pairing session the PSK is mixed in before message 3's payload, so a
                # failure here is, short of an attack, a mistyped code.
                msg = "the pairing code does not match this device"
                raise RemoteProtocolError(ErrorCode.BAD_PAIRING_CODE, msg) from exc
            raise
        hello = self._decode_hello(plaintext, GatewayHello)
        certificate = None
        if self.mode is SessionMode.NORMAL:
            assert config.authority_key is not None  # NORMAL mode implies a trust anchor
            certificate = decode_certificate(hello.certificate)
            verify_certificate(certificate, config.authority_key, role=Role.GATEWAY, now=config.now)
            if certificate.noise_key != handshake.remote_static:
                msg = "the certificate names another session key"
                raise CertificateError(ErrorCode.CERT_KEY_MISMATCH, msg)
            if not certificate.scope.covers(config.identity.device_id, config.hello.site_id):
                msg = "the gateway's certificate does not cover this device"
                raise CertificateError(ErrorCode.CERT_OUT_OF_SCOPE, msg)
        self.peer_gateway = GatewayPeer(certificate=certificate, gateway_time=hello.gateway_time)
        self._complete(handshake)

    # shared helpers

    def _complete(self, handshake: HandshakeState) -> None:
        assert self.mode is not None
        self.peer_static_key = handshake.remote_static
        self._transport = handshake.transport()
        self._handshake = None
        self._events.append(
            HandshakeComplete(
                mode=self.mode,
                handshake_hash=handshake.handshake_hash,
                device=self.peer_device,
                gateway=self.peer_gateway,
            )
        )

    def _new_handshake(
        self, mode: SessionMode, *, initiator: bool, static: X25519PrivateKey, psk: bytes | None
    ) -> HandshakeState:
        protocol = PAIRING_PROTOCOL if mode is SessionMode.PAIRING else NORMAL_PROTOCOL
        prologue = b"lockgw/" + bytes([PROTOCOL_VERSION, mode])
        psks = (psk,) if psk is not None else ()
        return HandshakeState(protocol, initiator=initiator, prologue=prologue, s=static, psks=psks)

    def _gateway_psk(self) -> bytes | None:
        config = self._require_gateway_config()
        if config.mode is SessionMode.PAIRING:
            assert config.pairing_code is not None  # checked by the config
            return config.pairing_code.psk(config.device_id)
        return None

    @staticmethod
    def _decode_hello(payload: bytes, kind: type[_Hello]) -> _Hello:
        _, message = decode_message(payload)
        if not isinstance(message, kind):
            msg = f"expected {kind.__name__}, got {type(message).__name__}"
            raise RemoteProtocolError(ErrorCode.UNEXPECTED_MESSAGE, msg)
        return message

    def _send_encrypted(self, request_id: int, message: Message) -> None:
        self._advance(_Input.SEND)
        assert self._transport is not None  # ESTABLISHED always holds transport keys
        plaintext = encode_message(request_id, message)
        if len(plaintext) > MAX_PLAINTEXT:
            msg = f"{type(message).__name__} is {len(plaintext)} bytes, over {MAX_PLAINTEXT}"
            raise LocalProtocolError(ErrorCode.MESSAGE_TOO_LARGE, msg)
        self._queue(bytes([Channel.TRANSPORT]) + self._transport.encrypt(plaintext))

    def _queue(self, framed: bytes) -> None:
        self._outgoing.extend(fragment(framed, self._mtu))

    def _fail(self, error: ProtocolError, *, by_peer: bool) -> None:
        if isinstance(error, _PeerEnded):
            by_peer = True
        elif not by_peer:
            self._tell_peer(error.code)
        self.error = error
        self.close()
        self._events.append(SessionFailed(error=error, by_peer=by_peer))

    def _tell_peer(self, code: ErrorCode) -> None:
        """Best effort: the peer learns why, encrypted once keys exist, in clear before."""
        if self._transport is not None:
            try:
                reply = ErrorReply(code=code, message=code.name.lower())
                plaintext = encode_message(SESSION_REQUEST_ID, reply)
                self._queue(bytes([Channel.TRANSPORT]) + self._transport.encrypt(plaintext))
            except ProtocolError:
                return  # a dead cipher cannot say goodbye; the link drop will
        elif self.role is SessionRole.DEVICE or self.state is not SessionState.IDLE:
            self._queue(bytes([Channel.ABORT, code]))

    def _require_gateway_config(self) -> GatewaySessionConfig:
        if self._gateway_config is None:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "not a gateway session")
        return self._gateway_config

    def _require_device_config(self) -> DeviceSessionConfig:
        if self._device_config is None:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "not a device session")
        return self._device_config

    def _require_handshake(self) -> HandshakeState:
        if self._handshake is None:
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, "no handshake under way")
        return self._handshake


class _PeerEnded(RemoteProtocolError):
    """The peer ended the session with a typed error."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(reply.code, f"peer ended the session: {reply.message}")
