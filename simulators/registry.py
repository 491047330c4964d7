"""The reference central registry: an MQTT client that plays the registry as the real one would.

:class:`ReferenceRegistry` subscribes to ``{prefix}/gw/+/#`` with a persistent session (a
fixed client id, ``clean_session`` False, or MQTT 5 ``clean_start`` False with a session
expiry) and subscribes again after every reconnect, so nothing a gateway published with
QoS 1 while it was away is lost when the broker keeps sessions. From what it hears it keeps:

* every gateway's status (:attr:`ReferenceRegistry.gateways`);
* registrations and decommissions (:attr:`~ReferenceRegistry.registrations`,
  :attr:`~ReferenceRegistry.decommissions`);
* device events, de-duplicated on (device id, sequence). Every batch, duplicates included,
  is re-verified from its raw records and device-signed checkpoint against the signing key
  of the device's registration, continuing the registry's own copy of the device's hash
  chain (docs/protocol.md section 6). The decoded ``events`` must be exactly the verified
  raw records. A batch that fails is recorded in
  :attr:`~ReferenceRegistry.failures` (device, sequence, code) and nothing of it is
  accepted; lost records (a batch re-anchored after a gap) in
  :attr:`~ReferenceRegistry.gaps`;
* update propagation per update id across every gateway
  (:meth:`~ReferenceRegistry.coverage`).

It signs commands (:func:`gateway.commands.sign_command`, the reference signer) with a
correlation id and waits for the response (:meth:`~ReferenceRegistry.command` and the
helpers :meth:`~ReferenceRegistry.revoke`, :meth:`~ReferenceRegistry.set_access`, ...).

Everything is in memory: this is the reference for the contract of docs/mqtt-api.md, for
tests and demonstrations, not a database. Keys are never logged or shown in a ``repr``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

import aiomqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.commands import sign_command
from protocols.envelopes import Role, decode_certificate, verify_certificate
from protocols.errors import ProtocolError
from protocols.identity import load_signing_public, parse_device_id
from protocols.logrecords import (
    RECORD_SIZE,
    ChainState,
    LogBatch,
    LogRecord,
    VerifiedBatch,
    chain_genesis,
    chain_next,
    decode_checkpoint,
    decode_record,
    encode_record,
    verify_batch,
)

__all__ = [
    "CommandFailed",
    "DecommissionRefused",
    "DeviceProgress",
    "GapReport",
    "GatewayStatus",
    "PayloadValidator",
    "ReferenceRegistry",
    "Registration",
    "VerificationFailure",
]

_log = logging.getLogger(__name__)

UPDATE_STATES: Final = ("applied", "pending", "failed", "unreachable")
"""The states of a device in an update's progress (docs/schemas/progress.json)."""

COMMAND_LIFETIME: Final = 60
"""Seconds from ``iat`` to ``exp`` of the commands this registry signs (at most 300)."""

_SCHEMA_FOR_SUFFIX: Final = (
    ("/status", "status"),
    ("/registrations", "registration"),
    ("/events", "events"),
    ("/responses", "response"),
    ("/progress", "progress"),
    ("/alarms", "alarm"),
    ("/audit", "audit"),
    ("/state", "device-state"),
    ("/requests", "request"),
)


class PayloadValidator(Protocol):
    """What the registry needs of a JSON Schema checker (e.g. the tests' ``Schemas``).

    ``validate`` returns the decoded object and raises (any exception) when ``payload``
    does not match schema ``name`` (a file stem of docs/schemas).
    """

    def validate(self, name: str, payload: bytes | dict[str, Any]) -> dict[str, Any]: ...


class CommandFailed(Exception):
    """A command could not be sent or answered in time (the command's id is ``command_id``)."""

    def __init__(self, command_id: str, message: str) -> None:
        super().__init__(f"{command_id}: {message}")
        self.command_id = command_id


