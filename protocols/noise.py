"""The Noise Protocol Framework (revision 34), suite 25519 / ChaChaPoly / SHA256, sans-IO.

Handshake patterns are data: the table below holds each pattern in the notation of the
specification and is parsed into frozen dataclasses at import; psk modifiers are applied
to a parsed pattern as the transformation of section 9.2. :class:`HandshakeState` runs
one side of a handshake and hands over a :class:`TransportState` once it is complete.

Errors follow :mod:`protocols.errors`: misuse by this side is a
:class:`~protocols.errors.LocalProtocolError`; anything wrong with what the peer sent is a
:class:`~protocols.errors.CryptoError`, after which the state that saw it refuses all
further use. Exception messages never carry key material.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from protocols.errors import CryptoError, ErrorCode, LocalProtocolError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

MAX_MESSAGE_LEN: Final = 65535
"""Largest Noise message, handshake or transport, in bytes (spec section 3)."""

DH_LEN: Final = 32
HASH_LEN: Final = 32
KEY_LEN: Final = 32
PSK_LEN: Final = 32
TAG_LEN: Final = 16

MAX_NONCE: Final = 2**64 - 1
"""Reserved nonce: never used for a message, only by :meth:`CipherState.rekey`."""

_DH_NAME: Final = "25519"
_CIPHER_NAME: Final = "ChaChaPoly"
_HASH_NAME: Final = "SHA256"


class Token(Enum):
    """A token of a handshake pattern."""

    E = "e"
    S = "s"
    EE = "ee"
    ES = "es"
    SE = "se"
    SS = "ss"
    PSK = "psk"


class Role(Enum):
    """The party that sends a message pattern."""

    INITIATOR = "->"
    RESPONDER = "<-"

    @property
    def peer(self) -> Role:
        """The other party."""
        return Role.RESPONDER if self is Role.INITIATOR else Role.INITIATOR


@dataclass(frozen=True)
class MessagePattern:
    """One handshake message: who sends it and the tokens it carries, in order."""

    sender: Role
    tokens: tuple[Token, ...]


@dataclass(frozen=True)
class HandshakePattern:
    """A handshake pattern: pre-messages (keys known in advance) and message patterns."""

    name: str
    initiator_premessage: tuple[Token, ...]
    responder_premessage: tuple[Token, ...]
    messages: tuple[MessagePattern, ...]

    @property
    def one_way(self) -> bool:
        """True for N, K, X and their variants: one message, initiator to responder."""
        return len(self.messages) == 1

    @property
    def psk_count(self) -> int:
        """Number of psk tokens, which is the number of pre-shared keys the pattern takes."""
        return sum(message.tokens.count(Token.PSK) for message in self.messages)

    def premessage(self, role: Role) -> tuple[Token, ...]:
        """Keys ``role`` is known to hold before the handshake starts."""
        return self.initiator_premessage if role is Role.INITIATOR else self.responder_premessage

    def sends(self, role: Role, token: Token) -> bool:
        """Whether ``role`` sends ``token`` in any of its messages."""
        return any(m.sender is role and token in m.tokens for m in self.messages)


_PATTERN_TEXT: Final[Mapping[str, str]] = MappingProxyType(
    {
        # One-way patterns (spec section 7.4).
        "N": "<- s\n...\n-> e, es",
        "K": "-> s\n<- s\n...\n-> e, es, ss",
        "X": "<- s\n...\n-> e, es, s, ss",
        # Fundamental interactive patterns (section 7.5).
        "NN": "-> e\n<- e, ee",
        "NK": "<- s\n...\n-> e, es\n<- e, ee",
        "NX": "-> e\n<- e, ee, s, es",
        "KN": "-> s\n...\n-> e\n<- e, ee, se",
        "KK": "-> s\n<- s\n...\n-> e, es, ss\n<- e, ee, se",
        "KX": "-> s\n...\n-> e\n<- e, ee, se, s, es",
        "XN": "-> e\n<- e, ee\n-> s, se",
        "XK": "<- s\n...\n-> e, es\n<- e, ee\n-> s, se",
        "XX": "-> e\n<- e, ee, s, es\n-> s, se",
        "IN": "-> e, s\n<- e, ee, se",
        "IK": "<- s\n...\n-> e, es, s, ss\n<- e, ee, se",
        "IX": "-> e, s\n<- e, ee, se, s, es",
        # Deferred patterns (section 18.2).
        "NK1": "<- s\n...\n-> e\n<- e, ee, es",
        "NX1": "-> e\n<- e, ee, s\n-> es",
        "X1N": "-> e\n<- e, ee\n-> s\n<- se",
        "X1K": "<- s\n...\n-> e, es\n<- e, ee\n-> s\n<- se",
        "XK1": "<- s\n...\n-> e\n<- e, ee, es\n-> s, se",
        "X1K1": "<- s\n...\n-> e\n<- e, ee, es\n-> s\n<- se",
        "X1X": "-> e\n<- e, ee, s, es\n-> s\n<- se",
        "XX1": "-> e\n<- e, ee, s\n-> es, s, se",
        "X1X1": "-> e\n<- e, ee, s\n-> es, s\n<- se",
        "K1N": "-> s\n...\n-> e\n<- e, ee\n-> se",
        "K1K": "-> s\n<- s\n...\n-> e, es\n<- e, ee\n-> se",
        "KK1": "-> s\n<- s\n...\n-> e\n<- e, ee, se, es",
        "K1K1": "-> s\n<- s\n...\n-> e\n<- e, ee, es\n-> se",
        "K1X": "-> s\n...\n-> e\n<- e, ee, s, es\n-> se",
        "KX1": "-> s\n...\n-> e\n<- e, ee, se, s\n-> es",
        "K1X1": "-> s\n...\n-> e\n<- e, ee, s\n-> se, es",
        "I1N": "-> e, s\n<- e, ee\n-> se",
        "I1K": "<- s\n...\n-> e, es, s\n<- e, ee\n-> se",
        "IK1": "<- s\n...\n-> e, s\n<- e, ee, se, es",
        "I1K1": "<- s\n...\n-> e, s\n<- e, ee, es\n-> se",
        "I1X": "-> e, s\n<- e, ee, s, es\n-> se",
        "IX1": "-> e, s\n<- e, ee, se, s\n-> es",
        "I1X1": "-> e, s\n<- e, ee, s\n-> se, es",
    }
)

_PREMESSAGE_SEPARATOR: Final = "..."
_PREMESSAGE_FORMS: Final = frozenset({(Token.E,), (Token.S,), (Token.E, Token.S)})


def _unsupported(message: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.UNSUPPORTED_VERSION, message)


def parse_pattern(name: str, text: str) -> HandshakePattern:
    """Parse a pattern in the notation of the specification, one message per line.

    Pre-messages, if any, come first and end with a ``...`` line.
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if _PREMESSAGE_SEPARATOR in lines:
        split = lines.index(_PREMESSAGE_SEPARATOR)
        pre_lines, message_lines = lines[:split], lines[split + 1 :]
    else:
        pre_lines, message_lines = [], lines
    premessages: dict[Role, tuple[Token, ...]] = {Role.INITIATOR: (), Role.RESPONDER: ()}
    previous: Role | None = None
    for line in pre_lines:
        role, tokens = _parse_line(name, line)
        # The initiator's pre-message, if any, is listed before the responder's.
        if role is previous or (previous is Role.RESPONDER and role is Role.INITIATOR):
            msg = f"pattern {name}: pre-messages out of order"
            raise _unsupported(msg)
        if tokens not in _PREMESSAGE_FORMS:
            msg = f"pattern {name}: a pre-message holds only e, s or e, s"
            raise _unsupported(msg)
        premessages[role] = tokens
        previous = role
    messages: list[MessagePattern] = []
    expected = Role.INITIATOR
    for line in message_lines:
        role, tokens = _parse_line(name, line)
        if role is not expected:
            msg = f"pattern {name}: messages must alternate, starting with the initiator"
            raise _unsupported(msg)
        messages.append(MessagePattern(sender=role, tokens=tokens))
        expected = role.peer
    if not messages:
        msg = f"pattern {name}: no messages"
        raise _unsupported(msg)
    return HandshakePattern(
        name=name,
        initiator_premessage=premessages[Role.INITIATOR],
        responder_premessage=premessages[Role.RESPONDER],
        messages=tuple(messages),
    )


