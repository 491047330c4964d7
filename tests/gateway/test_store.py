"""The durable store, on real SQLite files: migrations, the log pipeline, the outbox,
retention, update propagation, and durability across a hard kill of the writer."""

from __future__ import annotations

import dataclasses
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import gateway.store as store_module
from gateway.store import (
    APPLICATION_ID,
    SCHEMA_VERSION,
    CommitResult,
    NewEvent,
    OutboxMessage,
    PropagationState,
    Store,
    StoreError,
    UpdateRecord,
)
from protocols.enums import EventType
from protocols.logrecords import (
    RECORD_SIZE,
    ChainState,
    LogBatch,
    LogRecord,
    chain_genesis,
    chain_next,
    decode_checkpoint,
    decode_record,
    verify_batch,
)
from tests.gateway.store_crash_worker import (
    BASE_TIME,
    DEVICE_ID,
    DEVICE_KEY,
    MAX_BATCH,
    Batch,
    build_batch,
    device_record,
)

WORKER = Path(__file__).with_name("store_crash_worker.py")
OTHER_ID = bytes.fromhex("10c4000000000002")
NOW = 1_760_000_000.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "lockgw.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store.open(db_path) as opened:
        opened.upsert_device(device_record())
        yield opened


def raw_connection(path: Path) -> sqlite3.Connection:
    """A plain connection for looking behind the store's back."""
    return sqlite3.connect(path, isolation_level=None)


def first_batch(count: int = 10) -> Batch:
    return build_batch(start_sequence=0, start_head=chain_genesis(DEVICE_ID), count=count)


def next_batch(previous: Batch, count: int = 10) -> Batch:
    return build_batch(start_sequence=previous.next_sequence, start_head=previous.head, count=count)


def events_message(batch: Batch, topic: str = "lockgw/events") -> OutboxMessage:
    return OutboxMessage(
        topic=topic, payload=batch.raw_records, kind="events", event_sequences=batch.sequences
    )


def commit(
    store: Store,
    batch: Batch,
    *,
    outbox: Sequence[OutboxMessage] | None = None,
    received_at: float = NOW,
    device_id: bytes = DEVICE_ID,
) -> CommitResult:
    return store.commit_batch(
        device_id,
        start_sequence=batch.start_sequence,
        start_head=batch.start_head,
        checkpoint=batch.checkpoint,
        raw_records=batch.raw_records,
        records=batch.records,
        new_next_sequence=batch.next_sequence,
        new_head=batch.head,
        outbox=[events_message(batch)] if outbox is None else outbox,
        received_at=received_at,
    )


def cursor(store: Store, device_id: bytes = DEVICE_ID) -> tuple[int, bytes]:
    device = store.get_device(device_id)
    assert device is not None
    return device.chain_next_sequence, device.chain_head


def table_counts(path: Path) -> dict[str, int]:
    conn = raw_connection(path)
    try:
        return {
            table: conn.execute(query).fetchone()[0]
            for table, query in (
                ("batches", "SELECT count(*) FROM batches"),
                ("events", "SELECT count(*) FROM events"),
                ("outbox", "SELECT count(*) FROM outbox"),
                ("outbox_events", "SELECT count(*) FROM outbox_events"),
            )
        }
    finally:
        conn.close()


def update(update_id: str, *, priority: int = 5, version: int = 1) -> UpdateRecord:
    return UpdateRecord(
        update_id=update_id,
        kind=3,
        target="site:7",
        version=version,
        priority=priority,
        signed=b"signed:" + update_id.encode(),
        created_at=NOW,
        expires_at=int(NOW) + 86_400,
    )


# ----------------------------------------------------------------------------- opening


