"""Signed registry commands: JWS (RFC 7515) with EdDSA over Ed25519 (RFC 8037).

The registry sends commands to gateways over MQTT. The broker is not trusted to tell
who sent a message, so every command carries its own proof: a JWS compact serialization
whose protected header holds the registry's certificate (``lgc``, issued by the
organisation's authority, see :mod:`protocols.envelopes`) and whose signature is made
with that certificate's key. A gateway holding only the authority's public key verifies
a command completely offline.

:meth:`CommandVerifier.verify` checks, in this order, and raises a typed
:class:`CommandError` at the first failure; nothing is executed unless every check
passed (docs/mqtt-api.md, "Commands"):

1. ``too_large``: more than :data:`MAX_COMMAND_SIZE` bytes;
2. ``malformed``: not a JWS compact serialization;
3. ``bad_algorithm``: ``alg`` is not ``EdDSA`` (``none``, HMAC and the rest are refused
   before anything else is looked at);
4. ``malformed``: protected header other than exactly ``alg``, ``typ``
   (``lockgw-command+jws``) and ``lgc``;
5. ``untrusted_certificate``: ``lgc`` is not a certificate issued by the authority with
   role REGISTRY and valid now (the message names the protocol's code, e.g.
   ``CERT_EXPIRED``);
6. ``bad_signature``: the certificate's key did not sign this header and these claims;
7. ``malformed``: the claims are not the JSON object of :class:`CommandClaims`;
8. ``wrong_gateway``: addressed to another gateway (on the fleet topic: not ``"*"``);
9. ``not_yet_valid`` / ``expired`` / ``malformed``: ``iat`` more than the allowed skew in
   the future, ``exp`` reached, or a lifetime above :data:`MAX_COMMAND_LIFETIME`;
10. ``replayed``: the ``jti`` was seen before (durably remembered until ``exp``);
11. ``unknown_op``;
12. ``bad_args``: the arguments are not what the operation's class reads;
13. ``out_of_scope``: a fleet or site target the registry's certificate does not cover
    (device targets are checked by the handler, which knows each device's site, with
    :meth:`Command.covers`).

The signature is checked before any claim is believed, so a forger learns nothing about
which claim would have passed; the jti is remembered only for commands whose signature
verified, so an unauthenticated sender cannot fill the store.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
import unicodedata
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Self, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from gateway.fields import Fields, Invalid, Problem, boolean, integer, nullable, one_of, text
from protocols.envelopes import (
    MAX_ACCESS_ENTRIES,
    MAX_CERTIFICATE_SIZE,
    MAX_REMOVED_KEYS,
    MAX_REVOCATIONS,
    MAX_WINDOWS,
    MINUTES_PER_DAY,
    AccessEntry,
    AuthorisationUpdate,
    Certificate,
    RevocationEntry,
    Role,
    ScheduleWindow,
    Scope,
    Target,
    UpdateKind,
    decode_certificate,
    verify_certificate,
)
from protocols.errors import ProtocolError

__all__ = [
    "ALGORITHM",
    "COMMAND_TYPE",
    "MAX_COMMAND_LIFETIME",
    "MAX_COMMAND_SIZE",
    "OPERATIONS",
    "AccessEntryArgs",
    "Command",
    "CommandArgs",
    "CommandClaims",
    "CommandError",
    "CommandVerifier",
    "DeclineArgs",
    "DecommissionArgs",
    "ErrorCode",
    "GetStateArgs",
    "PullLogsArgs",
    "RegisterArgs",
    "RevocationArgs",
    "RevokeArgs",
    "SetAccessArgs",
    "TargetArgs",
    "TimeSyncArgs",
    "WindowArgs",
    "readable_id",
    "sign_command",
]

MAX_COMMAND_SIZE: Final = 64 * 1024
"""Largest command payload accepted, in bytes, before anything is parsed."""

MAX_COMMAND_LIFETIME: Final = 300
"""Largest ``exp - iat`` accepted, in seconds: a captured command is useful only briefly,
and the replay store needs to hold a jti only this long (plus the skew)."""

DEFAULT_MAX_SKEW: Final = 30
"""Seconds the registry's clock may run ahead of the gateway's."""

ALGORITHM: Final = "EdDSA"
COMMAND_TYPE: Final = "lockgw-command+jws"
CERTIFICATE_HEADER: Final = "lgc"
_HEADER_KEYS: Final = frozenset({"alg", "typ", CERTIFICATE_HEADER})

_MAX_HEADER_SEGMENT: Final = 8192
"""The header carries a whole certificate (up to 3248 bytes, base64url twice over)."""

_ID_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]{1,64}$"
"""1..64 characters, no control characters (C0, DEL, C1): ids end up in logs."""
_JTI_PATTERN: Final = r"^[\x21-\x7e]{16,64}$"
_OP_PATTERN: Final = r"^[a-z][a-z_]{0,31}$"
_CODE_PATTERN: Final = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_U32_MAX: Final = 0xFFFF_FFFF


class ErrorCode:
    """The error codes of command responses (docs/mqtt-api.md, "Error codes").

    Handlers may raise :class:`CommandError` with codes of their own (``not_found``,
    ``device_error``, ...); these are the ones the verifier and the bridge use.
    """

    TOO_LARGE: Final = "too_large"
    MALFORMED: Final = "malformed"
    BAD_ALGORITHM: Final = "bad_algorithm"
    UNTRUSTED_CERTIFICATE: Final = "untrusted_certificate"
    BAD_SIGNATURE: Final = "bad_signature"
    WRONG_GATEWAY: Final = "wrong_gateway"
    NOT_YET_VALID: Final = "not_yet_valid"
    EXPIRED: Final = "expired"
    REPLAYED: Final = "replayed"
    UNKNOWN_OP: Final = "unknown_op"
    BAD_ARGS: Final = "bad_args"
    OUT_OF_SCOPE: Final = "out_of_scope"
    TIMEOUT: Final = "timeout"
    BUSY: Final = "busy"
    RESPONSE_TOO_LARGE: Final = "response_too_large"
    INTERNAL: Final = "internal"


class CommandError(Exception):
    """A command refused (by the verifier) or failed (in its handler), with a typed code.

    ``code`` is short snake case (``[a-z][a-z0-9_]*``, at most 40 characters); it goes
    into the response and the metrics. ``message`` is for people and must never hold key
    material or the payload. The verifier fills ``command_id`` and ``op`` when it could
    read them (even from a command it refuses), so the response can be correlated.
    """

    def __init__(
        self, code: str, message: str, *, command_id: str | None = None, op: str | None = None
    ) -> None:
        if not _CODE_PATTERN.fullmatch(code):
            msg = f"error codes are snake case of at most 40 characters, got {code!r}"
            raise ValueError(msg)
        super().__init__(message)
        self.code = code
        self.message = message
        self.command_id = command_id
        self.op = op

    def __repr__(self) -> str:
        """Code and message, for logs."""
        return f"CommandError({self.code!r}, {self.message!r})"


# ----------------------------------------------------------------------------- arguments
#
# Each class reads itself from the parsed JSON with ``read``; :func:`_read_object` runs
# it over a whole object, so that a refusal names the first problem and counts the rest.
# Reading is as strict as JSON's types: "1" is not 1, true is not 1, 1.0 is not an int.

T = TypeVar("T")


def _json_object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        msg = "must be a JSON object"
        raise Invalid(msg)
    return value


_U32: Final = integer(0, _U32_MAX)
"""Unix seconds, versions and site ids: unsigned 32-bit, as on the device wire."""
_VERSION: Final = integer(1, _U32_MAX)
_KEY_ID: Final = integer(1, _U32_MAX)
"""A staff key id: u32, 0 means "no key" on the wire and is never valid here."""
_DEVICE_ID: Final = text(r"^[0-9a-f]{16}$", reason="must be 16 lower-case hex digits")
"""Eight bytes as sixteen lower-case hex digits (the form of topics and payloads)."""
_UPDATE_ID: Final = text(
    r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$",
    reason="must be 1 to 64 letters, digits and . _ : -, starting with a letter or digit",
)
"""Becomes a topic level (``updates/{update_id}/progress``): no ``/``, ``+``, ``#``."""
_TEXT: Final = text(
    r"^[^\x00-\x1f\x7f-\x9f]{1,200}$", reason="must be 1 to 200 characters, no control characters"
)
"""Free text for people (work orders, reasons): no control characters for logs."""
_REQUEST_ID: Final = text(r"^[0-9a-f]{32}$", reason="must be 32 lower-case hex digits")
_HOUR_MINUTE: Final = text(
    r"^(([01][0-9]|2[0-3]):[0-5][0-9]|24:00)$", reason="must be a time HH:MM from 00:00 to 24:00"
)
_COMMAND_ID: Final = text(_ID_PATTERN, reason="must be 1 to 64 characters, no control characters")
_OP: Final = text(_OP_PATTERN, reason="must be a-z and _, starting with a letter, at most 32")
_GATEWAY: Final = text(r"(?s)^.{1,64}$", reason="must be 1 to 64 characters")
_JTI: Final = text(_JTI_PATTERN, reason="must be 16 to 64 printable ASCII characters, no spaces")

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: Final[tuple[Day, ...]] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
TargetKindName = Literal["fleet", "site", "device"]
_TARGET_KINDS: Final[tuple[TargetKindName, ...]] = ("fleet", "site", "device")
Mode = Literal["full", "delta"]
_MODES: Final[tuple[Mode, ...]] = ("full", "delta")


