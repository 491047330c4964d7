"""CPU cost of the log pipeline: received bytes to MQTT PUBACK, against a local Mosquitto.

The gateway's real receive path runs in this process as the daemon runs it: a
:class:`~gateway.device_session.DeviceSession` per slot takes ATT notifications from a
link and feeds them through reassembly (``protocols.framing``), Noise transport decryption
(``protocols.noise``) and message decoding; :class:`~gateway.pipeline.LogPipeline` decodes
each batch, verifies its chain and signed checkpoint, commits it to the SQLite store with
its outbox message (on the store's worker thread), acknowledges it to the device; and
:class:`~gateway.mqtt.MqttBridge` publishes the outbox with QoS 1 and deletes the rows the
broker acknowledged. Batches are the daemon's defaults: ``[log] batch_size`` 500 records
per log read, ``[mqtt] publish_batch`` 100 outbox rows per drain, ``--slots`` sessions at
once.

The device side costs nothing during the measurement: every simulated device opens its
session with a real Noise_XX handshake (outside the measurement), then everything it will
send (log batches of 30-byte records with their signed checkpoints, and the answers to the
acknowledgements) is built, signed, encrypted with the device's own transport key and cut
into notifications in advance. The link releases one answer each time the gateway has
written a whole request. The link itself is the daemon's notification queue
(:class:`gateway.radio.base.Notifications`) without a radio below it, so radio CPU (Bumble's
HCI, L2CAP and ATT stacks) is not part of the figure.

Measured: CPU of this process (``getrusage``, every thread), and of its two busy threads
apart (the event loop, and the store's worker thread); records per CPU-second ("per core",
since the pipeline's work is serial per record); wall rate; and how the CPU rate compares
with the radio: the slots' aggregate best-case BLE rate, ``slots x
BEST_CASE.payload_throughput()`` (``simulators.timing``) divided by the notification bytes
each record costs on the air, every per-batch overhead included (batch header, checkpoint,
message header, Noise tag, fragment headers, the acknowledgement's answer). The gateway
logs as the daemon does by default (info, JSON lines; discarded unless ``--log``).

Run from the repository root (exit status 3: the figure missed its bar)::

    .venv/bin/python -m bench.pipeline
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.commands import Command, CommandVerifier
from gateway.device_session import DeviceSession
from gateway.logs import configure_logging
from gateway.metrics import Metrics
from gateway.mqtt import MqttBridge, MqttSettings
from gateway.pipeline import LogPipeline
from gateway.radio.base import Link, Notifications
from gateway.store import DeviceRecord, Store
from gateway.topics import Topics
from gateway.worker import BlockingWorker
from protocols.enums import DeviceKind, EventType, Reason
from protocols.framing import fragment
from protocols.logrecords import chain_genesis, encode_batch
from protocols.messages import LogAcked, LogBatchMessage, Message, encode_message
from protocols.noise import TransportState
from protocols.session import Channel, GatewaySessionConfig
from simulators.broker import Broker
from simulators.device import DeviceConnection, VirtualDevice
from simulators.timing import BEST_CASE
from tests.simulators.radio_central import Credentials, provision_directly

GATEWAY_ID = "gw-bench-1"
SITE_ID = 42
BAR_PER_CORE = 20_000
"""Records per CPU-second the pipeline must at least sustain."""
BAR_MISSED = 3
"""Exit status when the bench ran but its figure missed the bar (1: it did not run)."""

_LAST = 0x40
"""The LAST bit of a fragment header (protocols.framing)."""

# A door's day: a key is presented, the door opens and closes, the bolt locks again.
TRAFFIC = (
    (EventType.ACCESS_GRANTED, Reason.VALID_KEY),
    (EventType.UNLOCKED, Reason.VALID_KEY),
    (EventType.DOOR_OPENED, Reason.NONE),
    (EventType.DOOR_CLOSED, Reason.NONE),
    (EventType.LOCKED, Reason.NONE),
    (EventType.ACCESS_DENIED, Reason.OUTSIDE_SCHEDULE),
)


# ------------------------------------------------------------------------- the device side


class ReplayLink(Link):
    """The device's end of one connection as bytes.

    During the handshake the simulated device answers live. Then :meth:`replay` hands it
    the notifications of every later answer, built in advance; one answer is released each
    time the gateway has written the last fragment of a request.
    """

    def __init__(self, connection: DeviceConnection, mtu: int) -> None:
        self._connection: DeviceConnection | None = connection
        self._mtu = mtu
        self._address = connection.device.device_id.hex()
        self._notifications = Notifications(self._address)
        self._answers: deque[list[bytes]] = deque()
        self._connected = True
        self.written = 0

    def replay(self, answers: Sequence[list[bytes]]) -> None:
        """From now on, answer each request with the next of ``answers``."""
        self._connection = None
        self._answers.extend(answers)

    @property
    def address(self) -> str:
        return self._address

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def is_connected(self) -> bool:
        return self._connected

    async def write(self, fragment: bytes) -> None:
        self.written += len(fragment)
        if self._connection is not None:
            for answer in self._connection.receive(fragment):
                self._notifications.put(answer)
        elif fragment[0] & _LAST:
            for answer in self._answers.popleft():
                self._notifications.put(answer)

    async def receive(self) -> bytes:
        return await self._notifications.receive()

    async def disconnect(self) -> None:
        self._connected = False
        self._notifications.end()

    def add_disconnect_callback(self, callback: Callable[[], None]) -> None:
        self._notifications.add_callback(callback)


def device_transport(connection: DeviceConnection) -> TransportState:
    """The device's transport keys once its handshake is complete."""
    transport = connection.session._transport  # noqa: SLF001 - the device's own keys, to encrypt in advance what it would send
    assert transport is not None, "the handshake did not complete"
    return transport


