"""The auditor's exports: real SQLite stores holding real, verified, signed batches."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway import audit
from gateway.audit import GapInfo, render, verify_export, verify_file
from gateway.cli import main
from gateway.store import DeviceRecord, Store
from gateway.topics import Topics
from protocols.enums import DeviceKind, EventType, Reason
from protocols.logrecords import (
    RECORD_SIZE,
    ChainState,
    DeviceLog,
    chain_genesis,
    encode_checkpoint,
    encode_record,
    verify_batch,
)
from tests.conftest import Schemas

GATEWAY: Final = "gw-1"
TOPICS: Final = Topics("lockgw", GATEWAY)
DEVICE_ID: Final = bytes.fromhex("00a1b2c3d4e5f601")
DAY: Final = 86400
DAY1: Final = int(datetime(2026, 11, 2, tzinfo=UTC).timestamp())
NURSE_A: Final = 4711
NURSE_B: Final = 5022
NOW: Final = float(DAY1 + 10 * DAY)

# (day, seconds into the day, event, reason, key): three batches, one per day.
DAYS: Final = (
    [
        (0, 8 * 3600, EventType.ACCESS_GRANTED, Reason.VALID_KEY, NURSE_A),
        (0, 8 * 3600 + 5, EventType.DOOR_OPENED, Reason.NONE, 0),
        (0, 8 * 3600 + 300, EventType.DOOR_CLOSED, Reason.NONE, 0),
        (0, 8 * 3600 + 302, EventType.LOCKED, Reason.NONE, 0),
        (0, 13 * 3600, EventType.ACCESS_DENIED, Reason.KEY_REVOKED, 9999),
    ],
    [
        (1, 7 * 3600 + 1800, EventType.ACCESS_GRANTED, Reason.VALID_KEY, NURSE_B),
        (1, 7 * 3600 + 1805, EventType.DOOR_OPENED, Reason.NONE, 0),
        (1, 7 * 3600 + 2400, EventType.DOOR_CLOSED, Reason.NONE, 0),
        (1, 12 * 3600, EventType.JAMMED, Reason.LOCK_JAMMED, 0),
        (1, 19 * 3600, EventType.ACCESS_GRANTED, Reason.VALID_KEY, NURSE_A),
    ],
    [
        (2, 9 * 3600, EventType.ACCESS_GRANTED, Reason.VALID_KEY, NURSE_A),
        (2, 9 * 3600 + 4, EventType.DOOR_OPENED, Reason.NONE, 0),
        (2, 9 * 3600 + 600, EventType.DOOR_CLOSED, Reason.NONE, 0),
        (2, 22 * 3600, EventType.BATTERY_LOW, Reason.NONE, 0),
    ],
)
TOTAL: Final = sum(len(day) for day in DAYS)


@dataclass
class Device:
    store: Store
    path: Path
    key: Ed25519PrivateKey
    log: DeviceLog

    @property
    def public(self) -> bytes:
        return self.key.public_key().public_bytes_raw()

    def collect(self, from_sequence: int | None = None, *, allow_gap: bool = False) -> None:
        """Read, verify and commit one batch as the pipeline does, then acknowledge."""
        record = self.store.get_device(DEVICE_ID)
        assert record is not None
        state = ChainState(record.chain_next_sequence, record.chain_head)
        start = state.next_sequence if from_sequence is None else from_sequence
        batch = self.log.read(start, 1000, key=self.key, now=int(NOW))
        verified = verify_batch(
            batch,
            device_id=DEVICE_ID,
            device_key=self.key.public_key(),
            state=state,
            allow_gap=allow_gap,
        )
        self.store.commit_batch(
            DEVICE_ID,
            start_sequence=batch.start_sequence,
            start_head=batch.start_head,
            checkpoint=encode_checkpoint(batch.checkpoint),
            raw_records=b"".join(encode_record(r) for r in batch.records),
            records=verified.records,
            new_next_sequence=verified.state.next_sequence,
            new_head=verified.state.head,
            outbox=[],
            received_at=NOW,
        )
        self.log.acknowledge(verified.records[-1].sequence)

    def append_day(self, index: int) -> None:
        for day, seconds, event, reason, key_id in DAYS[index]:
            self.log.append(DAY1 + day * DAY + seconds, event, reason, key_id)

    def export(self, **overrides: Any) -> audit.AuditExport:
        arguments: dict[str, Any] = {
            "time_from": DAY1,
            "time_to": DAY1 + 3 * DAY - 1,
            "reveal_reason": None,
            "auditor": "A. Auditor",
            "now": NOW,
            "topics": TOPICS,
        }
        arguments.update(overrides)
        return audit.export(self.store, DEVICE_ID, **arguments)

    def audit_messages(self) -> list[dict[str, Any]]:
        rows = self.store.outbox_peek(100)
        return [json.loads(row.payload) for row in rows if row.kind == "audit"]


def open_device(path: Path) -> Device:
    path.parent.mkdir(parents=True, exist_ok=True)
    store = Store.open(path)
    key = Ed25519PrivateKey.generate()
    store.upsert_device(
        DeviceRecord(
            device_id=DEVICE_ID,
            kind=int(DeviceKind.DOOR_LOCK),
            address="AA:BB:CC:DD:EE:01",
            signing_key=key.public_key().public_bytes_raw(),
            noise_key=bytes(range(32)),
            site_id=42,
            paired_at=DAY1 - DAY,
            chain_next_sequence=0,
            chain_head=chain_genesis(DEVICE_ID),
        )
    )
    return Device(store=store, path=path, key=key, log=DeviceLog(DEVICE_ID, 100))


@pytest.fixture
def device(tmp_path: Path) -> Iterator[Device]:
    """Three days, three batches, collected in order: an intact log."""
    dev = open_device(tmp_path / "state" / "lockgw.sqlite3")
    for index in range(3):
        dev.append_day(index)
        dev.collect()
    yield dev
    dev.store.close()


@pytest.fixture
def gapped(tmp_path: Path) -> Iterator[Device]:
    """Day 2's batch was never collected: records 5..9 are missing from the store."""
    dev = open_device(tmp_path / "gapped" / "lockgw.sqlite3")
    dev.append_day(0)
    dev.collect()
    dev.append_day(1)
    dev.append_day(2)
    dev.collect(from_sequence=10, allow_gap=True)
    yield dev
    dev.store.close()


