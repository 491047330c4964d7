"""Signed registry commands: every refusal, in the documented order, and nothing else.

No broker here: :class:`CommandVerifier` against a real store (replay protection), with
commands signed as the reference registry signs them, and forged every way we know.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway.commands import (
    MAX_COMMAND_LIFETIME,
    MAX_COMMAND_SIZE,
    OPERATIONS,
    Command,
    CommandError,
    CommandVerifier,
    DeclineArgs,
    DecommissionArgs,
    ErrorCode,
    GetStateArgs,
    PullLogsArgs,
    RegisterArgs,
    RevokeArgs,
    SetAccessArgs,
    TargetArgs,
    TimeSyncArgs,
    sign_command,
)
from gateway.fields import Fields
from gateway.store import Store
from gateway.worker import BlockingWorker
from protocols.envelopes import (
    MAX_ACCESS_ENTRIES,
    MAX_REMOVED_KEYS,
    MAX_REVOCATIONS,
    MAX_WINDOWS,
    Role,
    Scope,
    TargetKind,
    UpdateKind,
    encode_certificate,
    issue_certificate,
)
from tests.conftest import (
    GATEWAY_ID,
    ROOT,
    GatewayStore,
    Registry,
    Schemas,
    make_certificate,
)

DEVICE = "10c4000000000001"
NOW = int(time.time())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> bytes:
    """A JWS compact serialization built by hand, to forge what sign_command never would."""
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(signature)}".encode()


def header(registry: Registry, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "alg": "EdDSA",
        "typ": "lockgw-command+jws",
        "lgc": b64(registry.certificate),
    }
    fields.update(overrides)
    return {name: value for name, value in fields.items() if value is not None}


def signed_raw(registry: Registry, head: dict[str, Any], body: bytes) -> bytes:
    """A hand-made header and payload, validly signed with the registry's real key."""
    segments = f"{b64(json.dumps(head).encode())}.{b64(body)}"
    signature = registry.key.sign(segments.encode())
    return f"{segments}.{b64(signature)}".encode()


def ed25519_token(registry: Registry, head: dict[str, Any], claims: Any) -> bytes:
    """Hand-made header and claims, validly signed with the registry's real key."""
    return signed_raw(registry, head, json.dumps(claims).encode())


@pytest.fixture
def verifier(registry: Registry, gateway_store: GatewayStore) -> CommandVerifier:
    return CommandVerifier(registry.authority.public_key(), GATEWAY_ID, gateway_store.remember)


async def refusal(
    verifier: CommandVerifier, payload: bytes, *, fleet: bool = False
) -> CommandError:
    with pytest.raises(CommandError) as caught:
        await verifier.verify(payload, fleet=fleet)
    return caught.value


def seen_count(path: Path) -> int:
    with Store.open(path) as store:
        conn = store._conn
        assert conn is not None
        (count,) = conn.execute("SELECT count(*) FROM seen_commands").fetchone()
    return int(count)


# ------------------------------------------------------------------------ valid commands

REVOKE_ARGS: dict[str, Any] = {
    "update_id": "rev-2025-0042",
    "version": 43,
    "revocations": [{"key_id": 1207, "prune_after": NOW + 86_400}],
    "target": {"kind": "fleet"},
    "expires_at": NOW + 86_400,
}
SET_ACCESS_ARGS: dict[str, Any] = {
    "update_id": "acc-7",
    "target": {"kind": "site", "site_id": 4711},
    "mode": "delta",
    "version": 12,
    "base_version": 11,
    "entries": [
        {
            "key_id": 5,
            "valid_from": NOW - 10,
            "valid_until": NOW + 86_400,
            "windows": [
                {"days": ["mon", "tue", "fri"], "start": "07:00", "end": "15:30"},
                {"days": ["sun"], "start": "22:00", "end": "24:00"},
            ],
        }
    ],
    "removed": [9, 10],
    "expires_at": NOW + 86_400,
}
VALID_ARGS: dict[str, tuple[dict[str, Any], type]] = {
    "revoke": (REVOKE_ARGS, RevokeArgs),
    "set_access": (SET_ACCESS_ARGS, SetAccessArgs),
    "pull_logs": ({"device_id": DEVICE, "from": 10, "to": 20}, PullLogsArgs),
    "time_sync": ({"device_id": None}, TimeSyncArgs),
    "get_state": ({"device_id": DEVICE}, GetStateArgs),
    "register": (
        {"device_id": DEVICE, "work_order": "WO-1", "consent_reference": "CR-9"},
        RegisterArgs,
    ),
    "decommission": (
        {"device_id": DEVICE, "reason": "moved out", "force": False},
        DecommissionArgs,
    ),
}