@dataclass
class Answers:
    """What one device will send after the handshake, and what it costs on the air."""

    notifications: list[list[bytes]]
    records: int
    batches: int
    air_bytes: int  # notification payloads (ATT values), device to gateway
    fragments: int


def build_answers(
    device: VirtualDevice,
    transport: TransportState,
    *,
    records: int,
    batch_size: int,
    mtu: int,
    now: int,
) -> Answers:
    """Everything the device answers to the pipeline's reads and acknowledgements.

    The gateway numbers its requests 1, 2, 3, ... in a session and alternates LogRead and
    LogAck; a read that returns fewer than ``batch_size`` records ends the collection.
    """
    log = device.log
    answers: list[list[bytes]] = []
    request_id = 1
    air = fragments = batches = 0

    def send(message: Message) -> None:
        nonlocal request_id, air, fragments
        framed = bytes([Channel.TRANSPORT]) + transport.encrypt(encode_message(request_id, message))
        pieces = fragment(framed, mtu)
        answers.append(pieces)
        air += sum(len(piece) for piece in pieces)
        fragments += len(pieces)
        request_id += 1

    start = log.next_sequence - log.waiting
    assert start == 0, "a fresh device"
    index = 0
    while True:
        target = min(records, log.oldest_sequence + batch_size)
        while log.next_sequence < target:
            event, reason = TRAFFIC[index % len(TRAFFIC)]
            key_id = 1000 + index % 37 if reason is Reason.VALID_KEY else 0
            log.append(now, event, reason, key_id)
            index += 1
        first = log.oldest_sequence
        batch = log.read(first, batch_size, key=device.identity.signing_key, now=now)
        send(LogBatchMessage(batch=encode_batch(batch)))
        if not batch.records:
            break
        batches += 1
        last = batch.records[-1].sequence
        freed = log.acknowledge(last)
        send(LogAcked(up_to_sequence=last, freed=freed))
        if len(batch.records) < batch_size:
            break
    total = log.next_sequence
    return Answers(answers, total, batches, air, fragments)


# ------------------------------------------------------------------------ measurement


@dataclass
class Cpu:
    """CPU seconds of the process (every thread), of the event loop and of the store thread."""

    user: float
    system: float
    loop: float
    store: float

    @property
    def process(self) -> float:
        return self.user + self.system


async def cpu_now(worker: BlockingWorker) -> Cpu:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    loop = time.thread_time()
    store = await worker.run(time.thread_time)
    return Cpu(usage.ru_utime, usage.ru_stime, loop, store)


