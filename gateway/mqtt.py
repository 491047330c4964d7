"""The MQTT bridge: the outbox to the broker, signed commands from it (docs/mqtt-api.md).

:class:`MqttBridge` keeps one connection to the broker (aiomqtt over paho-mqtt, MQTT 5 or
3.1.1, TLS with a client certificate when configured) and, while connected, does three
things at once:

* **drains the outbox**: peeks up to ``publish_batch`` rows in id order, publishes them
  at their QoS (1 for everything lockgw sends), pipelined, and deletes exactly the rows
  the broker acknowledged (PUBACK). A row whose PUBACK never came stays and is sent again
  after the reconnect, so delivery is at least once and consumers de-duplicate on
  ``message_id``;
* **answers commands** from ``{prefix}/gw/{gw}/commands`` and ``{prefix}/fleet/commands``:
  :class:`~gateway.commands.CommandVerifier`, then the :class:`CommandHandler`, then one
  response on ``{prefix}/gw/{gw}/responses``. Every failure is a typed error response;
  nothing a sender does (garbage, floods, a crashing handler) stops the bridge;
* **re-publishes retained state** (device state, update progress) after every reconnect,
  because a broker restarted without persistence has forgotten it.

Connection loss ends the session; the bridge reconnects with exponential backoff and full
jitter between ``reconnect_min`` and ``reconnect_max``. Cancelling :meth:`MqttBridge.run`
publishes the retained ``offline`` status and disconnects cleanly; if the gateway dies
instead, the broker publishes the same status as the last will set at connect.

Design choices (see also docs/mqtt-api.md):

* One fresh aiomqtt client per connection: a client is reusable but keeps paho's queues
  of the old connection; a new one starts clean, and incoming message ids can never be
  acknowledged on the wrong connection.
* Incoming commands are acknowledged to the broker (PUBACK) only after they have been
  answered (paho's manual acknowledgement), so the broker's in-flight window (MQTT 5:
  our Receive Maximum; 3.1.1: Mosquitto's ``max_inflight_messages``) holds a flood back
  at the broker. Brokers do not all keep to it (Mosquitto 2.0.11 does not once
  acknowledgements flow), so the gateway bounds itself too: ``max_concurrent_commands``
  running, ``max_queued_commands`` waiting, and beyond that a command is answered
  ``busy`` without being read. Memory stays bounded whatever the sender does.
* Responses to verified commands go through the outbox, so the outcome of an executed
  command survives a connection loss or a restart. Refusals of unverified input are
  published directly (best effort): an unauthenticated sender must not be able to make
  the gateway write to its disk.
* :meth:`MqttBridge.publish_retained` publishes directly when connected and remembers
  the latest payload per topic for the re-publication after a reconnect; retained rows
  from the outbox are remembered the same way once published. Use one path per topic.
* aiomqtt 2.5 ignores the reason code of a PUBACK, so an MQTT 5 broker's "not
  authorised" would count as delivered. :class:`_Client` checks it: a refused message
  stays in the outbox and is retried with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import socket
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import aiomqtt
import paho.mqtt.client as paho
import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway import __version__
from gateway.cancellation import reraise_lost_cancellation
from gateway.commands import MAX_COMMAND_SIZE, Command, CommandError, CommandVerifier, ErrorCode
from gateway.store import OutboxMessage, OutboxRow, Store, StoreError
from gateway.topics import Topics
from gateway.worker import BlockingWorker

__all__ = [
    "OUTBOX_POLL_INTERVAL",
    "CommandHandler",
    "MqttBridge",
    "MqttCounters",
    "MqttSettings",
    "MqttTls",
    "PublishRefused",
    "backoff_delay",
    "response_payload",
    "status_payload",
]

log = structlog.get_logger(__name__)

OUTBOX_POLL_INTERVAL: Final = 1.0
"""Seconds between looks at the outbox when nobody called :meth:`MqttBridge.notify_outbox`."""

OFFLINE_TIMEOUT: Final = 5.0
"""Longest wait for the PUBACK of the offline status at shutdown."""

_MAX_TOPIC_BYTES: Final = 65535

_MESSAGE_ID_PLACEHOLDER: Final = re.compile(rb'"message_id"\s*:\s*null')
"""Where a payload may hold the ``"message_id": null`` that the bridge fills in."""

MAX_RESPONSE_SIZE: Final = 240 * 1024
"""Largest response payload sent; a larger answer becomes ``response_too_large``. Brokers
limit packets (the reference deployment to 256 KiB, docs/broker.md), and a response
above the limit would end the connection, and again after every reconnect."""

PENDING_PUBLISH_MARGIN: Final = 50
"""Publishes in flight beyond ``publish_batch`` before aiomqtt warns about them (the
retained state, responses and refusals that may overlap a drain)."""


LOCKGW_VERSION: Final = __version__


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True, kw_only=True)
class MqttTls:
    """TLS to the broker. ``ca_file`` None trusts the system's CAs; the client
    certificate (``cert_file`` with ``key_file``) is how the broker knows the gateway."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            msg = "a client certificate needs both cert_file and key_file"
            raise ValueError(msg)


