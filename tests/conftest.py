"""Fixtures shared across the test suite: brokers, the registry's keys, the JSON Schemas.

* ``mosquitto`` / ``mosquitto_tls``: a real Mosquitto on a free port of 127.0.0.1
  (:mod:`tests.broker`), stopped after the test. The TLS one requires a client
  certificate of the test CA (``tls_files``). ``broker``: the same with persistence.
* ``registry``: an authority and a registry key with its certificate, and helpers that
  sign commands the way the reference registry does (:func:`gateway.commands.sign_command`).
* ``schemas``: the JSON Schemas of docs/schemas, to check every payload a test observes.
* ``gateway_store``: a store on a temporary file with its worker thread.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import jsonschema  # type: ignore[import-untyped]  # jsonschema ships no type information
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.commands import sign_command
from gateway.store import Store
from gateway.worker import BlockingWorker
from protocols.envelopes import Role, Scope, encode_certificate, issue_certificate
from tests.broker import Mosquitto, TlsFiles, make_tls_files

ROOT: Final = Path(__file__).resolve().parent.parent
SCHEMA_DIR: Final = ROOT / "docs" / "schemas"
GATEWAY_ID: Final = "gw-north-1"


# ---------------------------------------------------------------------------- brokers


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A plain-TCP Mosquitto allowing anonymous clients, running for the test."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A plain-TCP Mosquitto with persistence: a restart keeps sessions and queued
    messages, as a deployed broker does (the end-to-end tests stop and start it)."""
    mosquitto = Mosquitto(tmp_path / "broker", persistence=True)
    mosquitto.start()
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


@pytest.fixture
def tls_files(tmp_path: Path) -> TlsFiles:
    """A test CA with server and client certificates, and a foreign CA."""
    return make_tls_files(tmp_path / "pki", client_name=GATEWAY_ID)


@pytest.fixture
def mosquitto_tls(tmp_path: Path, tls_files: TlsFiles) -> Iterator[Mosquitto]:
    """A TLS-only Mosquitto that requires a client certificate of the test CA."""
    broker = Mosquitto(tmp_path / "mosquitto-tls", tls=tls_files)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# --------------------------------------------------------------------------- registry


def make_certificate(
    issuer: Ed25519PrivateKey,
    key: Ed25519PrivateKey,
    *,
    role: Role = Role.REGISTRY,
    not_before: int | None = None,
    not_after: int | None = None,
    scope: Scope | None = None,
    subject: str = "registry",
) -> bytes:
    """An encoded certificate for ``key`` issued by ``issuer`` (valid around now)."""
    now = int(time.time())
    return encode_certificate(
        issue_certificate(
            issuer,
            role=role,
            subject=subject,
            serial=1,
            signing_key=key.public_key(),
            noise_key=None,
            scope=scope or Scope(organisation_wide=True),
            not_before=now - 3600 if not_before is None else not_before,
            not_after=now + 86_400 if not_after is None else not_after,
        )
    )


@dataclass
class Registry:
    """The organisation's authority and its registry, as the tests need them."""

    authority: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    gateway_id: str = GATEWAY_ID
    certificate: bytes = b""

    def __post_init__(self) -> None:
        if not self.certificate:
            self.certificate = make_certificate(self.authority, self.key)

    def claims(self, op: str = "get_state", args: Any = None, **overrides: Any) -> dict[str, Any]:
        """Valid claims for this gateway, issued now; ``overrides`` replace any field."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "id": f"c-{uuid.uuid4().hex[:12]}",
            "op": op,
            "gateway": self.gateway_id,
            "iat": now,
            "exp": now + 60,
            "jti": uuid.uuid4().hex,
            "args": {"device_id": None} if args is None else args,
        }
        claims.update(overrides)
        return claims

    def sign(self, claims: dict[str, Any], *, certificate: bytes | None = None) -> bytes:
        """Sign ``claims`` with the registry's key (and its certificate, unless given)."""
        return sign_command(self.key, certificate or self.certificate, claims)

    def command(self, op: str = "get_state", args: Any = None, **overrides: Any) -> bytes:
        """A valid signed command (see :meth:`claims`)."""
        return self.sign(self.claims(op, args, **overrides))


@pytest.fixture
def registry() -> Registry:
    """A fresh authority and registry."""
    return Registry()


# ---------------------------------------------------------------------------- schemas


class Schemas:
    """The JSON Schemas of docs/schemas, by file stem (``status``, ``response``, ...)."""

    def __init__(self, directory: Path = SCHEMA_DIR) -> None:
        self.validators: dict[str, Any] = {}
        for path in sorted(directory.glob("*.json")):
            schema = json.loads(path.read_text(encoding="utf-8"))
            jsonschema.Draft202012Validator.check_schema(schema)
            self.validators[path.stem] = jsonschema.Draft202012Validator(
                schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
            )

    def validate(self, name: str, payload: bytes | dict[str, Any]) -> dict[str, Any]:
        """The decoded payload; fails the test if it does not match schema ``name``."""
        body = json.loads(payload) if isinstance(payload, bytes) else payload
        errors = sorted(self.validators[name].iter_errors(body), key=lambda e: list(e.path))
        assert not errors, f"{name}: " + "; ".join(
            f"{list(error.path)}: {error.message}" for error in errors
        )
        assert isinstance(body, dict)
        return body

    def is_valid(self, name: str, body: object) -> bool:
        """Whether ``body`` matches schema ``name``."""
        return bool(self.validators[name].is_valid(body))


@pytest.fixture(scope="session")
def schemas() -> Schemas:
    """The JSON Schemas, loaded and checked once."""
    return Schemas()


# ------------------------------------------------------------------------------ store


@dataclass
class GatewayStore:
    """A store and the worker thread its calls run on."""

    store: Store
    worker: BlockingWorker
    path: Path

    async def remember(self, jti: str, expires_at: float, now: float) -> bool:
        """:meth:`Store.remember_command` through the worker, as the daemon wires it."""
        return await self.worker.run(self.store.remember_command, jti, expires_at, now)


@pytest.fixture
def gateway_store(tmp_path: Path) -> Iterator[GatewayStore]:
    """A store on a temporary file, closed (with its worker) after the test."""
    path = tmp_path / "lockgw.db"
    store = Store.open(path)
    worker = BlockingWorker("store")
    try:
        yield GatewayStore(store, worker, path)
    finally:
        worker.close()
        store.close()
