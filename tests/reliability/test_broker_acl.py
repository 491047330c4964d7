"""The reference broker (config/mosquitto/) confines each gateway to its own subtree.

A real Mosquitto runs the shipped ACL file, copied unchanged, and the shipped configuration
with only its port and paths rewritten (:func:`reference_config`, which fails when a line
it rewrites is gone from the shipped file, so the test follows the reference). Client
certificates come from the test CA: two gateways and the registry, their common names
being their MQTT usernames.

How refusals show: Mosquitto answers a PUBLISH the ACL denies with a "not authorized"
PUBACK (MQTT 5) and drops it. Mosquitto 2.0 grants every SUBSCRIBE and withholds each
message the subscriber may not read, retained ones included; a later version may refuse
the SUBSCRIBE instead (reason 0x87), and the tests accept either. Nothing is proven by
waiting blindly: after a denied message, a message published legitimately is awaited at
the same subscriber. The broker routes a QoS 1 message before it sends the PUBACK, and
delivers to one subscriber in the order it routed, so had the denied message been let
through it would have arrived first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import socket
import sqlite3
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self

import aiomqtt
import paho.mqtt.client as paho
import pytest
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.mqtt import MqttSettings
from gateway.topics import Topics
from simulators.registry import ReferenceRegistry
from tests.broker import (
    ClientCertificate,
    Mosquitto,
    TlsFiles,
    issue_client_certificate,
    make_tls_files,
)
from tests.conftest import ROOT, Schemas
from tests.installation import install, make_registry, pair_all, start_daemon, stop_daemon
from tests.processes import SimProcess
from tests.reliability.conftest import Figures

SHIPPED_CONF: Final = ROOT / "config" / "mosquitto" / "lockgw.conf"
SHIPPED_ACL: Final = ROOT / "config" / "mosquitto" / "lockgw.acl"
NORTH: Final = "gw-north-1"
SOUTH: Final = "gw-south-1"
REGISTRY: Final = "registry"
WAIT: Final = 15.0
"""Longest wait for anything the broker should deliver; generous for loaded machines."""
NOT_AUTHORIZED: Final = 0x87
NO_DELAY: Final = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
DEVICE: Final = "10c4000000000001"

NORTH_TOPICS: Final = Topics("lockgw", NORTH)
SOUTH_TOPICS: Final = Topics("lockgw", SOUTH)

REQUIRED_LINES: Final = (
    "allow_anonymous false",
    "require_certificate true",
    "use_identity_as_username true",
    "persistence true",
    "per_listener_settings false",
)
"""Lines of the shipped configuration the tests rely on, kept as they are."""


# ---------------------------------------------------------------------- configuration


def reference_config(shipped: str, broker: Mosquitto, tls: TlsFiles) -> str:
    """The shipped configuration with its port and paths moved into the test's broker.

    Every rewritten line must appear exactly once, as shipped: a ValueError names any
    that is missing or repeated, so a change to the reference file breaks the test
    instead of slipping past it. The ACL file is expected next to the configuration.
    """
    directory = broker.directory
    rewrites = {
        "pid_file /run/mosquitto/mosquitto.pid": f"pid_file {directory / 'mosquitto.pid'}",
        "log_dest file /var/log/mosquitto/mosquitto.log": f"log_dest file {broker.log_file}",
        "persistence_location /var/lib/mosquitto/": f"persistence_location {directory}/",
        "acl_file /etc/mosquitto/lockgw.acl": f"acl_file {directory / 'lockgw.acl'}",
        "listener 8883": f"listener {broker.port} {broker.host}",
        "cafile /etc/mosquitto/ca_certificates/lockgw-ca.pem": f"cafile {tls.ca_cert}",
        "certfile /etc/mosquitto/certs/broker.pem": f"certfile {tls.server_cert}",
        "keyfile /etc/mosquitto/certs/broker.key": f"keyfile {tls.server_key}",
    }
    lines: list[str] = []
    seen: dict[str, int] = dict.fromkeys(rewrites, 0)
    for line in shipped.splitlines():
        replacement = rewrites.get(line.strip())
        if replacement is None:
            lines.append(line)
        else:
            seen[line.strip()] += 1
            lines.append(replacement)
    wrong = [f"{line!r} ({count} times)" for line, count in seen.items() if count != 1]
    if wrong:
        msg = "the shipped lockgw.conf does not have exactly once: " + ", ".join(wrong)
        raise ValueError(msg)
    if os.geteuid() == 0:
        # As root, Mosquitto would switch to the user "mosquitto", which cannot read the
        # keys in the test's private temporary directory (as in tests/broker.py).
        lines.append("user root")
    return "\n".join(lines) + "\n"


def shipped_value(name: str) -> str:
    """The value of directive ``name`` in the shipped configuration (exactly one)."""
    values = [
        line.split(None, 1)[1]
        for line in SHIPPED_CONF.read_text(encoding="utf-8").splitlines()
        if line.split(None, 1)[:1] == [name]
    ]
    assert len(values) == 1, f"{name}: {values}"
    return values[0].strip()


# ------------------------------------------------------------------------- PKI, broker


@dataclass(frozen=True)
class Pki:
    """The test CA's files and a client certificate per name."""

    files: TlsFiles
    clients: dict[str, ClientCertificate]

    def context(self, name: str | None, *, trust: Path | None = None) -> ssl.SSLContext:
        """A client TLS context with ``name``'s certificate (None: none) trusting ``trust``."""
        context = ssl.create_default_context(cafile=str(trust or self.files.ca_cert))
        if name is not None:
            client = self.clients[name]
            context.load_cert_chain(client.cert, client.key)
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """Certificates of the test CA for both gateways and the registry."""
    files = make_tls_files(tmp_path / "pki", client_name=NORTH)
    clients = {
        NORTH: ClientCertificate(files.client_cert, files.client_key),
        SOUTH: issue_client_certificate(files, SOUTH),
        REGISTRY: issue_client_certificate(files, REGISTRY),
    }
    return Pki(files, clients)


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[Mosquitto]:
    """Mosquitto with the reference configuration and the shipped ACL file, unchanged."""
    shipped = SHIPPED_CONF.read_text(encoding="utf-8")
    mosquitto = Mosquitto(
        tmp_path / "broker",
        tls=pki.files,
        config=lambda b: reference_config(shipped, b, pki.files),
    )
    shutil.copyfile(SHIPPED_ACL, mosquitto.directory / "lockgw.acl")
    mosquitto.start()
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


