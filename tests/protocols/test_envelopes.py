"""Certificates and signed authorisation updates: layouts, round trips and refusals."""

from __future__ import annotations

import contextlib
import hashlib
import struct
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import envelopes
from protocols.envelopes import (
    CERTIFICATE_DOMAIN,
    MAX_ACCESS_ENTRIES,
    MAX_CERTIFICATE_SIZE,
    MAX_REMOVED_KEYS,
    MAX_REVOCATIONS,
    MAX_UPDATE_BODY_SIZE,
    MAX_UPDATE_SIZE,
    UPDATE_DOMAIN,
    AccessEntry,
    AuthorisationUpdate,
    Certificate,
    RevocationEntry,
    Role,
    ScheduleWindow,
    Scope,
    SignedUpdate,
    Target,
    TargetKind,
    UpdateKind,
    decode_certificate,
    decode_update,
    encode_certificate,
    encode_update,
    issue_certificate,
    key_id,
    self_signed_authority,
    sign_update,
    verify_certificate,
    verify_update,
)
from protocols.errors import (
    CertificateError,
    DecodeError,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    UpdateRefused,
)

if TYPE_CHECKING:
    from collections.abc import Callable

AUTHORITY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
GATEWAY = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
NOISE = X25519PrivateKey.from_private_bytes(bytes(range(64, 96)))
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(96, 128)))

DEVICE = bytes.fromhex("d1d2d3d4d5d6d7d8")
OTHER_DEVICE = bytes.fromhex("e1e2e3e4e5e6e7e8")
SITE = 42
NOT_BEFORE = 1_700_000_000
NOT_AFTER = 1_800_000_000
ISSUED = 1_750_000_000
EXPIRES = ISSUED + 86_400
NOW = ISSUED + 60

SETTINGS = settings(max_examples=200, deadline=None)
SMALL = settings(max_examples=50, deadline=None)


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def gateway_cert(
    *,
    scope: Scope | None = None,
    role: Role = Role.GATEWAY,
    key: Ed25519PrivateKey = GATEWAY,
    issuer: Ed25519PrivateKey = AUTHORITY,
    not_before: int = NOT_BEFORE,
    not_after: int = NOT_AFTER,
) -> Certificate:
    return issue_certificate(
        issuer,
        role=role,
        subject="gateway-01",
        serial=7,
        signing_key=key.public_key(),
        noise_key=NOISE.public_key() if role is Role.GATEWAY else None,
        scope=scope
        if scope is not None
        else Scope(sites=frozenset({SITE}), devices=frozenset({DEVICE})),
        not_before=not_before,
        not_after=not_after,
    )


def full_update(**changes: Any) -> AuthorisationUpdate:
    fields: dict[str, Any] = {
        "kind": UpdateKind.ACCESS_FULL,
        "target": Target.device(DEVICE),
        "version": 3,
        "base_version": 0,
        "issued_at": ISSUED,
        "expires_at": EXPIRES,
        "access": (
            AccessEntry(
                1001,
                NOT_BEFORE,
                NOT_AFTER,
                (ScheduleWindow(0b0011111, 420, 900), ScheduleWindow(0b1100000, 540, 720)),
            ),
        ),
    }
    fields.update(changes)
    return AuthorisationUpdate(**fields)


def verify(signed: SignedUpdate, **changes: Any) -> AuthorisationUpdate:
    arguments: dict[str, Any] = {
        "authority_key": AUTHORITY.public_key(),
        "device_id": DEVICE,
        "site_id": SITE,
        "now": NOW,
        "access_version": 0,
        "revocation_version": 0,
    }
    arguments.update(changes)
    return verify_update(signed, **arguments)


# --------------------------------------------------------------------------------------
# Golden vectors: fixed keys, deterministic Ed25519, so the bytes never change.
# --------------------------------------------------------------------------------------

GOLDEN_CERTIFICATE = bytes.fromhex(
    "4c430103010a676174657761792d30310000000729acbae141bccaf0b22e1a94"
    "d34d0bc7361e526d0bfe12c89794bc9322966dd779a631eede1bf9c98f12032c"
    "deadd0e7a079398fc786b88cc846ec89af85a51a6553f1006b49d20001000000"
    "2a01d1d2d3d4d5d6d7d85edcd3992e50c24d3757820fa1d88fb85f10c7a27f9d"
    "083397cb45a92323e1b92a26f92a891fcc24a12a4859c8660a827750c33ab86a"
    "37b83e299cbcb4b3f60bee9bce25f76d400d"
)

GOLDEN_UPDATE = bytes.fromhex(
    "4c55010101d1d2d3d4d5d6d7d80000000300000000684ee18068503300000100"
    "0003e96553f1006b49d200021f01a4038460021c02d00000000000b24c430103"
    "010a676174657761792d30310000000729acbae141bccaf0b22e1a94d34d0bc7"
    "361e526d0bfe12c89794bc9322966dd779a631eede1bf9c98f12032cdeadd0e7"
    "a079398fc786b88cc846ec89af85a51a6553f1006b49d200010000002a01d1d2"
    "d3d4d5d6d7d85edcd3992e50c24d3757820fa1d88fb85f10c7a27f9d083397cb"
    "45a92323e1b92a26f92a891fcc24a12a4859c8660a827750c33ab86a37b83e29"
    "9cbcb4b3f60bee9bce25f76d400d4032b136c26f4bd85fdc67ed50aa1bc5b580"
    "16d5b5eb3c8c9186d9bb75a23b0d524fb32a3404890835fe531f70026753e291"
    "bf79b22cd1ed9d8466f7dfbb6f1b06"
)


def test_key_id_is_domain_separated_sha256_prefix() -> None:
    public = raw(AUTHORITY)
    expected = hashlib.sha256(b"lockgw/key-id/v1" + public).digest()[:8]
    assert key_id(AUTHORITY.public_key()) == expected == key_id(public)
    assert expected.hex() == "5edcd3992e50c24d"


