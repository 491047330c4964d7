"""Session messages: every type round-trips; bad bytes give typed errors only."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import PROTOCOL_VERSION
from protocols.enums import AlarmFlags, DeviceKind
from protocols.errors import DecodeError, ErrorCode, LocalProtocolError
from protocols.messages import (
    MAX_ERROR_TEXT,
    AuthUpdate,
    Decommission,
    Decommissioned,
    DeviceHello,
    DeviceStatus,
    DoorState,
    ErrorReply,
    GatewayHello,
    LockState,
    LogAck,
    LogAcked,
    LogBatchMessage,
    LogRead,
    Message,
    Provision,
    Provisioned,
    Status,
    StatusRequest,
    TimeSync,
    TimeSyncResult,
    decode_message,
    encode_message,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, 2**64 - 1)
ids = st.binary(min_size=8, max_size=8)
keys = st.binary(min_size=32, max_size=32)
blobs = st.binary(max_size=2000)
alarms = st.integers(0, 0x7F).map(AlarmFlags)

statuses = st.builds(
    DeviceStatus,
    battery_percent=u8,
    door=st.sampled_from(DoorState),
    lock=st.sampled_from(LockState),
    alarms=alarms,
    clock=u32,
    time_floor=u32,
    access_version=u32,
    revocation_version=u32,
    next_sequence=u32,
    oldest_sequence=u32,
    records_waiting=u32,
)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(
        DeviceHello,
        protocol_version=st.just(PROTOCOL_VERSION),
        kind=st.sampled_from(DeviceKind),
        device_id=ids,
        signing_key=keys,
        binding_signature=st.binary(min_size=64, max_size=64),
        paired=st.booleans(),
        site_id=u32,
        firmware=st.text(max_size=40).filter(lambda text: len(text.encode()) <= 255),
        status=statuses,
    ),
    st.builds(GatewayHello, certificate=blobs, gateway_time=u32),
    st.builds(TimeSync, gateway_time_ms=u64),
    st.builds(TimeSyncResult, device_time_before_ms=u64, device_time_after_ms=u64),
    st.just(StatusRequest()),
    st.builds(Status, status=statuses),
    st.builds(LogRead, from_sequence=u32, max_records=u16),
    st.builds(LogBatchMessage, batch=blobs),
    st.builds(LogAck, up_to_sequence=u32),
    st.builds(LogAcked, up_to_sequence=u32, freed=u32),
    st.builds(AuthUpdate, update=blobs),
    st.builds(Provision, device_id=ids, authority_key=keys, site_id=u32, time=u32),
    st.builds(Provisioned, device_id=ids),
    st.builds(Decommission, device_id=ids),
    st.builds(Decommissioned, device_id=ids),
    st.builds(
        ErrorReply,
        code=st.sampled_from(ErrorCode),
        message=st.text(max_size=60).filter(lambda text: len(text.encode()) <= MAX_ERROR_TEXT),
    ),
)


@settings(max_examples=300)
@given(request_id=u16, message=messages)
def test_every_message_round_trips(request_id: int, message: Message) -> None:
    assert decode_message(encode_message(request_id, message)) == (request_id, message)


@settings(max_examples=500)
@given(st.binary(max_size=300))
def test_random_bytes_decode_canonically_or_raise_decode_error(data: bytes) -> None:
    try:
        request_id, message = decode_message(data)
    except DecodeError:
        return
    assert encode_message(request_id, message) == data  # one encoding per value


@settings(max_examples=200)
@given(request_id=u16, message=messages, data=st.data())
def test_truncated_or_extended_messages_are_refused(
    request_id: int, message: Message, data: st.DataObject
) -> None:
    encoded = encode_message(request_id, message)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(DecodeError):
        decode_message(encoded[:cut])
    with pytest.raises(DecodeError):
        decode_message(encoded + b"\x00")


def test_golden_bytes_of_a_log_read() -> None:
    assert encode_message(0x0102, LogRead(from_sequence=7, max_records=500)).hex() == (
        "2001020000000701f4"
    )


def test_unknown_type_is_its_own_code() -> None:
    with pytest.raises(DecodeError) as caught:
        decode_message(b"\x55\x00\x01")
    assert caught.value.code is ErrorCode.UNKNOWN_MESSAGE


def test_unknown_enum_values_are_refused() -> None:
    status = DeviceStatus(
        battery_percent=50,
        door=DoorState.OPEN,
        lock=LockState.UNLOCKED,
        alarms=AlarmFlags.TAMPER,
        clock=1,
        time_floor=1,
        access_version=1,
        revocation_version=1,
        next_sequence=1,
        oldest_sequence=0,
        records_waiting=1,
    )
    good = bytearray(encode_message(1, Status(status)))
    for offset, value in [(4, 9), (5, 9), (6, 0x80)]:  # door, lock, alarm bits
        bad = bytearray(good)
        bad[offset] = value
        with pytest.raises(DecodeError):
            decode_message(bytes(bad))
    bad_error = encode_message(1, ErrorReply(ErrorCode.BUSY, ""))
    with pytest.raises(DecodeError):
        decode_message(bad_error[:3] + b"\x77" + bad_error[4:])


def test_other_protocol_versions_are_refused() -> None:
    hello = DeviceHello(
        protocol_version=2,
        kind=DeviceKind.KEY_SAFE,
        device_id=bytes(8),
        signing_key=bytes(32),
        binding_signature=bytes(64),
        paired=False,
        site_id=0,
        firmware="",
        status=DeviceStatus(0, DoorState.UNKNOWN, LockState.UNKNOWN, AlarmFlags.NONE, *[0] * 7),
    )
    with pytest.raises(DecodeError) as caught:
        decode_message(encode_message(0, hello))
    assert caught.value.code is ErrorCode.UNSUPPORTED_VERSION


def test_error_text_is_bounded() -> None:
    long = ErrorReply(ErrorCode.INTERNAL, "ä" * 500)
    _, decoded = decode_message(encode_message(0, long))
    assert isinstance(decoded, ErrorReply)
    assert len(decoded.message.encode()) <= MAX_ERROR_TEXT
    assert decoded.code is ErrorCode.INTERNAL


def test_values_that_do_not_fit_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(70_000, StatusRequest())
    with pytest.raises(LocalProtocolError):
        encode_message(1, LogRead(from_sequence=-1, max_records=1))
    with pytest.raises(LocalProtocolError):
        encode_message(1, Provision(device_id=b"short", authority_key=bytes(32), site_id=1, time=1))
