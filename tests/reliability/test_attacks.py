"""Attacks, part one: tampered event logs (the other families are in test_attacks_*.py).

Every kind of tampering an attacker with write access to a batch in transit, to the
gateway's store or to an audit export can do (delete a record, reorder two, alter one
byte, truncate, swap the checkpoint for another batch's or another device's) is drawn
many times with a seeded generator and must be refused by :func:`verify_batch` (the
gateway's check of every batch it collects) and by :func:`gateway.audit.verify_export`
(the auditor's check of an export), naming the first bad record where the API does.

The default run draws 1,000 tampered batches and 1,000 tampered exports per kind; the
``soak`` run 20,000 of each.
"""

from __future__ import annotations

import copy
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import pytest

from gateway.audit import FORMAT, verify_export
from protocols.enums import EventType, Reason
from protocols.errors import ErrorCode, LogVerificationError, ProtocolError
from protocols.identity import DeviceIdentity, format_device_id
from protocols.logrecords import (
    RECORD_SIZE,
    ChainState,
    DeviceLog,
    decode_batch,
    encode_batch,
    verify_batch,
)
from tests.reliability.conftest import Figures

SEED: Final = 20260601
PER_KIND: Final = 1000
SOAK_PER_KIND: Final = 20_000
BATCH_RECORDS: Final = 5
BATCHES: Final = 10
HEADER: Final = 4 + 32 + 2  # start sequence, start head, count
CHECKPOINT_SIZE: Final = 104
KINDS: Final = ("delete", "reorder", "alter", "truncate", "swap_checkpoint")

_EVENTS: Final = (
    (EventType.ACCESS_GRANTED, Reason.VALID_KEY),
    (EventType.ACCESS_DENIED, Reason.KEY_REVOKED),
    (EventType.DOOR_OPENED, Reason.MANUAL),
    (EventType.DOOR_CLOSED, Reason.MANUAL),
    (EventType.LOCKED, Reason.MANUAL),
)


def _identity(rng: random.Random) -> DeviceIdentity:
    return DeviceIdentity.from_secret_bytes(rng.randbytes(32), rng.randbytes(32))


@dataclass(frozen=True)
class Chain:
    """A device's log read as consecutive signed batches, in wire form."""

    identity: DeviceIdentity
    batches: tuple[bytes, ...]
    states: tuple[ChainState, ...]
    """The verified chain state before each batch, as the gateway holds it."""

    @property
    def device_id(self) -> bytes:
        return self.identity.device_id


def make_chain(rng: random.Random) -> Chain:
    """A device that logged ``BATCHES * BATCH_RECORDS`` events, read batch by batch."""
    identity = _identity(rng)
    log = DeviceLog(identity.device_id, BATCHES * BATCH_RECORDS + 10)
    start = 1_760_000_000
    for index in range(BATCHES * BATCH_RECORDS):
        event, reason = rng.choice(_EVENTS)
        log.append(start + 37 * index, event, reason, key_id=rng.randrange(0, 5000))
    batches = tuple(
        encode_batch(
            log.read(
                first,
                BATCH_RECORDS,
                key=identity.signing_key,
                now=start + 37 * (first + BATCH_RECORDS),
            )
        )
        for first in range(0, BATCHES * BATCH_RECORDS, BATCH_RECORDS)
    )
    states = tuple(ChainState(int.from_bytes(data[:4], "big"), data[4:36]) for data in batches)
    return Chain(identity, batches, states)


@dataclass(frozen=True)
class Tampered:
    """One tampered batch: its wire bytes and the record position that must be named."""

    kind: str
    batch_index: int
    data: bytes
    named: int | None
    """Index within the batch of the first bad record the verifier must name (None: the
    tampering makes the batch unparseable, or the fault is the checkpoint's own)."""


def _records(data: bytes) -> list[bytes]:
    count = int.from_bytes(data[HEADER - 2 : HEADER], "big")
    return [data[HEADER + i * RECORD_SIZE : HEADER + (i + 1) * RECORD_SIZE] for i in range(count)]


def _rebuild(data: bytes, records: list[bytes], checkpoint: bytes | None = None) -> bytes:
    return (
        data[: HEADER - 2]
        + len(records).to_bytes(2, "big")
        + b"".join(records)
        + (data[-CHECKPOINT_SIZE:] if checkpoint is None else checkpoint)
    )