def write_json(tmp_path: Path, document: dict[str, Any], name: str = "export.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ JSON


def test_json_export_verifies_offline(device: Device, tmp_path: Path) -> None:
    result = device.export()
    path = tmp_path / "export.json"
    path.write_text(render(result, "json"), encoding="utf-8")

    document = json.loads(path.read_text(encoding="utf-8"))
    assert document["format"] == "lockgw-audit/1"
    assert document["device_id"] == DEVICE_ID.hex()
    assert document["device_key"] == device.public.hex()
    assert document["revealed"] is False
    assert document["reason"] is None
    assert len(document["batches"]) == 3
    assert [e["sequence"] for e in document["events"]] == list(range(TOTAL))
    assert document["verification"] == {
        "intact": True,
        "records": TOTAL,
        "gaps": [],
        "failure": None,
    }
    offline = verify_file(path, device.public)
    assert offline.intact
    assert offline.records == TOTAL
    assert offline.summary() == f"intact: {TOTAL} records, no gaps"


def test_range_selects_whole_batches_and_flags_records(device: Device) -> None:
    # Day 2 from 11:00 on: the jam and the evening access of batch 1 are in the range.
    result = device.export(time_from=DAY1 + DAY + 11 * 3600, time_to=DAY1 + 2 * DAY - 1)
    assert [b["start_sequence"] for b in result.document["batches"]] == [5]
    assert len(result.events) == 5  # the whole batch travels, for verification
    assert [e.sequence for e in result.in_range] == [8, 9]
    assert [e["sequence"] for e in result.document["events"]] == [8, 9]
    assert result.verification.intact


def test_empty_range_is_an_empty_intact_export(device: Device) -> None:
    result = device.export(time_from=DAY1 + 5 * DAY, time_to=DAY1 + 6 * DAY)
    assert result.document["batches"] == []
    assert result.document["events"] == []
    assert result.verification.intact
    assert result.verification.records == 0


def flip_key_byte(document: dict[str, Any]) -> None:
    raw = bytearray.fromhex(document["batches"][1]["records"])
    raw[2 * RECORD_SIZE + 10] ^= 0x01  # key id of record 2 of batch 1: sequence 7
    document["batches"][1]["records"] = raw.hex()


def delete_record(document: dict[str, Any]) -> None:
    raw = bytes.fromhex(document["batches"][1]["records"])
    del_at = 2 * RECORD_SIZE
    document["batches"][1]["records"] = (raw[:del_at] + raw[del_at + RECORD_SIZE :]).hex()


def swap_checkpoints(document: dict[str, Any]) -> None:
    first, second = document["batches"][0], document["batches"][1]
    first["checkpoint"], second["checkpoint"] = second["checkpoint"], first["checkpoint"]


def edit_event_view(document: dict[str, Any]) -> None:
    document["events"][6]["event"] = "DOOR_CLOSED"


@pytest.mark.parametrize(
    ("tamper", "batch_index", "sequence", "codes", "words"),
    [
        (flip_key_byte, 1, 7, {"LOG_ALTERED"}, "altered"),
        (delete_record, 1, 8, {"LOG_GAP"}, "expected 7"),
        (swap_checkpoints, 0, 5, {"LOG_TRUNCATED"}, "checkpoint covers sequence 9"),
        (edit_event_view, None, 6, {"EVENTS_MISMATCH"}, "signed record"),
    ],
    ids=["flipped-byte", "deleted-record", "swapped-checkpoint", "edited-view"],
)
def test_tampered_json_fails_naming_the_record(
    device: Device,
    tmp_path: Path,
    *,
    tamper: Callable[[dict[str, Any]], None],
    batch_index: int | None,
    sequence: int,
    codes: set[str],
    words: str,
) -> None:
    document = json.loads(render(device.export(), "json"))
    tamper(document)
    result = verify_file(write_json(tmp_path, document), device.public)
    assert not result.intact
    assert result.failure is not None
    assert result.failure.batch_index == batch_index
    assert result.failure.sequence == sequence
    assert result.failure.code in codes
    assert words in result.failure.reason
    assert result.summary().startswith(f"NOT intact: record {sequence} ")


def test_gap_between_batches_is_reported_not_hidden(gapped: Device, tmp_path: Path) -> None:
    result = gapped.export()
    assert not result.verification.intact
    assert result.verification.failure is None
    assert result.verification.gaps == [GapInfo(first_missing=5, count=5)]
    assert result.verification.records == TOTAL - 5
    assert result.document["verification"]["gaps"] == [{"first_missing": 5, "count": 5}]
    offline = verify_file(write_json(tmp_path, result.document), gapped.public)
    assert offline.gaps == [GapInfo(first_missing=5, count=5)]
    assert offline.summary() == (
        f"NOT intact: {TOTAL - 5} records verified, but gaps: records 5-9 missing (5)"
    )


def test_a_forged_key_is_refused(device: Device, tmp_path: Path) -> None:
    document = json.loads(render(device.export(), "json"))
    path = write_json(tmp_path, document)
    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    result = verify_file(path, other)
    assert not result.intact
    assert result.failure is not None
    assert result.failure.code == "KEY_MISMATCH"

    # An export that carries another key than the signer's fails on the signatures.
    document["device_key"] = other.hex()
    unchecked = verify_export(document)
    assert unchecked.failure is not None
    assert unchecked.failure.code == "LOG_BAD_CHECKPOINT"


@pytest.mark.parametrize(
    "content", ["not json", "[]", '{"format": "other"}', '{"format": "lockgw-audit/1"}']
)
def test_a_malformed_file_is_a_failure_not_a_crash(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    result = verify_file(path, None)
    assert not result.intact
    assert result.failure is not None
    assert result.failure.code == "MALFORMED"


def test_a_store_tampered_with_is_exported_as_not_intact(device: Device) -> None:
    with sqlite3.connect(device.path) as conn:
        (batch_id, raw) = conn.execute(
            "SELECT id, raw_records FROM batches ORDER BY start_sequence LIMIT 1"
        ).fetchone()
        changed = bytearray(raw)
        changed[RECORD_SIZE + 5] ^= 0x40  # the time of record 1
        conn.execute("UPDATE batches SET raw_records = ? WHERE id = ?", (bytes(changed), batch_id))
    conn.close()
    result = device.export()
    assert not result.verification.intact
    assert result.verification.failure is not None
    assert result.verification.failure.sequence == 1
    assert not any(e.verified for e in result.events if e.batch_index == 0)
    assert all(e.verified for e in result.events if e.batch_index > 0)


# ---------------------------------------------------------------------- pseudonyms


def keys_of(result: audit.AuditExport) -> dict[int, set[str | None]]:
    """The keys each real key id is shown as, by the fixture's own key ids."""
    shown: dict[int, set[str | None]] = {}
    real = [key for day in DAYS for (*_, key) in day]
    for event, key_id in zip(result.in_range, real, strict=True):
        shown.setdefault(key_id, set()).add(event.key)
    return shown


def test_pseudonyms_hide_ids_stable_within_an_export_differ_across(device: Device) -> None:
    first, second = keys_of(device.export()), keys_of(device.export())
    assert first[0] == {None}
    for key_id in (NURSE_A, NURSE_B, 9999):
        (pseudonym,) = first[key_id]  # stable within the export
        assert pseudonym is not None
        assert len(pseudonym) == 8
        int(pseudonym, 16)
        assert pseudonym != str(key_id)
        assert first[key_id] != second[key_id]  # a fresh salt per export
    assert len({next(iter(first[k])) for k in (NURSE_A, NURSE_B, 9999)}) == 3


def test_pseudonymised_views_carry_no_ids_but_raw_material_does(device: Device) -> None:
    result = device.export()
    real = {str(NURSE_A), str(NURSE_B), "9999"}
    assert not real & {event["key"] for event in result.document["events"]}
    assert not real & {row["key"] for row in csv.DictReader(io.StringIO(render(result, "csv")))}
    page = render(result, "html")
    assert not any(f"<td>{key_id}</td>" in page for key_id in real)
    assert "salt" not in json.dumps(result.document)
    # The raw records keep the real key ids: the signatures are over those bytes.
    raw = bytes.fromhex(result.document["batches"][0]["records"])
    assert int.from_bytes(raw[10:14], "big") == NURSE_A


def test_reveal_shows_ids_and_records_the_reason(device: Device, tmp_path: Path) -> None:
    reason = "Complaint 2026-118: disputed visit on 3 November"
    result = device.export(reveal_reason=reason, fmt="csv")
    shown = keys_of(result)
    assert shown[NURSE_A] == {str(NURSE_A)}
    assert shown[NURSE_B] == {str(NURSE_B)}
    assert result.document["revealed"] is True
    assert result.document["reason"] == reason
    (message,) = device.audit_messages()
    assert message["message_id"] == result.message_id
    assert message["message_id"].startswith(f"{GATEWAY}:audit:")
    assert message["revealed"] is True
    assert message["reason"] == reason
    assert message["format"] == "csv"
    assert message["auditor"] == "A. Auditor"
    assert message["device_id"] == DEVICE_ID.hex()
    assert message["records"] == TOTAL
    assert message["range"]["from_unix"] == DAY1
    assert message["time"] == NOW
    # A revealed JSON export is re-verified including the ids its events show.
    assert verify_file(write_json(tmp_path, result.document), device.public).intact


def test_every_export_is_recorded_on_the_audit_topic(device: Device, schemas: Schemas) -> None:
    device.export()
    device.export(fmt="html")
    rows = [row for row in device.store.outbox_peek(100) if row.kind == "audit"]
    assert [row.topic for row in rows] == [f"lockgw/gw/{GATEWAY}/audit"] * 2
    for row in rows:
        schemas.validate("audit", row.payload)
    messages = device.audit_messages()
    assert [m["revealed"] for m in messages] == [False, False]
    assert [m["reason"] for m in messages] == [None, None]
    assert [m["format"] for m in messages] == ["json", "html"]


@pytest.mark.parametrize("reason", ["", "   "])
def test_an_empty_reason_is_refused(device: Device, reason: str) -> None:
    with pytest.raises(audit.AuditError, match="reason"):
        device.export(reveal_reason=reason)
    assert device.audit_messages() == []


def test_unknown_device_is_refused(device: Device) -> None:
    with pytest.raises(audit.AuditError, match="unknown device"):
        audit.export(
            device.store,
            bytes(8),
            time_from=0,
            time_to=1,
            reveal_reason=None,
            auditor="a",
            now=NOW,
            topics=TOPICS,
        )


# ------------------------------------------------------------------------ CSV, HTML


def test_csv_has_one_row_per_in_range_record(device: Device) -> None:
    result = device.export(time_from=DAY1 + DAY, time_to=DAY1 + 3 * DAY - 1)
    rows = list(csv.DictReader(io.StringIO(render(result, "csv"))))
    assert len(rows) == len(DAYS[1]) + len(DAYS[2])
    assert list(rows[0]) == ["sequence", "time", "event", "reason", "key", "verified"]
    assert rows[0]["sequence"] == "5"
    assert rows[0]["time"] == "2026-11-03T07:30:00Z"
    assert rows[0]["event"] == "ACCESS_GRANTED"
    assert rows[0]["reason"] == "VALID_KEY"
    assert len(rows[0]["key"]) == 8
    assert rows[1]["key"] == ""
    assert {row["verified"] for row in rows} == {"yes"}


def test_html_is_one_self_contained_escaped_file(device: Device) -> None:
    hostile = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    page = render(device.export(auditor=hostile), "html")
    lowered = page.lower()
    assert lowered.startswith("<!doctype html>")
    assert "<script" not in lowered
    assert "<img" not in lowered
    assert "http" not in lowered
    assert "src=" not in lowered.replace("src=x", "")  # only inside the escaped text
    assert "url(" not in lowered
    assert "@import" not in lowered
    assert "<link" not in lowered
    assert "<svg" in lowered
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x" in page
    for label in ("Access granted", "Access denied", "Door / lock / cabinet", "Alarm"):
        assert label in page
    assert "Verified: all 14 records are intact" in page
    assert page.count("<tr") == TOTAL + 1


def test_html_says_plainly_when_not_intact(gapped: Device) -> None:
    page = render(gapped.export(reveal_reason="Incident 7"), "html")
    assert "Incomplete: 9 records verified, but records 5-9 missing (5)." in page
    assert '<tr class="gap"><td colspan="6">records 5-9 missing (5) in the stored log' in page
    assert page.index("records 5-9 missing (5) in the stored log") < page.index(">10</td>")
    assert "2026-11-03</text>" in page  # the day without records still has its row
    assert "no records</text>" in page
    assert "revealed" in page
    assert "Incident 7" in page


# ----------------------------------------------------------------------------- CLI

CONFIG: Final = """\
[gateway]
id = "gw-1"
state_dir = "state"
key_file = "keys/gateway.key"
certificate_file = "keys/gateway.cert"
authority_key_file = "keys/authority.pub"

[mqtt]
host = "broker.example.org"
ca_file = "keys/ca.pem"
cert_file = "keys/client.pem"
key_file = "keys/client.key"
"""


@pytest.fixture
def config(device: Device, tmp_path: Path) -> Path:
    """A configuration whose state_dir is the fixture device's store."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("gateway.key", "gateway.cert", "authority.pub", "ca.pem", "client.pem"):
        (keys / name).write_bytes(b"\x00" * 32)
    (keys / "client.key").write_bytes(b"\x00" * 32)
    path = tmp_path / "gateway.toml"
    path.write_text(CONFIG, encoding="utf-8")
    assert device.path == tmp_path / "state" / "lockgw.sqlite3"
    return path


def export_args(config: Path, out: Path, *extra: str) -> list[str]:
    return [
        "audit",
        "export",
        "--config",
        str(config),
        "--device",
        DEVICE_ID.hex(),
        "--from",
        "2026-11-02",
        "--to",
        "2026-11-04",
        "--out",
        str(out),
        "--auditor",
        "cli-auditor",
        *extra,
    ]


def test_cli_export_and_verify(
    device: Device, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out" / "export.json"
    out.parent.mkdir()
    assert main(export_args(config, out, "--format", "json")) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1
    assert f"{TOTAL} records" in line
    assert "key ids pseudonymised" in line
    assert f"intact: {TOTAL} records, no gaps" in line
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    (message,) = device.audit_messages()
    assert message["auditor"] == "cli-auditor"
    assert message["format"] == "json"
    assert message["range"]["to"] == "2026-11-04T23:59:59Z"

    assert main(["audit", "verify", str(out), "--device-key", device.public.hex()]) == 0
    assert capsys.readouterr().out == f"{out}: intact: {TOTAL} records, no gaps\n"

    pem = tmp_path / "device.pem"
    pem.write_bytes(
        device.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert main(["audit", "verify", str(out), "--device-key", str(pem)]) == 0
    capsys.readouterr()

    other = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    assert main(["audit", "verify", str(out), "--device-key", other]) == 1
    assert "KEY_MISMATCH" in capsys.readouterr().out

    document = json.loads(out.read_text(encoding="utf-8"))
    flip_key_byte(document)
    tampered = write_json(tmp_path, document, "tampered.json")
    assert main(["audit", "verify", str(tampered), "--device-key", device.public.hex()]) == 1
    assert "NOT intact: record 7 in batch 1: LOG_ALTERED" in capsys.readouterr().out

    assert main(["audit", "verify", str(out), "--device-key", "zz"]) == 2


@pytest.mark.parametrize("fmt", ["csv", "html"])
def test_cli_export_other_formats(
    device: Device, config: Path, tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"export.{fmt}"
    extra = ("--format", fmt, "--reveal", "--reason", "Ticket 42")
    assert main(export_args(config, out, *extra)) == 0
    assert "key ids revealed" in capsys.readouterr().out
    text = out.read_text(encoding="utf-8")
    assert str(NURSE_A) in text
    (message,) = device.audit_messages()
    assert message["reason"] == "Ticket 42"
    assert message["format"] == fmt


def test_cli_usage_errors(
    device: Device, config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.json"
    assert main(export_args(config, out, "--reveal")) == 2
    assert "--reveal needs --reason" in capsys.readouterr().err
    assert main(export_args(config, out, "--reason", "why")) == 2
    capsys.readouterr()
    bad_time = export_args(config, out)
    bad_time[bad_time.index("--from") + 1] = "yesterday"
    assert main(bad_time) == 2
    capsys.readouterr()
    unknown = export_args(config, out)
    unknown[unknown.index("--device") + 1] = "ffffffffffffffff"
    assert main(unknown) == 1
    err = capsys.readouterr().err
    assert err == "lockgw: unknown device ffffffffffffffff\n"
    assert not out.exists()
    assert device.audit_messages() == []


def test_cli_export_of_a_gapped_log_exits_1(
    gapped: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "gkeys"
    keys.mkdir()
    for name in ("gateway.key", "gateway.cert", "authority.pub", "ca.pem", "client.pem"):
        (keys / name).write_bytes(b"\x00" * 32)
    (keys / "client.key").write_bytes(b"\x00" * 32)
    config = tmp_path / "g.toml"
    config.write_text(
        CONFIG.replace('"state"', '"gapped"').replace("keys/", "gkeys/"), encoding="utf-8"
    )
    out = tmp_path / "gapped.json"
    assert main(export_args(config, out)) == 1
    assert "gaps: records 5-9 missing (5)" in capsys.readouterr().out
    assert out.exists()  # written all the same: the auditor must see the incomplete log
    assert main(["audit", "verify", str(out), "--device-key", gapped.public.hex()]) == 1
    assert "records 5-9 missing (5)" in capsys.readouterr().out
