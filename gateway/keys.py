"""Key and certificate files of a gateway and of the organisation's authority.

Private keys are PEM (PKCS#8) files written with mode 0600 and never printed. Public keys
and certificates are accepted in the forms operators meet: PEM, hex text, or raw bytes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocols.envelopes import Certificate, decode_certificate
from protocols.errors import ProtocolError

PRIVATE_FILE_MODE = 0o600


class KeyFileError(Exception):
    """A key or certificate file that is missing, unreadable or not what it should be."""


@dataclass(frozen=True)
class GatewayKeys:
    """The gateway's two private keys: Ed25519 to sign updates, X25519 for Noise."""

    signing_key: Ed25519PrivateKey = field(repr=False)
    noise_key: X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls) -> GatewayKeys:
        return cls(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())


@dataclass(frozen=True)
class GatewayCredentials:
    """Everything the gateway proves itself with, loaded once at start-up."""

    keys: GatewayKeys
    certificate: Certificate
    certificate_bytes: bytes
    authority_key: Ed25519PublicKey = field(repr=False)


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(descriptor, PRIVATE_FILE_MODE)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_gateway_keys(path: Path, keys: GatewayKeys) -> None:
    pem = serialization.PrivateFormat.PKCS8
    encoding = serialization.Encoding.PEM
    none = serialization.NoEncryption()
    write_private(
        path,
        keys.signing_key.private_bytes(encoding, pem, none)
        + keys.noise_key.private_bytes(encoding, pem, none),
    )


def load_gateway_keys(path: Path) -> GatewayKeys:
    """Load the Ed25519 and X25519 private keys from one PEM file."""
    blocks = _pem_blocks(_read(path), "PRIVATE KEY")
    signing: Ed25519PrivateKey | None = None
    noise: X25519PrivateKey | None = None
    for block in blocks:
        try:
            key = serialization.load_pem_private_key(block, password=None)
        except (ValueError, TypeError) as exc:
            msg = f"{path}: a private key block does not load ({type(exc).__name__})"
            raise KeyFileError(msg) from exc
        if isinstance(key, Ed25519PrivateKey):
            signing = key
        elif isinstance(key, X25519PrivateKey):
            noise = key
    if signing is None or noise is None:
        msg = f"{path}: needs one Ed25519 and one X25519 private key in PEM"
        raise KeyFileError(msg)
    _refuse_if_readable_by_others(path)
    return GatewayKeys(signing, noise)


def save_signing_key(path: Path, key: Ed25519PrivateKey) -> None:
    """The authority's (or registry's) private key, PEM, mode 0600."""
    write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as exc:
        msg = f"{path}: not a PEM private key"
        raise KeyFileError(msg) from exc
    if not isinstance(key, Ed25519PrivateKey):
        msg = f"{path}: not an Ed25519 private key"
        raise KeyFileError(msg)
    return key


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key as PEM, as 64 hex digits, or as 32 raw bytes."""
    data = _read(path)
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            msg = f"{path}: not a PEM public key"
            raise KeyFileError(msg) from exc
        if not isinstance(key, Ed25519PublicKey):
            msg = f"{path}: not an Ed25519 public key"
            raise KeyFileError(msg)
        return key
    raw = _hex_or_raw(data, 32, path)
    return Ed25519PublicKey.from_public_bytes(raw)


def load_certificate(path: Path) -> tuple[bytes, Certificate]:
    """A certificate in its binary encoding or as hex text."""
    data = _read(path)
    raw = _hex_or_raw(data, None, path)
    try:
        return raw, decode_certificate(raw)
    except ProtocolError as exc:
        msg = f"{path}: not a lockgw certificate ({exc.message})"
        raise KeyFileError(msg) from exc


def load_credentials(
    key_file: Path, certificate_file: Path, authority_file: Path
) -> GatewayCredentials:
    """Load and cross-check the gateway's keys, certificate and trust anchor."""
    keys = load_gateway_keys(key_file)
    certificate_bytes, certificate = load_certificate(certificate_file)
    authority = load_public_key(authority_file)
    signing_public = keys.signing_key.public_key().public_bytes_raw()
    noise_public = keys.noise_key.public_key().public_bytes_raw()
    if certificate.signing_key != signing_public or certificate.noise_key != noise_public:
        msg = f"{certificate_file}: the certificate is for other keys than {key_file}"
        raise KeyFileError(msg)
    return GatewayCredentials(keys, certificate, certificate_bytes, authority)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        msg = f"{path}: {exc.strerror or exc}"
        raise KeyFileError(msg) from exc


def _pem_blocks(data: bytes, label: str) -> list[bytes]:
    begin, end = f"-----BEGIN {label}-----".encode(), f"-----END {label}-----".encode()
    blocks: list[bytes] = []
    position = 0
    while (start := data.find(begin, position)) >= 0:
        stop = data.find(end, start)
        if stop < 0:
            break
        position = stop + len(end)
        blocks.append(data[start:position] + b"\n")
    return blocks


def _hex_or_raw(data: bytes, size: int | None, path: Path) -> bytes:
    text = data.strip()
    try:
        decoded = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        decoded = data
    if size is not None and len(decoded) != size:
        msg = f"{path}: expected {size} bytes (raw or hex), got {len(decoded)}"
        raise KeyFileError(msg)
    return decoded


def _refuse_if_readable_by_others(path: Path) -> None:
    if path.stat().st_mode & 0o077:
        msg = f"{path}: private keys must not be readable by others (chmod 600)"
        raise KeyFileError(msg)