def tamper(kind: str, chain: Chain, other: Chain, rng: random.Random) -> Tampered:
    """Draw one tampering of ``kind`` on a random batch of ``chain``."""
    index = rng.randrange(len(chain.batches))
    data = chain.batches[index]
    records = _records(data)
    count = len(records)
    if kind == "delete":
        position = rng.randrange(count)
        del records[position]
        return Tampered(kind, index, _rebuild(data, records), position)
    if kind == "reorder":
        first, second = sorted(rng.sample(range(count), 2))
        records[first], records[second] = records[second], records[first]
        return Tampered(kind, index, _rebuild(data, records), first)
    if kind == "alter":
        position = rng.randrange(count)
        record = bytearray(records[position])
        record[rng.randrange(RECORD_SIZE)] ^= rng.randrange(1, 256)
        records[position] = bytes(record)
        return Tampered(kind, index, _rebuild(data, records), position)
    if kind == "truncate":
        kept = rng.randrange(count)  # at least one record cut off the end
        return Tampered(kind, index, _rebuild(data, records[:kept]), kept)
    assert kind == "swap_checkpoint"
    if rng.random() < 0.5:
        donor = rng.choice([b for i, b in enumerate(chain.batches) if i != index])
    else:
        donor = other.batches[index]  # another device's checkpoint of the same position
    return Tampered(kind, index, _rebuild(data, records, donor[-CHECKPOINT_SIZE:]), None)


def check_batch(tampered: Tampered, chain: Chain) -> tuple[str, LogVerificationError | None]:
    """Run the gateway's check; the code it refused with ("" if it accepted)."""
    state = chain.states[tampered.batch_index]
    try:
        batch = decode_batch(tampered.data)
        verify_batch(
            batch,
            device_id=chain.device_id,
            device_key=chain.identity.signing_key.public_key(),
            state=state,
        )
    except LogVerificationError as exc:
        return exc.code.name, exc
    except ProtocolError as exc:  # unparseable: an altered enum byte, a bad count
        return exc.code.name, None
    return "", None


def export_document(chain: Chain, batches: list[bytes]) -> dict[str, Any]:
    """An audit export (``lockgw-audit/1``) holding ``batches`` of ``chain``."""

    def item(data: bytes) -> dict[str, Any]:
        records = _records(data)
        return {
            "start_sequence": int.from_bytes(data[:4], "big"),
            "start_head": data[4:36].hex(),
            "records": b"".join(records).hex(),
            "checkpoint": data[-CHECKPOINT_SIZE:].hex(),
        }

    return {
        "format": FORMAT,
        "device_id": format_device_id(chain.device_id),
        "device_key": chain.identity.signing_public.hex(),
        "range": {"from_unix": 0, "to_unix": 2**32 - 1},
        "revealed": False,
        "batches": [item(data) for data in batches],
        "events": [],
    }


@dataclass
class Tally:
    per_kind: Counter[str]
    detected: Counter[str]
    codes: dict[str, Counter[str]]
    misnamed: list[str]

    @classmethod
    def new(cls) -> Tally:
        return cls(Counter(), Counter(), {kind: Counter() for kind in KINDS}, [])


def run(count: int, seed: int) -> tuple[Tally, Tally]:
    """``count`` tampered batches of each kind, each checked twice: alone by
    :func:`verify_batch`, and inside an audit export by :func:`verify_export`.

    Each export holds two consecutive batches, one of them tampered; its failure must
    name that batch and the same record :func:`verify_batch` names.
    """
    rng = random.Random(seed)
    chain, other = make_chain(rng), make_chain(rng)
    batches, exports = Tally.new(), Tally.new()
    for kind in KINDS:
        for _ in range(count):
            tampered = tamper(kind, chain, other, rng)
            code, error = check_batch(tampered, chain)
            batches.per_kind[kind] += 1
            batches.codes[kind][code or "ACCEPTED"] += 1
            if code:
                batches.detected[kind] += 1
            if error is not None and tampered.named is not None and error.index != tampered.named:
                batches.misnamed.append(f"{kind}: named {error.index}, expected {tampered.named}")

            index = tampered.batch_index
            neighbour = index + 1 if index + 1 < len(chain.batches) else index - 1
            pair = sorted([(index, tampered.data), (neighbour, chain.batches[neighbour])])
            result = verify_export(export_document(chain, [data for _, data in pair]))
            failure = result.failure
            export_code = "" if result.intact else (failure.code if failure else "GAP")
            exports.per_kind[kind] += 1
            exports.codes[kind][export_code or "ACCEPTED"] += 1
            if export_code:
                exports.detected[kind] += 1
            if failure is None or failure.code == "MALFORMED":
                continue
            position = [i for i, _ in pair].index(index)
            expected = None if error is None else error.sequence
            if failure.batch_index != position or failure.sequence != expected:
                exports.misnamed.append(
                    f"{kind}: export names batch {failure.batch_index} record "
                    f"{failure.sequence}, expected batch {position} record {expected}"
                )
    return batches, exports