@pytest.mark.parametrize("op", sorted(VALID_ARGS))
async def test_every_operation_verifies_into_its_model(
    op: str, registry: Registry, verifier: CommandVerifier, schemas: Schemas
) -> None:
    args, model = VALID_ARGS[op]
    claims = registry.claims(op, args)
    schemas.validate("command-claims", claims)
    command = await verifier.verify(registry.sign(claims), fleet=False)
    assert isinstance(command, Command)
    assert isinstance(command.args, model)
    assert (command.id, command.op, command.jti) == (claims["id"], op, claims["jti"])
    assert (command.issued_at, command.expires_at) == (claims["iat"], claims["exp"])
    assert command.registry_subject == "registry"
    assert command.registry_scope.organisation_wide
    assert (command.update is not None) == (op in {"revoke", "set_access"})


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("pull_logs", {"device_id": DEVICE, "from": "1", "to": 3}),
        ("get_state", {"device_id": DEVICE, "all": True}),
        ("get_state", {"device_id": DEVICE.upper()}),
        ("time_sync", {}),
        ("revoke", {**REVOKE_ARGS, "revocations": [{"key_id": 0, "prune_after": 1}]}),
        ("revoke", {**REVOKE_ARGS, "target": {"kind": "site"}}),
        ("set_access", {**SET_ACCESS_ARGS, "target": {"kind": "fleet"}}),
        ("set_access", {**SET_ACCESS_ARGS, "mode": "sometimes"}),
        ("register", {"device_id": DEVICE, "work_order": "a\nb", "consent_reference": "c"}),
        ("decommission", {"device_id": DEVICE, "reason": "x", "force": "yes"}),
    ],
)
async def test_the_schema_and_the_models_agree_on_bad_args(
    op: str, args: dict[str, Any], registry: Registry, verifier: CommandVerifier, schemas: Schemas
) -> None:
    # One known difference: JSON Schema counts 1.0 as an integer, the gateway does not
    # ("exp a float" among the refusals).
    assert not schemas.is_valid("command-claims", registry.claims(op, args))
    fields = Fields(args)
    OPERATIONS[op].read(fields)
    fields.finish()
    assert fields.problems
    assert (await refusal(verifier, registry.command(op, args))).code == "bad_args"


async def test_revoke_builds_the_revocation_update(
    registry: Registry, verifier: CommandVerifier
) -> None:
    command = await verifier.verify(registry.command("revoke", REVOKE_ARGS), fleet=False)
    update = command.update
    assert update is not None
    assert update.kind is UpdateKind.REVOCATION
    assert update.target.kind is TargetKind.FLEET
    assert update.version == 43
    assert [(r.key_id, r.prune_after) for r in update.revocations] == [(1207, NOW + 86_400)]
    assert update.issued_at <= int(time.time())
    assert update.expires_at == NOW + 86_400


async def test_set_access_builds_the_delta_update(
    registry: Registry, verifier: CommandVerifier
) -> None:
    command = await verifier.verify(registry.command("set_access", SET_ACCESS_ARGS), fleet=False)
    update = command.update
    assert update is not None
    assert update.kind is UpdateKind.ACCESS_DELTA
    assert (update.target.kind, update.target.site_id) == (TargetKind.SITE, 4711)
    assert (update.version, update.base_version) == (12, 11)
    (entry,) = update.access
    monday_tuesday_friday = 0b0010011
    assert [(w.days, w.start_minute, w.end_minute) for w in entry.windows] == [
        (monday_tuesday_friday, 7 * 60, 15 * 60 + 30),
        (0b1000000, 22 * 60, 24 * 60),
    ]
    assert update.removed_keys == (9, 10)


async def test_an_update_is_never_issued_in_the_gateways_future(
    registry: Registry, verifier: CommandVerifier
) -> None:
    # The registry's clock runs 20 s ahead (within the skew): devices would refuse an
    # update issued in their future, so it is issued at the gateway's now.
    now = int(time.time())
    claims = registry.claims("revoke", REVOKE_ARGS, iat=now + 20, exp=now + 80)
    command = await verifier.verify(registry.sign(claims), fleet=False)
    assert command.issued_at == now + 20
    assert command.update is not None
    assert command.update.issued_at <= now + 1


async def test_fleet_commands_address_every_gateway(
    registry: Registry, verifier: CommandVerifier
) -> None:
    fleet = await verifier.verify(registry.command("revoke", REVOKE_ARGS, gateway="*"), fleet=True)
    assert fleet.gateway == "*"
    # "*" is also this gateway on its own topic.
    direct = await verifier.verify(registry.command(gateway="*"), fleet=False)
    assert direct.gateway == "*"


def test_sign_command_makes_the_documented_jws(registry: Registry, schemas: Schemas) -> None:
    claims = registry.claims()
    token = sign_command(registry.key, registry.certificate, claims)
    head, body, signature = token.decode("ascii").split(".")
    padding = "=" * (-len(head) % 4)
    assert json.loads(base64.urlsafe_b64decode(head + padding)) == {
        "alg": "EdDSA",
        "typ": "lockgw-command+jws",
        "lgc": b64(registry.certificate),
    }
    decoded = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    assert decoded == claims
    schemas.validate("command-claims", decoded)
    raw_signature = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    registry.key.public_key().verify(raw_signature, f"{head}.{body}".encode())


def test_the_documented_error_codes_are_the_implemented_ones() -> None:
    text = (ROOT / "docs" / "mqtt-api.md").read_text(encoding="utf-8")
    table = text.split("<!-- table: command-errors -->", 1)[1].strip().split("\n\n", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.MULTILINE))
    implemented = {value for name, value in vars(ErrorCode).items() if name.isupper()}
    assert documented == implemented


def test_every_schema_is_documented() -> None:
    text = (ROOT / "docs" / "mqtt-api.md").read_text(encoding="utf-8")
    for schema in sorted((ROOT / "docs" / "schemas").glob("*.json")):
        assert f"schemas/{schema.name}" in text, schema.name


def test_error_codes_are_snake_case() -> None:
    assert CommandError("unknown_device", "no such device").code == "unknown_device"
    with pytest.raises(ValueError, match="snake case"):
        CommandError("Unknown Device", "x")


# -------------------------------------------------------------------------- refusals

Forge = Callable[[Registry], bytes]


def other_authority_certificate(registry: Registry) -> bytes:
    return make_certificate(Ed25519PrivateKey.generate(), registry.key)


def gateway_certificate(registry: Registry) -> bytes:
    now = int(time.time())
    return encode_certificate(
        issue_certificate(
            registry.authority,
            role=Role.GATEWAY,
            subject=GATEWAY_ID,
            serial=2,
            signing_key=registry.key.public_key(),
            noise_key=X25519PrivateKey.generate().public_key(),
            scope=Scope(organisation_wide=True),
            not_before=now - 3600,
            not_after=now + 3600,
        )
    )