@dataclass(frozen=True, kw_only=True)
class MqttSettings:
    """How the bridge reaches the broker and behaves; the daemon maps its TOML to this.

    ``client_id`` defaults to ``lockgw-{gateway_id}``. ``protocol`` is ``"5"`` or
    ``"3.1.1"``. Reconnection waits a random time between ``reconnect_min`` and an
    exponentially growing bound capped at ``reconnect_max`` (seconds). The outbox is
    drained ``publish_batch`` rows at a time; a publish whose PUBACK has not come within
    ``ack_timeout`` seconds ends the connection. At most ``max_concurrent_commands``
    commands run at once, each for at most ``command_timeout`` seconds.
    ``receive_maximum`` (MQTT 5) caps the commands the broker sends before we
    acknowledge; ``max_queued_commands`` caps those waiting in the gateway whatever the
    broker does (beyond it a command is answered ``busy`` unread), and
    ``max_packet_size`` (MQTT 5) the size of any message the broker may send us.
    ``retained_topics_max`` bounds the retained payloads remembered for re-publication.
    """

    host: str
    port: int = 1883
    gateway_id: str
    client_id: str | None = None
    prefix: str = "lockgw"
    tls: MqttTls | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    keepalive: int = 30
    protocol: Literal["5", "3.1.1"] = "5"
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    publish_batch: int = 50
    ack_timeout: float = 10.0
    max_concurrent_commands: int = 4
    command_timeout: float = 120.0
    receive_maximum: int = 16
    max_queued_commands: int = 100
    max_packet_size: int = 256 * 1024
    retained_topics_max: int = 10_000

    def __post_init__(self) -> None:
        _check_level(self.gateway_id, "gateway_id")
        if self.gateway_id == "*":
            msg = "gateway_id '*' is reserved for fleet commands"
            raise ValueError(msg)
        for level in self.prefix.split("/"):
            _check_level(level, "prefix")
        if self.prefix.startswith("$"):
            msg = "prefix must not start with '$' (reserved for broker topics)"
            raise ValueError(msg)
        if not 0 < self.port < 65536:
            msg = f"port out of range: {self.port}"
            raise ValueError(msg)
        if self.protocol not in ("5", "3.1.1"):
            msg = f"protocol must be '5' or '3.1.1', got {self.protocol!r}"
            raise ValueError(msg)
        if not 0 < self.reconnect_min <= self.reconnect_max:
            msg = "need 0 < reconnect_min <= reconnect_max"
            raise ValueError(msg)
        for name in (
            "keepalive",
            "publish_batch",
            "max_concurrent_commands",
            "max_queued_commands",
        ):
            if getattr(self, name) < 1:
                msg = f"{name} must be at least 1"
                raise ValueError(msg)
        if not 1 <= self.receive_maximum <= 65535:
            msg = "receive_maximum must be 1..65535"
            raise ValueError(msg)
        if self.max_packet_size < 2 * MAX_COMMAND_SIZE:
            # Room for a too-large command to arrive and be refused as such.
            msg = f"max_packet_size must be at least {2 * MAX_COMMAND_SIZE}"
            raise ValueError(msg)
        if self.ack_timeout <= 0 or self.command_timeout <= 0:
            msg = "timeouts must be positive"
            raise ValueError(msg)

    @property
    def effective_client_id(self) -> str:
        """The MQTT client id used."""
        return self.client_id or f"lockgw-{self.gateway_id}"