def _parse_line(name: str, line: str) -> tuple[Role, tuple[Token, ...]]:
    arrow, _, rest = line.partition(" ")
    try:
        role = Role(arrow)
        tokens = tuple(Token(word.strip()) for word in rest.split(","))
    except ValueError as exc:
        msg = f"pattern {name}: cannot parse line {line!r}"
        raise _unsupported(msg) from exc
    return role, tokens


PATTERNS: Final[Mapping[str, HandshakePattern]] = MappingProxyType(
    {name: parse_pattern(name, text) for name, text in _PATTERN_TEXT.items()}
)
"""The base patterns this module supports, by name, without modifiers."""


def apply_psk_modifiers(base: HandshakePattern, positions: Sequence[int]) -> HandshakePattern:
    """Apply ``psk0``, ``psk1``... (spec section 9.2) to ``base``.

    ``psk0`` puts a psk token at the start of the first message, ``pskN`` at the end of
    message N (counting from 1). ``positions`` must be strictly ascending.
    """
    if list(positions) != sorted(set(positions)):
        msg = f"pattern {base.name}: psk modifiers must be distinct and in ascending order"
        raise _unsupported(msg)
    messages = [list(m.tokens) for m in base.messages]
    for position in positions:
        if position < 0 or position > len(messages):
            msg = f"pattern {base.name}: no message for psk{position}"
            raise _unsupported(msg)
        if position == 0:
            messages[0].insert(0, Token.PSK)
        else:
            messages[position - 1].append(Token.PSK)
    suffix = "+".join(f"psk{position}" for position in positions)
    return HandshakePattern(
        name=base.name + suffix,
        initiator_premessage=base.initiator_premessage,
        responder_premessage=base.responder_premessage,
        messages=tuple(
            MessagePattern(sender=original.sender, tokens=tuple(tokens))
            for original, tokens in zip(base.messages, messages, strict=True)
        ),
    )