def test_key_id_rejects_wrong_length() -> None:
    with pytest.raises(LocalProtocolError):
        key_id(bytes(31))


def test_golden_certificate() -> None:
    cert = gateway_cert()
    assert encode_certificate(cert) == GOLDEN_CERTIFICATE
    assert decode_certificate(GOLDEN_CERTIFICATE) == cert
    # Layout pieces checked by hand, not only by the code under test.
    assert GOLDEN_CERTIFICATE[:6] == b"LC\x01\x03\x01\x0a"  # magic, v1, gateway, noise flag
    assert GOLDEN_CERTIFICATE[6:16] == b"gateway-01"
    assert GOLDEN_CERTIFICATE[16:20] == struct.pack(">I", 7)
    assert GOLDEN_CERTIFICATE[20:52] == raw(GATEWAY)
    assert GOLDEN_CERTIFICATE[-72:-64] == key_id(AUTHORITY.public_key())
    # The signature is plain Ed25519 over the domain prefix and everything before it.
    AUTHORITY.public_key().verify(
        GOLDEN_CERTIFICATE[-64:], b"lockgw/cert/v1" + GOLDEN_CERTIFICATE[:-64]
    )
    verify_certificate(cert, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOW)


def test_golden_update() -> None:
    signed = sign_update(full_update(), key=GATEWAY, certificate=gateway_cert())
    assert encode_update(signed) == GOLDEN_UPDATE
    assert decode_update(GOLDEN_UPDATE) == signed
    body_size = 4 + 9 + 16 + 2 + (13 + 10) + 2 + 2
    body = GOLDEN_UPDATE[:body_size]
    assert body[:5] == b"LU\x01\x01\x01"  # magic, v1, full, device target
    assert GOLDEN_UPDATE[body_size : body_size + 2] == struct.pack(">H", 178)
    assert GOLDEN_UPDATE[body_size + 2 : body_size + 180] == GOLDEN_CERTIFICATE
    assert GOLDEN_UPDATE[body_size + 180] == 64
    GATEWAY.public_key().verify(
        GOLDEN_UPDATE[-64:], b"lockgw/update/v1" + body + GOLDEN_CERTIFICATE
    )
    assert verify(decode_update(GOLDEN_UPDATE)) == full_update()


# --------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------


def test_self_signed_authority_verifies_with_its_own_key() -> None:
    cert = self_signed_authority(AUTHORITY, "authority", 1, NOT_BEFORE, NOT_AFTER)
    assert cert.role is Role.AUTHORITY
    assert cert.scope == Scope(organisation_wide=True)
    assert cert.issuer == key_id(AUTHORITY.public_key())
    assert cert.noise_key is None
    verify_certificate(cert, AUTHORITY.public_key(), role=Role.AUTHORITY, now=NOW)
    assert decode_certificate(encode_certificate(cert)) == cert


def test_public_signing_key() -> None:
    key = gateway_cert().public_signing_key()
    assert isinstance(key, Ed25519PublicKey)
    assert key.public_bytes(Encoding.Raw, PublicFormat.Raw) == raw(GATEWAY)


def test_certificate_from_another_authority_is_bad_signature() -> None:
    cert = gateway_cert(issuer=OTHER)
    with pytest.raises(CertificateError) as info:
        verify_certificate(cert, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOW)
    assert info.value.code is ErrorCode.CERT_BAD_SIGNATURE


def test_altered_certificate_is_bad_signature() -> None:
    cert = replace(gateway_cert(), scope=Scope(organisation_wide=True))
    with pytest.raises(CertificateError) as info:
        verify_certificate(cert, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOW)
    assert info.value.code is ErrorCode.CERT_BAD_SIGNATURE


def test_certificate_wrong_role() -> None:
    cert = gateway_cert(role=Role.REGISTRY)
    with pytest.raises(CertificateError) as info:
        verify_certificate(cert, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOW)
    assert info.value.code is ErrorCode.CERT_WRONG_ROLE


def test_certificate_not_yet_valid_and_boundary() -> None:
    cert = gateway_cert()
    verify_certificate(cert, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOT_BEFORE)
    with pytest.raises(CertificateError) as info:
        verify_certificate(cert, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOT_BEFORE - 1)
    assert info.value.code is ErrorCode.CERT_NOT_YET_VALID


def test_certificate_expired_at_not_after() -> None:
    cert = gateway_cert()
    verify_certificate(cert, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOT_AFTER - 1)
    with pytest.raises(CertificateError) as info:
        verify_certificate(cert, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOT_AFTER)
    assert info.value.code is ErrorCode.CERT_EXPIRED


def test_certificate_checks_signature_before_role_and_time() -> None:
    forged = gateway_cert(role=Role.REGISTRY, issuer=OTHER)
    with pytest.raises(CertificateError) as info:
        verify_certificate(forged, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOT_AFTER)
    assert info.value.code is ErrorCode.CERT_BAD_SIGNATURE
    wrong_role = gateway_cert(role=Role.REGISTRY)
    with pytest.raises(CertificateError) as info:
        verify_certificate(wrong_role, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOT_AFTER)
    assert info.value.code is ErrorCode.CERT_WRONG_ROLE


