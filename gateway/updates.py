"""Signed authorisation updates: sign once, push to every device served, track each one.

The registry assigns every version, so two gateways serving one device never disagree;
this gateway signs the update with its own key and certificate, stores it with a
propagation row per affected device, pushes it in the next session with each device, and
publishes per-device progress (applied, pending, failed with the device's code,
unreachable) as a retained message.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Final

import structlog

from gateway.device_session import DeviceSession, RequestRefused
from gateway.keys import GatewayCredentials
from gateway.store import (
    DeviceRecord,
    OutboxMessage,
    PropagationState,
    Store,
    UpdateRecord,
)
from gateway.topics import Topics
from gateway.worker import BlockingWorker
from protocols.envelopes import (
    AuthorisationUpdate,
    TargetKind,
    UpdateKind,
    encode_update,
    sign_update,
)
from protocols.errors import ErrorCode
from protocols.identity import format_device_id
from protocols.messages import AuthUpdate, UpdateResult

log = structlog.get_logger(__name__)


class Priority(IntEnum):
    """Work order within the scheduler: lower runs first."""

    REVOCATION = 0
    PAIRING = 1
    ACCESS_UPDATE = 2
    AUDIT_PULL = 3
    LOG_COLLECTION = 4
    STATUS = 5


DEFAULT_CLOCK_TOLERANCE: Final = 300
"""Seconds an update's issue time is set back; above the drift that triggers a re-sync."""

RETRY_LATER: Final = frozenset(
    {ErrorCode.UPDATE_NOT_YET_VALID, ErrorCode.TIME_BELOW_FLOOR, ErrorCode.BUSY}
)
"""Refusals a later visit can cure (the device's clock is being corrected); the update
stays pending with the code recorded, instead of failing for good."""

PRIORITY_FOR_KIND: Final = {
    UpdateKind.REVOCATION: Priority.REVOCATION,
    UpdateKind.ACCESS_FULL: Priority.ACCESS_UPDATE,
    UpdateKind.ACCESS_DELTA: Priority.ACCESS_UPDATE,
}


@dataclass(frozen=True)
class PushOutcome:
    update_id: str
    state: PropagationState
    error_code: ErrorCode | None = None


