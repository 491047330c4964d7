"""The gateway's durable store: devices, verified event logs, the MQTT outbox, updates.

lockgw promises that nothing is lost. An event leaves a device's log only after
:meth:`Store.commit_batch` has returned (the batch, its events, the advanced chain
cursor and the outbox messages that publish them are one transaction), and leaves the
outbox only after the broker acknowledged it (:meth:`Store.outbox_done`). A restart
resumes from what is stored: the chain cursor of every device, the outbox in FIFO order,
and every update whose propagation is unfinished.

Durability rests on SQLite in WAL mode with ``synchronous=FULL``: a transaction that
returned from COMMIT has been fsynced and survives a crash of the process or a loss of
power. Every write method is exactly one ``BEGIN IMMEDIATE`` ... ``COMMIT`` transaction
and rolls back completely on any error.

Threading: a :class:`Store` owns one connection, opened with
``check_same_thread=False`` so that the daemon may create it on one thread and hand it to
its dedicated database worker thread. It is meant to be used by one thread at a time; a
lock serialises its transactions and :meth:`Store.close` all the same, so that closing
from another thread waits for the transaction under way instead of pulling the connection
from under it.

Schema changes are numbered migrations (:data:`MIGRATIONS`), applied in order at open,
each in its own transaction together with the bump of ``PRAGMA user_version``. A
database written by a newer lockgw (a higher ``user_version``) is refused rather than
misread. Tables are ``STRICT``, so SQLite itself refuses a value of the wrong type; that
needs SQLite 3.37 or newer, which :meth:`Store.open` checks.

Outbox messages refer to the events they publish through the ``outbox_events`` link
table rather than a JSON column: the foreign key then guarantees that an event still
waiting in the outbox can never be pruned, and "is any message still carrying this
event?" is an indexed lookup. An event counts as published when the last outbox message
carrying it has been acknowledged.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final, Protocol, Self

from protocols.logrecords import DEVICE_ID_SIZE, HEAD_SIZE, RECORD_SIZE

if TYPE_CHECKING:
    import os
    from types import TracebackType

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "BatchRow",
    "CommitResult",
    "DeviceRecord",
    "EventInput",
    "EventRow",
    "NewEvent",
    "OutboxMessage",
    "OutboxRow",
    "PropagationRow",
    "PropagationState",
    "Store",
    "StoreError",
    "UpdateRecord",
]

MIN_SQLITE_VERSION: Final = (3, 37, 0)
"""STRICT tables appeared in SQLite 3.37."""

APPLICATION_ID: Final = 0x6C6B6777
"""``PRAGMA application_id`` of a lockgw database ("lkgw"), so a foreign file is refused."""

KEY_SIZE: Final = 32
"""Ed25519 and X25519 public keys are 32 bytes."""

_MIGRATION_1: Final = """
CREATE TABLE devices (
    device_id           BLOB NOT NULL PRIMARY KEY CHECK (length(device_id) = 8),
    kind                INTEGER NOT NULL,
    address             TEXT NOT NULL,
    signing_key         BLOB NOT NULL CHECK (length(signing_key) = 32),
    noise_key           BLOB NOT NULL CHECK (length(noise_key) = 32),
    site_id             INTEGER NOT NULL,
    paired_at           INTEGER NOT NULL,
    decommissioned_at   INTEGER,
    access_version      INTEGER NOT NULL DEFAULT 0,
    revocation_version  INTEGER NOT NULL DEFAULT 0,
    -- The verified log chain cursor: the next sequence expected and the head after the
    -- last verified record. It only ever moves forward (commit_batch).
    chain_next_sequence INTEGER NOT NULL DEFAULT 0 CHECK (chain_next_sequence >= 0),
    chain_head          BLOB NOT NULL CHECK (length(chain_head) = 32),
    battery             INTEGER,
    alarms              INTEGER NOT NULL DEFAULT 0,
    door                INTEGER NOT NULL DEFAULT 0,
    lock                INTEGER NOT NULL DEFAULT 0,
    clock_drift_ms      INTEGER,
    last_heard          REAL,
    reachable           INTEGER NOT NULL DEFAULT 0 CHECK (reachable IN (0, 1)),
    backoff_until       REAL,
    failures            INTEGER NOT NULL DEFAULT 0 CHECK (failures >= 0)
) STRICT;

-- Every verified batch as received, so that consumers and auditors can re-verify the
-- records against the signed checkpoint.
CREATE TABLE batches (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id      BLOB NOT NULL REFERENCES devices (device_id),
    start_sequence INTEGER NOT NULL CHECK (start_sequence >= 0),
    start_head     BLOB NOT NULL CHECK (length(start_head) = 32),
    record_count   INTEGER NOT NULL CHECK (record_count >= 0),
    checkpoint     BLOB NOT NULL,
    raw_records    BLOB NOT NULL CHECK (length(raw_records) = 30 * record_count),
    received_at    REAL NOT NULL
) STRICT;
CREATE INDEX batches_device_sequence ON batches (device_id, start_sequence);

CREATE TABLE events (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id    BLOB NOT NULL REFERENCES devices (device_id),
    sequence     INTEGER NOT NULL CHECK (sequence >= 0),
    time         INTEGER NOT NULL,
    event        INTEGER NOT NULL,
    reason       INTEGER NOT NULL,
    key_id       INTEGER NOT NULL,
    payload      BLOB NOT NULL,
    batch_id     INTEGER NOT NULL REFERENCES batches (id),
    received_at  REAL NOT NULL,
    published_at REAL,
    UNIQUE (device_id, sequence)
) STRICT;
CREATE INDEX events_device_time ON events (device_id, time);
CREATE INDEX events_batch ON events (batch_id);
CREATE INDEX events_published ON events (published_at) WHERE published_at IS NOT NULL;

-- AUTOINCREMENT: an id is never reused, even after its row is deleted, because
-- consumers use it to de-duplicate redelivered messages.
CREATE TABLE outbox (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    topic      TEXT NOT NULL CHECK (topic <> ''),
    payload    BLOB NOT NULL,
    qos        INTEGER NOT NULL CHECK (qos IN (0, 1, 2)),
    retain     INTEGER NOT NULL CHECK (retain IN (0, 1)),
    created_at REAL NOT NULL,
    kind       TEXT NOT NULL CHECK (kind <> '')
) STRICT;