def _check_level(level: str, what: str) -> None:
    # A topic level that is empty or holds a wildcard or separator would make the topic
    # tree ambiguous, or let one gateway subscribe to another's commands.
    if not level or any(ch in level for ch in "/+#\x00") or len(level) > 64:
        msg = f"{what}: {level!r} is not a valid topic level"
        raise ValueError(msg)


def backoff_delay(attempt: int, minimum: float, maximum: float, rng: random.Random) -> float:
    """Seconds to wait before reconnection attempt ``attempt`` (1 for the first).

    Full jitter: uniform between ``minimum`` and ``minimum * 2**attempt`` capped at
    ``maximum``, so a fleet of gateways that lost the broker together does not return
    in lockstep.
    """
    bound = min(maximum, minimum * 2 ** min(attempt, 32))
    return rng.uniform(minimum, max(minimum, bound))


# ----------------------------------------------------------------------------- payloads


def status_payload(state: Literal["online", "offline"], gateway: str, since: float) -> bytes:
    """The retained gateway status (docs/schemas/status.json)."""
    body = {"state": state, "gateway": gateway, "since": since, "version": LOCKGW_VERSION}
    return json.dumps(body, separators=(",", ":")).encode()


def response_payload(
    command_id: str | None,
    gateway: str,
    op: str | None,
    *,
    result: dict[str, Any] | None = None,
    error: CommandError | None = None,
) -> bytes:
    """A command response (docs/schemas/response.json); an error when ``error`` is given.

    Raises TypeError or ValueError if ``result`` is not JSON-serializable.
    """
    body: dict[str, Any] = {
        "id": command_id,
        "gateway": gateway,
        "op": op,
        "status": "ok" if error is None else "error",
        "result": result if error is None else None,
        "error": None if error is None else {"code": error.code, "message": error.message},
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


# ------------------------------------------------------------------------------- client


class PublishRefused(aiomqtt.MqttError):
    """The broker answered a publish with a failure reason code (MQTT 5 PUBACK)."""

    def __init__(self, reason: ReasonCode) -> None:
        super().__init__(f"publish refused by the broker: {reason}")
        self.reason = reason


class _Client(aiomqtt.Client):
    """aiomqtt's client, plus PUBACK reason codes and manual acknowledgement.

    Relies on aiomqtt 2.5's internals (``_client``, ``_pending_call``,
    ``_pending_publishes``, ``_wait_for``, ``_on_publish``); the version is pinned below 3.
    """

    def __init__(
        self,
        *args: Any,
        on_overflow: Callable[[str], None] | None = None,
        pending_calls_threshold: int = PENDING_PUBLISH_MARGIN,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._refused: dict[int, ReasonCode] = {}
        self._on_overflow = on_overflow
        # Acknowledge incoming QoS 1 messages only when they have been handled (ack()).
        self._client.manual_ack_set(on=True)
        # aiomqtt warns once more than 10 publishes await their PUBACK; the outbox drain
        # pipelines ``publish_batch`` of them by design, which is no cause for a warning
        # (and the warning, one per publish, would flood the journal).
        self.pending_calls_threshold = pending_calls_threshold

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        # aiomqtt drops a message that finds its queue full and never tells; with manual
        # acknowledgement the broker would then wait for it for ever and shrink our
        # window. Acknowledge it now and let the bridge answer it.
        if self._queue.full():
            if message.qos > 0:
                self._client.ack(message.mid, message.qos)
            if self._on_overflow is not None:
                self._on_overflow(message.topic)
            return
        super()._on_message(client, userdata, message)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        # MQTT 3.1.1 PUBACKs carry no reason; paho reports them as success.
        if reason_code.is_failure:
            self._refused[mid] = reason_code
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish_acked(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> None:
        """Publish and wait for the broker's acknowledgement (QoS 1: PUBACK).

        Raises :class:`PublishRefused` for a negative PUBACK, ``MqttError`` when the
        message could not be sent or the acknowledgement did not come within the
        client's timeout.
        """
        info = self._client.publish(topic, payload, qos, retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        self._refused.pop(info.mid, None)  # left over from an earlier use of this mid
        if not info.is_published():
            confirmation = asyncio.Event()
            with self._pending_call(info.mid, confirmation, self._pending_publishes):
                await self._wait_for(confirmation.wait(), timeout=None)
        reason = self._refused.pop(info.mid, None)
        if reason is not None:
            raise PublishRefused(reason)

    def publish_nowait(self, topic: str, payload: bytes) -> None:
        """Hand a QoS 0 message to paho without waiting (best effort, nothing kept)."""
        self._client.publish(topic, payload, 0, False)  # noqa: FBT003 - paho's positional retain

    def ack(self, message: aiomqtt.Message) -> None:
        """Acknowledge an incoming message to the broker (QoS 0 needs nothing)."""
        if message.qos > 0:
            self._client.ack(message.mid, message.qos)

    def close_socket(self) -> None:
        """Drop the connection without DISCONNECT; harmless when already closed.

        Used after a session ended abnormally, so that a broker that stopped answering
        cannot leave the socket open.
        """
        self._client._sock_close()  # noqa: SLF001 - paho has no public "close now"


def _ssl_context(tls: MqttTls) -> ssl.SSLContext:
    # create_default_context checks the server's certificate and host name; given a
    # cafile it trusts only that CA, not the system's.
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=None if tls.ca_file is None else str(tls.ca_file)
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


# ------------------------------------------------------------------------------- bridge


class CommandHandler(Protocol):
    """Executes a verified command; returns the JSON result, or raises CommandError."""

    async def __call__(self, command: Command) -> dict[str, Any]:
        """Run ``command``; a typed failure is a :class:`CommandError`."""
        ...


@dataclass
class MqttCounters:
    """Counters for the metrics endpoint; they only ever grow.

    ``published`` counts publishes handed to the client, ``acked`` those the broker
    acknowledged, ``refused`` those it refused; ``unpublishable`` outbox rows the client
    itself could not send (a producer's bug; kept, skipped). ``command_backlog_max`` is
    the most commands ever waiting or running at once.
    """

    published: int = 0
    acked: int = 0
    refused: int = 0
    unpublishable: int = 0
    connect_failures: int = 0
    reconnects: int = 0
    commands_ok: int = 0
    commands_refused: Counter[str] = field(default_factory=Counter)
    command_backlog_max: int = 0


class MqttBridge:
    """The gateway's MQTT side; see the module documentation. Start with :meth:`run`."""

    def __init__(
        self,
        settings: MqttSettings,
        store_worker: BlockingWorker,
        store: Store,
        verifier: CommandVerifier,
        handler: CommandHandler,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.topics = Topics(settings.prefix, settings.gateway_id)
        self.counters = MqttCounters()
        self._worker = store_worker
        self._store = store
        self._verifier = verifier
        self._handler = handler
        self._clock = clock
        self._random = random.Random()  # noqa: S311 - jitter, not a secret
        self._wake = asyncio.Event()
        self._client: _Client | None = None
        self._retained: OrderedDict[str, bytes] = OrderedDict()
        self._slots = asyncio.Semaphore(settings.max_concurrent_commands)
        self._in_progress = 0
        self._tasks: asyncio.TaskGroup | None = None
        self._ssl: ssl.SSLContext | None = None
        self._running = False
        self._ever_connected = False
        self._session_connected = False
        self._busy_logged = 0.0
        self._poisoned: set[int] = set()

    # --------------------------------------------------------------------- public API

    @property
    def connected(self) -> bool:
        """Whether a session is up (connected, subscribed, online status published)."""
        return self._client is not None

    def notify_outbox(self) -> None:
        """Wake the outbox drain now (call after enqueueing); from the event loop only."""
        self._wake.set()

    async def publish_retained(self, topic: str, payload: bytes) -> bool:
        """Publish ``payload`` retained at QoS 1 on ``topic`` (a topic of this gateway).

        The payload is remembered and published again after every reconnect, so the
        latest state survives a broker restart. Returns whether the broker acknowledged
        it now; when not connected it is only remembered. An empty payload deletes the
        retained message and forgets the topic.
        """
        if (
            not topic.startswith(self.topics.base + "/")
            or any(ch in topic for ch in "+#\x00")
            or len(topic.encode()) > _MAX_TOPIC_BYTES
        ):
            msg = f"not a topic of this gateway: {topic!r}"
            raise ValueError(msg)
        self._remember_retained(topic, payload)
        client = self._client
        if client is None:
            return False
        try:
            await self._publish(client, topic, payload, qos=1, retain=True)
        except aiomqtt.MqttError as exc:
            log.info("retained publish deferred to the reconnect", topic=topic, error=str(exc))
            return False
        return True

    async def run(self) -> None:
        """Connect, serve, reconnect on loss, until cancelled (then go offline cleanly)."""
        if self._running:
            msg = "the bridge is already running"
            raise RuntimeError(msg)
        self._running = True
        try:
            if self.settings.tls is not None and self._ssl is None:
                self._ssl = await asyncio.to_thread(_ssl_context, self.settings.tls)
            # Command handlers live here, not in a session: a connection blip must not
            # cancel a revocation half pushed to devices. Their responses wait in the
            # outbox for the next connection.
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                await self._connection_loop()
        finally:
            self._tasks = None
            self._running = False

    # --------------------------------------------------------------------- connection

    async def _connection_loop(self) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            self._session_connected = False
            error = "session ended"
            try:
                await self._session()
            except aiomqtt.MqttError as exc:
                error = str(exc) or type(exc).__name__
            was_connected = self._session_connected
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A cancellation of the bridge that arrived while the session's TaskGroup
                # was already ending with the connection error: Python 3.11's TaskGroup
                # reports the error and swallows the cancellation. It must still win.
                raise asyncio.CancelledError
            if was_connected and time.monotonic() - started >= self.settings.reconnect_max:
                failures = 0  # a long, healthy session: start the backoff afresh
            if not was_connected:
                self.counters.connect_failures += 1
            failures += 1
            delay = backoff_delay(
                failures, self.settings.reconnect_min, self.settings.reconnect_max, self._random
            )
            log.warning(
                "mqtt connection lost" if was_connected else "mqtt connection failed",
                host=self.settings.host,
                port=self.settings.port,
                error=error,
                retry_in=round(delay, 3),
            )
            await asyncio.sleep(delay)

    def _make_client(self) -> _Client:
        settings = self.settings
        v5 = settings.protocol == "5"
        will = aiomqtt.Will(
            self.topics.status,
            status_payload("offline", settings.gateway_id, self._clock()),
            qos=1,
            retain=True,
        )
        properties: Properties | None = None
        options: dict[str, Any] = {"clean_session": True}
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho's Properties is unannotated
            properties.ReceiveMaximum = settings.receive_maximum
            properties.MaximumPacketSize = settings.max_packet_size
            options = {"clean_start": True}
        return _Client(
            settings.host,
            settings.port,
            username=settings.username,
            password=settings.password,
            identifier=settings.effective_client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=will,
            keepalive=settings.keepalive,
            timeout=settings.ack_timeout,
            tls_context=self._ssl,
            properties=properties,
            max_queued_incoming_messages=settings.max_queued_commands,
            # Small messages answered by small messages: without this, Nagle's algorithm
            # and delayed ACKs add some 40 ms to every command and PUBACK.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            on_overflow=self._overflow,
            pending_calls_threshold=settings.publish_batch + PENDING_PUBLISH_MARGIN,
            **options,
        )

    async def _session(self) -> None:
        """One connection, until it fails (MqttError) or the task is cancelled."""
        client = self._make_client()
        try:
            async with client:
                self._session_connected = True
                try:
                    await self._serve(client)
                except asyncio.CancelledError:
                    self._client = None
                    await self._say_offline(client)
                    raise
        finally:
            self._client = None
            client.close_socket()

    async def _serve(self, client: _Client) -> None:
        await self._subscribe(client)
        # Online only once commands can be received.
        online = status_payload("online", self.settings.gateway_id, self._clock())
        await self._publish(client, self.topics.status, online, qos=1, retain=True)
        reraise_lost_cancellation()  # a stop just as the broker acknowledged
        self._client = client
        if self._ever_connected:
            self.counters.reconnects += 1
        self._ever_connected = True
        log.info(
            "mqtt connected",
            host=self.settings.host,
            port=self.settings.port,
            protocol=self.settings.protocol,
        )
        # The tasks report a lost connection through ``lost`` instead of raising: on
        # Python 3.11 a TaskGroup whose child fails while the group is exiting leaves
        # the parent task marked as cancelling, which would be indistinguishable from
        # a real cancellation of the bridge (fixed in later Pythons).
        lost: asyncio.Future[aiomqtt.MqttError] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.TaskGroup() as session:
                for work in (self._republish_retained, self._drain, self._listen):
                    session.create_task(_reporting(work(client), lost))
                raise await lost
        except BaseExceptionGroup as group:
            # The connection error ends the session; anything else is a bug and
            # propagates as it is.
            errors, other = group.split(aiomqtt.MqttError)
            if other is not None or errors is None:
                raise
            first = errors.exceptions[0]
            raise aiomqtt.MqttError(str(first) or type(first).__name__) from first

    async def _subscribe(self, client: _Client) -> None:
        granted = await client.subscribe(
            [(self.topics.commands, 1), (self.topics.fleet_commands, 1)]
        )
        for code in granted:
            refused = code.is_failure if isinstance(code, ReasonCode) else code >= 0x80
            if refused:
                msg = f"the broker refused the command subscriptions: {code}"
                raise aiomqtt.MqttError(msg)

    async def _say_offline(self, client: _Client) -> None:
        offline = status_payload("offline", self.settings.gateway_id, self._clock())
        try:
            async with asyncio.timeout(min(OFFLINE_TIMEOUT, self.settings.ack_timeout)):
                await self._publish(client, self.topics.status, offline, qos=1, retain=True)
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("offline status not acknowledged", error=str(exc))
        else:
            log.info("mqtt offline")

    async def _publish(
        self, client: _Client, topic: str, payload: bytes, *, qos: int, retain: bool
    ) -> None:
        self.counters.published += 1
        try:
            await client.publish_acked(topic, payload, qos=qos, retain=retain)
        except PublishRefused:
            self.counters.refused += 1
            raise
        self.counters.acked += 1

    # ------------------------------------------------------------------ retained state

    def _remember_retained(self, topic: str, payload: bytes) -> None:
        if not payload:
            self._retained.pop(topic, None)
            return
        self._retained[topic] = payload
        self._retained.move_to_end(topic)
        while len(self._retained) > self.settings.retained_topics_max:
            self._retained.popitem(last=False)

    async def _republish_retained(self, client: _Client) -> None:
        topics = list(self._retained)
        batch = self.settings.publish_batch
        for start in range(0, len(topics), batch):
            chunk = [
                (topic, payload)
                for topic in topics[start : start + batch]
                # The latest payload at the time of sending: a newer one may have come
                # since the list was taken.
                if (payload := self._retained.get(topic))
            ]
            results = await asyncio.gather(
                *(self._publish(client, t, p, qos=1, retain=True) for t, p in chunk),
                return_exceptions=True,
            )
            for result in results:
                # A refused topic is the broker's policy, retried at the next reconnect;
                # anything else means the connection is gone.
                if isinstance(result, BaseException) and not isinstance(result, PublishRefused):
                    raise result

    # -------------------------------------------------------------------------- outbox

    async def _drain(self, client: _Client) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                batch = self.settings.publish_batch
                rows = await self._worker.run(self._store.outbox_peek, batch + len(self._poisoned))
                rows = [row for row in rows if row.id not in self._poisoned][:batch]
                if not rows:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(OUTBOX_POLL_INTERVAL):
                            await self._wake.wait()
                    continue
                refused = await self._publish_rows(client, rows)
            except StoreError as exc:
                # The disk, not the broker: keep the connection, retry after a pause.
                log.error("outbox unavailable", error=str(exc))
                refused = True
            if refused:
                failures += 1
                await asyncio.sleep(
                    backoff_delay(
                        failures,
                        self.settings.reconnect_min,
                        self.settings.reconnect_max,
                        self._random,
                    )
                )
            else:
                failures = 0

    async def _publish_rows(self, client: _Client, rows: Sequence[OutboxRow]) -> bool:
        """Publish ``rows`` pipelined; delete the acknowledged ones. True if any refused.

        Raises MqttError (after recording what was acknowledged) when the connection
        failed, which ends the session.
        """
        # Tasks start in creation order and each hands its message to paho before its
        # first await, so the broker receives the rows in id order.
        tasks = [asyncio.create_task(self._publish_row(client, row)) for row in rows]
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            acked = _acknowledged(rows, tasks)
            if acked:
                # Record what the broker has, even while shutting down, so that it is not
                # sent again; shielded, so a second cancellation cannot interrupt it.
                with contextlib.suppress(StoreError):
                    await asyncio.shield(self._mark_done(acked))
            raise
        acked = _acknowledged(rows, tasks)
        if acked:
            await self._mark_done(acked)
        refused = False
        for row, task in zip(rows, tasks, strict=True):
            error = task.exception()
            if isinstance(error, PublishRefused):
                # The broker's policy (e.g. an ACL), not a lost connection: the row stays,
                # and the drain retries after a pause.
                log.error("broker refused an outbox message", outbox_id=row.id, reason=str(error))
                refused = True
            elif isinstance(error, ValueError | TypeError):
                # paho refused the message itself (a topic with wildcards, ...): a bug of
                # the producer. The row is kept for inspection but no longer sent, so
                # that it neither blocks the outbox nor stops the bridge.
                log.error(
                    "outbox message cannot be published; skipped until restart",
                    outbox_id=row.id,
                    kind=row.kind,
                    error=str(error),
                )
                self._poisoned.add(row.id)
                self.counters.unpublishable += 1
            elif error is not None:
                raise error
        return refused

    async def _publish_row(self, client: _Client, row: OutboxRow) -> None:
        payload = self._with_message_id(row)
        if row.retain:
            self._remember_retained(row.topic, payload)
        await self._publish(client, row.topic, payload, qos=row.qos, retain=row.retain)

    def _with_message_id(self, row: OutboxRow) -> bytes:
        """The payload, with ``"message_id": null`` replaced by ``"<gw>:<outbox id>"``.

        The outbox id is assigned by the same INSERT that stores the payload, so a
        producer cannot write it; it leaves the placeholder and the bridge fills it in.
        """
        if _MESSAGE_ID_PLACEHOLDER.search(row.payload) is None:
            # Most rows (every events batch) carry their own id: no need to parse them.
            return row.payload
        try:
            body = json.loads(row.payload)
        except ValueError:
            return row.payload
        if not isinstance(body, dict) or "message_id" not in body or body["message_id"] is not None:
            return row.payload
        body["message_id"] = f"{self.settings.gateway_id}:{row.id}"
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    async def _mark_done(self, ids: list[int]) -> None:
        await self._worker.run(self._store.outbox_done, ids, self._clock())

    # ------------------------------------------------------------------------ commands

    async def _listen(self, client: _Client) -> None:
        tasks = self._tasks
        assert tasks is not None  # set by run() before any session
        messages = client.messages
        while True:
            # A free slot first, then the next message: while every slot is busy,
            # messages wait in the client's bounded queue, and beyond it are answered
            # busy (_Client._on_message), so the gateway never holds more than both.
            await self._slots.acquire()
            try:
                message = await anext(messages)
            except BaseException:
                self._slots.release()
                raise
            self._in_progress += 1
            backlog = self._in_progress + len(client.messages)
            self.counters.command_backlog_max = max(self.counters.command_backlog_max, backlog)
            tasks.create_task(self._handle(client, message))

    async def _handle(self, client: _Client, message: aiomqtt.Message) -> None:
        try:
            await self._process(client, message)
        except Exception:  # logged; one command must never stop the bridge
            log.exception("command processing failed")
        finally:
            self._in_progress -= 1
            self._slots.release()
            # Message ids belong to their connection: after a reconnect the broker has
            # forgotten this one (clean session), and acking it could hit another.
            if client is self._client:
                client.ack(message)

    async def _process(self, client: _Client, message: aiomqtt.Message) -> None:
        payload = message.payload if isinstance(message.payload, bytes) else b""
        fleet = message.topic.value == self.topics.fleet_commands
        try:
            command = await self._verifier.verify(payload, fleet=fleet)
        except CommandError as exc:
            await self._refuse(client, exc, fleet=fleet)
            return
        except Exception:  # e.g. the replay store failing: answer and log
            log.exception("command verification failed unexpectedly")
            await self._refuse(
                client, CommandError(ErrorCode.INTERNAL, "internal error"), fleet=fleet
            )
            return
        await self._respond(await self._execute(command))

    def _overflow(self, topic: str) -> None:
        """A command found the queue full: answer ``busy`` without reading it."""
        self.counters.commands_refused[ErrorCode.BUSY] += 1
        now = time.monotonic()
        if now - self._busy_logged >= 1.0:  # a flood must not flood the log too
            self._busy_logged = now
            log.warning("command queue full; answering busy", topic=topic)
        client = self._client
        if client is None:
            return
        error = CommandError(ErrorCode.BUSY, "too many commands waiting; not processed")
        body = response_payload(None, self.settings.gateway_id, None, error=error)
        self.counters.published += 1
        client.publish_nowait(self.topics.responses, body)

    async def _refuse(self, client: _Client, error: CommandError, *, fleet: bool) -> None:
        self.counters.commands_refused[error.code] += 1
        log.warning(
            "command refused",
            command_id=error.command_id,
            op=error.op,
            code=error.code,
            fleet=fleet,
        )
        body = response_payload(error.command_id, self.settings.gateway_id, error.op, error=error)
        if client is not self._client:
            log.info("refusal not sent: the connection is gone", command_id=error.command_id)
            return
        try:
            await self._publish(client, self.topics.responses, body, qos=1, retain=False)
        except aiomqtt.MqttError as exc:
            log.info("refusal not delivered", command_id=error.command_id, error=str(exc))

    async def _execute(self, command: Command) -> bytes:
        gateway = self.settings.gateway_id
        error: CommandError | None = None
        body = b""
        try:
            async with asyncio.timeout(self.settings.command_timeout):
                result: object = await self._handler(command)
            if not isinstance(result, dict):
                msg = f"handler returned {type(result).__name__}, not a dict"
                raise TypeError(msg)
            body = response_payload(command.id, gateway, command.op, result=result)
            if len(body) > MAX_RESPONSE_SIZE:
                raise CommandError(
                    ErrorCode.RESPONSE_TOO_LARGE,
                    f"the answer is {len(body)} bytes, above the {MAX_RESPONSE_SIZE} a response "
                    "may have: ask for less (a shorter time range, one device)",
                )
        except CommandError as exc:
            error = exc
        except TimeoutError:
            error = CommandError(ErrorCode.TIMEOUT, "the command did not finish in time")
        except Exception:  # a handler bug is an "internal" answer, not a crash
            log.exception("command handler failed", command_id=command.id, op=command.op)
            error = CommandError(ErrorCode.INTERNAL, "internal error")
        if error is None:
            self.counters.commands_ok += 1
            log.info("command done", command_id=command.id, op=command.op)
            return body
        self.counters.commands_refused[error.code] += 1
        log.warning("command failed", command_id=command.id, op=command.op, code=error.code)
        return response_payload(command.id, gateway, command.op, error=error)

    async def _respond(self, body: bytes) -> None:
        """Queue the response of a verified command in the outbox (durable)."""
        message = OutboxMessage(topic=self.topics.responses, payload=body, kind="response")
        try:
            await self._worker.run(self._store.enqueue, [message], now=self._clock())
        except StoreError as exc:
            log.error("response not stored; publishing it directly", error=str(exc))
            current = self._client  # perhaps a newer connection than the command's
            if current is not None:
                with contextlib.suppress(aiomqtt.MqttError):
                    await self._publish(current, self.topics.responses, body, qos=1, retain=False)
            return
        self.notify_outbox()


async def _reporting(work: Awaitable[None], lost: asyncio.Future[aiomqtt.MqttError]) -> None:
    """Run ``work``; a connection error ends it and is handed to ``lost`` (first wins)."""
    try:
        await work
    except aiomqtt.MqttError as exc:
        if not lost.done():
            lost.set_result(exc)


def _acknowledged(rows: Sequence[OutboxRow], tasks: Sequence[asyncio.Future[None]]) -> list[int]:
    return [
        row.id
        for row, task in zip(rows, tasks, strict=True)
        if task.done() and not task.cancelled() and task.exception() is None
    ]