def test_certificate_signature_is_domain_separated() -> None:
    # The authority's signature over the same body under the update prefix is useless.
    cert = gateway_cert()
    body = encode_certificate(cert)[:-64]
    wrong_domain = replace(cert, signature=AUTHORITY.sign(UPDATE_DOMAIN + body))
    with pytest.raises(CertificateError) as info:
        verify_certificate(wrong_domain, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOW)
    assert info.value.code is ErrorCode.CERT_BAD_SIGNATURE
    no_domain = replace(cert, signature=AUTHORITY.sign(body))
    with pytest.raises(CertificateError):
        verify_certificate(no_domain, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOW)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"noise_key": None}, "gateway without noise key"),
        ({"role": Role.REGISTRY}, "registry with noise key"),
        ({"subject": ""}, "empty subject"),
        ({"subject": "x" * 33}, "subject too long"),
        ({"subject": "é" * 17}, "34 UTF-8 bytes"),
        ({"subject": "gw\n01"}, "control character"),
        ({"subject": "\ud800"}, "lone surrogate"),
        ({"serial": -1}, "negative serial"),
        ({"serial": 2**32}, "serial over u32"),
        ({"serial": True}, "bool serial"),
        ({"signing_key": bytes(31)}, "short key"),
        ({"noise_key": bytes(33)}, "long noise key"),
        ({"not_before": NOT_AFTER}, "empty validity"),
        ({"not_after": 2**32}, "not_after over u32"),
        ({"issuer": bytes(7)}, "short issuer"),
        ({"signature": bytes(63)}, "short signature"),
        ({"role": 3}, "plain int role"),
    ],
)
def test_certificate_fields_are_validated(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(LocalProtocolError) as info:
        replace(gateway_cert(), **changes)
    assert info.value.code is ErrorCode.CERT_MALFORMED, reason


def test_subject_of_32_multibyte_bytes_is_accepted() -> None:
    cert = replace(gateway_cert(), subject="é" * 16)
    assert decode_certificate(encode_certificate(cert)) == cert


SMALL_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]
NON_CANONICAL = ["edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f", "ff" * 32]


def test_small_order_key_would_accept_a_forgery() -> None:
    # Why certificates refuse such keys: with the identity point as public key, the
    # signature (R = identity, S = 0) verifies for every message.
    identity = bytes([1]) + bytes(31)
    weak = Ed25519PublicKey.from_public_bytes(identity)
    for message in (b"any message at all", UPDATE_DOMAIN + GOLDEN_UPDATE):
        weak.verify(identity + bytes(32), message)


@pytest.mark.parametrize("weak", [bytes.fromhex(h) for h in SMALL_ORDER + NON_CANONICAL])
@pytest.mark.parametrize("sign_bit", [0, 0x80])
def test_weak_signing_keys_are_refused(weak: bytes, sign_bit: int) -> None:
    key = weak[:31] + bytes([weak[31] | sign_bit])
    with pytest.raises(LocalProtocolError) as info:
        replace(gateway_cert(), signing_key=key)
    assert info.value.code is ErrorCode.CERT_MALFORMED


def test_scope_covers() -> None:
    scope = Scope(sites=frozenset({SITE}), devices=frozenset({OTHER_DEVICE}))
    assert scope.covers(DEVICE, SITE)
    assert scope.covers(OTHER_DEVICE, 7)
    assert not scope.covers(DEVICE, 7)
    assert Scope(organisation_wide=True).covers(DEVICE, 7)
    assert not Scope().covers(DEVICE, SITE)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Scope(sites=frozenset(range(256))),
        lambda: Scope(devices=frozenset(i.to_bytes(8, "big") for i in range(256))),
        lambda: Scope(sites=frozenset({-1})),
        lambda: Scope(sites=frozenset({2**32})),
        lambda: Scope(devices=frozenset({bytes(7)})),
        lambda: Scope(sites=frozenset({1}), organisation_wide=True),
        lambda: Scope(sites={1}),  # type: ignore[arg-type]  # a set is not frozen
    ],
)
def test_scope_is_validated(build: Callable[[], Scope]) -> None:
    with pytest.raises(LocalProtocolError):
        build()


def test_scope_at_its_limits_round_trips() -> None:
    scope = Scope(
        sites=frozenset(range(2**32 - 255, 2**32)),
        devices=frozenset(i.to_bytes(8, "big") for i in range(255)),
    )
    cert = gateway_cert(scope=scope)
    encoded = encode_certificate(cert)
    assert len(encoded) == MAX_CERTIFICATE_SIZE - 22  # subject 10 of 32 bytes
    assert decode_certificate(encoded) == cert


def _cert_body_fields(cert: Certificate) -> dict[str, Any]:
    return envelopes._certificate_fields(cert)


def _rebuild_certificate(**changes: Any) -> bytes:
    cert = gateway_cert()
    fields = _cert_body_fields(cert)
    fields.update(changes)
    return envelopes._CERT_BODY.build(fields) + cert.signature


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (GOLDEN_CERTIFICATE[:-1], "truncated"),
        (GOLDEN_CERTIFICATE + b"\x00", "trailing byte"),
        (b"LX" + GOLDEN_CERTIFICATE[2:], "magic"),
        (GOLDEN_CERTIFICATE[:2] + b"\x02" + GOLDEN_CERTIFICATE[3:], "format version"),
        (_rebuild_certificate(role=9), "unknown role"),
        (_rebuild_certificate(flags=0x05), "unknown flag"),
        (_rebuild_certificate(sites=[43, 42]), "unsorted sites"),
        (_rebuild_certificate(sites=[42, 42]), "repeated site"),
        (_rebuild_certificate(flags=0x03), "org-wide with lists"),
        (_rebuild_certificate(subject=""), "empty subject"),
        (_rebuild_certificate(not_before=NOT_AFTER), "empty validity"),
        (_rebuild_certificate(flags=0x00, noise_key=None), "gateway without noise key"),
    ],
)
def test_decode_certificate_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_certificate(data)
    assert info.value.code is ErrorCode.CERT_MALFORMED, reason


def test_decode_certificate_refuses_non_bytes() -> None:
    with pytest.raises(DecodeError):
        decode_certificate("not bytes")  # type: ignore[arg-type]  # the wrong type on purpose