def _check_and_record(figures: Figures, count: int, seed: int) -> None:
    started = time.monotonic()
    batches, exports = run(count, seed)
    elapsed = time.monotonic() - started
    for tally, what in ((batches, "verify_batch"), (exports, "verify_export")):
        missed = {k: tally.per_kind[k] - tally.detected[k] for k in KINDS}
        assert sum(missed.values()) == 0, (what, missed, tally.codes)
        assert tally.misnamed == [], (what, tally.misnamed[:10])
        assert all(tally.per_kind[k] == count for k in KINDS)
    per_kind = {
        kind: {"batches": batches.per_kind[kind], "exports": exports.per_kind[kind]}
        for kind in KINDS
    }
    detected = sum(batches.detected.values()) + sum(exports.detected.values())
    total = sum(batches.per_kind.values()) + sum(exports.per_kind.values())
    figures(
        "log_tampering",
        per_kind=per_kind,
        detected=detected,
        missed=total - detected,
        misnamed=0,
        seed=seed,
        seconds=round(elapsed, 2),
        batch_codes={kind: dict(batches.codes[kind]) for kind in KINDS},
        export_codes={kind: dict(exports.codes[kind]) for kind in KINDS},
    )


def test_every_tampered_batch_and_export_is_detected(figures: Figures) -> None:
    _check_and_record(figures, PER_KIND, SEED)


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_every_tampered_batch_and_export_is_detected_soak(figures: Figures) -> None:
    _check_and_record(figures, SOAK_PER_KIND, SEED + 100)


def test_each_kind_has_its_own_code() -> None:
    """The protocol names each tampering: the codes of docs/protocol.md section 6.3."""
    rng = random.Random(SEED)
    chain, other = make_chain(rng), make_chain(rng)
    records = _records(chain.batches[3])
    seen: dict[str, set[str]] = {}
    cases: dict[str, Callable[[], bytes]] = {
        "delete": lambda: _rebuild(chain.batches[3], records[:2] + records[3:]),
        "reorder": lambda: _rebuild(chain.batches[3], [records[1], records[0], *records[2:]]),
        "alter": lambda: _rebuild(
            chain.batches[3],
            [records[0][:10] + bytes([records[0][10] ^ 1]) + records[0][11:], *records[1:]],
        ),
        "truncate": lambda: _rebuild(chain.batches[3], records[:-2]),
        "swap_checkpoint": lambda: _rebuild(
            chain.batches[3], records, other.batches[3][-CHECKPOINT_SIZE:]
        ),
    }
    for kind, make in cases.items():
        code, _ = check_batch(Tampered(kind, 3, make(), None), chain)
        seen[kind] = {code}
    assert seen == {
        "delete": {ErrorCode.LOG_GAP.name},
        "reorder": {ErrorCode.LOG_REORDER.name},
        "alter": {ErrorCode.LOG_ALTERED.name},
        "truncate": {ErrorCode.LOG_TRUNCATED.name},
        "swap_checkpoint": {ErrorCode.LOG_BAD_CHECKPOINT.name},
    }
    # The untampered batch and a whole untampered export verify: no false alarms.
    assert check_batch(Tampered("none", 3, chain.batches[3], None), chain) == ("", None)
    assert verify_export(export_document(chain, list(chain.batches))).intact


def test_dropping_a_whole_trailing_batch_is_not_visible_in_an_export() -> None:
    """What an export cannot show: it carries no signed count of its batches, so an export
    cut after a whole batch verifies as intact (for a shorter range). The registry's own
    copy of the events (delivered at least once, de-duplicated by sequence) is what shows
    such a cut; this pins the limit down so that it stays documented."""
    chain = make_chain(random.Random(SEED))
    whole = export_document(chain, list(chain.batches))
    cut = copy.deepcopy(whole)
    cut["batches"] = cut["batches"][:-1]
    assert verify_export(whole).intact
    result = verify_export(cut)
    assert result.intact
    assert result.records == (BATCHES - 1) * BATCH_RECORDS
    # A cut inside a batch, by contrast, is refused: the checkpoint covers the lost records.
    inner = copy.deepcopy(whole)
    inner["batches"][-1]["records"] = inner["batches"][-1]["records"][: -2 * RECORD_SIZE * 2]
    failure = verify_export(inner).failure
    assert failure is not None
    assert failure.code == ErrorCode.LOG_TRUNCATED.name
    assert failure.batch_index == BATCHES - 1
