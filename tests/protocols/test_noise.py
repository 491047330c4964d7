"""Tests of the Noise implementation: cacophony vectors, pattern table, failures, properties."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import CryptoError, ErrorCode, LocalProtocolError
from protocols.noise import (
    MAX_MESSAGE_LEN,
    MAX_NONCE,
    PATTERNS,
    TAG_LEN,
    CipherState,
    HandshakePattern,
    HandshakeState,
    MessagePattern,
    Role,
    Token,
    TransportState,
    handshake_pattern,
    parse_pattern,
    pattern_for_protocol,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

VECTOR_PATH = Path(__file__).parent / "vectors" / "noise-25519-chachapoly-sha256.json"
VECTORS: list[dict[str, Any]] = json.loads(VECTOR_PATH.read_text(encoding="utf-8"))["vectors"]
SUITE = "_25519_ChaChaPoly_SHA256"

FEW = settings(max_examples=50, deadline=None)
SOME = settings(max_examples=100, deadline=None)


def _vector_ids() -> list[str]:
    names = [vector["protocol_name"] for vector in VECTORS]
    repeated = {name for name, count in Counter(names).items() if count > 1}
    return [f"{name}[{index}]" if name in repeated else name for index, name in enumerate(names)]


def _private(vector: dict[str, Any], field: str) -> X25519PrivateKey | None:
    if field not in vector:
        return None
    return X25519PrivateKey.from_private_bytes(bytes.fromhex(vector[field]))


def _optional_bytes(vector: dict[str, Any], field: str) -> bytes | None:
    return bytes.fromhex(vector[field]) if field in vector else None


def _side(vector: dict[str, Any], prefix: str) -> HandshakeState:
    return HandshakeState(
        vector["protocol_name"],
        initiator=prefix == "init",
        prologue=bytes.fromhex(vector[f"{prefix}_prologue"]),
        s=_private(vector, f"{prefix}_static"),
        e=_private(vector, f"{prefix}_ephemeral"),
        rs=_optional_bytes(vector, f"{prefix}_remote_static"),
        psks=[bytes.fromhex(psk) for psk in vector.get(f"{prefix}_psks", [])],
    )


@pytest.mark.parametrize("vector", VECTORS, ids=_vector_ids())
def test_cacophony_vector(vector: dict[str, Any]) -> None:
    initiator, responder = _side(vector, "init"), _side(vector, "resp")
    one_way = initiator.pattern.one_way
    transports: tuple[TransportState, TransportState] | None = None
    for index, message in enumerate(vector["messages"]):
        payload = bytes.fromhex(message["payload"])
        ciphertext = bytes.fromhex(message["ciphertext"])
        if transports is None:
            writer, reader = (initiator, responder) if index % 2 == 0 else (responder, initiator)
            assert writer.is_my_turn
            assert not reader.is_my_turn
            assert writer.write_message(payload) == ciphertext
            assert reader.read_message(ciphertext) == payload
            if initiator.is_complete:
                assert responder.is_complete
                expected_hash = bytes.fromhex(vector["handshake_hash"])
                assert initiator.handshake_hash == expected_hash
                assert responder.handshake_hash == expected_hash
                transports = initiator.transport(), responder.transport()
                assert transports[0].handshake_hash == expected_hash
        else:
            # cacophony keeps alternating after the handshake; one-way patterns only send.
            from_initiator = one_way or index % 2 == 0
            sender, receiver = transports if from_initiator else transports[::-1]
            assert sender.encrypt(payload) == ciphertext
            assert receiver.decrypt(ciphertext) == payload
    assert transports is not None, "the vector never completed its handshake"


def test_vectors_cover_every_supported_pattern() -> None:
    names = {
        vector["protocol_name"].removeprefix("Noise_").removesuffix(SUITE) for vector in VECTORS
    }
    assert set(PATTERNS) <= names
    assert len(VECTORS) == 59


# Pattern table.


def test_xx_parses_to_the_spec_shape() -> None:
    assert PATTERNS["XX"] == HandshakePattern(
        name="XX",
        initiator_premessage=(),
        responder_premessage=(),
        messages=(
            MessagePattern(Role.INITIATOR, (Token.E,)),
            MessagePattern(Role.RESPONDER, (Token.E, Token.EE, Token.S, Token.ES)),
            MessagePattern(Role.INITIATOR, (Token.S, Token.SE)),
        ),
    )


def test_xxpsk3_appends_psk_to_the_third_message() -> None:
    pattern = handshake_pattern("XXpsk3")
    assert pattern.name == "XXpsk3"
    assert [m.tokens for m in pattern.messages] == [
        (Token.E,),
        (Token.E, Token.EE, Token.S, Token.ES),
        (Token.S, Token.SE, Token.PSK),
    ]
    assert [m.sender for m in pattern.messages] == [Role.INITIATOR, Role.RESPONDER, Role.INITIATOR]
    assert pattern.psk_count == 1


def test_psk0_prepends_and_modifiers_combine() -> None:
    pattern = handshake_pattern("NNpsk0+psk2")
    assert [m.tokens for m in pattern.messages] == [
        (Token.PSK, Token.E),
        (Token.E, Token.EE, Token.PSK),
    ]
    assert pattern.psk_count == 2


def test_premessages_parse() -> None:
    pattern = PATTERNS["KK"]
    assert pattern.initiator_premessage == (Token.S,)
    assert pattern.responder_premessage == (Token.S,)
    assert PATTERNS["NK"].initiator_premessage == ()
    assert PATTERNS["NK"].responder_premessage == (Token.S,)


_DH_KEYS: dict[Token, tuple[str, str]] = {
    # (initiator's key, responder's key) of each DH token.
    Token.EE: ("e", "e"),
    Token.ES: ("e", "s"),
    Token.SE: ("s", "e"),
    Token.SS: ("s", "s"),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_pattern_in_the_table_is_valid(name: str) -> None:
    """The validity rules of spec section 7.3, 1 to 3, over the parsed table."""
    pattern = PATTERNS[name]
    sent: dict[Role, list[str]] = {
        role: [token.value for token in pattern.premessage(role)] for role in Role
    }
    done: list[Token] = []
    for message in pattern.messages:
        for token in message.tokens:
            if token in (Token.E, Token.S):
                assert token.value not in sent[message.sender], "a key is sent only once"
                sent[message.sender].append(token.value)
            elif token in _DH_KEYS:
                assert token not in done, "each DH at most once"
                initiator_key, responder_key = _DH_KEYS[token]
                assert initiator_key in sent[Role.INITIATOR], "DH needs the initiator's key"
                assert responder_key in sent[Role.RESPONDER], "DH needs the responder's key"
                done.append(token)
    assert "e" in sent[Role.INITIATOR]


def test_patterns_are_frozen() -> None:
    with pytest.raises(FrozenInstanceError):
        PATTERNS["XX"].name = "YY"  # type: ignore[misc]  # the point: frozen refuses this


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<- e",
        "-> e\n-> e",
        "-> x",
        "=> e",
        "<- s\n-> s\n...\n-> e",
        "-> ee\n...\n-> e",
    ],
)
def test_malformed_pattern_text_is_refused(text: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        parse_pattern("bad", text)
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION


# Handshakes with random keys.


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _needs_static(pattern: HandshakePattern, role: Role) -> bool:
    return Token.S in pattern.premessage(role) or pattern.sends(role, Token.S)


def make_pair(
    protocol_name: str,
    *,
    initiator_psks: Sequence[bytes] | None = None,
    responder_psks: Sequence[bytes] | None = None,
    prologue: bytes = b"lockgw test",
) -> tuple[HandshakeState, HandshakeState, X25519PrivateKey, X25519PrivateKey]:
    """Both sides of ``protocol_name`` with fresh keys, given what the pattern needs."""
    pattern = pattern_for_protocol(protocol_name)
    initiator_static, responder_static = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    shared_psks = [os.urandom(32) for _ in range(pattern.psk_count)]
    initiator = HandshakeState(
        protocol_name,
        initiator=True,
        prologue=prologue,
        s=initiator_static if _needs_static(pattern, Role.INITIATOR) else None,
        rs=_public(responder_static) if Token.S in pattern.responder_premessage else None,
        psks=shared_psks if initiator_psks is None else initiator_psks,
    )
    responder = HandshakeState(
        protocol_name,
        initiator=False,
        prologue=prologue,
        s=responder_static if _needs_static(pattern, Role.RESPONDER) else None,
        rs=_public(initiator_static) if Token.S in pattern.initiator_premessage else None,
        psks=shared_psks if responder_psks is None else responder_psks,
    )
    return initiator, responder, initiator_static, responder_static


def run_handshake(
    initiator: HandshakeState,
    responder: HandshakeState,
    tamper: Callable[[int, bytes], bytes] | None = None,
) -> tuple[TransportState, TransportState]:
    """Run the handshake to completion, passing each message through ``tamper`` if given."""
    index = 0
    while not initiator.is_complete:
        writer, reader = (initiator, responder) if initiator.is_my_turn else (responder, initiator)
        payload = f"payload {index}".encode()
        message = writer.write_message(payload)
        if tamper is None:
            assert reader.read_message(message) == payload
        else:
            reader.read_message(tamper(index, message))
        index += 1
    assert responder.is_complete
    assert initiator.handshake_hash == responder.handshake_hash
    return initiator.transport(), responder.transport()


PROTOCOLS = sorted({vector["protocol_name"] for vector in VECTORS})


@pytest.mark.parametrize("pattern", ["XX", "XXpsk3"])
def test_handshake_with_random_keys_and_transport(pattern: str) -> None:
    initiator, responder, initiator_static, responder_static = make_pair(f"Noise_{pattern}{SUITE}")
    known_in_advance = initiator.remote_static, responder.remote_static
    initiator_transport, responder_transport = run_handshake(initiator, responder)
    assert known_in_advance == (None, None)
    assert initiator.remote_static == _public(responder_static)
    assert responder.remote_static == _public(initiator_static)
    assert initiator_transport.handshake_hash == responder_transport.handshake_hash
    assert initiator_transport.handshake_hash == initiator.handshake_hash
    for round_trip in range(3):
        request = f"unlock {round_trip}".encode()
        assert responder_transport.decrypt(initiator_transport.encrypt(request)) == request
        reply = f"unlocked {round_trip}".encode()
        assert initiator_transport.decrypt(responder_transport.encrypt(reply)) == reply
    assert initiator_transport.send_cipher is not None
    assert initiator_transport.send_cipher.nonce == 3
    assert initiator.transport() is initiator_transport


@pytest.mark.parametrize("protocol_name", PROTOCOLS)
def test_every_protocol_with_random_keys(protocol_name: str) -> None:
    initiator_transport, responder_transport = run_handshake(*make_pair(protocol_name)[:2])
    assert responder_transport.decrypt(initiator_transport.encrypt(b"ping")) == b"ping"
    if initiator_transport.receive_cipher is None:
        return
    assert initiator_transport.decrypt(responder_transport.encrypt(b"pong")) == b"pong"


def test_psk0_plus_psk2_handshake() -> None:
    initiator_transport, responder_transport = run_handshake(
        *make_pair(f"Noise_XXpsk0+psk2{SUITE}")[:2]
    )
    assert responder_transport.decrypt(initiator_transport.encrypt(b"x")) == b"x"


def test_wrong_psk_fails_on_the_responder() -> None:
    initiator, responder, _, _ = make_pair(
        f"Noise_XXpsk3{SUITE}", initiator_psks=[b"\x01" * 32], responder_psks=[b"\x02" * 32]
    )
    responder.read_message(initiator.write_message())
    initiator.read_message(responder.write_message())
    final = initiator.write_message(b"hello")
    # The psk is mixed in by the third message, which only the responder reads.
    assert initiator.is_complete
    with pytest.raises(CryptoError) as info:
        responder.read_message(final)
    assert info.value.code is ErrorCode.HANDSHAKE_FAILED
    assert "01" * 32 not in str(info.value)
    assert not responder.is_complete
    assert not responder.is_my_turn
    with pytest.raises(CryptoError) as closed:
        responder.transport()
    assert closed.value.code is ErrorCode.SESSION_CLOSED


def test_prologue_is_bound() -> None:
    initiator, _, _, _ = make_pair(f"Noise_NN{SUITE}", prologue=b"one")
    _, responder, _, _ = make_pair(f"Noise_NN{SUITE}", prologue=b"two")
    responder.read_message(initiator.write_message())
    with pytest.raises(CryptoError) as info:
        initiator.read_message(responder.write_message())
    assert info.value.code is ErrorCode.HANDSHAKE_FAILED


def test_one_way_transport_only_goes_one_way() -> None:
    initiator_transport, responder_transport = run_handshake(*make_pair(f"Noise_X{SUITE}")[:2])
    assert responder_transport.decrypt(initiator_transport.encrypt(b"a")) == b"a"
    with pytest.raises(LocalProtocolError) as sending:
        responder_transport.encrypt(b"b")
    assert sending.value.code is ErrorCode.UNEXPECTED_MESSAGE
    with pytest.raises(LocalProtocolError) as receiving:
        initiator_transport.decrypt(b"\x00" * 32)
    assert receiving.value.code is ErrorCode.UNEXPECTED_MESSAGE


# Turn-taking and state.


def test_writing_out_of_turn_is_a_local_error() -> None:
    initiator, responder, _, _ = make_pair(f"Noise_XX{SUITE}")
    with pytest.raises(LocalProtocolError) as info:
        responder.write_message()
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    first = initiator.write_message()
    with pytest.raises(LocalProtocolError) as again:
        initiator.write_message()
    assert again.value.code is ErrorCode.UNEXPECTED_MESSAGE
    # Misuse leaves the handshake usable.
    responder.read_message(first)
    run_handshake(initiator, responder)
    with pytest.raises(LocalProtocolError) as done:
        initiator.write_message()
    assert done.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_reading_out_of_turn_is_a_local_error() -> None:
    initiator, _, _, _ = make_pair(f"Noise_NN{SUITE}")
    with pytest.raises(LocalProtocolError) as info:
        initiator.read_message(b"\x00" * 48)
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE
    assert initiator.is_my_turn


def test_transport_before_completion_is_a_local_error() -> None:
    initiator, _, _, _ = make_pair(f"Noise_NN{SUITE}")
    with pytest.raises(LocalProtocolError) as info:
        initiator.transport()
    assert info.value.code is ErrorCode.UNEXPECTED_MESSAGE


def test_turns_and_completion() -> None:
    initiator, responder, _, _ = make_pair(f"Noise_NN{SUITE}")
    assert (initiator.is_my_turn, responder.is_my_turn) == (True, False)
    responder.read_message(initiator.write_message())
    assert (initiator.is_my_turn, responder.is_my_turn) == (False, True)
    hash_before = initiator.handshake_hash
    initiator.read_message(responder.write_message())
    assert initiator.handshake_hash != hash_before
    assert initiator.is_complete
    assert (initiator.is_my_turn, responder.is_my_turn) == (False, False)


def test_dead_handshake_refuses_everything() -> None:
    initiator, responder, _, _ = make_pair(f"Noise_NN{SUITE}")
    responder.read_message(initiator.write_message())
    with pytest.raises(CryptoError):
        initiator.read_message(b"\x00" * 10)
    calls: tuple[Callable[[], object], ...] = (
        initiator.write_message,
        lambda: initiator.read_message(b"\x00" * 48),
    )
    for call in calls:
        with pytest.raises(CryptoError) as info:
            call()
        assert info.value.code is ErrorCode.SESSION_CLOSED
    assert not initiator.is_my_turn


# Construction.


@pytest.mark.parametrize(
    "protocol_name",
    [
        "Noise_XX_448_ChaChaPoly_SHA256",
        "Noise_XX_25519_AESGCM_SHA256",
        "Noise_XX_25519_ChaChaPoly_SHA512",
        "Noise_XX_25519_ChaChaPoly_BLAKE2s",
        "Noise_ZZ_25519_ChaChaPoly_SHA256",
        "Noise_xx_25519_ChaChaPoly_SHA256",
        "Noise_XXfallback_25519_ChaChaPoly_SHA256",
        "Noise_XXpsk4_25519_ChaChaPoly_SHA256",
        "Noise_XXpsk01_25519_ChaChaPoly_SHA256",
        "Noise_XXpsk_25519_ChaChaPoly_SHA256",
        "Noise_XXpsk-1_25519_ChaChaPoly_SHA256",
        "Noise_XXpsk2+psk0_25519_ChaChaPoly_SHA256",
        "Noise_XXpsk1+psk1_25519_ChaChaPoly_SHA256",
        "Noise_XXpsk0+_25519_ChaChaPoly_SHA256",
        "Noise_XXpsk\u0661_25519_ChaChaPoly_SHA256",
        "Noise_XX_25519_ChaChaPoly",
        "Noise_XX_25519_ChaChaPoly_SHA256_extra",
        "NoiseXX_25519_ChaChaPoly_SHA256",
        "Noise__25519_ChaChaPoly_SHA256",
        "",
    ],
)
def test_unsupported_protocol_names(protocol_name: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        HandshakeState(protocol_name, initiator=True, s=X25519PrivateKey.generate())
    assert info.value.code is ErrorCode.UNSUPPORTED_VERSION


def _construct(protocol_name: str, **kwargs: Any) -> HandshakeState:
    return HandshakeState(f"Noise_{protocol_name}{SUITE}", **kwargs)


KEY = X25519PrivateKey.generate()


@pytest.mark.parametrize(
    ("pattern", "kwargs"),
    [
        ("XX", {"initiator": True}),
        ("XX", {"initiator": False}),
        ("NK", {"initiator": True}),
        ("NK", {"initiator": False}),
        ("KN", {"initiator": False, "rs": None}),
        ("NN", {"initiator": True, "rs": _public(KEY)}),
        ("XX", {"initiator": True, "s": KEY, "rs": _public(KEY)}),
        ("NN", {"initiator": True, "re": _public(KEY)}),
        ("NK", {"initiator": True, "rs": b"\x09" * 31}),
        ("NK", {"initiator": True, "rs": bytes(32)}),
        ("XXpsk3", {"initiator": True, "s": KEY}),
        ("XXpsk3", {"initiator": True, "s": KEY, "psks": [bytes(32)] * 2}),
        ("XXpsk3", {"initiator": True, "s": KEY, "psks": [bytes(31)]}),
        ("NN", {"initiator": True, "psks": [bytes(32)]}),
    ],
)
def test_missing_or_wrong_keys_refused_at_construction(
    pattern: str, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(LocalProtocolError) as info:
        _construct(pattern, **kwargs)
    assert info.value.code is ErrorCode.HANDSHAKE_FAILED


def test_key_material_stays_out_of_error_messages() -> None:
    psk = bytes(range(31))
    with pytest.raises(LocalProtocolError) as info:
        _construct("XXpsk3", initiator=True, s=KEY, psks=[psk])
    assert psk.hex() not in str(info.value)
    assert repr(psk) not in str(info.value)


# Size limits.


def test_largest_handshake_message_is_written_and_one_more_byte_refused() -> None:
    initiator, responder, _, _ = make_pair(f"Noise_NN{SUITE}")
    with pytest.raises(LocalProtocolError) as info:
        initiator.write_message(bytes(MAX_MESSAGE_LEN - 32 + 1))
    assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE
    # A refused write changes nothing.
    largest = initiator.write_message(bytes(MAX_MESSAGE_LEN - 32))
    assert len(largest) == MAX_MESSAGE_LEN
    responder.read_message(largest)
    with pytest.raises(LocalProtocolError) as encrypted:
        responder.write_message(bytes(MAX_MESSAGE_LEN - 32 - TAG_LEN + 1))
    assert encrypted.value.code is ErrorCode.MESSAGE_TOO_LARGE
    initiator.read_message(responder.write_message(bytes(MAX_MESSAGE_LEN - 32 - TAG_LEN)))


def test_oversized_handshake_message_from_peer_fails() -> None:
    _, responder, _, _ = make_pair(f"Noise_NN{SUITE}")
    with pytest.raises(CryptoError) as info:
        responder.read_message(bytes([9]) * (MAX_MESSAGE_LEN + 1))
    assert info.value.code is ErrorCode.HANDSHAKE_FAILED


def test_transport_size_limits() -> None:
    initiator_transport, responder_transport = run_handshake(*make_pair(f"Noise_NN{SUITE}")[:2])
    with pytest.raises(LocalProtocolError) as info:
        initiator_transport.encrypt(bytes(MAX_MESSAGE_LEN - TAG_LEN + 1))
    assert info.value.code is ErrorCode.MESSAGE_TOO_LARGE
    largest = initiator_transport.encrypt(bytes(MAX_MESSAGE_LEN - TAG_LEN))
    assert len(largest) == MAX_MESSAGE_LEN
    assert responder_transport.decrypt(largest) == bytes(MAX_MESSAGE_LEN - TAG_LEN)
    with pytest.raises(CryptoError) as oversized:
        responder_transport.decrypt(bytes(MAX_MESSAGE_LEN + 1))
    assert oversized.value.code is ErrorCode.DECRYPT_FAILED


def test_low_order_ephemeral_fails_the_reader() -> None:
    _, responder, _, _ = make_pair(f"Noise_NN{SUITE}")
    with pytest.raises(CryptoError) as info:
        responder.read_message(bytes(32))
    assert info.value.code is ErrorCode.HANDSHAKE_FAILED


def test_short_handshake_message_fails() -> None:
    _, responder, _, _ = make_pair(f"Noise_NN{SUITE}")
    with pytest.raises(CryptoError) as info:
        responder.read_message(bytes(31))
    assert info.value.code is ErrorCode.HANDSHAKE_FAILED


# CipherState.


def test_cipher_state_without_key_passes_through() -> None:
    cipher = CipherState()
    assert not cipher.has_key()
    assert cipher.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cipher.decrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cipher.nonce == 0


def test_cipher_state_rejects_a_bad_key_length() -> None:
    with pytest.raises(LocalProtocolError):
        CipherState(bytes(16))


def test_short_ciphertext_fails_and_kills() -> None:
    cipher = CipherState(bytes(32))
    with pytest.raises(CryptoError) as info:
        cipher.decrypt_with_ad(b"", bytes(TAG_LEN - 1))
    assert info.value.code is ErrorCode.DECRYPT_FAILED
    assert cipher.closed
    with pytest.raises(CryptoError) as closed:
        cipher.encrypt_with_ad(b"", b"")
    assert closed.value.code is ErrorCode.SESSION_CLOSED


@FEW
@given(key=st.binary(min_size=32, max_size=32), bit=st.integers(min_value=0))
def test_bad_tag_kills_the_cipher_state(key: bytes, bit: int) -> None:
    sender, receiver = CipherState(key), CipherState(key)
    first = sender.encrypt_with_ad(b"ad", b"first")
    second = sender.encrypt_with_ad(b"ad", b"second")
    bit %= len(first) * 8
    forged = bytearray(first)
    forged[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CryptoError) as info:
        receiver.decrypt_with_ad(b"ad", bytes(forged))
    assert info.value.code is ErrorCode.DECRYPT_FAILED
    for genuine in (first, second):
        with pytest.raises(CryptoError) as closed:
            receiver.decrypt_with_ad(b"ad", genuine)
        assert closed.value.code is ErrorCode.SESSION_CLOSED
    with pytest.raises(CryptoError) as sending:
        receiver.encrypt_with_ad(b"ad", b"reply")
    assert sending.value.code is ErrorCode.SESSION_CLOSED
    with pytest.raises(CryptoError):
        receiver.rekey()


def test_wrong_ad_fails() -> None:
    sender, receiver = CipherState(bytes(32)), CipherState(bytes(32))
    with pytest.raises(CryptoError) as info:
        receiver.decrypt_with_ad(b"other", sender.encrypt_with_ad(b"ad", b"x"))
    assert info.value.code is ErrorCode.DECRYPT_FAILED


def test_nonce_exhaustion() -> None:
    key = os.urandom(32)
    sender, receiver = CipherState(key), CipherState(key)
    # Advancing 2**64 messages is not an option; move the counter to the last usable nonce.
    sender._nonce = receiver._nonce = MAX_NONCE - 1
    last = sender.encrypt_with_ad(b"", b"last")
    assert sender.nonce == MAX_NONCE
    assert receiver.decrypt_with_ad(b"", last) == b"last"
    calls: tuple[Callable[[], object], ...] = (
        lambda: sender.encrypt_with_ad(b"", b"more"),
        lambda: receiver.decrypt_with_ad(b"", last),
    )
    for call in calls:
        with pytest.raises(CryptoError) as info:
            call()
        assert info.value.code is ErrorCode.NONCE_EXHAUSTED
    # Refusals never wrap the counter around to a used nonce.
    assert sender.nonce == MAX_NONCE
    assert receiver.nonce == MAX_NONCE


def test_nonces_increase_and_ciphertexts_differ() -> None:
    cipher = CipherState(bytes(32))
    ciphertexts = {cipher.encrypt_with_ad(b"", b"same") for _ in range(5)}
    assert len(ciphertexts) == 5
    assert cipher.nonce == 5


def test_rekey_on_both_sides_keeps_the_channel() -> None:
    key = os.urandom(32)
    sender, receiver = CipherState(key), CipherState(key)
    assert receiver.decrypt_with_ad(b"", sender.encrypt_with_ad(b"", b"a")) == b"a"
    sender.rekey()
    receiver.rekey()
    assert sender.nonce == 1
    assert receiver.decrypt_with_ad(b"", sender.encrypt_with_ad(b"", b"b")) == b"b"
    sender.rekey()
    with pytest.raises(CryptoError):
        receiver.decrypt_with_ad(b"", sender.encrypt_with_ad(b"", b"c"))


def test_non_bytes_input_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        CipherState(bytes(32)).encrypt_with_ad(b"", 5)  # type: ignore[arg-type]  # the misuse
    _, responder, _, _ = make_pair(f"Noise_NN{SUITE}")
    with pytest.raises(TypeError):
        responder.read_message("text")  # type: ignore[arg-type]  # the misuse under test
    assert not responder.is_my_turn


# Properties.


@SOME
@given(data=st.data(), protocol_name=st.sampled_from(PROTOCOLS))
def test_any_flipped_bit_in_a_handshake_message_is_detected(
    data: st.DataObject, protocol_name: str
) -> None:
    initiator, responder, _, _ = make_pair(protocol_name)
    message_count = len(initiator.pattern.messages)
    target = data.draw(st.integers(min_value=0, max_value=message_count - 1), label="message")
    bit_seed = data.draw(st.integers(min_value=0), label="bit")

    def flip(index: int, message: bytes) -> bytes:
        if index != target:
            return message
        bit = bit_seed % (len(message) * 8)
        flipped = bytearray(message)
        flipped[bit // 8] ^= 1 << (bit % 8)
        return bytes(flipped)

    # An unencrypted early message is caught by the next one: h no longer matches.
    with pytest.raises(CryptoError):
        run_handshake(initiator, responder, flip)


@SOME
@given(
    protocol_name=st.sampled_from(PROTOCOLS),
    plaintext=st.binary(max_size=64),
    bit_seed=st.integers(min_value=0),
)
def test_any_flipped_bit_in_a_transport_message_is_detected(
    protocol_name: str, plaintext: bytes, bit_seed: int
) -> None:
    initiator_transport, responder_transport = run_handshake(*make_pair(protocol_name)[:2])
    ciphertext = bytearray(initiator_transport.encrypt(plaintext))
    bit = bit_seed % (len(ciphertext) * 8)
    ciphertext[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CryptoError) as info:
        responder_transport.decrypt(bytes(ciphertext))
    assert info.value.code is ErrorCode.DECRYPT_FAILED
    with pytest.raises(CryptoError) as closed:
        responder_transport.decrypt(initiator_transport.encrypt(b"genuine"))
    assert closed.value.code is ErrorCode.SESSION_CLOSED


@SOME
@given(
    protocol_name=st.sampled_from(PROTOCOLS),
    garbage=st.binary(max_size=300),
    responder_reads=st.booleans(),
)
def test_random_bytes_into_read_message_raise_only_crypto_error(
    protocol_name: str, garbage: bytes, responder_reads: bool
) -> None:
    initiator, responder, _, _ = make_pair(protocol_name)
    reader = responder
    if not responder_reads and not initiator.pattern.one_way:
        responder.read_message(initiator.write_message())
        reader = initiator
    error: CryptoError | None = None
    try:
        reader.read_message(garbage)
    except CryptoError as exc:
        error = exc
    if error is None:
        # Only an opening message with nothing encrypted in it can be forged.
        assert reader is responder
        assert reader.pattern.messages[0].tokens in {(Token.E,), (Token.E, Token.S)}
        return
    assert error.code is ErrorCode.HANDSHAKE_FAILED
    with pytest.raises(CryptoError) as closed:
        reader.read_message(garbage)
    assert closed.value.code is ErrorCode.SESSION_CLOSED


@FEW
@given(garbage=st.binary(max_size=200))
def test_random_bytes_after_encryption_starts_always_fail(garbage: bytes) -> None:
    initiator, responder, _, _ = make_pair(f"Noise_XX{SUITE}")
    responder.read_message(initiator.write_message())
    with pytest.raises(CryptoError) as info:
        initiator.read_message(garbage)
    assert info.value.code is ErrorCode.HANDSHAKE_FAILED