def hs256(registry: Registry) -> bytes:
    # Key confusion: an HMAC "signed" with public material the verifier also holds.
    head = b64(json.dumps(header(registry, alg="HS256")).encode())
    body = b64(json.dumps(registry.claims()).encode())
    mac = hmac.new(registry.certificate, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(mac)}".encode()


def forged(registry: Registry) -> bytes:
    forger = Ed25519PrivateKey.generate()
    return sign_command(forger, registry.certificate, registry.claims())


def tampered(registry: Registry) -> bytes:
    head, _, signature = registry.command().split(b".")
    claims = registry.claims("decommission", {"device_id": DEVICE, "reason": "x", "force": True})
    return b".".join((head, b64(json.dumps(claims).encode()).encode(), signature))


def truncated_signature(registry: Registry) -> bytes:
    head, body, signature = registry.command().split(b".")
    raw = base64.urlsafe_b64decode(signature + b"=" * (-len(signature) % 4))
    return b".".join((head, body, b64(raw[:-3]).encode()))


def padded_signature(registry: Registry) -> bytes:
    # base64url in a JWS has no padding (RFC 7515, section 2).
    return registry.command() + b"=="


def loose_last_character(registry: Registry) -> bytes:
    # 64 bytes leave 4 unused bits in the last character: a decoder that ignored them
    # would accept 16 spellings of one signature.
    command = registry.command()
    last = command[-1:]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return command[:-1] + alphabet[alphabet.index(last) ^ 1 : (alphabet.index(last) ^ 1) + 1]


def with_certificate(make: Callable[[Registry], bytes]) -> Forge:
    return lambda registry: registry.sign(registry.claims(), certificate=make(registry))


def claims_of(**overrides: Any) -> Forge:
    return lambda registry: registry.sign(registry.claims(**overrides))


def timed(iat: int, exp: int) -> Forge:
    """Claims issued ``iat`` and expiring ``exp`` seconds from when the case is forged
    (not imported: the bridge tests forge these much later)."""
    return lambda registry: registry.sign(registry.claims(iat=now_plus(iat), exp=now_plus(exp)))


def op_args(op: str, args: Any) -> Forge:
    return lambda registry: registry.command(op, args)


def now_plus(seconds: int) -> int:
    return int(time.time()) + seconds