def broker_cpu(broker: Broker) -> float:
    """CPU seconds of the Mosquitto process so far (Linux /proc)."""
    process = broker._process  # noqa: SLF001 - the broker's pid, for its CPU time only
    if process is None:
        return float("nan")
    fields = Path(f"/proc/{process.pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1]
    utime, stime = fields.split()[11:13]
    return (int(utime) + int(stime)) / _CLOCK_TICKS


_CLOCK_TICKS = 100  # os.sysconf("SC_CLK_TCK") on Linux


async def handler(command: Command) -> dict[str, Any]:
    """No command is sent in this bench; one would be answered with an empty result."""
    del command
    return {}


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:  # noqa: ASYNC109 - a bound on the whole wait
    """Poll ``predicate`` (the bridge's counters, which signal nothing) until it holds."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - polled: no event is set when it changes
                await asyncio.sleep(0.005)
    except TimeoutError:
        msg = f"{what} not reached within {timeout} s"
        raise TimeoutError(msg) from None


@dataclass
class Session:
    device: VirtualDevice
    link: ReplayLink
    session: DeviceSession
    record: DeviceRecord
    answers: Answers


async def open_sessions(
    store: Store,
    worker: BlockingWorker,
    credentials: Credentials,
    args: argparse.Namespace,
    now: int,
) -> list[Session]:
    """Devices provisioned and stored as pairing leaves them; a session open with each."""
    sessions: list[Session] = []
    for _ in range(args.devices):
        device = VirtualDevice(DeviceKind.DOOR_LOCK, log_capacity=max(2000, args.batch_size * 2))
        device.clock.set(now)
        pinned = provision_directly(device, credentials, site_id=SITE_ID, now=now)
        record = DeviceRecord(
            device_id=device.device_id,
            kind=int(DeviceKind.DOOR_LOCK),
            address=device.device_id.hex(),
            signing_key=pinned.signing_key,
            noise_key=pinned.noise_key,
            site_id=SITE_ID,
            paired_at=now,
            chain_next_sequence=0,
            chain_head=chain_genesis(device.device_id),
            reachable=True,
        )
        await worker.run(store.upsert_device, record)
        link = ReplayLink(DeviceConnection(device, mtu=args.mtu), args.mtu)
        config = GatewaySessionConfig(
            noise_key=credentials.noise_key,
            device_id=device.device_id,
            now=now,
            certificate=credentials.certificate,
            pinned_signing_key=pinned.signing_key,
            pinned_noise_key=pinned.noise_key,
        )
        session = DeviceSession(link, config)
        await session.open()
        connection = link._connection  # noqa: SLF001 - the bench's own link
        assert connection is not None
        answers = build_answers(
            device,
            device_transport(connection),
            records=args.records,
            batch_size=args.batch_size,
            mtu=args.mtu,
            now=now,
        )
        link.replay(answers.notifications)
        sessions.append(Session(device, link, session, record, answers))
    return sessions


@dataclass
class Gateway:
    """The gateway's side in this process: store, worker, pipeline and MQTT bridge."""

    store: Store
    worker: BlockingWorker
    pipeline: LogPipeline
    bridge: MqttBridge


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the measurement; the figures by name."""
    now = int(time.time())
    credentials = Credentials.issue(now=now, sites=(SITE_ID,))
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-", dir=args.store_dir) as tmp:
        root = Path(tmp)
        broker = Broker(root / "broker")
        broker.start()
        store = Store.open(root / "lockgw.sqlite3")
        try:
            async with BlockingWorker("store") as worker:
                began = time.perf_counter()
                sessions = await open_sessions(store, worker, credentials, args, now)
                prepared = time.perf_counter() - began

                async def remember(_jti: str, _expires_at: float, _now: float) -> bool:
                    return True

                authority = credentials.authority.public_key()
                settings = MqttSettings(
                    host=broker.host,
                    port=broker.port,
                    gateway_id=GATEWAY_ID,
                    publish_batch=args.publish_batch,
                )
                bridge = MqttBridge(
                    settings,
                    worker,
                    store,
                    CommandVerifier(authority, GATEWAY_ID, remember),
                    handler,
                )
                topics = Topics("lockgw", GATEWAY_ID)
                pipeline = LogPipeline(
                    store, worker, topics, batch_size=args.batch_size, metrics=Metrics()
                )
                gateway = Gateway(store, worker, pipeline, bridge)
                figures = await _measure(args, gateway, broker, sessions)
                figures["preparation_s"] = prepared
                return figures
        finally:
            store.close()
            broker.stop()


async def _collect_all(gateway: Gateway, sessions: Sequence[Session], slots: int) -> int:
    """Collect from every session, ``slots`` at a time, as the scheduler does; new events."""
    queue: asyncio.Queue[Session] = asyncio.Queue()
    for session in sessions:
        queue.put_nowait(session)
    collected = 0

    async def slot() -> None:
        nonlocal collected
        while not queue.empty():
            session = queue.get_nowait()
            try:
                result = await gateway.pipeline.collect(session.session, session.record)
            finally:
                await session.session.close()
            collected += result.new_events
            gateway.bridge.notify_outbox()  # as the scheduler does after each session

    async with asyncio.TaskGroup() as group:
        for _ in range(slots):
            group.create_task(slot())
    return collected


async def _measure(
    args: argparse.Namespace, gateway: Gateway, broker: Broker, sessions: Sequence[Session]
) -> dict[str, Any]:
    bridge, worker = gateway.bridge, gateway.worker
    bridge_task = asyncio.create_task(bridge.run(), name="mqtt")
    profiler = StoreProfiler(args.profile)
    try:
        await wait_until(lambda: bridge.connected, 10.0, "the bridge connected")
        acked_before = bridge.counters.acked
        expected = sum(s.answers.batches for s in sessions)
        await profiler.start(worker)
        cpu_before = await cpu_now(worker)
        broker_before = broker_cpu(broker)
        wall_began = time.perf_counter()
        collected = await _collect_all(gateway, sessions, args.slots)
        collected_at = time.perf_counter()
        await wait_until(
            lambda: bridge.counters.acked - acked_before >= expected, args.budget, "every PUBACK"
        )
        while await worker.run(gateway.store.outbox_depth):
            pass  # the acknowledged rows are being deleted
        wall = time.perf_counter() - wall_began
        cpu_after = await cpu_now(worker)
        broker_after = broker_cpu(broker)
        await profiler.stop(worker)
    finally:
        bridge_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bridge_task

    records = sum(s.answers.records for s in sessions)
    assert collected == records, f"{collected} of {records} records stored"
    cpu = Cpu(
        cpu_after.user - cpu_before.user,
        cpu_after.system - cpu_before.system,
        cpu_after.loop - cpu_before.loop,
        cpu_after.store - cpu_before.store,
    )
    air_bytes = sum(s.answers.air_bytes for s in sessions)
    per_record_air = air_bytes / records
    per_core = records / cpu.process
    figures: dict[str, Any] = {
        "devices": args.devices,
        "slots": args.slots,
        "mtu": args.mtu,
        "batch_size": args.batch_size,
        "publish_batch": args.publish_batch,
        "records": records,
        "batches": expected,
        "notifications": sum(s.answers.fragments for s in sessions),
        "wall_s": wall,
        "collection_wall_s": collected_at - wall_began,
        "cpu_user_s": cpu.user,
        "cpu_system_s": cpu.system,
        "cpu_process_s": cpu.process,
        "cpu_event_loop_s": cpu.loop,
        "cpu_store_thread_s": cpu.store,
        "cpu_broker_s": broker_after - broker_before,
        "records_per_cpu_s": per_core,
        "records_per_wall_s": records / wall,
        "air_bytes_per_record": per_record_air,
        "bar_records_per_cpu_s": BAR_PER_CORE,
        "meets_bar": per_core >= BAR_PER_CORE,
        "uplink_bytes_per_batch": air_bytes / expected,
        "gateway_writes_bytes": sum(s.link.written for s in sessions),
    }
    throughput = BEST_CASE.payload_throughput()
    ble_rate = args.slots * throughput / per_record_air
    figures["ble_payload_bytes_per_s_per_slot"] = throughput
    figures["ble_best_case_records_per_s"] = ble_rate
    figures["cpu_rate_over_ble_rate"] = per_core / ble_rate
    figures["slots_one_core_keeps_up_with"] = per_core * per_record_air / throughput
    return figures


class StoreProfiler:
    """pyinstrument on the store's worker thread, when ``--profile`` is given."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.profiler: Any = None

    async def start(self, worker: BlockingWorker) -> None:
        if self.path is None:
            return
        from pyinstrument import Profiler  # noqa: PLC0415 - only when profiling

        self.profiler = Profiler(async_mode="disabled")
        await worker.run(self.profiler.start)  # profiles the thread that starts it

    async def stop(self, worker: BlockingWorker) -> None:
        if self.profiler is None or self.path is None:
            return
        await worker.run(self.profiler.stop)
        html = self.path.with_suffix(".store.html")
        html.write_text(self.profiler.output_html(), encoding="utf-8")
        print("store worker thread:")
        print(self.profiler.output_text(unicode=False, color=False))


# ------------------------------------------------------------------------------- output


def rows(figures: dict[str, Any]) -> list[tuple[str, str]]:
    """The table of the figures."""
    f = figures
    table = [
        (
            "set-up",
            (
                f"{f['devices']} devices, {f['slots']} slots, MTU {f['mtu']}, "
                f"{f['batch_size']} records per log read, {f['publish_batch']} rows per drain"
            ),
        ),
        (
            "records / batches / notifications",
            f"{f['records']} / {f['batches']} / {f['notifications']}",
        ),
        ("wall: collected / all PUBACKs", f"{f['collection_wall_s']:.2f} / {f['wall_s']:.2f} s"),
        (
            "process CPU: user + system",
            f"{f['cpu_user_s']:.2f} + {f['cpu_system_s']:.2f} = {f['cpu_process_s']:.2f} s",
        ),
        (
            "  event loop thread / store thread",
            f"{f['cpu_event_loop_s']:.2f} / {f['cpu_store_thread_s']:.2f} s",
        ),
        ("  (Mosquitto, another process)", f"{f['cpu_broker_s']:.2f} s"),
        (
            "records per CPU-second (per core)",
            (
                f"{f['records_per_cpu_s']:,.0f} "
                f"(bar {BAR_PER_CORE:,}: {'met' if f['meets_bar'] else 'MISSED'})"
            ),
        ),
        ("records per wall second", f"{f['records_per_wall_s']:,.0f}"),
        (
            "on the air, device to gateway",
            (
                f"{f['air_bytes_per_record']:.2f} bytes per record "
                f"({f['uplink_bytes_per_batch']:,.0f} per batch with its acknowledgement)"
            ),
        ),
    ]
    table += [
        (
            f"BLE best case, {f['slots']} slots",
            (
                f"{f['ble_payload_bytes_per_s_per_slot']:,.0f} B/s per slot: "
                f"{f['ble_best_case_records_per_s']:,.0f} records/s"
            ),
        ),
        ("CPU rate / BLE rate", f"{f['cpu_rate_over_ble_rate']:.1f}"),
        ("best-case slots one core keeps up with", f"{f['slots_one_core_keeps_up_with']:.1f}"),
    ]
    return table


def print_table(title: str, table: Sequence[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in table)
    print(title)
    for name, value in table:
        print(f"{name:<{width}}  {value}")


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, measure (``--repeat`` times), print the table, write JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--records", type=int, default=5000, help="records per device")
    parser.add_argument("--slots", type=int, default=5, help="sessions at once ([scheduler])")
    parser.add_argument("--mtu", type=int, default=517, help="ATT MTU ([radio] mtu)")
    parser.add_argument("--batch-size", type=int, default=500, help="[log] batch_size")
    parser.add_argument("--publish-batch", type=int, default=100, help="[mqtt] publish_batch")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    parser.add_argument("--budget", type=float, default=300.0, help="seconds to wait for PUBACKs")
    parser.add_argument("--store-dir", type=Path, help="where the SQLite store goes (a temp dir)")
    parser.add_argument("--profile", type=Path, help="write a pyinstrument HTML profile here")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--log", type=Path, help="the gateway's log lines (default: discarded)")
    args = parser.parse_args(argv)
    if min(args.devices, args.records, args.slots, args.repeat) < 1:
        parser.error("--devices, --records, --slots and --repeat must be positive")

    # As the daemon logs by default ([logging] level info, json lines to the journal).
    log_stream = (args.log or Path(os.devnull)).open("a", encoding="utf-8")
    configure_logging("info", "json", stream=log_stream)
    load_before = load_average()
    runs = []
    for _ in range(args.repeat):
        if args.profile is not None:
            runs.append(profiled(args))
        else:
            runs.append(asyncio.run(bench(args)))
    median = sorted(runs, key=lambda run: run["records_per_cpu_s"])[len(runs) // 2]
    rates = [run["records_per_cpu_s"] for run in runs]
    print_table(
        f"python {sys.version.split()[0]}; load average before {load_before}, "
        f"after {load_average()}; median of {len(runs)} run(s)",
        rows(median),
    )
    if len(runs) > 1:
        print(f"records per CPU-second, every run: {', '.join(f'{r:,.0f}' for r in rates)}")
    if args.json is not None:
        document = {
            "bench": "pipeline",
            "load_average": {"before": load_before, "after": load_average()},
            "median": median,
            "runs": runs,
            "records_per_cpu_s_stdev": statistics.pstdev(rates),
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0 if median["meets_bar"] else BAR_MISSED


def profiled(args: argparse.Namespace) -> dict[str, Any]:
    """One run under pyinstrument (event loop thread), its HTML written to ``--profile``."""
    from pyinstrument import Profiler  # noqa: PLC0415 - only when profiling

    profiler = Profiler(async_mode="disabled")
    profiler.start()
    try:
        figures = asyncio.run(bench(args))
    finally:
        profiler.stop()
    assert args.profile is not None
    args.profile.write_text(profiler.output_html(), encoding="utf-8")
    print(profiler.output_text(unicode=False, color=False, show_all=False))
    return figures


if __name__ == "__main__":
    sys.exit(main())