def test_decode_certificate_refuses_invalid_utf8_subject() -> None:
    data = bytearray(GOLDEN_CERTIFICATE)
    data[6] = 0xFF
    with pytest.raises(DecodeError):
        decode_certificate(bytes(data))


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_into_decode_certificate(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_certificate(data)


@SETTINGS
@given(st.integers(min_value=0, max_value=len(GOLDEN_CERTIFICATE) * 8 - 1))
def test_bit_flip_in_certificate_is_detected(bit: int) -> None:
    data = bytearray(GOLDEN_CERTIFICATE)
    data[bit // 8] ^= 1 << (bit % 8)
    try:
        cert = decode_certificate(bytes(data))
    except DecodeError:
        return
    assert encode_certificate(cert) == bytes(data)
    with pytest.raises(CertificateError):
        verify_certificate(cert, AUTHORITY.public_key(), role=Role.GATEWAY, now=NOW)


scopes = st.one_of(
    st.just(Scope(organisation_wide=True)),
    st.builds(
        Scope,
        sites=st.frozensets(st.integers(0, 2**32 - 1), max_size=20),
        devices=st.frozensets(st.binary(min_size=8, max_size=8), max_size=20),
    ),
)


@SMALL
@given(
    role=st.sampled_from(Role),
    subject=st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=8),
    serial=st.integers(0, 2**32 - 1),
    scope=scopes,
    not_before=st.integers(0, 2**32 - 2),
)
def test_certificate_round_trip(
    role: Role, subject: str, serial: int, scope: Scope, not_before: int
) -> None:
    cert = issue_certificate(
        AUTHORITY,
        role=role,
        subject=subject,
        serial=serial,
        signing_key=GATEWAY.public_key(),
        noise_key=NOISE.public_key() if role is Role.GATEWAY else None,
        scope=scope,
        not_before=not_before,
        not_after=not_before + 1,
    )
    assert decode_certificate(encode_certificate(cert)) == cert
    verify_certificate(cert, AUTHORITY.public_key(), role=role, now=not_before)


# --------------------------------------------------------------------------------------
# Construction rules of updates
# --------------------------------------------------------------------------------------


def test_target_constructors_and_matching() -> None:
    assert Target.device(DEVICE) == Target(TargetKind.DEVICE, device_id=DEVICE)
    assert Target.site(SITE) == Target(TargetKind.SITE, site_id=SITE)
    assert Target.fleet() == Target(TargetKind.FLEET)
    assert Target.device(DEVICE).matches(DEVICE, 1)
    assert not Target.device(DEVICE).matches(OTHER_DEVICE, SITE)
    assert Target.site(SITE).matches(OTHER_DEVICE, SITE)
    assert not Target.site(SITE).matches(DEVICE, SITE + 1)
    assert Target.fleet().matches(DEVICE, 0)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Target(TargetKind.DEVICE),
        lambda: Target(TargetKind.DEVICE, device_id=bytes(7)),
        lambda: Target(TargetKind.DEVICE, device_id=DEVICE, site_id=1),
        lambda: Target(TargetKind.SITE),
        lambda: Target(TargetKind.SITE, site_id=2**32),
        lambda: Target(TargetKind.SITE, site_id=1, device_id=DEVICE),
        lambda: Target(TargetKind.FLEET, site_id=1),
        lambda: Target(1, device_id=DEVICE),  # type: ignore[arg-type]  # int, not enum
    ],
)
def test_target_is_validated(build: Callable[[], Target]) -> None:
    with pytest.raises(LocalProtocolError) as info:
        build()
    assert info.value.code is ErrorCode.UPDATE_MALFORMED


@pytest.mark.parametrize(
    ("days", "start", "end"),
    [(0, 0, 60), (128, 0, 60), (1, 60, 60), (1, 61, 60), (1, 0, 1441), (1, -1, 60)],
)
def test_schedule_window_is_validated(days: int, start: int, end: int) -> None:
    with pytest.raises(LocalProtocolError):
        ScheduleWindow(days, start, end)


def test_schedule_window_full_day_and_contains() -> None:
    window = ScheduleWindow(0b0000001, 0, 1440)  # Mondays, all day
    assert window.contains(0, 0)
    assert window.contains(0, 1439)
    assert not window.contains(1, 0)
    window = ScheduleWindow(0x7F, 480, 960)
    assert window.contains(6, 480)
    assert not window.contains(6, 960)


@pytest.mark.parametrize(
    "build",
    [
        lambda: AccessEntry(0, 0, 1, (ScheduleWindow(1, 0, 60),)),
        lambda: AccessEntry(1, 5, 5, (ScheduleWindow(1, 0, 60),)),
        lambda: AccessEntry(1, 0, 1, ()),
        lambda: AccessEntry(1, 0, 1, (ScheduleWindow(1, 0, 60),) * 9),
        lambda: AccessEntry(1, 0, 1, [ScheduleWindow(1, 0, 60)]),  # type: ignore[arg-type]  # list
        lambda: RevocationEntry(0, 10),
        lambda: RevocationEntry(1, -1),
    ],
)
def test_entries_are_validated(build: Callable[[], object]) -> None:
    with pytest.raises(LocalProtocolError):
        build()