# --------------------------------------------------------------------------- clients


class Client(aiomqtt.Client):
    """An MQTT 5 client of the tests: records what it receives and every PUBACK's reason.

    Relies on aiomqtt 2.5's ``_on_publish``, as gateway/mqtt.py does (pinned below 3).
    """

    def __init__(
        self,
        broker: Mosquitto,
        name: str,
        context: ssl.SSLContext | None,
        *,
        identifier: str | None = None,
        timeout: float = 5,
        **options: Any,
    ) -> None:
        self.client_id = f"test-{name}" if identifier is None else identifier
        super().__init__(
            broker.host,
            broker.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=context,
            timeout=timeout,
            socket_options=[NO_DELAY],
            **options,
        )
        self.name = name
        self.pubacks: list[ReasonCode] = []
        self.received: list[tuple[str, bytes]] = []
        self._reader: asyncio.Task[None] | None = None

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        self.pubacks.append(reason_code)
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await super().__aexit__(exc_type, exc, tb)

    async def _read(self) -> None:
        async for message in self.messages:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            self.received.append((message.topic.value, payload))

    def close_socket(self) -> None:
        """Drop the connection at once: aiomqtt leaves it open after a refused connect."""
        self._client._sock_close()  # paho has no public "close now"

    async def send(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        """Publish at QoS 1; the reason code of the broker's PUBACK."""
        await self.publish(topic, payload, qos=1, retain=retain)
        return self.pubacks[-1]  # publishes are awaited one by one

    def got(self, payload: bytes) -> list[str]:
        """The topics on which ``payload`` arrived."""
        return [topic for topic, body in self.received if body == payload]

    async def wait_for(self, topic: str, payload: bytes) -> None:
        """Wait until ``payload`` arrived on ``topic``; fail the test after WAIT."""
        await eventually(lambda: topic in self.got(payload), f"{self.name}: {payload!r}")


async def eventually(condition: Callable[[], bool], what: str, within: float = WAIT) -> None:
    """Wait until ``condition()`` holds; fail the test after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def connected(
    broker: Mosquitto, pki: Pki, name: str, *subscriptions: str, **options: Any
) -> AsyncIterator[Client]:
    """``name`` connected with its certificate and subscribed to ``subscriptions``."""
    async with Client(broker, name, pki.context(name), **options) as client:
        for topic in subscriptions:
            (granted,) = await client.subscribe(topic, qos=1)
            assert isinstance(granted, ReasonCode)
            assert not granted.is_failure, (name, topic, granted)
        yield client


def marker(what: str) -> bytes:
    """A payload no other message of the test carries."""
    return f"{what} {uuid.uuid4().hex}".encode()


def gateway_publications(topics: Topics) -> list[tuple[str, bool]]:
    """Every topic a gateway publishes (docs/mqtt-api.md), with whether it is retained."""
    return [
        (topics.status, True),
        (topics.device_state(DEVICE), True),
        (topics.device_events(DEVICE), False),
        (topics.alarms, False),
        (topics.update_progress("rev-2025-0042"), True),
        (topics.registrations, False),
        (topics.audit, False),
        (topics.responses, False),
    ]


# ------------------------------------------------------------------------ the file


def test_the_reference_configuration_is_what_the_tests_run(tmp_path: Path) -> None:
    shipped = SHIPPED_CONF.read_text(encoding="utf-8")
    for line in REQUIRED_LINES:
        assert line in shipped.splitlines(), line
    # No listener but the TLS one.
    listeners = [line for line in shipped.splitlines() if line.startswith("listener")]
    assert listeners == ["listener 8883"]
    # The broker takes nothing a gateway could not be sent (its MQTT 5 Maximum Packet Size).
    gateway = MqttSettings(host="broker.example", gateway_id=NORTH)
    assert int(shipped_value("max_packet_size")) == gateway.max_packet_size

    files = make_tls_files(tmp_path / "pki")
    # Made, not started: the configuration file is written at construction.
    made = Mosquitto(tmp_path / "made", config=lambda b: reference_config(shipped, b, files))
    text = made.config_file.read_text(encoding="utf-8")
    assert f"listener {made.port} {made.host}" in text.splitlines()
    settings = [line for line in text.splitlines() if line and not line.startswith("#")]
    outside = [line for line in settings if any(d in line for d in ("/etc/", "/var/", "/run/"))]
    assert outside == []
    # A line the function rewrites that is no longer shipped fails loudly.
    for gone in ("listener 8883", "acl_file /etc/mosquitto/lockgw.acl"):
        changed = shipped.replace(gone + "\n", "")
        with pytest.raises(ValueError, match="exactly once"):
            Mosquitto(
                tmp_path / "drifted", config=functools.partial(reference_config, changed, tls=files)
            )


# ------------------------------------------------------------------------ allowed


async def test_a_gateway_publishes_in_its_tree_and_receives_its_commands(
    broker: Mosquitto, pki: Pki, figures: Figures
) -> None:
    checks = 0
    async with (
        connected(broker, pki, REGISTRY, "lockgw/#") as registry,
        connected(broker, pki, NORTH, NORTH_TOPICS.commands, NORTH_TOPICS.fleet_commands) as north,
    ):
        for topic, retain in gateway_publications(NORTH_TOPICS):
            payload = marker(topic)
            reason = await north.send(topic, payload, retain=retain)
            assert not reason.is_failure, (topic, reason)
            await registry.wait_for(topic, payload)
            checks += 1
        for topic in (NORTH_TOPICS.commands, NORTH_TOPICS.fleet_commands):
            payload = marker(topic)
            assert not (await registry.send(topic, payload)).is_failure
            await north.wait_for(topic, payload)
            checks += 1
        # A message the registry publishes elsewhere is no business of this gateway.
        assert {topic for topic, _ in north.received} == {
            NORTH_TOPICS.commands,
            NORTH_TOPICS.fleet_commands,
        }
    assert f"u'{NORTH}'" in broker.log_text()  # the certificate's name is the username
    assert f"u'{REGISTRY}'" in broker.log_text()
    figures("broker_acl", allowed_checks=checks)


# ------------------------------------------------------------------------- denied


async def test_a_gateway_cannot_publish_outside_what_it_may(
    broker: Mosquitto, pki: Pki, figures: Figures
) -> None:
    denied = [
        *(topic for topic, _ in gateway_publications(NORTH_TOPICS)),  # another gateway's tree
        NORTH_TOPICS.commands,
        SOUTH_TOPICS.commands,  # its own commands: only the registry commands
        SOUTH_TOPICS.fleet_commands,
        f"{SOUTH_TOPICS.base}/anything-else",
        "lockgw/registry",
        "elsewhere",
    ]
    leaked = 0
    async with (
        connected(broker, pki, REGISTRY, "lockgw/#") as registry,
        connected(broker, pki, NORTH, NORTH_TOPICS.commands, NORTH_TOPICS.fleet_commands) as north,
        connected(broker, pki, SOUTH) as south,
        # A name claimed in CONNECT changes nothing: the certificate's name counts.
        connected(broker, pki, SOUTH, username=NORTH, password="x", identifier="claims") as claims,  # noqa: S106 - a password the broker must ignore
    ):
        witnesses = (registry, north)
        for publisher in (south, claims):
            for topic in denied:
                payload = marker(f"denied {topic}")
                reason = await publisher.send(topic, payload)
                assert reason.value == NOT_AUTHORIZED, (publisher.client_id, topic, reason)
                # Routed and refused before the PUBACK: a control message published now
                # reaches each witness after the refused one would have.
                control = marker("control")
                assert not (await registry.send(NORTH_TOPICS.commands, control)).is_failure
                for witness in witnesses:
                    await witness.wait_for(NORTH_TOPICS.commands, control)
                    leaked += len(witness.got(payload))
    assert leaked == 0
    figures("broker_acl", denied_checks=2 * len(denied), denied_leaked=leaked)


async def test_a_gateway_cannot_read_another_gateways_tree(
    broker: Mosquitto, pki: Pki, figures: Figures
) -> None:
    attempts = [
        f"{NORTH_TOPICS.base}/#",
        NORTH_TOPICS.commands,
        NORTH_TOPICS.status,
        "lockgw/gw/+/commands",
        "lockgw/gw/+/status",
        "lockgw/#",
        "#",
        SOUTH_TOPICS.status,  # its own status: publishing it does not grant reading it
    ]
    async with (
        connected(broker, pki, REGISTRY, "lockgw/#") as registry,
        connected(broker, pki, NORTH, NORTH_TOPICS.commands) as north,
    ):
        # Retained messages the subscriptions below would be sent at once.
        retained = marker("retained")
        assert not (await north.send(NORTH_TOPICS.status, retained, retain=True)).is_failure
        assert not (await registry.send(SOUTH_TOPICS.status, retained, retain=True)).is_failure
        async with Client(broker, SOUTH, pki.context(SOUTH)) as south:
            codes = [await south.subscribe(topic, qos=1) for topic in attempts]
            refused = sum(
                1 for (code,) in codes if isinstance(code, ReasonCode) and code.is_failure
            )
            (own,) = await south.subscribe(SOUTH_TOPICS.commands, qos=1)
            assert isinstance(own, ReasonCode)
            assert not own.is_failure
            # What the gateway publishes and the registry commands it, while watched.
            live = marker("live")
            for topic, retain in gateway_publications(NORTH_TOPICS):
                assert not (await north.send(topic, live, retain=retain)).is_failure
            assert not (await registry.send(NORTH_TOPICS.commands, live)).is_failure
            # Only the registry could publish there; the gateway may not read it back.
            assert not (await registry.send(SOUTH_TOPICS.status, live)).is_failure
            await north.wait_for(NORTH_TOPICS.commands, live)
            # The control: a command to the gateway itself, which "#" matches as well.
            control = marker("control")
            assert not (await registry.send(SOUTH_TOPICS.commands, control)).is_failure
            await south.wait_for(SOUTH_TOPICS.commands, control)
            leaked = [topic for topic, body in south.received if body != control]
            assert leaked == [], leaked
            assert set(south.got(control)) == {SOUTH_TOPICS.commands}
    figures(
        "broker_acl",
        denied_checks=len(attempts),
        denied_leaked=len(leaked),
        subscriptions_refused_at_suback=refused,
    )


async def test_connections_without_the_right_certificates_fail(
    broker: Mosquitto, pki: Pki, figures: Figures
) -> None:
    files = pki.files
    foreign = ssl.create_default_context(cafile=str(files.ca_cert))
    foreign.load_cert_chain(files.other_client_cert, files.other_client_key)
    attempts: dict[str, ssl.SSLContext | None] = {
        "no client certificate (anonymous)": pki.context(None),
        "plain TCP": None,
        "certificate of a foreign CA": foreign,
    }
    for number, (name, context) in enumerate(attempts.items()):
        # The broker drops these connections during the TLS handshake; aiomqtt then
        # waits for a CONNACK that never comes, hence the short timeout.
        client = Client(broker, SOUTH, context, identifier=f"refused-{number}", timeout=1)
        try:
            with pytest.raises(aiomqtt.MqttError) as refused:
                async with client:
                    pytest.fail(f"{name}: connected")
        finally:
            client.close_socket()
        assert not isinstance(refused.value.__context__, ssl.SSLCertVerificationError), name
    # A client that trusts another CA refuses the broker's certificate. Checked with a
    # bare TLS handshake: paho leaves its socket open when it refuses the server.
    wrong_trust = pki.context(SOUTH, trust=files.other_ca_cert)
    with (
        socket.create_connection((broker.host, broker.port), timeout=WAIT) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate"),
    ):
        wrong_trust.wrap_socket(raw, server_hostname=broker.host)
    # A certificate of the CA, but no client id: every client must name itself.
    nameless_client = Client(broker, SOUTH, pki.context(SOUTH), identifier="")
    try:
        with pytest.raises(aiomqtt.MqttCodeError) as nameless:
            async with nameless_client:
                pytest.fail("connected without a client id")
    finally:
        nameless_client.close_socket()
    # Refused in the CONNACK (Mosquitto 2.0.11 says "unspecified error").
    assert isinstance(nameless.value.rc, ReasonCode)
    assert nameless.value.rc.is_failure
    # ...and for the reasons expected, not a slow handshake.
    log = broker.log_text()
    assert "peer did not return a certificate" in log
    assert "wrong version number" in log  # plain MQTT bytes on a TLS port
    assert "certificate verify failed" in log  # the foreign CA's client certificate
    assert "alert unknown ca" in log  # the client that trusts another CA
    assert "New client connected" not in log
    figures("broker_acl", refused_connections=len(attempts) + 2)


# ------------------------------------------------------------------------- the daemon


class TlsRegistry(ReferenceRegistry):
    """The reference registry over TLS with the registry's client certificate.

    ReferenceRegistry takes no TLS settings; this adds them to its (MQTT 3.1.1,
    persistent session) client.
    """

    def __init__(self, *, tls_context: ssl.SSLContext, **options: Any) -> None:
        self.tls_context = tls_context
        super().__init__(**options)

    def _new_client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            protocol=self.protocol,
            clean_session=False,
            tls_context=self.tls_context,
        )


def use_tls(config: Path, client: ClientCertificate, ca_file: Path) -> None:
    """Switch the installation's [mqtt] section from plain TCP to TLS with ``client``."""
    text = config.read_text(encoding="utf-8")
    assert text.count("tls = false\n") == 1
    config.write_text(
        text.replace(
            "tls = false\n",
            f'tls = true\nca_file = "{ca_file}"\ncert_file = "{client.cert}"\n'
            f'key_file = "{client.key}"\n',
        ),
        encoding="utf-8",
    )


def outbox_depth(store: Path) -> int:
    """Rows waiting in the daemon's outbox, read through a connection of the test's own."""
    with contextlib.closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return int(count)


async def test_the_daemon_works_through_the_reference_broker(
    tmp_path: Path, broker: Mosquitto, pki: Pki, schemas: Schemas, figures: Figures
) -> None:
    sim = await SimProcess.start(
        "--locks", "1", "--serve", "tcp-server:127.0.0.1:0", "--advertising-interval", "0.05"
    )
    log = tmp_path / "daemon.log"
    daemon: asyncio.subprocess.Process | None = None
    listener: asyncio.Task[None] | None = None
    try:
        installation = install(tmp_path / "gw", transport=sim.ready["transport"], broker=broker)
        use_tls(installation.config, pki.clients[NORTH], pki.files.ca_cert)
        await pair_all(installation, sim)
        (device,) = [device["device_id"] for device in sim.ready["devices"]]
        registry = make_registry(
            installation,
            broker,
            schemas,
            client_id="lockgw-registry",
            factory=TlsRegistry,
            tls_context=pki.context(REGISTRY),
        )
        listener = asyncio.create_task(registry.run())
        daemon = await start_daemon(installation.config, log)

        def online() -> bool:
            status = registry.gateways.get(NORTH)
            return status is not None and status.state == "online"

        await registry.wait_for(online, WAIT, "the gateway online")
        # What the daemon publishes on its own: the registration of the device paired
        # before it started, and the events it then collects.
        await registry.wait_for(lambda: device in registry.registrations, WAIT, "registration")
        await registry.wait_for(lambda: bool(registry.events.get(device)), WAIT, "events")
        answer = await registry.get_state(NORTH, timeout=WAIT)
        assert answer["status"] == "ok", answer
        assert [state["device_id"] for state in answer["result"]["devices"]] == [device]
        # Nothing the daemon published was refused: its outbox drains.
        store = installation.root / "state" / "lockgw.sqlite3"
        await eventually(lambda: outbox_depth(store) == 0, "an empty outbox")
        assert not registry.invalid, registry.invalid
        assert daemon.returncode is None
        # Killed, the gateway says offline through its last will, which the broker
        # publishes in the gateway's name: the ACL lets that through too.
        daemon.kill()
        await daemon.wait()
        daemon = None
        await registry.wait_for(lambda: not online(), WAIT, "the last will: offline")
    finally:
        if daemon is not None:
            await stop_daemon(daemon)
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        await sim.finish()
    assert f"u'{NORTH}'" in broker.log_text()
    figures("broker_acl", daemon_online=True, daemon_commands_answered=1, daemon_will=True)
