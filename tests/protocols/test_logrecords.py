"""Tests of protocols.logrecords: the tamper-evident event log and its verifier."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.enums import EventType, Reason
from protocols.errors import (
    DecodeError,
    ErrorCode,
    LocalProtocolError,
    LogVerificationError,
    RemoteProtocolError,
)
from protocols.logrecords import (
    CHECKPOINT_SIZE,
    MAX_BATCH_RECORDS,
    MAX_SEQUENCE,
    NO_SEQUENCE,
    RECORD_SIZE,
    ChainState,
    DeviceLog,
    Gap,
    LogBatch,
    LogRecord,
    VerifiedBatch,
    chain_genesis,
    chain_next,
    decode_batch,
    decode_checkpoint,
    decode_record,
    encode_batch,
    encode_checkpoint,
    encode_overflow_payload,
    encode_record,
    overflow_loss,
    records_head,
    sign_checkpoint,
    verify_batch,
    verify_chain,
)

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PUBLIC = KEY.public_key()
DEVICE_ID = bytes.fromhex("4c4f434b00000001")
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
OTHER_DEVICE_ID = bytes.fromhex("4c4f434b00000002")
T0 = 1_700_000_000

# The worked example: the first record of device 4c4f434b00000001, and the checkpoint
# over it signed with the key bytes(range(32)) (Ed25519 signatures are deterministic).
GENESIS_HEX = "590f37777221dc950d7a8681f6247b2b7b038dac57a1bb56c4c80fdffb93d5e6"
RECORD_HEX = "000000006553f1000201000123450300000000000000590f37777221dc95"
HEAD_HEX = "5a4a86f9638d9e7af0318498d8c9fc7cb4088d39e603bbda6078c85a37a2f872"
CHECKPOINT_HEX = (
    "00000000"
    "5a4a86f9638d9e7af0318498d8c9fc7cb4088d39e603bbda6078c85a37a2f872"
    "6553f13c"
    "7d0b24e176c96006fa767f025dd9d58d46a748a0fe74283ee62c05e039a2c131"
    "d3b1f566a5f3e98c61a2797931ae5b3c23053298ee930c0fee7a07fc602ed80b"
)

# Batch layout offsets, written out so the tests do not just mirror the implementation.
HEADER_SIZE = 4 + 32 + 2
EVENT_OFFSET = 8
REASON_OFFSET = 9

EVENTS = list(EventType)
REASONS = list(Reason)
HYPOTHESIS = settings(max_examples=200, deadline=None)


def golden_record() -> LogRecord:
    return LogRecord(
        sequence=0,
        time=T0,
        event=EventType.ACCESS_GRANTED,
        reason=Reason.VALID_KEY,
        key_id=0x12345,
        payload=b"\x03" + bytes(7),
        link=bytes.fromhex(GENESIS_HEX)[:8],
    )


def verify(batch: LogBatch, state: ChainState, *, allow_gap: bool = False) -> VerifiedBatch:
    return verify_batch(
        batch, device_id=DEVICE_ID, device_key=PUBLIC, state=state, allow_gap=allow_gap
    )


def refused(batch: LogBatch, state: ChainState, *, allow_gap: bool = False) -> LogVerificationError:
    with pytest.raises(LogVerificationError) as info:
        verify(batch, state, allow_gap=allow_gap)
    return info.value


Outcome = tuple[ErrorCode, int, int | None]
"""What a refusal says: code, index and sequence."""


def outcome(error: LogVerificationError) -> Outcome:
    return error.code, error.index, error.sequence


def fill(log: DeviceLog, count: int, start_time: int = T0) -> list[LogRecord]:
    """Append ``count`` varied records."""
    return [
        log.append(
            start_time + n,
            EVENTS[n % len(EVENTS)],
            REASONS[n % len(REASONS)],
            key_id=n * 7,
            payload=n.to_bytes(2, "big"),
        )
        for n in range(count)
    ]


def flip(data: bytes, bit: int) -> bytes:
    changed = bytearray(data)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


# ------------------------------------------------------------------------- golden values


def test_genesis_is_sha256_of_context_and_device_id() -> None:
    expected = hashlib.sha256(b"lockgw/log/genesis/v1" + DEVICE_ID).digest()
    assert chain_genesis(DEVICE_ID) == expected
    assert chain_genesis(DEVICE_ID).hex() == GENESIS_HEX
    assert ChainState.genesis(DEVICE_ID) == ChainState(0, expected)


def test_golden_record() -> None:
    record = golden_record()
    assert encode_record(record).hex() == RECORD_HEX
    assert decode_record(bytes.fromhex(RECORD_HEX)) == record
    assert RECORD_SIZE == len(bytes.fromhex(RECORD_HEX)) == 30


def test_golden_chain_step() -> None:
    record_bytes = bytes.fromhex(RECORD_HEX)
    genesis = bytes.fromhex(GENESIS_HEX)
    assert chain_next(genesis, record_bytes) == hashlib.sha256(genesis + record_bytes).digest()
    assert chain_next(genesis, record_bytes).hex() == HEAD_HEX
    assert records_head(genesis, [golden_record()]).hex() == HEAD_HEX


def test_golden_checkpoint() -> None:
    head = bytes.fromhex(HEAD_HEX)
    checkpoint = sign_checkpoint(KEY, DEVICE_ID, 0, head, T0 + 60)
    assert encode_checkpoint(checkpoint).hex() == CHECKPOINT_HEX
    assert decode_checkpoint(bytes.fromhex(CHECKPOINT_HEX)) == checkpoint
    assert CHECKPOINT_SIZE == len(bytes.fromhex(CHECKPOINT_HEX)) == 104
    # The signed message, spelled out independently of the implementation.
    message = (
        b"lockgw/log/checkpoint/v1"
        + DEVICE_ID
        + (0).to_bytes(4, "big")
        + head
        + (T0 + 60).to_bytes(4, "big")
    )
    PUBLIC.verify(checkpoint.signature, message)


def test_golden_batch_verifies_and_matches_device_log() -> None:
    log = DeviceLog(DEVICE_ID, 8)
    record = log.append(T0, EventType.ACCESS_GRANTED, Reason.VALID_KEY, 0x12345, b"\x03")
    assert record == golden_record()
    batch = log.read(0, 10, key=KEY, now=T0 + 60)
    assert encode_checkpoint(batch.checkpoint).hex() == CHECKPOINT_HEX
    data = encode_batch(batch)
    assert data.hex() == "00000000" + GENESIS_HEX + "0001" + RECORD_HEX + CHECKPOINT_HEX
    result = verify(decode_batch(data), ChainState.genesis(DEVICE_ID))
    assert result.state == ChainState(1, bytes.fromhex(HEAD_HEX))
    assert result.gap is None
    assert result.records == (record,)


# ------------------------------------------------------------------------ codec refusals


def test_record_with_unknown_event_or_reason_is_a_decode_error() -> None:
    data = bytearray.fromhex(RECORD_HEX)
    for offset, value in [(EVENT_OFFSET, 0x00), (EVENT_OFFSET, 0xFF), (REASON_OFFSET, 0x7F)]:
        bad = bytearray(data)
        bad[offset] = value
        with pytest.raises(DecodeError) as info:
            decode_record(bytes(bad))
        assert info.value.code is ErrorCode.MALFORMED


def test_record_with_reserved_sequence_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="reserved"):
        decode_record(b"\xff\xff\xff\xff" + bytes.fromhex(RECORD_HEX)[4:])


@pytest.mark.parametrize("size", [0, 29, 31])
def test_record_of_wrong_size_is_a_decode_error(size: int) -> None:
    with pytest.raises(DecodeError):
        decode_record((bytes.fromhex(RECORD_HEX) * 2)[:size])


@pytest.mark.parametrize("size", [0, 103, 105])
def test_checkpoint_of_wrong_size_is_a_decode_error(size: int) -> None:
    with pytest.raises(DecodeError):
        decode_checkpoint((bytes.fromhex(CHECKPOINT_HEX) * 2)[:size])


def test_decoders_refuse_non_bytes() -> None:
    for decoder in (decode_record, decode_checkpoint, decode_batch):
        with pytest.raises(DecodeError):
            decoder("not bytes")  # type: ignore[arg-type]  # a peer-facing edge must cope


@pytest.mark.parametrize(
    "change",
    [
        {"sequence": -1},
        {"sequence": NO_SEQUENCE},
        {"sequence": True},
        {"time": 1 << 32},
        {"key_id": -1},
        {"payload": b"\x00" * 7},
        {"payload": b"\x00" * 9},
        {"link": b"\x00" * 9},
        {"event": 2},
        {"reason": 1},
    ],
)
def test_record_fields_are_validated(change: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        replace(golden_record(), **change)  # type: ignore[arg-type]  # deliberately ill-typed


@pytest.mark.parametrize(
    "change",
    [
        {"sequence": 1 << 32},
        {"head": b"\x00" * 31},
        {"time": -1},
        {"signature": b"\x00" * 63},
    ],
)
def test_checkpoint_fields_are_validated(change: dict[str, object]) -> None:
    checkpoint = decode_checkpoint(bytes.fromhex(CHECKPOINT_HEX))
    with pytest.raises(LocalProtocolError):
        replace(checkpoint, **change)  # type: ignore[arg-type]  # deliberately ill-typed


def test_batch_count_above_limit_is_refused_before_reading_records() -> None:
    # Only the header is present: reading even one record would fail as MALFORMED.
    for count in (MAX_BATCH_RECORDS + 1, 0xFFFF):
        header = (5).to_bytes(4, "big") + bytes(32) + count.to_bytes(2, "big")
        with pytest.raises(DecodeError) as info:
            decode_batch(header)
        assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE


def test_batch_of_maximum_size_round_trips() -> None:
    log = DeviceLog(DEVICE_ID, MAX_BATCH_RECORDS + 5)
    fill(log, MAX_BATCH_RECORDS + 5)
    batch = log.read(0, MAX_BATCH_RECORDS, key=KEY, now=T0 + 9999)
    assert len(batch.records) == MAX_BATCH_RECORDS
    data = encode_batch(batch)
    assert len(data) == HEADER_SIZE + MAX_BATCH_RECORDS * RECORD_SIZE + CHECKPOINT_SIZE
    assert decode_batch(data) == batch
    verify(batch, ChainState.genesis(DEVICE_ID))


def test_batch_with_too_many_records_cannot_be_built() -> None:
    record = golden_record()
    checkpoint = decode_checkpoint(bytes.fromhex(CHECKPOINT_HEX))
    with pytest.raises(LocalProtocolError) as info:
        LogBatch(0, bytes(32), (record,) * (MAX_BATCH_RECORDS + 1), checkpoint)
    assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE


def test_batch_with_trailing_or_missing_bytes_is_a_decode_error() -> None:
    log = DeviceLog(DEVICE_ID, 8)
    fill(log, 3)
    data = encode_batch(log.read(0, 3, key=KEY, now=T0))
    for bad in (data + b"\x00", data[:-1], data[:HEADER_SIZE], data[: HEADER_SIZE - 1], b""):
        with pytest.raises(DecodeError):
            decode_batch(bad)


@HYPOTHESIS
@given(data=st.binary(max_size=400))
def test_random_bytes_into_decoders_raise_only_decode_error(data: bytes) -> None:
    for decoder in (decode_record, decode_checkpoint, decode_batch):
        with contextlib.suppress(DecodeError):
            decoder(data)


@HYPOTHESIS
@given(data=st.binary(min_size=RECORD_SIZE, max_size=RECORD_SIZE))
def test_random_records_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        record = decode_record(data)
    except DecodeError:
        return
    assert encode_record(record) == data


@HYPOTHESIS
@given(
    records=st.integers(0, 4),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    cut=st.integers(0, 400),
)
def test_mangled_batches_raise_only_decode_error(
    records: int, edits: list[tuple[int, int]], cut: int
) -> None:
    log = DeviceLog(DEVICE_ID, 8)
    fill(log, records)
    data = bytearray(encode_batch(log.read(0, 8, key=KEY, now=T0)))
    for position, value in edits:
        data[position % len(data)] = value
    mangled = bytes(data[: len(data) - cut % len(data)])
    try:
        batch = decode_batch(mangled)
    except DecodeError:
        return
    assert encode_batch(batch) == mangled


def test_overflow_payload_round_trip_and_refusals() -> None:
    payload = encode_overflow_payload(7, 3)
    assert payload == bytes.fromhex("0000000700000003")
    record = replace(golden_record(), event=EventType.LOG_OVERFLOW, payload=payload)
    assert overflow_loss(record) == (7, 3)
    with pytest.raises(LocalProtocolError):
        overflow_loss(golden_record())
    with pytest.raises(DecodeError):
        overflow_loss(replace(record, payload=bytes(8)))
    with pytest.raises(LocalProtocolError):
        encode_overflow_payload(7, 0)


# ------------------------------------------------------------------------------ device


def test_device_log_properties() -> None:
    log = DeviceLog(DEVICE_ID, 4)
    assert (log.next_sequence, log.oldest_sequence, log.waiting, log.capacity) == (0, 0, 0, 4)
    assert log.head == chain_genesis(DEVICE_ID)
    assert log.time_floor == 0
    assert log.device_id == DEVICE_ID
    records = fill(log, 3, start_time=T0)
    assert [r.sequence for r in records] == [0, 1, 2]
    assert records[0].payload == b"\x00\x00" + bytes(6)
    assert (log.next_sequence, log.oldest_sequence, log.waiting) == (3, 0, 3)
    assert log.head == records_head(chain_genesis(DEVICE_ID), records)
    assert log.time_floor == T0 + 2
    # A clock that went backwards does not lower the floor.
    log.append(T0 - 100, EventType.TIME_SET, Reason.TIME_SYNC)
    assert log.time_floor == T0 + 2
    assert log.acknowledge(3) == 4
    assert (log.waiting, log.oldest_sequence, log.time_floor) == (0, 4, T0 + 2)


def test_append_refuses_long_payload_and_changes_nothing() -> None:
    log = DeviceLog(DEVICE_ID, 1)
    fill(log, 1)
    before = log.to_state()
    with pytest.raises(LocalProtocolError):
        log.append(T0, EventType.KEY_TAKEN, Reason.NONE, payload=bytes(9))
    with pytest.raises(LocalProtocolError):
        log.append(-1, EventType.KEY_TAKEN, Reason.NONE)
    assert log.to_state() == before


@pytest.mark.parametrize("capacity", [0, -1, True])
def test_device_log_refuses_bad_capacity(capacity: int) -> None:
    with pytest.raises(LocalProtocolError):
        DeviceLog(DEVICE_ID, capacity)


def test_device_log_refuses_bad_device_id() -> None:
    with pytest.raises(LocalProtocolError):
        DeviceLog(DEVICE_ID[:7], 4)


def test_read_of_empty_log_checkpoints_no_sequence() -> None:
    log = DeviceLog(DEVICE_ID, 4)
    batch = log.read(0, 10, key=KEY, now=T0)
    assert batch.records == ()
    assert batch.start_sequence == 0
    assert batch.start_head == chain_genesis(DEVICE_ID)
    assert batch.checkpoint.sequence == NO_SEQUENCE
    assert batch.checkpoint.head == chain_genesis(DEVICE_ID)
    result = verify(decode_batch(encode_batch(batch)), ChainState.genesis(DEVICE_ID))
    assert result.state == ChainState.genesis(DEVICE_ID)
    assert result.records == ()


def test_read_at_the_end_returns_empty_batch_covering_the_last_record() -> None:
    log = DeviceLog(DEVICE_ID, 8)
    fill(log, 3)
    state = verify(log.read(0, 10, key=KEY, now=T0), ChainState.genesis(DEVICE_ID)).state
    batch = log.read(3, 10, key=KEY, now=T0 + 5)
    assert (batch.start_sequence, batch.records, batch.checkpoint.sequence) == (3, (), 2)
    assert verify(batch, state).state == state


def test_read_respects_max_records_and_continues() -> None:
    log = DeviceLog(DEVICE_ID, 16)
    records = fill(log, 10)
    state = ChainState.genesis(DEVICE_ID)
    seen: list[LogRecord] = []
    for start in range(0, 10, 3):
        batch = log.read(start, 3, key=KEY, now=T0 + 100)
        result = verify(batch, state)
        seen.extend(result.records)
        state = result.state
    assert seen == records
    assert state == ChainState(10, log.head)


def test_read_cursor_and_size_refusals() -> None:
    log = DeviceLog(DEVICE_ID, 4)
    fill(log, 2)
    for cursor in (3, -1, NO_SEQUENCE):
        with pytest.raises(RemoteProtocolError) as info:
            log.read(cursor, 1, key=KEY, now=T0)
        assert info.value.code is ErrorCode.LOG_CURSOR_INVALID
    for size in (0, MAX_BATCH_RECORDS + 1):
        with pytest.raises(RemoteProtocolError) as info:
            log.read(0, size, key=KEY, now=T0)
        assert info.value.code is ErrorCode.MALFORMED


def test_acknowledge() -> None:
    log = DeviceLog(DEVICE_ID, 8)
    with pytest.raises(RemoteProtocolError) as info:
        log.acknowledge(0)  # nothing written yet
    assert info.value.code is ErrorCode.LOG_CURSOR_INVALID
    fill(log, 5)
    assert log.acknowledge(1) == 2
    assert log.acknowledge(1) == 0  # older: a no-op
    assert log.acknowledge(0) == 0
    assert log.oldest_sequence == 2
    for beyond in (5, 6, -1):
        with pytest.raises(RemoteProtocolError) as info:
            log.acknowledge(beyond)
        assert info.value.code is ErrorCode.LOG_CURSOR_INVALID
    assert log.acknowledge(4) == 3
    assert (log.waiting, log.oldest_sequence) == (0, 5)


def test_read_from_before_oldest_retained_starts_at_oldest() -> None:
    log = DeviceLog(DEVICE_ID, 8)
    records = fill(log, 6)
    log.acknowledge(2)
    batch = log.read(0, 10, key=KEY, now=T0)
    assert batch.start_sequence == 3
    assert batch.records == tuple(records[3:])
    assert batch.start_head == records_head(chain_genesis(DEVICE_ID), records[:3])
    # A verifier that had only records 0..1 sees the gap; one that had 0..2 does not.
    after_two = ChainState(2, records_head(chain_genesis(DEVICE_ID), records[:2]))
    assert outcome(refused(batch, after_two)) == (ErrorCode.LOG_GAP, 0, 3)
    after_three = ChainState(3, batch.start_head)
    assert verify(batch, after_three).state == ChainState(6, log.head)


def test_overflow_is_logged_as_an_event_and_seen_as_a_gap() -> None:
    log = DeviceLog(DEVICE_ID, 5)
    records = fill(log, 8)  # 0..2 are evicted
    assert (log.oldest_sequence, log.waiting, log.lost_unreported) == (3, 5, 3)
    batch = log.read(0, 10, key=KEY, now=T0 + 50)
    # Making room for the overflow record evicted record 3 too; the report counts it.
    assert batch.start_sequence == 4
    assert batch.records[:-1] == tuple(records[4:])
    overflow = batch.records[-1]
    assert (overflow.sequence, overflow.event, overflow.reason) == (
        8,
        EventType.LOG_OVERFLOW,
        Reason.NONE,
    )
    assert overflow.time == T0 + 50
    assert overflow.payload == bytes.fromhex("0000000000000004")
    assert overflow_loss(overflow) == (0, 4)
    assert log.lost_unreported == 0

    genesis = ChainState.genesis(DEVICE_ID)
    assert outcome(refused(batch, genesis)) == (ErrorCode.LOG_GAP, 0, 4)
    result = verify(batch, genesis, allow_gap=True)
    assert result.gap == Gap(first_missing=0, count=4)
    assert result.state == ChainState(9, log.head)

    # The loss is reported once: the next read adds no overflow record.
    again = log.read(9, 10, key=KEY, now=T0 + 60)
    assert again.records == ()
    assert verify(again, result.state).gap is None


def test_overflow_with_capacity_one() -> None:
    log = DeviceLog(DEVICE_ID, 1)
    fill(log, 3)
    batch = log.read(0, 10, key=KEY, now=T0 + 9)
    assert [r.event for r in batch.records] == [EventType.LOG_OVERFLOW]
    assert overflow_loss(batch.records[0]) == (0, 3)
    result = verify(batch, ChainState.genesis(DEVICE_ID), allow_gap=True)
    assert result.gap == Gap(0, 3)


def test_gap_accepted_for_empty_batch() -> None:
    log = DeviceLog(DEVICE_ID, 8)
    fill(log, 4)
    log.acknowledge(3)
    batch = log.read(0, 10, key=KEY, now=T0)
    assert (batch.start_sequence, batch.records) == (4, ())
    genesis = ChainState.genesis(DEVICE_ID)
    assert outcome(refused(batch, genesis)) == (ErrorCode.LOG_GAP, 0, 4)
    result = verify(batch, genesis, allow_gap=True)
    assert (result.gap, result.state) == (Gap(0, 4), ChainState(4, log.head))


@HYPOTHESIS
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 12), st.integers(1, 9), st.booleans()), min_size=1, max_size=20
    )
)
def test_round_trip_without_loss(steps: list[tuple[int, int, bool]]) -> None:
    log = DeviceLog(DEVICE_ID, 1000)
    state = ChainState.genesis(DEVICE_ID)
    written: list[LogRecord] = []
    delivered: list[LogRecord] = []
    now = T0
    for appends, max_records, acknowledge in steps:
        for _ in range(appends):
            now += 3
            written.append(log.append(now, EventType.DOOR_OPENED, Reason.MANUAL, appends))
        batch = decode_batch(
            encode_batch(log.read(state.next_sequence, max_records, key=KEY, now=now))
        )
        result = verify(batch, state)
        assert result.gap is None
        assert len(result.records) == min(max_records, len(written) - len(delivered))
        delivered.extend(result.records)
        state = result.state
        if acknowledge and state.next_sequence:
            log.acknowledge(state.next_sequence - 1)
            assert log.oldest_sequence == state.next_sequence
    assert delivered == written[: len(delivered)]
    assert log.lost_unreported == 0


@HYPOTHESIS
@given(
    capacity=st.integers(1, 10),
    steps=st.lists(
        st.tuples(st.integers(0, 15), st.integers(1, 6), st.booleans()), min_size=1, max_size=20
    ),
)
def test_round_trip_with_overflow(capacity: int, steps: list[tuple[int, int, bool]]) -> None:
    log = DeviceLog(DEVICE_ID, capacity)
    state = ChainState.genesis(DEVICE_ID)
    written: dict[int, LogRecord] = {}
    delivered: list[LogRecord] = []
    gaps: list[Gap] = []
    now = T0

    def read(max_records: int) -> VerifiedBatch:
        nonlocal state
        batch = log.read(state.next_sequence, max_records, key=KEY, now=now)
        result = verify(decode_batch(encode_batch(batch)), state, allow_gap=True)
        if result.gap is not None:
            # Without allow_gap the same batch is refused.
            assert refused(batch, state).code is ErrorCode.LOG_GAP
            gaps.append(result.gap)
        delivered.extend(result.records)
        state = result.state
        return result

    for appends, max_records, acknowledge in steps:
        for _ in range(appends):
            now += 1
            record = log.append(now, EventType.KEY_TAKEN, Reason.VALID_KEY, appends)
            written[record.sequence] = record
        read(max_records)
        if acknowledge and state.next_sequence:
            log.acknowledge(state.next_sequence - 1)
    for _ in range(3):  # drain; the last overflow record comes with the first read
        if not read(MAX_BATCH_RECORDS).records and not log.lost_unreported:
            break
    assert state == ChainState(log.next_sequence, log.head)

    # Every sequence was either delivered or reported missing, exactly once, in order.
    covered = [r.sequence for r in delivered]
    covered += [g.first_missing + n for g in gaps for n in range(g.count)]
    assert sorted(covered) == list(range(log.next_sequence))
    assert [r.sequence for r in delivered] == sorted(r.sequence for r in delivered)
    overflows = [r for r in delivered if r.event is EventType.LOG_OVERFLOW]
    for record in delivered:
        if record.event is not EventType.LOG_OVERFLOW:
            assert record == written[record.sequence]
    # A loss the verifier saw is always also logged by the device.
    if gaps:
        assert overflows
    for overflow in overflows:
        first_lost, lost_count = overflow_loss(overflow)
        assert first_lost + lost_count <= overflow.sequence


def test_state_round_trip_through_json() -> None:
    log = DeviceLog(DEVICE_ID, 4)
    fill(log, 7)  # leaves a loss unreported
    log.read(4, 2, key=KEY, now=T0 + 20)
    fill(log, 3, start_time=T0 + 30)
    log.acknowledge(8)
    state = json.loads(json.dumps(log.to_state()))
    copy = DeviceLog.from_state(state)
    assert copy.to_state() == log.to_state()
    for name in ("next_sequence", "head", "oldest_sequence", "waiting", "time_floor"):
        assert getattr(copy, name) == getattr(log, name)
    # Both continue identically (Ed25519 is deterministic, so even the signatures match).
    assert fill(copy, 6, T0 + 40) == fill(log, 6, T0 + 40)
    assert copy.read(0, 10, key=KEY, now=T0 + 99) == log.read(0, 10, key=KEY, now=T0 + 99)


def test_state_with_unreported_loss_round_trips() -> None:
    log = DeviceLog(DEVICE_ID, 2)
    fill(log, 5)
    state = log.to_state()
    assert (state["lost_first"], state["lost_count"]) == (0, 3)
    copy = DeviceLog.from_state(json.loads(json.dumps(state)))
    assert copy.read(0, 9, key=KEY, now=T0) == log.read(0, 9, key=KEY, now=T0)


def corrupt_states() -> list[tuple[str, object]]:
    return [
        ("version", 2),
        ("device_id", "00"),
        ("capacity", 1),
        ("capacity", "4"),
        ("next_sequence", 99),
        ("next_sequence", -1),
        ("head", "00" * 32),
        ("head", "zz"),
        ("base_head", "11" * 32),
        ("records", "not a list"),
        ("records", ["00" * 30, "00" * 30]),
        ("records", [5, 6]),
        ("lost_first", 5),
        ("lost_count", 2),
        ("time_floor", 0),
        ("time_floor", True),
    ]


@pytest.mark.parametrize(("field", "value"), corrupt_states())
def test_corrupt_state_is_refused(field: str, value: object) -> None:
    log = DeviceLog(DEVICE_ID, 4)
    fill(log, 2)
    state = log.to_state()
    state[field] = value
    with pytest.raises(LocalProtocolError):
        DeviceLog.from_state(state)


def test_state_with_missing_field_or_wrong_type_is_refused() -> None:
    log = DeviceLog(DEVICE_ID, 4)
    state = log.to_state()
    del state["head"]
    with pytest.raises(LocalProtocolError):
        DeviceLog.from_state(state)
    with pytest.raises(LocalProtocolError):
        DeviceLog.from_state([])  # type: ignore[arg-type]  # a state file may hold anything


def test_state_with_tampered_record_is_refused() -> None:
    log = DeviceLog(DEVICE_ID, 4)
    fill(log, 3)
    state = log.to_state()
    records = state["records"]
    assert isinstance(records, list)
    records[1] = flip(bytes.fromhex(records[1]), 60).hex()  # a bit of its time
    with pytest.raises(LocalProtocolError):
        DeviceLog.from_state(state)


def test_exhausted_log_refuses_append() -> None:
    log = DeviceLog(DEVICE_ID, 4)
    state = log.to_state() | {"next_sequence": MAX_SEQUENCE + 1, "base_head": "ab" * 32}
    state["head"] = state["base_head"]
    full = DeviceLog.from_state(state)
    with pytest.raises(LocalProtocolError):
        full.append(T0, EventType.BOOT, Reason.POWER_ON)


# ------------------------------------------------------------- verifier decision table


def batches_of(count: int, *, prefix: int = 0) -> tuple[DeviceLog, ChainState, LogBatch]:
    """A device with ``prefix`` verified records and a batch of the next ``count``."""
    log = DeviceLog(DEVICE_ID, 64)
    fill(log, prefix)
    state = ChainState(log.next_sequence, log.head)
    fill(log, count, start_time=T0 + 1000)
    return log, state, log.read(prefix, max(count, 1), key=KEY, now=T0 + 5000)


def alter(batch: LogBatch, index: int, **change: object) -> LogBatch:
    records = list(batch.records)
    records[index] = replace(records[index], **change)  # type: ignore[arg-type]  # test data
    return replace(batch, records=tuple(records))


def test_replayed_batch_is_reorder() -> None:
    _, state, batch = batches_of(3, prefix=2)
    after = verify(batch, state).state
    assert outcome(refused(batch, after)) == (ErrorCode.LOG_REORDER, 0, 2)


def test_forked_chain_is_altered_at_zero() -> None:
    _, state, batch = batches_of(3, prefix=2)
    forked = replace(state, head=bytes(32))
    assert outcome(refused(batch, forked)) == (ErrorCode.LOG_ALTERED, 0, 2)


def test_sequence_lower_than_expected_is_reorder() -> None:
    _, state, batch = batches_of(4, prefix=1)
    doubled = replace(batch, records=batch.records[:2] + batch.records[1:])
    assert outcome(refused(doubled, state)) == (ErrorCode.LOG_REORDER, 2, 2)


def test_sequence_higher_is_reorder_when_swapped_and_gap_when_deleted() -> None:
    _, state, batch = batches_of(4, prefix=1)
    r = batch.records
    swapped = replace(batch, records=(r[0], r[2], r[1], r[3]))
    assert outcome(refused(swapped, state)) == (ErrorCode.LOG_REORDER, 1, 3)
    deleted = replace(batch, records=(r[0], r[2], r[3]))
    assert outcome(refused(deleted, state)) == (ErrorCode.LOG_GAP, 1, 3)


def test_link_of_first_record_changed_names_record_zero() -> None:
    _, state, batch = batches_of(3, prefix=2)
    assert outcome(refused(alter(batch, 0, link=bytes(8)), state)) == (ErrorCode.LOG_ALTERED, 0, 2)


def test_content_change_is_blamed_on_the_record_changed() -> None:
    _, state, batch = batches_of(4)
    for index in range(4):
        tampered = alter(batch, index, key_id=0xDEAD)
        assert outcome(refused(tampered, state)) == (ErrorCode.LOG_ALTERED, index, index)


def test_link_change_is_blamed_on_the_record_changed() -> None:
    _, state, batch = batches_of(4)
    for index in range(4):
        tampered = alter(batch, index, link=bytes(8))
        assert outcome(refused(tampered, state)) == (ErrorCode.LOG_ALTERED, index, index)


def test_bad_signature_is_bad_checkpoint_even_when_head_differs() -> None:
    _, state, batch = batches_of(3)
    checkpoint = batch.checkpoint
    for bad in (
        replace(checkpoint, signature=flip(checkpoint.signature, 0)),
        replace(checkpoint, head=flip(checkpoint.head, 0)),
        replace(checkpoint, time=checkpoint.time + 1),
    ):
        error = refused(replace(batch, checkpoint=bad), state)
        assert outcome(error) == (ErrorCode.LOG_BAD_CHECKPOINT, 3, None)


def test_checkpoint_of_other_device_or_key_is_bad_checkpoint() -> None:
    _, state, batch = batches_of(3)
    cp = batch.checkpoint
    for other in (
        sign_checkpoint(OTHER_KEY, DEVICE_ID, cp.sequence, cp.head, cp.time),
        sign_checkpoint(KEY, OTHER_DEVICE_ID, cp.sequence, cp.head, cp.time),
    ):
        error = refused(replace(batch, checkpoint=other), state)
        assert outcome(error) == (ErrorCode.LOG_BAD_CHECKPOINT, 3, None)


def test_truncated_batch_is_truncated() -> None:
    _, state, batch = batches_of(3, prefix=1)
    for keep in range(3):
        short = replace(batch, records=batch.records[:keep])
        assert outcome(refused(short, state)) == (ErrorCode.LOG_TRUNCATED, keep, 1 + keep)


def test_earlier_checkpoint_is_bad_checkpoint_and_later_is_truncated() -> None:
    log, state, batch = batches_of(3, prefix=1)
    fill(log, 2)
    earlier = log.read(1, 2, key=KEY, now=T0).checkpoint
    later = log.read(1, 5, key=KEY, now=T0).checkpoint
    error = refused(replace(batch, checkpoint=earlier), state)
    assert outcome(error) == (ErrorCode.LOG_BAD_CHECKPOINT, 3, None)
    error = refused(replace(batch, checkpoint=later), state)
    assert outcome(error) == (ErrorCode.LOG_TRUNCATED, 3, 4)


def test_validly_signed_other_head_is_altered_at_last_record() -> None:
    # What a device that forked its own chain would send: a genuine signature over a head
    # the delivered records do not produce.
    _, state, batch = batches_of(3)
    cp = batch.checkpoint
    other = sign_checkpoint(KEY, DEVICE_ID, cp.sequence, bytes(32), cp.time)
    error = refused(replace(batch, checkpoint=other), state)
    assert outcome(error) == (ErrorCode.LOG_ALTERED, 2, 2)


def test_empty_batch_with_other_signed_head_is_altered() -> None:
    log, state, _ = batches_of(0, prefix=2)
    batch = log.read(2, 5, key=KEY, now=T0)
    other = sign_checkpoint(KEY, DEVICE_ID, 1, bytes(32), T0)
    error = refused(replace(batch, checkpoint=other), state)
    assert outcome(error) == (ErrorCode.LOG_ALTERED, 0, None)


def test_empty_batch_with_checkpoint_of_other_sequence() -> None:
    log, state, _ = batches_of(0, prefix=2)
    batch = log.read(2, 5, key=KEY, now=T0)
    cp = batch.checkpoint
    for sequence, code in [
        (0, ErrorCode.LOG_BAD_CHECKPOINT),
        (NO_SEQUENCE, ErrorCode.LOG_BAD_CHECKPOINT),
    ]:
        other = sign_checkpoint(KEY, DEVICE_ID, sequence, cp.head, cp.time)
        assert refused(replace(batch, checkpoint=other), state).code is code
    later = sign_checkpoint(KEY, DEVICE_ID, 2, cp.head, cp.time)
    error = refused(replace(batch, checkpoint=later), state)
    assert outcome(error) == (ErrorCode.LOG_TRUNCATED, 0, 2)


def test_gap_anchor_is_authenticated_by_the_checkpoint() -> None:
    # After a gap the start head is taken from the batch; a forged one cannot verify.
    _, _, batch = batches_of(3, prefix=2)
    genesis = ChainState.genesis(DEVICE_ID)
    assert verify(batch, genesis, allow_gap=True).gap == Gap(0, 2)
    forged = replace(batch, start_head=bytes(32))
    assert outcome(refused(forged, genesis, allow_gap=True)) == (ErrorCode.LOG_ALTERED, 0, 2)


def test_verify_batch_refuses_misuse() -> None:
    _, state, batch = batches_of(1)
    with pytest.raises(LocalProtocolError):
        verify_batch(batch, device_id=DEVICE_ID[:4], device_key=PUBLIC, state=state)
    with pytest.raises(LocalProtocolError):
        verify_batch(batch, device_id=DEVICE_ID, device_key=KEY, state=state)  # type: ignore[arg-type]  # private key by mistake


def test_verify_chain() -> None:
    log = DeviceLog(DEVICE_ID, 8)
    records = fill(log, 5)
    genesis = chain_genesis(DEVICE_ID)
    assert verify_chain(records, start_head=genesis) == log.head
    assert verify_chain(records[2:], start_head=records_head(genesis, records[:2])) == log.head
    assert verify_chain([], start_head=genesis) == genesis
    tampered = [*records[:2], replace(records[2], time=1), *records[3:]]
    with pytest.raises(LogVerificationError) as info:
        verify_chain(tampered, start_head=genesis)
    assert outcome(info.value) == (ErrorCode.LOG_ALTERED, 2, 2)
    with pytest.raises(LogVerificationError) as info:
        verify_chain([records[0], records[2]], start_head=genesis)
    assert outcome(info.value) == (ErrorCode.LOG_GAP, 1, 2)


# -------------------------------------------------- every tampering is detected (hypothesis)


@dataclass(frozen=True)
class Scenario:
    log: DeviceLog
    state: ChainState
    batch: LogBatch

    @property
    def start(self) -> int:
        return self.batch.start_sequence

    @property
    def count(self) -> int:
        return len(self.batch.records)


@st.composite
def scenarios(draw: st.DrawFn, min_records: int = 1, extra: int = 0) -> Scenario:
    """A device with some verified records, then a batch of varied new records."""
    prefix = draw(st.integers(0, 4))
    count = draw(st.integers(min_records, 8))
    log = DeviceLog(DEVICE_ID, 64)
    time = draw(st.integers(0, 2**31))

    def append_some(how_many: int) -> None:
        nonlocal time
        for _ in range(how_many):
            time += draw(st.integers(0, 3600))
            log.append(
                time,
                draw(st.sampled_from(EVENTS)),
                draw(st.sampled_from(REASONS)),
                key_id=draw(st.integers(0, 2**32 - 1)),
                payload=draw(st.binary(max_size=8)),
            )

    append_some(prefix)
    state = ChainState(log.next_sequence, log.head)
    append_some(count + extra)
    return Scenario(log, state, log.read(prefix, max(count, 1), key=KEY, now=time + 1))


@HYPOTHESIS
@given(scenario=scenarios(), data=st.data())
def test_any_deleted_record_is_detected(scenario: Scenario, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, scenario.count - 1))
    records = scenario.batch.records
    tampered = replace(scenario.batch, records=records[:index] + records[index + 1 :])
    error = refused(tampered, scenario.state)
    if index == scenario.count - 1:
        assert outcome(error) == (ErrorCode.LOG_TRUNCATED, index, scenario.start + index)
    else:
        assert outcome(error) == (ErrorCode.LOG_GAP, index, scenario.start + index + 1)


@HYPOTHESIS
@given(scenario=scenarios(min_records=2), data=st.data())
def test_any_swap_is_detected(scenario: Scenario, data: st.DataObject) -> None:
    first = data.draw(st.integers(0, scenario.count - 2))
    second = data.draw(st.integers(first + 1, scenario.count - 1))
    records = list(scenario.batch.records)
    records[first], records[second] = records[second], records[first]
    error = refused(replace(scenario.batch, records=tuple(records)), scenario.state)
    assert outcome(error) == (ErrorCode.LOG_REORDER, first, scenario.start + second)


@HYPOTHESIS
@given(scenario=scenarios(), data=st.data())
def test_any_duplicated_record_is_detected(scenario: Scenario, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, scenario.count - 1))
    records = scenario.batch.records
    tampered = replace(scenario.batch, records=records[: index + 1] + records[index:])
    error = refused(tampered, scenario.state)
    assert outcome(error) == (ErrorCode.LOG_REORDER, index + 1, scenario.start + index)


@HYPOTHESIS
@given(scenario=scenarios(), data=st.data())
def test_any_truncation_is_detected(scenario: Scenario, data: st.DataObject) -> None:
    keep = data.draw(st.integers(0, scenario.count - 1))
    tampered = replace(scenario.batch, records=scenario.batch.records[:keep])
    error = refused(tampered, scenario.state)
    assert outcome(error) == (ErrorCode.LOG_TRUNCATED, keep, scenario.start + keep)


@HYPOTHESIS
@given(scenario=scenarios(extra=2), data=st.data())
def test_any_other_batch_checkpoint_is_detected(scenario: Scenario, data: st.DataObject) -> None:
    log, start, count = scenario.log, scenario.start, scenario.count
    kind = data.draw(st.sampled_from(["earlier", "later", "other device", "same end"]))
    expected: Outcome | None
    if kind == "earlier":
        # A batch of this device that ends before this one, possibly the empty log's.
        covered = data.draw(st.integers(0, start + count - 1))
        if covered:
            other = log.read(0, covered, key=KEY, now=1).checkpoint
        else:
            other = sign_checkpoint(KEY, DEVICE_ID, NO_SEQUENCE, chain_genesis(DEVICE_ID), 1)
        expected = (ErrorCode.LOG_BAD_CHECKPOINT, count, None)
    elif kind == "later":
        more = data.draw(st.integers(1, 2))
        other = log.read(start, count + more, key=KEY, now=1).checkpoint
        expected = (ErrorCode.LOG_TRUNCATED, count, start + count)
    elif kind == "other device":
        twin = DeviceLog(OTHER_DEVICE_ID, 64)
        fill(twin, start + count)
        other = twin.read(start, count, key=OTHER_KEY, now=1).checkpoint
        expected = (ErrorCode.LOG_BAD_CHECKPOINT, count, None)
    else:
        # A batch from another start ending at the same record carries a checkpoint over
        # the same head: not tampering, and accepted.
        begin = data.draw(st.integers(0, start + count - 1))
        other = log.read(begin, start + count - begin, key=KEY, now=1).checkpoint
        expected = None
    tampered = replace(scenario.batch, checkpoint=other)
    if expected is None:
        assert (
            verify(tampered, scenario.state).state == verify(scenario.batch, scenario.state).state
        )
    else:
        assert outcome(refused(tampered, scenario.state)) == expected


def expected_for_flip(scenario: Scenario, flipped: bytes, bit: int) -> Outcome | None:
    """What flipping ``bit`` of the encoded batch must be refused as; None: undecodable."""
    offset = bit // 8
    start, count = scenario.start, scenario.count
    checkpoint_offset = HEADER_SIZE + count * RECORD_SIZE
    if offset < 4:
        new_start = int.from_bytes(flipped[:4], "big")
        code = ErrorCode.LOG_GAP if new_start > start else ErrorCode.LOG_REORDER
        return (code, 0, new_start)
    if offset < 36:
        return (ErrorCode.LOG_ALTERED, 0, start)
    if offset < HEADER_SIZE:
        return None  # the count: the length no longer matches
    if offset >= checkpoint_offset:
        return (ErrorCode.LOG_BAD_CHECKPOINT, count, None)
    index, field = divmod(offset - HEADER_SIZE, RECORD_SIZE)
    base = HEADER_SIZE + index * RECORD_SIZE
    if field < 4:
        sequence = int.from_bytes(flipped[base : base + 4], "big")
        if sequence == NO_SEQUENCE:
            return None
        code = ErrorCode.LOG_GAP if sequence > start + index else ErrorCode.LOG_REORDER
        return (code, index, sequence)
    if field == EVENT_OFFSET and flipped[offset] not in set(EventType):
        return None
    if field == REASON_OFFSET and flipped[offset] not in set(Reason):
        return None
    return (ErrorCode.LOG_ALTERED, index, start + index)


@HYPOTHESIS
@given(scenario=scenarios(min_records=0), data=st.data())
def test_any_single_bit_flip_is_detected(scenario: Scenario, data: st.DataObject) -> None:
    encoded = encode_batch(scenario.batch)
    bit = data.draw(st.integers(0, len(encoded) * 8 - 1))
    flipped = flip(encoded, bit)
    expected = expected_for_flip(scenario, flipped, bit)
    if expected is None:
        with pytest.raises(DecodeError):
            decode_batch(flipped)
        return
    tampered = decode_batch(flipped)
    assert outcome(refused(tampered, scenario.state)) == expected


@HYPOTHESIS
@given(scenario=scenarios(), data=st.data())
def test_any_single_bit_flip_of_a_record_is_named(scenario: Scenario, data: st.DataObject) -> None:
    # The same at the record level, over every bit of one chosen record.
    index = data.draw(st.integers(0, scenario.count - 1))
    bit = data.draw(st.integers(32, RECORD_SIZE * 8 - 1))  # all but the sequence
    record_bytes = flip(encode_record(scenario.batch.records[index]), bit)
    try:
        record = decode_record(record_bytes)
    except DecodeError:
        assert bit // 8 in (EVENT_OFFSET, REASON_OFFSET)
        return
    records = scenario.batch.records
    tampered = replace(scenario.batch, records=(*records[:index], record, *records[index + 1 :]))
    error = refused(tampered, scenario.state)
    assert outcome(error) == (ErrorCode.LOG_ALTERED, index, record.sequence)