REFUSALS: dict[str, tuple[Forge, str]] = {
    # size and form
    "oversized": (lambda _r: b"a" * (MAX_COMMAND_SIZE + 1), "too_large"),
    "oversized signed command": (
        lambda r: r.command("register", {"device_id": DEVICE, "work_order": "x" * 70_000}),
        "too_large",
    ),
    "empty": (lambda _r: b"", "malformed"),
    "not utf-8": (lambda _r: b"\xff\xfe\x00garbage", "malformed"),
    "plain text": (lambda _r: b"open all doors", "malformed"),
    "bare JSON claims": (lambda r: json.dumps(r.claims()).encode(), "malformed"),
    "two segments": (lambda r: b".".join(r.command().split(b".")[:2]), "malformed"),
    "four segments": (lambda r: r.command() + b".e30", "malformed"),
    "header not JSON": (lambda r: b"bm90IGpzb24." + r.command().split(b".", 1)[1], "malformed"),
    "header is a list": (lambda r: raw_token(["alg"], r.claims()), "malformed"),  # type: ignore[arg-type]  # bad on purpose
    "no alg": (lambda r: raw_token(header(r, alg=None), r.claims()), "malformed"),
    # algorithms
    "alg none": (lambda r: raw_token(header(r, alg="none"), r.claims()), "bad_algorithm"),
    "alg None, signed": (
        lambda r: ed25519_token(r, header(r, alg="none"), r.claims()),
        "bad_algorithm",
    ),
    "alg HS256": (hs256, "bad_algorithm"),
    "alg Ed25519": (
        lambda r: ed25519_token(r, header(r, alg="Ed25519"), r.claims()),
        "bad_algorithm",
    ),
    "alg not a string": (lambda r: ed25519_token(r, header(r, alg=1), r.claims()), "bad_algorithm"),
    # header
    "typ missing": (lambda r: ed25519_token(r, header(r, typ=None), r.claims()), "malformed"),
    "typ JWT": (lambda r: ed25519_token(r, header(r, typ="JWT"), r.claims()), "malformed"),
    "kid header": (lambda r: ed25519_token(r, header(r, kid="k1"), r.claims()), "malformed"),
    "embedded jwk": (
        lambda r: ed25519_token(r, header(r, jwk={"kty": "OKP"}), r.claims()),
        "malformed",
    ),
    "unencoded payload": (
        lambda r: ed25519_token(r, header(r, b64=False, crit=["b64"]), r.claims()),
        "malformed",
    ),
    "lgc missing": (lambda r: ed25519_token(r, header(r, lgc=None), r.claims()), "malformed"),
    # certificate
    "lgc not base64url": (
        lambda r: ed25519_token(r, header(r, lgc="not base64!"), r.claims()),
        "untrusted_certificate",
    ),
    "lgc not a certificate": (
        lambda r: ed25519_token(r, header(r, lgc=b64(b"LC\x01junk")), r.claims()),
        "untrusted_certificate",
    ),
    "certificate of another authority": (
        with_certificate(other_authority_certificate),
        "untrusted_certificate",
    ),
    "gateway certificate": (with_certificate(gateway_certificate), "untrusted_certificate"),
    "expired certificate": (
        with_certificate(
            lambda r: make_certificate(
                r.authority, r.key, not_before=now_plus(-7200), not_after=now_plus(-60)
            )
        ),
        "untrusted_certificate",
    ),
    "certificate not yet valid": (
        with_certificate(
            lambda r: make_certificate(
                r.authority, r.key, not_before=now_plus(600), not_after=now_plus(7200)
            )
        ),
        "untrusted_certificate",
    ),
    # signature
    "forged signature": (forged, "bad_signature"),
    "claims swapped under a signature": (tampered, "bad_signature"),
    "signature truncated": (truncated_signature, "bad_signature"),
    "signature padded": (padded_signature, "malformed"),
    "signature spelt with unused bits set": (loose_last_character, "malformed"),
    # claims
    "claims not JSON": (lambda r: signed_raw(r, header(r), b"not json"), "malformed"),
    "claims NaN": (lambda r: signed_raw(r, header(r), b'{"id": NaN}'), "malformed"),
    "claims a list": (lambda r: ed25519_token(r, header(r), [1, 2]), "malformed"),
    "id missing": (lambda r: ed25519_token(r, header(r), _without(r.claims(), "id")), "malformed"),
    "id too long": (claims_of(id="x" * 65), "malformed"),
    "id with a newline": (claims_of(id="a\nb"), "malformed"),
    "jti too short": (claims_of(jti="short"), "malformed"),
    "iat a string": (claims_of(iat=str(NOW)), "malformed"),
    "exp a float": (claims_of(exp=NOW + 60.0), "malformed"),
    "extra claim": (claims_of(nbf=NOW), "malformed"),
    "op not a name": (claims_of(op="Get State"), "malformed"),
    # address and time
    "wrong gateway": (claims_of(gateway="gw-south-2"), "wrong_gateway"),
    "expired": (timed(-120, -60), "expired"),
    "iat in the future": (timed(120, 180), "not_yet_valid"),
    "lifetime too long": (timed(-10, MAX_COMMAND_LIFETIME - 9), "malformed"),
    "exp before iat": (timed(20, 10), "malformed"),
    # operation and arguments
    "unknown op": (claims_of(op="open_all_doors"), "unknown_op"),
    "args wrong type": (
        op_args("pull_logs", {"device_id": DEVICE, "from": "1", "to": 3}),
        "bad_args",
    ),
    "args bool for int": (
        op_args("pull_logs", {"device_id": DEVICE, "from": True, "to": 3}),
        "bad_args",
    ),
    "args extra field": (op_args("get_state", {"device_id": DEVICE, "all": True}), "bad_args"),
    "args missing field": (op_args("time_sync", {}), "bad_args"),
    "bad device id (upper case)": (op_args("get_state", {"device_id": DEVICE.upper()}), "bad_args"),
    "bad device id (short)": (op_args("get_state", {"device_id": DEVICE[:-1]}), "bad_args"),
    "key id 0": (
        op_args("revoke", {**REVOKE_ARGS, "revocations": [{"key_id": 0, "prune_after": 1}]}),
        "bad_args",
    ),
    "key id above u32": (
        op_args("revoke", {**REVOKE_ARGS, "revocations": [{"key_id": 2**32, "prune_after": 1}]}),
        "bad_args",
    ),
    "duplicate revocation": (
        op_args(
            "revoke",
            {**REVOKE_ARGS, "revocations": [{"key_id": 7, "prune_after": 1}] * 2},
        ),
        "bad_args",
    ),
    "access for the fleet": (
        op_args("set_access", {**SET_ACCESS_ARGS, "target": {"kind": "fleet"}}),
        "bad_args",
    ),
    "site target naming a device": (
        op_args(
            "set_access",
            {**SET_ACCESS_ARGS, "target": {"kind": "site", "site_id": 1, "device_id": DEVICE}},
        ),
        "bad_args",
    ),
    "full list removing keys": (
        op_args("set_access", {**SET_ACCESS_ARGS, "mode": "full", "base_version": 0}),
        "bad_args",
    ),
    "window across midnight": (
        op_args(
            "set_access",
            {
                **SET_ACCESS_ARGS,
                "entries": [
                    {
                        "key_id": 5,
                        "valid_from": 1,
                        "valid_until": 2,
                        "windows": [{"days": ["mon"], "start": "22:00", "end": "06:00"}],
                    }
                ],
            },
        ),
        "bad_args",
    ),
    "pull from after to": (
        op_args("pull_logs", {"device_id": DEVICE, "from": 9, "to": 3}),
        "bad_args",
    ),
    "update id with a slash": (
        op_args("revoke", {**REVOKE_ARGS, "update_id": "a/b"}),
        "bad_args",
    ),
}


def _without(claims: dict[str, Any], name: str) -> dict[str, Any]:
    return {key: value for key, value in claims.items() if key != name}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_refusals_carry_their_typed_code(
    case: str, registry: Registry, verifier: CommandVerifier, gateway_store: GatewayStore
) -> None:
    forge, code = REFUSALS[case]
    payload = forge(registry)
    error = await refusal(verifier, payload)
    assert error.code == code, f"{case}: {error!r}"
    assert error.message
    assert await gateway_store.worker.run(gateway_store.store.outbox_depth) == 0
    if code not in {"replayed", "unknown_op", "bad_args", "out_of_scope"}:
        # Refused before the replay check: nothing is written to the store.
        assert seen_count(gateway_store.path) == 0


async def test_certificate_refusals_name_the_protocol_code(
    registry: Registry, verifier: CommandVerifier
) -> None:
    cases = {
        "CERT_BAD_SIGNATURE": other_authority_certificate(registry),
        "CERT_WRONG_ROLE": gateway_certificate(registry),
        "CERT_EXPIRED": make_certificate(
            registry.authority, registry.key, not_before=now_plus(-7200), not_after=now_plus(-1)
        ),
    }
    for protocol_code, certificate in cases.items():
        error = await refusal(verifier, registry.sign(registry.claims(), certificate=certificate))
        assert error.code == "untrusted_certificate"
        assert error.message.startswith(protocol_code), error.message