def test_fresh_database_gets_the_latest_schema(db_path: Path) -> None:
    with Store.open(db_path) as store:
        assert store.integrity_check() == []
    conn = raw_connection(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        tables = {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    finally:
        conn.close()
    assert {
        "devices",
        "batches",
        "events",
        "outbox",
        "outbox_events",
        "updates",
        "propagation",
        "kv",
        "seen_commands",
    } <= tables


def test_reopening_keeps_data_and_changes_no_schema(db_path: Path) -> None:
    with Store.open(db_path) as store:
        store.upsert_device(device_record())
        store.kv_set("nonce", b"\x01")
    conn = raw_connection(db_path)
    schema_before = conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall()
    conn.close()

    with Store.open(db_path) as store:
        assert store.get_device(DEVICE_ID) == device_record()
        assert store.kv_get("nonce") == b"\x01"
    conn = raw_connection(db_path)
    try:
        assert conn.execute("SELECT sql FROM sqlite_master ORDER BY name").fetchall() == (
            schema_before
        )
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    Store.open(db_path).close()
    conn = raw_connection(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    expected = f"schema version {SCHEMA_VERSION + 1}, newer than the {SCHEMA_VERSION}"
    with pytest.raises(StoreError, match=expected):
        Store.open(db_path)


def test_a_failing_migration_leaves_the_database_as_it_was(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Store.open(db_path).close()
    broken = "CREATE TABLE half_done (x INTEGER);\nINSERT INTO no_such_table VALUES (1);"
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, broken))
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError, match="schema migration failed"):
        Store.open(db_path)
    conn = raw_connection(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert (
            conn.execute("SELECT name FROM sqlite_master WHERE name='half_done'").fetchall() == []
        )
    finally:
        conn.close()


def test_migration_scripts_split_into_statements() -> None:
    script = "CREATE TABLE t (x TEXT DEFAULT ';');\n-- a comment\nINSERT INTO t VALUES ('a;b');\n"
    assert store_module._split_script(script) == [
        "CREATE TABLE t (x TEXT DEFAULT ';');",
        "-- a comment\nINSERT INTO t VALUES ('a;b');",
    ]


def test_files_that_are_not_lockgw_stores_are_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a usable lockgw store"):
        Store.open(garbage)

    foreign = tmp_path / "foreign.db"
    conn = raw_connection(foreign)
    conn.execute("PRAGMA application_id = 42")
    conn.close()
    with pytest.raises(StoreError, match="not a lockgw store"):
        Store.open(foreign)


def test_wal_full_sync_and_foreign_keys_are_in_force(store: Store) -> None:
    conn = store._conn
    assert conn is not None
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] > 0


def test_a_closed_store_refuses_calls(db_path: Path) -> None:
    store = Store.open(db_path)
    store.close()
    store.close()  # harmless
    with pytest.raises(StoreError, match="closed"):
        store.outbox_depth()


# ----------------------------------------------------------------------------- devices


def test_devices_round_trip_and_status_updates(store: Store) -> None:
    store.upsert_device(device_record(OTHER_ID, site_id=9))
    assert [d.device_id for d in store.list_devices()] == [DEVICE_ID, OTHER_ID]
    assert store.get_device(bytes(8)) is None

    store.update_device_status(DEVICE_ID, battery=80, door=1, reachable=True, last_heard=NOW)
    store.update_device_status(DEVICE_ID, alarms=0x02, clock_drift_ms=-150)
    device = store.get_device(DEVICE_ID)
    assert device is not None
    assert (device.battery, device.door, device.alarms, device.clock_drift_ms) == (80, 1, 2, -150)
    assert (device.reachable, device.last_heard, device.lock) == (True, NOW, 0)

    store.record_contact(DEVICE_ID, ok=False, now=NOW + 1, backoff_until=NOW + 31)
    store.record_contact(DEVICE_ID, ok=False, now=NOW + 31, backoff_until=NOW + 91)
    device = store.get_device(DEVICE_ID)
    assert device is not None
    assert (device.failures, device.reachable, device.backoff_until) == (2, False, NOW + 91)
    assert device.last_heard == NOW
    store.record_contact(DEVICE_ID, ok=True, now=NOW + 100, backoff_until=None)
    device = store.get_device(DEVICE_ID)
    assert device is not None
    assert (device.failures, device.reachable, device.backoff_until) == (0, True, None)
    assert device.last_heard == NOW + 100

    store.mark_decommissioned(OTHER_ID, NOW + 5.7)
    store.mark_decommissioned(OTHER_ID, NOW + 99)  # keeps the first time
    assert [d.device_id for d in store.list_devices()] == [DEVICE_ID]
    gone = store.list_devices(include_decommissioned=True)[1]
    assert gone.decommissioned_at == int(NOW) + 5

    with pytest.raises(StoreError, match="unknown device"):
        store.update_device_status(bytes(8), battery=1)
    with pytest.raises(StoreError, match="device id is 8 bytes"):
        store.get_device(b"short")


def test_upserting_a_known_device_never_moves_its_cursor(store: Store) -> None:
    batch = first_batch()
    commit(store, batch)
    store.update_device_status(DEVICE_ID, battery=55)
    stale = device_record()  # cursor at genesis, no status
    repaired = dataclasses.replace(stale, address="C0:FF:EE:00:00:99")
    store.upsert_device(repaired)
    device = store.get_device(DEVICE_ID)
    assert device is not None
    assert device.address == "C0:FF:EE:00:00:99"
    assert (device.chain_next_sequence, device.chain_head) == (batch.next_sequence, batch.head)
    assert device.battery == 55


# ------------------------------------------------------------------------ log pipeline


def test_commit_batch_stores_events_cursor_and_outbox(store: Store, db_path: Path) -> None:
    batch = first_batch(10)
    result = commit(store, batch, received_at=NOW)
    assert (result.new_events, result.duplicate_events) == (10, 0)
    assert (result.next_sequence, result.head) == (10, batch.head)
    assert cursor(store) == (10, batch.head)

    events = store.events_for(DEVICE_ID)
    assert [e.sequence for e in events] == list(range(10))
    assert all(e.batch_id == result.batch_id and e.published_at is None for e in events)
    assert events[3].time == BASE_TIME + 180
    assert events[3].event == EventType.DOOR_OPENED
    assert events[3].payload == (3).to_bytes(8, "big")

    [message] = store.outbox_peek(10)
    assert message.id == result.outbox_ids[0]
    assert (message.kind, message.qos, message.retain, message.created_at) == (
        "events",
        1,
        False,
        NOW,
    )
    assert message.event_ids == tuple(e.id for e in events)
    assert table_counts(db_path) == {"batches": 1, "events": 10, "outbox": 1, "outbox_events": 10}


def test_committing_the_same_batch_again_duplicates_nothing(store: Store, db_path: Path) -> None:
    batch = first_batch(10)
    commit(store, batch)
    again = commit(store, batch, outbox=[])
    assert (again.new_events, again.duplicate_events) == (0, 10)
    assert cursor(store) == (10, batch.head)
    assert [e.sequence for e in store.events_for(DEVICE_ID)] == list(range(10))
    assert table_counts(db_path)["events"] == 10


def test_an_overlapping_batch_stores_only_the_new_records(store: Store) -> None:
    first = first_batch(10)
    commit(store, first)
    # The device re-sends from 0 (its acknowledgement was lost) with 5 more records.
    longer = first_batch(15)
    result = commit(store, longer, outbox=[events_message(longer)])
    assert (result.new_events, result.duplicate_events) == (5, 10)
    assert cursor(store) == (15, longer.head)
    assert [e.sequence for e in store.events_for(DEVICE_ID)] == list(range(15))


def test_an_older_batch_cannot_rewind_the_cursor(store: Store, db_path: Path) -> None:
    first = first_batch(10)
    second = next_batch(first, 10)
    commit(store, first)
    commit(store, second)
    counts = table_counts(db_path)
    with pytest.raises(StoreError, match="must not rewind"):
        commit(store, first)
    assert cursor(store) == (20, second.head)
    assert table_counts(db_path) == counts


def test_a_second_history_is_refused(store: Store, db_path: Path) -> None:
    first = first_batch(10)
    commit(store, first)
    counts = table_counts(db_path)
    # Same sequences, other content: the device presents a different past.
    forged = build_batch(
        start_sequence=0,
        start_head=chain_genesis(DEVICE_ID),
        count=10,
        event=EventType.DOOR_CLOSED,
    )
    with pytest.raises(StoreError, match="forked"):
        commit(store, forged)
    longer_forged = build_batch(
        start_sequence=0,
        start_head=chain_genesis(DEVICE_ID),
        count=12,
        event=EventType.DOOR_CLOSED,
    )
    with pytest.raises(StoreError, match="second history"):
        commit(store, longer_forged)
    # A continuation from the cursor must start at the stored head.
    with pytest.raises(StoreError, match="forked"):
        commit(store, build_batch(start_sequence=10, start_head=bytes(32), count=3))
    assert table_counts(db_path) == counts
    assert cursor(store) == (10, first.head)


def test_a_batch_after_a_gap_moves_the_cursor_forward(store: Store) -> None:
    first = first_batch(5)
    commit(store, first)
    after_gap = build_batch(start_sequence=8, start_head=bytes(range(32)), count=4)
    result = commit(store, after_gap)
    assert result.new_events == 4
    assert cursor(store) == (12, after_gap.head)
    assert [e.sequence for e in store.events_for(DEVICE_ID)] == [0, 1, 2, 3, 4, 8, 9, 10, 11]


def test_an_empty_batch_is_stored_and_keeps_the_cursor(store: Store) -> None:
    first = first_batch(5)
    commit(store, first)
    empty = build_batch(start_sequence=5, start_head=first.head, count=0)
    result = commit(store, empty, outbox=[])
    assert (result.new_events, result.next_sequence, result.head) == (0, 5, first.head)
    assert [b.record_count for b in store.batches_for(DEVICE_ID)] == [5, 0]


def test_bad_batches_are_refused_and_store_nothing(store: Store, db_path: Path) -> None:
    batch = first_batch(5)

    def attempt(
        *,
        device_id: bytes = DEVICE_ID,
        records: tuple[LogRecord, ...] = batch.records,
        raw_records: bytes = batch.raw_records,
        new_next_sequence: int = 5,
        new_head: bytes = batch.head,
        outbox: Sequence[OutboxMessage] = (events_message(batch),),
    ) -> None:
        store.commit_batch(
            device_id,
            start_sequence=0,
            start_head=batch.start_head,
            checkpoint=batch.checkpoint,
            raw_records=raw_records,
            records=records,
            new_next_sequence=new_next_sequence,
            new_head=new_head,
            outbox=outbox,
            received_at=NOW,
        )

    with pytest.raises(StoreError, match="consecutively"):
        attempt(records=batch.records[::-1])
    with pytest.raises(StoreError, match="does not follow"):
        attempt(new_next_sequence=6)
    with pytest.raises(StoreError, match="raw_records holds"):
        attempt(raw_records=batch.raw_records[:-1])
    with pytest.raises(StoreError, match="new head must be 32 bytes"):
        attempt(new_head=b"short")
    with pytest.raises(StoreError, match=r"unknown events \[99\]"):
        attempt(outbox=[OutboxMessage("t", b"", "events", event_sequences=(0, 99))])
    with pytest.raises(StoreError, match="CHECK constraint"):
        attempt(outbox=[OutboxMessage("t", b"", "events", qos=3)])
    with pytest.raises(StoreError, match="unknown device"):
        attempt(device_id=OTHER_ID)
    assert table_counts(db_path) == {"batches": 0, "events": 0, "outbox": 0, "outbox_events": 0}
    assert cursor(store) == (0, chain_genesis(DEVICE_ID))


def test_plain_event_inputs_are_accepted(store: Store) -> None:
    head = chain_genesis(DEVICE_ID)
    records = [
        NewEvent(sequence=s, time=1, event=2, reason=1, key_id=0, payload=b"x") for s in (0, 1)
    ]
    result = store.commit_batch(
        DEVICE_ID,
        start_sequence=0,
        start_head=head,
        checkpoint=b"cp",
        raw_records=bytes(2 * RECORD_SIZE),
        records=records,
        new_next_sequence=2,
        new_head=bytes(32),
        outbox=[],
        received_at=NOW,
    )
    assert result.new_events == 2


def test_stored_batches_re_verify_for_an_auditor(store: Store) -> None:
    first = first_batch(7)
    second = next_batch(first, 6)
    commit(store, first)
    commit(store, second)
    rows = store.batches_for(DEVICE_ID, sequence_from=3, sequence_to=9)
    assert [row.start_sequence for row in rows] == [0, 7]
    assert store.batches_for(DEVICE_ID, sequence_from=7) == rows[1:]
    assert store.batches_for(DEVICE_ID, sequence_to=6) == rows[:1]
    assert store.batches_for(DEVICE_ID, sequence_from=13) == []

    state = ChainState.genesis(DEVICE_ID)
    for row in rows:
        raw = row.raw_records
        records = tuple(
            decode_record(raw[i : i + RECORD_SIZE]) for i in range(0, len(raw), RECORD_SIZE)
        )
        received = LogBatch(
            start_sequence=row.start_sequence,
            start_head=row.start_head,
            records=records,
            checkpoint=decode_checkpoint(row.checkpoint),
        )
        state = verify_batch(
            received, device_id=DEVICE_ID, device_key=DEVICE_KEY.public_key(), state=state
        ).state
    assert (state.next_sequence, state.head) == cursor(store)


def test_events_for_filters_by_device_time(store: Store) -> None:
    commit(store, first_batch(10))  # record s at BASE_TIME + 60 s

    def sequences(low: int | None, high: int | None) -> list[int]:
        return [e.sequence for e in store.events_for(DEVICE_ID, time_from=low, time_to=high)]

    assert sequences(BASE_TIME + 120, BASE_TIME + 300) == [2, 3, 4, 5]
    assert sequences(None, BASE_TIME + 60) == [0, 1]
    assert sequences(BASE_TIME + 540, None) == [9]
    assert sequences(None, None) == list(range(10))
    assert store.events_for(OTHER_ID) == []


# ------------------------------------------------------------------------------ outbox


def test_outbox_is_fifo_and_pages(store: Store) -> None:
    ids = store.enqueue([OutboxMessage(f"t/{i}", bytes([i]), "state") for i in range(3)], now=NOW)
    batch_ids = commit(store, first_batch(3)).outbox_ids
    ids += store.enqueue([OutboxMessage("t/alarm", b"!", "alarm", qos=2, retain=True)], now=NOW)
    assert ids == sorted(ids)
    rows = store.outbox_peek(100)
    assert [row.id for row in rows] == [*ids[:3], *batch_ids, ids[3]]
    assert [row.topic for row in rows[:3]] == ["t/0", "t/1", "t/2"]
    assert (rows[-1].qos, rows[-1].retain) == (2, True)
    assert store.outbox_peek(2) == rows[:2]
    assert store.outbox_peek(2, after_id=rows[1].id) == rows[2:4]
    assert store.outbox_peek(0) == []
    assert store.outbox_depth() == 5

    with pytest.raises(StoreError, match="only by commit_batch"):
        store.enqueue([OutboxMessage("t", b"", "events", event_sequences=(0,))], now=NOW)
    with pytest.raises(StoreError, match="limit must be"):
        store.outbox_peek(-1)


def test_a_newer_retained_message_supersedes_a_waiting_one(store: Store) -> None:
    store.upsert_device(device_record())
    first = store.enqueue(
        [OutboxMessage("gw/progress/u1", b"1 of 3", "progress", retain=True)], now=NOW
    )
    store.enqueue([OutboxMessage("gw/alarms", b"alarm", "alarm")], now=NOW)
    store.enqueue(
        [OutboxMessage("gw/progress/u2", b"other update", "progress", retain=True)], now=NOW
    )
    latest = store.enqueue(
        [OutboxMessage("gw/progress/u1", b"3 of 3", "progress", retain=True)], now=NOW
    )
    commit(store, first_batch(2), outbox=[events_message(first_batch(2), "gw/events")])
    rows = store.outbox_peek(100)
    assert [(row.topic, row.payload) for row in rows] == [
        ("gw/alarms", b"alarm"),
        ("gw/progress/u2", b"other update"),
        ("gw/progress/u1", b"3 of 3"),
        ("gw/events", first_batch(2).raw_records),
    ]
    assert rows[2].id == latest[0]
    # The bridge may already have sent the superseded row: its acknowledgement is a no-op.
    assert store.outbox_done(first, NOW) == 0
    assert store.outbox_depth() == 4


def test_outbox_done_marks_the_carried_events_published(store: Store) -> None:
    batch = first_batch(4)
    alarm = OutboxMessage("t/alarm", b"tamper", "alarm", event_sequences=(2,))
    result = commit(store, batch, outbox=[events_message(batch), alarm])
    events_id, alarm_id = result.outbox_ids

    assert store.outbox_done([events_id], NOW + 5) == 1
    published = {e.sequence: e.published_at for e in store.events_for(DEVICE_ID)}
    # Event 2 is still carried by the alarm, so it is not published yet.
    assert published == {0: NOW + 5, 1: NOW + 5, 2: None, 3: NOW + 5}

    assert store.outbox_done([alarm_id, alarm_id, 12345], NOW + 9) == 1
    published = {e.sequence: e.published_at for e in store.events_for(DEVICE_ID)}
    assert published == {0: NOW + 5, 1: NOW + 5, 2: NOW + 9, 3: NOW + 5}
    assert store.outbox_done([alarm_id], NOW + 20) == 0  # a repeated PUBACK changes nothing
    assert store.events_for(DEVICE_ID)[2].published_at == NOW + 9
    assert store.outbox_depth() == 0


def test_outbox_ids_are_never_reused(db_path: Path) -> None:
    with Store.open(db_path) as store:
        ids = store.enqueue([OutboxMessage("t", b"", "state")] * 3, now=NOW)
        store.outbox_done(ids, NOW)
        [after_delete] = store.enqueue([OutboxMessage("t", b"", "state")], now=NOW)
        assert after_delete > max(ids)
        store.outbox_done([after_delete], NOW)
    with Store.open(db_path) as store:
        [after_reopen] = store.enqueue([OutboxMessage("t", b"", "state")], now=NOW)
    assert after_reopen > after_delete


def test_outbox_depth_and_oldest_age(store: Store) -> None:
    assert store.outbox_depth() == 0
    assert store.outbox_oldest_age(NOW) is None
    [first] = store.enqueue([OutboxMessage("t", b"", "state")], now=NOW)
    store.enqueue([OutboxMessage("t", b"", "state")], now=NOW + 10)
    assert store.outbox_depth() == 2
    assert store.outbox_oldest_age(NOW + 15) == 15.0
    assert store.outbox_oldest_age(NOW - 100) == 0.0  # the clock went back
    store.outbox_done([first], NOW + 15)
    assert store.outbox_oldest_age(NOW + 15) == 5.0


# --------------------------------------------------------------------------- retention


def test_prune_deletes_only_old_published_events(store: Store, db_path: Path) -> None:
    old = first_batch(4)
    middle = next_batch(old, 4)
    recent = next_batch(middle, 4)
    old_ids = commit(store, old, received_at=NOW).outbox_ids
    commit(store, middle, received_at=NOW)  # never acknowledged
    recent_ids = commit(store, recent, received_at=NOW + 500).outbox_ids
    store.outbox_done(old_ids, NOW + 10)
    store.outbox_done(recent_ids, NOW + 900)

    assert store.prune_published(NOW + 1_000_000) == 8
    remaining = store.events_for(DEVICE_ID)
    # The unacknowledged batch survives however old; published events go.
    assert [e.sequence for e in remaining] == [4, 5, 6, 7]
    assert all(e.published_at is None for e in remaining)
    assert [b.start_sequence for b in store.batches_for(DEVICE_ID)] == [4]
    assert store.integrity_check() == []
    assert table_counts(db_path)["outbox"] == 1


def test_prune_respects_the_age_limit(store: Store) -> None:
    early = first_batch(3)
    late = next_batch(early, 3)
    store.outbox_done(commit(store, early, received_at=NOW).outbox_ids, NOW + 10)
    store.outbox_done(commit(store, late, received_at=NOW).outbox_ids, NOW + 100)
    assert store.prune_published(NOW + 50) == 3
    assert [e.sequence for e in store.events_for(DEVICE_ID)] == [3, 4, 5]
    assert store.prune_published(NOW + 50) == 0
    assert [b.start_sequence for b in store.batches_for(DEVICE_ID)] == [3]


def test_an_event_waiting_in_the_outbox_cannot_be_deleted(store: Store) -> None:
    commit(store, first_batch(2))
    conn = store._conn
    assert conn is not None
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        conn.execute("DELETE FROM events")


# ------------------------------------------------------------------------- propagation


def test_propagation_states_and_attempts(store: Store) -> None:
    store.upsert_device(device_record(OTHER_ID))
    store.add_update(update("u1"), [DEVICE_ID, OTHER_ID])
    rows = store.propagation("u1")
    assert set(rows) == {DEVICE_ID, OTHER_ID}
    assert all(r.state is PropagationState.PENDING and r.attempts == 0 for r in rows.values())

    store.set_propagation("u1", DEVICE_ID, PropagationState.UNREACHABLE, now=NOW + 1)
    store.set_propagation("u1", DEVICE_ID, PropagationState.APPLIED, now=NOW + 2)
    store.set_propagation("u1", OTHER_ID, PropagationState.FAILED, error_code=0x41, now=NOW + 3)
    rows = store.propagation("u1")
    assert (rows[DEVICE_ID].state, rows[DEVICE_ID].attempts) == (PropagationState.APPLIED, 2)
    assert rows[DEVICE_ID].updated_at == NOW + 2
    assert (rows[OTHER_ID].state, rows[OTHER_ID].error_code) == (PropagationState.FAILED, 0x41)
    assert store.unfinished_updates() == []
    assert store.propagation("nope") == {}

    with pytest.raises(StoreError, match="never added"):
        store.set_propagation("nope", DEVICE_ID, PropagationState.APPLIED, now=NOW)
    with pytest.raises(StoreError, match="unknown propagation state"):
        store.set_propagation("u1", DEVICE_ID, "lost", now=NOW)  # type: ignore[arg-type]  # a wrong state on purpose
    with pytest.raises(StoreError, match="unknown device"):
        store.add_update(update("u2"), [bytes(8)])
    assert store.propagation("u2") == {}  # the whole add was rolled back


def test_pending_updates_go_by_priority_then_version(store: Store) -> None:
    store.add_update(update("low-v2", priority=9, version=2), [DEVICE_ID])
    store.add_update(update("urgent", priority=0, version=7), [DEVICE_ID])
    store.add_update(update("low-v1", priority=9, version=1), [DEVICE_ID])
    store.add_update(update("done", priority=0, version=1), [DEVICE_ID])
    store.set_propagation("done", DEVICE_ID, PropagationState.APPLIED, now=NOW)
    store.set_propagation("low-v2", DEVICE_ID, PropagationState.UNREACHABLE, now=NOW)

    order = ["urgent", "low-v1", "low-v2"]
    assert [u.update_id for u in store.pending_updates_for(DEVICE_ID)] == order
    assert [u.update_id for u in store.unfinished_updates()] == order
    assert store.pending_updates_for(DEVICE_ID)[0] == update("urgent", priority=0, version=7)

    store.mark_decommissioned(DEVICE_ID, NOW)
    assert store.pending_updates_for(DEVICE_ID) == []
    assert store.unfinished_updates() == []


def test_adding_an_update_again_is_idempotent(store: Store) -> None:
    store.upsert_device(device_record(OTHER_ID))
    store.add_update(update("u1"), [DEVICE_ID])
    store.set_propagation("u1", DEVICE_ID, PropagationState.APPLIED, now=NOW)
    # A redelivered command: same content, received later.
    again = dataclasses.replace(update("u1"), created_at=NOW + 60)
    store.add_update(again, [DEVICE_ID, OTHER_ID])
    store.add_update(again, [DEVICE_ID, OTHER_ID])
    rows = store.propagation("u1")
    assert rows[DEVICE_ID].state is PropagationState.APPLIED  # kept, not reset
    assert rows[OTHER_ID].state is PropagationState.PENDING  # newly added
    assert [u.update_id for u in store.unfinished_updates()] == ["u1"]

    with pytest.raises(StoreError, match="other content"):
        store.add_update(update("u1", version=2), [DEVICE_ID])


# ------------------------------------------------------------------------------ misc


def test_kv_round_trip(store: Store) -> None:
    assert store.kv_get("nonce") is None
    store.kv_set("nonce", (41).to_bytes(8, "big"))
    store.kv_set("nonce", (42).to_bytes(8, "big"))
    assert store.kv_get("nonce") == (42).to_bytes(8, "big")
    with pytest.raises(StoreError, match="cannot store TEXT value in BLOB column"):
        store.kv_set("nonce", "42")  # type: ignore[arg-type]  # STRICT tables refuse wrong types


def test_a_version_1_database_is_migrated_and_keeps_its_data(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:1])
        patch.setattr(store_module, "SCHEMA_VERSION", 1)
        with Store.open(db_path) as old:
            old.upsert_device(device_record())
            old.kv_set("nonce", b"\x07")
    with Store.open(db_path) as store:
        assert store.get_device(DEVICE_ID) == device_record()
        assert store.kv_get("nonce") == b"\x07"
        assert store.remember_command("a" * 16, NOW + 300, NOW)
        assert store.integrity_check() == []
    conn = raw_connection(db_path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_a_command_is_remembered_once(store: Store) -> None:
    assert store.remember_command("jti-0123456789ab", NOW + 300, NOW)
    assert not store.remember_command("jti-0123456789ab", NOW + 300, NOW + 1)
    # Another jti is independent.
    assert store.remember_command("jti-ba9876543210", NOW + 300, NOW + 1)


def test_a_remembered_command_survives_a_restart(db_path: Path) -> None:
    with Store.open(db_path) as store:
        assert store.remember_command("jti-0123456789ab", NOW + 300, NOW)
    with Store.open(db_path) as store:
        assert not store.remember_command("jti-0123456789ab", NOW + 300, NOW + 10)


def test_expired_commands_are_pruned(store: Store, db_path: Path) -> None:
    for number in range(5):
        assert store.remember_command(f"jti-old-{number:08d}", NOW + 10, NOW)
    assert store.remember_command("jti-long-lived-0001", NOW + 300, NOW)
    assert seen_count(db_path) == 6
    # At NOW + 10 the short-lived ones are at their expiry and go; the new one is stored.
    assert store.remember_command("jti-new-000000001", NOW + 310, NOW + 10)
    assert seen_count(db_path) == 2
    # A pruned jti is accepted again: the command it belonged to has expired by now, so
    # the verifier refuses it as expired before it ever asks the store.
    assert store.remember_command("jti-old-00000000", NOW + 20, NOW + 11)


@pytest.mark.parametrize(
    ("jti", "expires_at", "now"),
    [
        ("", NOW, NOW),
        (None, NOW, NOW),
        (b"jti-0123456789ab", NOW, NOW),
        ("jti-0123456789ab", "soon", NOW),
        ("jti-0123456789ab", True, NOW),
        ("jti-0123456789ab", NOW, None),
    ],
)
def test_remember_command_refuses_bad_arguments(
    store: Store, jti: object, expires_at: object, now: object
) -> None:
    with pytest.raises(StoreError):
        store.remember_command(jti, expires_at, now)  # type: ignore[arg-type]  # bad on purpose


def seen_count(path: Path) -> int:
    conn = raw_connection(path)
    try:
        (count,) = conn.execute("SELECT count(*) FROM seen_commands").fetchone()
    finally:
        conn.close()
    return int(count)


def test_integrity_check_reports_broken_foreign_keys(store: Store) -> None:
    commit(store, first_batch(2))
    conn = store._conn
    assert conn is not None
    conn.execute("PRAGMA foreign_keys = OFF")
    conn.execute("DELETE FROM outbox_events")
    conn.execute("DELETE FROM batches")
    conn.execute("PRAGMA foreign_keys = ON")
    problems = store.integrity_check()
    assert len(problems) == 2
    assert all("events row" in p and "missing batches" in p for p in problems)


# ------------------------------------------------------------------ crash durability


@pytest.mark.parametrize("rounds", [5, pytest.param(50, marks=pytest.mark.fuzz)])
def test_committed_batches_survive_a_hard_kill(tmp_path: Path, rounds: int) -> None:
    db = tmp_path / "crash.db"
    rng = random.Random(1605)
    reported: list[int] = []
    for round_number in range(rounds):
        with subprocess.Popen(  # noqa: S603 - our own worker script, run by this interpreter
            [sys.executable, str(WORKER), str(db)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as worker:
            assert worker.stdout is not None
            try:
                for _ in range(rng.randint(1, 6)):
                    line = worker.stdout.readline()
                    assert line.endswith("\n"), f"round {round_number}: worker stopped early"
                    reported.append(int(line))
                # Let it run into a random point of a later commit (or between two).
                time.sleep(rng.uniform(0, 0.03))
                worker.send_signal(signal.SIGKILL)
            finally:
                worker.kill()
                rest, errors = worker.communicate(timeout=10)
        assert worker.returncode == -signal.SIGKILL, errors
        # Lines written before the kill also name committed batches; a torn last line
        # (none in practice: one short write) would not.
        reported.extend(int(line) for line in rest.split("\n")[:-1])
        assert reported == sorted(reported)
        check_after_kill(db, last_reported=reported[-1])


def check_after_kill(db: Path, *, last_reported: int) -> None:
    with Store.open(db) as store:
        assert store.integrity_check() == []
        next_sequence, head = cursor(store)
        # The cursor is at the end of the last reported batch, or of one more that
        # committed between the report and the kill.
        unreported = store.batches_for(DEVICE_ID, sequence_from=last_reported + 1)
        assert len(unreported) <= 1
        expected_next = (
            unreported[0].start_sequence + unreported[0].record_count
            if unreported
            else last_reported + 1
        )
        assert next_sequence == expected_next
        assert next_sequence - (last_reported + 1) <= MAX_BATCH

        # Every sequence up to the cursor is stored exactly once...
        events = store.events_for(DEVICE_ID)
        assert [e.sequence for e in events] == list(range(next_sequence))
        # ...the stored raw records chain up to the stored head...
        recomputed = chain_genesis(DEVICE_ID)
        for batch in store.batches_for(DEVICE_ID):
            raw = batch.raw_records
            for offset in range(0, len(raw), RECORD_SIZE):
                recomputed = chain_next(recomputed, raw[offset : offset + RECORD_SIZE])
        assert recomputed == head
        # ...and every event is either published or carried by exactly one waiting message.
        carried = [event_id for row in store.outbox_peek(1_000_000) for event_id in row.event_ids]
        published = {e.id for e in events if e.published_at is not None}
        assert len(carried) == len(set(carried))
        assert published.isdisjoint(carried)
        assert published | set(carried) == {e.id for e in events}
