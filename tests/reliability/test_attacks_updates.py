"""Attacks on signed authorisation updates: each refused by the device and by the gateway.

Rows are attacks, columns who refuses them:

* **device**: the simulated lock's own verification (:func:`protocols.envelopes.verify_update`
  inside :class:`simulators.device.VirtualDevice`), reached over a real session (the
  gateway's :class:`DeviceSession` over Bumble's virtual radio);
* **gateway**: the registry command path (:class:`gateway.commands.CommandVerifier` with
  the store's replay memory) for commands that are forged, unsigned, signed under an
  expired or out-of-scope certificate or meant for another gateway; for rollbacks, the
  update service pushing a version the device already has (it must never regress the
  device nor record the older list as the device's).
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Final

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.commands import CommandError, CommandVerifier, sign_command
from gateway.device_session import RequestRefused
from gateway.handlers import CommandHandler
from gateway.store import PropagationState
from protocols.enums import DeviceKind
from protocols.envelopes import (
    AccessEntry,
    AuthorisationUpdate,
    Certificate,
    Role,
    ScheduleWindow,
    Scope,
    SignedUpdate,
    Target,
    UpdateKind,
    encode_update,
    issue_certificate,
    sign_update,
)
from protocols.errors import ErrorCode
from protocols.messages import AuthUpdate, UpdateResult
from simulators.node import Fleet, SimulatedDevice
from tests.conftest import Registry, make_certificate
from tests.gateway import test_core
from tests.gateway.test_core import SITE, Gateway, started
from tests.reliability.conftest import Figures

GATEWAY_ID: Final = "gw-test"
ALWAYS: Final = ScheduleWindow(days=0x7F, start_minute=0, end_minute=1440)
HELD: Final = 3
"""The access version the lock holds when the attacks start."""


# The gateway's own radio, store and services over the virtual radio, as the core tests
# use them (tests/gateway/test_core.py).
fleet = test_core.fleet
gateway = test_core.gateway


def access_update(device_id: bytes, version: int, key_id: int = 4711) -> AuthorisationUpdate:
    now = int(time.time())
    return AuthorisationUpdate(
        kind=UpdateKind.ACCESS_FULL,
        target=Target.device(device_id),
        version=version,
        base_version=0,
        issued_at=now - 300,
        expires_at=now + 3600,
        access=(AccessEntry(key_id, now - 3600, now + 86_400, (ALWAYS,)),),
    )


def gateway_certificate(
    gateway: Gateway, *, sites: frozenset[int], not_after: int | None = None
) -> Certificate:
    """Another certificate for the gateway's own keys (another scope or validity)."""
    now = int(time.time())
    keys = gateway.credentials.keys
    return issue_certificate(
        gateway.authority,
        role=Role.GATEWAY,
        subject="gw-test",
        serial=99,
        signing_key=keys.signing_key.public_key(),
        noise_key=keys.noise_key.public_key(),
        scope=Scope(sites=sites),
        not_before=now - 7200,
        not_after=now + 86_400 if not_after is None else not_after,
    )


def signed(
    gateway: Gateway, update: AuthorisationUpdate, certificate: Certificate | None = None
) -> bytes:
    return encode_update(
        sign_update(
            update,
            key=gateway.credentials.keys.signing_key,
            certificate=certificate or gateway.credentials.certificate,
        )
    )


async def device_answer(gateway: Gateway, lock: SimulatedDevice, update: bytes) -> ErrorCode | None:
    """Push ``update`` over a real session; the device's refusal code (None: applied)."""
    session = await gateway.session(lock)
    try:
        await session.request(AuthUpdate(update=update), UpdateResult)
    except RequestRefused as exc:
        return exc.code
    finally:
        await session.close()
    return None


async def gateway_push(
    gateway: Gateway, lock: SimulatedDevice, update_id: str, update: AuthorisationUpdate
) -> tuple[PropagationState, ErrorCode | None]:
    """The update service signs, stores and pushes ``update``: the outcome it records."""
    await gateway.updates.submit(update_id, update)
    record = await gateway.worker.run(gateway.store.get_device, lock.device_id)
    assert record is not None
    session = await gateway.session(lock)
    try:
        outcomes = await gateway.updates.push(session, record)
    finally:
        await session.close()
    [outcome] = [o for o in outcomes if o.update_id == update_id]
    return outcome.state, outcome.error_code


