"""Every parser and verifier against random and mutated input: typed errors, nothing else.

The default run keeps each target short; ``scripts/test -m fuzz`` runs the long version:
20,000 inputs per target, about five minutes for all fifteen on two cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols import access, advert, envelopes, identity, logrecords, messages, pairing
from protocols.enums import EventType, Reason
from protocols.errors import ProtocolError
from protocols.framing import Reassembler
from protocols.noise import HandshakeState
from protocols.session import NORMAL_PROTOCOL, SessionFailed
from tests.protocols import test_spec
from tests.protocols.world import World

QUICK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck))


def feed_reassembler(data: bytes) -> object:
    reassembler = Reassembler()
    return [reassembler.feed(data[start : start + 40]) for start in range(0, len(data), 40)]


WORLD = World()


def feed_device_session(data: bytes) -> object:
    session = WORLD.device_session()
    session.receive_fragment(data)
    failures = [event for event in session.events() if isinstance(event, SessionFailed)]
    if failures:
        raise failures[0].error
    return session.data_to_send()


def first_fragment() -> bytes:
    gateway = WORLD.gateway_session(mtu=517)
    gateway.start()
    [fragment] = gateway.data_to_send()
    return fragment


def read_handshake(data: bytes) -> object:
    responder = HandshakeState(NORMAL_PROTOCOL, initiator=False, s=X25519PrivateKey.generate())
    return responder.read_message(data)


def first_handshake_message() -> bytes:
    initiator = HandshakeState(NORMAL_PROTOCOL, initiator=True, s=X25519PrivateKey.generate())
    return initiator.write_message()


def batch() -> bytes:
    log = logrecords.DeviceLog(bytes(8), capacity=10)
    log.append(1_700_000_000, EventType.BOOT, Reason.POWER_ON)
    return logrecords.encode_batch(log.read(0, 10, key=Ed25519PrivateKey.generate(), now=1))


def text(parse: Callable[[str], object]) -> Callable[[bytes], object]:
    return lambda data: parse(data.decode("utf-8", errors="replace"))


TARGETS: dict[str, tuple[Callable[[bytes], object], bytes]] = {
    "message": (
        messages.decode_message,
        messages.encode_message(1, messages.LogRead(from_sequence=1, max_records=2)),
    ),
    "advert-payload": (
        advert.decode_manufacturer_payload,
        bytes.fromhex(test_spec.advert()[:46]),
    ),
    "advertising-data": (
        advert.parse_advertising_data,
        bytes.fromhex(test_spec.advert()[46:]),
    ),
    "fragments": (feed_reassembler, bytes.fromhex("8000001a" + "00" * 16)),
    "record": (logrecords.decode_record, bytes.fromhex(test_spec.record()[64:124])),
    "checkpoint": (logrecords.decode_checkpoint, bytes.fromhex(test_spec.checkpoint())),
    "batch": (logrecords.decode_batch, batch()),
    "certificate": (envelopes.decode_certificate, bytes.fromhex(test_spec.certificate())),
    "update": (envelopes.decode_update, bytes.fromhex(test_spec.update())),
    "access-state": (access.from_json, access.to_json(access.AccessState()).encode()),
    "pairing-code": (text(pairing.PairingCode.parse), b"000G-40R4-0M30-E209-75QC"),
    "label": (text(pairing.LabelPayload.parse), b"LOCKGW1:0011223344556677:000G40R40M30E20975QC"),
    "device-id": (text(identity.parse_device_id), b"0011223344556677"),
    "device-session": (feed_device_session, first_fragment()),
    "noise-handshake": (read_handshake, first_handshake_message()),
}


def mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Random bytes, and the seed with bytes flipped, cut, repeated or spliced."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 4))):
            choice = draw(st.integers(0, 3))
            position = draw(st.integers(0, max(len(data) - 1, 0)))
            if choice == 0 and data:
                data[position] ^= 1 << draw(st.integers(0, 7))
            elif choice == 1:
                data = data[:position]
            elif choice == 2:
                data[position:position] = draw(st.binary(max_size=16))
            else:
                data += data[position:]
        return bytes(data)

    return st.one_of(st.binary(max_size=600), mutate())


def check(target: str, data: bytes) -> None:
    parse, _ = TARGETS[target]
    with contextlib.suppress(ProtocolError):  # the library's own typed refusal, nothing else
        parse(data)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_parsers_refuse_bad_input_with_typed_errors(target: str) -> None:
    QUICK(given(mutations(TARGETS[target][1]))(lambda data: check(target, data)))()


@pytest.mark.fuzz
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_parsers_long_fuzz(target: str) -> None:
    LONG(given(mutations(TARGETS[target][1]))(lambda data: check(target, data)))()


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_are_valid_input(target: str) -> None:
    """Mutations start from input each parser accepts, so they reach its deep paths."""
    parse, seed = TARGETS[target]
    parse(seed)