class DecommissionRefused(Exception):
    """Another service still needs the lock; decommission only with an override reason."""

    def __init__(self, message: str, needed_by: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.needed_by = list(needed_by)


@dataclass(frozen=True)
class GatewayStatus:
    """A gateway's last status message."""

    state: Literal["online", "offline"]
    since: float
    version: str


@dataclass(frozen=True)
class Registration:
    """A device as its gateway announced it; ``signing_key`` verifies its log."""

    device_id: str
    gateway: str
    kind: str | int
    signing_key: bytes = field(repr=False)
    noise_key: bytes = field(repr=False)
    site_id: int
    work_order: str | None
    consent_reference: str | None
    time: float
    decommissioned: bool = False


@dataclass(frozen=True)
class VerificationFailure:
    """An events batch the registry refused; ``sequence`` is the first record blamed.

    ``code`` is the protocol's error code name (``LOG_ALTERED``, ``LOG_BAD_CHECKPOINT``,
    ...), or one of the registry's own: ``EVENTS_MISMATCH`` (the decoded events are not
    the raw records), ``MALFORMED`` (the raw part does not decode), ``NO_ANCHOR`` (a
    batch that starts before anything the registry can link it to). A batch of a device
    not registered yet is no failure: it waits for the registration.
    """

    device_id: str
    gateway: str
    message_id: str
    sequence: int | None
    code: str
    message: str


@dataclass(frozen=True)
class GapReport:
    """Records ``first_missing .. first_missing + count - 1`` of a device never seen."""

    device_id: str
    gateway: str
    first_missing: int
    count: int


@dataclass(frozen=True)
class DeviceProgress:
    """Where one update stands on one device, as its gateway last reported."""

    state: str
    error_code: str | None
    gateway: str
    version: int | None = None


@dataclass
class _Chain:
    """The registry's copy of one device's hash chain.

    ``heads[n]`` is the chain head before record ``n`` for every record verified (and the
    anchor of a batch after a gap), so a batch published again is re-verified from its
    own start.
    """

    state: ChainState
    heads: dict[int, bytes]


class ReferenceRegistry:
    """The central registry over MQTT (see the module documentation).

    ``key`` and ``certificate`` are the registry's signing key and its encoded certificate
    (role REGISTRY, issued by ``authority``; checked at construction). ``validator``, when
    given, checks every payload against docs/schemas before it is believed; a payload that
    fails is counted in :attr:`invalid` and otherwise ignored.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        key: Ed25519PrivateKey,
        certificate: bytes,
        authority: Ed25519PublicKey,
        prefix: str = "lockgw",
        client_id: str = "lockgw-registry",
        protocol: aiomqtt.ProtocolVersion = aiomqtt.ProtocolVersion.V311,
        session_expiry: int = 86_400,
        validator: PayloadValidator | None = None,
        reconnect_delay: float = 0.2,
    ) -> None:
        verify_certificate(
            decode_certificate(certificate), authority, role=Role.REGISTRY, now=int(time.time())
        )
        self._key = key
        self._certificate = certificate
        self._authority = authority
        self.host = host
        self.port = port
        self.prefix = prefix
        self.client_id = client_id
        self.protocol = protocol
        self.session_expiry = session_expiry
        self.validator = validator
        self.reconnect_delay = reconnect_delay

        self.gateways: dict[str, GatewayStatus] = {}
        self.registrations: dict[str, Registration] = {}
        self.decommissions: dict[str, Registration] = {}
        self.events: dict[str, dict[int, dict[str, Any]]] = {}
        """Accepted events per device id, by sequence, as published (decoded form)."""
        self.duplicates = 0
        """Batches received again whose every record was already accepted (and verified)."""
        self.failures: list[VerificationFailure] = []
        self.gaps: list[GapReport] = []
        self.alarms: list[dict[str, Any]] = []
        self.audits: list[dict[str, Any]] = []
        """Every export of a door log any gateway reported: who read what, and why."""
        self.device_states: dict[str, dict[str, Any]] = {}
        self.progress: dict[str, dict[str, DeviceProgress]] = {}
        """Per update id: device id -> its latest reported progress, from any gateway."""
        self.responses: dict[str, dict[str, dict[str, Any]]] = {}
        """Per command id: gateway -> its response."""
        self.uncorrelated: list[dict[str, Any]] = []
        """Responses whose id is null or names no command of this registry."""
        self.validated: dict[str, int] = {}
        """How many payloads passed each schema (when a validator is set)."""
        self.invalid: list[tuple[str, str]] = []
        """(topic, reason) of payloads refused before being believed."""
        self.services: dict[str, set[str]] = {}
        """Device id -> the services (care plans, ...) that still need the lock."""
        self.requests: dict[str, dict[str, Any]] = {}
        """Request id -> a technician's request (``lockgw decommission``) as received, with
        ``answer``: ``decommission``, ``decline`` or ``expired``."""
        self.connections = 0

        self._chains: dict[str, _Chain] = {}
        self._waiting: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self._targets: dict[str, dict[str, Any]] = {}
        self._commands: set[str] = set()
        self._revoked: dict[int, int] = {}
        self._revocation_version = 0
        self._client: aiomqtt.Client | None = None
        self._answering: set[asyncio.Task[None]] = set()
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()

    def __repr__(self) -> str:
        return f"ReferenceRegistry({self.client_id!r} at {self.host}:{self.port})"

    # ------------------------------------------------------------------------ connection

    async def run(self) -> None:
        """Stay subscribed until cancelled, reconnecting (same session) after any loss."""
        while True:
            try:
                async with self._new_client() as client:
                    await client.subscribe(f"{self.prefix}/gw/+/#", qos=1)
                    self._client = client
                    self.connections += 1
                    self._connected.set()
                    self._notify()
                    async for message in client.messages:
                        self.take(str(message.topic), message.payload)
            except aiomqtt.MqttError as exc:
                _log.info("registry connection lost: %s", exc)
            except asyncio.CancelledError:
                for task in self._answering:
                    task.cancel()
                raise
            finally:
                self._client = None
                self._connected.clear()
            await asyncio.sleep(self.reconnect_delay)

    def _new_client(self) -> aiomqtt.Client:
        if self.protocol == aiomqtt.ProtocolVersion.V5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho's Properties is unannotated
            properties.SessionExpiryInterval = self.session_expiry
            return aiomqtt.Client(
                self.host,
                self.port,
                identifier=self.client_id,
                protocol=self.protocol,
                clean_start=False,
                properties=properties,
            )
        return aiomqtt.Client(
            self.host,
            self.port,
            identifier=self.client_id,
            protocol=self.protocol,
            clean_session=False,
        )

    @property
    def connected(self) -> bool:
        """Whether the registry is connected and subscribed now."""
        return self._connected.is_set()

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float,  # noqa: ASYNC109 - a bound the caller chooses for the whole wait
        what: str = "a condition",
    ) -> None:
        """Return once ``predicate()`` holds (checked after every message); else TimeoutError."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await self._wake.wait()
        except TimeoutError:
            msg = f"{what} not reached within {timeout} s"
            raise TimeoutError(msg) from None

    def _notify(self) -> None:
        self._wake.set()

    # -------------------------------------------------------------------------- messages

    def take(self, topic: str, payload: object) -> None:
        """Handle one message from a gateway (called for every message :meth:`run` gets)."""
        levels = topic.split("/")
        if len(levels) < 4 or levels[0] != self.prefix or levels[1] != "gw":
            return
        if levels[-1] == "commands" or not isinstance(payload, bytes) or not payload:
            return  # commands (ours or anyone's), or a retained topic being cleared
        gateway = levels[2]
        schema = next((name for suffix, name in _SCHEMA_FOR_SUFFIX if topic.endswith(suffix)), None)
        if schema is None:
            self.invalid.append((topic, "unknown topic"))
            return
        body = self._decode(topic, schema, payload)
        if body is None:
            return
        if body.get("gateway") != gateway:
            self.invalid.append((topic, "gateway in payload differs from the topic"))
            return
        try:
            self._dispatch(schema, gateway, levels, body)
        except (KeyError, TypeError, ValueError) as exc:  # only without a validator
            self.invalid.append((topic, f"{type(exc).__name__}: {exc}"))
        self._notify()

    def _decode(self, topic: str, schema: str, payload: bytes) -> dict[str, Any] | None:
        body: object
        try:
            if self.validator is not None:
                body = self.validator.validate(schema, payload)
            else:
                body = json.loads(payload)
        except Exception as exc:  # noqa: BLE001 - any validator's refusal is a bad payload
            self.invalid.append((topic, f"{schema}: {exc}"[:500]))
            return None
        if not isinstance(body, dict):
            self.invalid.append((topic, "not a JSON object"))
            return None
        if self.validator is not None:
            self.validated[schema] = self.validated.get(schema, 0) + 1
        return body

    def _dispatch(self, schema: str, gateway: str, levels: list[str], body: dict[str, Any]) -> None:
        if schema == "status":
            self.gateways[gateway] = GatewayStatus(
                state=body["state"], since=float(body["since"]), version=str(body["version"])
            )
        elif schema == "registration":
            self._registration(gateway, body)
        elif schema == "events":
            if levels[-2] != body["device_id"]:
                self.invalid.append(("/".join(levels), "device id differs from the topic"))
                return
            self._events(gateway, body)
        elif schema == "progress":
            self._progress(gateway, body)
        elif schema == "response":
            self._response(gateway, body)
        elif schema == "alarm":
            self.alarms.append(body)
        elif schema == "audit":
            self.audits.append(body)
        elif schema == "device-state":
            self.device_states[body["device_id"]] = body
        elif schema == "request":
            self.requests[body["request_id"]] = body
            task = asyncio.get_running_loop().create_task(self._answer_request(gateway, body))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    def _registration(self, gateway: str, body: dict[str, Any]) -> None:
        device = body["device_id"]
        registration = Registration(
            device_id=device,
            gateway=gateway,
            kind=body["kind"],
            signing_key=bytes.fromhex(body["signing_key"]),
            noise_key=bytes.fromhex(body["noise_key"]),
            site_id=int(body["site_id"]),
            work_order=body["work_order"],
            consent_reference=body["consent_reference"],
            time=float(body["time"]),
            decommissioned=body["action"] == "decommissioned",
        )
        self.registrations[device] = registration
        if registration.decommissioned:
            self.decommissions[device] = registration
            return
        self.decommissions.pop(device, None)
        for waiting_gateway, waiting in self._waiting.pop(device, []):
            self._events(waiting_gateway, waiting)

    def _progress(self, gateway: str, body: dict[str, Any]) -> None:
        devices = self.progress.setdefault(body["update_id"], {})
        for device, entry in body["devices"].items():
            devices[device] = DeviceProgress(
                state=entry["state"],
                error_code=entry["error_code"],
                gateway=gateway,
                version=entry.get("version"),
            )

    def _response(self, gateway: str, body: dict[str, Any]) -> None:
        command_id = body["id"]
        if command_id is None or command_id not in self._commands:
            self.uncorrelated.append(body)
            return
        self.responses.setdefault(command_id, {})[gateway] = body

    # ---------------------------------------------------------------------------- events

    def _events(self, gateway: str, body: dict[str, Any]) -> None:
        device = body["device_id"]
        registration = self.registrations.get(device)
        if registration is None:
            # Registrations travel through the same outbox first; from another gateway
            # the batch may overtake it. It waits, unverified and not accepted.
            self._waiting.setdefault(device, []).append((gateway, body))
            return
        if not body["events"]:
            return
        raw = body["raw"]

        def fail(code: str, message: str, sequence: int | None) -> None:
            self.failures.append(
                VerificationFailure(device, gateway, body["message_id"], sequence, code, message)
            )

        try:
            device_id = parse_device_id(device)
            batch = _raw_batch(raw)
        except (ProtocolError, ValueError) as exc:
            fail("MALFORMED", str(exc), raw.get("start_sequence"))
            return
        chain = self._chains.get(device)
        if chain is None:
            genesis = chain_genesis(device_id)
            chain = self._chains[device] = _Chain(ChainState(0, genesis), {0: genesis})
        start = batch.start_sequence
        if start < chain.state.next_sequence:
            anchor = chain.heads.get(start)
            if anchor is None:
                fail("NO_ANCHOR", "batch starts before the registry's copy of the chain", start)
                return
            state = ChainState(start, anchor)
        else:
            state = chain.state
        try:
            verified = verify_batch(
                batch,
                device_id=device_id,
                device_key=load_signing_public(registration.signing_key),
                state=state,
                allow_gap=True,
            )
        except ProtocolError as exc:
            fail(exc.code.name, exc.message, getattr(exc, "sequence", start))
            return
        mismatch = _first_mismatch(body["events"], verified.records)
        if mismatch is not None:
            fail("EVENTS_MISMATCH", "decoded events differ from the raw records", mismatch)
            return
        self._accept(gateway, device, chain, batch=batch, verified=verified, events=body["events"])

    def _accept(
        self,
        gateway: str,
        device: str,
        chain: _Chain,
        *,
        batch: LogBatch,
        verified: VerifiedBatch,
        events: list[dict[str, Any]],
    ) -> None:
        """Store a verified batch's new events; the chain continues, every head is kept."""
        start = batch.start_sequence
        stored = self.events.setdefault(device, {})
        new = [record for record in verified.records if record.sequence not in stored]
        if not new:
            self.duplicates += 1
            return
        if verified.gap is not None:
            self.gaps.append(
                GapReport(device, gateway, verified.gap.first_missing, verified.gap.count)
            )
        head = batch.start_head
        chain.heads[start] = head
        for record, event in zip(verified.records, events, strict=True):
            head = chain_next(head, encode_record(record))
            chain.heads[record.sequence + 1] = head
            stored.setdefault(record.sequence, event)
        if verified.state.next_sequence > chain.state.next_sequence:
            chain.state = verified.state

    # --------------------------------------------------------------------------- updates

    def coverage(self, update_id: str) -> dict[str, int]:
        """How many devices stand where for ``update_id``, merged across every gateway.

        Devices that a gateway reported count by their latest state. For an update this
        registry sent, a registered (not decommissioned) device in its target that no
        gateway has reported on yet counts as ``pending``.
        """
        counts = dict.fromkeys(UPDATE_STATES, 0)
        reported = self.progress.get(update_id, {})
        for entry in reported.values():
            if entry.state in counts:
                counts[entry.state] += 1
        target = self._targets.get(update_id)
        if target is not None:
            for device in self._devices_in(target):
                if device not in reported:
                    counts["pending"] += 1
        return counts

    def _devices_in(self, target: Mapping[str, Any]) -> Iterable[str]:
        for device, registration in self.registrations.items():
            if registration.decommissioned:
                continue
            if (
                target["kind"] == "fleet"
                or (target["kind"] == "site" and target.get("site_id") == registration.site_id)
                or (target["kind"] == "device" and target.get("device_id") == device)
            ):
                yield device

    # -------------------------------------------------------------------------- commands

    def claims(self, op: str, args: Mapping[str, Any], *, gateway: str) -> dict[str, Any]:
        """Fresh claims: a new correlation id and jti, valid for :data:`COMMAND_LIFETIME` s."""
        now = int(time.time())
        return {
            "id": f"c-{uuid.uuid4().hex[:16]}",
            "op": op,
            "gateway": gateway,
            "iat": now,
            "exp": now + COMMAND_LIFETIME,
            "jti": uuid.uuid4().hex,
            "args": dict(args),
        }

    async def command(
        self,
        op: str,
        args: Mapping[str, Any],
        *,
        gateway: str | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - how long to wait for the gateways to answer
    ) -> dict[str, Any]:
        """Sign and send a command, and return the response body (its ``result`` or error).

        ``gateway`` None sends to ``{prefix}/fleet/commands`` (claims ``gateway`` ``"*"``)
        and returns the first gateway's response; every response stays in
        :attr:`responses` under the command's id. The response may report an error: the
        caller reads ``status``. :class:`CommandFailed` when there is no answer in time.
        """
        claims = self.claims(op, args, gateway="*" if gateway is None else gateway)
        if self.validator is not None:
            self.validator.validate("command-claims", claims)
        command_id: str = claims["id"]
        self._commands.add(command_id)
        topic = (
            f"{self.prefix}/fleet/commands"
            if gateway is None
            else f"{self.prefix}/gw/{gateway}/commands"
        )
        payload = sign_command(self._key, self._certificate, claims)
        try:
            async with asyncio.timeout(timeout):
                await self._publish(topic, payload)
                await self.wait_for(lambda: command_id in self.responses, timeout, op)
        except TimeoutError:
            msg = f"no response to {op} within {timeout} s"
            raise CommandFailed(command_id, msg) from None
        return next(iter(self.responses[command_id].values()))

    async def _publish(self, topic: str, payload: bytes) -> None:
        """Publish once connected; a publish cut off by a connection loss is sent again.

        Sending again is safe: the gateway accepts a jti once and answers a repeat
        ``replayed`` after the first, whose response then arrives as well.
        """
        while True:
            await self._connected.wait()
            client = self._client
            if client is None:
                continue
            try:
                await client.publish(topic, payload, qos=1)
            except aiomqtt.MqttError:
                await asyncio.sleep(self.reconnect_delay)
            else:
                return

    async def revoke(
        self,
        update_id: str,
        key_ids: Iterable[int],
        prune_after: int,
        expires_at: int,
        *,
        version: int | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - how long to wait for the gateways to answer
    ) -> dict[str, Any]:
        """Revoke ``key_ids`` fleet-wide, sending the full list of every key revoked so far.

        Entries whose ``prune_after`` has passed are left out. The list's version is the
        registry's: the next one, or ``version`` if given (it must be above the last one).
        The version is spent even when gateways refuse, so a number never means two lists.
        """
        if version is None:
            version = self._revocation_version + 1
        elif version <= self._revocation_version:
            msg = f"revocation version {version} is not above {self._revocation_version}"
            raise ValueError(msg)
        for key_id in key_ids:
            self._revoked[key_id] = max(prune_after, self._revoked.get(key_id, 0))
        self._revocation_version = version
        now = int(time.time())
        target = {"kind": "fleet"}
        self._targets[update_id] = target
        args = {
            "update_id": update_id,
            "version": version,
            "revocations": [
                {"key_id": key_id, "prune_after": after}
                for key_id, after in sorted(self._revoked.items())
                if after > now
            ],
            "target": target,
            "expires_at": expires_at,
        }
        return await self.command("revoke", args, gateway=None, timeout=timeout)

    @property
    def revocation_version(self) -> int:
        """The version of the last revocation list sent (0: none)."""
        return self._revocation_version

    async def set_access(
        self,
        update_id: str,
        target: Mapping[str, Any],
        entries: Iterable[Mapping[str, Any]],
        *,
        version: int,
        expires_at: int,
        mode: Literal["full", "delta"] = "full",
        base_version: int = 0,
        removed: Iterable[int] = (),
        gateway: str | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - how long to wait for the gateways to answer
    ) -> dict[str, Any]:
        """Send an access list for a site or device target (to ``gateway``, or the fleet)."""
        self._targets[update_id] = dict(target)
        args = {
            "update_id": update_id,
            "target": dict(target),
            "mode": mode,
            "version": version,
            "base_version": base_version,
            "entries": [dict(entry) for entry in entries],
            "removed": list(removed),
            "expires_at": expires_at,
        }
        return await self.command("set_access", args, gateway=gateway, timeout=timeout)

    async def pull_logs(
        self,
        gateway: str,
        device_id: str,
        time_from: int,
        time_to: int,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - how long to wait for the gateways to answer
    ) -> dict[str, Any]:
        """Ask ``gateway`` for ``device_id``'s stored events from ``time_from`` to ``time_to``."""
        args = {"device_id": device_id, "from": time_from, "to": time_to}
        return await self.command("pull_logs", args, gateway=gateway, timeout=timeout)

    async def get_state(
        self,
        gateway: str,
        device_id: str | None = None,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - how long to wait for the gateways to answer
    ) -> dict[str, Any]:
        """The state of one device at ``gateway``, or (None) of all of them."""
        args = {"device_id": device_id}
        return await self.command("get_state", args, gateway=gateway, timeout=timeout)

    async def register(
        self,
        gateway: str,
        device_id: str,
        work_order: str,
        consent_reference: str,
        *,
        timeout: float = 30.0,  # noqa: ASYNC109 - how long to wait for the gateways to answer
    ) -> dict[str, Any]:
        """Confirm a pairing ``gateway`` announced."""
        args = {
            "device_id": device_id,
            "work_order": work_order,
            "consent_reference": consent_reference,
        }
        return await self.command("register", args, gateway=gateway, timeout=timeout)

    async def decommission(
        self,
        gateway: str,
        device_id: str,
        reason: str,
        *,
        override: str | None = None,
        force: bool = False,
        timeout: float = 30.0,  # noqa: ASYNC109 - how long to wait for the gateways to answer
    ) -> dict[str, Any]:
        """Take ``device_id`` out of service, unless another service still needs it.

        :attr:`services` names what still needs the lock; if anything does,
        :class:`DecommissionRefused` is raised unless ``override`` gives the reason to go
        ahead anyway (it is added to the reason sent). ``force`` is the gateway's flag:
        decommission even when the device cannot be reached.
        """
        reason = self.decommission_reason(device_id, reason, override)
        args = {"device_id": device_id, "reason": reason, "force": force}
        return await self.command("decommission", args, gateway=gateway, timeout=timeout)

    def decommission_reason(self, device_id: str, reason: str, override: str | None) -> str:
        """The reason to send with a decommission, or :class:`DecommissionRefused`."""
        if not reason.strip():
            msg = "a decommission needs a reason"
            raise ValueError(msg)
        needed = sorted(self.services.get(device_id, ()))
        if not needed:
            return reason
        if override is None or not override.strip():
            msg = f"{device_id} is still needed by {', '.join(needed)}"
            raise DecommissionRefused(msg, needed)
        return f"{reason} (overriding {', '.join(needed)}: {override})"[:200]

    async def _answer_request(self, gateway: str, body: Mapping[str, Any]) -> None:
        """A technician asks to decommission: agree with a ``decommission``, or ``decline``."""
        request_id = body["request_id"]
        if body["op"] != "decommission" or body["expires_at"] < time.time():
            self.requests[request_id]["answer"] = "expired"
            return
        device = body["device_id"]
        try:
            reason = self.decommission_reason(device, body["reason"], body.get("override"))
        except DecommissionRefused as refused:
            self.requests[request_id]["answer"] = "decline"
            args: dict[str, Any] = {
                "request_id": request_id,
                "reason": str(refused)[:200],
                "needed_by": refused.needed_by,
            }
            op = "decline"
        else:
            self.requests[request_id]["answer"] = "decommission"
            args = {"device_id": device, "reason": reason, "force": False, "request_id": request_id}
            op = "decommission"
        try:
            await self.command(op, args, gateway=gateway, timeout=COMMAND_LIFETIME)
        except CommandFailed as exc:
            _log.info("no answer to %s for request %s: %s", op, request_id, exc)


def _first_mismatch(events: list[dict[str, Any]], records: tuple[LogRecord, ...]) -> int | None:
    """The sequence of the first decoded event that is not its raw record, else None."""
    for index, record in enumerate(records):
        expected = {
            "sequence": record.sequence,
            "time": record.time,
            "event": record.event.name,
            "reason": record.reason.name,
            "key_id": record.key_id,
            "payload": record.payload.hex(),
        }
        if index >= len(events) or events[index] != expected:
            return record.sequence
    if len(events) > len(records):
        return int(events[len(records)].get("sequence", -1))
    return None


def _raw_batch(raw: Mapping[str, Any]) -> LogBatch:
    """The batch of an events payload's ``raw`` part (ProtocolError or ValueError if bad)."""
    data = bytes.fromhex(raw["records"])
    return LogBatch(
        start_sequence=raw["start_sequence"],
        start_head=bytes.fromhex(raw["start_head"]),
        records=tuple(
            decode_record(data[i : i + RECORD_SIZE]) for i in range(0, len(data), RECORD_SIZE)
        ),
        checkpoint=decode_checkpoint(bytes.fromhex(raw["checkpoint"])),
    )