def verifier(registry: Registry, gateway: Gateway) -> CommandVerifier:
    async def remember(jti: str, expires_at: float, now: float) -> bool:
        return await gateway.worker.run(gateway.store.remember_command, jti, expires_at, now)

    return CommandVerifier(registry.authority.public_key(), registry.gateway_id, remember)


def set_access_args(version: int, target: dict[str, Any]) -> dict[str, Any]:
    now = int(time.time())
    return {
        "update_id": f"attack-{version}-{time.monotonic_ns()}",
        "target": target,
        "mode": "full",
        "version": version,
        "base_version": 0,
        "entries": [
            {
                "key_id": 4711,
                "valid_from": now - 3600,
                "valid_until": now + 86_400,
                "windows": [{"days": ["mon", "sun"], "start": "00:00", "end": "24:00"}],
            }
        ],
        "removed": [],
        "expires_at": now + 3600,
    }


async def command_code(verify: CommandVerifier, payload: bytes) -> tuple[str, str]:
    try:
        await verify.verify(payload, fleet=False)
    except CommandError as exc:
        return exc.code, exc.message
    return "accepted", ""


def unsecured(claims: dict[str, Any]) -> bytes:
    """An unsigned JWS (RFC 7515 "unsecured", ``alg: none``) of ``claims``."""

    def segment(value: dict[str, Any]) -> bytes:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=")

    return segment({"alg": "none", "typ": "lockgw-command+jws"}) + b"." + segment(claims) + b"."