@dataclass(frozen=True, slots=True)
class TargetArgs:
    """Which devices an update is for; a site names ``site_id``, a device ``device_id``."""

    kind: TargetKindName
    site_id: int | None = None
    device_id: str | None = None

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read and check a target (explicit nulls count as absent)."""
        args = cls(
            kind=fields.get("kind", one_of(*_TARGET_KINDS)),
            site_id=fields.get("site_id", nullable(_U32), None),
            device_id=fields.get("device_id", nullable(_DEVICE_ID), None),
        )
        if fields.valid("kind", "site_id", "device_id"):
            if args.kind == "site" and (args.site_id is None or args.device_id is not None):
                fields.problem(None, "a site target names site_id and nothing else")
            elif args.kind == "device" and (args.device_id is None or args.site_id is not None):
                fields.problem(None, "a device target names device_id and nothing else")
            elif args.kind == "fleet" and (args.site_id is not None or args.device_id is not None):
                fields.problem(None, "a fleet target names no site or device")
        return args

    def to_target(self) -> Target:
        """The protocol's :class:`~protocols.envelopes.Target`."""
        if self.kind == "device":
            assert self.device_id is not None  # checked by read
            return Target.device(bytes.fromhex(self.device_id))
        if self.kind == "site":
            assert self.site_id is not None  # checked by read
            return Target.site(self.site_id)
        return Target.fleet()


