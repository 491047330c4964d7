"""Auditor's exports of a device's event log: re-verifiable JSON, CSV and one-file HTML.

An export covers the events of one device in a time range (device clock, UTC) and
carries the material to re-verify them offline: every stored batch from the first to the
last one holding a record in the range, whole (start sequence, start head, the raw
records and the signed checkpoint, all hex), and the device's public signing key.
Batches between two in-range ones are included even if none of their records is in the
range (a device clock that was set back can cause that), so that continuity can be
checked without false gaps.

Verification (:func:`verify_export`, used both by the gateway before it writes an export
and by :func:`verify_file` offline) verifies each batch from its own start head against
the device key and then checks that consecutive batches join: a discontinuity is
reported as a gap (first missing sequence, count), never hidden; a batch that fails
names the first bad record and the reason code. Offline, the key the auditor obtained
independently (from the registry, from pairing records) must be given: an export whose
key differs is refused, since a forger would ship a key of their own.

Pseudonymisation and what it does not cover: staff key ids are pseudonymised unless the
export is made with a reveal reason (HMAC-SHA256 of the key id under a random salt drawn
per export and not kept, first 8 hex digits: stable within one export, unlinkable across
exports). It applies to the human-readable views only: the ``events`` list of the JSON,
the CSV and the HTML. The raw records must keep their real bytes, key ids included,
because the hash chain and the device's signature are over those bytes; zeroing them
would make the export unverifiable. **A JSON export is therefore personal data in full**,
whether revealed or not, and must be handled as such (stored, sent and deleted under the
same rules as the gateway's store). CSV and HTML exports of a pseudonymised export carry
no key ids, but still say who (which home) had the door opened when.

Every export is itself recorded: :func:`export` enqueues a message on the gateway's
``audit`` topic (auditor, device, range, format, whether ids were revealed and why), in
the store's outbox, so the daemon publishes it like any other message.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import html
import io
import json
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from gateway.store import BatchRow, OutboxMessage, Store
from gateway.topics import Topics
from protocols.enums import EventType
from protocols.errors import LogVerificationError, ProtocolError
from protocols.identity import format_device_id, load_signing_public
from protocols.logrecords import (
    HEAD_SIZE,
    RECORD_SIZE,
    ChainState,
    LogBatch,
    LogRecord,
    chain_next,
    decode_checkpoint,
    decode_record,
    encode_record,
    verify_batch,
)

__all__ = [
    "FORMAT",
    "AuditError",
    "AuditExport",
    "ExportFormat",
    "GapInfo",
    "VerificationFailure",
    "VerificationResult",
    "export",
    "render",
    "verify_export",
    "verify_file",
]

FORMAT: Final = "lockgw-audit/1"
"""The ``format`` field of a JSON export."""

ExportFormat = Literal["json", "csv", "html"]
FORMATS: Final[tuple[ExportFormat, ...]] = ("json", "csv", "html")

PSEUDONYM_HEX: Final = 8
DAY_SECONDS: Final = 86400

# Failure codes beyond the protocol's LOG_* codes.
MALFORMED: Final = "MALFORMED"
KEY_MISMATCH: Final = "KEY_MISMATCH"
FORKED: Final = "FORKED"
EVENTS_MISMATCH: Final = "EVENTS_MISMATCH"


class AuditError(Exception):
    """An export could not be made (unknown device, bad range or reason)."""


# -------------------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class GapInfo:
    """Records ``first_missing .. first_missing + count - 1`` are not in the export."""

    first_missing: int
    count: int

    def to_dict(self) -> dict[str, int]:
        return {"first_missing": self.first_missing, "count": self.count}


@dataclass(frozen=True, slots=True)
class VerificationFailure:
    """The first thing that failed: which batch, which record (sequence) and why.

    ``code`` is a protocol code (``LOG_ALTERED``, ``LOG_GAP``, ``LOG_REORDER``,
    ``LOG_TRUNCATED``, ``LOG_BAD_CHECKPOINT``) or one of ``MALFORMED`` (the document
    cannot be read), ``KEY_MISMATCH`` (the export's key is not the one given),
    ``FORKED`` (a batch continues another history than the batch before it) and
    ``EVENTS_MISMATCH`` (the readable events disagree with the raw records).
    ``batch_index`` and ``sequence`` are None where the fault is not a batch's or no
    record can be named.
    """

    batch_index: int | None
    sequence: int | None
    code: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_index": self.batch_index,
            "sequence": self.sequence,
            "code": self.code,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class VerificationResult:
    """``intact`` when every batch verified and they join without gaps.

    ``records`` counts the distinct records that verified.
    """

    intact: bool
    records: int
    gaps: list[GapInfo] = field(default_factory=list)
    failure: VerificationFailure | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "intact": self.intact,
            "records": self.records,
            "gaps": [gap.to_dict() for gap in self.gaps],
            "failure": None if self.failure is None else self.failure.to_dict(),
        }

    def summary(self) -> str:
        """One line in plain words."""
        if self.failure is not None:
            failure = self.failure
            where = "the export" if failure.batch_index is None else f"batch {failure.batch_index}"
            record = "" if failure.sequence is None else f"record {failure.sequence} in "
            return f"NOT intact: {record}{where}: {failure.code}: {failure.reason}"
        if self.gaps:
            listed = ", ".join(_gap_words(gap) for gap in self.gaps)
            return f"NOT intact: {self.records} records verified, but gaps: {listed}"
        return f"intact: {self.records} records, no gaps"


def _gap_words(gap: GapInfo) -> str:
    last = gap.first_missing + gap.count - 1
    span = str(gap.first_missing) if gap.count == 1 else f"{gap.first_missing}-{last}"
    return f"records {span} missing ({gap.count})"


# --------------------------------------------------------------------------- export


@dataclass(frozen=True, slots=True)
class ExportEvent:
    """One record as the readable views show it."""

    sequence: int
    time: int
    event: str
    reason: str
    key: str | None
    in_range: bool
    verified: bool
    batch_index: int

    @property
    def time_iso(self) -> str:
        return _iso(self.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "time": self.time,
            "time_utc": self.time_iso,
            "event": self.event,
            "reason": self.reason,
            "key": self.key,
            "verified": self.verified,
        }


@dataclass(frozen=True, slots=True)
class AuditExport:
    """An export, ready to render (:func:`render`); ``document`` is the JSON form."""

    document: dict[str, Any]
    events: tuple[ExportEvent, ...]
    """Every record of the exported batches; ``in_range`` tells which the range holds."""
    verification: VerificationResult
    message_id: str

    @property
    def in_range(self) -> list[ExportEvent]:
        return [event for event in self.events if event.in_range]


def export(
    store: Store,
    device_id: bytes,
    *,
    time_from: int,
    time_to: int,
    reveal_reason: str | None,
    auditor: str,
    now: float,
    topics: Topics,
    fmt: ExportFormat = "json",
) -> AuditExport:
    """Export the device's records with device time in [time_from, time_to], verified.

    Staff key ids are shown only with a ``reveal_reason``; otherwise pseudonymised (see
    the module docstring). The export is recorded in the outbox for the ``audit`` topic
    before this returns.
    """
    if time_to < time_from:
        msg = f"the range ends ({_iso(time_to)}) before it starts ({_iso(time_from)})"
        raise AuditError(msg)
    if reveal_reason is not None and not reveal_reason.strip():
        msg = "revealing key ids needs a reason"
        raise AuditError(msg)
    if not auditor.strip():
        msg = "the auditor must be named"
        raise AuditError(msg)
    if fmt not in FORMATS:
        msg = f"unknown format {fmt!r}"
        raise AuditError(msg)
    device = store.get_device(device_id)
    if device is None:
        msg = f"unknown device {format_device_id(device_id)}"
        raise AuditError(msg)

    selected = _select_batches(store.batches_for(device_id), time_from, time_to)
    revealed = reveal_reason is not None
    device_hex = format_device_id(device_id)
    range_doc: dict[str, Any] = {
        "from": _iso(time_from),
        "to": _iso(time_to),
        "from_unix": time_from,
        "to_unix": time_to,
    }
    document: dict[str, Any] = {
        "format": FORMAT,
        "device_id": device_hex,
        "device_key": device.signing_key.hex(),
        "range": range_doc,
        "exported_at": _iso(int(now)),
        "auditor": auditor,
        "revealed": revealed,
        "reason": reveal_reason,
        "batches": [
            {
                "start_sequence": batch.start_sequence,
                "start_head": batch.start_head.hex(),
                "records": batch.raw_records.hex(),
                "checkpoint": batch.checkpoint.hex(),
            }
            for batch in selected
        ],
    }
    result, verified_batches = _verify(document, check_events=False)
    namer = _KeyNamer(revealed=revealed)
    events = tuple(
        ExportEvent(
            sequence=record.sequence,
            time=record.time,
            event=record.event.name,
            reason=record.reason.name,
            key=namer.name(record.key_id),
            in_range=time_from <= record.time <= time_to,
            verified=index in verified_batches,
            batch_index=index,
        )
        for index, batch in enumerate(selected)
        for record in _lenient_records(batch.raw_records)
    )
    document["events"] = [event.to_dict() for event in events if event.in_range]
    document["verification"] = result.to_dict()

    message_id = f"{topics.gateway_id}:audit:{uuid.uuid4()}"
    payload = {
        "message_id": message_id,
        "gateway": topics.gateway_id,
        "device_id": device_hex,
        "auditor": auditor,
        "range": range_doc,
        "format": fmt,
        "revealed": revealed,
        "reason": reveal_reason,
        "records": len(document["events"]),
        "time": now,
    }
    store.enqueue(
        [
            OutboxMessage(
                topic=topics.audit,
                payload=json.dumps(payload, separators=(",", ":")).encode(),
                kind="audit",
            )
        ],
        now=now,
    )
    return AuditExport(document=document, events=events, verification=result, message_id=message_id)


def _select_batches(batches: Sequence[BatchRow], time_from: int, time_to: int) -> list[BatchRow]:
    """The batches from the first to the last holding a record in the range."""
    hits = [
        index
        for index, batch in enumerate(batches)
        if any(time_from <= t <= time_to for t in _record_times(batch.raw_records))
    ]
    if not hits:
        return []
    return list(batches[hits[0] : hits[-1] + 1])


def _record_times(raw: bytes) -> list[int]:
    # The time field is bytes 4..8 of a record; read directly so that an undecodable
    # record still counts for the selection (and then fails verification, visibly).
    return [
        int.from_bytes(raw[offset + 4 : offset + 8], "big")
        for offset in range(0, len(raw) - RECORD_SIZE + 1, RECORD_SIZE)
    ]


def _lenient_records(raw: bytes) -> list[LogRecord]:
    records: list[LogRecord] = []
    for offset in range(0, len(raw) - RECORD_SIZE + 1, RECORD_SIZE):
        try:
            records.append(decode_record(raw[offset : offset + RECORD_SIZE]))
        except ProtocolError:
            continue  # verification reports it; the readable views cannot show it
    return records


class _KeyNamer:
    """Key ids as the readable views show them: real, or an HMAC pseudonym."""

    def __init__(self, *, revealed: bool) -> None:
        self._revealed = revealed
        # Drawn per export and never stored: pseudonyms cannot be linked across exports.
        self._salt = secrets.token_bytes(32)

    def name(self, key_id: int) -> str | None:
        if key_id == 0:
            return None
        if self._revealed:
            return str(key_id)
        digest = hmac.new(self._salt, key_id.to_bytes(4, "big"), hashlib.sha256).hexdigest()
        return digest[:PSEUDONYM_HEX]


# ----------------------------------------------------------------------- verification


def verify_export(document: Mapping[str, Any]) -> VerificationResult:
    """Verify an export document (the JSON form) against the key it carries.

    Which key that is, is the caller's to check (:func:`verify_file` does).
    """
    result, _ = _verify(document, check_events=True)
    return result


def verify_file(path: Path, device_key: bytes | None) -> VerificationResult:
    """Re-verify a JSON export offline.

    ``device_key`` (32 raw bytes) is the key the auditor trusts; an export carrying
    another one is refused with ``KEY_MISMATCH``. Without it only the export's internal
    consistency is checked, which a forger can produce with a key of their own.
    """
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return _failed(None, None, MALFORMED, f"cannot read {path}: {exc}")
    except RecursionError:  # JSON nested deeper than the parser's recursion limit
        return _failed(None, None, MALFORMED, f"cannot read {path}: nested too deeply")
    if not isinstance(document, dict):
        return _failed(None, None, MALFORMED, "the export is not a JSON object")
    if device_key is not None:
        carried = document.get("device_key")
        if not isinstance(carried, str) or carried.lower() != device_key.hex():
            msg = "the export carries another device key than the one given (forged?)"
            return _failed(None, None, KEY_MISMATCH, msg)
    return verify_export(document)


def _failed(batch: int | None, sequence: int | None, code: str, reason: str) -> VerificationResult:
    return VerificationResult(
        intact=False,
        records=0,
        failure=VerificationFailure(batch_index=batch, sequence=sequence, code=code, reason=reason),
    )


class _Malformed(Exception):
    def __init__(self, reason: str, batch: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.batch = batch


def _verify(
    document: Mapping[str, Any], *, check_events: bool
) -> tuple[VerificationResult, set[int]]:
    """The result, and the indices of the batches that verified and join the chain."""
    try:
        if document.get("format") != FORMAT:
            msg = f"not a {FORMAT} export"
            raise _Malformed(msg)
        device_id = _hex_field(document, "device_id", 8)
        device_key = load_signing_public(_hex_field(document, "device_key", 32))
        batches_doc = document.get("batches")
        if not isinstance(batches_doc, list):
            msg = "batches must be a list"
            raise _Malformed(msg)
        batches = [_parse_batch(item, index) for index, item in enumerate(batches_doc)]
    except _Malformed as exc:
        return _failed(exc.batch, None, MALFORMED, exc.reason), set()
    except ProtocolError as exc:
        return _failed(None, None, MALFORMED, exc.message), set()

    good: set[int] = set()
    failure: VerificationFailure | None = None
    gaps: list[GapInfo] = []
    # Head before each verified sequence, to check that the next batch joins.
    heads: dict[int, bytes] = {}
    next_sequence: int | None = None
    verified: dict[int, LogRecord] = {}
    for index, batch in enumerate(batches):
        problem = _join(batch, heads, next_sequence, index)
        if isinstance(problem, VerificationFailure):
            failure = failure or problem
            continue
        if problem is not None:
            gaps.append(problem)
        try:
            result = verify_batch(
                batch,
                device_id=device_id,
                device_key=device_key,
                state=ChainState(batch.start_sequence, batch.start_head),
            )
        except LogVerificationError as exc:
            failure = failure or VerificationFailure(
                batch_index=index, sequence=exc.sequence, code=exc.code.name, reason=exc.message
            )
            continue
        good.add(index)
        head = batch.start_head
        for record, raw in zip(result.records, _chunks(batch), strict=True):
            heads[record.sequence] = head
            head = chain_next(head, raw)
            verified[record.sequence] = record
        heads[result.state.next_sequence] = result.state.head
        next_sequence = max(next_sequence or 0, result.state.next_sequence)
    if failure is None and check_events:
        failure = _check_events(document, verified)
    intact = failure is None and not gaps
    return VerificationResult(intact, len(verified), gaps, failure), good


def _join(
    batch: LogBatch, heads: Mapping[int, bytes], next_sequence: int | None, index: int
) -> VerificationFailure | GapInfo | None:
    """Does ``batch`` continue what was verified before it? A gap, a failure or None."""
    if next_sequence is None:
        return None
    start = batch.start_sequence
    if start > next_sequence:
        return GapInfo(first_missing=next_sequence, count=start - next_sequence)
    known = heads.get(start)
    if known is None:
        msg = f"batch starts at {start}, before the records verified so far"
        return VerificationFailure(index, start, "LOG_REORDER", msg)
    if known != batch.start_head:
        msg = f"batch starts at {start} from another head than the batch before (forked)"
        return VerificationFailure(index, start, FORKED, msg)
    return None


def _check_events(
    document: Mapping[str, Any], verified: Mapping[int, LogRecord]
) -> VerificationFailure | None:
    """The readable events must be what the verified raw records say."""
    events = document.get("events", [])
    if not isinstance(events, list):
        return VerificationFailure(None, None, MALFORMED, "events must be a list")
    revealed = document.get("revealed") is True
    for item in events:
        if not isinstance(item, dict):
            return VerificationFailure(None, None, MALFORMED, "an event is not an object")
        sequence = item.get("sequence")
        record = verified.get(sequence) if isinstance(sequence, int) else None
        if record is None:
            msg = f"event {sequence!r} is listed but no verified record has that sequence"
            return VerificationFailure(None, None, EVENTS_MISMATCH, msg)
        expected = {"time": record.time, "event": record.event.name, "reason": record.reason.name}
        if revealed:
            expected["key"] = str(record.key_id) if record.key_id else None
        shown = {name: item.get(name) for name in expected}
        if shown != expected:
            msg = f"event {sequence} reads {shown}, but the signed record says {expected}"
            return VerificationFailure(None, record.sequence, EVENTS_MISMATCH, msg)
    return None


def _chunks(batch: LogBatch) -> list[bytes]:
    return [encode_record(record) for record in batch.records]


def _parse_batch(item: object, index: int) -> LogBatch:
    if not isinstance(item, dict):
        msg = "a batch is not an object"
        raise _Malformed(msg, index)
    start = item.get("start_sequence")
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        msg = "start_sequence must be a non-negative integer"
        raise _Malformed(msg, index)
    try:
        start_head = _hex_field(item, "start_head", HEAD_SIZE)
        raw = _hex_field(item, "records", None)
        if len(raw) % RECORD_SIZE:
            msg = f"records hold {len(raw)} bytes, not a multiple of {RECORD_SIZE}"
            raise _Malformed(msg, index)
        records = tuple(
            decode_record(raw[offset : offset + RECORD_SIZE])
            for offset in range(0, len(raw), RECORD_SIZE)
        )
        checkpoint = decode_checkpoint(_hex_field(item, "checkpoint", None))
        return LogBatch(
            start_sequence=start, start_head=start_head, records=records, checkpoint=checkpoint
        )
    except _Malformed as exc:
        raise _Malformed(exc.reason, index) from exc
    except ProtocolError as exc:
        raise _Malformed(exc.message, index) from exc


def _hex_field(item: Mapping[str, Any], name: str, size: int | None) -> bytes:
    value = item.get(name)
    if not isinstance(value, str):
        msg = f"{name} must be a hex string"
        raise _Malformed(msg)
    try:
        raw = bytes.fromhex(value)
    except ValueError as exc:
        msg = f"{name} is not hex"
        raise _Malformed(msg) from exc
    if size is not None and len(raw) != size:
        msg = f"{name} must be {size} bytes, got {len(raw)}"
        raise _Malformed(msg)
    return raw


# ------------------------------------------------------------------------ rendering


def render(export_: AuditExport, fmt: ExportFormat) -> str:
    """The export as ``json`` (canonical, re-verifiable), ``csv`` or ``html``."""
    if fmt == "json":
        return json.dumps(export_.document, indent=2) + "\n"
    if fmt == "csv":
        return _csv(export_)
    return _html(export_)


def _csv(export_: AuditExport) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["sequence", "time", "event", "reason", "key", "verified"])
    for event in export_.in_range:
        writer.writerow(
            [
                event.sequence,
                event.time_iso,
                event.event,
                event.reason,
                event.key or "",
                "yes" if event.verified else "no",
            ]
        )
    return out.getvalue()


_DOOR: Final = frozenset(
    {
        EventType.DOOR_OPENED,
        EventType.DOOR_CLOSED,
        EventType.LOCKED,
        EventType.UNLOCKED,
        EventType.KEY_SAFE_OPENED,
        EventType.KEY_SAFE_CLOSED,
        EventType.MEDICINE_CABINET_OPENED,
        EventType.MEDICINE_CABINET_CLOSED,
    }
)
_ALARM: Final = frozenset(
    {
        EventType.JAMMED,
        EventType.FAILED_TO_OPEN,
        EventType.TAMPER,
        EventType.BATTERY_LOW,
        EventType.LOG_OVERFLOW,
        EventType.TIME_SET_REFUSED,
        EventType.UPDATE_REFUSED,
    }
)

# kind -> (label, colour)
_KINDS: Final = {
    "granted": ("Access granted", "#1a7f37"),
    "denied": ("Access denied", "#c62828"),
    "door": ("Door / lock / cabinet", "#1f5fbf"),
    "alarm": ("Alarm", "#d97706"),
    "other": ("Other", "#6b7280"),
}


def _kind(event: str) -> str:
    if event == EventType.ACCESS_GRANTED.name:
        return "granted"
    if event == EventType.ACCESS_DENIED.name:
        return "denied"
    if event in {e.name for e in _DOOR}:
        return "door"
    if event in {e.name for e in _ALARM}:
        return "alarm"
    return "other"


def _marker(kind: str, x: float, y: float) -> str:
    colour = _KINDS[kind][1]
    if kind == "granted":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}"/>'
    if kind == "denied":
        return (
            f'<path d="M{x - 5:.1f},{y - 5:.1f} L{x + 5:.1f},{y + 5:.1f} '
            f'M{x - 5:.1f},{y + 5:.1f} L{x + 5:.1f},{y - 5:.1f}" '
            f'stroke="{colour}" stroke-width="2.5"/>'
        )
    if kind == "door":
        return f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{colour}"/>'
    if kind == "alarm":
        return (
            f'<polygon points="{x:.1f},{y - 6:.1f} {x + 6:.1f},{y + 5:.1f} {x - 6:.1f},{y + 5:.1f}"'
            f' fill="{colour}"/>'
        )
    return (
        f'<polygon points="{x:.1f},{y - 5:.1f} {x + 5:.1f},{y:.1f} {x:.1f},{y + 5:.1f} '
        f'{x - 5:.1f},{y:.1f}" fill="{colour}"/>'
    )


_SVG_WIDTH: Final = 1000
_LABEL_WIDTH: Final = 110
_ROW: Final = 36
_TOP: Final = 28
_LEGEND: Final = 36
_MAX_EMPTY_DAYS: Final = 62
"""Up to this many days in the range, days without records get a row too."""

# Each kind has its own lane in a day's row, so that events seconds apart (a key, then
# the door) do not hide each other.
_LANE: Final = {"granted": -10, "denied": -10, "door": 0, "alarm": 10, "other": 10}


def _days(events: Sequence[ExportEvent], time_from: int, time_to: int) -> list[str]:
    with_records = {event.time_iso[:10] for event in events}
    first, last = time_from // DAY_SECONDS, time_to // DAY_SECONDS
    if last - first + 1 > _MAX_EMPTY_DAYS:
        return sorted(with_records)
    return [_iso(day * DAY_SECONDS)[:10] for day in range(first, last + 1)]


def _timeline(events: Sequence[ExportEvent], time_from: int, time_to: int) -> str:
    esc = html.escape
    days = _days(events, time_from, time_to)
    with_records = {event.time_iso[:10] for event in events}
    plot = _SVG_WIDTH - _LABEL_WIDTH - 20
    rows_height = _ROW * max(len(days), 1)
    height = _TOP + rows_height + _LEGEND
    parts = [
        (
            f'<svg width="{_SVG_WIDTH}" height="{height}" viewBox="0 0 {_SVG_WIDTH} {height}" '
            'role="img" aria-label="Timeline of the events, one row per day (UTC)">'
        )
    ]
    row_of = {day: index for index, day in enumerate(days)}
    for day, index in row_of.items():
        y = _TOP + _ROW * index + _ROW / 2
        if index % 2 == 0:
            parts.append(
                f'<rect x="{_LABEL_WIDTH}" y="{_TOP + _ROW * index}" width="{plot}" '
                f'height="{_ROW}" fill="#f3f4f6"/>'
            )
        empty = day not in with_records
        parts.append(
            f'<text x="{_LABEL_WIDTH - 10}" y="{y + 4:.1f}" font-size="12" text-anchor="end" '
            f'fill="{"#9ca3af" if empty else "#111827"}">{esc(day)}</text>'
        )
        if empty:
            parts.append(
                f'<text x="{_LABEL_WIDTH + 8}" y="{y + 4:.1f}" font-size="12" '
                'font-style="italic" fill="#6b7280">no records</text>'
            )
    for hour in range(0, 25, 3):
        x = _LABEL_WIDTH + plot * hour / 24
        parts.append(
            f'<line x1="{x:.1f}" y1="{_TOP - 6}" x2="{x:.1f}" y2="{_TOP + rows_height}" '
            'stroke="#d0d4da" stroke-width="1"/>'
            f'<text x="{x:.1f}" y="{_TOP - 10}" font-size="11" text-anchor="middle" '
            f'fill="#374151">{hour:02d}:00</text>'
        )
    if not days:
        parts.append(
            f'<text x="{_LABEL_WIDTH}" y="{_TOP + 20}" font-size="13" fill="#374151">'
            "No records in the range.</text>"
        )
    for event in events:
        row = row_of.get(event.time_iso[:10])
        if row is None:
            continue
        kind = _kind(event.event)
        x = _LABEL_WIDTH + plot * (event.time % DAY_SECONDS) / DAY_SECONDS
        y = _TOP + _ROW * row + _ROW / 2 + _LANE[kind]
        title = (
            f"#{event.sequence} {event.time_iso} {event.event} ({event.reason})"
            + (f" key {event.key}" if event.key else "")
            + ("" if event.verified else " NOT VERIFIED")
        )
        parts.append(f"<g><title>{esc(title)}</title>{_marker(kind, x, y)}</g>")
    legend_y = _TOP + rows_height + 24
    x = float(_LABEL_WIDTH)
    for kind, (label, _colour) in _KINDS.items():
        parts.append(_marker(kind, x + 6, legend_y - 4))
        parts.append(
            f'<text x="{x + 16:.1f}" y="{legend_y}" font-size="12" fill="#111827">'
            f"{esc(label)}</text>"
        )
        x += 170  # fixed slots: estimating text widths without a font is guesswork
    parts.append("</svg>")
    return "".join(parts)


_CSS: Final = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px;
  color: #111827; }
h1 { font-size: 20px; margin: 0 0 12px; }
h2 { font-size: 16px; margin: 24px 0 8px; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; }
dt { font-weight: 600; }
dd { margin: 0; }
.ok { color: #1a7f37; font-weight: 600; }
.bad { color: #b91c1c; font-weight: 600; }
.note { color: #4b5563; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d1d5db; padding: 3px 8px; text-align: left; }
th { background: #f3f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.unverified td { background: #fee2e2; }
tr.gap td { background: #fef3c7; color: #92400e; font-weight: 600; text-align: center; }
"""


def _html(export_: AuditExport) -> str:
    esc = html.escape
    doc = export_.document
    result = export_.verification
    if result.intact:
        verdict = (
            f'<span class="ok">Verified: all {result.records} records are intact and '
            "continuous; the device's signature covers every batch.</span>"
        )
    else:
        verdict = f'<span class="bad">{esc(_verdict_words(result))}</span>'
    if doc["revealed"]:
        reveal = f"Staff key ids are shown (revealed). Reason given: {esc(str(doc['reason']))}"
    else:
        reveal = "Staff key ids are pseudonymised (valid within this export only)."
    in_range = export_.in_range
    rows = _table_rows(in_range, result.gaps)
    header = (
        f"<dt>Device</dt><dd>{esc(doc['device_id'])}</dd>"
        f"<dt>Range (UTC)</dt><dd>{esc(doc['range']['from'])} to {esc(doc['range']['to'])}</dd>"
        f"<dt>Records in range</dt><dd>{len(in_range)}</dd>"
        f"<dt>Verification</dt><dd>{verdict}</dd>"
        f"<dt>Key ids</dt><dd>{esc(reveal)}</dd>"
        f"<dt>Exported</dt><dd>{esc(doc['exported_at'])} by {esc(doc['auditor'])}</dd>"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>Audit export {esc(doc['device_id'])}</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>Door log audit: device {esc(doc['device_id'])}</h1>"
        f"<dl>{header}</dl>"
        '<p class="note">Times are the device clock in UTC. This page is a readable view; '
        "verify the JSON export of the same range offline with "
        "<code>lockgw audit verify</code>. It contains personal data.</p>"
        "<h2>Timeline</h2>"
        f"{_timeline(in_range, doc['range']['from_unix'], doc['range']['to_unix'])}"
        f"{_gap_note(result)}"
        "<h2>Records</h2>"
        "<table><thead><tr><th>Sequence</th><th>Time (UTC)</th><th>Event</th><th>Reason</th>"
        f"<th>Key</th><th>Verified</th></tr></thead><tbody>{rows}</tbody></table>"
        "</body></html>\n"
    )


def _gap_note(result: VerificationResult) -> str:
    if not result.gaps:
        return ""
    listed = "; ".join(_gap_words(gap) for gap in result.gaps)
    return (
        f'<p class="bad">Missing from the stored log: {html.escape(listed)}. Their times are '
        "unknown: a day shown without records may have had events that were lost.</p>"
    )


def _table_rows(events: Sequence[ExportEvent], gaps: Sequence[GapInfo]) -> str:
    """The records, with a row for every gap where it falls: a loss is never hidden."""
    esc = html.escape
    pending = sorted(gaps, key=lambda gap: gap.first_missing)
    rows: list[str] = []

    def gap_row(gap: GapInfo) -> str:
        return f'<tr class="gap"><td colspan="6">{esc(_gap_words(gap))} in the stored log</td></tr>'

    for event in sorted(events, key=lambda item: item.sequence):
        while pending and pending[0].first_missing < event.sequence:
            rows.append(gap_row(pending.pop(0)))
        rows.append(
            f'<tr class="{"" if event.verified else "unverified"}">'
            f'<td class="num">{event.sequence}</td><td>{esc(event.time_iso)}</td>'
            f"<td>{esc(event.event)}</td><td>{esc(event.reason)}</td>"
            f"<td>{esc(event.key or '')}</td><td>{'yes' if event.verified else 'NO'}</td></tr>"
        )
    rows.extend(gap_row(gap) for gap in pending)
    return "".join(rows)


def _verdict_words(result: VerificationResult) -> str:
    if result.failure is not None:
        failure = result.failure
        record = "" if failure.sequence is None else f"record {failure.sequence}: "
        return f"NOT VERIFIED. {record}{failure.code}: {failure.reason}"
    gaps = "; ".join(_gap_words(gap) for gap in result.gaps)
    return f"Incomplete: {result.records} records verified, but {gaps}."


def _iso(unix: int) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str, *, end_of_day: bool = False) -> int:
    """Unix seconds from digits or ISO 8601; a naive time is UTC.

    A bare date is midnight, or with ``end_of_day`` the day's last second (for the end
    of a range, so that ``--to 2026-11-20`` includes that day).
    """
    stripped = text.strip()
    if stripped.isdigit():
        return int(stripped)
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError as exc:
        msg = f"{text!r} is neither unix seconds nor an ISO 8601 time"
        raise AuditError(msg) from exc
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    seconds = int(moment.timestamp())
    if end_of_day and len(stripped) == 10:
        seconds += 86400 - 1
    return seconds