def sqlite_copy(source: Path, target: Path) -> None:
    """Copy one SQLite database onto another with the online backup API."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()


async def test_update_attack_matrix(
    gateway: Gateway, fleet: Fleet, tmp_path: Path, figures: Figures
) -> None:
    [lock, other] = await started(fleet, DeviceKind.DOOR_LOCK, 2)
    await gateway.pair(lock)
    device_id = lock.device_id
    registry = Registry(gateway_id=GATEWAY_ID)
    verify = verifier(registry, gateway)
    now = int(time.time())

    # The lock holds access list version HELD, delivered by the gateway.
    state, code = await gateway_push(gateway, lock, "access-held", access_update(device_id, HELD))
    assert (state, code) == (PropagationState.APPLIED, None)
    assert lock.device.access.access_version == HELD
    device_target = {"kind": "device", "device_id": device_id.hex()}
    site_target = {"kind": "site", "site_id": SITE}

    cells: dict[str, dict[str, str]] = {}

    # -- forged, unsigned, expired, out of scope, wrong target ------------------------------
    fresh = access_update(device_id, HELD + 1)
    forged = bytearray(signed(gateway, fresh))
    forged[-1] ^= 0x01  # the last byte of the gateway's signature
    stranger = Ed25519PrivateKey.generate()
    expired_cert = make_certificate(registry.authority, registry.key, not_after=now - 60)
    narrow_cert = make_certificate(
        registry.authority, registry.key, scope=Scope(sites=frozenset({SITE + 1}))
    )
    rows: list[tuple[str, bytes, ErrorCode, bytes, str]] = [
        (
            "forged_signature",
            bytes(forged),
            ErrorCode.UPDATE_BAD_SIGNATURE,
            sign_command(
                stranger,
                registry.certificate,
                registry.claims("set_access", set_access_args(HELD + 1, device_target)),
            ),
            "bad_signature",
        ),
        (
            "unsigned",
            encode_update(SignedUpdate(update=fresh, certificate=None, signature=b"")),
            ErrorCode.UPDATE_UNSIGNED,
            unsecured(registry.claims("set_access", set_access_args(HELD + 1, device_target))),
            "bad_algorithm",
        ),
        (
            "expired_certificate",
            signed(
                gateway,
                fresh,
                gateway_certificate(gateway, sites=frozenset({SITE}), not_after=now - 60),
            ),
            ErrorCode.CERT_EXPIRED,
            registry.sign(
                registry.claims("set_access", set_access_args(HELD + 1, device_target)),
                certificate=expired_cert,
            ),
            "untrusted_certificate",
        ),
        (
            "certificate_out_of_scope",
            signed(gateway, fresh, gateway_certificate(gateway, sites=frozenset({SITE + 1}))),
            ErrorCode.UPDATE_OUT_OF_SCOPE,
            registry.sign(
                registry.claims("set_access", set_access_args(HELD + 1, site_target)),
                certificate=narrow_cert,
            ),
            "out_of_scope",
        ),
        (
            "wrong_target_device",
            signed(gateway, access_update(other.device_id, HELD + 1)),
            ErrorCode.UPDATE_WRONG_TARGET,
            registry.sign(
                registry.claims(
                    "set_access", set_access_args(HELD + 1, device_target), gateway="gw-other"
                )
            ),
            "wrong_gateway",
        ),
    ]
    for name, update, device_code, command, gateway_code in rows:
        got_device = await device_answer(gateway, lock, update)
        got_gateway, message = await command_code(verify, command)
        assert got_device is device_code, name
        assert got_gateway == gateway_code, (name, message)
        if name == "expired_certificate":
            assert message.startswith("CERT_EXPIRED"), message
        cells[name] = {"device": device_code.name, "gateway": gateway_code}
    # An unsigned command in other shapes: a bare JSON object, an empty signature.
    bare = json.dumps(registry.claims("set_access", set_access_args(HELD + 1, device_target)))
    assert await command_code(verify, bare.encode()) == (
        "malformed",
        "not a JWS compact serialization",
    )
    header, payload, _ = registry.command(
        "set_access", set_access_args(HELD + 1, device_target)
    ).split(b".")
    assert (await command_code(verify, header + b"." + payload + b"."))[0] == "bad_signature"
    attempts_extra = 2
    assert lock.device.access.access_version == HELD, "no attack applied"

    # -- rollbacks: older and equal ---------------------------------------------------------
    async def rollback(name: str, lock_now: SimulatedDevice) -> None:
        for label, version in (("older", HELD - 1), ("equal", HELD)):
            got = await device_answer(
                gateway, lock_now, signed(gateway, access_update(device_id, version))
            )
            assert got is ErrorCode.UPDATE_ROLLBACK, (name, label)
            before = gateway.reader.get_device(device_id)
            pushed = await gateway_push(
                gateway, lock_now, f"{name}-{label}", access_update(device_id, version)
            )
            after = gateway.reader.get_device(device_id)
            assert before is not None
            assert after is not None
            # The gateway never records the older list as the device's.
            assert after.access_version == before.access_version, (name, label)
            assert lock_now.device.access.access_version == HELD, (name, label)
            cells[f"{label}_version{name}"] = {
                "device": got.name,
                "gateway": f"{pushed[0].value}:{pushed[1].name if pushed[1] else None}",
            }

    await rollback("", lock)

    # -- after a device reboot: the version persists in the device's flash ------------------
    state_dir = tmp_path / "devices"
    fleet.save(state_dir)
    await lock.stop()
    rebooted_fleet = Fleet(fleet.link, advertising_interval=0.02)
    try:
        [rebooted] = [d for d in rebooted_fleet.load(state_dir) if d.device_id == device_id]
        await rebooted_fleet.start([rebooted])
        assert rebooted.device.access.access_version == HELD
        await rollback("_after_reboot", rebooted)

        # -- after a gateway restore from backup ---------------------------------------------
        live = tmp_path / "lockgw.sqlite3"
        backup = tmp_path / "backup.sqlite3"
        await gateway.updates.submit("restore-old", access_update(device_id, HELD + 1, 1001))
        sqlite_copy(live, backup)  # taken while HELD + 1 is still pending
        state, code = await gateway_push(
            gateway, rebooted, "restore-new", access_update(device_id, HELD + 2, 2002)
        )
        assert (state, code) == (PropagationState.APPLIED, None)
        # restore-old was pushed in the same session, before it (push order is by version).
        assert rebooted.device.access.access_version == HELD + 2
        sqlite_copy(backup, live)
        restored = gateway.reader.get_device(device_id)
        assert restored is not None
        assert restored.access_version == HELD, "the restored store is the old one"
        pending = gateway.reader.pending_updates_for(device_id)
        assert [u.update_id for u in pending] == ["restore-old"]
        record = gateway.reader.get_device(device_id)
        assert record is not None
        session = await gateway.session(rebooted)
        try:
            [outcome] = await gateway.updates.push(session, record)
        finally:
            await session.close()
        assert outcome.update_id == "restore-old"
        assert (outcome.state, outcome.error_code) == (
            PropagationState.FAILED,
            ErrorCode.UPDATE_ROLLBACK,
        )
        assert rebooted.device.access.access_version == HELD + 2
        assert [e.key_id for e in rebooted.device.access.entries.values()] == [2002]
        cells["older_version_after_restore"] = {
            "device": ErrorCode.UPDATE_ROLLBACK.name,
            "gateway": f"{outcome.state.value}:{ErrorCode.UPDATE_ROLLBACK.name}",
        }
        got = await device_answer(
            gateway, rebooted, signed(gateway, access_update(device_id, HELD + 2, 1001))
        )
        assert got is ErrorCode.UPDATE_ROLLBACK
        pushed = await gateway_push(
            gateway, rebooted, "restore-equal", access_update(device_id, HELD + 2, 1001)
        )
        assert pushed == (PropagationState.FAILED, ErrorCode.UPDATE_ROLLBACK)
        assert [e.key_id for e in rebooted.device.access.entries.values()] == [2002]
        cells["equal_version_after_restore"] = {
            "device": got.name,
            "gateway": f"{pushed[0].value}:{pushed[1].name}",
        }
    finally:
        await rebooted_fleet.stop()

    device_codes = {row: cell["device"] for row, cell in cells.items()}
    # Distinct attacks, distinct codes: only the rollback rows share one.
    firsts = [device_codes[name] for name, *_ in rows] + [ErrorCode.UPDATE_ROLLBACK.name]
    assert len(set(firsts)) == len(firsts)
    gateway_codes = [cells[name]["gateway"] for name, *_ in rows]
    assert len(set(gateway_codes)) == len(gateway_codes)
    applied = lock.device.access.access_version != HELD
    figures(
        "update_attacks",
        attacks=len(cells),
        refused=sum(1 for cell in cells.values() if cell["device"]),
        accepted=int(applied),
        extra_command_shapes=attempts_extra,
        codes=cells,
    )


async def test_an_older_version_is_not_reported_applied(gateway: Gateway, fleet: Fleet) -> None:
    [lock] = await started(fleet)
    await gateway.pair(lock)
    assert (await gateway_push(gateway, lock, "v3", access_update(lock.device_id, HELD)))[
        0
    ] is PropagationState.APPLIED
    state, code = await gateway_push(gateway, lock, "v2", access_update(lock.device_id, HELD - 1))
    assert lock.device.access.access_version == HELD  # the device refused it
    assert (state, code) == (PropagationState.FAILED, ErrorCode.UPDATE_ROLLBACK)


async def test_registry_out_of_scope_for_a_device_target_is_refused(
    gateway: Gateway, fleet: Fleet
) -> None:
    [lock] = await started(fleet)
    await gateway.pair(lock)  # at SITE
    registry = Registry(gateway_id=GATEWAY_ID)
    registry.certificate = make_certificate(
        registry.authority, registry.key, scope=Scope(sites=frozenset({SITE + 1}))
    )
    handler = CommandHandler(
        store=gateway.store,
        worker=gateway.worker,
        scheduler=gateway.scheduler(),
        updates=gateway.updates,
        pipeline=gateway.pipeline,
        topics=gateway.topics,
    )
    command = await verifier(registry, gateway).verify(
        registry.command(
            "set_access",
            set_access_args(HELD, {"kind": "device", "device_id": lock.device_id.hex()}),
        ),
        fleet=False,
    )
    with pytest.raises(CommandError) as refused:
        await handler(command)
    assert refused.value.code == "out_of_scope"
    assert gateway.reader.pending_updates_for(lock.device_id) == []
