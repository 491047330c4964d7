"""Typed errors of the device protocol.

Every refusal on the wire carries an :class:`ErrorCode`. Exceptions say whose fault it
was, as in h11: a :class:`LocalProtocolError` means this side misused the protocol; a
:class:`RemoteProtocolError` means the peer sent something wrong, and carries the code to
answer with. Parsers and verifiers raise nothing else for bad input.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """Refusal codes, one byte on the wire (docs/protocol.md, "Error codes")."""

    # General message handling.
    MALFORMED = 0x01
    UNSUPPORTED_VERSION = 0x02
    UNKNOWN_MESSAGE = 0x03
    UNEXPECTED_MESSAGE = 0x04
    MESSAGE_TOO_LARGE = 0x05
    # Framing of messages into ATT fragments.
    FRAGMENT_TRUNCATED = 0x10
    FRAGMENT_OUT_OF_ORDER = 0x11
    FRAGMENT_OVERSIZED = 0x12
    # Noise handshake and transport.
    HANDSHAKE_FAILED = 0x20
    DECRYPT_FAILED = 0x21
    NONCE_EXHAUSTED = 0x22
    PEER_KEY_MISMATCH = 0x23
    SESSION_CLOSED = 0x24
    # Certificates.
    CERT_MALFORMED = 0x30
    CERT_BAD_SIGNATURE = 0x31
    CERT_EXPIRED = 0x32
    CERT_NOT_YET_VALID = 0x33
    CERT_WRONG_ROLE = 0x34
    CERT_OUT_OF_SCOPE = 0x35
    CERT_KEY_MISMATCH = 0x36
    # Signed authorisation updates.
    UPDATE_MALFORMED = 0x40
    UPDATE_UNSIGNED = 0x41
    UPDATE_BAD_SIGNATURE = 0x42
    UPDATE_EXPIRED = 0x43
    UPDATE_NOT_YET_VALID = 0x44
    UPDATE_WRONG_TARGET = 0x45
    UPDATE_OUT_OF_SCOPE = 0x46
    UPDATE_ROLLBACK = 0x47
    UPDATE_BASE_MISMATCH = 0x48
    UPDATE_TOO_LARGE = 0x49
    # Event log batches.
    LOG_GAP = 0x50
    LOG_REORDER = 0x51
    LOG_ALTERED = 0x52
    LOG_BAD_CHECKPOINT = 0x53
    LOG_TRUNCATED = 0x54
    LOG_CURSOR_INVALID = 0x55
    # Device state.
    NOT_PAIRED = 0x60
    ALREADY_PAIRED = 0x61
    NOT_IN_PAIRING_MODE = 0x62
    BAD_PAIRING_CODE = 0x63
    TIME_BELOW_FLOOR = 0x64
    BUSY = 0x65
    INTERNAL = 0xFF


class ProtocolError(Exception):
    """Base of every error this library raises for bad input or misuse."""

    code: ErrorCode

    def __init__(self, code: ErrorCode, message: str = "") -> None:
        super().__init__(message or code.name.lower().replace("_", " "))
        self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])


class LocalProtocolError(ProtocolError):
    """This side misused the protocol (sent out of turn, oversized, after close)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something wrong; ``code`` is the refusal to answer with."""


class DecodeError(RemoteProtocolError):
    """Bytes that do not parse as the expected structure."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.MALFORMED) -> None:
        super().__init__(code, message)


class FramingError(RemoteProtocolError):
    """A truncated, oversized or out-of-order fragment."""


class CryptoError(RemoteProtocolError):
    """A Noise handshake or transport failure; the session is over."""


class CertificateError(RemoteProtocolError):
    """A certificate that is malformed, forged, expired, of the wrong role or out of scope."""


class UpdateRefused(RemoteProtocolError):
    """A signed authorisation update the device must not apply."""


class LogVerificationError(RemoteProtocolError):
    """A log batch that fails verification.

    ``index`` is the position of the first bad record within the batch (the number of
    records before it that verified), ``sequence`` its sequence number where known.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        index: int,
        sequence: int | None = None,
    ) -> None:
        super().__init__(code, message)
        self.index = index
        self.sequence = sequence


class PairingCodeError(LocalProtocolError, ValueError):
    """A pairing code typed or scanned wrongly (bad characters, length or checksum)."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.BAD_PAIRING_CODE, message)