@dataclass(frozen=True, slots=True)
class RevocationArgs:
    key_id: int
    prune_after: int

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read one revocation."""
        return cls(
            key_id=fields.get("key_id", _KEY_ID), prune_after=fields.get("prune_after", _U32)
        )


@dataclass(frozen=True, slots=True)
class RevokeArgs:
    """Replace the revocation list of the target's devices."""

    update_id: str
    version: int
    revocations: tuple[RevocationArgs, ...]
    target: TargetArgs
    expires_at: int

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read the arguments of ``revoke``."""
        return cls(
            update_id=fields.get("update_id", _UPDATE_ID),
            version=fields.get("version", _VERSION),
            revocations=fields.tables(
                "revocations", RevocationArgs.read, max_length=MAX_REVOCATIONS
            ),
            target=fields.table("target", TargetArgs.read),
            expires_at=fields.get("expires_at", _U32),
        )

    def to_update(self, issued_at: int) -> AuthorisationUpdate:
        """The update for devices (raises ``LocalProtocolError`` if it cannot be one)."""
        return AuthorisationUpdate(
            kind=UpdateKind.REVOCATION,
            target=self.target.to_target(),
            version=self.version,
            base_version=0,
            issued_at=issued_at,
            expires_at=self.expires_at,
            revocations=tuple(
                RevocationEntry(key_id=entry.key_id, prune_after=entry.prune_after)
                for entry in self.revocations
            ),
        )


@dataclass(frozen=True, slots=True)
class WindowArgs:
    """Local times a key may open: on ``days``, from ``start`` to ``end`` (HH:MM)."""

    days: tuple[Day, ...]
    start: str
    end: str

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read and check one window."""
        args = cls(
            days=fields.array("days", one_of(*DAYS), min_length=1, max_length=7),
            start=fields.get("start", _HOUR_MINUTE),
            end=fields.get("end", _HOUR_MINUTE),
        )
        if fields.valid("days") and len(set(args.days)) != len(args.days):
            fields.problem(None, "days repeat")
        if fields.valid("start", "end") and _minutes(args.start) >= _minutes(args.end):
            fields.problem(None, "start must be before end (split windows that cross midnight)")
        return args

    def to_window(self) -> ScheduleWindow:
        """The protocol's window: a day bitmask (bit 0 Monday) and minutes of the day."""
        mask = 0
        for day in self.days:
            mask |= 1 << DAYS.index(day)
        return ScheduleWindow(
            days=mask, start_minute=_minutes(self.start), end_minute=_minutes(self.end)
        )