-- Which events an outbox message publishes. No ON DELETE on event_id: an event that a
-- message still carries cannot be deleted.
CREATE TABLE outbox_events (
    outbox_id INTEGER NOT NULL REFERENCES outbox (id) ON DELETE CASCADE,
    event_id  INTEGER NOT NULL REFERENCES events (id),
    PRIMARY KEY (outbox_id, event_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX outbox_events_event ON outbox_events (event_id);

CREATE TABLE updates (
    update_id  TEXT NOT NULL PRIMARY KEY CHECK (update_id <> ''),
    kind       INTEGER NOT NULL,
    target     TEXT NOT NULL,
    version    INTEGER NOT NULL,
    priority   INTEGER NOT NULL,
    signed     BLOB NOT NULL,
    created_at REAL NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;

CREATE TABLE propagation (
    update_id  TEXT NOT NULL REFERENCES updates (update_id) ON DELETE CASCADE,
    device_id  BLOB NOT NULL REFERENCES devices (device_id),
    state      TEXT NOT NULL
               CHECK (state IN ('pending', 'applied', 'failed', 'unreachable')),
    error_code INTEGER,
    attempts   INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    updated_at REAL NOT NULL,
    PRIMARY KEY (update_id, device_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX propagation_device ON propagation (device_id, state);

CREATE TABLE kv (
    key   TEXT NOT NULL PRIMARY KEY,
    value BLOB NOT NULL
) STRICT;
"""

_MIGRATION_2: Final = """
-- The jti of every signed registry command accepted, until the command has expired (plus
-- the clock skew allowed), so that a replayed command is refused across restarts too.
CREATE TABLE seen_commands (
    jti        TEXT NOT NULL PRIMARY KEY CHECK (jti <> ''),
    expires_at REAL NOT NULL
) STRICT;
CREATE INDEX seen_commands_expiry ON seen_commands (expires_at);
"""

_MIGRATION_3: Final = """
-- Waiting retained messages by topic: a newer one supersedes them (see _insert_outbox).
CREATE INDEX outbox_retained_topic ON outbox (topic) WHERE retain = 1;
"""

MIGRATIONS: Final[tuple[str, ...]] = (_MIGRATION_1, _MIGRATION_2, _MIGRATION_3)
"""Migration scripts; ``MIGRATIONS[n]`` takes the schema from version n to n + 1.

Append only: a released step is never edited, because databases in the field have run
it already.
"""

SCHEMA_VERSION: Final = len(MIGRATIONS)
"""The schema version this code writes and understands."""

_UNFINISHED_STATES: Final = ("pending", "unreachable")


class StoreError(Exception):
    """The store refused a call (bad argument, stale batch, ...) or the database failed."""


# ---------------------------------------------------------------------------- row types


class PropagationState(StrEnum):
    """Where an update stands for one device."""

    PENDING = "pending"
    APPLIED = "applied"
    FAILED = "failed"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    """A paired device, its verified log cursor and its last known status.

    ``chain_next_sequence`` and ``chain_head`` are the verifier's state after the last
    stored record; for a new device, the genesis state (sequence 0, genesis head).
    ``paired_at`` and ``decommissioned_at`` are unix seconds, ``last_heard`` and
    ``backoff_until`` unix time as floats.
    """

    device_id: bytes
    kind: int
    address: str
    signing_key: bytes
    noise_key: bytes
    site_id: int
    paired_at: int
    chain_next_sequence: int
    chain_head: bytes
    decommissioned_at: int | None = None
    access_version: int = 0
    revocation_version: int = 0
    battery: int | None = None
    alarms: int = 0
    door: int = 0
    lock: int = 0
    clock_drift_ms: int | None = None
    last_heard: float | None = None
    reachable: bool = False
    backoff_until: float | None = None
    failures: int = 0


class EventInput(Protocol):
    """What :meth:`Store.commit_batch` needs of a record; ``LogRecord`` satisfies it."""

    @property
    def sequence(self) -> int:
        """Per-device sequence, from 0."""

    @property
    def time(self) -> int:
        """Device clock, unix seconds."""

    @property
    def event(self) -> int:
        """Event type (``EventType``)."""

    @property
    def reason(self) -> int:
        """Reason (``Reason``)."""

    @property
    def key_id(self) -> int:
        """Staff key involved, 0 for none."""

    @property
    def payload(self) -> bytes:
        """Event-specific bytes."""


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A plain :class:`EventInput`, for callers that hold no ``LogRecord``."""

    sequence: int
    time: int
    event: int
    reason: int
    key_id: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class EventRow:
    """A stored event. ``published_at`` is None until every message carrying it is acked."""

    id: int
    device_id: bytes
    sequence: int
    time: int
    event: int
    reason: int
    key_id: int
    payload: bytes
    batch_id: int
    received_at: float
    published_at: float | None


@dataclass(frozen=True, slots=True)
class BatchRow:
    """A stored batch: enough to re-verify its records against the signed checkpoint.

    ``raw_records`` is the concatenation of the ``record_count`` encoded records and
    ``checkpoint`` the encoded checkpoint, both as received.
    """

    id: int
    device_id: bytes
    start_sequence: int
    start_head: bytes
    record_count: int
    checkpoint: bytes
    raw_records: bytes
    received_at: float


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message to publish.

    ``event_sequences`` names the events of the batch's device that this message
    publishes; only :meth:`Store.commit_batch` accepts them (it knows the device and
    resolves them to event ids). When the broker acknowledges the message, those events
    are marked published.
    """

    topic: str
    payload: bytes
    kind: str
    qos: int = 1
    retain: bool = False
    event_sequences: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A message waiting in the outbox. ``id`` is never reused: it de-duplicates downstream."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    created_at: float
    kind: str
    event_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What :meth:`Store.commit_batch` stored.

    ``new_events`` records were stored, ``duplicate_events`` were already there and were
    skipped. ``next_sequence`` and ``head`` are the device's chain cursor afterwards.
    """

    batch_id: int
    new_events: int
    duplicate_events: int
    next_sequence: int
    head: bytes
    outbox_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class UpdateRecord:
    """A signed authorisation update from the registry, kept until it has propagated.

    ``signed`` is the encoded signed update as it goes to devices; ``target`` a
    readable description of whom it is for; ``expires_at`` unix seconds.
    """

    update_id: str
    kind: int
    target: str
    version: int
    priority: int
    signed: bytes
    created_at: float
    expires_at: int


@dataclass(frozen=True, slots=True)
class PropagationRow:
    """Where one update stands on one device."""

    update_id: str
    device_id: bytes
    state: PropagationState
    error_code: int | None
    attempts: int
    updated_at: float


# ------------------------------------------------------------------------------ helpers


def _check_device_id(device_id: object) -> bytes:
    if not isinstance(device_id, bytes) or len(device_id) != DEVICE_ID_SIZE:
        msg = f"a device id is {DEVICE_ID_SIZE} bytes, got {device_id!r}"
        raise StoreError(msg)
    return device_id


def _check_int(value: object, what: str, minimum: int = 0) -> int:
    # bool is an int subclass; True as a sequence number is a bug, not a value.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{what} must be an integer >= {minimum}, got {value!r}"
        raise StoreError(msg)
    return value


def _check_bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes):
        msg = f"{what} must be bytes, got {type(value).__name__}"
        raise StoreError(msg)
    return value


def _check_head(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != HEAD_SIZE:
        msg = f"{what} must be {HEAD_SIZE} bytes, got {value!r}"
        raise StoreError(msg)
    return value


def _split_script(script: str) -> list[str]:
    """The statements of ``script``.

    ``Connection.executescript`` would COMMIT first, so a migration could not share a
    transaction with its ``user_version`` bump; running statement by statement can.
    ``sqlite3.complete_statement`` knows about quoted semicolons and triggers.
    """
    statements: list[str] = []
    pending = ""
    for part in script.split(";"):
        pending += part + ";"
        if sqlite3.complete_statement(pending):
            # Skip the empty "statement" after the last semicolon.
            if pending.strip(" \n\t;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \n\t;"):
        msg = f"migration script ends in an incomplete statement: {pending.strip()!r}"
        raise StoreError(msg)
    return statements


def _device(row: Sequence[Any]) -> DeviceRecord:
    return DeviceRecord(
        device_id=row[0],
        kind=row[1],
        address=row[2],
        signing_key=row[3],
        noise_key=row[4],
        site_id=row[5],
        paired_at=row[6],
        decommissioned_at=row[7],
        access_version=row[8],
        revocation_version=row[9],
        chain_next_sequence=row[10],
        chain_head=row[11],
        battery=row[12],
        alarms=row[13],
        door=row[14],
        lock=row[15],
        clock_drift_ms=row[16],
        last_heard=row[17],
        reachable=bool(row[18]),
        backoff_until=row[19],
        failures=row[20],
    )


def _event(row: Sequence[Any]) -> EventRow:
    return EventRow(*row)


def _batch(row: Sequence[Any]) -> BatchRow:
    return BatchRow(*row)


def _update(row: Sequence[Any]) -> UpdateRecord:
    return UpdateRecord(*row)


def _same_update(a: UpdateRecord, b: UpdateRecord) -> bool:
    # created_at is when this gateway received the command, so a redelivery differs there.
    return (a.kind, a.target, a.version, a.priority, a.signed, a.expires_at) == (
        b.kind,
        b.target,
        b.version,
        b.priority,
        b.signed,
        b.expires_at,
    )


def _check_message(message: object) -> OutboxMessage:
    if not isinstance(message, OutboxMessage):
        msg = f"an outbox message must be an OutboxMessage, got {type(message).__name__}"
        raise StoreError(msg)
    return message


# -------------------------------------------------------------------------------- store


class Store:
    """The durable store; see the module documentation. Open with :meth:`open`.

    Use from one thread at a time. Every method raises :class:`StoreError` and nothing
    else for a refused call or a database failure.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        """Wrap an open, configured, migrated connection; use :meth:`open` instead."""
        self._conn: sqlite3.Connection | None = connection
        # Held by every transaction and by close(): closing the connection while another
        # thread is inside SQLite with it (a worker whose caller was cancelled) would free
        # what that thread still uses. Reentrant, so a method may call another.
        self._lock = threading.RLock()

    # -------------------------------------------------------------- opening and closing

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, busy_timeout: float = 5.0) -> Store:
        """Open (creating if needed) the database at ``path`` and migrate it to the latest.

        ``busy_timeout`` is how long, in seconds, a call waits for a lock held by another
        connection before it fails. Raises :class:`StoreError` for a SQLite too old, a
        file that is not a lockgw database, or a schema newer than this code knows.
        """
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            need = ".".join(map(str, MIN_SQLITE_VERSION))
            msg = f"SQLite {sqlite3.sqlite_version} is too old, lockgw needs {need} or newer"
            raise StoreError(msg)
        try:
            # isolation_level=None: no implicit BEGIN; every transaction is explicit.
            conn = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            msg = f"cannot open the store at {path}: {exc}"
            raise StoreError(msg) from exc
        try:
            _configure(conn, path)
            _migrate(conn, path)
        except BaseException:
            conn.close()
            raise
        return cls(conn)

    def close(self) -> None:
        """Close the connection once the transaction under way (if any) has ended; closing
        twice is harmless."""
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    msg = f"closing the store failed: {exc}"
                    raise StoreError(msg) from exc

    def __enter__(self) -> Self:
        """The store itself; it is closed on leaving the block."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the store."""
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            msg = "the store is closed"
            raise StoreError(msg)
        return self._conn

    @contextmanager
    def _write(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE, COMMIT, or ROLLBACK on any error.

        IMMEDIATE takes the write lock up front, so a transaction never fails halfway
        because another connection got to write first.
        """
        with self._transaction(what, "BEGIN IMMEDIATE") as conn:
            yield conn

    @contextmanager
    def _read(self, what: str) -> Iterator[sqlite3.Connection]:
        """A read transaction, so that several queries see one snapshot."""
        with self._transaction(what, "BEGIN") as conn:
            yield conn

    @contextmanager
    def _transaction(self, what: str, begin: str) -> Iterator[sqlite3.Connection]:
        """``begin``, then COMMIT, or ROLLBACK on any error; errors as StoreError."""
        with self._lock:
            conn = self._connection()
            try:
                conn.execute(begin)
            except sqlite3.Error as exc:
                msg = f"{what}: cannot begin a transaction: {exc}"
                raise StoreError(msg) from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except (sqlite3.Error, OverflowError) as exc:
                _rollback(conn)
                msg = f"{what}: {exc}"
                raise StoreError(msg) from exc
            except BaseException:
                _rollback(conn)
                raise

    # ------------------------------------------------------------------------ devices

    def upsert_device(self, device: DeviceRecord) -> None:
        """Insert ``device``, or update the pairing fields of a known device.

        For a known device only kind, address, keys, site, ``paired_at`` and
        ``decommissioned_at`` change (re-pairing). Its chain cursor and live status are
        kept: they move only through :meth:`commit_batch`, :meth:`update_device_status`
        and :meth:`record_contact`, so that a stale copy of the record cannot rewind the
        cursor.
        """
        _check_device_id(device.device_id)
        _check_head(device.chain_head, "chain head")
        _check_int(device.chain_next_sequence, "chain next sequence")
        for key, what in ((device.signing_key, "signing key"), (device.noise_key, "noise key")):
            if not isinstance(key, bytes) or len(key) != KEY_SIZE:
                msg = f"{what} must be {KEY_SIZE} bytes, got {key!r}"
                raise StoreError(msg)
        with self._write("upsert_device") as conn:
            conn.execute(
                "INSERT INTO devices (device_id, kind, address, signing_key, noise_key, "
                "site_id, paired_at, decommissioned_at, access_version, revocation_version, "
                "chain_next_sequence, chain_head, battery, alarms, door, lock, clock_drift_ms, "
                "last_heard, reachable, backoff_until, failures) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (device_id) DO UPDATE SET "
                "kind = excluded.kind, address = excluded.address, "
                "signing_key = excluded.signing_key, noise_key = excluded.noise_key, "
                "site_id = excluded.site_id, paired_at = excluded.paired_at, "
                "decommissioned_at = excluded.decommissioned_at",
                (
                    device.device_id,
                    device.kind,
                    device.address,
                    device.signing_key,
                    device.noise_key,
                    device.site_id,
                    device.paired_at,
                    device.decommissioned_at,
                    device.access_version,
                    device.revocation_version,
                    device.chain_next_sequence,
                    device.chain_head,
                    device.battery,
                    device.alarms,
                    device.door,
                    device.lock,
                    device.clock_drift_ms,
                    device.last_heard,
                    int(device.reachable),
                    device.backoff_until,
                    device.failures,
                ),
            )

    def get_device(self, device_id: bytes) -> DeviceRecord | None:
        """The device, or None if it was never paired."""
        _check_device_id(device_id)
        with self._read("get_device") as conn:
            row = conn.execute(
                "SELECT device_id, kind, address, signing_key, noise_key, site_id, paired_at, "
                "decommissioned_at, access_version, revocation_version, chain_next_sequence, "
                "chain_head, battery, alarms, door, lock, clock_drift_ms, last_heard, reachable, "
                "backoff_until, failures "
                "FROM devices WHERE device_id = ?",
                (device_id,),
            ).fetchone()
        return None if row is None else _device(row)

    def list_devices(self, *, include_decommissioned: bool = False) -> list[DeviceRecord]:
        """Every device, ordered by id; decommissioned ones only when asked for."""
        with self._read("list_devices") as conn:
            rows = conn.execute(
                "SELECT device_id, kind, address, signing_key, noise_key, site_id, paired_at, "
                "decommissioned_at, access_version, revocation_version, chain_next_sequence, "
                "chain_head, battery, alarms, door, lock, clock_drift_ms, last_heard, reachable, "
                "backoff_until, failures FROM devices "
                "WHERE ? OR decommissioned_at IS NULL ORDER BY device_id",
                (int(include_decommissioned),),
            ).fetchall()
        return [_device(row) for row in rows]

    def update_device_status(
        self,
        device_id: bytes,
        *,
        battery: int | None = None,
        alarms: int | None = None,
        door: int | None = None,
        lock: int | None = None,
        access_version: int | None = None,
        revocation_version: int | None = None,
        last_heard: float | None = None,
        reachable: bool | None = None,
        clock_drift_ms: int | None = None,
    ) -> None:
        """Record what a device reported; an argument left as None leaves its column."""
        _check_device_id(device_id)
        with self._write("update_device_status") as conn:
            cursor = conn.execute(
                "UPDATE devices SET "
                "battery = coalesce(?, battery), alarms = coalesce(?, alarms), "
                "door = coalesce(?, door), lock = coalesce(?, lock), "
                "access_version = coalesce(?, access_version), "
                "revocation_version = coalesce(?, revocation_version), "
                "last_heard = coalesce(?, last_heard), reachable = coalesce(?, reachable), "
                "clock_drift_ms = coalesce(?, clock_drift_ms) "
                "WHERE device_id = ?",
                (
                    battery,
                    alarms,
                    door,
                    lock,
                    access_version,
                    revocation_version,
                    last_heard,
                    None if reachable is None else int(reachable),
                    clock_drift_ms,
                    device_id,
                ),
            )
            _require_device(cursor.rowcount, device_id)

    def record_contact(
        self, device_id: bytes, *, ok: bool, now: float, backoff_until: float | None
    ) -> None:
        """Record the outcome of a contact attempt.

        Success: reachable, heard at ``now``, failures reset. Failure: unreachable, one
        more failure. Either way ``backoff_until`` (None for no backoff) is stored.
        """
        _check_device_id(device_id)
        with self._write("record_contact") as conn:
            if ok:
                cursor = conn.execute(
                    "UPDATE devices SET reachable = 1, failures = 0, last_heard = ?, "
                    "backoff_until = ? WHERE device_id = ?",
                    (now, backoff_until, device_id),
                )
            else:
                cursor = conn.execute(
                    "UPDATE devices SET reachable = 0, failures = failures + 1, "
                    "backoff_until = ? WHERE device_id = ?",
                    (backoff_until, device_id),
                )
            _require_device(cursor.rowcount, device_id)

    def mark_decommissioned(self, device_id: bytes, now: float) -> None:
        """Mark the device decommissioned at ``now`` (stored as whole unix seconds).

        Its events, batches and propagation history are kept; its unfinished updates no
        longer count as unfinished. Marking it again keeps the first time.
        """
        _check_device_id(device_id)
        with self._write("mark_decommissioned") as conn:
            cursor = conn.execute(
                "UPDATE devices SET decommissioned_at = coalesce(decommissioned_at, ?) "
                "WHERE device_id = ?",
                (int(now), device_id),
            )
            _require_device(cursor.rowcount, device_id)

    # ------------------------------------------------------------------- log pipeline

    def commit_batch(
        self,
        device_id: bytes,
        *,
        start_sequence: int,
        start_head: bytes,
        checkpoint: bytes,
        raw_records: bytes,
        records: Sequence[EventInput],
        new_next_sequence: int,
        new_head: bytes,
        outbox: Sequence[OutboxMessage],
        received_at: float,
    ) -> CommitResult:
        """Store one verified batch, its events, the new cursor and the outbox, atomically.

        ``records`` must run consecutively from ``start_sequence`` and
        ``new_next_sequence`` must be ``start_sequence + len(records)`` (what the verifier
        returns). A record already stored for this device is skipped, never duplicated;
        if its content differs from the stored one the batch is refused, because the
        device then presents a second history.

        The chain cursor only moves forward: a batch ending before the stored cursor is
        refused (a stale batch must not rewind it), and one ending exactly at the cursor
        must end at the same head. A batch starting after the cursor (records lost on
        the device, verified with ``allow_gap``) moves it forward; raising the alarm for
        the gap is the caller's, for instance as an outbox message here.

        Outbox messages may name events of this device by sequence
        (``event_sequences``), new in this batch or stored before; an unknown sequence
        is refused. Once this returns, the batch is durable and the device may be
        acknowledged.
        """
        _check_device_id(device_id)
        _check_int(start_sequence, "start sequence")
        _check_head(start_head, "start head")
        _check_head(new_head, "new head")
        _check_int(new_next_sequence, "new next sequence")
        _check_bytes(checkpoint, "checkpoint")
        _check_bytes(raw_records, "raw_records")
        records = list(records)
        for offset, record in enumerate(records):
            if record.sequence != start_sequence + offset:
                msg = (
                    f"batch records must run consecutively from {start_sequence}: "
                    f"record {offset} has sequence {record.sequence!r}"
                )
                raise StoreError(msg)
        if new_next_sequence != start_sequence + len(records):
            msg = (
                f"new next sequence {new_next_sequence} does not follow a batch of "
                f"{len(records)} records from {start_sequence}"
            )
            raise StoreError(msg)
        if len(raw_records) != RECORD_SIZE * len(records):
            msg = (
                f"raw_records holds {len(raw_records)} bytes, "
                f"{len(records)} records are {RECORD_SIZE * len(records)}"
            )
            raise StoreError(msg)
        messages = [_check_message(message) for message in outbox]

        with self._write("commit_batch") as conn:
            row = conn.execute(
                "SELECT chain_next_sequence, chain_head FROM devices WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            if row is None:
                raise _unknown_device(device_id)
            stored_next, stored_head = row
            _check_cursor(
                device_id,
                stored_next=stored_next,
                stored_head=stored_head,
                start_sequence=start_sequence,
                start_head=start_head,
                new_next_sequence=new_next_sequence,
                new_head=new_head,
            )
            batch_id = _lastrowid(
                conn.execute(
                    "INSERT INTO batches (device_id, start_sequence, start_head, "
                    "record_count, checkpoint, raw_records, received_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        device_id,
                        start_sequence,
                        start_head,
                        len(records),
                        checkpoint,
                        raw_records,
                        received_at,
                    ),
                )
            )
            new = _new_records(conn, device_id, records)
            conn.executemany(
                "INSERT INTO events (device_id, sequence, time, event, reason, key_id, "
                "payload, batch_id, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        device_id,
                        record.sequence,
                        # No int(): a float time would be silently truncated, while
                        # bound as is the STRICT table refuses it. IntEnums bind as ints.
                        record.time,
                        record.event,
                        record.reason,
                        record.key_id,
                        record.payload,
                        batch_id,
                        received_at,
                    )
                    for record in new
                ],
            )
            if new_next_sequence > stored_next:
                conn.execute(
                    "UPDATE devices SET chain_next_sequence = ?, chain_head = ? "
                    "WHERE device_id = ?",
                    (new_next_sequence, new_head, device_id),
                )
            outbox_ids = _insert_outbox(conn, messages, received_at, device_id)
        return CommitResult(
            batch_id=batch_id,
            new_events=len(new),
            duplicate_events=len(records) - len(new),
            next_sequence=max(new_next_sequence, stored_next),
            head=new_head if new_next_sequence > stored_next else stored_head,
            outbox_ids=tuple(outbox_ids),
        )

    # ------------------------------------------------------------------------- outbox

    def enqueue(self, messages: Sequence[OutboxMessage], *, now: float) -> list[int]:
        """Append messages that publish no events (state, alarms, responses); their ids.

        Messages that publish events go in with their batch (:meth:`commit_batch`),
        which resolves ``event_sequences``; here they are refused.
        """
        checked = [_check_message(message) for message in messages]
        for message in checked:
            if message.event_sequences:
                msg = "event_sequences are resolved only by commit_batch, which knows the device"
                raise StoreError(msg)
        with self._write("enqueue") as conn:
            return _insert_outbox(conn, checked, now, device_id=None)

    def outbox_peek(self, limit: int, *, after_id: int = 0) -> list[OutboxRow]:
        """Up to ``limit`` waiting messages with an id above ``after_id``, oldest first."""
        _check_int(limit, "limit")
        _check_int(after_id, "after_id")
        with self._read("outbox_peek") as conn:
            rows = conn.execute(
                "SELECT id, topic, payload, qos, retain, created_at, kind FROM outbox "
                "WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            ).fetchall()
            links: dict[int, list[int]] = {}
            if rows:
                for outbox_id, event_id in conn.execute(
                    "SELECT outbox_id, event_id FROM outbox_events "
                    "WHERE outbox_id BETWEEN ? AND ? ORDER BY outbox_id, event_id",
                    (rows[0][0], rows[-1][0]),
                ):
                    links.setdefault(outbox_id, []).append(event_id)
        return [
            OutboxRow(
                id=row[0],
                topic=row[1],
                payload=row[2],
                qos=row[3],
                retain=bool(row[4]),
                created_at=row[5],
                kind=row[6],
                event_ids=tuple(links.get(row[0], ())),
            )
            for row in rows
        ]

    def outbox_done(self, ids: Sequence[int], now: float) -> int:
        """Delete acknowledged messages and mark the events they carried published.

        An event is marked published (at ``now``) when no waiting message carries it
        any more. Unknown ids are ignored, so a repeated acknowledgement is harmless.
        Returns how many messages were deleted.
        """
        unique = list(dict.fromkeys(_check_int(i, "outbox id", minimum=1) for i in ids))
        with self._write("outbox_done") as conn:
            carried: set[int] = set()
            deleted = 0
            for outbox_id in unique:
                carried.update(
                    event_id
                    for (event_id,) in conn.execute(
                        "SELECT event_id FROM outbox_events WHERE outbox_id = ?", (outbox_id,)
                    )
                )
                # ON DELETE CASCADE removes the message's outbox_events rows.
                deleted += conn.execute("DELETE FROM outbox WHERE id = ?", (outbox_id,)).rowcount
            conn.executemany(
                "UPDATE events SET published_at = ? WHERE id = ? AND published_at IS NULL "
                "AND NOT EXISTS (SELECT 1 FROM outbox_events WHERE event_id = events.id)",
                [(now, event_id) for event_id in sorted(carried)],
            )
        return deleted

    def outbox_depth(self) -> int:
        """How many messages are waiting."""
        with self._read("outbox_depth") as conn:
            (count,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
        return int(count)

    def outbox_oldest_age(self, now: float) -> float | None:
        """Seconds the oldest waiting message has waited (never negative); None if empty."""
        with self._read("outbox_oldest_age") as conn:
            row = conn.execute("SELECT created_at FROM outbox ORDER BY id LIMIT 1").fetchone()
        return None if row is None else max(0.0, now - row[0])

    # ---------------------------------------------------------- updates and propagation

    def add_update(self, update: UpdateRecord, device_ids: Sequence[bytes]) -> None:
        """Keep ``update`` and mark it pending for ``device_ids``.

        Idempotent: adding a known update again (same content; ``created_at`` may
        differ) adds only devices it did not have yet and keeps the state of those it
        had. The same ``update_id`` with other content is refused.
        """
        devices = list(dict.fromkeys(_check_device_id(d) for d in device_ids))
        with self._write("add_update") as conn:
            row = conn.execute(
                "SELECT u.update_id, u.kind, u.target, u.version, u.priority, u.signed, "
                "u.created_at, u.expires_at FROM updates u WHERE u.update_id = ?",
                (update.update_id,),
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO updates (update_id, kind, target, version, priority, signed, "
                    "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        update.update_id,
                        update.kind,
                        update.target,
                        update.version,
                        update.priority,
                        update.signed,
                        update.created_at,
                        update.expires_at,
                    ),
                )
                stored = update
            else:
                stored = _update(row)
                if not _same_update(stored, update):
                    msg = f"update {update.update_id!r} is already stored with other content"
                    raise StoreError(msg)
            for device_id in devices:
                if (
                    conn.execute(
                        "SELECT 1 FROM devices WHERE device_id = ?", (device_id,)
                    ).fetchone()
                    is None
                ):
                    raise _unknown_device(device_id)
            conn.executemany(
                "INSERT INTO propagation (update_id, device_id, state, attempts, updated_at) "
                "VALUES (?, ?, 'pending', 0, ?) ON CONFLICT DO NOTHING",
                [(update.update_id, device_id, stored.created_at) for device_id in devices],
            )

    def set_propagation(
        self,
        update_id: str,
        device_id: bytes,
        state: PropagationState,
        *,
        error_code: int | None = None,
        now: float,
    ) -> None:
        """Record where ``update_id`` stands on ``device_id``.

        Every state but ``pending`` is the outcome of an attempt and counts one more
        attempt. The pair must have been added by :meth:`add_update`.
        """
        _check_device_id(device_id)
        try:
            checked = PropagationState(state)
        except ValueError as exc:
            msg = f"unknown propagation state {state!r}"
            raise StoreError(msg) from exc
        attempt = int(checked is not PropagationState.PENDING)
        with self._write("set_propagation") as conn:
            cursor = conn.execute(
                "UPDATE propagation SET state = ?, error_code = ?, attempts = attempts + ?, "
                "updated_at = ? WHERE update_id = ? AND device_id = ?",
                (checked.value, error_code, attempt, now, update_id, device_id),
            )
            if cursor.rowcount != 1:
                msg = f"update {update_id!r} was never added for device {device_id.hex()}"
                raise StoreError(msg)

    def pending_updates_for(self, device_id: bytes) -> list[UpdateRecord]:
        """Updates still to deliver to the device (pending or unreachable), in push order.

        The order is priority (lower first), then version, so that an access delta
        follows the list it builds on. A decommissioned device has none. Expiry is
        not checked here: the caller decides what to do with an expired update.
        """
        _check_device_id(device_id)
        with self._read("pending_updates_for") as conn:
            rows = conn.execute(
                "SELECT u.update_id, u.kind, u.target, u.version, u.priority, u.signed, "
                "u.created_at, u.expires_at FROM updates u "
                "JOIN propagation p ON p.update_id = u.update_id "
                "JOIN devices d ON d.device_id = p.device_id "
                "WHERE p.device_id = ? AND p.state IN (?, ?) "
                "AND d.decommissioned_at IS NULL "
                "ORDER BY u.priority, u.version, u.created_at, u.update_id",
                (device_id, *_UNFINISHED_STATES),
            ).fetchall()
        return [_update(row) for row in rows]

    def propagation(self, update_id: str) -> dict[bytes, PropagationRow]:
        """The state of ``update_id`` on each of its devices; empty if unknown."""
        with self._read("propagation") as conn:
            rows = conn.execute(
                "SELECT update_id, device_id, state, error_code, attempts, updated_at "
                "FROM propagation WHERE update_id = ? ORDER BY device_id",
                (update_id,),
            ).fetchall()
        return {
            row[1]: PropagationRow(
                update_id=row[0],
                device_id=row[1],
                state=PropagationState(row[2]),
                error_code=row[3],
                attempts=row[4],
                updated_at=row[5],
            )
            for row in rows
        }

    def unfinished_updates(self) -> list[UpdateRecord]:
        """Updates with a device (not decommissioned) still pending or unreachable."""
        with self._read("unfinished_updates") as conn:
            rows = conn.execute(
                "SELECT u.update_id, u.kind, u.target, u.version, u.priority, u.signed, "
                "u.created_at, u.expires_at FROM updates u WHERE EXISTS ("
                "SELECT 1 FROM propagation p JOIN devices d ON d.device_id = p.device_id "
                "WHERE p.update_id = u.update_id AND p.state IN (?, ?) "
                "AND d.decommissioned_at IS NULL) "
                "ORDER BY u.priority, u.version, u.created_at, u.update_id",
                _UNFINISHED_STATES,
            ).fetchall()
        return [_update(row) for row in rows]

    # -------------------------------------------------------------------------- audit

    def events_for(
        self, device_id: bytes, *, time_from: int | None = None, time_to: int | None = None
    ) -> list[EventRow]:
        """The device's stored events with device time in [time_from, time_to], by sequence.

        A bound left as None is open.
        """
        _check_device_id(device_id)
        low = -(2**63) if time_from is None else time_from
        high = 2**63 - 1 if time_to is None else time_to
        with self._read("events_for") as conn:
            rows = conn.execute(
                "SELECT id, device_id, sequence, time, event, reason, key_id, payload, batch_id, "
                "received_at, published_at FROM events "
                "WHERE device_id = ? AND time BETWEEN ? AND ? ORDER BY sequence",
                (device_id, low, high),
            ).fetchall()
        return [_event(row) for row in rows]

    def batches_for(
        self,
        device_id: bytes,
        *,
        sequence_from: int | None = None,
        sequence_to: int | None = None,
    ) -> list[BatchRow]:
        """The device's stored batches holding a record in [sequence_from, sequence_to].

        By start sequence, then arrival. An empty batch counts as holding its start
        sequence. A bound left as None is open.
        """
        _check_device_id(device_id)
        low = 0 if sequence_from is None else sequence_from
        high = 2**63 - 1 if sequence_to is None else sequence_to
        with self._read("batches_for") as conn:
            rows = conn.execute(
                "SELECT id, device_id, start_sequence, start_head, record_count, checkpoint, "
                "raw_records, received_at FROM batches WHERE device_id = ? "
                "AND start_sequence <= ? AND start_sequence + max(record_count, 1) - 1 >= ? "
                "ORDER BY start_sequence, id",
                (device_id, high, low),
            ).fetchall()
        return [_batch(row) for row in rows]

    # ---------------------------------------------------------------------- retention

    def prune_published(self, older_than: float) -> int:
        """Delete events published before ``older_than``, and the batches left empty.

        An unpublished event is never deleted, however old. A batch goes once none of
        its events remain and it was received before ``older_than``. Returns how many
        events were deleted.
        """
        with self._write("prune_published") as conn:
            deleted = conn.execute(
                "DELETE FROM events WHERE published_at IS NOT NULL AND published_at < ?",
                (older_than,),
            ).rowcount
            conn.execute(
                "DELETE FROM batches WHERE received_at < ? "
                "AND NOT EXISTS (SELECT 1 FROM events WHERE batch_id = batches.id)",
                (older_than,),
            )
        return int(deleted)

    # --------------------------------------------------------------- replay protection

    def remember_command(self, jti: str, expires_at: float, now: float) -> bool:
        """Record that the command ``jti`` was seen; False if it was seen already.

        The jti is kept until ``expires_at`` (unix time): a command is refused as expired
        after that anyway, so the table holds only commands still within their lifetime.
        Entries whose ``expires_at`` is at or before ``now`` are deleted in the same
        transaction, which keeps the table small without a separate clean-up job.
        """
        if not isinstance(jti, str) or not jti:
            msg = f"a command jti must be a non-empty string, got {jti!r}"
            raise StoreError(msg)
        for value, what in ((expires_at, "expires_at"), (now, "now")):
            # bool is an int subclass; True as a time is a bug, not a value.
            if isinstance(value, bool) or not isinstance(value, int | float):
                msg = f"{what} must be a number, got {value!r}"
                raise StoreError(msg)
        with self._write("remember_command") as conn:
            conn.execute("DELETE FROM seen_commands WHERE expires_at <= ?", (now,))
            cursor = conn.execute(
                "INSERT INTO seen_commands (jti, expires_at) VALUES (?, ?) "
                "ON CONFLICT (jti) DO NOTHING",
                (jti, float(expires_at)),
            )
            return cursor.rowcount == 1

    # ----------------------------------------------------------------------------- kv

    def kv_get(self, key: str) -> bytes | None:
        """The value stored under ``key``, or None."""
        with self._read("kv_get") as conn:
            row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def kv_set(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``, replacing what was there."""
        with self._write("kv_set") as conn:
            conn.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def kv_delete(self, key: str) -> None:
        """Remove ``key``; removing a key that is not there is harmless."""
        with self._write("kv_delete") as conn:
            conn.execute("DELETE FROM kv WHERE key = ?", (key,))

    # ------------------------------------------------------------------------ checks

    def integrity_check(self) -> list[str]:
        """Problems found by ``PRAGMA integrity_check`` and ``foreign_key_check``; [] if none."""
        with self._read("integrity_check") as conn:
            problems = [
                str(message)
                for (message,) in conn.execute("PRAGMA integrity_check")
                if message != "ok"
            ]
            problems.extend(
                f"foreign key: {table} row {rowid} refers to a missing {parent} row "
                f"(constraint {fkid})"
                for table, rowid, parent, fkid in conn.execute("PRAGMA foreign_key_check")
            )
        return problems


# ------------------------------------------------------------------- module internals


def _configure(conn: sqlite3.Connection, path: str | os.PathLike[str]) -> None:
    try:
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA cache_size = -512")
    except sqlite3.Error as exc:
        msg = f"{path} is not a usable lockgw store: {exc}"
        raise StoreError(msg) from exc
    if str(mode).lower() != "wal":
        # An in-memory database, for instance, cannot be in WAL mode; durability
        # promises would silently not hold.
        msg = f"{path}: cannot switch to WAL journal mode (got {mode!r})"
        raise StoreError(msg)


def _migrate(conn: sqlite3.Connection, path: str | os.PathLike[str]) -> None:
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            msg = f"{path}: cannot begin the schema migration: {exc}"
            raise StoreError(msg) from exc
        try:
            # Read inside the write transaction: another process may have migrated
            # while this one waited for the lock.
            (app_id,) = conn.execute("PRAGMA application_id").fetchone()
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if app_id not in (0, APPLICATION_ID):
                msg = f"{path} is not a lockgw store (application_id {app_id:#x})"
                raise StoreError(msg)
            if version > SCHEMA_VERSION:
                msg = (
                    f"{path} has schema version {version}, newer than the {SCHEMA_VERSION} "
                    "this lockgw knows; run a newer lockgw or restore a backup"
                )
                raise StoreError(msg)
            if version == SCHEMA_VERSION:
                conn.execute("COMMIT")
                return
            for statement in _split_script(MIGRATIONS[version]):
                conn.execute(statement)
            # PRAGMA arguments cannot be bound; both are integers of ours.
            conn.execute(f"PRAGMA user_version = {version + 1:d}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID:d}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            msg = f"{path}: schema migration failed: {exc}"
            raise StoreError(msg) from exc
        except BaseException:
            _rollback(conn)
            raise


def _rollback(conn: sqlite3.Connection) -> None:
    # SQLite may already have rolled back (e.g. after SQLITE_FULL), and the error that
    # got us here is the one worth reporting, so a failing ROLLBACK is not.
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _lastrowid(cursor: sqlite3.Cursor) -> int:
    rowid = cursor.lastrowid
    if rowid is None:  # only for statements that insert nothing
        msg = "insert reported no row id"
        raise StoreError(msg)
    return rowid


def _require_device(rowcount: int, device_id: bytes) -> None:
    if rowcount != 1:
        raise _unknown_device(device_id)


def _unknown_device(device_id: bytes) -> StoreError:
    return StoreError(f"unknown device {device_id.hex()}")


def _check_cursor(
    device_id: bytes,
    *,
    stored_next: int,
    stored_head: bytes,
    start_sequence: int,
    start_head: bytes,
    new_next_sequence: int,
    new_head: bytes,
) -> None:
    name = device_id.hex()
    if new_next_sequence < stored_next:
        msg = (
            f"device {name}: batch ends before sequence {new_next_sequence}, but records "
            f"up to {stored_next - 1} are stored; a stale batch must not rewind the cursor"
        )
        raise StoreError(msg)
    if new_next_sequence == stored_next and new_head != stored_head:
        msg = f"device {name}: batch ends at the stored cursor with another head (forked chain)"
        raise StoreError(msg)
    if start_sequence == stored_next and start_head != stored_head:
        msg = f"device {name}: batch starts at the stored cursor with another head (forked)"
        raise StoreError(msg)


def _new_records(
    conn: sqlite3.Connection, device_id: bytes, records: list[EventInput]
) -> list[EventInput]:
    """The records not stored yet; refuses a stored record whose content differs."""
    if not records:
        return []
    stored = {
        row[0]: tuple(row[1:])
        for row in conn.execute(
            "SELECT sequence, time, event, reason, key_id, payload FROM events "
            "WHERE device_id = ? AND sequence BETWEEN ? AND ?",
            (device_id, records[0].sequence, records[-1].sequence),
        )
    }
    new: list[EventInput] = []
    for record in records:
        known = stored.get(record.sequence)
        if known is None:
            new.append(record)
            continue
        content = (record.time, record.event, record.reason, record.key_id, record.payload)
        if content != known:
            msg = (
                f"device {device_id.hex()}: record {record.sequence} differs from the "
                "stored one (the device presents a second history)"
            )
            raise StoreError(msg)
    return new


def _insert_outbox(
    conn: sqlite3.Connection,
    messages: Sequence[OutboxMessage],
    now: float,
    device_id: bytes | None,
) -> list[int]:
    ids: list[int] = []
    for message in messages:
        if message.retain and not message.event_sequences:
            # Only a topic's latest retained value means anything at the broker; an older
            # one still waiting would be published only to be overwritten. Superseding it
            # keeps the outbox bounded by topics, not by updates (a revocation's progress
            # after every one of N devices would otherwise queue N messages of N entries).
            # A superseded row the bridge is already sending is harmless: the newer row
            # follows it, and acknowledging an id no longer stored is a no-op.
            conn.execute(
                "DELETE FROM outbox WHERE topic = ? AND retain = 1 "
                "AND id NOT IN (SELECT outbox_id FROM outbox_events)",
                (message.topic,),
            )
        outbox_id = _lastrowid(
            conn.execute(
                "INSERT INTO outbox (topic, payload, qos, retain, created_at, kind) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    message.topic,
                    message.payload,
                    message.qos,
                    int(message.retain),
                    now,
                    message.kind,
                ),
            )
        )
        ids.append(outbox_id)
        if message.event_sequences and device_id is not None:
            event_ids = _resolve_sequences(conn, device_id, message.event_sequences)
            conn.executemany(
                "INSERT INTO outbox_events (outbox_id, event_id) VALUES (?, ?)",
                [(outbox_id, event_id) for event_id in event_ids],
            )
    return ids


def _resolve_sequences(
    conn: sqlite3.Connection, device_id: bytes, sequences: Sequence[int]
) -> list[int]:
    wanted = {_check_int(s, "event sequence") for s in sequences}
    found = dict(
        conn.execute(
            "SELECT sequence, id FROM events WHERE device_id = ? AND sequence BETWEEN ? AND ?",
            (device_id, min(wanted), max(wanted)),
        ).fetchall()
    )
    missing = sorted(wanted - found.keys())
    if missing:
        msg = f"device {device_id.hex()}: outbox message names unknown events {missing[:10]}"
        raise StoreError(msg)
    return [found[s] for s in sorted(wanted)]
