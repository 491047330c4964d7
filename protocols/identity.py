"""Device identity: the factory key pairs and the device id derived from them.

A device holds two static key pairs: Ed25519 to sign its log checkpoints and to vouch for
its Noise key, and X25519 as its Noise static key. The device id is derived from the
Ed25519 public key, so an id cannot be claimed without the key behind it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocols.errors import DecodeError, ErrorCode, RemoteProtocolError

DEVICE_ID_SIZE: Final = 8
_DEVICE_ID_DOMAIN: Final = b"lockgw/device-id/v1"
_BINDING_DOMAIN: Final = b"lockgw/device-binding/v1"


def device_id_from_key(signing_public: Ed25519PublicKey | bytes) -> bytes:
    """The 8-byte device id: the first bytes of SHA-256 over the Ed25519 public key."""
    raw = signing_public if isinstance(signing_public, bytes) else public_bytes(signing_public)
    return hashlib.sha256(_DEVICE_ID_DOMAIN + raw).digest()[:DEVICE_ID_SIZE]


def format_device_id(device_id: bytes) -> str:
    """Sixteen lower-case hex digits, the form people and topics use."""
    return device_id.hex()


def parse_device_id(text: str) -> bytes:
    """Parse sixteen hex digits (case-insensitive) into a device id."""
    cleaned = text.strip().lower()
    if len(cleaned) != DEVICE_ID_SIZE * 2:
        msg = f"a device id is {DEVICE_ID_SIZE * 2} hex digits, got {len(cleaned)} characters"
        raise DecodeError(msg)
    try:
        return bytes.fromhex(cleaned)
    except ValueError as exc:
        msg = "a device id is hex digits only"
        raise DecodeError(msg) from exc


def public_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """Raw 32-byte form of an Ed25519 public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes_raw()


def load_signing_public(raw: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its 32 raw bytes; anything else is a :class:`DecodeError`."""
    if len(raw) != 32:
        msg = "an Ed25519 public key is 32 bytes"
        raise DecodeError(msg)
    try:
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        msg = "not a valid Ed25519 public key"
        raise DecodeError(msg) from exc


def sign_binding(signing_key: Ed25519PrivateKey, noise_public: bytes) -> bytes:
    """The device's Ed25519 signature vouching for its X25519 Noise static key."""
    return signing_key.sign(_BINDING_DOMAIN + noise_public)


def verify_binding(signing_public: bytes, noise_public: bytes, signature: bytes) -> None:
    """Check that ``signing_public`` vouches for ``noise_public``.

    Raises :class:`RemoteProtocolError` with ``PEER_KEY_MISMATCH`` when it does not.
    """
    key = load_signing_public(signing_public)
    try:
        key.verify(signature, _BINDING_DOMAIN + noise_public)
    except InvalidSignature as exc:
        msg = "the device's signing key does not vouch for its session key"
        raise RemoteProtocolError(ErrorCode.PEER_KEY_MISMATCH, msg) from exc


@dataclass(frozen=True)
class DeviceIdentity:
    """A device's factory key pairs. ``repr`` never shows key material."""

    signing_key: Ed25519PrivateKey = field(repr=False)
    noise_key: X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> DeviceIdentity:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @classmethod
    def from_secret_bytes(cls, signing: bytes, noise: bytes) -> DeviceIdentity:
        """Restore from the two 32-byte private keys (as saved by a simulator)."""
        return cls(
            Ed25519PrivateKey.from_private_bytes(signing),
            X25519PrivateKey.from_private_bytes(noise),
        )

    def secret_bytes(self) -> tuple[bytes, bytes]:
        """The two 32-byte private keys, for a simulator's state file."""
        return self.signing_key.private_bytes_raw(), self.noise_key.private_bytes_raw()

    @property
    def signing_public(self) -> bytes:
        return public_bytes(self.signing_key)

    @property
    def noise_public(self) -> bytes:
        return self.noise_key.public_key().public_bytes_raw()

    @property
    def device_id(self) -> bytes:
        return device_id_from_key(self.signing_public)

    def binding_signature(self) -> bytes:
        return sign_binding(self.signing_key, self.noise_public)
