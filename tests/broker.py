"""A real Mosquitto broker for the MQTT tests, on a free port of 127.0.0.1.

:class:`Mosquitto` writes a configuration file into a test's temporary directory, starts
``mosquitto -c FILE`` as a subprocess, waits until the port accepts connections, and can
be stopped and started again on the *same* port, so that a test can cut the gateway off
and watch it come back. Persistence is off: a restart loses every retained message and
session, as a broker crash without persistence would.

:func:`make_tls_files` generates, with ``cryptography``, a test CA, a server certificate
for 127.0.0.1, a client certificate for the gateway, and a second CA with a client
certificate of its own (which the broker must refuse); :func:`issue_client_certificate`
adds client certificates of the test CA for more names (more gateways, the registry).
A test that needs a whole configuration of its own (the reference deployment of
config/mosquitto/) passes it as ``config``.

Mosquitto is not optional: when the binary is missing the tests fail (never skip) and
say that ``scripts/test`` installs it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from simulators.broker import (
    HOST,
    STOP_TIMEOUT,
    Broker,
    BrokerError,
    find_mosquitto,
    free_port,
)

# The process handling (binary, free port, start, stop) is the demo's; the tests add TLS,
# ACLs, persistence and faults on top.
__all__ = [
    "HOST",
    "BrokerError",
    "ClientCertificate",
    "Mosquitto",
    "TlsFiles",
    "find_mosquitto",
    "free_port",
    "issue_client_certificate",
    "make_tls_files",
]


# -------------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test PKI. ``other_*`` belong to a CA the broker does not trust.

    ``ca_key`` is the test CA's private key, for :func:`issue_client_certificate`.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    other_client_cert: Path
    other_client_key: Path
    ca_key: Path | None = None


@dataclass(frozen=True)
class ClientCertificate:
    """A client certificate and its private key, PEM."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lockgw tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(subject) if issuer is None else issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:  # a CA
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        ).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
                ),
                critical=False,
            )
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls_files(directory: Path, client_name: str = "gw-north-1") -> TlsFiles:
    """Generate the test PKI into ``directory`` (P-256 keys: quick to make and use)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key_file = directory / "ca.key"
    files = TlsFiles(
        ca_cert=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca_cert=directory / "other-ca.pem",
        other_client_cert=directory / "other-client.pem",
        other_client_key=directory / "other-client.key",
        ca_key=ca_key_file,
    )
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("lockgw test CA", ca_key, None, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    other_ca_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _issue("someone else's CA", other_ca_key, None, other_ca_key)
    other_client_key = ec.generate_private_key(ec.SECP256R1())

    _write_cert(files.ca_cert, ca)
    _write_key(ca_key_file, ca_key)
    _write_cert(files.server_cert, _issue("localhost", server_key, ca, ca_key, server=True))
    _write_key(files.server_key, server_key)
    _write_cert(files.client_cert, _issue(client_name, client_key, ca, ca_key))
    _write_key(files.client_key, client_key)
    _write_cert(files.other_ca_cert, other_ca)
    _write_cert(
        files.other_client_cert, _issue(client_name, other_client_key, other_ca, other_ca_key)
    )
    _write_key(files.other_client_key, other_client_key)
    return files


def issue_client_certificate(files: TlsFiles, common_name: str) -> ClientCertificate:
    """A client certificate of the test CA for ``common_name``, next to the CA's files.

    With ``use_identity_as_username`` the common name is the client's MQTT username.
    """
    if files.ca_key is None:
        msg = "these TLS files carry no CA key to issue with"
        raise ValueError(msg)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        msg = f"unexpected CA key type {type(ca_key).__name__}"
        raise TypeError(msg)
    key = ec.generate_private_key(ec.SECP256R1())
    directory = files.ca_cert.parent
    issued = ClientCertificate(
        cert=directory / f"client-{common_name}.pem", key=directory / f"client-{common_name}.key"
    )
    _write_cert(issued.cert, _issue(common_name, key, ca, ca_key))
    _write_key(issued.key, key)
    return issued


# ----------------------------------------------------------------------------- broker


class Mosquitto(Broker):
    """One Mosquitto process with one listener on ``127.0.0.1:port``.

    ``tls`` makes the listener TLS-only and require a client certificate from the test
    CA, whose common name becomes the MQTT username. ``acl`` is the text of an ACL file
    (Mosquitto syntax), for tests of what the broker refuses. ``persistence`` keeps
    sessions, subscriptions and queued QoS 1 messages across a stop and start, as a
    production broker does. ``config``, when given, makes the whole configuration file
    instead (from the broker, whose port, directory and log file it may use); ``tls``
    then only describes the PKI it uses.
    """

    def __init__(
        self,
        directory: Path,
        *,
        tls: TlsFiles | None = None,
        acl: str | None = None,
        persistence: bool = False,
        config: Callable[[Mosquitto], str] | None = None,
    ) -> None:
        self.tls = tls
        self.acl = acl
        self.persistence = persistence
        self.config = config
        super().__init__(directory)

    def _config_lines(self) -> list[str]:
        if self.config is not None:
            return self.config(self).splitlines()
        lines = [
            "per_listener_settings false",
            *(
                [
                    "persistence true",
                    f"persistence_location {self.directory}/",
                    "autosave_interval 0",  # saved on shutdown only
                ]
                if self.persistence
                else ["persistence false"]
            ),
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            # The default, stated because the command-flood test's memory bound rests on
            # it: at most this many QoS 1 messages in flight to an MQTT 3.1.1 client.
            "max_inflight_messages 20",
            # Latency, not throughput: Nagle's algorithm would hold back small messages.
            "set_tcp_nodelay true",
        ]
        if os.geteuid() == 0:
            # As root, Mosquitto would switch to the user "mosquitto", which cannot read
            # the keys in the test's private temporary directory.
            lines.append("user root")
        if self.acl is not None:
            acl_file = self.directory / "acl"
            acl_file.write_text(self.acl, encoding="utf-8")
            lines.append(f"acl_file {acl_file}")
        lines.append(f"listener {self.port} {self.host}")
        if self.tls is None:
            lines.append("allow_anonymous true")
        else:
            lines += [
                f"cafile {self.tls.ca_cert}",
                f"certfile {self.tls.server_cert}",
                f"keyfile {self.tls.server_key}",
                "require_certificate true",
                "use_identity_as_username true",
                "allow_anonymous false",
            ]
        return lines

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing is answered."""
        if self._process is None or not self.running:
            msg = "the broker is not running"
            raise BrokerError(msg)
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused broker run again (SIGCONT)."""
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Kill the broker at once (SIGKILL, also when paused): a crash, nothing flushed."""
        process, self._process = self._process, None
        if process is None:
            return
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
        if process.stderr is not None:
            process.stderr.close()

    def __repr__(self) -> str:
        """Where the broker listens, for test output."""
        kind = "tls" if self.tls else "plain"
        return f"<Mosquitto {kind} {self.host}:{self.port} running={self.running}>"