def handshake_pattern(name: str) -> HandshakePattern:
    """The pattern named ``name``, a base pattern with optional psk modifiers ("XXpsk3")."""
    split = 0
    while split < len(name) and ("0" <= name[split] <= "9" or "A" <= name[split] <= "Z"):
        split += 1
    base_name, modifiers = name[:split], name[split:]
    base = PATTERNS.get(base_name)
    if base is None:
        msg = f"unsupported handshake pattern {name!r}"
        raise _unsupported(msg)
    if not modifiers:
        return base
    positions = []
    for modifier in modifiers.split("+"):
        digits = modifier.removeprefix("psk")
        # One spelling per modifier: "psk01" is not "psk1".
        if (
            not modifier.startswith("psk")
            or not (digits.isascii() and digits.isdecimal())
            or str(int(digits)) != digits
        ):
            msg = f"unsupported pattern modifier {modifier!r}"
            raise _unsupported(msg)
        positions.append(int(digits))
    return apply_psk_modifiers(base, positions)


def pattern_for_protocol(protocol_name: str) -> HandshakePattern:
    """The pattern of a full protocol name such as ``Noise_XX_25519_ChaChaPoly_SHA256``."""
    parts = protocol_name.split("_")
    if not protocol_name.isascii() or len(parts) != 5 or parts[0] != "Noise":
        msg = f"not a Noise protocol name: {protocol_name!r}"
        raise _unsupported(msg)
    _, pattern_name, dh, cipher, hash_name = parts
    if (dh, cipher, hash_name) != (_DH_NAME, _CIPHER_NAME, _HASH_NAME):
        msg = f"unsupported Noise suite {dh}_{cipher}_{hash_name}"
        raise _unsupported(msg)
    return handshake_pattern(pattern_name)