ENTRY = AccessEntry(5, NOT_BEFORE, NOT_AFTER, (ScheduleWindow(0x7F, 0, 1440),))


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"removed_keys": (9,)}, ErrorCode.UPDATE_MALFORMED),
        ({"revocations": (RevocationEntry(9, 1),)}, ErrorCode.UPDATE_MALFORMED),
        ({"base_version": 1}, ErrorCode.UPDATE_MALFORMED),
        ({"target": Target.fleet()}, ErrorCode.UPDATE_MALFORMED),
        ({"version": 0}, ErrorCode.UPDATE_MALFORMED),
        ({"expires_at": ISSUED}, ErrorCode.UPDATE_MALFORMED),
        ({"access": (ENTRY, ENTRY)}, ErrorCode.UPDATE_MALFORMED),
        ({"kind": UpdateKind.REVOCATION}, ErrorCode.UPDATE_MALFORMED),
        ({"kind": UpdateKind.ACCESS_DELTA, "base_version": 3}, ErrorCode.UPDATE_MALFORMED),
        (
            {
                "kind": UpdateKind.ACCESS_DELTA,
                "base_version": 1,
                "access": (ENTRY,),
                "removed_keys": (5,),
            },
            ErrorCode.UPDATE_MALFORMED,
        ),
        (
            {"kind": UpdateKind.ACCESS_DELTA, "base_version": 1, "removed_keys": (7, 7)},
            ErrorCode.UPDATE_MALFORMED,
        ),
        (
            {"kind": UpdateKind.ACCESS_DELTA, "base_version": 1, "removed_keys": (0,)},
            ErrorCode.UPDATE_MALFORMED,
        ),
        (
            {
                "kind": UpdateKind.REVOCATION,
                "access": (),
                "revocations": (RevocationEntry(9, 1), RevocationEntry(9, 2)),
            },
            ErrorCode.UPDATE_MALFORMED,
        ),
        (
            {"kind": UpdateKind.ACCESS_DELTA, "base_version": 1, "access": [ENTRY]},
            ErrorCode.UPDATE_MALFORMED,
        ),
        (
            {
                "access": tuple(
                    AccessEntry(k, 0, 1, (ScheduleWindow(1, 0, 1),))
                    for k in range(1, MAX_ACCESS_ENTRIES + 2)
                )
            },
            ErrorCode.UPDATE_TOO_LARGE,
        ),
        (
            {
                "kind": UpdateKind.ACCESS_DELTA,
                "base_version": 1,
                "access": (),
                "removed_keys": tuple(range(1, MAX_REMOVED_KEYS + 2)),
            },
            ErrorCode.UPDATE_TOO_LARGE,
        ),
        (
            {
                "kind": UpdateKind.REVOCATION,
                "access": (),
                "revocations": tuple(RevocationEntry(k, 0) for k in range(1, MAX_REVOCATIONS + 2)),
            },
            ErrorCode.UPDATE_TOO_LARGE,
        ),
        (
            # 2000 entries of 8 windows are within the counts but not within the bytes.
            {
                "access": tuple(
                    AccessEntry(k, 0, 1, (ScheduleWindow(1, 0, 1),) * 8)
                    for k in range(1, MAX_ACCESS_ENTRIES + 1)
                )
            },
            ErrorCode.UPDATE_TOO_LARGE,
        ),
    ],
)
def test_update_consistency(changes: dict[str, Any], code: ErrorCode) -> None:
    with pytest.raises(LocalProtocolError) as info:
        full_update(**changes)
    assert info.value.code is code