async def test_a_command_is_accepted_once(registry: Registry, verifier: CommandVerifier) -> None:
    payload = registry.command()
    await verifier.verify(payload, fleet=False)
    assert (await refusal(verifier, payload)).code == "replayed"
    # A new jti with the same content is a new command.
    await verifier.verify(registry.command(), fleet=False)


async def test_a_replay_is_refused_after_a_restart(registry: Registry, tmp_path: Path) -> None:
    path = tmp_path / "restart.db"
    payload = registry.command()
    for attempt in range(2):
        with Store.open(path) as store:
            async with BlockingWorker("store") as worker:

                async def remember(jti: str, expires_at: float, now: float) -> bool:
                    return await worker.run(store.remember_command, jti, expires_at, now)

                verifier = CommandVerifier(registry.authority.public_key(), GATEWAY_ID, remember)
                if attempt == 0:
                    await verifier.verify(payload, fleet=False)
                else:
                    assert (await refusal(verifier, payload)).code == "replayed"


async def test_the_jti_is_kept_past_expiry_by_the_skew(
    registry: Registry, gateway_store: GatewayStore
) -> None:
    calls: list[tuple[str, float, float]] = []

    async def remember(jti: str, expires_at: float, now: float) -> bool:
        calls.append((jti, expires_at, now))
        return await gateway_store.remember(jti, expires_at, now)

    verifier = CommandVerifier(registry.authority.public_key(), GATEWAY_ID, remember, max_skew=30)
    claims = registry.claims()
    await verifier.verify(registry.sign(claims), fleet=False)
    ((jti, expires_at, now),) = calls
    assert (jti, expires_at) == (claims["jti"], claims["exp"] + 30.0)
    assert abs(now - time.time()) < 5


async def test_fleet_topic_needs_a_star(registry: Registry, verifier: CommandVerifier) -> None:
    error = await refusal(verifier, registry.command("revoke", REVOKE_ARGS), fleet=True)
    assert error.code == "wrong_gateway"
    error = await refusal(
        verifier, registry.command("revoke", REVOKE_ARGS, gateway="gw-south-2"), fleet=True
    )
    assert error.code == "wrong_gateway"


async def test_iat_within_the_skew_is_accepted(
    registry: Registry, verifier: CommandVerifier
) -> None:
    await verifier.verify(registry.command(iat=now_plus(25), exp=now_plus(85)), fleet=False)


async def test_the_scope_of_the_registry_certificate_binds(
    registry: Registry, gateway_store: GatewayStore
) -> None:
    registry.certificate = make_certificate(
        registry.authority, registry.key, scope=Scope(sites=frozenset({4711}))
    )
    verifier = CommandVerifier(registry.authority.public_key(), GATEWAY_ID, gateway_store.remember)
    fleet = await refusal(verifier, registry.command("revoke", REVOKE_ARGS))
    assert fleet.code == "out_of_scope"
    other_site = {**SET_ACCESS_ARGS, "target": {"kind": "site", "site_id": 4712}}
    assert (await refusal(verifier, registry.command("set_access", other_site))).code == (
        "out_of_scope"
    )
    command = await verifier.verify(registry.command("set_access", SET_ACCESS_ARGS), fleet=False)
    device = bytes.fromhex(DEVICE)
    assert command.covers(device, 4711)
    assert not command.covers(device, 4712)


# ------------------------------------------------------------------- what refusals say

WINDOW: dict[str, Any] = {"days": ["mon"], "start": "07:00", "end": "15:30"}


def access_with(**entry: Any) -> dict[str, Any]:
    """set_access arguments whose one entry has ``entry`` changed."""
    (original,) = SET_ACCESS_ARGS["entries"]
    return {**SET_ACCESS_ARGS, "entries": [{**original, **entry}]}