@dataclass(frozen=True, slots=True)
class AccessEntryArgs:
    key_id: int
    valid_from: int
    valid_until: int
    windows: tuple[WindowArgs, ...]

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read and check one entry of an access list."""
        args = cls(
            key_id=fields.get("key_id", _KEY_ID),
            valid_from=fields.get("valid_from", _U32),
            valid_until=fields.get("valid_until", _U32),
            windows=fields.tables("windows", WindowArgs.read, min_length=1, max_length=MAX_WINDOWS),
        )
        if fields.valid("valid_from", "valid_until") and args.valid_from >= args.valid_until:
            fields.problem(None, "valid_from must be before valid_until")
        return args


@dataclass(frozen=True, slots=True)
class SetAccessArgs:
    """Replace (``full``) or change (``delta`` on ``base_version``) an access list."""

    update_id: str
    target: TargetArgs
    mode: Mode
    version: int
    base_version: int
    entries: tuple[AccessEntryArgs, ...]
    removed: tuple[int, ...]
    expires_at: int

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read and check the arguments of ``set_access``."""
        args = cls(
            update_id=fields.get("update_id", _UPDATE_ID),
            target=fields.table("target", TargetArgs.read),
            mode=fields.get("mode", one_of(*_MODES)),
            version=fields.get("version", _VERSION),
            base_version=fields.get("base_version", _U32),
            entries=fields.tables("entries", AccessEntryArgs.read, max_length=MAX_ACCESS_ENTRIES),
            removed=fields.array("removed", _KEY_ID, max_length=MAX_REMOVED_KEYS),
            expires_at=fields.get("expires_at", _U32),
        )
        if fields.valid("target") and args.target.kind == "fleet":
            fields.problem(None, "access lists are for a site or a device, never the fleet")
        if (
            fields.valid("mode", "base_version", "removed")
            and args.mode == "full"
            and (args.base_version != 0 or args.removed)
        ):
            fields.problem(None, "a full list has base_version 0 and removes nothing")
        if (
            fields.valid("mode", "base_version", "version")
            and args.mode == "delta"
            and args.base_version >= args.version
        ):
            fields.problem(None, "a delta's version must be above its base_version")
        return args

    def to_update(self, issued_at: int) -> AuthorisationUpdate:
        """The update for devices (raises ``LocalProtocolError`` if it cannot be one)."""
        return AuthorisationUpdate(
            kind=UpdateKind.ACCESS_FULL if self.mode == "full" else UpdateKind.ACCESS_DELTA,
            target=self.target.to_target(),
            version=self.version,
            base_version=self.base_version,
            issued_at=issued_at,
            expires_at=self.expires_at,
            access=tuple(
                AccessEntry(
                    key_id=entry.key_id,
                    valid_from=entry.valid_from,
                    valid_until=entry.valid_until,
                    windows=tuple(window.to_window() for window in entry.windows),
                )
                for entry in self.entries
            ),
            removed_keys=self.removed,
        )


@dataclass(frozen=True, slots=True)
class PullLogsArgs:
    """The device's log records with times ``from`` to ``to`` (unix seconds, inclusive)."""

    device_id: str
    time_from: int
    time_to: int

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read and check the arguments of ``pull_logs`` (keys ``from`` and ``to``)."""
        args = cls(
            device_id=fields.get("device_id", _DEVICE_ID),
            time_from=fields.get("from", _U32),
            time_to=fields.get("to", _U32),
        )
        if fields.valid("from", "to") and args.time_from > args.time_to:
            fields.problem(None, "from must not be after to")
        return args


@dataclass(frozen=True, slots=True)
class TimeSyncArgs:
    """Set the clock of one device, or (``null``) of every device in scope."""

    device_id: str | None

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read ``device_id``, which must be there even when null: "every device" is
        never the result of a key left out."""
        return cls(device_id=fields.get("device_id", nullable(_DEVICE_ID)))


@dataclass(frozen=True, slots=True)
class GetStateArgs:
    """Report the state of one device, or (``null``) of every device."""

    device_id: str | None

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read ``device_id``, required even when null (as for ``time_sync``)."""
        return cls(device_id=fields.get("device_id", nullable(_DEVICE_ID)))


@dataclass(frozen=True, slots=True)
class RegisterArgs:
    """The registry confirms a pairing made on site."""

    device_id: str
    work_order: str
    consent_reference: str

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read the arguments of ``register``."""
        return cls(
            device_id=fields.get("device_id", _DEVICE_ID),
            work_order=fields.get("work_order", _TEXT),
            consent_reference=fields.get("consent_reference", _TEXT),
        )


