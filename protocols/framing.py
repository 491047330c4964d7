"""Fragmentation of protocol messages into ATT writes and notifications, sans-IO.

Each ATT write (gateway to device) or notification (device to gateway) carries exactly one
fragment. A message of 1 to :data:`MAX_MESSAGE_SIZE` bytes is cut into fragments that fit
the negotiated ATT MTU and glued together again by a :class:`Reassembler` on the other side.

Wire layout of a fragment (all integers big-endian)::

    byte 0        header: bit 7 FIRST, bit 6 LAST, bits 5..0 fragment index modulo 64
    bytes 1..3    FIRST fragments only: total message length, u24, 1..65536
    rest          data, at least one byte

The first fragment has index 0 and each following fragment counts up by one, modulo 64.
A message that fits in one fragment is sent as a single FIRST|LAST fragment. A fragment is
at most ``min(mtu - 3, 512)`` bytes long: the ATT header takes three bytes of the MTU,
and no attribute value may exceed 512 bytes.

GATT links are ordered and reliable, so a fragment out of sequence means a dropped,
duplicated or injected frame: it is an error, never something to reorder or skip. The
index and the declared length together catch every dropped or duplicated fragment and
every swap of fragments whose positions differ by other than a multiple of 64; the
authenticated encryption of the session above catches the rest.
"""

from __future__ import annotations

from typing import Final

from protocols.errors import ErrorCode, FramingError, LocalProtocolError
from protocols.gatt import MAX_ATT_MTU, MIN_ATT_MTU, max_fragment_size

__all__ = [
    "FIRST_HEADER_SIZE",
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "Reassembler",
    "fragment",
]

MAX_MESSAGE_SIZE: Final = 65536
"""Largest message, in bytes, that can be fragmented or reassembled."""

FIRST_HEADER_SIZE: Final = 4
"""Header byte and u24 total length in front of the data of a FIRST fragment."""

HEADER_SIZE: Final = 1
"""Header byte in front of the data of every other fragment."""

_FIRST: Final = 0x80
_LAST: Final = 0x40
_INDEX_MASK: Final = 0x3F
_INDEX_MODULUS: Final = 64
_LENGTH_SIZE: Final = FIRST_HEADER_SIZE - HEADER_SIZE

# The header is one byte of bit fields and a u24, handled with plain integer operations
# rather than construct: this runs once per fragment (over 3,400 fragments for a full
# message at the minimum MTU) and construct costs about fifty times as much per fragment.


def _check_mtu(mtu: int) -> int:
    """Return the largest fragment for ``mtu``; an MTU outside the ATT range is misuse."""
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not MIN_ATT_MTU <= mtu <= MAX_ATT_MTU:
        msg = f"ATT MTU must be an integer in {MIN_ATT_MTU}..{MAX_ATT_MTU}, got {mtu!r}"
        raise LocalProtocolError(ErrorCode.MALFORMED, msg)
    return max_fragment_size(mtu)


def _as_bytes(value: object, what: str) -> bytes:
    # Typed as object so the check survives type narrowing: bytes(5) would otherwise
    # quietly become five zero bytes.
    if not isinstance(value, bytes | bytearray | memoryview):
        msg = f"{what} must be bytes, got {type(value).__name__}"
        raise LocalProtocolError(ErrorCode.MALFORMED, msg)
    return bytes(value)


def fragment(message: bytes | bytearray | memoryview, mtu: int) -> list[bytes]:
    """Cut ``message`` into fragments of at most ``min(mtu - 3, 512)`` bytes each.

    Raises :class:`LocalProtocolError` with ``MALFORMED`` for an MTU outside 23..517 or a
    message that is not bytes, and with ``MESSAGE_TOO_LARGE`` for an empty message or one
    over :data:`MAX_MESSAGE_SIZE` bytes.
    """
    max_fragment = _check_mtu(mtu)
    data = _as_bytes(message, "message")
    if not 1 <= len(data) <= MAX_MESSAGE_SIZE:
        msg = f"message of {len(data)} bytes; must be 1..{MAX_MESSAGE_SIZE}"
        raise LocalProtocolError(ErrorCode.MESSAGE_TOO_LARGE, msg)

    first_room = max_fragment - FIRST_HEADER_SIZE
    room = max_fragment - HEADER_SIZE
    fragments: list[bytes] = []
    position = 0
    index = 0
    while position < len(data):
        first = position == 0
        end = min(len(data), position + (first_room if first else room))
        header = index & _INDEX_MASK
        if first:
            header |= _FIRST
        if end == len(data):
            header |= _LAST
        prefix = bytes([header])
        if first:
            prefix += len(data).to_bytes(_LENGTH_SIZE, "big")
        fragments.append(prefix + data[position:end])
        position = end
        index += 1
    return fragments