def _entries_with_body_size(size: int) -> tuple[AccessEntry, ...]:
    """Access entries that make a device-targeted full update body exactly ``size``.

    An entry of w windows takes 13 + 5w bytes, so n entries with W windows in all take
    13n + 5W: find the fewest entries that can hold the room, then spread the windows.
    """
    room = size - (4 + 9 + 16 + 2 + 2 + 2)
    for count in range(1, MAX_ACCESS_ENTRIES + 1):
        rest = room - 13 * count
        if rest % 5 == 0 and count <= rest // 5 <= 8 * count:
            break
    else:
        pytest.fail(f"no access list of {size} bytes")
    per_entry, extra = divmod(rest // 5, count)
    return tuple(
        AccessEntry(key, 0, 1, (ScheduleWindow(1, 0, 1),) * (per_entry + (key <= extra)))
        for key in range(1, count + 1)
    )


def test_largest_update_with_largest_certificate_fits() -> None:
    assert MAX_UPDATE_BODY_SIZE + 2 + MAX_CERTIFICATE_SIZE + 1 + 64 == MAX_UPDATE_SIZE
    entries = _entries_with_body_size(MAX_UPDATE_BODY_SIZE)
    update = full_update(access=entries)
    with pytest.raises(LocalProtocolError) as info:
        full_update(access=(*entries, AccessEntry(10**6, 0, 1, (ScheduleWindow(1, 0, 1),))))
    assert info.value.code is ErrorCode.UPDATE_TOO_LARGE
    scope = Scope(
        sites=frozenset(range(255)), devices=frozenset(i.to_bytes(8, "big") for i in range(255))
    )
    cert = issue_certificate(
        AUTHORITY,
        role=Role.GATEWAY,
        subject="s" * 32,
        serial=1,
        signing_key=GATEWAY.public_key(),
        noise_key=NOISE.public_key(),
        scope=scope,
        not_before=NOT_BEFORE,
        not_after=NOT_AFTER,
    )
    assert len(encode_certificate(cert)) == MAX_CERTIFICATE_SIZE
    encoded = encode_update(sign_update(update, key=GATEWAY, certificate=cert))
    assert len(encoded) == MAX_UPDATE_SIZE
    signed = decode_update(encoded)
    assert verify(signed, site_id=0) == update


def test_sign_update_refuses_key_not_matching_certificate() -> None:
    with pytest.raises(LocalProtocolError) as info:
        sign_update(full_update(), key=OTHER, certificate=gateway_cert())
    assert info.value.code is ErrorCode.CERT_KEY_MISMATCH


def test_signed_update_signature_length_is_validated() -> None:
    with pytest.raises(LocalProtocolError):
        SignedUpdate(full_update(), gateway_cert(), bytes(63))


# --------------------------------------------------------------------------------------
# Encoding of updates
# --------------------------------------------------------------------------------------


windows = st.builds(
    lambda days, start, length: ScheduleWindow(days, start, min(1440, start + length)),
    st.integers(1, 127),
    st.integers(0, 1439),
    st.integers(1, 1440),
)
key_ids = st.integers(1, 2**32 - 1)
access_entries = st.builds(
    lambda key, start, length, ws: AccessEntry(key, start, min(2**32 - 1, start + length), ws),
    key_ids,
    st.integers(0, 2**32 - 2),
    st.integers(1, 2**32),
    st.lists(windows, min_size=1, max_size=8).map(tuple),
)
access_lists = st.lists(access_entries, max_size=6, unique_by=lambda e: e.key_id).map(tuple)
targets = st.one_of(
    st.binary(min_size=8, max_size=8).map(Target.device),
    st.integers(0, 2**32 - 1).map(Target.site),
)


@st.composite
def updates(draw: st.DrawFn) -> AuthorisationUpdate:
    kind = draw(st.sampled_from(UpdateKind))
    version = draw(st.integers(1, 2**32 - 1))
    issued_at = draw(st.integers(0, 2**32 - 2))
    expires_at = draw(st.integers(issued_at + 1, 2**32 - 1))
    if kind is UpdateKind.REVOCATION:
        revocations = draw(
            st.lists(
                st.builds(RevocationEntry, key_ids, st.integers(0, 2**32 - 1)),
                max_size=6,
                unique_by=lambda e: e.key_id,
            )
        )
        return AuthorisationUpdate(
            kind,
            draw(st.one_of(targets, st.just(Target.fleet()))),
            version,
            0,
            issued_at,
            expires_at,
            revocations=tuple(revocations),
        )
    access = draw(access_lists)
    if kind is UpdateKind.ACCESS_FULL:
        return AuthorisationUpdate(
            kind, draw(targets), version, 0, issued_at, expires_at, access=access
        )
    taken = {entry.key_id for entry in access}
    removed = draw(st.lists(key_ids.filter(lambda k: k not in taken), max_size=6, unique=True))
    return AuthorisationUpdate(
        kind,
        draw(targets),
        version,
        draw(st.integers(0, version - 1)),
        issued_at,
        expires_at,
        access=access,
        removed_keys=tuple(removed),
    )


@SETTINGS
@given(updates())
def test_update_round_trip(update: AuthorisationUpdate) -> None:
    signed = sign_update(update, key=GATEWAY, certificate=gateway_cert())
    encoded = encode_update(signed)
    assert decode_update(encoded) == signed
    assert len(envelopes._update_body(update)) == envelopes._body_size(update)


@SMALL
@given(updates())
def test_unsigned_update_round_trip(update: AuthorisationUpdate) -> None:
    for signed in (
        SignedUpdate(update, None, b""),
        SignedUpdate(update, gateway_cert(), b""),
        SignedUpdate(update, None, bytes(64)),
    ):
        assert decode_update(encode_update(signed)) == signed


def _body(update: AuthorisationUpdate) -> bytes:
    return envelopes._update_body(update)


def _with_trailer(body: bytes, cert: bytes = GOLDEN_CERTIFICATE, sig: bytes = bytes(64)) -> bytes:
    return body + struct.pack(">H", len(cert)) + cert + bytes([len(sig)]) + sig


HEADER = _body(full_update(access=()))[:-6]  # up to the three list counts


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (GOLDEN_UPDATE[:-1], "truncated"),
        (GOLDEN_UPDATE + b"\x00", "trailing"),
        (b"LC" + GOLDEN_UPDATE[2:], "magic"),
        (GOLDEN_UPDATE[:2] + b"\x02" + GOLDEN_UPDATE[3:], "format"),
        (GOLDEN_UPDATE[:3] + b"\x07" + GOLDEN_UPDATE[4:], "kind"),
        (GOLDEN_UPDATE[:4] + b"\x09" + GOLDEN_UPDATE[5:], "target kind"),
        (_with_trailer(HEADER + struct.pack(">HHH", MAX_ACCESS_ENTRIES + 1, 0, 0)), "access count"),
        (_with_trailer(HEADER + struct.pack(">HHH", 0, MAX_REMOVED_KEYS + 1, 0)), "removed count"),
        (_with_trailer(HEADER + struct.pack(">HHH", 0, 0, MAX_REVOCATIONS + 1)), "revocations"),
        (_with_trailer(HEADER + struct.pack(">HHH", 0xFFFF, 0, 0)), "huge count"),
        (_with_trailer(_body(full_update()), sig=bytes(63)), "signature length"),
        (_with_trailer(_body(full_update()), cert=GOLDEN_CERTIFICATE[:-1]), "bad certificate"),
        (_with_trailer(_body(full_update()), cert=b"\x00"), "tiny certificate"),
        (
            _with_trailer(
                HEADER
                + struct.pack(">HIIIB", 1, 5, 0, 1, 9)
                + struct.pack(">BHH", 1, 0, 1) * 9
                + struct.pack(">HH", 0, 0)
            ),
            "window count",
        ),
        (
            _with_trailer(HEADER + struct.pack(">HIIIBBHH", 1, 5, 0, 1, 1, 1, 60, 60) + bytes(4)),
            "empty window",
        ),
    ],
)
def test_decode_update_refuses(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_update(data)
    assert info.value.code is ErrorCode.UPDATE_MALFORMED, reason


def test_decode_update_takes_any_bytes_like_and_refuses_others() -> None:
    expected = decode_update(GOLDEN_UPDATE)
    assert decode_update(bytearray(GOLDEN_UPDATE)) == expected  # type: ignore[arg-type]  # bytes-like
    assert decode_update(memoryview(GOLDEN_UPDATE)) == expected  # type: ignore[arg-type]  # bytes-like
    with pytest.raises(DecodeError) as info:
        decode_update(GOLDEN_UPDATE.hex())  # type: ignore[arg-type]  # the wrong type on purpose
    assert info.value.code is ErrorCode.UPDATE_MALFORMED


def test_decode_update_refuses_oversized_before_parsing() -> None:
    with pytest.raises(DecodeError) as info:
        decode_update(GOLDEN_UPDATE + bytes(MAX_UPDATE_SIZE))
    assert info.value.code is ErrorCode.UPDATE_TOO_LARGE


def test_decode_update_refuses_body_over_budget() -> None:
    # Within 60000 bytes overall (no certificate), yet a body no signer could send.
    body = _body(full_update(access=_entries_with_body_size(MAX_UPDATE_BODY_SIZE)))
    extra = AccessEntry(10**6, 0, 1, (ScheduleWindow(1, 0, 1),))
    count = struct.unpack(">H", body[29:31])[0]
    entry = struct.pack(">IIIBBHH", extra.key_id, 0, 1, 1, 1, 0, 1)
    grown = body[:29] + struct.pack(">H", count + 1) + body[31:-4] + entry + body[-4:]
    data = grown + b"\x00\x00\x00"  # no certificate, no signature
    assert len(data) <= MAX_UPDATE_SIZE
    with pytest.raises(DecodeError) as info:
        decode_update(data)
    assert info.value.code is ErrorCode.UPDATE_TOO_LARGE


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_into_decode_update(data: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_update(data)


@SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_after_valid_header_into_decode_update(tail: bytes) -> None:
    with contextlib.suppress(DecodeError):
        decode_update(GOLDEN_UPDATE[:5] + tail)


@SETTINGS
@given(st.integers(min_value=0, max_value=len(GOLDEN_UPDATE) * 8 - 1))
def test_bit_flip_in_signed_update_is_detected(bit: int) -> None:
    data = bytearray(GOLDEN_UPDATE)
    data[bit // 8] ^= 1 << (bit % 8)
    try:
        signed = decode_update(bytes(data))
    except DecodeError:
        return
    assert encode_update(signed) == bytes(data)
    with pytest.raises(ProtocolError):
        verify(signed)


# --------------------------------------------------------------------------------------
# verify_update: every refusal, and their order
# --------------------------------------------------------------------------------------


def signed_full(**changes: Any) -> SignedUpdate:
    return sign_update(full_update(**changes), key=GATEWAY, certificate=gateway_cert())


def test_verify_accepts_good_update() -> None:
    assert verify(signed_full()) == full_update()


def test_unsigned_without_certificate() -> None:
    with pytest.raises(UpdateRefused) as info:
        verify(SignedUpdate(full_update(), None, b""))
    assert info.value.code is ErrorCode.UPDATE_UNSIGNED


def test_unsigned_with_certificate_but_no_signature() -> None:
    with pytest.raises(UpdateRefused) as info:
        verify(SignedUpdate(full_update(), gateway_cert(), b""))
    assert info.value.code is ErrorCode.UPDATE_UNSIGNED


def test_signature_without_certificate_is_unsigned() -> None:
    signed = signed_full()
    with pytest.raises(UpdateRefused) as info:
        verify(SignedUpdate(signed.update, None, signed.signature))
    assert info.value.code is ErrorCode.UPDATE_UNSIGNED


def _signed_with(cert: Certificate, key: Ed25519PrivateKey = GATEWAY) -> SignedUpdate:
    return sign_update(full_update(), key=key, certificate=cert)


def test_update_certificate_bad_signature() -> None:
    with pytest.raises(CertificateError) as info:
        verify(_signed_with(gateway_cert(issuer=OTHER)))
    assert info.value.code is ErrorCode.CERT_BAD_SIGNATURE


def test_update_certificate_wrong_role() -> None:
    with pytest.raises(CertificateError) as info:
        verify(_signed_with(gateway_cert(role=Role.REGISTRY)))
    assert info.value.code is ErrorCode.CERT_WRONG_ROLE


def test_authority_certificate_cannot_sign_updates() -> None:
    cert = self_signed_authority(AUTHORITY, "authority", 1, NOT_BEFORE, NOT_AFTER)
    with pytest.raises(CertificateError) as info:
        verify(_signed_with(cert, key=AUTHORITY))
    assert info.value.code is ErrorCode.CERT_WRONG_ROLE


def test_update_certificate_not_yet_valid() -> None:
    with pytest.raises(CertificateError) as info:
        verify(_signed_with(gateway_cert(not_before=NOW + 1)))
    assert info.value.code is ErrorCode.CERT_NOT_YET_VALID


def test_update_certificate_expired() -> None:
    with pytest.raises(CertificateError) as info:
        verify(_signed_with(gateway_cert(not_after=NOW)))
    assert info.value.code is ErrorCode.CERT_EXPIRED


def test_update_signed_by_another_key() -> None:
    signed = signed_full()
    forged = replace(signed, signature=OTHER.sign(b"lockgw/update/v1" + _body(signed.update)))
    with pytest.raises(UpdateRefused) as info:
        verify(forged)
    assert info.value.code is ErrorCode.UPDATE_BAD_SIGNATURE


def test_altered_update_is_bad_signature() -> None:
    signed = signed_full()
    altered = replace(signed, update=full_update(version=4))
    with pytest.raises(UpdateRefused) as info:
        verify(altered)
    assert info.value.code is ErrorCode.UPDATE_BAD_SIGNATURE


def test_swapped_certificate_is_bad_signature() -> None:
    # Same key, wider scope: the signature binds the certificate it was made with.
    signed = signed_full()
    wider = gateway_cert(scope=Scope(organisation_wide=True))
    with pytest.raises(UpdateRefused) as info:
        verify(replace(signed, certificate=wider))
    assert info.value.code is ErrorCode.UPDATE_BAD_SIGNATURE


def test_update_signature_is_domain_separated() -> None:
    cert = gateway_cert()
    signed_bytes = _body(full_update()) + encode_certificate(cert)
    for prefix in (CERTIFICATE_DOMAIN, b""):
        forged = SignedUpdate(full_update(), cert, GATEWAY.sign(prefix + signed_bytes))
        with pytest.raises(UpdateRefused) as info:
            verify(forged)
        assert info.value.code is ErrorCode.UPDATE_BAD_SIGNATURE


def test_wrong_target_device() -> None:
    with pytest.raises(UpdateRefused) as info:
        verify(signed_full(target=Target.device(OTHER_DEVICE)))
    assert info.value.code is ErrorCode.UPDATE_WRONG_TARGET


def test_wrong_target_site() -> None:
    with pytest.raises(UpdateRefused) as info:
        verify(signed_full(target=Target.site(SITE + 1)))
    assert info.value.code is ErrorCode.UPDATE_WRONG_TARGET


def test_site_target_accepted() -> None:
    assert verify(signed_full(target=Target.site(SITE))).target == Target.site(SITE)


def test_out_of_scope() -> None:
    cert = gateway_cert(scope=Scope(sites=frozenset({SITE})))
    signed = sign_update(full_update(), key=GATEWAY, certificate=cert)
    assert verify(signed) == full_update()
    with pytest.raises(UpdateRefused) as info:
        verify(signed, site_id=SITE + 1)
    assert info.value.code is ErrorCode.UPDATE_OUT_OF_SCOPE


def test_fleet_revocation_still_needs_scope() -> None:
    update = AuthorisationUpdate(
        UpdateKind.REVOCATION,
        Target.fleet(),
        version=1,
        base_version=0,
        issued_at=ISSUED,
        expires_at=EXPIRES,
        revocations=(RevocationEntry(9, NOT_AFTER),),
    )
    signed = sign_update(update, key=GATEWAY, certificate=gateway_cert())
    assert verify(signed) == update
    with pytest.raises(UpdateRefused) as info:
        verify(signed, device_id=OTHER_DEVICE, site_id=SITE + 1)
    assert info.value.code is ErrorCode.UPDATE_OUT_OF_SCOPE


def test_update_not_yet_valid() -> None:
    assert verify(signed_full(), now=ISSUED) == full_update()
    with pytest.raises(UpdateRefused) as info:
        verify(signed_full(), now=ISSUED - 1)
    assert info.value.code is ErrorCode.UPDATE_NOT_YET_VALID


def test_update_expired() -> None:
    assert verify(signed_full(), now=EXPIRES - 1) == full_update()
    with pytest.raises(UpdateRefused) as info:
        verify(signed_full(), now=EXPIRES)
    assert info.value.code is ErrorCode.UPDATE_EXPIRED


def test_access_rollback() -> None:
    assert verify(signed_full(), access_version=2) == full_update()
    with pytest.raises(UpdateRefused) as info:
        verify(signed_full(), access_version=3)
    assert info.value.code is ErrorCode.UPDATE_ROLLBACK


def test_revocation_rollback_uses_revocation_version() -> None:
    update = AuthorisationUpdate(
        UpdateKind.REVOCATION,
        Target.device(DEVICE),
        version=5,
        base_version=0,
        issued_at=ISSUED,
        expires_at=EXPIRES,
        revocations=(RevocationEntry(9, NOT_AFTER),),
    )
    signed = sign_update(update, key=GATEWAY, certificate=gateway_cert())
    assert verify(signed, access_version=100, revocation_version=4) == update
    with pytest.raises(UpdateRefused) as info:
        verify(signed, access_version=0, revocation_version=5)
    assert info.value.code is ErrorCode.UPDATE_ROLLBACK


def test_delta_base_mismatch() -> None:
    signed = signed_full(kind=UpdateKind.ACCESS_DELTA, base_version=2)
    assert verify(signed, access_version=2).kind is UpdateKind.ACCESS_DELTA
    with pytest.raises(UpdateRefused) as info:
        verify(signed, access_version=1)
    assert info.value.code is ErrorCode.UPDATE_BASE_MISMATCH


@pytest.mark.parametrize(
    ("signed", "arguments", "code"),
    [
        # Unsigned beats an expired certificate and everything else.
        (
            SignedUpdate(full_update(), gateway_cert(not_after=NOW), b""),
            {"device_id": OTHER_DEVICE, "access_version": 9},
            ErrorCode.UPDATE_UNSIGNED,
        ),
        # A bad certificate beats a bad update signature and a wrong target.
        (
            replace(_signed_with(gateway_cert(not_after=NOW)), signature=bytes(64)),
            {"device_id": OTHER_DEVICE},
            ErrorCode.CERT_EXPIRED,
        ),
        # A bad signature beats wrong target, scope, time and version claims.
        (
            replace(signed_full(), signature=bytes(64)),
            {"device_id": OTHER_DEVICE, "site_id": 1, "now": EXPIRES, "access_version": 9},
            ErrorCode.UPDATE_BAD_SIGNATURE,
        ),
        # Wrong target beats out of scope.
        (signed_full(), {"device_id": OTHER_DEVICE, "site_id": 1}, ErrorCode.UPDATE_WRONG_TARGET),
        # Out of scope beats expiry.
        (
            signed_full(target=Target.site(SITE + 1)),
            {"device_id": OTHER_DEVICE, "site_id": SITE + 1, "now": EXPIRES},
            ErrorCode.UPDATE_OUT_OF_SCOPE,
        ),
        # Expiry beats rollback.
        (signed_full(), {"now": EXPIRES, "access_version": 9}, ErrorCode.UPDATE_EXPIRED),
        # Rollback beats base mismatch.
        (
            signed_full(kind=UpdateKind.ACCESS_DELTA, base_version=2),
            {"access_version": 3},
            ErrorCode.UPDATE_ROLLBACK,
        ),
    ],
)
def test_refusal_order(signed: SignedUpdate, arguments: dict[str, Any], code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as info:
        verify(signed, **arguments)
    assert info.value.code is code


def test_bad_certificate_signature_beats_update_checks() -> None:
    # Out of scope device; forged certificate: the certificate is reported first.
    signed = _signed_with(gateway_cert(issuer=OTHER))
    with pytest.raises(CertificateError) as info:
        verify(signed, device_id=OTHER_DEVICE, site_id=1)
    assert info.value.code is ErrorCode.CERT_BAD_SIGNATURE


def test_verify_rejects_bad_device_id_argument() -> None:
    with pytest.raises(LocalProtocolError):
        verify(signed_full(), device_id=b"short")


def test_weak_key_certificate_cannot_be_decoded_even_if_signed() -> None:
    # An authority tricked into signing a small-order key still produces nothing usable.
    cert = gateway_cert()
    fields = _cert_body_fields(cert)
    fields["signing_key"] = bytes(32)
    body = envelopes._CERT_BODY.build(fields)
    data = body + AUTHORITY.sign(CERTIFICATE_DOMAIN + body)
    with pytest.raises(DecodeError):
        decode_certificate(data)


def test_invalid_signature_exception_is_chained() -> None:
    signed = replace(signed_full(), signature=bytes(64))
    with pytest.raises(UpdateRefused) as info:
        verify(signed)
    assert isinstance(info.value.__cause__, InvalidSignature)
