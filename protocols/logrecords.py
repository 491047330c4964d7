"""Tamper-evident event log: records, hash chain, signed checkpoints, batches, verifier.

Every device keeps its door, key and cabinet events as fixed 30-byte records in a ring
buffer (:class:`DeviceLog`). The records form a hash chain per device::

    head_0     = SHA-256(b"lockgw/log/genesis/v1" || device_id)
    head_(s+1) = SHA-256(head_s || record_s)          (record_s: the 30 encoded bytes)

and each record carries ``link = head_s[:8]``, the first bytes of the head *before* it.
When the gateway reads the log the device answers with a :class:`LogBatch`: a run of
consecutive records, the head before the first of them and a :class:`Checkpoint`, an
Ed25519 signature by the device over the head after the last of them.

The security of the log rests on the full 32-byte head signed in the checkpoint: a
verifier who holds the last verified :class:`ChainState` recomputes the chain and
compares. The 8-byte links add no security; they let :func:`verify_batch` name *which*
record was altered when the tamperer did not also recompute the chain, so that an
auditor is sent to the right record.

Sequence ``0xFFFFFFFF`` (:data:`NO_SEQUENCE`) is reserved: a checkpoint with that
sequence covers no record at all (an empty log), so records use ``0..0xFFFFFFFE``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, Final, NoReturn

from construct import Int32ub, Struct
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocols._codec import build, parse_exact
from protocols.enums import EventType, Reason
from protocols.errors import (
    DecodeError,
    ErrorCode,
    LocalProtocolError,
    LogVerificationError,
    ProtocolError,
    RemoteProtocolError,
)

RECORD_SIZE: Final = 30
"""Encoded size of one :class:`LogRecord`."""

CHECKPOINT_SIZE: Final = 104
"""Encoded size of one :class:`Checkpoint`."""

DEVICE_ID_SIZE: Final = 8
HEAD_SIZE: Final = 32
"""A chain head is a full SHA-256 digest."""

LINK_SIZE: Final = 8
"""A record's link is the first bytes of the chain head before it."""

PAYLOAD_SIZE: Final = 8
SIGNATURE_SIZE: Final = 64

MAX_BATCH_RECORDS: Final = 1000
"""Most records one batch may carry; more is refused before any record is read."""

NO_SEQUENCE: Final = 0xFFFF_FFFF
"""Checkpoint sequence meaning "no record yet": the checkpoint of an empty log."""

MAX_SEQUENCE: Final = 0xFFFF_FFFE
"""Highest sequence a record may have (:data:`NO_SEQUENCE` is reserved)."""

GENESIS_CONTEXT: Final = b"lockgw/log/genesis/v1"
CHECKPOINT_CONTEXT: Final = b"lockgw/log/checkpoint/v1"

_U32_MAX: Final = 0xFFFF_FFFF
_sha256: Final = hashlib.sha256
_STATE_VERSION: Final = 1

# Fixed layouts, all integers big-endian. They are packed with ``struct`` rather than
# construct: a batch is up to 1,000 records, each decoded, re-encoded for its chain hash
# and stored, and construct costs some fifty times as much per record. The objects handed
# to the encoders are validated when they are built, so packing cannot fail or pad.
_RECORD: Final = struct.Struct(">IIBBI8s8s")
"""sequence u32, time u32, event u8, reason u8, key_id u32, payload (8), link (8)."""

_CHECKPOINT: Final = struct.Struct(">I32sI64s")
"""sequence u32, head (32), time u32, signature (64)."""

# What the device signs, b"lockgw/log/checkpoint/v1" || device_id (8) || sequence u32 ||
# head (32) || time u32. The context string keeps a checkpoint signature from being
# accepted as any other signature the same device key makes, and the device id binds it
# to one device even if two devices were ever to share a key.
_U32: Final = struct.Struct(">I")

# The fixed front of a batch, read on its own so an oversized count is refused before
# any record is read: start_sequence u32, start_head (32), count u16. Then count records
# and the checkpoint.
_BATCH_HEADER: Final = struct.Struct(">I32sH")
_BATCH_HEADER_SIZE: Final = 4 + HEAD_SIZE + 2

_OVERFLOW_PAYLOAD = Struct(
    "first_lost" / Int32ub,
    "lost_count" / Int32ub,
)


# --------------------------------------------------------------------------- validation


def _check_uint(value: object, what: str, maximum: int = _U32_MAX, minimum: int = 0) -> None:
    # bool is an int subclass; True as a sequence number is a bug, not a value.
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        msg = f"{what} must be an integer in {minimum}..{maximum}, got {value!r}"
        raise LocalProtocolError(ErrorCode.MALFORMED, msg)


