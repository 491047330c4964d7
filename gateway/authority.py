"""The organisation's authority: signing requests and certificate issuance.

A gateway creates its keys and a signing request; the request proves possession of the
signing key (it is signed with it) and names the Noise key it vouches for. The authority
checks the proof and issues a compact certificate with a scope and a validity window.
Registries get certificates the same way, without a Noise key.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from gateway.keys import GatewayKeys
from protocols.envelopes import Certificate, Role, Scope, issue_certificate

REQUEST_FORMAT: Final = "lockgw-signing-request/v1"
_PROOF_DOMAIN: Final = b"lockgw/signing-request/v1"
MAX_VALIDITY_DAYS: Final = 825


class SigningRequestError(ValueError):
    """A signing request that is malformed or whose proof of possession fails."""


@dataclass(frozen=True)
class SigningRequest:
    """Who asks for a certificate, for which keys, proven by a signature of the signing key."""

    role: Role
    subject: str
    signing_key: bytes
    noise_key: bytes | None

    def to_bytes(self, signing_key: Ed25519PrivateKey) -> bytes:
        """The request as JSON, signed by ``signing_key`` (which must be the named key)."""
        if signing_key.public_key().public_bytes_raw() != self.signing_key:
            msg = "the request must be signed by the key it names"
            raise SigningRequestError(msg)
        body = self._body()
        proof = signing_key.sign(_PROOF_DOMAIN + _canonical(body))
        return json.dumps({**body, "proof": _b64(proof)}, indent=2).encode() + b"\n"

    def _body(self) -> dict[str, Any]:
        return {
            "format": REQUEST_FORMAT,
            "role": self.role.name.lower(),
            "subject": self.subject,
            "signing_key": _b64(self.signing_key),
            "noise_key": _b64(self.noise_key) if self.noise_key else None,
        }

    @classmethod
    def from_bytes(cls, data: bytes) -> SigningRequest:
        """Parse and check a request, proof of possession included."""
        try:
            document = json.loads(data)
            if document.get("format") != REQUEST_FORMAT:
                msg = f"not a {REQUEST_FORMAT} document"
                raise SigningRequestError(msg)
            role = Role[str(document["role"]).upper()]
            request = cls(
                role=role,
                subject=str(document["subject"]),
                signing_key=_unb64(document["signing_key"]),
                noise_key=_unb64(document["noise_key"]) if document["noise_key"] else None,
            )
            proof = _unb64(document["proof"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, SigningRequestError):
                raise
            msg = f"malformed signing request ({type(exc).__name__}: {exc})"
            raise SigningRequestError(msg) from exc
        try:
            key = Ed25519PublicKey.from_public_bytes(request.signing_key)
            key.verify(proof, _PROOF_DOMAIN + _canonical(request._body()))
        except (ValueError, InvalidSignature) as exc:
            msg = "the signing request's proof of possession does not verify"
            raise SigningRequestError(msg) from exc
        if (role is Role.GATEWAY) != (request.noise_key is not None):
            msg = "a gateway request names a Noise key; other roles do not"
            raise SigningRequestError(msg)
        return request


def gateway_signing_request(keys: GatewayKeys, gateway_id: str) -> bytes:
    request = SigningRequest(
        role=Role.GATEWAY,
        subject=gateway_id,
        signing_key=keys.signing_key.public_key().public_bytes_raw(),
        noise_key=keys.noise_key.public_key().public_bytes_raw(),
    )
    return request.to_bytes(keys.signing_key)


def registry_signing_request(key: Ed25519PrivateKey, subject: str) -> bytes:
    request = SigningRequest(
        role=Role.REGISTRY,
        subject=subject,
        signing_key=key.public_key().public_bytes_raw(),
        noise_key=None,
    )
    return request.to_bytes(key)


def issue(
    authority_key: Ed25519PrivateKey,
    request: SigningRequest,
    *,
    scope: Scope,
    not_before: int,
    validity_days: int,
    serial: int | None = None,
) -> Certificate:
    """Issue the certificate a checked request asks for."""
    if not 1 <= validity_days <= MAX_VALIDITY_DAYS:
        msg = f"validity must be 1..{MAX_VALIDITY_DAYS} days"
        raise SigningRequestError(msg)
    if request.role is Role.AUTHORITY:
        msg = "an authority is not issued by a signing request"
        raise SigningRequestError(msg)
    return issue_certificate(
        authority_key,
        role=request.role,
        subject=request.subject,
        serial=serial if serial is not None else secrets.randbits(32),
        signing_key=Ed25519PublicKey.from_public_bytes(request.signing_key),
        noise_key=X25519PublicKey.from_public_bytes(request.noise_key)
        if request.noise_key
        else None,
        scope=scope,
        not_before=not_before,
        not_after=not_before + validity_days * 86400,
    )


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object) -> bytes:
    if not isinstance(text, str):
        msg = "expected a base64 string"
        raise TypeError(msg)
    return base64.b64decode(text, validate=True)