BAD_ARGS_MESSAGES: dict[str, tuple[str, dict[str, Any], str]] = {
    "a string for an integer": (
        "pull_logs",
        {"device_id": DEVICE, "from": "1", "to": 3},
        "args.from: must be an integer from 0 to 4294967295",
    ),
    "a float for an integer": (
        "pull_logs",
        {"device_id": DEVICE, "from": 1.0, "to": 3},
        "args.from: must be an integer from 0 to 4294967295",
    ),
    "above u32": (
        "pull_logs",
        {"device_id": DEVICE, "from": 1, "to": 2**32},
        "args.to: must be an integer from 0 to 4294967295",
    ),
    "a required key left out": (
        "register",
        {"device_id": DEVICE, "work_order": "w"},
        ("args.consent_reference: required"),
    ),
    "device_id required even though it may be null": (
        "get_state",
        {},
        "args.device_id: required",
    ),
    "an unknown key": (
        "get_state",
        {"device_id": DEVICE, "all": True},
        "args.all: unknown key",
    ),
    "an unknown key in a nested table": (
        "revoke",
        {**REVOKE_ARGS, "target": {"kind": "fleet", "site": 1}},
        "args.target.site: unknown key",
    ),
    "an unknown key deep in arrays of tables": (
        "set_access",
        access_with(windows=[WINDOW, {**WINDOW, "days": ["tue"], "extra": 1}]),
        "args.entries[0].windows[1].extra: unknown key",
    ),
    "a bad value deep in arrays of tables": (
        "set_access",
        access_with(windows=[WINDOW, {**WINDOW, "start": "24:30"}]),
        "args.entries[0].windows[1].start: must be a time HH:MM from 00:00 to 24:00",
    ),
    "a bad item of an array": (
        "set_access",
        {**SET_ACCESS_ARGS, "removed": [9, 0]},
        "args.removed[1]: must be an integer from 1 to 4294967295",
    ),
    "a day not in lower case": (
        "set_access",
        access_with(windows=[{**WINDOW, "days": ["Mon"]}]),
        (
            "args.entries[0].windows[0].days[0]: must be 'mon', 'tue', 'wed', 'thu', 'fri', "
            "'sat' or 'sun'"
        ),
    ),
    "no days": (
        "set_access",
        access_with(windows=[{**WINDOW, "days": []}]),
        "args.entries[0].windows[0].days: must have 1 to 7 items",
    ),
    "repeated days": (
        "set_access",
        access_with(windows=[{**WINDOW, "days": ["mon", "tue", "mon"]}]),
        "args.entries[0].windows[0]: days repeat",
    ),
    "a window across midnight": (
        "set_access",
        access_with(windows=[{**WINDOW, "start": "22:00", "end": "06:00"}]),
        "args.entries[0].windows[0]: start must be before end (split windows that cross midnight)",
    ),
    "too many windows": (
        "set_access",
        access_with(windows=[WINDOW] * (MAX_WINDOWS + 1)),
        f"args.entries[0].windows: must have 1 to {MAX_WINDOWS} items",
    ),
    "no windows": (
        "set_access",
        access_with(windows=[]),
        (f"args.entries[0].windows: must have 1 to {MAX_WINDOWS} items"),
    ),
    "an entry ending before it starts": (
        "set_access",
        access_with(valid_from=NOW, valid_until=NOW),
        "args.entries[0]: valid_from must be before valid_until",
    ),
    "a table that is not one": (
        "revoke",
        {**REVOKE_ARGS, "revocations": [7]},
        "args.revocations[0]: must be a table",
    ),
    "a site target without its site": (
        "revoke",
        {**REVOKE_ARGS, "target": {"kind": "site"}},
        "args.target: a site target names site_id and nothing else",
    ),
    "a device target naming a site": (
        "revoke",
        {**REVOKE_ARGS, "target": {"kind": "device", "device_id": DEVICE, "site_id": 1}},
        "args.target: a device target names device_id and nothing else",
    ),
    "a fleet target naming a device": (
        "revoke",
        {**REVOKE_ARGS, "target": {"kind": "fleet", "device_id": DEVICE}},
        "args.target: a fleet target names no site or device",
    ),
    "access for the fleet": (
        "set_access",
        {**SET_ACCESS_ARGS, "target": {"kind": "fleet"}},
        "args: access lists are for a site or a device, never the fleet",
    ),
    "a full list on a base version": (
        "set_access",
        {**SET_ACCESS_ARGS, "mode": "full", "removed": []},
        "args: a full list has base_version 0 and removes nothing",
    ),
    "a delta not above its base": (
        "set_access",
        {**SET_ACCESS_ARGS, "base_version": 12},
        "args: a delta's version must be above its base_version",
    ),
    "from after to": (
        "pull_logs",
        {"device_id": DEVICE, "from": 9, "to": 3},
        "args: from must not be after to",
    ),
    "the attribute's name for the key from": (
        "pull_logs",
        {"device_id": DEVICE, "time_from": 1, "to": 3},
        "args.from: required (and 1 more)",
    ),
    # A cross-field check waits for its fields: no "(and 1 more)" about the order.
    "a cross-field check after a bad field": (
        "pull_logs",
        {"device_id": DEVICE, "from": "9", "to": 3},
        "args.from: must be an integer from 0 to 4294967295",
    ),
    "a cross-field check after a bad nested table": (
        "set_access",
        {**SET_ACCESS_ARGS, "target": {"kind": "fleet", "site_id": "1"}},
        "args.target.site_id: must be an integer from 0 to 4294967295",
    ),
    "several problems": (
        "pull_logs",
        {"device_id": "x", "from": True, "to": None, "all": 1},
        "args.device_id: must be 16 lower-case hex digits (and 3 more)",
    ),
    "true for a boolean's place taken by a string": (
        "decommission",
        {"device_id": DEVICE, "reason": "moved out", "force": "true"},
        "args.force: must be true or false",
    ),
    "null for a list": (
        "decline",
        {"request_id": "ab" * 16, "reason": "needed", "needed_by": None},
        "args.needed_by: must be an array",
    ),
    "too many needed_by": (
        "decline",
        {"request_id": "ab" * 16, "reason": "needed", "needed_by": ["x"] * 33},
        "args.needed_by: must have at most 32 items",
    ),
    "an unknown key with a newline": (
        "get_state",
        {"device_id": DEVICE, "a\nb": 1},
        "'args.a\\nb': unknown key",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGS_MESSAGES))
async def test_bad_args_name_the_first_problem_and_count_the_rest(
    case: str, registry: Registry, verifier: CommandVerifier
) -> None:
    op, args, message = BAD_ARGS_MESSAGES[case]
    error = await refusal(verifier, registry.command(op, args))
    assert (error.code, error.message) == ("bad_args", message)


