"""Commit log batches to a store in a loop until killed: the hard-kill durability test.

Usage: ``python store_crash_worker.py DBPATH``

The worker resumes from the chain cursor stored in DBPATH (registering its device on the
first run), commits one batch of real, hash-chained records with a signed checkpoint and
an outbox message that publishes them, then writes the last committed sequence on a line
of its own and flushes stdout. Now and then it acknowledges the oldest outbox message,
as a broker PUBACK would, so that kills also land in that transaction. Every line it
wrote therefore names a sequence that was durably stored before the line existed.

It stops on its own after :data:`MAX_SECONDS`, so that a test that dies before killing
it leaves no process behind for long. The batch builder is shared with the tests.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.store import DeviceRecord, OutboxMessage, Store
from protocols.enums import DeviceKind, EventType, Reason
from protocols.logrecords import (
    NO_SEQUENCE,
    LogRecord,
    chain_genesis,
    chain_next,
    encode_checkpoint,
    encode_record,
    sign_checkpoint,
)

DEVICE_ID = bytes.fromhex("10c4000000000001")
DEVICE_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
"""A fixed device key, so that the tests can re-verify what the worker stored."""

MAX_BATCH = 40
"""Most records the worker puts in one batch."""

MAX_SECONDS = 20.0
BASE_TIME = 1_760_000_000


@dataclass(frozen=True)
class Batch:
    """A batch as the gateway holds it after verification, ready for ``commit_batch``."""

    start_sequence: int
    start_head: bytes
    records: tuple[LogRecord, ...]
    raw_records: bytes
    checkpoint: bytes
    next_sequence: int
    head: bytes

    @property
    def sequences(self) -> tuple[int, ...]:
        """The sequences of the records."""
        return tuple(record.sequence for record in self.records)


def device_record(device_id: bytes = DEVICE_ID, *, site_id: int = 7) -> DeviceRecord:
    """A freshly paired device at the genesis of its log."""
    return DeviceRecord(
        device_id=device_id,
        kind=int(DeviceKind.DOOR_LOCK),
        address="C0:FF:EE:00:00:01",
        signing_key=DEVICE_KEY.public_key().public_bytes_raw(),
        noise_key=bytes(32),
        site_id=site_id,
        paired_at=BASE_TIME,
        chain_next_sequence=0,
        chain_head=chain_genesis(device_id),
    )


def build_batch(
    *,
    start_sequence: int,
    start_head: bytes,
    count: int,
    device_id: bytes = DEVICE_ID,
    event: EventType = EventType.DOOR_OPENED,
    time_of: int | None = None,
) -> Batch:
    """``count`` chained records from ``start_sequence``, as a device would send them.

    Record ``s`` happens at ``BASE_TIME + 60 * s`` unless ``time_of`` fixes one time.
    """
    head = start_head
    records: list[LogRecord] = []
    raw: list[bytes] = []
    for sequence in range(start_sequence, start_sequence + count):
        record = LogRecord(
            sequence=sequence,
            time=BASE_TIME + 60 * sequence if time_of is None else time_of,
            event=event,
            reason=Reason.VALID_KEY,
            key_id=sequence % 5,
            payload=sequence.to_bytes(8, "big"),
            link=head[:8],
        )
        encoded = encode_record(record)
        records.append(record)
        raw.append(encoded)
        head = chain_next(head, encoded)
    covered = start_sequence + count - 1 if start_sequence + count > 0 else NO_SEQUENCE
    checkpoint = sign_checkpoint(DEVICE_KEY, device_id, covered, head, BASE_TIME)
    return Batch(
        start_sequence=start_sequence,
        start_head=start_head,
        records=tuple(records),
        raw_records=b"".join(raw),
        checkpoint=encode_checkpoint(checkpoint),
        next_sequence=start_sequence + count,
        head=head,
    )


def main(argv: list[str]) -> int:
    """Run the loop against the database named in ``argv[1]``."""
    path = Path(argv[1])
    rng = random.Random()
    deadline = time.monotonic() + MAX_SECONDS
    with Store.open(path) as store:
        if store.get_device(DEVICE_ID) is None:
            store.upsert_device(device_record())
        while time.monotonic() < deadline:
            device = store.get_device(DEVICE_ID)
            assert device is not None
            batch = build_batch(
                start_sequence=device.chain_next_sequence,
                start_head=device.chain_head,
                count=rng.randint(1, MAX_BATCH),
            )
            message = OutboxMessage(
                topic=f"lockgw/events/{DEVICE_ID.hex()}",
                payload=batch.raw_records,
                kind="events",
                event_sequences=batch.sequences,
            )
            store.commit_batch(
                DEVICE_ID,
                start_sequence=batch.start_sequence,
                start_head=batch.start_head,
                checkpoint=batch.checkpoint,
                raw_records=batch.raw_records,
                records=batch.records,
                new_next_sequence=batch.next_sequence,
                new_head=batch.head,
                outbox=[message],
                received_at=time.time(),
            )
            sys.stdout.write(f"{batch.next_sequence - 1}\n")
            sys.stdout.flush()
            if rng.random() < 0.5:
                oldest = store.outbox_peek(1)
                store.outbox_done([row.id for row in oldest], time.time())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
