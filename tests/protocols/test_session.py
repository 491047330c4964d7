"""The session state machine in both roles: handshakes, requests, refusals, tampering."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocols.envelopes import Role, Scope
from protocols.errors import ErrorCode, LocalProtocolError
from protocols.identity import DeviceIdentity
from protocols.messages import (
    ErrorReply,
    LogBatchMessage,
    LogRead,
    Provision,
    Provisioned,
    Status,
    StatusRequest,
    TimeSync,
)
from protocols.pairing import PairingCode
from protocols.session import (
    HandshakeComplete,
    MessageReceived,
    Session,
    SessionFailed,
    SessionMode,
    SessionState,
)
from tests.protocols.world import NOW, SITE, World, pump


def handshake(world: World, *, mtu: int = 247) -> tuple[Session, Session]:
    gateway, device = world.gateway_session(mtu=mtu), world.device_session(mtu=mtu)
    gateway.start()
    pump(gateway, device)
    return gateway, device


def failure(session: Session) -> SessionFailed:
    events = session.events()
    failed = [event for event in events if isinstance(event, SessionFailed)]
    assert len(failed) == 1, events
    assert session.state is SessionState.CLOSED
    return failed[0]


@pytest.mark.parametrize("mtu", [23, 185, 517])
def test_normal_session_authenticates_both_ends(world: World, mtu: int) -> None:
    gateway, device = handshake(world, mtu=mtu)

    [gateway_done] = gateway.events()
    [device_done] = device.events()
    assert isinstance(gateway_done, HandshakeComplete)
    assert isinstance(device_done, HandshakeComplete)
    assert gateway_done.handshake_hash == device_done.handshake_hash
    assert gateway_done.device is not None
    assert gateway_done.device.device_id == world.device.device_id
    assert device_done.gateway is not None
    assert device_done.gateway.certificate is not None
    assert device_done.gateway.certificate.subject == "gw-test"
    # Only the device's first encrypted answer shows it accepted the certificate.
    assert gateway.state is SessionState.CONFIRMING
    assert device.state is SessionState.ESTABLISHED
    assert gateway.peer_static_key == world.device.noise_public
    assert device.peer_static_key == world.gateway_noise.public_key().public_bytes_raw()


@pytest.mark.parametrize("mtu", [23, 185, 517])
def test_request_and_response_cross_any_mtu(world: World, mtu: int) -> None:
    gateway, device = handshake(world, mtu=mtu)
    gateway.events(), device.events()
    request_id = gateway.send_request(LogRead(from_sequence=0, max_records=1000))
    pump(gateway, device)
    [received] = device.events()
    assert received == MessageReceived(request_id, LogRead(0, 1000))

    big = LogBatchMessage(batch=bytes(range(256)) * 200)  # far larger than one MTU
    device.send_response(request_id, big)
    fragments = pump(gateway, device)
    assert fragments >= len(big.batch) // (mtu - 3)
    assert gateway.events() == [MessageReceived(request_id, big)]
    assert gateway.pending_requests == 0
    assert gateway.state is SessionState.ESTABLISHED


def test_pairing_session_provisions_the_device(world: World) -> None:
    gateway = world.pairing_gateway_session()
    device = world.device_session(paired=False)
    gateway.start()
    pump(gateway, device)
    [done] = gateway.events()
    assert isinstance(done, HandshakeComplete)
    assert done.mode is SessionMode.PAIRING
    assert done.device is not None
    assert done.device.signing_key == world.device.signing_public
    [device_done] = device.events()
    assert isinstance(device_done, HandshakeComplete)
    assert device_done.gateway is not None
    assert device_done.gateway.certificate is None

    provision = Provision(
        device_id=world.device.device_id,
        authority_key=world.authority.public_key().public_bytes_raw(),
        site_id=SITE,
        time=NOW,
    )
    request_id = gateway.send_request(provision)
    pump(gateway, device)
    assert device.events() == [MessageReceived(request_id, provision)]
    device.send_response(request_id, Provisioned(world.device.device_id))
    pump(gateway, device)
    assert gateway.events() == [MessageReceived(request_id, Provisioned(world.device.device_id))]


def test_wrong_pairing_code_fails_cleanly_on_both_sides(world: World) -> None:
    gateway = world.pairing_gateway_session(code=PairingCode.generate())
    device = world.device_session(paired=False)
    gateway.start()
    pump(gateway, device)
    device_failure = failure(device)
    gateway_failure = failure(gateway)
    assert device_failure.error.code is ErrorCode.BAD_PAIRING_CODE
    assert gateway_failure.error.code is ErrorCode.BAD_PAIRING_CODE
    assert gateway_failure.by_peer


@pytest.mark.parametrize(
    ("certificate_changes", "code"),
    [
        ({"not_after": NOW - 1}, ErrorCode.CERT_EXPIRED),
        ({"not_before": NOW + 10}, ErrorCode.CERT_NOT_YET_VALID),
        ({"scope": Scope(sites=frozenset({SITE + 1}))}, ErrorCode.CERT_OUT_OF_SCOPE),
        ({"role": Role.REGISTRY}, ErrorCode.CERT_WRONG_ROLE),
    ],
    ids=["expired", "not-yet-valid", "out-of-scope", "wrong-role"],
)
def test_device_refuses_a_gateway_certificate(
    world: World, certificate_changes: dict[str, object], code: ErrorCode
) -> None:
    certificate = world.certificate(**certificate_changes)  # type: ignore[arg-type]  # per-case overrides
    gateway = world.gateway_session(certificate=certificate)
    device = world.device_session()
    gateway.start()
    pump(gateway, device)
    assert failure(device).error.code is code
    gateway_failure = failure(gateway)
    assert gateway_failure.error.code is code
    assert gateway_failure.by_peer


def test_device_refuses_a_certificate_from_another_authority(world: World) -> None:
    forged = world.certificate(issuer=Ed25519PrivateKey.generate())
    gateway, device = world.gateway_session(certificate=forged), world.device_session()
    gateway.start()
    pump(gateway, device)
    assert failure(device).error.code is ErrorCode.CERT_BAD_SIGNATURE


def test_device_refuses_a_certificate_for_another_session_key(world: World) -> None:
    stolen = world.certificate(noise_key=X25519PrivateKey.generate())
    gateway, device = world.gateway_session(certificate=stolen), world.device_session()
    gateway.start()
    pump(gateway, device)
    assert failure(device).error.code is ErrorCode.CERT_KEY_MISMATCH


def test_device_accepts_device_scoped_certificate(world: World) -> None:
    scope = Scope(devices=frozenset({world.device.device_id}))
    gateway = world.gateway_session(certificate=world.certificate(scope=scope))
    device = world.device_session()
    gateway.start()
    pump(gateway, device)
    assert device.state is SessionState.ESTABLISHED


def test_gateway_refuses_a_device_with_other_keys(world: World) -> None:
    impostor = World(authority=world.authority, device=DeviceIdentity.generate())
    gateway = world.gateway_session(device_id=impostor.device.device_id)
    device = impostor.device_session()
    gateway.start()
    pump(gateway, device)
    assert failure(gateway).error.code is ErrorCode.PEER_KEY_MISMATCH
    assert failure(device).error.code is ErrorCode.PEER_KEY_MISMATCH


@pytest.mark.parametrize(
    ("gateway_mode", "device_paired", "code"),
    [
        (SessionMode.NORMAL, False, ErrorCode.NOT_PAIRED),
        (SessionMode.PAIRING, True, ErrorCode.ALREADY_PAIRED),
    ],
)
def test_device_refuses_the_wrong_kind_of_session(
    world: World, gateway_mode: SessionMode, device_paired: bool, code: ErrorCode
) -> None:
    gateway = (
        world.gateway_session()
        if gateway_mode is SessionMode.NORMAL
        else world.pairing_gateway_session()
    )
    device = world.device_session(paired=device_paired)
    gateway.start()
    pump(gateway, device)
    assert failure(device).error.code is code
    assert failure(gateway).error.code is code


def test_error_reply_keeps_the_session(world: World) -> None:
    gateway, device = handshake(world)
    gateway.events(), device.events()
    request_id = gateway.send_request(TimeSync(gateway_time_ms=1))
    pump(gateway, device)
    device.events()
    device.send_response(request_id, ErrorReply(ErrorCode.TIME_BELOW_FLOOR, "too early"))
    pump(gateway, device)
    assert gateway.events() == [
        MessageReceived(request_id, ErrorReply(ErrorCode.TIME_BELOW_FLOOR, "too early"))
    ]
    assert gateway.state is device.state is SessionState.ESTABLISHED


def test_roles_cannot_send_what_is_not_theirs(world: World) -> None:
    gateway, device = handshake(world)
    with pytest.raises(LocalProtocolError):
        device.send_request(StatusRequest())
    with pytest.raises(LocalProtocolError):
        gateway.send_request(Status(world.hello().status))
    with pytest.raises(LocalProtocolError):
        device.send_response(99, Provisioned(world.device.device_id))
    request_id = gateway.send_request(StatusRequest())
    pump(gateway, device)
    with pytest.raises(LocalProtocolError):
        device.send_response(request_id, Provisioned(world.device.device_id))


def test_sending_before_the_handshake_is_a_local_error(world: World) -> None:
    gateway = world.gateway_session()
    with pytest.raises(LocalProtocolError):
        gateway.send_request(StatusRequest())
    gateway.start()
    with pytest.raises(LocalProtocolError):
        gateway.start()


def test_replayed_fragment_in_the_same_session_ends_it(world: World) -> None:
    gateway, device = handshake(world)
    gateway.events(), device.events()
    gateway.send_request(StatusRequest())
    [captured] = gateway.data_to_send()
    device.receive_fragment(captured)
    assert isinstance(device.next_event(), MessageReceived)
    device.receive_fragment(captured)
    assert failure(device).error.code is ErrorCode.DECRYPT_FAILED


def test_fragment_replayed_into_a_new_session_is_refused(world: World) -> None:
    gateway, _ = handshake(world)
    gateway.send_request(StatusRequest())
    [captured] = gateway.data_to_send()
    _, fresh_device = handshake(world)
    fresh_device.events()
    fresh_device.receive_fragment(captured)
    assert failure(fresh_device).error.code is ErrorCode.DECRYPT_FAILED


def test_fragment_replayed_against_another_device_is_refused(world: World) -> None:
    gateway, _ = handshake(world)
    gateway.send_request(StatusRequest())
    [captured] = gateway.data_to_send()
    other = World(authority=world.authority, gateway_noise=world.gateway_noise)
    other.gateway_signing = world.gateway_signing
    _, other_device = handshake(other)
    other_device.events()
    other_device.receive_fragment(captured)
    assert failure(other_device).error.code is ErrorCode.DECRYPT_FAILED


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_flipped_bit_in_transit_ends_the_session(data: st.DataObject) -> None:
    world = World()
    gateway, device = handshake(world, mtu=23)
    gateway.events(), device.events()
    gateway.send_request(TimeSync(gateway_time_ms=NOW * 1000))
    fragments = gateway.data_to_send()
    index = data.draw(st.integers(0, len(fragments) - 1))
    bit = data.draw(st.integers(0, len(fragments[index]) * 8 - 1))
    tampered = bytearray(fragments[index])
    tampered[bit // 8] ^= 1 << (bit % 8)
    fragments[index] = bytes(tampered)
    for fragment in fragments:
        device.receive_fragment(fragment)
    events = device.events()
    assert not any(isinstance(event, MessageReceived) for event in events)
    failed = [event for event in events if isinstance(event, SessionFailed)]
    assert len(failed) == 1
    assert device.state is SessionState.CLOSED


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(min_size=0, max_size=600), max_size=8), st.booleans())
def test_random_fragments_produce_only_typed_failures(
    fragments: list[bytes], established: bool
) -> None:
    world = World()
    if established:
        _, device = handshake(world)
        device.events()
    else:
        device = world.device_session()
    for fragment in fragments:
        device.receive_fragment(fragment)  # must never raise
    for event in device.events():
        assert isinstance(event, SessionFailed)