def _check_bytes(value: object, size: int, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        got = f"{len(value)} bytes" if isinstance(value, bytes) else type(value).__name__
        msg = f"{what} must be {size} bytes, got {got}"
        raise LocalProtocolError(ErrorCode.MALFORMED, msg)


def _check_type(value: object, expected: type, what: str) -> None:
    if not isinstance(value, expected):
        msg = f"{what} must be a {expected.__name__}, got {type(value).__name__}"
        raise LocalProtocolError(ErrorCode.MALFORMED, msg)


# ------------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One event as the device logged it (30 bytes on the wire).

    ``sequence`` counts from 0 per device and is never reused; ``time`` is the device
    clock in unix seconds; ``key_id`` is the staff key involved (0 = none); ``payload`` is
    8 event-specific bytes, zero padded; ``link`` is the first 8 bytes of the chain head
    before this record.
    """

    sequence: int
    time: int
    event: EventType
    reason: Reason
    key_id: int
    payload: bytes
    link: bytes

    def __post_init__(self) -> None:
        # One expression for what decoders and devices build (exact types, in range), as
        # every record of every batch passes here; anything else gets the checks below,
        # which name the field that is wrong.
        if (
            type(self.sequence) is int
            and 0 <= self.sequence <= MAX_SEQUENCE
            and type(self.time) is int
            and 0 <= self.time <= _U32_MAX
            and type(self.event) is EventType
            and type(self.reason) is Reason
            and type(self.key_id) is int
            and 0 <= self.key_id <= _U32_MAX
            and type(self.payload) is bytes
            and len(self.payload) == PAYLOAD_SIZE
            and type(self.link) is bytes
            and len(self.link) == LINK_SIZE
        ):
            return
        _check_uint(self.sequence, "record sequence", MAX_SEQUENCE)
        _check_uint(self.time, "record time")
        _check_type(self.event, EventType, "record event")
        _check_type(self.reason, Reason, "record reason")
        _check_uint(self.key_id, "record key id")
        _check_bytes(self.payload, PAYLOAD_SIZE, "record payload")
        _check_bytes(self.link, LINK_SIZE, "record link")


def encode_record(record: LogRecord) -> bytes:
    """The 30 bytes of ``record``: the form that is hashed into the chain."""
    _check_type(record, LogRecord, "record")
    return _pack_record(record)


def _pack_record(record: LogRecord) -> bytes:
    return _RECORD.pack(
        record.sequence,
        record.time,
        record.event,
        record.reason,
        record.key_id,
        record.payload,
        record.link,
    )


def decode_record(data: bytes) -> LogRecord:
    """Parse exactly 30 bytes; unknown event or reason values are a :class:`DecodeError`."""
    raw = _wire_bytes(data, "log record")
    if len(raw) != RECORD_SIZE:
        msg = f"log record: {len(raw)} bytes, expected {RECORD_SIZE}"
        raise DecodeError(msg)
    return _record_from_fields(_RECORD.unpack(raw), "log record")


_EVENT_TYPES: Final = {int(event): event for event in EventType}
_REASONS: Final = {int(reason): reason for reason in Reason}


def _record_from_fields(fields: tuple[Any, ...], what: str | int) -> LogRecord:
    """A record from its unpacked fields; ``what`` names it in errors (an int: the index
    of a batch record, so that the name is only formatted for an error)."""
    sequence, time, raw_event, raw_reason, key_id, payload, link = fields
    event = _EVENT_TYPES.get(raw_event)
    if event is None:
        msg = f"{_record_name(what)}: unknown event type 0x{raw_event:02x}"
        raise DecodeError(msg)
    reason = _REASONS.get(raw_reason)
    if reason is None:
        msg = f"{_record_name(what)}: unknown reason 0x{raw_reason:02x}"
        raise DecodeError(msg)
    if sequence > MAX_SEQUENCE:
        msg = f"{_record_name(what)}: sequence 0x{NO_SEQUENCE:08x} is reserved"
        raise DecodeError(msg)
    return LogRecord(
        sequence=sequence,
        time=time,
        event=event,
        reason=reason,
        key_id=key_id,
        payload=payload,
        link=link,
    )


def _record_name(what: str | int) -> str:
    return what if isinstance(what, str) else f"log batch record {what}"


def encode_overflow_payload(first_lost: int, lost_count: int) -> bytes:
    """Payload of a ``LOG_OVERFLOW`` record: first lost sequence u32 || lost count u32."""
    _check_uint(first_lost, "first lost sequence", MAX_SEQUENCE)
    _check_uint(lost_count, "lost count", minimum=1)
    return build(
        _OVERFLOW_PAYLOAD,
        {"first_lost": first_lost, "lost_count": lost_count},
        "overflow payload",
    )


def overflow_loss(record: LogRecord) -> tuple[int, int]:
    """``(first_lost, lost_count)`` reported by a ``LOG_OVERFLOW`` record.

    Lost means evicted from the device before the gateway acknowledged it; see
    :meth:`DeviceLog.read`. A record of another type is a :class:`LocalProtocolError`, a
    zero count a :class:`DecodeError`.
    """
    _check_type(record, LogRecord, "record")
    if record.event is not EventType.LOG_OVERFLOW:
        msg = f"record {record.sequence} is {record.event.name}, not LOG_OVERFLOW"
        raise LocalProtocolError(ErrorCode.MALFORMED, msg)
    parsed = parse_exact(_OVERFLOW_PAYLOAD, record.payload, "overflow payload")
    if parsed.lost_count == 0 or parsed.first_lost > MAX_SEQUENCE:
        msg = f"overflow record {record.sequence}: no loss described"
        raise DecodeError(msg)
    return parsed.first_lost, parsed.lost_count


# --------------------------------------------------------------------------------- chain


def chain_genesis(device_id: bytes) -> bytes:
    """Chain head before a device's first record: SHA-256(context || device_id)."""
    _check_bytes(device_id, DEVICE_ID_SIZE, "device id")
    return hashlib.sha256(GENESIS_CONTEXT + device_id).digest()


def chain_next(head: bytes, record_bytes: bytes) -> bytes:
    """Chain head after a record: SHA-256(head || the record's 30 encoded bytes)."""
    _check_bytes(head, HEAD_SIZE, "chain head")
    _check_bytes(record_bytes, RECORD_SIZE, "encoded record")
    return _sha256(head + record_bytes).digest()


def records_head(start_head: bytes, records: Iterable[LogRecord]) -> bytes:
    """Chain head after ``records`` starting from ``start_head``; nothing is checked."""
    _check_bytes(start_head, HEAD_SIZE, "start head")
    head = start_head
    for record in records:
        _check_type(record, LogRecord, "record")
        head = _sha256(head + _pack_record(record)).digest()
    return head


def verify_chain(records: Sequence[LogRecord], *, start_head: bytes) -> bytes:
    """Check that ``records`` are consecutive and linked from ``start_head``; return the head.

    The same walk :func:`verify_batch` does, with the same codes and ``index`` meaning,
    but without a signed checkpoint: an alteration of the last record cannot be seen,
    and a changed link of the last record is blamed on the record before it.
    """
    _check_bytes(start_head, HEAD_SIZE, "start head")
    chain = tuple(records)
    for record in chain:
        _check_type(record, LogRecord, "record")
    if not chain:
        return start_head
    return _walk(chain, head=start_head, expected=chain[0].sequence, trusted_final=None)


# ---------------------------------------------------------------------------- checkpoint


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The device's signature over the chain head after record ``sequence`` (104 bytes).

    ``sequence`` is :data:`NO_SEQUENCE` when the checkpoint covers no record at all (the
    head is then the genesis head). ``time`` is the device clock at signing.
    """

    sequence: int
    head: bytes
    time: int
    signature: bytes

    def __post_init__(self) -> None:
        _check_uint(self.sequence, "checkpoint sequence")
        _check_bytes(self.head, HEAD_SIZE, "checkpoint head")
        _check_uint(self.time, "checkpoint time")
        _check_bytes(self.signature, SIGNATURE_SIZE, "checkpoint signature")


def _checkpoint_message(device_id: bytes, sequence: int, head: bytes, time: int) -> bytes:
    # Every caller has checked the sizes and ranges (or holds a validated Checkpoint).
    return b"".join((CHECKPOINT_CONTEXT, device_id, _U32.pack(sequence), head, _U32.pack(time)))


def sign_checkpoint(
    key: Ed25519PrivateKey,
    device_id: bytes,
    sequence: int,
    head: bytes,
    time: int,
) -> Checkpoint:
    """Sign ``head`` as the chain head after record ``sequence`` of device ``device_id``.

    The signature is Ed25519 over ``b"lockgw/log/checkpoint/v1" || device_id (8) ||
    sequence u32 || head (32) || time u32``.
    """
    _check_type(key, Ed25519PrivateKey, "signing key")
    _check_bytes(device_id, DEVICE_ID_SIZE, "device id")
    _check_uint(sequence, "checkpoint sequence")
    _check_bytes(head, HEAD_SIZE, "checkpoint head")
    _check_uint(time, "checkpoint time")
    signature = key.sign(_checkpoint_message(device_id, sequence, head, time))
    return Checkpoint(sequence=sequence, head=head, time=time, signature=signature)


def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """The 104 bytes of ``checkpoint``."""
    _check_type(checkpoint, Checkpoint, "checkpoint")
    return _pack_checkpoint(checkpoint)


def _pack_checkpoint(checkpoint: Checkpoint) -> bytes:
    return _CHECKPOINT.pack(
        checkpoint.sequence, checkpoint.head, checkpoint.time, checkpoint.signature
    )


def decode_checkpoint(data: bytes) -> Checkpoint:
    """Parse exactly 104 bytes. The signature is not checked here (see :func:`verify_batch`)."""
    raw = _wire_bytes(data, "checkpoint")
    if len(raw) != CHECKPOINT_SIZE:
        msg = f"checkpoint: {len(raw)} bytes, expected {CHECKPOINT_SIZE}"
        raise DecodeError(msg)
    return _checkpoint_from_fields(_CHECKPOINT.unpack(raw))


def _checkpoint_from_fields(fields: tuple[Any, ...]) -> Checkpoint:
    sequence, head, time, signature = fields
    return Checkpoint(sequence=sequence, head=head, time=time, signature=signature)


def _signature_error(
    checkpoint: Checkpoint, device_id: bytes, device_key: Ed25519PublicKey
) -> InvalidSignature | None:
    # Returned rather than raised so that record errors, which name an earlier index,
    # are reported first while the cause is still chained to the final error.
    message = _checkpoint_message(device_id, checkpoint.sequence, checkpoint.head, checkpoint.time)
    try:
        device_key.verify(checkpoint.signature, message)
    except InvalidSignature as exc:
        return exc
    return None


# --------------------------------------------------------------------------------- batch


@dataclass(frozen=True, slots=True)
class LogBatch:
    """What a device sends for one log read.

    ``start_sequence`` is the sequence of the first record, or of the next record to be
    written when ``records`` is empty; ``start_head`` is the chain head before the first
    record. The checkpoint covers the last record; for an empty batch it covers sequence
    ``start_sequence - 1`` with head ``start_head``, and when ``start_sequence`` is 0 (an
    empty log) its sequence is :data:`NO_SEQUENCE`, meaning "no record".

    Layout: start_sequence u32, start_head (32), count u16, count x record (30 each),
    checkpoint (104). The records are deliberately not checked for order here: that is
    the verifier's job, and it must be able to see a tampered batch.
    """

    start_sequence: int
    start_head: bytes
    records: tuple[LogRecord, ...]
    checkpoint: Checkpoint

    def __post_init__(self) -> None:
        _check_uint(self.start_sequence, "batch start sequence")
        _check_bytes(self.start_head, HEAD_SIZE, "batch start head")
        _check_type(self.records, tuple, "batch records")
        if len(self.records) > MAX_BATCH_RECORDS:
            msg = f"a batch holds at most {MAX_BATCH_RECORDS} records, got {len(self.records)}"
            raise LocalProtocolError(ErrorCode.MESSAGE_TOO_LARGE, msg)
        if not all(type(record) is LogRecord for record in self.records):
            for record in self.records:
                _check_type(record, LogRecord, "batch record")
        _check_type(self.checkpoint, Checkpoint, "batch checkpoint")


def encode_batch(batch: LogBatch) -> bytes:
    """The wire form of ``batch``."""
    _check_type(batch, LogBatch, "batch")
    header = _BATCH_HEADER.pack(batch.start_sequence, batch.start_head, len(batch.records))
    records = b"".join(map(_pack_record, batch.records))
    return header + records + _pack_checkpoint(batch.checkpoint)


def decode_batch(data: bytes) -> LogBatch:
    """Parse a batch. A count above 1000 is a :class:`DecodeError` with MESSAGE_TOO_LARGE."""
    raw = _wire_bytes(data, "log batch")
    if len(raw) < _BATCH_HEADER_SIZE:
        msg = f"log batch: {len(raw)} bytes, shorter than its {_BATCH_HEADER_SIZE}-byte header"
        raise DecodeError(msg)
    start_sequence, start_head, count = _BATCH_HEADER.unpack_from(raw)
    if count > MAX_BATCH_RECORDS:
        msg = f"log batch: {count} records, at most {MAX_BATCH_RECORDS} allowed"
        raise DecodeError(msg, ErrorCode.MESSAGE_TOO_LARGE)
    end = _BATCH_HEADER_SIZE + count * RECORD_SIZE
    if len(raw) != end + CHECKPOINT_SIZE:
        msg = f"log batch: {len(raw)} bytes, {count} records make {end + CHECKPOINT_SIZE}"
        raise DecodeError(msg)
    records = tuple(
        _record_from_fields(fields, index)
        for index, fields in enumerate(_RECORD.iter_unpack(raw[_BATCH_HEADER_SIZE:end]))
    )
    return LogBatch(
        start_sequence=start_sequence,
        start_head=start_head,
        records=records,
        checkpoint=_checkpoint_from_fields(_CHECKPOINT.unpack_from(raw, end)),
    )


def _wire_bytes(data: object, what: str) -> bytes:
    # Typed callers pass bytes, but this is the edge where peer input arrives.
    if not isinstance(data, bytes | bytearray | memoryview):
        msg = f"{what}: expected bytes, got {type(data).__name__}"
        raise DecodeError(msg)
    return bytes(data)


# ------------------------------------------------------------------------------ verifier


@dataclass(frozen=True, slots=True)
class ChainState:
    """What the verifier remembers between batches of one device.

    ``next_sequence`` is the sequence the next record must have and ``head`` the chain
    head after the last verified record.
    """

    next_sequence: int
    head: bytes

    def __post_init__(self) -> None:
        _check_uint(self.next_sequence, "next sequence")
        _check_bytes(self.head, HEAD_SIZE, "chain head")

    @classmethod
    def genesis(cls, device_id: bytes) -> ChainState:
        """The state before a device's first record."""
        return cls(next_sequence=0, head=chain_genesis(device_id))


@dataclass(frozen=True, slots=True)
class Gap:
    """Records ``first_missing .. first_missing + count - 1`` that never arrived."""

    first_missing: int
    count: int

    def __post_init__(self) -> None:
        _check_uint(self.first_missing, "first missing sequence", MAX_SEQUENCE)
        _check_uint(self.count, "missing count", minimum=1)


@dataclass(frozen=True, slots=True)
class VerifiedBatch:
    """A batch that verified: its records, its checkpoint, the new state and any gap.

    ``gap`` is set only when :func:`verify_batch` was called with ``allow_gap=True`` and
    records before the batch were lost; the caller must raise an alarm for it.
    """

    records: tuple[LogRecord, ...]
    checkpoint: Checkpoint
    state: ChainState
    gap: Gap | None


def verify_batch(
    batch: LogBatch,
    *,
    device_id: bytes,
    device_key: Ed25519PublicKey,
    state: ChainState,
    allow_gap: bool = False,
) -> VerifiedBatch:
    """Accept ``batch`` as the continuation of ``state`` or raise :class:`LogVerificationError`.

    ``index`` in the error is the position in the batch of the first bad record, which
    is also the number of records before it that verified; ``index == len(records)``
    blames the checkpoint or records missing after the last one. ``sequence`` is the
    sequence the named record carries; for the checks of the batch start (1-3) it is the
    batch's ``start_sequence``, for missing records at the end the first missing one, and
    ``None`` where the fault is the checkpoint's.

    Checks run in this order; the first that fails decides (n = number of records,
    s = ``batch.start_sequence``):

    1. ``s < state.next_sequence``: LOG_REORDER, index 0, sequence s (a replayed or
       duplicated batch).
    2. ``s > state.next_sequence``: records were lost. LOG_GAP, index 0, sequence s;
       unless ``allow_gap`` is set: then the chain is re-anchored at ``batch.start_head``
       (the checkpoint signature over the final head authenticates it transitively) and
       the result's ``gap`` names the missing records.
    3. ``s == state.next_sequence`` but ``start_head != state.head``: LOG_ALTERED, index 0,
       sequence s (a forked chain).
    4. For each record i, expecting sequence s + i and link = head before it [:8]:

       - sequence lower than expected: LOG_REORDER, index i;
       - sequence higher: LOG_REORDER, index i if the expected record appears later in
         the batch (records swapped), else LOG_GAP, index i (records deleted);
       - link mismatch: LOG_ALTERED. For i == 0 the head before it is authenticated
         (by ``state`` or, after a gap, is the batch's own anchor), so record 0 is named.
         For i > 0 either record i-1 changed (it no longer hashes to what record i
         committed to) or record i's own link changed; record i is named if putting the
         expected link back into it makes the chain continue (record i+1's link, or for
         the last record the validly signed checkpoint head, matches), otherwise record
         i-1 is named. This only decides which record is named; the batch is refused
         either way.
    5. Checkpoint signature invalid: LOG_BAD_CHECKPOINT, index n, sequence None. Checked
       before the checkpoint's other fields, which are untrusted until then, so a
       checkpoint whose head (or anything else) was changed is reported here.
    6. Checkpoint covers a later sequence than the batch's last record (for an empty
       batch: than s - 1, or than "none" when s is 0): LOG_TRUNCATED, index n, sequence
       of the first missing record. Records dropped from the end of a batch look like
       this; so does a validly signed checkpoint of a later batch, and rightly so: it
       vouches for records that were not delivered.
    7. Checkpoint covers an earlier sequence (a checkpoint of an earlier batch):
       LOG_BAD_CHECKPOINT, index n, sequence None.
    8. Checkpoint head differs from the computed head: LOG_ALTERED, index n-1, the last
       record's sequence (it was altered after its link was taken, which no link can
       show); for an empty batch index 0, sequence None (the device signed a different
       head than the one the batch and state agree on).
    """
    _check_type(batch, LogBatch, "batch")
    _check_bytes(device_id, DEVICE_ID_SIZE, "device id")
    _check_type(device_key, Ed25519PublicKey, "device key")
    _check_type(state, ChainState, "chain state")

    gap = _check_start(batch, state, allow_gap=allow_gap)
    records = batch.records
    checkpoint = batch.checkpoint
    signature_error = _signature_error(checkpoint, device_id, device_key)
    # Only an authentic checkpoint for exactly the last record may settle which record
    # a link mismatch at the end of the batch blames.
    trusted_final = (
        checkpoint.head
        if signature_error is None and records and checkpoint.sequence == records[-1].sequence
        else None
    )
    head = _walk(
        records, head=batch.start_head, expected=batch.start_sequence, trusted_final=trusted_final
    )
    _check_checkpoint(batch, head, signature_error)
    next_sequence = records[-1].sequence + 1 if records else batch.start_sequence
    return VerifiedBatch(
        records=records,
        checkpoint=checkpoint,
        state=ChainState(next_sequence=next_sequence, head=head),
        gap=gap,
    )


def _check_start(batch: LogBatch, state: ChainState, *, allow_gap: bool) -> Gap | None:
    start = batch.start_sequence
    if start < state.next_sequence:
        msg = f"batch starts at {start}, records before {state.next_sequence} already verified"
        raise LogVerificationError(ErrorCode.LOG_REORDER, msg, index=0, sequence=start)
    if start > state.next_sequence:
        missing = start - state.next_sequence
        if not allow_gap:
            msg = (
                f"batch starts at {start}, expected {state.next_sequence}: "
                f"{missing} record(s) missing"
            )
            raise LogVerificationError(ErrorCode.LOG_GAP, msg, index=0, sequence=start)
        return Gap(first_missing=state.next_sequence, count=missing)
    if batch.start_head != state.head:
        msg = f"batch start head at {start} differs from the verified chain (forked)"
        raise LogVerificationError(ErrorCode.LOG_ALTERED, msg, index=0, sequence=start)
    return None


def _walk(
    records: tuple[LogRecord, ...],
    *,
    head: bytes,
    expected: int,
    trusted_final: bytes | None,
) -> bytes:
    for index, record in enumerate(records):
        if record.sequence != expected:
            raise _sequence_error(records, index, expected)
        if record.link != head[:LINK_SIZE]:
            raise _link_error(records, index, head, trusted_final)
        head = _sha256(head + _pack_record(record)).digest()
        expected += 1
    return head


def _sequence_error(
    records: tuple[LogRecord, ...], index: int, expected: int
) -> LogVerificationError:
    found = records[index].sequence
    reordered = found < expected or any(
        later.sequence == expected for later in islice(records, index + 1, None)
    )
    code = ErrorCode.LOG_REORDER if reordered else ErrorCode.LOG_GAP
    msg = f"record {index} has sequence {found}, expected {expected}"
    return LogVerificationError(code, msg, index=index, sequence=found)


def _link_error(
    records: tuple[LogRecord, ...], index: int, head: bytes, trusted_final: bytes | None
) -> LogVerificationError:
    bad = (
        index
        if index == 0 or _only_link_changed(records, index, head, trusted_final)
        else index - 1
    )
    record = records[bad]
    msg = f"record {bad} (sequence {record.sequence}) was altered: the chain breaks after it"
    if bad == index:
        msg = f"record {bad} (sequence {record.sequence}) was altered: its link is wrong"
    return LogVerificationError(ErrorCode.LOG_ALTERED, msg, index=bad, sequence=record.sequence)


def _only_link_changed(
    records: tuple[LogRecord, ...], index: int, head: bytes, trusted_final: bytes | None
) -> bool:
    # ``head`` is right (records before ``index`` verified), so if only this record's link
    # was changed, putting the right link back restores the original record and the
    # chain after it. If instead the previous record was changed, ``head`` is wrong and
    # the repaired record hashes to something no later commitment matches (but by a
    # 2**-64 chance for an 8-byte link).
    repaired = dataclasses.replace(records[index], link=head[:LINK_SIZE])
    after = hashlib.sha256(head + encode_record(repaired)).digest()
    if index + 1 < len(records):
        return records[index + 1].link == after[:LINK_SIZE]
    return trusted_final is not None and after == trusted_final


def _check_checkpoint(
    batch: LogBatch, head: bytes, signature_error: InvalidSignature | None
) -> None:
    records = batch.records
    count = len(records)
    checkpoint = batch.checkpoint
    if signature_error is not None:
        msg = "checkpoint signature does not verify with the device key"
        raise LogVerificationError(
            ErrorCode.LOG_BAD_CHECKPOINT, msg, index=count, sequence=None
        ) from signature_error
    # -1 stands for "no record" on both sides, so an empty log compares naturally.
    last = records[-1].sequence if records else batch.start_sequence - 1
    covered = -1 if checkpoint.sequence == NO_SEQUENCE else checkpoint.sequence
    if covered > last:
        msg = f"checkpoint covers sequence {covered} but the batch ends at {last}"
        raise LogVerificationError(ErrorCode.LOG_TRUNCATED, msg, index=count, sequence=last + 1)
    if covered < last:
        msg = f"checkpoint covers sequence {covered}, not the batch's last record {last}"
        raise LogVerificationError(ErrorCode.LOG_BAD_CHECKPOINT, msg, index=count, sequence=None)
    if checkpoint.head != head:
        if records:
            msg = f"last record {count - 1} (sequence {last}) was altered: signed head differs"
            raise LogVerificationError(ErrorCode.LOG_ALTERED, msg, index=count - 1, sequence=last)
        msg = "the device signed a different head than the batch starts from"
        raise LogVerificationError(ErrorCode.LOG_ALTERED, msg, index=0, sequence=None)


# ----------------------------------------------------------------------------- device


class DeviceLog:
    """The ring buffer a (simulated) device keeps until the gateway acknowledges records.

    Appending is O(1). When the buffer is full the oldest record is evicted and counted
    as lost; the next :meth:`read` logs that loss as a ``LOG_OVERFLOW`` record first, so
    the loss is itself a chained, signed event. Each retained record is kept with the
    chain head after it, so the head before any retained record (the ``start_head`` of a
    batch) is known without rehashing.
    """

    __slots__ = (
        "_base_head",
        "_capacity",
        "_device_id",
        "_entries",
        "_head",
        "_lost_count",
        "_lost_first",
        "_next_sequence",
        "_time_floor",
    )

    def __init__(self, device_id: bytes, capacity: int) -> None:
        _check_bytes(device_id, DEVICE_ID_SIZE, "device id")
        _check_uint(capacity, "log capacity", maximum=_U32_MAX, minimum=1)
        self._device_id = device_id
        self._capacity = capacity
        # (record, chain head after it), oldest first.
        self._entries: deque[tuple[LogRecord, bytes]] = deque()
        # Chain head before the oldest retained record (after the last one freed).
        self._base_head = chain_genesis(device_id)
        self._head = self._base_head
        self._next_sequence = 0
        # First sequence evicted since the last read; meaningful while _lost_count > 0.
        self._lost_first = 0
        self._lost_count = 0
        self._time_floor = 0

    @property
    def device_id(self) -> bytes:
        """The 8-byte id the chain is bound to."""
        return self._device_id

    @property
    def capacity(self) -> int:
        """Most records retained at once."""
        return self._capacity

    @property
    def next_sequence(self) -> int:
        """Sequence the next appended record gets."""
        return self._next_sequence

    @property
    def head(self) -> bytes:
        """Chain head after the newest record (the genesis head when there is none)."""
        return self._head

    @property
    def oldest_sequence(self) -> int:
        """Sequence of the oldest retained record; ``next_sequence`` when none is retained."""
        return self._entries[0][0].sequence if self._entries else self._next_sequence

    @property
    def waiting(self) -> int:
        """How many records are retained, waiting for acknowledgement."""
        return len(self._entries)

    @property
    def time_floor(self) -> int:
        """Latest record time ever written, 0 if none: the clock may never be set below it."""
        return self._time_floor

    @property
    def lost_unreported(self) -> int:
        """Records evicted since the last read, to be reported by the next one."""
        return self._lost_count

    def append(
        self,
        time: int,
        event: EventType,
        reason: Reason,
        key_id: int = 0,
        payload: bytes = b"",
    ) -> LogRecord:
        """Log an event; ``payload`` (at most 8 bytes) is zero padded.

        A full buffer evicts its oldest record. A log that has used every sequence
        number refuses further records with :class:`LocalProtocolError`.
        """
        if not isinstance(payload, bytes) or len(payload) > PAYLOAD_SIZE:
            msg = f"record payload must be at most {PAYLOAD_SIZE} bytes"
            raise LocalProtocolError(ErrorCode.MALFORMED, msg)
        if self._next_sequence > MAX_SEQUENCE:
            msg = "the log has used every sequence number"
            raise LocalProtocolError(ErrorCode.INTERNAL, msg)
        # Built (and so validated) before anything is evicted: a bad call changes nothing.
        record = LogRecord(
            sequence=self._next_sequence,
            time=time,
            event=event,
            reason=reason,
            key_id=key_id,
            payload=payload.ljust(PAYLOAD_SIZE, b"\x00"),
            link=self._head[:LINK_SIZE],
        )
        if len(self._entries) >= self._capacity:
            self._evict_oldest()
        self._head = hashlib.sha256(self._head + encode_record(record)).digest()
        self._entries.append((record, self._head))
        self._next_sequence += 1
        self._time_floor = max(self._time_floor, time)
        return record

    def _evict_oldest(self) -> None:
        record, head_after = self._entries.popleft()
        self._base_head = head_after
        if self._lost_count == 0:
            self._lost_first = record.sequence
        self._lost_count += 1

    def read(
        self,
        from_sequence: int,
        max_records: int,
        *,
        key: Ed25519PrivateKey,
        now: int,
    ) -> LogBatch:
        """Answer a log read: up to ``max_records`` (1..1000) records from ``from_sequence``.

        If records were evicted since the last read, a ``LOG_OVERFLOW`` record (reason
        NONE, payload = first lost sequence u32 || lost count u32, time ``now``) is
        appended first; if the buffer is full, making room for it evicts one more
        record, which that report already counts. "Lost" means evicted before
        acknowledgement: a record delivered by an earlier read whose acknowledgement had
        not yet arrived counts too, and with acknowledgements in between the lost
        sequences need not be contiguous.

        A ``from_sequence`` older than the oldest retained record reads from the oldest
        retained one (the verifier then sees the gap). A ``from_sequence`` beyond the
        next sequence, or a ``max_records`` out of range, is the peer's error:
        :class:`RemoteProtocolError` with LOG_CURSOR_INVALID or MALFORMED. The checkpoint
        is signed with ``key`` at time ``now`` over the last returned record.
        """
        if (
            isinstance(from_sequence, bool)
            or not isinstance(from_sequence, int)
            or not 0 <= from_sequence <= self._next_sequence
        ):
            msg = f"read from {from_sequence!r}, but the next record is {self._next_sequence}"
            raise RemoteProtocolError(ErrorCode.LOG_CURSOR_INVALID, msg)
        if (
            isinstance(max_records, bool)
            or not isinstance(max_records, int)
            or not 1 <= max_records <= MAX_BATCH_RECORDS
        ):
            msg = f"read of {max_records!r} records, must be 1..{MAX_BATCH_RECORDS}"
            raise RemoteProtocolError(ErrorCode.MALFORMED, msg)
        _check_type(key, Ed25519PrivateKey, "signing key")
        _check_uint(now, "read time")

        if self._lost_count:
            self._report_loss(now)

        oldest = self.oldest_sequence
        start = max(from_sequence, oldest)
        offset = start - oldest
        start_head = self._base_head if offset == 0 else self._entries[offset - 1][1]
        selected = list(islice(self._entries, offset, offset + max_records))
        if selected:
            last_record, last_head = selected[-1]
            covered, covered_head = last_record.sequence, last_head
        else:
            covered = start - 1 if start > 0 else NO_SEQUENCE
            covered_head = start_head
        checkpoint = sign_checkpoint(key, self._device_id, covered, covered_head, now)
        return LogBatch(
            start_sequence=start,
            start_head=start_head,
            records=tuple(record for record, _ in selected),
            checkpoint=checkpoint,
        )

    def _report_loss(self, now: int) -> None:
        if len(self._entries) >= self._capacity:
            self._evict_oldest()
        payload = encode_overflow_payload(self._lost_first, self._lost_count)
        self.append(now, EventType.LOG_OVERFLOW, Reason.NONE, 0, payload)
        self._lost_first = 0
        self._lost_count = 0

    def acknowledge(self, up_to_sequence: int) -> int:
        """Free the records up to and including ``up_to_sequence``; return how many.

        Acknowledging what is already freed is a no-op; acknowledging beyond the newest
        record is the peer's error (:class:`RemoteProtocolError`, LOG_CURSOR_INVALID).
        """
        if (
            isinstance(up_to_sequence, bool)
            or not isinstance(up_to_sequence, int)
            or not 0 <= up_to_sequence < self._next_sequence
        ):
            newest = self._next_sequence - 1
            msg = f"acknowledge up to {up_to_sequence!r}, but the newest record is {newest}"
            raise RemoteProtocolError(ErrorCode.LOG_CURSOR_INVALID, msg)
        freed = 0
        while self._entries and self._entries[0][0].sequence <= up_to_sequence:
            _, self._base_head = self._entries.popleft()
            freed += 1
        return freed

    def to_state(self) -> dict[str, object]:
        """A JSON-friendly snapshot (bytes as lower-case hex) for :meth:`from_state`."""
        return {
            "version": _STATE_VERSION,
            "device_id": self._device_id.hex(),
            "capacity": self._capacity,
            "next_sequence": self._next_sequence,
            "head": self._head.hex(),
            "base_head": self._base_head.hex(),
            "records": [encode_record(record).hex() for record, _ in self._entries],
            "lost_first": self._lost_first if self._lost_count else None,
            "lost_count": self._lost_count,
            "time_floor": self._time_floor,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, object]) -> DeviceLog:
        """Restore a log saved by :meth:`to_state`.

        The retained records are re-chained and every field cross-checked, so a damaged
        or edited state file is a :class:`LocalProtocolError`, never a log that would
        produce batches a verifier rejects later.
        """
        try:
            return cls._from_state(state)
        except LocalProtocolError:
            raise
        except ProtocolError as exc:
            msg = f"device log state: {exc.message}"
            raise LocalProtocolError(ErrorCode.MALFORMED, msg) from exc

    @classmethod
    def _from_state(cls, state: Mapping[str, object]) -> DeviceLog:
        _check_type(state, Mapping, "device log state")
        if _state_field(state, "version") != _STATE_VERSION:
            _bad_state("unsupported version")
        log = cls(_state_hex(state, "device_id", DEVICE_ID_SIZE), _state_int(state, "capacity"))
        raw_records = _state_field(state, "records")
        if not isinstance(raw_records, list) or len(raw_records) > log._capacity:
            _bad_state("records must be a list no longer than the capacity")
        next_sequence = _state_int(state, "next_sequence", MAX_SEQUENCE + 1)
        base_head = _state_hex(state, "base_head", HEAD_SIZE)
        if next_sequence == 0 and base_head != log._base_head:
            _bad_state("an empty log must start at the genesis head")

        head = base_head
        expected = next_sequence - len(raw_records)
        for position, text in enumerate(raw_records):
            if not isinstance(text, str):
                _bad_state(f"record {position} is not a hex string")
            record = decode_record(_hex(text, f"record {position}"))
            if record.sequence != expected or record.link != head[:LINK_SIZE]:
                _bad_state(f"record {position} does not continue the chain")
            head = hashlib.sha256(head + encode_record(record)).digest()
            log._entries.append((record, head))
            expected += 1
        if _state_hex(state, "head", HEAD_SIZE) != head:
            _bad_state("head does not match the records")

        lost_count = _state_int(state, "lost_count")
        lost_first = _state_field(state, "lost_first")
        oldest = next_sequence - len(raw_records)
        if lost_count == 0:
            if lost_first is not None:
                _bad_state("lost_first without a lost count")
        else:
            first = _state_int(state, "lost_first", MAX_SEQUENCE)
            if first + lost_count > oldest:
                _bad_state("lost records must precede the retained ones")
            log._lost_first = first
        time_floor = _state_int(state, "time_floor")
        if any(record.time > time_floor for record, _ in log._entries):
            _bad_state("time_floor is below a retained record's time")

        log._base_head = base_head
        log._head = head
        log._next_sequence = next_sequence
        log._lost_count = lost_count
        log._time_floor = time_floor
        return log


def _bad_state(problem: str) -> NoReturn:
    msg = f"device log state: {problem}"
    raise LocalProtocolError(ErrorCode.MALFORMED, msg)


def _state_field(state: Mapping[str, object], name: str) -> object:
    if name not in state:
        _bad_state(f"missing {name!r}")
    return state[name]


def _state_int(state: Mapping[str, object], name: str, maximum: int = _U32_MAX) -> int:
    value = _state_field(state, name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        _bad_state(f"{name} must be an integer in 0..{maximum}")
    return value


def _state_hex(state: Mapping[str, object], name: str, size: int) -> bytes:
    value = _state_field(state, name)
    if not isinstance(value, str):
        _bad_state(f"{name} is not a hex string")
    raw = _hex(value, name)
    _check_bytes(raw, size, name)
    return raw


def _hex(text: str, what: str) -> bytes:
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        msg = f"device log state: {what} is not hex"
        raise LocalProtocolError(ErrorCode.MALFORMED, msg) from exc
