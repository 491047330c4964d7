"""docs/protocol.md matches the code: every hex example and every code table.

Each example in the spec sits under an ``<!-- example: NAME -->`` marker; this module
rebuilds it from fixed keys and compares byte for byte. Each code table sits under a
``<!-- table: ENUM -->`` marker and must list exactly the enum's names and values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import IntEnum, IntFlag
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocols.advert import Advert, build_advertising_data, encode_manufacturer_payload
from protocols.enums import AlarmFlags, DeviceKind, EventType, Reason
from protocols.envelopes import (
    AccessEntry,
    AuthorisationUpdate,
    Role,
    ScheduleWindow,
    Scope,
    Target,
    UpdateKind,
    decode_certificate,
    encode_certificate,
    encode_update,
    issue_certificate,
    sign_update,
)
from protocols.errors import ErrorCode
from protocols.framing import fragment
from protocols.logrecords import (
    LogRecord,
    chain_genesis,
    chain_next,
    encode_checkpoint,
    encode_record,
    sign_checkpoint,
)
from protocols.messages import LogRead, MessageType, encode_message
from protocols.noise import CipherState
from protocols.pairing import LabelPayload, PairingCode
from protocols.session import Channel

SPEC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

AUTHORITY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
GATEWAY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
GATEWAY_NOISE = X25519PrivateKey.from_private_bytes(bytes(range(64, 96)))
DEVICE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
DEVICE_ID = bytes.fromhex("4c4f434b00000001")
TARGET_DEVICE = bytes.fromhex("d1d2d3d4d5d6d7d8")


def lines(*parts: bytes) -> str:
    return "".join(part.hex() for part in parts)


def advert() -> str:
    example = Advert(
        device_id=bytes.fromhex("0011223344556677"),
        kind=DeviceKind.KEY_SAFE,
        pairing_mode=False,
        battery_percent=87,
        alarms=AlarmFlags.BATTERY_LOW | AlarmFlags.TAMPER,
        access_version=42,
        revocation_version=7,
        records_waiting=300,
    )
    return lines(encode_manufacturer_payload(example), build_advertising_data(example))


def transport() -> str:
    plaintext = encode_message(1, LogRead(from_sequence=120, max_records=500))
    ciphertext = CipherState(bytes(range(32))).encrypt_with_ad(b"", plaintext)
    framed = bytes([Channel.TRANSPORT]) + ciphertext
    return lines(plaintext, ciphertext, framed, *fragment(framed, 23))


def log_record() -> tuple[LogRecord, bytes]:
    genesis = chain_genesis(DEVICE_ID)
    record = LogRecord(
        sequence=0,
        time=1_700_000_000,
        event=EventType.ACCESS_GRANTED,
        reason=Reason.VALID_KEY,
        key_id=0x12345,
        payload=b"\x03" + bytes(7),
        link=genesis[:8],
    )
    return record, genesis


def record() -> str:
    entry, genesis = log_record()
    encoded = encode_record(entry)
    return lines(genesis, encoded, chain_next(genesis, encoded))


def checkpoint() -> str:
    entry, genesis = log_record()
    head = chain_next(genesis, encode_record(entry))
    return lines(encode_checkpoint(sign_checkpoint(DEVICE_KEY, DEVICE_ID, 0, head, 1_700_000_060)))


def certificate_bytes() -> bytes:
    return encode_certificate(
        issue_certificate(
            AUTHORITY,
            role=Role.GATEWAY,
            subject="gateway-01",
            serial=7,
            signing_key=GATEWAY.public_key(),
            noise_key=GATEWAY_NOISE.public_key(),
            scope=Scope(sites=frozenset({42}), devices=frozenset({TARGET_DEVICE})),
            not_before=1_700_000_000,
            not_after=1_800_000_000,
        )
    )


def certificate() -> str:
    return lines(certificate_bytes())


def update() -> str:
    body = AuthorisationUpdate(
        kind=UpdateKind.ACCESS_FULL,
        target=Target.device(TARGET_DEVICE),
        version=3,
        base_version=0,
        issued_at=1_750_000_000,
        expires_at=1_750_086_400,
        access=(
            AccessEntry(
                key_id=1001,
                valid_from=1_700_000_000,
                valid_until=1_800_000_000,
                windows=(
                    ScheduleWindow(0x1F, 7 * 60, 15 * 60),
                    ScheduleWindow(0x60, 9 * 60, 12 * 60),
                ),
            ),
        ),
    )
    signed = sign_update(body, key=GATEWAY, certificate=decode_certificate(certificate_bytes()))
    return lines(encode_update(signed))


def pairing() -> str:
    code = PairingCode(bytes(range(10)))
    label = LabelPayload(bytes.fromhex("0011223344556677"), code)
    return lines(
        code.secret, code.text().encode(), label.text().encode(), code.psk(label.device_id)
    )


EXAMPLES: dict[str, Callable[[], str]] = {
    "advert": advert,
    "transport": transport,
    "record": record,
    "checkpoint": checkpoint,
    "certificate": certificate,
    "update": update,
    "pairing": pairing,
}

TABLES: dict[str, type[IntEnum | IntFlag]] = {
    "ErrorCode": ErrorCode,
    "MessageType": MessageType,
    "EventType": EventType,
    "Reason": Reason,
    "DeviceKind": DeviceKind,
    "AlarmFlags": AlarmFlags,
}


def spec_text() -> str:
    return SPEC.read_text(encoding="utf-8")


def spec_example(name: str) -> str:
    match = re.search(rf"<!-- example: {name} -->\s*```text\n(.*?)```", spec_text(), re.DOTALL)
    assert match, f"docs/protocol.md has no example {name!r}"
    # Line breaks, grouping spaces and comments after '#' are for the reader.
    return "".join(line.split("#")[0].replace(" ", "") for line in match.group(1).splitlines())


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_spec_example_matches_the_code(name: str) -> None:
    assert spec_example(name) == EXAMPLES[name]()


def spec_table(name: str) -> dict[str, int]:
    match = re.search(rf"<!-- table: {name} -->\s*\n((?:\|.*\n)+)", spec_text())
    assert match, f"docs/protocol.md has no table {name!r}"
    rows: dict[str, int] = {}
    for row in match.group(1).splitlines()[2:]:
        cells = [cell.strip().strip("`") for cell in row.strip("|").split("|")]
        rows[cells[1]] = int(cells[0], 16)
    return rows


@pytest.mark.parametrize("name", sorted(TABLES))
def test_spec_table_lists_exactly_the_codes(name: str) -> None:
    enum = TABLES[name]
    # A flag set's zero member means "no flags": it is not a bit the spec lists.
    listed = [m for m in enum if not (issubclass(enum, IntFlag) and int(m) == 0)]
    assert spec_table(name) == {member.name: int(member) for member in listed}


if __name__ == "__main__":
    for example_name, build in EXAMPLES.items():
        print(f"== {example_name}\n{build()}")  # noqa: T201 - prints the examples for the spec
