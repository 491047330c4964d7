"""Pairing codes and label payloads; device identity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import DecodeError, ErrorCode, PairingCodeError, RemoteProtocolError
from protocols.identity import (
    DeviceIdentity,
    device_id_from_key,
    format_device_id,
    parse_device_id,
    verify_binding,
)
from protocols.pairing import (
    CODE_LENGTH,
    SECRET_BITS,
    LabelPayload,
    PairingCode,
    parse_code_or_label,
)

secrets = st.binary(min_size=SECRET_BITS // 8, max_size=SECRET_BITS // 8).map(PairingCode)


def test_code_carries_at_least_80_bits() -> None:
    assert SECRET_BITS >= 80
    text = PairingCode.generate().text()
    assert len(text.replace("-", "")) == CODE_LENGTH
    assert [len(group) for group in text.split("-")] == [4] * (CODE_LENGTH // 4)


def test_golden_code_text() -> None:
    code = PairingCode(bytes(range(10)))
    assert code.text() == "000G-40R4-0M30-E209-75QC"
    assert PairingCode.parse("000g 40r4 0m30 e209 75qc") == code


@settings(max_examples=200)
@given(secrets)
def test_code_round_trips_through_text_and_label(code: PairingCode) -> None:
    assert PairingCode.parse(code.text()) == code
    label = LabelPayload(bytes(range(8)), code)
    assert LabelPayload.parse(label.text()) == label
    assert parse_code_or_label(label.text()) == (code, bytes(range(8)))
    assert parse_code_or_label(code.text().lower()) == (code, None)


def test_look_alike_characters_are_folded() -> None:
    code = PairingCode(bytes(10))
    text = code.text()  # all zeros but the check
    assert PairingCode.parse(text.replace("0", "O")) == code
    assert PairingCode.parse(text.replace("1", "l")) == code


@settings(max_examples=300)
@given(secrets, st.data())
def test_every_single_character_typo_is_caught(code: PairingCode, data: st.DataObject) -> None:
    text = code.text().replace("-", "")
    position = data.draw(st.integers(0, CODE_LENGTH - 1))
    replacement = data.draw(st.sampled_from("0123456789ABCDEFGHJKMNPQRSTVWXYZ"))
    typo = text[:position] + replacement + text[position + 1 :]
    if typo == text:
        return
    with pytest.raises(PairingCodeError):
        PairingCode.parse(typo)


@pytest.mark.parametrize("text", ["", "ABCD", "U" * CODE_LENGTH, "!" * CODE_LENGTH, "0" * 21])
def test_malformed_codes_are_refused(text: str) -> None:
    with pytest.raises(PairingCodeError) as caught:
        PairingCode.parse(text)
    assert caught.value.code is ErrorCode.BAD_PAIRING_CODE


@pytest.mark.parametrize(
    "text",
    ["LOCKGW1:zz:0000", "LOCKGW1:0011", "OTHER:0011223344556677:X", "LOCKGW1:00:" + "0" * 20],
)
def test_malformed_labels_are_refused(text: str) -> None:
    with pytest.raises(PairingCodeError):
        LabelPayload.parse(text)


def test_psk_is_bound_to_the_device() -> None:
    code = PairingCode.generate()
    assert code.psk(bytes(8)) != code.psk(bytes(7) + b"\x01")
    assert len(code.psk(bytes(8))) == 32


def test_secrets_never_show_in_repr() -> None:
    code = PairingCode(bytes(range(10)))
    assert code.text() not in repr(code)
    assert code.text().replace("-", "") not in repr(LabelPayload(bytes(8), code))
    identity = DeviceIdentity.generate()
    assert identity.secret_bytes()[0].hex() not in repr(identity)


def test_device_id_derives_from_the_signing_key() -> None:
    identity = DeviceIdentity.generate()
    assert identity.device_id == device_id_from_key(identity.signing_key.public_key())
    assert parse_device_id(format_device_id(identity.device_id).upper()) == identity.device_id
    restored = DeviceIdentity.from_secret_bytes(*identity.secret_bytes())
    assert restored.device_id == identity.device_id
    assert restored.noise_public == identity.noise_public


@pytest.mark.parametrize("text", ["", "00", "zz" * 8, "0" * 17])
def test_bad_device_ids_are_refused(text: str) -> None:
    with pytest.raises(DecodeError):
        parse_device_id(text)


def test_binding_proves_the_noise_key() -> None:
    identity = DeviceIdentity.generate()
    verify_binding(identity.signing_public, identity.noise_public, identity.binding_signature())
    other = DeviceIdentity.generate()
    with pytest.raises(RemoteProtocolError) as caught:
        verify_binding(identity.signing_public, other.noise_public, identity.binding_signature())
    assert caught.value.code is ErrorCode.PEER_KEY_MISMATCH
    with pytest.raises(DecodeError):
        verify_binding(b"short", identity.noise_public, identity.binding_signature())
