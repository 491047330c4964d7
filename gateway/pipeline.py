"""The log pipeline: collect, verify, store durably, only then acknowledge, then publish.

An event leaves a device's ring buffer only after the store has committed it (with the
outbox message that will publish it, in the same transaction), and leaves the store only
after the broker acknowledged that message. A gap or a broken chain raises an alarm and is
never skipped silently: a gap (the device overwrote records before they were collected) is
accepted re-anchored, so later records still flow; any other verification failure stops
collection from that device and nothing of the bad batch is acknowledged.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from gateway.device_session import DeviceError, DeviceSession, RequestRefused
from gateway.metrics import Metrics
from gateway.store import CommitResult, DeviceRecord, OutboxMessage, Store
from gateway.topics import Topics
from gateway.worker import BlockingWorker
from protocols.errors import ErrorCode, LogVerificationError, ProtocolError
from protocols.identity import format_device_id, load_signing_public
from protocols.logrecords import (
    ChainState,
    LogBatch,
    LogRecord,
    VerifiedBatch,
    decode_batch,
    encode_checkpoint,
    encode_record,
    verify_batch,
)
from protocols.messages import LogAck, LogAcked, LogBatchMessage, LogRead

log = structlog.get_logger(__name__)

MAX_BATCHES_PER_SESSION: Final = 100
"""Bound on one session's collection, so a device that logs faster than it is read cannot
hold a connection slot for ever; the rest waits for the next visit."""

SHRINK: Final = 4
"""After a read the link did not carry, the next asks for this many times fewer records:
from 500, four failed sessions reach a single record."""

ALARM_FOR_CODE: Final = {
    ErrorCode.LOG_GAP: "log_gap",
    ErrorCode.LOG_REORDER: "chain_broken",
    ErrorCode.LOG_ALTERED: "chain_broken",
    ErrorCode.LOG_TRUNCATED: "chain_broken",
    ErrorCode.LOG_BAD_CHECKPOINT: "bad_checkpoint",
}


class LogCollectionError(Exception):
    """A batch failed verification; an alarm is stored and nothing was acknowledged."""

    def __init__(self, error: LogVerificationError | ProtocolError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class CollectResult:
    batches: int
    new_events: int
    duplicate_events: int
    gaps: int
    state: ChainState


@dataclass
class LogPipeline:
    """Collects from one device session into the store; shared by every slot."""

    store: Store
    worker: BlockingWorker
    topics: Topics
    batch_size: int = 500
    metrics: Metrics | None = None

    def __post_init__(self) -> None:
        self._limits: dict[bytes, int] = {}

    def batch_limit(self, device_id: bytes) -> int:
        """Records the next read from ``device_id`` asks for: the configured batch size,
        less after reads that the link did not carry to the end."""
        return self._limits.get(device_id, self.batch_size)

    async def collect(self, session: DeviceSession, device: DeviceRecord) -> CollectResult:
        """Collect everything the device holds beyond the stored cursor.

        When the first read of a session is not carried to the end (the connection
        drops, a fragment arrives damaged), the next read from that device asks for
        :data:`SHRINK` times fewer records, down to one: a batch is many fragments, and a
        link that fails after a number of frames can still carry a small one. Every batch
        committed counts, so each session advances the cursor by at least that much. A
        collection that finishes doubles the limit again, up to the configured batch size.
        """
        state = ChainState(device.chain_next_sequence, device.chain_head)
        device_key = load_signing_public(device.signing_key)
        batches = new = duplicates = gaps = 0
        device_hex = format_device_id(device.device_id)
        for _ in range(MAX_BATCHES_PER_SESSION):
            size = self.batch_limit(device.device_id)
            log.info(
                "log_read",
                device_id=device_hex,
                from_sequence=state.next_sequence,
                max_records=size,
            )
            try:
                answer = await session.request(
                    LogRead(from_sequence=state.next_sequence, max_records=size), LogBatchMessage
                )
            except RequestRefused:
                raise
            except DeviceError:
                if not batches:
                    # Later reads fail when the link's budget for the session is spent,
                    # whatever their size: only a first read says the batch was too big.
                    self._limits[device.device_id] = max(1, size // SHRINK)
                raise
            batch = await self._decode(device, answer.batch)
            if not batch.records:
                await self._release_collected(session, state)
                break
            verified = await self._verify(device, batch, device_key, state)
            gaps += verified.gap is not None
            result = await self.worker.run(self._commit, device, batch, verified)
            if self.metrics is not None:
                self.metrics.log_records_collected(result.new_events)
            await session.request(LogAck(up_to_sequence=verified.records[-1].sequence), LogAcked)
            batches += 1
            new += result.new_events
            duplicates += result.duplicate_events
            state = verified.state
            if len(batch.records) < size:
                break
        limit = self.batch_limit(device.device_id)
        if limit * 2 >= self.batch_size:
            self._limits.pop(device.device_id, None)
        else:
            self._limits[device.device_id] = limit * 2
        return CollectResult(batches, new, duplicates, gaps, state)

    async def _release_collected(self, session: DeviceSession, state: ChainState) -> None:
        """Acknowledge records the device still holds although they are stored here.

        That happens when an earlier session committed a batch but lost the link before
        its acknowledgement got through. Unacknowledged, the records would fill the
        device's log and its advert would keep asking for a visit that finds nothing new.
        """
        hello = session.device
        if hello is None:
            return
        status = hello.status
        if status.records_waiting and status.oldest_sequence < state.next_sequence <= (
            status.next_sequence
        ):
            await session.request(LogAck(up_to_sequence=state.next_sequence - 1), LogAcked)

    async def _decode(self, device: DeviceRecord, data: bytes) -> LogBatch:
        try:
            return decode_batch(data)
        except ProtocolError as exc:
            await self._alarm(
                device, "chain_broken", {"code": exc.code.name, "reason": exc.message}
            )
            raise LogCollectionError(exc) from exc

    async def _verify(
        self, device: DeviceRecord, batch: LogBatch, key: Ed25519PublicKey, state: ChainState
    ) -> VerifiedBatch:
        try:
            return verify_batch(batch, device_id=device.device_id, device_key=key, state=state)
        except LogVerificationError as exc:
            if exc.code is not ErrorCode.LOG_GAP:
                await self._alarm(
                    device, ALARM_FOR_CODE.get(exc.code, "chain_broken"), _detail(exc)
                )
                raise LogCollectionError(exc) from exc
        # Records were overwritten on the device before anyone collected them. The loss is
        # real and is reported with the batch; the checkpoint authenticates the new anchor.
        try:
            return verify_batch(
                batch, device_id=device.device_id, device_key=key, state=state, allow_gap=True
            )
        except LogVerificationError as exc:
            await self._alarm(device, ALARM_FOR_CODE.get(exc.code, "chain_broken"), _detail(exc))
            raise LogCollectionError(exc) from exc

    def _commit(
        self, device: DeviceRecord, batch: LogBatch, verified: VerifiedBatch
    ) -> CommitResult:
        now = time.time()
        device_hex = format_device_id(device.device_id)
        outbox = [
            OutboxMessage(
                topic=self.topics.device_events(device_hex),
                payload=events_payload(self.topics.gateway_id, device_hex, batch, verified.records),
                kind="events",
                event_sequences=tuple(record.sequence for record in verified.records),
            )
        ]
        if verified.gap is not None:
            detail = {"first_missing": verified.gap.first_missing, "count": verified.gap.count}
            outbox.append(self._alarm_message(device_hex, "log_gap", detail, now))
        return self.store.commit_batch(
            device.device_id,
            start_sequence=batch.start_sequence,
            start_head=batch.start_head,
            checkpoint=encode_checkpoint(batch.checkpoint),
            raw_records=b"".join(encode_record(record) for record in batch.records),
            records=verified.records,
            new_next_sequence=verified.state.next_sequence,
            new_head=verified.state.head,
            outbox=outbox,
            received_at=now,
        )

    async def _alarm(self, device: DeviceRecord, alarm: str, detail: dict[str, Any]) -> None:
        if self.metrics is not None and "code" in detail:
            self.metrics.log_verification_failed(ErrorCode[detail["code"]])
        message = self._alarm_message(
            format_device_id(device.device_id), alarm, detail, time.time()
        )
        await self.worker.run(self.store.enqueue, [message], now=time.time())

    def _alarm_message(
        self, device_hex: str, alarm: str, detail: dict[str, Any], now: float
    ) -> OutboxMessage:
        return OutboxMessage(
            topic=self.topics.alarms,
            payload=alarm_payload(self.topics.gateway_id, device_hex, alarm, detail, now),
            kind="alarm",
        )


def events_payload(
    gateway_id: str, device_hex: str, batch: LogBatch, records: Sequence[LogRecord]
) -> bytes:
    """The published form of one verified batch: decoded, and raw so it can be re-verified.

    ``message_id`` names the device and the sequence range, so a consumer de-duplicates a
    batch published twice (after a broker outage) whichever gateway sent it.
    """
    first, last = records[0].sequence, records[-1].sequence
    body = {
        "message_id": f"{device_hex}:{first}-{last}",
        "gateway": gateway_id,
        "device_id": device_hex,
        "events": [
            {
                "sequence": record.sequence,
                "time": record.time,
                "event": record.event.name,
                "reason": record.reason.name,
                "key_id": record.key_id,
                "payload": record.payload.hex(),
            }
            for record in records
        ],
        "raw": {
            "start_sequence": batch.start_sequence,
            "start_head": batch.start_head.hex(),
            "records": b"".join(encode_record(record) for record in batch.records).hex(),
            "checkpoint": encode_checkpoint(batch.checkpoint).hex(),
        },
    }
    return json.dumps(body, separators=(",", ":")).encode()


def alarm_payload(
    gateway_id: str, device_hex: str | None, alarm: str, detail: dict[str, Any], now: float
) -> bytes:
    body = {
        "message_id": f"{gateway_id}:alarm:{uuid.uuid4()}",
        "gateway": gateway_id,
        "device_id": device_hex,
        "alarm": alarm,
        "detail": detail,
        "time": now,
    }
    return json.dumps(body, separators=(",", ":")).encode()


def _detail(error: LogVerificationError) -> dict[str, Any]:
    return {
        "code": error.code.name,
        "reason": error.message,
        "record_index": error.index,
        "sequence": error.sequence,
    }