class UpdateService:
    """Turns registry commands into signed updates and pushes them to devices."""

    def __init__(
        self,
        store: Store,
        worker: BlockingWorker,
        credentials: GatewayCredentials,
        topics: Topics,
        *,
        clock_tolerance: int = DEFAULT_CLOCK_TOLERANCE,
    ) -> None:
        self.clock_tolerance = clock_tolerance
        self.store = store
        self.worker = worker
        self.credentials = credentials
        self.topics = topics

    async def submit(self, update_id: str, update: AuthorisationUpdate) -> list[bytes]:
        """Sign and store ``update``; returns the devices it is for. Idempotent per id.

        The issue time is set back by the clock tolerance: a lock whose clock runs a few
        seconds behind (within the drift the gateway tolerates) must not refuse an update
        issued this second. Its expiry, not its issue time, bounds how long it is valid.
        """
        update = replace(
            update, issued_at=max(0, min(update.issued_at, int(time.time())) - self.clock_tolerance)
        )
        signed = sign_update(
            update,
            key=self.credentials.keys.signing_key,
            certificate=self.credentials.certificate,
        )
        record = UpdateRecord(
            update_id=update_id,
            kind=int(update.kind),
            target=describe_target(update),
            version=update.version,
            priority=int(PRIORITY_FOR_KIND[update.kind]),
            signed=encode_update(signed),
            created_at=time.time(),
            expires_at=update.expires_at,
        )
        devices = await self.worker.run(self._devices_for, update)
        await self.worker.run(self.store.add_update, record, devices)
        await self.publish_progress(update_id)
        return devices

    def _devices_for(self, update: AuthorisationUpdate) -> list[bytes]:
        scope = self.credentials.certificate.scope
        return [
            device.device_id
            for device in self.store.list_devices()
            if update.target.matches(device.device_id, device.site_id)
            and scope.covers(device.device_id, device.site_id)
        ]

    async def pending_for(self, device_id: bytes) -> list[UpdateRecord]:
        return await self.worker.run(self.store.pending_updates_for, device_id)

    async def push(self, session: DeviceSession, device: DeviceRecord) -> list[PushOutcome]:
        """Push every pending update for ``device``, revocations first."""
        outcomes: list[PushOutcome] = []
        for record in await self.pending_for(device.device_id):
            outcome = await self._push_one(session, device, record)
            outcomes.append(outcome)
            await self.worker.run(
                self.store.set_propagation,
                record.update_id,
                device.device_id,
                outcome.state,
                error_code=int(outcome.error_code) if outcome.error_code is not None else None,
                now=time.time(),
            )
            await self.publish_progress(record.update_id)
        return outcomes

    async def _push_one(
        self, session: DeviceSession, device: DeviceRecord, record: UpdateRecord
    ) -> PushOutcome:
        log.info(
            "update_push",
            device_id=format_device_id(device.device_id),
            update_id=record.update_id,
            version=record.version,
        )
        sent = _sent_key(record.update_id, device.device_id)
        # Durably noted before it leaves: if no answer comes back (the link drops, the
        # device reboots, this process dies), the next visit cannot tell from the
        # device's refusal alone whether it applied this very update.
        unanswered = await self.worker.run(self.store.kv_get, sent) is not None
        await self.worker.run(self.store.kv_set, sent, b"\x01")
        try:
            result = await session.request(AuthUpdate(update=record.signed), UpdateResult)
        except RequestRefused as exc:
            if exc.code is ErrorCode.UPDATE_ROLLBACK and await self._already_held(
                session, device, record, unanswered=unanswered
            ):
                # Another gateway (or an earlier session cut short) already delivered it.
                outcome = PushOutcome(record.update_id, PropagationState.APPLIED)
            elif exc.code in RETRY_LATER:
                outcome = PushOutcome(record.update_id, PropagationState.PENDING, exc.code)
            else:
                outcome = PushOutcome(record.update_id, PropagationState.FAILED, exc.code)
        else:
            await self.worker.run(
                self.store.update_device_status,
                device.device_id,
                access_version=result.access_version,
                revocation_version=result.revocation_version,
            )
            outcome = PushOutcome(record.update_id, PropagationState.APPLIED)
        await self.worker.run(self.store.kv_delete, sent)  # the device answered
        return outcome

    async def _already_held(
        self,
        session: DeviceSession,
        device: DeviceRecord,
        record: UpdateRecord,
        *,
        unanswered: bool,
    ) -> bool:
        """Whether the device holds this very version, as the store last heard (another
        gateway, or an earlier session, delivered it); or, when this update was sent to it
        before and no answer came back, as the device itself said when this session began
        (it applied the update, the answer was lost).

        An older version than the device holds is a rollback, whoever asks for it: it
        failed. So did an update never sent, refused although the device holds its
        version: another list under the same number (a store restored from a backup)."""
        revocation = record.kind == UpdateKind.REVOCATION
        current = await self.worker.run(self.store.get_device, device.device_id)
        if current is not None:
            held = current.revocation_version if revocation else current.access_version
            if held > record.version:
                return False
            if held == record.version:
                return True
        hello = session.device
        if hello is None or not unanswered:
            return False
        status = hello.status
        held = status.revocation_version if revocation else status.access_version
        return held >= record.version

    async def mark_unreachable(self, device_id: bytes) -> None:
        """Every update still pending for this device is reported unreachable."""
        for record in await self.pending_for(device_id):
            await self.worker.run(
                self.store.set_propagation,
                record.update_id,
                device_id,
                PropagationState.UNREACHABLE,
                now=time.time(),
            )
            await self.publish_progress(record.update_id)

    async def publish_progress(self, update_id: str) -> None:
        rows = await self.worker.run(self.store.propagation, update_id)
        summary = {state.value: 0 for state in PropagationState}
        devices = {}
        for device_id, row in rows.items():
            summary[row.state.value] += 1
            devices[format_device_id(device_id)] = {
                "state": row.state.value,
                "error_code": ErrorCode(row.error_code).name if row.error_code else None,
                "attempts": row.attempts,
                "updated_at": row.updated_at,
            }
        payload = {
            "update_id": update_id,
            "gateway": self.topics.gateway_id,
            "devices": devices,
            "summary": summary,
            "time": time.time(),
        }
        message = OutboxMessage(
            topic=self.topics.update_progress(update_id),
            payload=json.dumps(payload, separators=(",", ":")).encode(),
            kind="progress",
            retain=True,
        )
        await self.worker.run(self.store.enqueue, [message], now=time.time())


def _sent_key(update_id: str, device_id: bytes) -> str:
    """The store's note that ``update_id`` went to the device without an answer yet."""
    return f"update-sent:{update_id}:{format_device_id(device_id)}"


def describe_target(update: AuthorisationUpdate) -> str:
    target = update.target
    if target.kind is TargetKind.FLEET:
        return "fleet"
    if target.kind is TargetKind.SITE:
        return f"site:{target.site_id}"
    assert target.device_id is not None  # a DEVICE target always names one
    return f"device:{format_device_id(target.device_id)}"