class Reassembler:
    """Rebuild messages from fragments fed one at a time, in order.

    Every refusal is a :class:`FramingError`:

    ``FRAGMENT_TRUNCATED``
        an empty fragment; a fragment with a header but no data byte; a LAST fragment that
        ends before the declared length; a FIRST fragment while a message is still
        incomplete.
    ``FRAGMENT_OUT_OF_ORDER``
        a continuation fragment with no message in progress; a fragment whose index is not
        the next one (a FIRST fragment must have index 0).
    ``FRAGMENT_OVERSIZED``
        a fragment longer than ``min(mtu - 3, 512)``; a declared length of 0 or over
        ``max_message_size`` (refused before anything is buffered); data beyond the
        declared length; a fragment without LAST that completes the declared length, since
        the sender announces more data than the message holds.

    After an error the partial message and the offending fragment are discarded and the
    reassembler waits for a new FIRST fragment. It never holds more than the declared
    length, and so never more than ``max_message_size`` bytes.
    """

    def __init__(self, mtu: int = MAX_ATT_MTU, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        """Accept fragments for ``mtu`` and messages of at most ``max_message_size`` bytes.

        Raises :class:`LocalProtocolError` (``MALFORMED``) for an MTU outside 23..517 or a
        ``max_message_size`` outside 1..:data:`MAX_MESSAGE_SIZE`.
        """
        self._max_fragment = _check_mtu(mtu)
        if (
            not isinstance(max_message_size, int)
            or isinstance(max_message_size, bool)
            or not 1 <= max_message_size <= MAX_MESSAGE_SIZE
        ):
            msg = f"max_message_size must be 1..{MAX_MESSAGE_SIZE}, got {max_message_size!r}"
            raise LocalProtocolError(ErrorCode.MALFORMED, msg)
        self._max_message_size = max_message_size
        self._buffer = bytearray()
        self._expected = 0  # declared length of the message in progress; 0 when idle
        self._next_index = 0

    @property
    def in_progress(self) -> bool:
        """Whether part of a message has arrived and its LAST fragment has not."""
        return self._expected != 0

    def feed(self, fragment: bytes | bytearray | memoryview) -> bytes | None:
        """Take one fragment; return the whole message once its LAST fragment is in.

        Returns ``None`` while the message is incomplete. Raises :class:`FramingError` as
        described on the class, after discarding any partial message. A bytearray is
        accepted as it is, since that is what bleak hands a notification callback.
        """
        data = _as_bytes(fragment, "fragment")
        try:
            return self._feed(data)
        except FramingError:
            self._reset()
            raise

    def _reset(self) -> None:
        self._buffer = bytearray()
        self._expected = 0
        self._next_index = 0

    def _feed(self, data: bytes) -> bytes | None:
        if not data:
            raise FramingError(ErrorCode.FRAGMENT_TRUNCATED, "empty fragment")
        if len(data) > self._max_fragment:
            msg = f"fragment of {len(data)} bytes exceeds {self._max_fragment} for this MTU"
            raise FramingError(ErrorCode.FRAGMENT_OVERSIZED, msg)
        header = data[0]
        index = header & _INDEX_MASK
        last = bool(header & _LAST)
        if header & _FIRST:
            return self._start(data, index, last=last)
        return self._continue(data, index, last=last)

    def _start(self, data: bytes, index: int, *, last: bool) -> bytes | None:
        if self.in_progress:
            msg = (
                f"first fragment of a new message after {len(self._buffer)} of "
                f"{self._expected} bytes of the previous one"
            )
            raise FramingError(ErrorCode.FRAGMENT_TRUNCATED, msg)
        if index != 0:
            msg = f"first fragment has index {index}, expected 0"
            raise FramingError(ErrorCode.FRAGMENT_OUT_OF_ORDER, msg)
        if len(data) <= FIRST_HEADER_SIZE:
            msg = f"first fragment of {len(data)} bytes has no room for header and data"
            raise FramingError(ErrorCode.FRAGMENT_TRUNCATED, msg)
        declared = int.from_bytes(data[HEADER_SIZE:FIRST_HEADER_SIZE], "big")
        if declared == 0 or declared > self._max_message_size:
            msg = f"declared message length {declared}; must be 1..{self._max_message_size}"
            raise FramingError(ErrorCode.FRAGMENT_OVERSIZED, msg)
        payload = data[FIRST_HEADER_SIZE:]
        if len(payload) > declared:
            msg = f"first fragment carries {len(payload)} bytes of a {declared}-byte message"
            raise FramingError(ErrorCode.FRAGMENT_OVERSIZED, msg)
        if last:
            if len(payload) < declared:
                msg = f"message ends after {len(payload)} of {declared} bytes"
                raise FramingError(ErrorCode.FRAGMENT_TRUNCATED, msg)
            return payload
        if len(payload) == declared:
            msg = f"fragment completes the {declared}-byte message but is not marked last"
            raise FramingError(ErrorCode.FRAGMENT_OVERSIZED, msg)
        self._buffer = bytearray(payload)
        self._expected = declared
        self._next_index = 1
        return None

    def _continue(self, data: bytes, index: int, *, last: bool) -> bytes | None:
        if not self.in_progress:
            msg = f"continuation fragment {index} with no message in progress"
            raise FramingError(ErrorCode.FRAGMENT_OUT_OF_ORDER, msg)
        if index != self._next_index:
            msg = f"fragment index {index}, expected {self._next_index}"
            raise FramingError(ErrorCode.FRAGMENT_OUT_OF_ORDER, msg)
        if len(data) <= HEADER_SIZE:
            raise FramingError(ErrorCode.FRAGMENT_TRUNCATED, "fragment carries no data")
        received = len(self._buffer) + len(data) - HEADER_SIZE
        if received > self._expected:
            msg = f"fragment brings the message to {received} of {self._expected} bytes"
            raise FramingError(ErrorCode.FRAGMENT_OVERSIZED, msg)
        if last and received < self._expected:
            msg = f"message ends after {received} of {self._expected} bytes"
            raise FramingError(ErrorCode.FRAGMENT_TRUNCATED, msg)
        if not last and received == self._expected:
            msg = f"fragment completes the {self._expected}-byte message but is not marked last"
            raise FramingError(ErrorCode.FRAGMENT_OVERSIZED, msg)
        # Checked before appending, so the buffer never exceeds the declared length.
        self._buffer += data[HEADER_SIZE:]
        if last:
            message = bytes(self._buffer)
            self._reset()
            return message
        self._next_index = (self._next_index + 1) % _INDEX_MODULUS
        return None
