"""The pairing code printed on a device's label, and the Noise PSK derived from it.

A Noise PSK is not a password-authenticated key exchange: an active attacker who once
impersonates the device can test guesses offline. The code therefore carries 80 random
bits, which no offline search exhausts, plus a 20-bit check so a typo is reported as a
typo rather than as a failed handshake. It is printed as twenty Crockford base32
characters in groups of four, and inside a QR payload that also names the device.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocols.errors import PairingCodeError
from protocols.identity import DEVICE_ID_SIZE

SECRET_BITS: Final = 80
CHECK_BITS: Final = 20
CODE_LENGTH: Final = (SECRET_BITS + CHECK_BITS) // 5
GROUP_SIZE: Final = 4
QR_PREFIX: Final = "LOCKGW1"

# Crockford's alphabet leaves out I, L, O and U so that a code read aloud or typed from a
# label is hard to get wrong; the look-alikes are folded back when parsing.
_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_FOLD: Final = str.maketrans({"I": "1", "L": "1", "O": "0"})
_SEPARATORS: Final = str.maketrans("", "", " -_\t")
_CHECK_DOMAIN: Final = b"lockgw/pairing-code/v1"
_PSK_SALT: Final = b"lockgw/pairing-psk/v1"


@dataclass(frozen=True)
class PairingCode:
    """The secret behind a label. ``repr`` and ``str`` never show it."""

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != SECRET_BITS // 8:
            msg = f"a pairing secret is {SECRET_BITS // 8} bytes"
            raise PairingCodeError(msg)

    @classmethod
    def generate(cls) -> PairingCode:
        return cls(secrets.token_bytes(SECRET_BITS // 8))

    @classmethod
    def parse(cls, text: str) -> PairingCode:
        """Parse the typed form, forgiving case, separators and look-alike characters."""
        cleaned = text.upper().translate(_SEPARATORS).translate(_FOLD)
        if len(cleaned) != CODE_LENGTH:
            msg = f"a pairing code has {CODE_LENGTH} characters, got {len(cleaned)}"
            raise PairingCodeError(msg)
        value = 0
        for char in cleaned:
            digit = _ALPHABET.find(char)
            if digit < 0:
                msg = f"{char!r} is not a pairing code character"
                raise PairingCodeError(msg)
            value = value << 5 | digit
        secret = (value >> CHECK_BITS).to_bytes(SECRET_BITS // 8, "big")
        if value & ((1 << CHECK_BITS) - 1) != _check(secret):
            msg = "the pairing code does not add up: check it for a typo"
            raise PairingCodeError(msg)
        return cls(secret)

    def text(self) -> str:
        """The grouped form printed on the label, e.g. ``7K2M-...``; it is a secret."""
        value = int.from_bytes(self.secret, "big") << CHECK_BITS | _check(self.secret)
        chars = [
            _ALPHABET[(value >> shift) & 0x1F]
            for shift in range(SECRET_BITS + CHECK_BITS - 5, -1, -5)
        ]
        return "-".join(
            "".join(chars[start : start + GROUP_SIZE])
            for start in range(0, CODE_LENGTH, GROUP_SIZE)
        )

    def psk(self, device_id: bytes) -> bytes:
        """The 32-byte Noise PSK; bound to the device, so a code opens no other device."""
        if len(device_id) != DEVICE_ID_SIZE:
            msg = f"a device id is {DEVICE_ID_SIZE} bytes"
            raise PairingCodeError(msg)
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=_PSK_SALT, info=device_id)
        return hkdf.derive(self.secret)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PairingCode):
            return NotImplemented
        return hmac.compare_digest(self.secret, other.secret)

    def __hash__(self) -> int:
        return hash(self.secret)


@dataclass(frozen=True)
class LabelPayload:
    """What the QR code on a label says: which device, and its pairing code."""

    device_id: bytes
    code: PairingCode = field(repr=False)

    def text(self) -> str:
        """``LOCKGW1:<device id hex>:<code>``: QR alphanumeric mode holds it compactly."""
        return f"{QR_PREFIX}:{self.device_id.hex().upper()}:{self.code.text().replace('-', '')}"

    @classmethod
    def parse(cls, text: str) -> LabelPayload:
        parts = text.strip().split(":")
        if len(parts) != 3 or parts[0].upper() != QR_PREFIX:
            msg = f"a label payload looks like {QR_PREFIX}:<device id>:<code>"
            raise PairingCodeError(msg)
        try:
            device_id = bytes.fromhex(parts[1])
        except ValueError as exc:
            msg = "the label's device id is not hex"
            raise PairingCodeError(msg) from exc
        if len(device_id) != DEVICE_ID_SIZE:
            msg = f"the label's device id is not {DEVICE_ID_SIZE} bytes"
            raise PairingCodeError(msg)
        return cls(device_id, PairingCode.parse(parts[2]))


def parse_code_or_label(text: str) -> tuple[PairingCode, bytes | None]:
    """Accept either the typed code or the scanned QR payload; return the device id if named."""
    if text.strip().upper().startswith(QR_PREFIX + ":"):
        label = LabelPayload.parse(text)
        return label.code, label.device_id
    return PairingCode.parse(text), None


def _check(secret: bytes) -> int:
    digest = hashlib.sha256(_CHECK_DOMAIN + secret).digest()
    return int.from_bytes(digest[:3], "big") >> (24 - CHECK_BITS)