async def test_refusals_never_show_the_value(registry: Registry, verifier: CommandVerifier) -> None:
    sent = "sent-value-never-echoed"
    for op, args in (
        ("get_state", {"device_id": sent}),
        ("get_state", {"device_id": DEVICE, "extra": sent}),
        ("register", {"device_id": DEVICE, "work_order": sent + "\n", "consent_reference": "c"}),
        ("revoke", {**REVOKE_ARGS, "target": {"kind": sent}}),
    ):
        error = await refusal(verifier, registry.command(op, args))
        assert error.code == "bad_args"
        assert sent not in error.message, error.message
    error = await refusal(verifier, registry.sign(registry.claims(gateway="x" * 65)))
    assert (error.code, error.message) == (
        "malformed",
        "claims.gateway: must be 1 to 64 characters",
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"args": []}, "claims.args: must be a JSON object"),
        ({"args": "device_id"}, "claims.args: must be a JSON object"),
        (
            {"iat": "1", "exp": 2.0},
            "claims.iat: must be an integer from 0 to 4294967295 (and 1 more)",
        ),
        ({"gateway": ""}, "claims.gateway: must be 1 to 64 characters"),
        ({"op": "Get State"}, "claims.op: must be a-z and _, starting with a letter, at most 32"),
        (
            {"jti": "a b" * 8},
            "claims.jti: must be 16 to 64 printable ASCII characters, no spaces",
        ),
        ({"nbf": NOW}, "claims.nbf: unknown key"),
    ],
)
async def test_malformed_claims_name_the_first_problem(
    overrides: dict[str, Any], message: str, registry: Registry, verifier: CommandVerifier
) -> None:
    error = await refusal(verifier, registry.sign(registry.claims(**overrides)))
    assert (error.code, error.message) == ("malformed", message)


async def test_missing_claims_are_each_required(
    registry: Registry, verifier: CommandVerifier
) -> None:
    claims = {"op": "get_state", "args": {"device_id": None}}
    error = await refusal(verifier, ed25519_token(registry, header(registry), claims))
    assert (error.code, error.message) == ("malformed", "claims.id: required (and 4 more)")


@pytest.mark.parametrize(
    ("op", "args", "expected"),
    [
        ("time_sync", {"device_id": None}, TimeSyncArgs(device_id=None)),
        ("time_sync", {"device_id": DEVICE}, TimeSyncArgs(device_id=DEVICE)),
        ("get_state", {"device_id": None}, GetStateArgs(device_id=None)),
        (
            "pull_logs",
            {"device_id": DEVICE, "from": 5, "to": 5},
            PullLogsArgs(device_id=DEVICE, time_from=5, time_to=5),
        ),
        (
            "decommission",
            {"device_id": DEVICE, "reason": "moved out", "force": True, "request_id": None},
            DecommissionArgs(device_id=DEVICE, reason="moved out", force=True),
        ),
        (
            "decommission",
            {"device_id": DEVICE, "reason": "moved out", "force": False, "request_id": "ab" * 16},
            DecommissionArgs(
                device_id=DEVICE, reason="moved out", force=False, request_id="ab" * 16
            ),
        ),
        (
            "decline",
            {"request_id": "ab" * 16, "reason": "needed"},
            DeclineArgs(request_id="ab" * 16, reason="needed", needed_by=()),
        ),
        (
            "decline",
            {"request_id": "ab" * 16, "reason": "needed", "needed_by": ["home-nursing"]},
            DeclineArgs(request_id="ab" * 16, reason="needed", needed_by=("home-nursing",)),
        ),
    ],
)
async def test_arguments_read_into_their_values(
    op: str, args: dict[str, Any], expected: object, registry: Registry, verifier: CommandVerifier
) -> None:
    command = await verifier.verify(registry.command(op, args), fleet=False)
    assert command.args == expected


async def test_target_ids_may_be_null_when_not_needed(
    registry: Registry, verifier: CommandVerifier
) -> None:
    args = {**SET_ACCESS_ARGS, "target": {"kind": "site", "site_id": 4711, "device_id": None}}
    command = await verifier.verify(registry.command("set_access", args), fleet=False)
    assert isinstance(command.args, SetAccessArgs)
    assert command.args.target == TargetArgs(kind="site", site_id=4711)
    fleet = {**REVOKE_ARGS, "target": {"kind": "fleet", "site_id": None, "device_id": None}}
    command = await verifier.verify(registry.command("revoke", fleet), fleet=False)
    assert isinstance(command.args, RevokeArgs)
    assert command.args.target == TargetArgs(kind="fleet")


