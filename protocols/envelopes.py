"""Certificates and signed authorisation updates.

Two compact, signed binary envelopes:

* a :class:`Certificate` binds an Ed25519 signing key (and, for a gateway, its Noise
  X25519 key) to a role, a subject and a scope of sites and devices, signed by the
  organisation's authority key;
* a :class:`SignedUpdate` carries an :class:`AuthorisationUpdate` (the access list of a
  device or site, a delta to it, or the revocation list) signed by a gateway whose
  certificate travels with it, so a device holding only the authority's public key can
  check it offline with :func:`verify_update` before it applies anything.

Every signature covers a domain-separation prefix, so a signature over one kind of
envelope is never valid as another. Decoding is canonical: a value has exactly one
encoding, and :func:`decode_certificate` / :func:`decode_update` refuse every other byte
string, so verifiers can re-encode a decoded value and check the signature over it.
Sans-IO: the current time is always the parameter ``now`` (unix seconds).
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Final

import construct
from construct import this
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocols._codec import build, parse_exact
from protocols.errors import (
    CertificateError,
    DecodeError,
    ErrorCode,
    LocalProtocolError,
    UpdateRefused,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

__all__ = [
    "CERTIFICATE_DOMAIN",
    "DEVICE_ID_SIZE",
    "KEY_ID_DOMAIN",
    "KEY_ID_SIZE",
    "MAX_ACCESS_ENTRIES",
    "MAX_CERTIFICATE_SIZE",
    "MAX_REMOVED_KEYS",
    "MAX_REVOCATIONS",
    "MAX_SCOPE_DEVICES",
    "MAX_SCOPE_SITES",
    "MAX_UPDATE_BODY_SIZE",
    "MAX_UPDATE_SIZE",
    "MAX_WINDOWS",
    "MINUTES_PER_DAY",
    "PUBLIC_KEY_SIZE",
    "SIGNATURE_SIZE",
    "UPDATE_DOMAIN",
    "AccessEntry",
    "AuthorisationUpdate",
    "Certificate",
    "RevocationEntry",
    "Role",
    "ScheduleWindow",
    "Scope",
    "SignedUpdate",
    "Target",
    "TargetKind",
    "UpdateKind",
    "decode_certificate",
    "decode_update",
    "encode_certificate",
    "encode_update",
    "issue_certificate",
    "key_id",
    "self_signed_authority",
    "sign_update",
    "verify_certificate",
    "verify_update",
]

# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------

KEY_ID_DOMAIN: Final = b"lockgw/key-id/v1"
"""Prefix hashed in front of an Ed25519 public key to derive its 8-byte key id."""

CERTIFICATE_DOMAIN: Final = b"lockgw/cert/v1"
"""Prefix of the bytes a certificate signature covers."""

UPDATE_DOMAIN: Final = b"lockgw/update/v1"
"""Prefix of the bytes an update signature covers."""

_CERT_MAGIC: Final = b"LC"
_UPDATE_MAGIC: Final = b"LU"
_FORMAT_VERSION: Final = 1

DEVICE_ID_SIZE: Final = 8
KEY_ID_SIZE: Final = 8
PUBLIC_KEY_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64
MAX_SUBJECT_BYTES: Final = 32

MAX_SCOPE_SITES: Final = 255
MAX_SCOPE_DEVICES: Final = 255
MAX_WINDOWS: Final = 8
MAX_ACCESS_ENTRIES: Final = 2000
MAX_REMOVED_KEYS: Final = 2000
MAX_REVOCATIONS: Final = 4000

MINUTES_PER_DAY: Final = 1440
_ALL_DAYS: Final = 0x7F

_U32_MAX: Final = 0xFFFF_FFFF

MAX_UPDATE_SIZE: Final = 60000
"""Largest encoded signed update (body, certificate and signature); it must fit one Noise
transport message (65535 bytes) with room for the message header and the AEAD tag."""

MAX_CERTIFICATE_SIZE: Final = (
    len(_CERT_MAGIC)
    + 3  # format version, role, flags
    + 1
    + MAX_SUBJECT_BYTES
    + 4  # serial
    + PUBLIC_KEY_SIZE  # signing key
    + PUBLIC_KEY_SIZE  # noise key
    + 8  # not_before, not_after
    + 1
    + 4 * MAX_SCOPE_SITES
    + 1
    + DEVICE_ID_SIZE * MAX_SCOPE_DEVICES
    + KEY_ID_SIZE
    + SIGNATURE_SIZE
)
"""Largest possible encoded certificate (3248 bytes)."""

MAX_UPDATE_BODY_SIZE: Final = MAX_UPDATE_SIZE - (2 + MAX_CERTIFICATE_SIZE) - (1 + SIGNATURE_SIZE)
"""Largest update body: whatever certificate signs it, the signed update stays within
:data:`MAX_UPDATE_SIZE`, so every valid :class:`AuthorisationUpdate` can be sent."""

# Encodings of the Ed25519 points of small order, sign bit cleared (as in libsodium's
# ge25519_has_small_order). A signing key of small order lets anyone forge signatures
# (with the identity point as key, the signature R = identity, S = 0 verifies for every
# message), so a certificate must never carry one, even if an authority were tricked
# into signing it.
_SMALL_ORDER_KEYS: Final = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)
_FIELD_PRIME: Final = 2**255 - 19


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _fail(code: ErrorCode, message: str) -> LocalProtocolError:
    return LocalProtocolError(code, message)


def _check_uint(
    value: object, what: str, code: ErrorCode, *, maximum: int = _U32_MAX, minimum: int = 0
) -> None:
    # bool is an int subclass; True as a key id or a time is a bug, not a value.
    if isinstance(value, bool) or not isinstance(value, int):
        msg = f"{what} must be an integer"
        raise _fail(code, msg)
    if not minimum <= value <= maximum:
        msg = f"{what} out of range {minimum}..{maximum}"
        raise _fail(code, msg)


def _check_bytes(value: object, size: int, what: str, code: ErrorCode) -> None:
    # Messages name the field and size only: the value may be key material.
    if not isinstance(value, bytes) or len(value) != size:
        msg = f"{what} must be {size} bytes"
        raise _fail(code, msg)


def _check_instance(
    value: object, kind: type | tuple[type, ...], what: str, code: ErrorCode
) -> None:
    # Annotations are not enforced at run time; a plain int where an enum belongs would
    # slip past the identity comparisons the verifiers make.
    if not isinstance(value, kind):
        msg = f"{what} has the wrong type"
        raise _fail(code, msg)


def _check_tuple(value: object, kind: type, what: str, code: ErrorCode) -> None:
    if not isinstance(value, tuple) or not all(isinstance(item, kind) for item in value):
        msg = f"{what} must be a tuple of {kind.__name__}"
        raise _fail(code, msg)


def _is_weak_ed25519_key(raw: bytes) -> bool:
    """True for small-order points and non-canonical encodings of the y coordinate."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y >= _FIELD_PRIME:
        return True
    return bytes(raw[:31]) + bytes([raw[31] & 0x7F]) in _SMALL_ORDER_KEYS