def _hash(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def _hmac(key: bytes, data: bytes) -> bytes:
    mac = hmac.HMAC(key, hashes.SHA256())
    mac.update(data)
    return mac.finalize()


def _hkdf(chaining_key: bytes, input_key_material: bytes, outputs: int) -> tuple[bytes, ...]:
    """HKDF as section 4.3 defines it: two or three outputs of HASHLEN bytes."""
    temp_key = _hmac(chaining_key, input_key_material)
    results: list[bytes] = []
    previous = b""
    for index in range(1, outputs + 1):
        previous = _hmac(temp_key, previous + bytes([index]))
        results.append(previous)
    return tuple(results)


def _as_bytes(data: object, what: str) -> bytes:
    # bytes(5) would be five zero bytes: refuse anything that is not already bytes-like.
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    msg = f"{what} must be bytes, not {type(data).__name__}"
    raise TypeError(msg)


def _nonce_bytes(nonce: int) -> bytes:
    # ChaChaPoly in Noise: 32 bits of zeros, then the 64-bit counter little-endian.
    return b"\x00" * 4 + nonce.to_bytes(8, "little")


class CipherState:
    """A key and a nonce (spec section 5.1); without a key it passes data through.

    A failed decryption ends it: every later call raises ``SESSION_CLOSED``.
    """

    __slots__ = ("_aead", "_closed", "_nonce")

    def __init__(self, key: bytes | None = None) -> None:
        self._aead: ChaCha20Poly1305 | None = None
        self._nonce = 0
        self._closed = False
        if key is not None:
            self._set_key(key)

    def _set_key(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            msg = f"a cipher key is {KEY_LEN} bytes"
            raise LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, msg)
        self._aead = ChaCha20Poly1305(bytes(key))

    def has_key(self) -> bool:
        """Whether a key is set, so that data is encrypted rather than passed through."""
        return self._aead is not None

    @property
    def nonce(self) -> int:
        """The nonce the next message will use."""
        return self._nonce

    @property
    def closed(self) -> bool:
        """True once a failure has ended this CipherState."""
        return self._closed

    def close(self) -> None:
        """End this CipherState; every later call raises ``SESSION_CLOSED``."""
        self._closed = True
        self._aead = None

    def _ready(self) -> ChaCha20Poly1305 | None:
        if self._closed:
            raise CryptoError(ErrorCode.SESSION_CLOSED)
        if self._aead is not None and self._nonce >= MAX_NONCE:
            raise CryptoError(ErrorCode.NONCE_EXHAUSTED)
        return self._aead

    def encrypt_with_ad(self, ad: bytes, plaintext: bytes) -> bytes:
        """Encrypt and authenticate ``plaintext`` with associated data ``ad``."""
        ad, plaintext = _as_bytes(ad, "ad"), _as_bytes(plaintext, "plaintext")
        aead = self._ready()
        if aead is None:
            return plaintext
        if len(plaintext) + TAG_LEN > MAX_MESSAGE_LEN:
            msg = f"plaintext of {len(plaintext)} bytes exceeds a Noise message"
            raise LocalProtocolError(ErrorCode.MESSAGE_TOO_LARGE, msg)
        ciphertext = aead.encrypt(_nonce_bytes(self._nonce), plaintext, ad)
        self._nonce += 1
        return ciphertext

    def decrypt_with_ad(self, ad: bytes, ciphertext: bytes) -> bytes:
        """Check and decrypt ``ciphertext``; a bad tag raises ``DECRYPT_FAILED`` and ends it."""
        ad, ciphertext = _as_bytes(ad, "ad"), _as_bytes(ciphertext, "ciphertext")
        aead = self._ready()
        if aead is None:
            return ciphertext
        if not TAG_LEN <= len(ciphertext) <= MAX_MESSAGE_LEN:
            self.close()
            msg = f"ciphertext of {len(ciphertext)} bytes"
            raise CryptoError(ErrorCode.DECRYPT_FAILED, msg)
        try:
            plaintext = aead.decrypt(_nonce_bytes(self._nonce), ciphertext, ad)
        except InvalidTag as exc:
            self.close()
            raise CryptoError(ErrorCode.DECRYPT_FAILED) from exc
        self._nonce += 1
        return plaintext

    def rekey(self) -> None:
        """Replace the key by a one-way function of itself, nonce unchanged (spec 4.2, 11.3)."""
        if self._closed:
            raise CryptoError(ErrorCode.SESSION_CLOSED)
        if self._aead is not None:
            # REKEY encrypts with the reserved nonce, which no message can ever use.
            new_key = self._aead.encrypt(_nonce_bytes(MAX_NONCE), bytes(KEY_LEN), b"")
            self._set_key(new_key[:KEY_LEN])


class _SymmetricState:
    """Chaining key, handshake hash and the handshake's CipherState (spec section 5.2)."""

    __slots__ = ("_chaining_key", "_cipher", "_hash")

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASH_LEN:
            self._hash = protocol_name.ljust(HASH_LEN, b"\x00")
        else:
            self._hash = _hash(protocol_name)
        self._chaining_key = self._hash
        self._cipher = CipherState()

    @property
    def handshake_hash(self) -> bytes:
        return self._hash

    def has_key(self) -> bool:
        return self._cipher.has_key()

    def mix_key(self, input_key_material: bytes) -> None:
        self._chaining_key, temp_key = _hkdf(self._chaining_key, input_key_material, 2)
        self._cipher = CipherState(temp_key[:KEY_LEN])

    def mix_hash(self, data: bytes) -> None:
        self._hash = _hash(self._hash + data)

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        self._chaining_key, temp_hash, temp_key = _hkdf(self._chaining_key, input_key_material, 3)
        self.mix_hash(temp_hash)
        self._cipher = CipherState(temp_key[:KEY_LEN])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self._cipher.encrypt_with_ad(self._hash, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self._cipher.decrypt_with_ad(self._hash, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        temp_key1, temp_key2 = _hkdf(self._chaining_key, b"", 2)
        return CipherState(temp_key1[:KEY_LEN]), CipherState(temp_key2[:KEY_LEN])


class TransportState:
    """This side's two CipherStates after the handshake, used with empty associated data.

    After a one-way handshake the initiator only sends and the responder only receives.
    """

    __slots__ = ("_handshake_hash", "_receive", "_send")

    def __init__(
        self,
        *,
        send: CipherState | None,
        receive: CipherState | None,
        handshake_hash: bytes,
    ) -> None:
        self._send = send
        self._receive = receive
        self._handshake_hash = bytes(handshake_hash)

    @property
    def handshake_hash(self) -> bytes:
        """The final handshake hash, a unique identifier of this session (channel binding)."""
        return self._handshake_hash

    @property
    def send_cipher(self) -> CipherState | None:
        """The CipherState for messages to the peer; None if this side only receives."""
        return self._send

    @property
    def receive_cipher(self) -> CipherState | None:
        """The CipherState for messages from the peer; None if this side only sends."""
        return self._receive

    def encrypt(self, plaintext: bytes) -> bytes:
        """Encrypt the next transport message to the peer."""
        if self._send is None:
            msg = "one-way pattern: the responder does not send transport messages"
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, msg)
        return self._send.encrypt_with_ad(b"", plaintext)

    def decrypt(self, ciphertext: bytes) -> bytes:
        """Decrypt the next transport message from the peer; failures are ``DECRYPT_FAILED``."""
        if self._receive is None:
            msg = "one-way pattern: the initiator does not receive transport messages"
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, msg)
        return self._receive.decrypt_with_ad(b"", ciphertext)


# Any clamped scalar is a multiple of the cofactor, so X25519 with it yields all zeros
# exactly for the low-order points, whichever scalar it is: this key need not be secret.
_LOW_ORDER_PROBE: Final = X25519PrivateKey.from_private_bytes(b"\x01" * DH_LEN)


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _is_usable_public_key(public: bytes) -> bool:
    if len(public) != DH_LEN:
        return False
    try:
        _LOW_ORDER_PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        msg = "Diffie-Hellman with an invalid public key"
        raise CryptoError(ErrorCode.HANDSHAKE_FAILED, msg) from exc


def _message_overhead(tokens: Sequence[Token], *, has_key: bool, psk_mode: bool) -> int:
    """Bytes a handshake message adds to its payload, as known before writing it."""
    size = 0
    for token in tokens:
        if token is Token.E:
            size += DH_LEN
            has_key = has_key or psk_mode
        elif token is Token.S:
            size += DH_LEN + (TAG_LEN if has_key else 0)
        else:
            has_key = True  # every DH token and psk calls MixKey
    return size + (TAG_LEN if has_key else 0)


def _handshake_failed(message: str) -> CryptoError:
    return CryptoError(ErrorCode.HANDSHAKE_FAILED, message)


def _misconfigured(message: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.HANDSHAKE_FAILED, message)


_KeyT = TypeVar("_KeyT", X25519PrivateKey, bytes)


def _present(key: _KeyT | None) -> _KeyT:
    # Construction checks every key a valid pattern uses; a gap here is a bug in this module.
    if key is None:
        msg = "a key the pattern uses is missing"
        raise LocalProtocolError(ErrorCode.INTERNAL, msg)
    return key


class HandshakeState:
    """One side of a Noise handshake (spec section 5.3).

    ``s`` is this side's static key, ``rs`` the peer's static public key where the
    pattern has it as a pre-message, ``psks`` the pre-shared keys in the order of the
    psk tokens. ``e`` and ``re`` are for test vectors and pre-message ephemerals only.
    """

    __slots__ = (
        "_closed",
        "_e",
        "_message_index",
        "_pattern",
        "_psk_mode",
        "_psks",
        "_psks_used",
        "_re",
        "_role",
        "_rs",
        "_s",
        "_symmetric",
        "_transport",
    )

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        s: X25519PrivateKey | None = None,
        e: X25519PrivateKey | None = None,
        rs: bytes | None = None,
        re: bytes | None = None,
        psks: Sequence[bytes] = (),
    ) -> None:
        pattern = pattern_for_protocol(protocol_name)
        role = Role.INITIATOR if initiator else Role.RESPONDER
        self._pattern = pattern
        self._role = role
        self._s = s
        self._e = e
        self._rs = None if rs is None else bytes(rs)
        self._re = None if re is None else bytes(re)
        self._psks = tuple(bytes(psk) for psk in psks)
        self._psks_used = 0
        self._psk_mode = pattern.psk_count > 0
        self._message_index = 0
        self._closed = False
        self._transport: TransportState | None = None
        self._check_keys()

        self._symmetric = _SymmetricState(protocol_name.encode("ascii"))
        self._symmetric.mix_hash(_as_bytes(prologue, "prologue"))
        for sender in (Role.INITIATOR, Role.RESPONDER):
            for token in pattern.premessage(sender):
                self._symmetric.mix_hash(self._premessage_key(sender, token))

    def _check_keys(self) -> None:
        pattern, role = self._pattern, self._role
        mine, theirs = pattern.premessage(role), pattern.premessage(role.peer)
        if self._s is None and (Token.S in mine or pattern.sends(role, Token.S)):
            msg = f"pattern {pattern.name} needs this side's static key"
            raise _misconfigured(msg)
        if self._e is None and Token.E in mine:
            msg = f"pattern {pattern.name} needs this side's pre-message ephemeral key"
            raise _misconfigured(msg)
        # A remote key the pattern transmits would be silently replaced, not checked.
        for token, key, label in ((Token.S, self._rs, "static"), (Token.E, self._re, "ephemeral")):
            if (token in theirs) != (key is not None):
                needs = "needs" if token in theirs else "does not take"
                msg = f"pattern {pattern.name} {needs} the peer's {label} key in advance"
                raise _misconfigured(msg)
            if key is not None and not _is_usable_public_key(key):
                msg = f"the peer's {label} key is not a valid X25519 public key"
                raise _misconfigured(msg)
        if len(self._psks) != pattern.psk_count:
            msg = f"pattern {pattern.name} takes {pattern.psk_count} psk(s), got {len(self._psks)}"
            raise _misconfigured(msg)
        if any(len(psk) != PSK_LEN for psk in self._psks):
            msg = f"a psk is {PSK_LEN} bytes"
            raise _misconfigured(msg)

    def _premessage_key(self, sender: Role, token: Token) -> bytes:
        if sender is self._role:
            return _public_bytes(_present(self._s if token is Token.S else self._e))
        return _present(self._rs if token is Token.S else self._re)

    @property
    def pattern(self) -> HandshakePattern:
        """The handshake pattern, modifiers applied."""
        return self._pattern

    @property
    def initiator(self) -> bool:
        """Whether this side started the handshake."""
        return self._role is Role.INITIATOR

    @property
    def is_complete(self) -> bool:
        """Whether every handshake message has been written or read."""
        return self._transport is not None

    @property
    def is_my_turn(self) -> bool:
        """Whether the next handshake message is this side's to write."""
        if self._closed or self.is_complete:
            return False
        return self._pattern.messages[self._message_index].sender is self._role

    @property
    def handshake_hash(self) -> bytes:
        """The handshake hash h so far; final once the handshake is complete."""
        return self._symmetric.handshake_hash

    @property
    def remote_static(self) -> bytes | None:
        """The peer's static public key (32 bytes) once known.

        Only a complete handshake proves the peer holds the matching private key.
        """
        return self._rs

    def transport(self) -> TransportState:
        """The transport CipherStates; only once the handshake is complete."""
        self._check_open()
        if self._transport is None:
            msg = "the handshake is not complete"
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, msg)
        return self._transport

    def _check_open(self) -> None:
        if self._closed:
            raise CryptoError(ErrorCode.SESSION_CLOSED)

    def _next_message(self, *, writing: bool) -> MessagePattern:
        self._check_open()
        if self.is_complete:
            msg = "the handshake is already complete"
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, msg)
        message = self._pattern.messages[self._message_index]
        if (message.sender is self._role) != writing:
            msg = "it is not this side's turn to " + ("write" if writing else "read")
            raise LocalProtocolError(ErrorCode.UNEXPECTED_MESSAGE, msg)
        return message

    def write_message(self, payload: bytes = b"") -> bytes:
        """Write the next handshake message, carrying ``payload``."""
        message = self._next_message(writing=True)
        payload = _as_bytes(payload, "payload")
        overhead = _message_overhead(
            message.tokens, has_key=self._symmetric.has_key(), psk_mode=self._psk_mode
        )
        if len(payload) + overhead > MAX_MESSAGE_LEN:
            msg = f"payload of {len(payload)} bytes exceeds a Noise message"
            raise LocalProtocolError(ErrorCode.MESSAGE_TOO_LARGE, msg)
        try:
            out = b"".join(self._write_token(token) for token in message.tokens)
            out += self._symmetric.encrypt_and_hash(payload)
        except BaseException:
            self._close()
            raise
        self._advance()
        return out

    def read_message(self, message: bytes) -> bytes:
        """Read the peer's next handshake message and return its payload."""
        pattern = self._next_message(writing=False)
        message = _as_bytes(message, "message")
        try:
            payload = self._read(pattern.tokens, message)
        except CryptoError as exc:
            self._close()
            if exc.code is ErrorCode.HANDSHAKE_FAILED:
                raise
            msg = "handshake message failed authentication"
            raise _handshake_failed(msg) from exc
        except BaseException:
            self._close()
            raise
        self._advance()
        return payload

    def _close(self) -> None:
        self._closed = True
        self._s = self._e = None
        self._psks = ()

    def _advance(self) -> None:
        self._message_index += 1
        if self._message_index < len(self._pattern.messages):
            return
        c1, c2 = self._symmetric.split()
        if self._pattern.one_way:
            send, receive = (c1, None) if self._role is Role.INITIATOR else (None, c1)
        else:
            send, receive = (c1, c2) if self._role is Role.INITIATOR else (c2, c1)
        self._transport = TransportState(
            send=send, receive=receive, handshake_hash=self._symmetric.handshake_hash
        )
        # The handshake keys have done their work; drop what forward secrecy asks us to.
        self._e = None
        self._psks = ()

    def _write_token(self, token: Token) -> bytes:
        if token is Token.E:
            if self._e is None:
                self._e = X25519PrivateKey.generate()
            public = _public_bytes(self._e)
            self._mix_ephemeral(public)
            return public
        if token is Token.S:
            return self._symmetric.encrypt_and_hash(_public_bytes(_present(self._s)))
        self._mix_token(token)
        return b""

    def _read(self, tokens: Sequence[Token], message: bytes) -> bytes:
        if len(message) > MAX_MESSAGE_LEN:
            msg = f"handshake message of {len(message)} bytes exceeds a Noise message"
            raise _handshake_failed(msg)
        minimum = _message_overhead(
            tokens, has_key=self._symmetric.has_key(), psk_mode=self._psk_mode
        )
        if len(message) < minimum:
            msg = f"handshake message of {len(message)} bytes, at least {minimum} expected"
            raise _handshake_failed(msg)
        offset = 0
        for token in tokens:
            if token is Token.E:
                public = message[offset : offset + DH_LEN]
                offset += DH_LEN
                if not _is_usable_public_key(public):
                    msg = "the peer's ephemeral key is not a valid X25519 public key"
                    raise _handshake_failed(msg)
                self._re = public
                self._mix_ephemeral(public)
            elif token is Token.S:
                size = DH_LEN + (TAG_LEN if self._symmetric.has_key() else 0)
                public = self._symmetric.decrypt_and_hash(message[offset : offset + size])
                offset += size
                if not _is_usable_public_key(public):
                    msg = "the peer's static key is not a valid X25519 public key"
                    raise _handshake_failed(msg)
                self._rs = public
            else:
                self._mix_token(token)
        return self._symmetric.decrypt_and_hash(message[offset:])

    def _mix_ephemeral(self, public: bytes) -> None:
        self._symmetric.mix_hash(public)
        # Section 9.2: with a psk, the ephemeral also feeds the key, so that an encrypted
        # payload after a psk token depends on a fresh ephemeral.
        if self._psk_mode:
            self._symmetric.mix_key(public)

    def _mix_token(self, token: Token) -> None:
        if token is Token.PSK:
            self._symmetric.mix_key_and_hash(self._psks[self._psks_used])
            self._psks_used += 1
            return
        initiator = self._role is Role.INITIATOR
        # Token names are (initiator's key, responder's key); map them to ours and theirs.
        local_static = token in ((Token.SE, Token.SS) if initiator else (Token.ES, Token.SS))
        remote_static = token in ((Token.ES, Token.SS) if initiator else (Token.SE, Token.SS))
        private = _present(self._s if local_static else self._e)
        public = _present(self._rs if remote_static else self._re)
        self._symmetric.mix_key(_dh(private, public))