async def test_arguments_are_immutable_tuples(
    registry: Registry, verifier: CommandVerifier
) -> None:
    command = await verifier.verify(registry.command("set_access", SET_ACCESS_ARGS), fleet=False)
    args = command.args
    assert isinstance(args, SetAccessArgs)
    (entry,) = args.entries
    assert entry.windows[0].days == ("mon", "tue", "fri")
    assert args.removed == (9, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.mode = "full"  # type: ignore[misc]  # frozen on purpose


async def test_lone_surrogates_are_refused(registry: Registry, verifier: CommandVerifier) -> None:
    # JSON escapes can spell them; no UTF-8 log line or response can hold them.
    args = {"device_id": DEVICE, "work_order": "wo-\ud800", "consent_reference": "c"}
    claims = registry.claims("register", args)
    error = await refusal(verifier, ed25519_token(registry, header(registry), claims))
    assert (error.code, error.message) == (
        "bad_args",
        "args.work_order: must be valid Unicode (no lone surrogates)",
    )
    claims = registry.claims(id="c-\udfff")
    error = await refusal(verifier, ed25519_token(registry, header(registry), claims))
    assert (error.code, error.message) == (
        "malformed",
        "claims.id: must be valid Unicode (no lone surrogates)",
    )
    assert error.command_id is None  # not echoed: a UTF-8 response could not carry it


def test_array_lengths_are_limited() -> None:
    # Too large for a command payload, so read directly.
    revocations = [{"key_id": 1, "prune_after": 1}] * (MAX_REVOCATIONS + 1)
    fields = Fields({**REVOKE_ARGS, "revocations": revocations})
    RevokeArgs.read(fields)
    assert [(problem.dotted, problem.reason) for problem in fields.problems] == [
        ("revocations", f"must have at most {MAX_REVOCATIONS} items")
    ]
    fields = Fields({**SET_ACCESS_ARGS, "removed": [1] * (MAX_REMOVED_KEYS + 1)})
    SetAccessArgs.read(fields)
    assert [(problem.dotted, problem.reason) for problem in fields.problems] == [
        ("removed", f"must have at most {MAX_REMOVED_KEYS} items")
    ]
    entries = [SET_ACCESS_ARGS["entries"][0]] * (MAX_ACCESS_ENTRIES + 1)
    fields = Fields({**SET_ACCESS_ARGS, "entries": entries})
    SetAccessArgs.read(fields)
    assert [(problem.dotted, problem.reason) for problem in fields.problems] == [
        ("entries", f"must have at most {MAX_ACCESS_ENTRIES} items")
    ]


def test_reading_records_every_problem_with_its_place() -> None:
    fields = Fields(
        {
            **SET_ACCESS_ARGS,
            "version": True,
            "entries": [{"key_id": 0, "valid_from": 1, "valid_until": 2, "windows": [{}]}],
            "surplus": 1,
        }
    )
    SetAccessArgs.read(fields)
    fields.finish()
    assert [problem.dotted for problem in fields.problems] == [
        "version",
        "entries[0].key_id",
        "entries[0].windows[0].days",
        "entries[0].windows[0].start",
        "entries[0].windows[0].end",
        "surplus",
    ]


# -------------------------------------------------------------------------- the order


async def test_the_signature_is_checked_before_any_claim(
    registry: Registry, verifier: CommandVerifier
) -> None:
    # An expired command for another gateway with an unknown op, signed by a forger:
    # the forger learns only that the signature is bad.
    forger = Ed25519PrivateKey.generate()
    claims = registry.claims(op="nope", gateway="gw-x", iat=NOW - 999, exp=NOW - 900)
    error = await refusal(verifier, sign_command(forger, registry.certificate, claims))
    assert error.code == "bad_signature"


async def test_address_and_time_come_before_the_replay_store(
    registry: Registry, verifier: CommandVerifier, gateway_store: GatewayStore
) -> None:
    for claims, code in (
        (registry.claims(gateway="gw-x"), "wrong_gateway"),
        (registry.claims(iat=NOW - 120, exp=NOW - 60), "expired"),
    ):
        payload = registry.sign(claims)
        assert (await refusal(verifier, payload)).code == code
        assert (await refusal(verifier, payload)).code == code  # not "replayed"
    assert seen_count(gateway_store.path) == 0


async def test_the_jti_is_spent_before_the_arguments_are_checked(
    registry: Registry, verifier: CommandVerifier
) -> None:
    # As documented: a signed command with bad arguments cannot be retried as is.
    payload = registry.command("get_state", {"device_id": "nope"})
    assert (await refusal(verifier, payload)).code == "bad_args"
    assert (await refusal(verifier, payload)).code == "replayed"


async def test_refusals_carry_the_correlation_id_when_readable(
    registry: Registry, verifier: CommandVerifier
) -> None:
    claims = registry.claims(op="get_state", iat=NOW - 120, exp=NOW - 60)
    error = await refusal(verifier, registry.sign(claims))
    assert (error.command_id, error.op) == (claims["id"], "get_state")
    # Forged: the id is echoed for correlation, though nothing else is believed.
    forged_error = await refusal(verifier, forged(registry))
    assert forged_error.command_id is not None
    # Bare JSON: readable id; garbage: none.
    bare = await refusal(verifier, json.dumps({"id": "c-1", "op": "revoke"}).encode())
    assert bare.command_id == "c-1"
    garbage = await refusal(verifier, b"\x00\x01\x02")
    assert (garbage.command_id, garbage.op) == (None, None)
    # An id that cannot be echoed safely is not.
    hostile = await refusal(verifier, json.dumps({"id": "a\r\nb"}).encode())
    assert hostile.command_id is None


async def test_duplicate_claim_keys_are_refused(
    registry: Registry, verifier: CommandVerifier
) -> None:
    claims = registry.claims()
    text = json.dumps(claims)[:-1] + ', "gateway": "gw-south-2"}'
    head = b64(json.dumps(header(registry)).encode())
    body = b64(text.encode())
    signature = registry.key.sign(f"{head}.{body}".encode())
    error = await refusal(verifier, f"{head}.{body}.{b64(signature)}".encode())
    assert error.code == "malformed"
    assert "duplicate" in error.message


async def test_mutated_commands_are_always_refused_with_a_code(registry: Registry) -> None:
    # Bit flips and truncations of a valid command: every one refused with a typed
    # error, none accepted, nothing else raised.
    seen: set[str] = set()

    async def remember(jti: str, expires_at: float, now: float) -> bool:  # noqa: ARG001 - the verifier's signature
        if jti in seen:
            return False
        seen.add(jti)
        return True

    verifier = CommandVerifier(registry.authority.public_key(), GATEWAY_ID, remember)
    original = registry.command()
    rng = random.Random(2025)
    codes: set[str] = set()
    for _ in range(1500):
        mutated = bytearray(original)
        for _ in range(rng.randint(1, 3)):
            position = rng.randrange(len(mutated))
            mutated[position] = rng.randrange(256)
        if rng.random() < 0.2:
            mutated = mutated[: rng.randrange(len(mutated))]
        if bytes(mutated) == original:
            continue
        try:
            await verifier.verify(bytes(mutated), fleet=False)
        except CommandError as exc:
            codes.add(exc.code)
        else:
            # Base64 has a little slack in the last character of a segment only if the
            # decoder were lax; this one is strict, so no mutation may verify.
            pytest.fail(f"a mutated command verified: {bytes(mutated)!r}")
    assert codes <= {"malformed", "bad_algorithm", "untrusted_certificate", "bad_signature"}
    assert "bad_signature" in codes