@dataclass(frozen=True, slots=True)
class DecommissionArgs:
    """Take a device out of service; ``force`` even when it cannot be reached.

    ``request_id`` answers a technician's request (``lockgw decommission``, published on
    the ``requests`` topic): such a command is carried out only while that request waits.
    """

    device_id: str
    reason: str
    force: bool
    request_id: str | None = None

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read the arguments of ``decommission`` (``request_id`` may be null or absent)."""
        return cls(
            device_id=fields.get("device_id", _DEVICE_ID),
            reason=fields.get("reason", _TEXT),
            force=fields.get("force", boolean),
            request_id=fields.get("request_id", nullable(_REQUEST_ID), None),
        )


@dataclass(frozen=True, slots=True)
class DeclineArgs:
    """The registry refuses a technician's request, e.g. because a service needs the lock."""

    request_id: str
    reason: str
    needed_by: tuple[str, ...] = ()

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read the arguments of ``decline`` (``needed_by`` may be absent, never null)."""
        return cls(
            request_id=fields.get("request_id", _REQUEST_ID),
            reason=fields.get("reason", _TEXT),
            needed_by=fields.array("needed_by", _TEXT, max_length=32, default=()),
        )


CommandArgs = (
    RevokeArgs
    | SetAccessArgs
    | PullLogsArgs
    | TimeSyncArgs
    | GetStateArgs
    | RegisterArgs
    | DecommissionArgs
    | DeclineArgs
)
"""The arguments of any operation; match on the type."""

OPERATIONS: Final[Mapping[str, type[CommandArgs]]] = {
    "revoke": RevokeArgs,
    "set_access": SetAccessArgs,
    "pull_logs": PullLogsArgs,
    "time_sync": TimeSyncArgs,
    "get_state": GetStateArgs,
    "register": RegisterArgs,
    "decommission": DecommissionArgs,
    "decline": DeclineArgs,
}
"""Every operation the gateway knows, with the class whose ``read`` its ``args`` must pass."""


@dataclass(frozen=True, slots=True)
class CommandClaims:
    """The signed claims of a command (docs/schemas/command-claims.json)."""

    id: str
    op: str
    gateway: str
    iat: int
    exp: int
    jti: str
    args: dict[str, Any]

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """Read the claims; ``args`` only as a JSON object, read later for its ``op``."""
        return cls(
            id=fields.get("id", _COMMAND_ID),
            op=fields.get("op", _OP),
            gateway=fields.get("gateway", _GATEWAY),
            iat=fields.get("iat", _U32),
            exp=fields.get("exp", _U32),
            jti=fields.get("jti", _JTI),
            args=fields.get("args", _json_object),
        )


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    value = int(hours) * 60 + int(minutes)
    assert value <= MINUTES_PER_DAY  # the pattern admits 00:00..24:00 only
    return value


# ------------------------------------------------------------------------------ command


@dataclass(frozen=True)
class Command:
    """A verified command: every check of :meth:`CommandVerifier.verify` passed.

    ``issued_at`` and ``expires_at`` are the claims ``iat`` and ``exp``. ``args`` is the
    operation's arguments. ``update`` is the signed-update body for ``revoke`` and
    ``set_access`` (issued at ``min(iat, now)``, so registry clock skew never makes it
    not-yet-valid on devices), None for other operations. ``registry_subject`` and
    ``registry_scope`` come from the registry certificate that signed the command.
    """

    id: str
    op: str
    gateway: str
    issued_at: int
    expires_at: int
    jti: str
    args: CommandArgs
    registry_subject: str
    registry_scope: Scope
    update: AuthorisationUpdate | None = None

    def covers(self, device_id: bytes, site_id: int) -> bool:
        """Whether the signing registry may act on this device (handlers must check)."""
        return self.registry_scope.covers(device_id, site_id)


# ------------------------------------------------------------------------ JWS compact
#
# One algorithm only, so the serialization is done here rather than by a general JOSE
# library: ``EdDSA`` with Ed25519 keys (certificates carry no other), which is what the
# fully specified name ``Ed25519`` of RFC 9864 says. The verifier reads ``alg`` only to
# refuse anything else; the key always comes from the certificate, never the header.


@dataclass(frozen=True)
class _Token:
    """A JWS compact serialization, split and decoded but not yet verified."""

    header: dict[str, Any]
    payload: bytes
    signing_input: bytes
    signature: bytes


_BASE64URL: Final = re.compile(r"[A-Za-z0-9_-]*")


def _encode_segment(data: bytes) -> str:
    """base64url without padding (RFC 7515, section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _decode_segment(segment: str) -> bytes:
    """Strict base64url without padding; ValueError otherwise.

    Padding, characters outside the URL-safe alphabet, impossible lengths and non-zero
    unused bits in the last character are all refused: every byte string has exactly
    one accepted spelling, so no two different tokens carry the same signature.
    """
    if not _BASE64URL.fullmatch(segment) or len(segment) % 4 == 1:
        msg = "not base64url"
        raise ValueError(msg)
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if _encode_segment(data) != segment:
        msg = "not canonical base64url"
        raise ValueError(msg)
    return data


def _split(payload: bytes) -> _Token:
    """Three segments: a JSON object header, the payload, the signature. ValueError
    if ``payload`` is not that; nothing here is trusted yet."""
    text = payload.decode("ascii")  # UnicodeDecodeError is a ValueError
    parts = text.split(".")
    if len(parts) != 3:  # header, payload, signature
        msg = "not three segments"
        raise ValueError(msg)
    head, body, signature = parts
    if len(head) > _MAX_HEADER_SEGMENT:
        msg = "header too large"
        raise ValueError(msg)
    header = _load_json(_decode_segment(head))
    if not isinstance(header, dict) or "alg" not in header:
        msg = "protected header is not a JSON object with alg"
        raise ValueError(msg)
    return _Token(
        header=header,
        payload=_decode_segment(body),
        signing_input=f"{head}.{body}".encode("ascii"),
        signature=_decode_segment(signature),
    )


def sign_command(
    registry_key: Ed25519PrivateKey, registry_certificate: bytes, claims: Mapping[str, Any]
) -> bytes:
    """Sign ``claims`` as a command of the registry holding ``registry_key``.

    ``registry_certificate`` is the encoded certificate of that key (role REGISTRY).
    The claims are serialized as given (compact JSON), without validation, so that tests
    can sign deliberately bad commands; the registry validates before it signs. Returns
    the JWS compact serialization as UTF-8 bytes, the MQTT payload.
    """
    header = {
        "alg": ALGORITHM,
        "typ": COMMAND_TYPE,
        CERTIFICATE_HEADER: _encode_segment(registry_certificate),
    }
    payload = json.dumps(dict(claims), separators=(",", ":"), ensure_ascii=False)
    signing_input = ".".join(
        _encode_segment(part)
        for part in (json.dumps(header, separators=(",", ":")).encode(), payload.encode())
    )
    signature = registry_key.sign(signing_input.encode("ascii"))
    return f"{signing_input}.{_encode_segment(signature)}".encode("ascii")


# ------------------------------------------------------------------------------ helpers


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Two parsers reading {"gateway": "a", "gateway": "b"} differently is a classic way to
    # make a signer and a verifier disagree about what was signed.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            msg = f"duplicate key {key!r}"
            raise ValueError(msg)
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    msg = f"{name} is not JSON"
    raise ValueError(msg)


def _load_json(data: bytes) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity. Raises ValueError."""
    try:
        return json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_reject_duplicate_keys,
            parse_constant=_reject_constant,
        )
    except RecursionError as exc:  # deeply nested arrays
        msg = "JSON nested too deeply"
        raise ValueError(msg) from exc


def readable_id(value: object) -> str | None:
    """``value`` if it can be echoed as a correlation id (1..64 chars, no controls, and
    no lone surrogates, which a UTF-8 response cannot carry)."""
    if (
        isinstance(value, str)
        and 1 <= len(value) <= 64
        and not any(unicodedata.category(ch) in {"Cc", "Cs"} for ch in value)
    ):
        return value
    return None


def _readable_op(value: object) -> str | None:
    if isinstance(value, str) and re.fullmatch(_OP_PATTERN, value):
        return value
    return None


def _read_object(
    value: object, read: Callable[[Fields], T], prefix: str, code: str, refuse: _Refuser
) -> T:
    """``read`` of the JSON object ``value``, or a refusal naming its first problem."""
    if not isinstance(value, dict):
        raise refuse(code, f"{prefix}: must be a JSON object")
    fields = Fields(value)
    result = read(fields)
    fields.finish()
    if fields.problems:
        raise refuse(code, _describe(fields.problems, prefix))
    return result


_MAX_SHOWN_LOCATION: Final = 100


def _describe(problems: list[Problem], prefix: str) -> str:
    """The first problem, naming the field, e.g. ``args.target.device_id: ...``.

    Never the value: the message goes into the response and the logs.
    """
    first = problems[0]
    where = f"{prefix}.{first.dotted}" if first.location else prefix
    if len(where) > _MAX_SHOWN_LOCATION or not where.isprintable():
        # Unknown keys are named as sent; escaped, they cannot forge log lines.
        where = ascii(where[:_MAX_SHOWN_LOCATION])
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{where}: {first.reason}{more}"


# ------------------------------------------------------------------------------ verifier


class CommandVerifier:
    """Checks commands for one gateway; see the module documentation for the order.

    ``remember(jti, expires_at, now)`` must durably record a jti and return False if it
    was recorded before (:meth:`gateway.store.Store.remember_command`, run through the
    store's worker); it is called only for commands whose signature verified. ``clock``
    returns unix time; ``max_skew`` is how far (seconds) ``iat`` may lie in the future.
    """

    def __init__(
        self,
        authority_key: Ed25519PublicKey,
        gateway_id: str,
        remember: Callable[[str, float, float], Awaitable[bool]],
        clock: Callable[[], float] = time.time,
        max_skew: int = DEFAULT_MAX_SKEW,
    ) -> None:
        if not gateway_id or gateway_id == "*":
            msg = f"not a gateway id: {gateway_id!r}"
            raise ValueError(msg)
        self._authority_key = authority_key
        self._gateway_id = gateway_id
        self._remember = remember
        self._clock = clock
        self._max_skew = max_skew

    async def verify(self, payload: bytes, *, fleet: bool) -> Command:
        """The verified command, or :class:`CommandError` with the first failed check.

        ``fleet`` says the payload arrived on the organisation-wide topic, where only
        commands addressed to ``"*"`` are accepted.
        """
        now = self._clock()
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise CommandError(ErrorCode.MALFORMED, "payload is not bytes")
        payload = bytes(payload)
        if len(payload) > MAX_COMMAND_SIZE:
            msg = f"payload of {len(payload)} bytes exceeds {MAX_COMMAND_SIZE}"
            raise CommandError(ErrorCode.TOO_LARGE, msg)
        token = _parse(payload)
        # Until the signature has verified, refusals carry the id and op the (untrusted)
        # claims name, if readable, so that the registry can match the response.
        unverified = _peek_claims(token.payload)
        refuse = _Refuser(readable_id(unverified.get("id")), _readable_op(unverified.get("op")))

        _check_header(token.header, refuse)
        certificate = self._certificate(token.header.get(CERTIFICATE_HEADER), now, refuse)
        _check_signature(token, certificate, refuse)

        claims = _claims(token.payload, refuse)
        refuse = _Refuser(claims.id, claims.op)  # signed from here on
        self._check_claims(claims, now, fleet=fleet, refuse=refuse)
        # Kept past exp by the skew, so that a clock stepped back cannot reopen the window.
        if not await self._remember(claims.jti, float(claims.exp + self._max_skew), now):
            raise refuse(ErrorCode.REPLAYED, "jti seen before")

        args, update = _arguments(claims, issued_at=min(claims.iat, math.floor(now)), refuse=refuse)
        if isinstance(args, RevokeArgs | SetAccessArgs):
            _check_target_scope(args.target, certificate.scope, refuse)
        return Command(
            id=claims.id,
            op=claims.op,
            gateway=claims.gateway,
            issued_at=claims.iat,
            expires_at=claims.exp,
            jti=claims.jti,
            args=args,
            registry_subject=certificate.subject,
            registry_scope=certificate.scope,
            update=update,
        )

    def _check_claims(
        self, claims: CommandClaims, now: float, *, fleet: bool, refuse: _Refuser
    ) -> None:
        """Address and time: ``wrong_gateway``, ``not_yet_valid``, ``expired``, lifetime."""
        if fleet and claims.gateway != "*":
            raise refuse(ErrorCode.WRONG_GATEWAY, "fleet commands are addressed to '*'")
        if claims.gateway not in ("*", self._gateway_id):
            raise refuse(ErrorCode.WRONG_GATEWAY, "addressed to another gateway")
        if claims.iat > now + self._max_skew:
            raise refuse(ErrorCode.NOT_YET_VALID, "iat is in the future")
        if now >= claims.exp:
            raise refuse(ErrorCode.EXPIRED, "command expired")
        if claims.exp <= claims.iat or claims.exp - claims.iat > MAX_COMMAND_LIFETIME:
            msg = f"lifetime exp - iat must be 1..{MAX_COMMAND_LIFETIME} s"
            raise refuse(ErrorCode.MALFORMED, msg)

    def _certificate(self, encoded: object, now: float, refuse: _Refuser) -> Certificate:
        code = ErrorCode.UNTRUSTED_CERTIFICATE
        if not isinstance(encoded, str) or not encoded:
            raise refuse(ErrorCode.MALFORMED, f"header {CERTIFICATE_HEADER} must be a string")
        if len(encoded) > (MAX_CERTIFICATE_SIZE * 4 + 2) // 3:
            raise refuse(code, "CERT_MALFORMED: certificate too large")
        try:
            raw = _decode_segment(encoded)
        except ValueError as exc:
            raise refuse(code, "CERT_MALFORMED: not base64url") from exc
        try:
            certificate = decode_certificate(raw)
            verify_certificate(
                certificate, self._authority_key, role=Role.REGISTRY, now=math.floor(now)
            )
        except ProtocolError as exc:
            raise refuse(code, f"{exc.code.name}: {exc.message}") from exc
        return certificate


@dataclass(frozen=True)
class _Refuser:
    """Makes refusals that carry the correlation id and op known so far."""

    command_id: str | None
    op: str | None

    def __call__(self, code: str, message: str) -> CommandError:
        return CommandError(code, message, command_id=self.command_id, op=self.op)


def _check_header(header: Mapping[str, Any], refuse: _Refuser) -> None:
    """``bad_algorithm`` unless EdDSA; ``malformed`` unless exactly alg, typ and lgc."""
    algorithm = header.get("alg")
    if algorithm != ALGORITHM:
        shown = algorithm[:20] if isinstance(algorithm, str) else type(algorithm).__name__
        raise refuse(ErrorCode.BAD_ALGORITHM, f"algorithm {shown!r} is not {ALGORITHM}")
    extra = set(header) - _HEADER_KEYS
    if extra:
        # crit, b64 (unencoded payloads), jwk, jku, kid...: none has a meaning here, and
        # a key named by the sender itself must never be used.
        names = sorted(str(name)[:20] for name in extra)[:5]
        raise refuse(ErrorCode.MALFORMED, f"unexpected header parameters {names}")
    if header.get("typ") != COMMAND_TYPE:
        raise refuse(ErrorCode.MALFORMED, f"header typ must be {COMMAND_TYPE}")


def _check_signature(token: _Token, certificate: Certificate, refuse: _Refuser) -> None:
    """``bad_signature`` unless the certificate's key signed header and claims."""
    try:
        public = certificate.public_signing_key()
    except ProtocolError as exc:
        raise refuse(ErrorCode.BAD_SIGNATURE, "signature cannot be checked") from exc
    try:
        public.verify(token.signature, token.signing_input)
    except InvalidSignature:
        raise refuse(ErrorCode.BAD_SIGNATURE, "signature does not verify") from None


def _arguments(
    claims: CommandClaims, *, issued_at: int, refuse: _Refuser
) -> tuple[CommandArgs, AuthorisationUpdate | None]:
    """``unknown_op``, or the validated arguments (``bad_args``) and update body."""
    operation = OPERATIONS.get(claims.op)
    if operation is None:
        raise refuse(ErrorCode.UNKNOWN_OP, f"unknown operation {claims.op!r}")
    read: Callable[[Fields], CommandArgs] = operation.read
    args = _read_object(claims.args, read, "args", ErrorCode.BAD_ARGS, refuse)
    if not isinstance(args, RevokeArgs | SetAccessArgs):
        return args, None
    try:
        return args, args.to_update(issued_at)
    except ProtocolError as exc:
        # Limits only the whole update knows: duplicate keys, total size, ...
        raise refuse(ErrorCode.BAD_ARGS, f"args: {exc.message}") from exc


def _parse(payload: bytes) -> _Token:
    """The JWS compact serialization in ``payload``; ``malformed`` if it is none."""
    # A bare JSON command (unsigned) cannot be accepted, but its id can be echoed.
    command_id = readable_id(_peek_claims(payload).get("id"))
    try:
        return _split(payload)
    except ValueError as exc:
        raise CommandError(
            ErrorCode.MALFORMED, "not a JWS compact serialization", command_id=command_id
        ) from exc


def _peek_claims(data: bytes) -> dict[str, Any]:
    """Best-effort, untrusted claims: only ever used to correlate a refusal."""
    try:
        value = _load_json(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _claims(data: bytes, refuse: _Refuser) -> CommandClaims:
    try:
        value = _load_json(data)
    except ValueError as exc:
        raise refuse(ErrorCode.MALFORMED, f"claims are not JSON: {exc}") from exc
    return _read_object(value, CommandClaims.read, "claims", ErrorCode.MALFORMED, refuse)


def _check_target_scope(target: TargetArgs, scope: Scope, refuse: _Refuser) -> None:
    """Refuse fleet and site targets outside the registry's scope.

    A device target is left to the handler: whether a scope covers a device depends on
    the device's site, which only the store knows (:meth:`Command.covers`).
    """
    if scope.organisation_wide:
        return
    if target.kind == "fleet":
        raise refuse(ErrorCode.OUT_OF_SCOPE, "only an organisation-wide registry targets the fleet")
    if target.kind == "site" and target.site_id not in scope.sites:
        raise refuse(ErrorCode.OUT_OF_SCOPE, "the registry's scope does not cover this site")