def _raw_public(key: Ed25519PublicKey | X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(public: Ed25519PublicKey | bytes) -> bytes:
    """The 8-byte id of an Ed25519 public key: SHA-256(KEY_ID_DOMAIN || raw key)[:8].

    Certificates name their issuer by this id, so a device finds out cheaply whether a
    certificate claims to come from the authority it trusts.
    """
    if isinstance(public, Ed25519PublicKey):
        raw = _raw_public(public)
    else:
        _check_bytes(public, PUBLIC_KEY_SIZE, "public key", ErrorCode.MALFORMED)
        raw = public
    return hashlib.sha256(KEY_ID_DOMAIN + raw).digest()[:KEY_ID_SIZE]


# --------------------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------------------


class Role(IntEnum):
    """What a certificate's key may do; one byte."""

    AUTHORITY = 1
    REGISTRY = 2
    GATEWAY = 3


_FLAG_NOISE_KEY: Final = 0x01
_FLAG_ORGANISATION_WIDE: Final = 0x02
_KNOWN_FLAGS: Final = _FLAG_NOISE_KEY | _FLAG_ORGANISATION_WIDE


@dataclass(frozen=True)
class Scope:
    """The sites and devices a certificate's key may act on.

    An organisation-wide scope covers every device and lists nothing; otherwise a device
    is covered if it is listed itself or its site is.
    """

    sites: frozenset[int] = frozenset()
    devices: frozenset[bytes] = frozenset()
    organisation_wide: bool = False

    def __post_init__(self) -> None:
        code = ErrorCode.CERT_MALFORMED
        _check_instance(self.organisation_wide, bool, "organisation_wide", code)
        _check_instance(self.sites, frozenset, "scope sites", code)
        _check_instance(self.devices, frozenset, "scope devices", code)
        if len(self.sites) > MAX_SCOPE_SITES or len(self.devices) > MAX_SCOPE_DEVICES:
            msg = f"scope lists at most {MAX_SCOPE_SITES} sites and {MAX_SCOPE_DEVICES} devices"
            raise _fail(code, msg)
        for site in self.sites:
            _check_uint(site, "scope site id", code)
        for device in self.devices:
            _check_bytes(device, DEVICE_ID_SIZE, "scope device id", code)
        # One meaning per value: an organisation-wide scope that also lists sites would
        # invite the question which of the two a verifier honours.
        if self.organisation_wide and (self.sites or self.devices):
            msg = "an organisation-wide scope lists no sites or devices"
            raise _fail(code, msg)

    def covers(self, device_id: bytes, site_id: int) -> bool:
        """Whether a device with this id, installed at this site, is within the scope."""
        return self.organisation_wide or device_id in self.devices or site_id in self.sites


@dataclass(frozen=True)
class Certificate:
    """A key bound to a role, subject and scope by the authority's signature.

    ``noise_key`` (the X25519 static key of the Noise handshake) is present exactly for
    gateways. ``issuer`` is :func:`key_id` of the signer. Construct certificates with
    :func:`issue_certificate` or :func:`decode_certificate`; check them with
    :func:`verify_certificate`.
    """

    role: Role
    subject: str
    serial: int
    signing_key: bytes
    noise_key: bytes | None
    scope: Scope
    not_before: int
    not_after: int
    issuer: bytes
    signature: bytes

    def __post_init__(self) -> None:
        code = ErrorCode.CERT_MALFORMED
        _check_instance(self.role, Role, "role", code)
        _check_instance(self.subject, str, "subject", code)
        try:
            subject_size = len(self.subject.encode("utf-8"))
        except UnicodeEncodeError as exc:  # lone surrogates
            msg = "subject is not encodable as UTF-8"
            raise _fail(code, msg) from exc
        if not 1 <= subject_size <= MAX_SUBJECT_BYTES:
            msg = f"subject must be 1..{MAX_SUBJECT_BYTES} UTF-8 bytes"
            raise _fail(code, msg)
        # Subjects end up in logs and operator screens; control characters there could
        # forge log lines or hide text.
        if any(unicodedata.category(ch) == "Cc" for ch in self.subject):
            msg = "subject contains control characters"
            raise _fail(code, msg)
        _check_uint(self.serial, "serial", code)
        _check_bytes(self.signing_key, PUBLIC_KEY_SIZE, "signing key", code)
        if _is_weak_ed25519_key(self.signing_key):
            msg = "signing key is of small order or not canonically encoded"
            raise _fail(code, msg)
        if self.role is Role.GATEWAY:
            _check_bytes(self.noise_key, PUBLIC_KEY_SIZE, "gateway noise key", code)
        elif self.noise_key is not None:
            msg = "only gateway certificates carry a noise key"
            raise _fail(code, msg)
        _check_instance(self.scope, Scope, "scope", code)
        _check_uint(self.not_before, "not_before", code)
        _check_uint(self.not_after, "not_after", code)
        if self.not_before >= self.not_after:
            msg = "not_before must be before not_after"
            raise _fail(code, msg)
        _check_bytes(self.issuer, KEY_ID_SIZE, "issuer", code)
        _check_bytes(self.signature, SIGNATURE_SIZE, "signature", code)

    def public_signing_key(self) -> Ed25519PublicKey:
        """The certificate's Ed25519 key, for verifying what its holder signed."""
        try:
            return Ed25519PublicKey.from_public_bytes(self.signing_key)
        except ValueError as exc:
            msg = "signing key is not a valid Ed25519 public key"
            raise CertificateError(ErrorCode.CERT_MALFORMED, msg) from exc


_CERT_BODY = construct.Struct(
    "magic" / construct.Const(_CERT_MAGIC),
    "format" / construct.Const(_FORMAT_VERSION, construct.Int8ub),
    "role" / construct.Int8ub,
    "flags" / construct.Int8ub,
    "subject" / construct.PascalString(construct.Int8ub, "utf8"),
    "serial" / construct.Int32ub,
    "signing_key" / construct.Bytes(PUBLIC_KEY_SIZE),
    "noise_key" / construct.If(this.flags & _FLAG_NOISE_KEY, construct.Bytes(PUBLIC_KEY_SIZE)),
    "not_before" / construct.Int32ub,
    "not_after" / construct.Int32ub,
    # u8 counts bound these arrays to 255 items, so no count check is needed first.
    "sites" / construct.PrefixedArray(construct.Int8ub, construct.Int32ub),
    "devices" / construct.PrefixedArray(construct.Int8ub, construct.Bytes(DEVICE_ID_SIZE)),
    "issuer" / construct.Bytes(KEY_ID_SIZE),
)

_CERTIFICATE = construct.Struct(
    "body" / _CERT_BODY,
    "signature" / construct.Bytes(SIGNATURE_SIZE),
)


def _certificate_fields(cert: Certificate) -> dict[str, Any]:
    flags = 0
    if cert.noise_key is not None:
        flags |= _FLAG_NOISE_KEY
    if cert.scope.organisation_wide:
        flags |= _FLAG_ORGANISATION_WIDE
    return {
        "role": int(cert.role),
        "flags": flags,
        "subject": cert.subject,
        "serial": cert.serial,
        "signing_key": cert.signing_key,
        "noise_key": cert.noise_key,
        "not_before": cert.not_before,
        "not_after": cert.not_after,
        # Sorted, so a scope (a set) has one encoding.
        "sites": sorted(cert.scope.sites),
        "devices": sorted(cert.scope.devices),
        "issuer": cert.issuer,
    }


def _certificate_body(cert: Certificate) -> bytes:
    """The bytes a certificate signature covers (after the domain prefix)."""
    return build(_CERT_BODY, _certificate_fields(cert), "certificate")


def encode_certificate(cert: Certificate) -> bytes:
    """The wire form of a certificate."""
    return _certificate_body(cert) + cert.signature


def decode_certificate(data: bytes) -> Certificate:
    """Parse a certificate; anything but a canonical encoding is a :class:`DecodeError`.

    This checks form only: call :func:`verify_certificate` before trusting it.
    """
    code = ErrorCode.CERT_MALFORMED
    parsed = parse_exact(_CERTIFICATE, data, "certificate", code)
    body = parsed.body
    if body.flags & ~_KNOWN_FLAGS:
        msg = "certificate: unknown flags"
        raise DecodeError(msg, code)
    try:
        role = Role(body.role)
    except ValueError as exc:
        msg = "certificate: unknown role"
        raise DecodeError(msg, code) from exc
    try:
        cert = Certificate(
            role=role,
            subject=body.subject,
            serial=body.serial,
            signing_key=body.signing_key,
            noise_key=body.noise_key,
            scope=Scope(
                sites=frozenset(body.sites),
                devices=frozenset(body.devices),
                organisation_wide=bool(body.flags & _FLAG_ORGANISATION_WIDE),
            ),
            not_before=body.not_before,
            not_after=body.not_after,
            issuer=body.issuer,
            signature=parsed.signature,
        )
    except LocalProtocolError as exc:
        msg = f"certificate: {exc.message}"
        raise DecodeError(msg, code) from exc
    # Canonical form: unsorted or repeated scope entries would decode to the same value
    # as another byte string. Refusing them keeps "verify the re-encoding" sound.
    if encode_certificate(cert) != bytes(data):
        msg = "certificate: not in canonical form"
        raise DecodeError(msg, code)
    return cert


def issue_certificate(
    issuer_key: Ed25519PrivateKey,
    *,
    role: Role,
    subject: str,
    serial: int,
    signing_key: Ed25519PublicKey,
    noise_key: X25519PublicKey | None,
    scope: Scope,
    not_before: int,
    not_after: int,
) -> Certificate:
    """Issue a certificate for ``signing_key``, signed by ``issuer_key``."""
    unsigned = Certificate(
        role=role,
        subject=subject,
        serial=serial,
        signing_key=_raw_public(signing_key),
        noise_key=None if noise_key is None else _raw_public(noise_key),
        scope=scope,
        not_before=not_before,
        not_after=not_after,
        issuer=key_id(issuer_key.public_key()),
        signature=bytes(SIGNATURE_SIZE),  # placeholder: not part of the signed bytes
    )
    signature = issuer_key.sign(CERTIFICATE_DOMAIN + _certificate_body(unsigned))
    return replace(unsigned, signature=signature)


def self_signed_authority(
    key: Ed25519PrivateKey, subject: str, serial: int, not_before: int, not_after: int
) -> Certificate:
    """The authority's own certificate: organisation-wide, issued by its own key."""
    return issue_certificate(
        key,
        role=Role.AUTHORITY,
        subject=subject,
        serial=serial,
        signing_key=key.public_key(),
        noise_key=None,
        scope=Scope(organisation_wide=True),
        not_before=not_before,
        not_after=not_after,
    )


def verify_certificate(
    cert: Certificate, authority_key: Ed25519PublicKey, *, role: Role, now: int
) -> None:
    """Check that ``cert`` was issued by ``authority_key``, has ``role`` and is valid now.

    Raises :class:`CertificateError`. The signature is checked first, so a forged
    certificate learns nothing about which of its other claims would have passed.
    """
    if cert.issuer != key_id(authority_key):
        msg = "certificate not issued by the trusted authority"
        raise CertificateError(ErrorCode.CERT_BAD_SIGNATURE, msg)
    try:
        authority_key.verify(cert.signature, CERTIFICATE_DOMAIN + _certificate_body(cert))
    except InvalidSignature as exc:
        msg = "certificate signature does not verify"
        raise CertificateError(ErrorCode.CERT_BAD_SIGNATURE, msg) from exc
    if cert.role is not role:
        msg = f"certificate role is {cert.role.name}, expected {role.name}"
        raise CertificateError(ErrorCode.CERT_WRONG_ROLE, msg)
    if now < cert.not_before:
        msg = "certificate not yet valid"
        raise CertificateError(ErrorCode.CERT_NOT_YET_VALID, msg)
    if now >= cert.not_after:
        msg = "certificate expired"
        raise CertificateError(ErrorCode.CERT_EXPIRED, msg)


# --------------------------------------------------------------------------------------
# Authorisation updates
# --------------------------------------------------------------------------------------


class UpdateKind(IntEnum):
    """What an authorisation update replaces; one byte."""

    ACCESS_FULL = 1
    ACCESS_DELTA = 2
    REVOCATION = 3


class TargetKind(IntEnum):
    """Which devices an update is addressed to; one byte."""

    DEVICE = 1
    SITE = 2
    FLEET = 3


@dataclass(frozen=True)
class Target:
    """The devices an update is for: one device, every device of a site, or the fleet.

    A fleet (organisation-wide) target is only allowed for revocations, which can only
    take access away.
    """

    kind: TargetKind
    device_id: bytes | None = None
    site_id: int | None = None

    def __post_init__(self) -> None:
        code = ErrorCode.UPDATE_MALFORMED
        _check_instance(self.kind, TargetKind, "target kind", code)
        if self.kind is TargetKind.DEVICE:
            _check_bytes(self.device_id, DEVICE_ID_SIZE, "target device id", code)
        elif self.device_id is not None:
            msg = "only a device target names a device"
            raise _fail(code, msg)
        if self.kind is TargetKind.SITE:
            _check_uint(self.site_id, "target site id", code)
        elif self.site_id is not None:
            msg = "only a site target names a site"
            raise _fail(code, msg)

    @classmethod
    def device(cls, device_id: bytes) -> Target:
        """A target of one device."""
        return cls(TargetKind.DEVICE, device_id=device_id)

    @classmethod
    def site(cls, site_id: int) -> Target:
        """A target of every device at one site."""
        return cls(TargetKind.SITE, site_id=site_id)

    @classmethod
    def fleet(cls) -> Target:
        """A target of every device of the organisation (revocations only)."""
        return cls(TargetKind.FLEET)

    def matches(self, device_id: bytes, site_id: int) -> bool:
        """Whether a device with this id, installed at this site, is addressed."""
        if self.kind is TargetKind.DEVICE:
            return device_id == self.device_id
        if self.kind is TargetKind.SITE:
            return site_id == self.site_id
        return True


@dataclass(frozen=True)
class ScheduleWindow:
    """Local times a key may open: on the days of ``days``, ``start <= minute < end``.

    ``days`` is a bitmask, bit 0 Monday to bit 6 Sunday. Minutes count from local
    midnight (0..1440); a window never crosses midnight (split it in two).
    """

    days: int
    start_minute: int
    end_minute: int

    def __post_init__(self) -> None:
        code = ErrorCode.UPDATE_MALFORMED
        _check_uint(self.days, "window days", code, minimum=1, maximum=_ALL_DAYS)
        _check_uint(self.start_minute, "window start", code, maximum=MINUTES_PER_DAY)
        _check_uint(self.end_minute, "window end", code, maximum=MINUTES_PER_DAY)
        if self.start_minute >= self.end_minute:
            msg = "window start must be before its end"
            raise _fail(code, msg)

    def contains(self, weekday: int, minute: int) -> bool:
        """Whether local ``weekday`` (0 = Monday) and ``minute`` of the day fall inside."""
        return bool(self.days >> weekday & 1) and self.start_minute <= minute < self.end_minute


@dataclass(frozen=True)
class AccessEntry:
    """A staff key allowed at a device: between ``valid_from`` (inclusive) and
    ``valid_until`` (exclusive), within any of its schedule windows."""

    key_id: int
    valid_from: int
    valid_until: int
    windows: tuple[ScheduleWindow, ...]

    def __post_init__(self) -> None:
        code = ErrorCode.UPDATE_MALFORMED
        _check_uint(self.key_id, "key id", code, minimum=1)
        _check_uint(self.valid_from, "valid_from", code)
        _check_uint(self.valid_until, "valid_until", code)
        if self.valid_from >= self.valid_until:
            msg = "valid_from must be before valid_until"
            raise _fail(code, msg)
        _check_tuple(self.windows, ScheduleWindow, "windows", code)
        if not 1 <= len(self.windows) <= MAX_WINDOWS:
            msg = f"an access entry has 1..{MAX_WINDOWS} windows"
            raise _fail(code, msg)


@dataclass(frozen=True)
class RevocationEntry:
    """A revoked staff key, kept on devices until ``prune_after``.

    The registry sets ``prune_after`` after the end of the key's own validity, so once it
    has passed the key cannot open anything even without the revocation.
    """

    key_id: int
    prune_after: int

    def __post_init__(self) -> None:
        code = ErrorCode.UPDATE_MALFORMED
        _check_uint(self.key_id, "key id", code, minimum=1)
        _check_uint(self.prune_after, "prune_after", code)


def _body_size(update: AuthorisationUpdate) -> int:
    """Encoded size of an update body, computed without building it."""
    target = {TargetKind.DEVICE: DEVICE_ID_SIZE, TargetKind.SITE: 4, TargetKind.FLEET: 0}
    return (
        len(_UPDATE_MAGIC)
        + 2  # format version, kind
        + 1
        + target[update.target.kind]
        + 16  # version, base_version, issued_at, expires_at
        + 2
        + sum(13 + 5 * len(entry.windows) for entry in update.access)
        + 2
        + 4 * len(update.removed_keys)
        + 2
        + 8 * len(update.revocations)
    )


def _check_unique(key_ids: list[int], what: str) -> None:
    if len(set(key_ids)) != len(key_ids):
        msg = f"duplicate key id in {what}"
        raise _fail(ErrorCode.UPDATE_MALFORMED, msg)


@dataclass(frozen=True)
class AuthorisationUpdate:
    """An access list, a delta to one, or a revocation list, for some devices.

    * ``ACCESS_FULL``: ``access`` is the whole list; ``base_version`` 0.
    * ``ACCESS_DELTA``: ``access`` entries are added or replace those of the same key,
      ``removed_keys`` are dropped; it applies only to ``base_version``.
    * ``REVOCATION``: ``revocations`` is the whole revocation list; ``base_version`` 0.

    ``version`` numbers each list (access, revocation) separately and only ever rises.
    """

    kind: UpdateKind
    target: Target
    version: int
    base_version: int
    issued_at: int
    expires_at: int
    access: tuple[AccessEntry, ...] = ()
    removed_keys: tuple[int, ...] = ()
    revocations: tuple[RevocationEntry, ...] = ()

    def __post_init__(self) -> None:
        code = ErrorCode.UPDATE_MALFORMED
        _check_instance(self.kind, UpdateKind, "kind", code)
        _check_instance(self.target, Target, "target", code)
        _check_uint(self.version, "version", code, minimum=1)
        _check_uint(self.base_version, "base_version", code)
        _check_uint(self.issued_at, "issued_at", code)
        _check_uint(self.expires_at, "expires_at", code)
        if self.expires_at <= self.issued_at:
            msg = "expires_at must be after issued_at"
            raise _fail(code, msg)
        _check_tuple(self.access, AccessEntry, "access", code)
        _check_tuple(self.removed_keys, int, "removed_keys", code)
        _check_tuple(self.revocations, RevocationEntry, "revocations", code)
        self._check_kind_fields()
        too_large = ErrorCode.UPDATE_TOO_LARGE
        if len(self.access) > MAX_ACCESS_ENTRIES:
            msg = f"more than {MAX_ACCESS_ENTRIES} access entries"
            raise _fail(too_large, msg)
        if len(self.removed_keys) > MAX_REMOVED_KEYS:
            msg = f"more than {MAX_REMOVED_KEYS} removed keys"
            raise _fail(too_large, msg)
        if len(self.revocations) > MAX_REVOCATIONS:
            msg = f"more than {MAX_REVOCATIONS} revocations"
            raise _fail(too_large, msg)
        for removed in self.removed_keys:
            _check_uint(removed, "removed key id", code, minimum=1)
        access_ids = [entry.key_id for entry in self.access]
        _check_unique(access_ids, "access")
        _check_unique(list(self.removed_keys), "removed_keys")
        _check_unique([entry.key_id for entry in self.revocations], "revocations")
        # A key both added and removed by one delta has no single meaning.
        if not set(access_ids).isdisjoint(self.removed_keys):
            msg = "a key is both added and removed"
            raise _fail(code, msg)
        if _body_size(self) > MAX_UPDATE_BODY_SIZE:
            msg = f"update body exceeds {MAX_UPDATE_BODY_SIZE} bytes"
            raise _fail(too_large, msg)

    def _check_kind_fields(self) -> None:
        code = ErrorCode.UPDATE_MALFORMED
        if self.kind is UpdateKind.REVOCATION:
            if self.access or self.removed_keys:
                msg = "a revocation update carries only revocations"
                raise _fail(code, msg)
        else:
            if self.revocations:
                msg = "an access update carries no revocations"
                raise _fail(code, msg)
            # Granting access to the whole fleet is never meant; only revocations may
            # be organisation-wide.
            if self.target.kind is TargetKind.FLEET:
                msg = "only revocations may target the fleet"
                raise _fail(code, msg)
        if self.kind is UpdateKind.ACCESS_DELTA:
            if self.base_version >= self.version:
                msg = "a delta's version must be above its base version"
                raise _fail(code, msg)
        else:
            if self.base_version != 0:
                msg = "only a delta has a base version"
                raise _fail(code, msg)
            if self.removed_keys:
                msg = "only a delta removes keys"
                raise _fail(code, msg)


@dataclass(frozen=True)
class SignedUpdate:
    """An update with the certificate of its signer and the signature.

    Decoding accepts unsigned updates (no certificate or no signature) so a device can
    refuse them with a precise code; :func:`verify_update` never accepts one.
    """

    update: AuthorisationUpdate
    certificate: Certificate | None
    signature: bytes

    def __post_init__(self) -> None:
        code = ErrorCode.UPDATE_MALFORMED
        _check_instance(self.update, AuthorisationUpdate, "update", code)
        _check_instance(self.certificate, (Certificate, type(None)), "certificate", code)
        if not isinstance(self.signature, bytes) or len(self.signature) not in (
            0,
            SIGNATURE_SIZE,
        ):
            msg = f"signature must be empty or {SIGNATURE_SIZE} bytes"
            raise _fail(code, msg)


def _bounded_array(
    count: construct.Construct[int, int], limit: int, item: construct.Construct[Any, Any]
) -> construct.Construct[Any, Any]:
    """A count-prefixed array whose count is checked against ``limit`` before any item
    is read, so a forged count cannot make the parser loop or allocate."""
    return construct.FocusedSeq(
        "items",
        "count" / construct.Rebuild(count, construct.len_(this.items)),
        construct.Check(this.count <= limit),
        "items" / construct.Array(this.count, item),
    )


_WINDOW = construct.Struct(
    "days" / construct.Int8ub,
    "start" / construct.Int16ub,
    "end" / construct.Int16ub,
)

_ACCESS_ENTRY = construct.Struct(
    "key_id" / construct.Int32ub,
    "valid_from" / construct.Int32ub,
    "valid_until" / construct.Int32ub,
    "windows" / _bounded_array(construct.Int8ub, MAX_WINDOWS, _WINDOW),
)

_REVOCATION_ENTRY = construct.Struct(
    "key_id" / construct.Int32ub,
    "prune_after" / construct.Int32ub,
)

_TARGET = construct.Struct(
    "kind" / construct.Int8ub,
    "value"
    / construct.Switch(
        this.kind,
        {
            int(TargetKind.DEVICE): construct.Bytes(DEVICE_ID_SIZE),
            int(TargetKind.SITE): construct.Int32ub,
            int(TargetKind.FLEET): construct.Pass,
        },
        default=construct.Error,
    ),
)

_UPDATE_BODY = construct.Struct(
    "magic" / construct.Const(_UPDATE_MAGIC),
    "format" / construct.Const(_FORMAT_VERSION, construct.Int8ub),
    "kind" / construct.Int8ub,
    "target" / _TARGET,
    "version" / construct.Int32ub,
    "base_version" / construct.Int32ub,
    "issued_at" / construct.Int32ub,
    "expires_at" / construct.Int32ub,
    "access" / _bounded_array(construct.Int16ub, MAX_ACCESS_ENTRIES, _ACCESS_ENTRY),
    "removed" / _bounded_array(construct.Int16ub, MAX_REMOVED_KEYS, construct.Int32ub),
    "revocations" / _bounded_array(construct.Int16ub, MAX_REVOCATIONS, _REVOCATION_ENTRY),
)

# Certificate (0 bytes = none) and signature (0 or 64 bytes) after the body.
_UPDATE_TRAILER = construct.Struct(
    "certificate" / construct.Prefixed(construct.Int16ub, construct.GreedyBytes),
    "signature" / construct.Prefixed(construct.Int8ub, construct.GreedyBytes),
)

_SIGNED_UPDATE = construct.Struct(
    "body" / _UPDATE_BODY,
    "trailer" / _UPDATE_TRAILER,
)


def _update_body(update: AuthorisationUpdate) -> bytes:
    target = update.target
    value: bytes | int | None = target.device_id if target.kind is TargetKind.DEVICE else None
    if target.kind is TargetKind.SITE:
        value = target.site_id
    fields = {
        "kind": int(update.kind),
        "target": {"kind": int(target.kind), "value": value},
        "version": update.version,
        "base_version": update.base_version,
        "issued_at": update.issued_at,
        "expires_at": update.expires_at,
        "access": [
            {
                "key_id": entry.key_id,
                "valid_from": entry.valid_from,
                "valid_until": entry.valid_until,
                "windows": [
                    {"days": w.days, "start": w.start_minute, "end": w.end_minute}
                    for w in entry.windows
                ],
            }
            for entry in update.access
        ],
        "removed": list(update.removed_keys),
        "revocations": [
            {"key_id": entry.key_id, "prune_after": entry.prune_after}
            for entry in update.revocations
        ],
    }
    return build(_UPDATE_BODY, fields, "update")


def _signed_update_bytes(update: AuthorisationUpdate, certificate: bytes) -> bytes:
    return UPDATE_DOMAIN + _update_body(update) + certificate


def sign_update(
    update: AuthorisationUpdate, *, key: Ed25519PrivateKey, certificate: Certificate
) -> SignedUpdate:
    """Sign ``update`` with ``key``, whose certificate travels with the update.

    The signature covers the certificate too, so it cannot be swapped for another
    certificate of the same key with a wider scope or a later expiry.
    """
    if _raw_public(key.public_key()) != certificate.signing_key:
        msg = "the signing key does not match the certificate"
        raise LocalProtocolError(ErrorCode.CERT_KEY_MISMATCH, msg)
    signature = key.sign(_signed_update_bytes(update, encode_certificate(certificate)))
    return SignedUpdate(update=update, certificate=certificate, signature=signature)


def encode_update(signed: SignedUpdate) -> bytes:
    """The wire form of a signed (or, for tests of refusal, unsigned) update."""
    certificate = b"" if signed.certificate is None else encode_certificate(signed.certificate)
    trailer = build(
        _UPDATE_TRAILER, {"certificate": certificate, "signature": signed.signature}, "update"
    )
    return _update_body(signed.update) + trailer


def _decode_update_body(body: Any) -> AuthorisationUpdate:
    code = ErrorCode.UPDATE_MALFORMED
    try:
        kind = UpdateKind(body.kind)
    except ValueError as exc:
        msg = "update: unknown kind"
        raise DecodeError(msg, code) from exc
    target_kind = TargetKind(body.target.kind)  # the Switch admitted only known kinds
    if target_kind is TargetKind.DEVICE:
        target = Target.device(body.target.value)
    elif target_kind is TargetKind.SITE:
        target = Target.site(body.target.value)
    else:
        target = Target.fleet()
    return AuthorisationUpdate(
        kind=kind,
        target=target,
        version=body.version,
        base_version=body.base_version,
        issued_at=body.issued_at,
        expires_at=body.expires_at,
        access=tuple(
            AccessEntry(
                key_id=entry.key_id,
                valid_from=entry.valid_from,
                valid_until=entry.valid_until,
                windows=tuple(
                    ScheduleWindow(days=w.days, start_minute=w.start, end_minute=w.end)
                    for w in entry.windows
                ),
            )
            for entry in body.access
        ),
        removed_keys=tuple(body.removed),
        revocations=tuple(
            RevocationEntry(key_id=entry.key_id, prune_after=entry.prune_after)
            for entry in body.revocations
        ),
    )


def decode_update(data: bytes) -> SignedUpdate:
    """Parse a signed update; anything but a canonical encoding is a :class:`DecodeError`.

    This checks form only: call :func:`verify_update` before applying it.
    """
    code = ErrorCode.UPDATE_MALFORMED
    raw: object = data  # what a peer sent; trust no annotation
    if not isinstance(raw, bytes | bytearray | memoryview):
        msg = f"update: expected bytes, got {type(raw).__name__}"
        raise DecodeError(msg, code)
    data = bytes(raw)
    # Refuse oversized input before parsing any of it.
    if len(data) > MAX_UPDATE_SIZE:
        msg = f"update larger than {MAX_UPDATE_SIZE} bytes"
        raise DecodeError(msg, ErrorCode.UPDATE_TOO_LARGE)
    parsed = parse_exact(_SIGNED_UPDATE, data, "update", code)
    try:
        update = _decode_update_body(parsed.body)
        trailer = parsed.trailer
        certificate = decode_certificate(trailer.certificate) if trailer.certificate else None
        signed = SignedUpdate(update=update, certificate=certificate, signature=trailer.signature)
    except (LocalProtocolError, DecodeError) as exc:
        msg = f"update: {exc.message}"
        # A body over the size budget keeps its own code; every other flaw is malformed.
        too_large = exc.code is ErrorCode.UPDATE_TOO_LARGE
        raise DecodeError(msg, ErrorCode.UPDATE_TOO_LARGE if too_large else code) from exc
    if encode_update(signed) != data:
        msg = "update: not in canonical form"
        raise DecodeError(msg, code)
    return signed


def verify_update(
    signed: SignedUpdate,
    *,
    authority_key: Ed25519PublicKey,
    device_id: bytes,
    site_id: int,
    now: int,
    access_version: int,
    revocation_version: int,
) -> AuthorisationUpdate:
    """The device's check of an update before it applies anything.

    ``device_id`` and ``site_id`` identify the checking device; ``access_version`` and
    ``revocation_version`` are the versions of the lists it holds. Returns the update to
    apply, or raises (in this order, so cheap claims are believed only once signed):

    1. :class:`UpdateRefused` ``UPDATE_UNSIGNED``: no certificate or no signature;
    2. :class:`CertificateError` from :func:`verify_certificate` with role GATEWAY;
    3. ``UPDATE_BAD_SIGNATURE``: the certificate's key did not sign these bytes;
    4. ``UPDATE_WRONG_TARGET``: the update is not addressed to this device;
    5. ``UPDATE_OUT_OF_SCOPE``: the signer's certificate does not cover this device;
    6. ``UPDATE_NOT_YET_VALID`` / ``UPDATE_EXPIRED``: outside issued_at..expires_at;
    7. ``UPDATE_ROLLBACK``: version not above the held version of that list;
    8. ``UPDATE_BASE_MISMATCH``: a delta for another access version than the held one.
    """
    _check_bytes(device_id, DEVICE_ID_SIZE, "device id", ErrorCode.MALFORMED)
    certificate = signed.certificate
    if certificate is None or not signed.signature:
        msg = "update is not signed"
        raise UpdateRefused(ErrorCode.UPDATE_UNSIGNED, msg)
    verify_certificate(certificate, authority_key, role=Role.GATEWAY, now=now)
    update = signed.update
    try:
        certificate.public_signing_key().verify(
            signed.signature,
            _signed_update_bytes(update, encode_certificate(certificate)),
        )
    except InvalidSignature as exc:
        msg = "update signature does not verify"
        raise UpdateRefused(ErrorCode.UPDATE_BAD_SIGNATURE, msg) from exc
    if not update.target.matches(device_id, site_id):
        msg = "update is addressed to other devices"
        raise UpdateRefused(ErrorCode.UPDATE_WRONG_TARGET, msg)
    if not certificate.scope.covers(device_id, site_id):
        msg = "signer's certificate does not cover this device"
        raise UpdateRefused(ErrorCode.UPDATE_OUT_OF_SCOPE, msg)
    if now < update.issued_at:
        msg = "update not yet valid"
        raise UpdateRefused(ErrorCode.UPDATE_NOT_YET_VALID, msg)
    if now >= update.expires_at:
        msg = "update expired"
        raise UpdateRefused(ErrorCode.UPDATE_EXPIRED, msg)
    held = revocation_version if update.kind is UpdateKind.REVOCATION else access_version
    if update.version <= held:
        msg = f"update version {update.version} not above held version {held}"
        raise UpdateRefused(ErrorCode.UPDATE_ROLLBACK, msg)
    if update.kind is UpdateKind.ACCESS_DELTA and update.base_version != access_version:
        msg = f"delta applies to version {update.base_version}, device holds {access_version}"
        raise UpdateRefused(ErrorCode.UPDATE_BASE_MISMATCH, msg)
    return update
