"""Key files, signing requests and certificate issuance."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.authority import (
    SigningRequest,
    SigningRequestError,
    gateway_signing_request,
    issue,
    registry_signing_request,
)
from gateway.keys import (
    GatewayKeys,
    KeyFileError,
    load_certificate,
    load_credentials,
    load_gateway_keys,
    load_public_key,
    load_signing_key,
    public_key_pem,
    save_gateway_keys,
    save_signing_key,
)
from protocols.envelopes import Role, Scope, encode_certificate, verify_certificate


def test_gateway_keys_round_trip_with_private_mode(tmp_path: Path) -> None:
    keys = GatewayKeys.generate()
    path = tmp_path / "gateway.key"
    save_gateway_keys(path, keys)
    assert path.stat().st_mode & 0o777 == 0o600
    loaded = load_gateway_keys(path)
    assert loaded.signing_key.private_bytes_raw() == keys.signing_key.private_bytes_raw()
    assert loaded.noise_key.private_bytes_raw() == keys.noise_key.private_bytes_raw()
    assert keys.signing_key.private_bytes_raw().hex() not in repr(loaded)
    assert "signing_key" not in repr(loaded)  # the fields are hidden from repr altogether


def test_private_keys_readable_by_others_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.key"
    save_gateway_keys(path, GatewayKeys.generate())
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_gateway_keys(path)


@pytest.mark.parametrize(
    "content", [b"", b"not pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_bad_key_files_are_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "gateway.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(KeyFileError):
        load_gateway_keys(path)


def test_missing_file_is_a_key_file_error(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="No such file"):
        load_gateway_keys(tmp_path / "absent.key")


@pytest.mark.parametrize("form", ["pem", "hex", "raw"])
def test_public_key_in_every_form(tmp_path: Path, form: str) -> None:
    key = Ed25519PrivateKey.generate().public_key()
    raw = key.public_bytes_raw()
    data = {"pem": public_key_pem(key), "hex": raw.hex().encode() + b"\n", "raw": raw}[form]
    path = tmp_path / "authority.pub"
    path.write_bytes(data)
    assert load_public_key(path).public_bytes_raw() == raw


def test_signing_key_round_trip(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    save_signing_key(tmp_path / "authority.key", key)
    assert (
        load_signing_key(tmp_path / "authority.key").private_bytes_raw() == key.private_bytes_raw()
    )


def test_gateway_request_is_issued_and_loads_as_credentials(tmp_path: Path) -> None:
    authority = Ed25519PrivateKey.generate()
    keys = GatewayKeys.generate()
    request = SigningRequest.from_bytes(gateway_signing_request(keys, "gw-north-1"))
    now = int(time.time())
    certificate = issue(
        authority, request, scope=Scope(sites=frozenset({4})), not_before=now - 60, validity_days=30
    )
    verify_certificate(certificate, authority.public_key(), role=Role.GATEWAY, now=now)
    assert certificate.subject == "gw-north-1"
    save_gateway_keys(tmp_path / "gateway.key", keys)
    (tmp_path / "gateway.cert").write_bytes(encode_certificate(certificate))
    (tmp_path / "authority.pub").write_bytes(public_key_pem(authority.public_key()))
    credentials = load_credentials(
        tmp_path / "gateway.key", tmp_path / "gateway.cert", tmp_path / "authority.pub"
    )
    assert credentials.certificate == certificate
    (tmp_path / "gateway.cert").write_text(encode_certificate(certificate).hex())
    assert load_certificate(tmp_path / "gateway.cert")[1] == certificate


def test_certificate_for_other_keys_is_refused(tmp_path: Path) -> None:
    authority = Ed25519PrivateKey.generate()
    request = SigningRequest.from_bytes(gateway_signing_request(GatewayKeys.generate(), "gw"))
    certificate = issue(authority, request, scope=Scope(), not_before=0, validity_days=1)
    save_gateway_keys(tmp_path / "gateway.key", GatewayKeys.generate())
    (tmp_path / "gateway.cert").write_bytes(encode_certificate(certificate))
    (tmp_path / "authority.pub").write_bytes(authority.public_key().public_bytes_raw())
    with pytest.raises(KeyFileError, match="other keys"):
        load_credentials(
            tmp_path / "gateway.key", tmp_path / "gateway.cert", tmp_path / "authority.pub"
        )


def test_tampered_request_fails_proof_of_possession() -> None:
    data = json.loads(gateway_signing_request(GatewayKeys.generate(), "gw-1"))
    data["subject"] = "gw-2"
    with pytest.raises(SigningRequestError, match="proof of possession"):
        SigningRequest.from_bytes(json.dumps(data).encode())


def test_swapped_noise_key_fails_proof_of_possession() -> None:
    data = json.loads(gateway_signing_request(GatewayKeys.generate(), "gw-1"))
    other = json.loads(gateway_signing_request(GatewayKeys.generate(), "gw-1"))
    data["noise_key"] = other["noise_key"]
    with pytest.raises(SigningRequestError):
        SigningRequest.from_bytes(json.dumps(data).encode())


@pytest.mark.parametrize("data", [b"", b"{}", b"[1]", b'{"format": "lockgw-signing-request/v1"}'])
def test_malformed_requests_are_refused(data: bytes) -> None:
    with pytest.raises(SigningRequestError):
        SigningRequest.from_bytes(data)


def test_registry_request_has_no_noise_key() -> None:
    key = Ed25519PrivateKey.generate()
    request = SigningRequest.from_bytes(registry_signing_request(key, "registry"))
    assert request.role is Role.REGISTRY
    certificate = issue(
        Ed25519PrivateKey.generate(),
        request,
        scope=Scope(organisation_wide=True),
        not_before=0,
        validity_days=1,
    )
    assert certificate.noise_key is None


def test_validity_is_bounded() -> None:
    request = SigningRequest.from_bytes(gateway_signing_request(GatewayKeys.generate(), "gw"))
    with pytest.raises(SigningRequestError):
        issue(Ed25519PrivateKey.generate(), request, scope=Scope(), not_before=0, validity_days=0)
