"""Footprint of the daemon: memory with 200 devices, start-up time, devices per simulator.

(a) Memory. A real ``lockgw run`` process with ``--devices`` simulated door locks (the
simulator is a process of its own serving its virtual radio over TCP), paired beforehand
as a technician pairs them (``tests.installation.pair_all``; the simulator advertises
fast while pairing, then is restarted from its saved state at ``--advertising-interval``),
each holding ``--records`` log records waiting. The installation is made with the CLI;
its configuration is the daemon's default where it matters here (5 slots, MTU 517, the
metrics endpoint on). The daemon collects every device; the reference registry
re-verifies what it publishes.
Measured from ``/proc/PID/status``: VmRSS when the gateway is online, VmRSS once every
device's log is collected (acknowledged on the device and received by the registry),
and VmHWM, the peak. Bar: under 60 MiB.

(b) Start-up. From the exec of ``lockgw run`` to the retained ``online`` status arriving at
a subscriber that subscribed before the start, with the same installation (its store
holding the devices, the simulator serving the radio); the median of ``--startups``
runs. Bar: under 1 s.

(c) Devices in one simulator process: ``bench.sim_fleet`` in a child process, with
``--sim-devices`` devices and an even sample of ``--sim-sessions`` sessions (its own
command, ``python -m bench.sim_fleet --devices 1000``, opens a session with each).

Run from the repository root (it uses the end-to-end tests' installation helpers; exit
status 3: a figure missed its bar)::

    .venv/bin/python -m bench.footprint
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt

from bench._common import Listener
from simulators.broker import free_port
from simulators.registry import ReferenceRegistry
from tests.broker import Mosquitto
from tests.installation import (
    Installation,
    install,
    make_registry,
    pair_all,
    start_daemon,
    stop_daemon,
)
from tests.processes import REPO_ROOT, SimProcess

MIB = 1024 * 1024
RSS_BAR_MIB = 60.0
STARTUP_BAR_S = 1.0
BAR_MISSED = 3
"""Exit status when the bench ran but a figure missed its bar (1: it did not run)."""
WAIT = 120.0
"""Seconds any one stage may take before the bench gives up."""

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------- process figures


def proc_status(pid: int) -> dict[str, int]:
    """The ``Vm*`` and ``Rss*`` lines of /proc/PID/status, in bytes."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if name.startswith(("Vm", "Rss")) and len(parts) == 2 and parts[1] == "kB":
            values[name] = int(parts[0]) * 1024
    return values


def proc_cpu(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text(encoding="utf-8").split()[:3])


def print_table(title: str, table: Sequence[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in table)
    print(title)
    for name, value in table:
        print(f"{name:<{width}}  {value}")


def write_json(path: Path | None, document: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def tune(config: Path, replacements: dict[str, str]) -> None:
    """Edit the installation's configuration file: each ``old`` text becomes ``new``."""
    text = config.read_text(encoding="utf-8")
    for old, new in replacements.items():
        assert old in text, f"{old!r} not in {config}"
        text = text.replace(old, new)
    config.write_text(text, encoding="utf-8")


def daemon_defaults(installation: Installation, *, slots: int = 5) -> None:
    """The daemon's defaults where the test installation differs: slots, MTU, metrics."""
    tune(
        installation.config,
        {
            "slots = 2\n": f"slots = {slots}\n",
            "mtu = 247\n": "mtu = 517\n",
            "[metrics]\nenabled = false\n": (
                f'[metrics]\nenabled = true\nlisten = "127.0.0.1:{free_port()}"\n'
            ),
        },
    )


class StatusWatch(Listener):
    """A subscriber to gateway status topics, subscribed before any gateway starts; every
    message is timestamped on arrival (``time.perf_counter``)."""

    def __init__(self, broker: Mosquitto, topic: str = "lockgw/gw/+/status") -> None:
        self.broker = broker
        self.topic = topic
        self.seen: list[tuple[float, str, dict[str, Any]]] = []
        self._changed = asyncio.Event()
        self._ready = asyncio.Event()

    async def _run(self) -> None:
        async with aiomqtt.Client(
            self.broker.host, self.broker.port, identifier=f"bench-watch-{os.getpid()}"
        ) as client:
            await client.subscribe(self.topic, qos=1)
            self._ready.set()
            async for message in client.messages:
                arrived = time.perf_counter()
                if isinstance(message.payload, bytes) and message.payload:
                    body = json.loads(message.payload)
                    self.seen.append((arrived, str(message.topic), body))
                    self._changed.set()

    async def wait(
        self,
        predicate: Callable[[float, str, dict[str, Any]], bool],
        after: int = 0,
        timeout: float = WAIT,  # noqa: ASYNC109 - a bound on the whole wait
    ) -> tuple[float, int]:
        """The arrival time of the first message from index ``after`` on that matches, and
        the index after it."""
        async with asyncio.timeout(timeout):
            while True:
                for index in range(after, len(self.seen)):
                    arrived, topic, body = self.seen[index]
                    if predicate(arrived, topic, body):
                        return arrived, index + 1
                after = len(self.seen)
                self._changed.clear()
                await self._changed.wait()


def check_exit(installation: Installation, code: int) -> None:
    """A daemon that did not exit 0 on SIGTERM fails the bench, with the end of its log."""
    if code != 0:
        log = (installation.root / "daemon.log").read_text(encoding="utf-8")
        msg = f"lockgw run exited with {code}; the end of its log:\n{log[-3000:]}"
        raise RuntimeError(msg)


def status_after(state: str, began: float) -> Callable[[float, str, dict[str, Any]], bool]:
    """Matches a status message ``state`` that arrived after ``began``."""

    def matches(arrived: float, _topic: str, body: dict[str, Any]) -> bool:
        return arrived > began and body.get("state") == state

    return matches


@dataclass
class MemorySampler:
    """VmRSS of a process every ``interval`` seconds, in the background."""

    pid: int
    interval: float = 0.25
    samples: list[int] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            while True:
                self.samples.append(proc_status(self.pid).get("VmRSS", 0))
                await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# ---------------------------------------------------------------------------- import profile

IMPORT_STAGES = (
    ("interpreter", ()),
    ("asyncio (with ssl)", ("asyncio", "ssl")),
    ("cryptography", ("cryptography.hazmat.primitives.asymmetric.ed25519",)),
    ("gateway.config (tomllib, gateway.fields)", ("gateway.config",)),
    ("structlog (and what it pulls in)", ("structlog",)),
    ("protocols (construct)", ("protocols.session", "protocols.logrecords")),
    ("gateway.store (sqlite3)", ("gateway.store",)),
    ("gateway.commands", ("gateway.commands",)),
    ("gateway.mqtt (aiomqtt, paho)", ("gateway.mqtt",)),
    ("gateway.metrics (prometheus_client)", ("gateway.metrics",)),
    ("gateway.cli and gateway.app (the rest)", ("gateway.cli", "gateway.app")),
    ("bumble (the radio backend)", ("gateway.radio.bumble",)),
)
"""What ``lockgw run`` imports, in stages: each stage's cost is what it adds to those above."""

_PROFILE_SCRIPT = """
import importlib, json, sys, time, tracemalloc
sys.modules.setdefault("rich", None)  # as `lockgw run` does (gateway.cli)
stages = json.loads(sys.argv[1])
trace = sys.argv[2] == "trace"
def rss():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
if trace:
    tracemalloc.start()
out = []
for name, modules in stages:
    began = time.perf_counter()
    for module in modules:
        importlib.import_module(module)
    elapsed = time.perf_counter() - began
    heap = tracemalloc.get_traced_memory()[0] if trace else 0
    out.append([name, rss(), elapsed, len(sys.modules), heap])
print(json.dumps(out))
"""


async def import_profile() -> list[dict[str, Any]]:
    """RSS and import time of ``lockgw run``'s imports by stage, in a fresh interpreter, and
    the Python heap each stage adds (tracemalloc, in a second one: it slows imports)."""
    results = []
    for mode in ("plain", "trace"):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _PROFILE_SCRIPT, json.dumps(IMPORT_STAGES), mode,
            cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, _ = await process.communicate()
        results.append(json.loads(stdout))
    plain, traced = results
    stages = []
    previous_rss = previous_heap = 0
    for (name, rss, seconds, modules, _), (*_, heap) in zip(plain, traced, strict=True):
        stages.append(
            {
                "stage": name,
                "rss_added_bytes": rss - previous_rss,
                "heap_added_bytes": heap - previous_heap,
                "rss_bytes": rss,
                "import_s": seconds,
                "modules": modules,
            }
        )
        previous_rss, previous_heap = rss, heap
    return stages


# ------------------------------------------------------------------------------- the bench


async def wait_collected(
    sim: SimProcess,
    registry: ReferenceRegistry,
    timeout: float,  # noqa: ASYNC109 - a bound on the whole wait
) -> dict[str, int]:
    """Wait until no device holds a record the gateway has not acknowledged, and the
    registry has received every one of them; the devices' next sequences."""
    pending = {device["device_id"] for device in sim.ready["devices"]}
    wanted: dict[str, int] = {}
    async with asyncio.timeout(timeout):
        while pending:
            # One device at a time: the status of them all is too long a line for a pipe.
            for device in sorted(pending):
                [status] = (await sim.command(cmd="status", device_id=device))["devices"]
                if status["records_waiting"] == 0:
                    wanted[device] = status["next_sequence"]
                    pending.discard(device)
            if pending:
                print(f"{len(pending)} devices hold records", file=sys.stderr)
            await asyncio.sleep(0.5)

    def published() -> bool:
        return all(
            len(registry.events.get(device, ())) >= count for device, count in wanted.items()
        )

    await registry.wait_for(published, timeout, "every record at the registry")
    return wanted


async def memory(
    args: argparse.Namespace, installation: Installation, sim: SimProcess, broker: Mosquitto
) -> dict[str, Any]:
    """(a): the daemon collecting from every device; its memory."""
    # No schema checks: the bench measures the gateway, not the registry.
    registry = make_registry(installation, broker, client_id="bench-footprint-registry")
    listener = asyncio.create_task(registry.run())
    figures: dict[str, Any] = {}
    try:
        async with StatusWatch(broker) as watch:
            began = time.perf_counter()
            daemon = await start_daemon(installation.config, installation.root / "daemon.log")
            sampler = MemorySampler(daemon.pid)
            sampler.start()
            try:
                online, _ = await watch.wait(lambda _t, _topic, body: body.get("state") == "online")
                figures["startup_first_s"] = online - began
                figures["rss_online_bytes"] = proc_status(daemon.pid)["VmRSS"]
                figures["cpu_online_s"] = proc_cpu(daemon.pid)
                sequences = await wait_collected(sim, registry, args.budget)
                figures["collected_s"] = time.perf_counter() - began
                figures["records_collected"] = sum(sequences.values())
                figures["events_at_registry"] = sum(len(e) for e in registry.events.values())
                await asyncio.sleep(args.settle)  # the last outbox rows and their deletion
                status = proc_status(daemon.pid)
                figures["rss_collected_bytes"] = status["VmRSS"]
                figures["rss_anon_bytes"] = status["RssAnon"]
                figures["rss_file_bytes"] = status["RssFile"]
                figures["hwm_bytes"] = status["VmHWM"]
                figures["cpu_collected_s"] = proc_cpu(daemon.pid)
                figures["rss_sampled_max_bytes"] = max(sampler.samples)
            finally:
                await sampler.stop()
                code = await stop_daemon(daemon)
        check_exit(installation, code)
        assert not registry.failures, registry.failures[:3]
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    figures["rss_bar_mib"] = RSS_BAR_MIB
    figures["rss_meets_bar"] = figures["hwm_bytes"] < RSS_BAR_MIB * MIB
    return figures


STARTUP_MARKS = (
    ("the daemon's first log line", None),
    ("'started' (store, radio, metrics open)", "started"),
    ("'mqtt connected' (online published)", "mqtt connected"),
)
"""Phases of a start, from the daemon's own log: the first line it writes, then events.
Everything before the first line is the interpreter, the imports (see the import profile),
the configuration and the credentials."""


def log_marks(log: Path, offset: int, exec_wall: float) -> dict[str, float]:
    """Seconds from ``exec_wall`` to each of :data:`STARTUP_MARKS` in the log after
    ``offset`` (the daemon logs JSON lines with an ISO ``timestamp``)."""
    marks: dict[str, float] = {}
    with log.open("rb") as lines:
        lines.seek(offset)
        for raw in lines:
            try:
                entry = json.loads(raw)
                moment = datetime.fromisoformat(entry["timestamp"]).timestamp()
            except (ValueError, KeyError, TypeError):
                continue
            for name, event in STARTUP_MARKS:
                if name not in marks and (event is None or entry.get("event") == event):
                    marks[name] = moment - exec_wall
    return marks


async def startup(
    args: argparse.Namespace, installation: Installation, broker: Mosquitto
) -> dict[str, Any]:
    """(b): exec of ``lockgw run`` to the retained online status, ``--startups`` times."""
    times: list[float] = []
    rss: list[int] = []
    phases: dict[str, list[float]] = {}
    log = installation.root / "daemon.log"
    async with StatusWatch(broker, f"lockgw/gw/{installation.gateway_id}/status") as watch:
        index = 0
        for _ in range(args.startups):
            offset = log.stat().st_size if log.exists() else 0
            exec_wall = time.time()
            began = time.perf_counter()
            daemon = await start_daemon(installation.config, log)
            try:
                arrived, index = await watch.wait(status_after("online", began), index)
                times.append(arrived - began)
                rss.append(proc_status(daemon.pid)["VmRSS"])
                # Not at once: a SIGTERM in the daemon's first instants can be lost to a
                # race of Python 3.11's asyncio.wait_for (aiomqtt's acknowledgements,
                # Bumble's HCI commands), and the daemon then does not stop.
                await asyncio.sleep(args.settle)
            finally:
                code = await stop_daemon(daemon)
            check_exit(installation, code)
            for name, seconds in log_marks(log, offset, exec_wall).items():
                phases.setdefault(name, []).append(seconds)
            _, index = await watch.wait(status_after("offline", began), index)
    median = statistics.median(times)
    return {
        "startup_runs_s": times,
        "startup_median_s": median,
        "startup_min_s": min(times),
        "startup_max_s": max(times),
        "startup_phases_median_s": {name: statistics.median(v) for name, v in phases.items()},
        "rss_at_online_bytes": rss,
        "startup_bar_s": STARTUP_BAR_S,
        "startup_meets_bar": median < STARTUP_BAR_S,
    }


async def sim_fleet(args: argparse.Namespace) -> dict[str, str]:
    """(c): bench.sim_fleet in a child process; its table's rows by name."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.sim_fleet",
        "--devices", str(args.sim_devices), "--sessions", str(args.sim_sessions),
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    async with asyncio.timeout(args.budget * 3):
        stdout, _ = await process.communicate()
    if process.returncode != 0:
        msg = f"bench.sim_fleet exited with {process.returncode}"
        raise RuntimeError(msg)
    rows: dict[str, str] = {}
    for line in stdout.decode().splitlines()[1:]:
        name, _, value = line.strip().partition("  ")
        rows[name.strip()] = value.strip()
    return rows


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"devices": args.devices, "records_per_device": args.records}
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-footprint-")))
        else:
            root = args.workdir
            root.mkdir(parents=True)
        broker = Mosquitto(root / "broker")
        broker.start()
        sim: SimProcess | None = None
        try:
            # Pairing waits for each device's next advert: the simulator first runs with
            # fast adverts, then again from its saved state at the interval measured.
            state = root / "devices"
            sim = await SimProcess.start(
                "--locks", str(args.devices), "--serve", "tcp-server:127.0.0.1:0",
                "--advertising-interval", str(args.pairing_advertising_interval),
                "--state-dir", str(state),
            )  # fmt: skip
            with contextlib.redirect_stdout(io.StringIO()):  # the CLI's lines about key files
                installation = install(root / "gw", transport=sim.ready["transport"], broker=broker)
            daemon_defaults(installation, slots=args.slots)
            began = time.perf_counter()
            await pair_all(installation, sim)
            figures["pairing_s"] = time.perf_counter() - began
            await sim.finish()
            paired_on = sim.ready["transport"]
            sim = await SimProcess.start(
                "--serve", "tcp-server:127.0.0.1:0", "--state-dir", str(state),
                "--advertising-interval", str(args.advertising_interval),
            )  # fmt: skip
            tune(installation.config, {paired_on: sim.ready["transport"]})
            if args.records:
                for device in sim.ready["devices"]:
                    reply = await sim.command(
                        cmd="fault", device_id=device["device_id"], fill_log=args.records
                    )
                    assert reply["ok"], reply
            figures.update(await memory(args, installation, sim, broker))
            figures.update(await startup(args, installation, broker))
            assert sim.process.pid is not None
            figures["simulator_rss_bytes"] = proc_status(sim.process.pid)["VmRSS"]
        finally:
            if sim is not None:
                await sim.finish()
            broker.stop()
    figures["imports"] = await import_profile()
    if args.sim_devices:
        figures["sim_fleet"] = await sim_fleet(args)
    return figures


def rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    def mib(value: int) -> str:
        return f"{value / MIB:.1f} MiB"

    startup_runs = ", ".join(f"{t:.2f}" for t in f["startup_runs_s"])
    table = [
        (
            "devices (paired; records waiting on each)",
            f"{f['devices']} ({f['records_per_device']} filler records each)",
        ),
        ("pairing every device", f"{f['pairing_s']:.1f} s"),
        ("daemon VmRSS when online", mib(f["rss_online_bytes"])),
        (
            "every device collected and published",
            (
                f"{f['records_collected']} records in {f['collected_s']:.1f} s "
                f"(daemon CPU {f['cpu_collected_s']:.1f} s)"
            ),
        ),
        (
            "daemon VmRSS after the collection",
            (
                f"{mib(f['rss_collected_bytes'])} (anonymous {mib(f['rss_anon_bytes'])}, "
                f"files and libraries {mib(f['rss_file_bytes'])})"
            ),
        ),
        (
            "daemon VmHWM (peak)",
            (
                f"{mib(f['hwm_bytes'])} (bar {RSS_BAR_MIB:.0f} MiB: "
                f"{'met' if f['rss_meets_bar'] else 'MISSED'})"
            ),
        ),
        (
            f"start-up to online, median of {len(f['startup_runs_s'])}",
            (
                f"{f['startup_median_s']:.2f} s (bar {STARTUP_BAR_S:.0f} s: "
                f"{'met' if f['startup_meets_bar'] else 'MISSED'})"
            ),
        ),
        ("  every run", f"{startup_runs} s"),
        *(
            (f"  exec to {name}", f"{seconds:.3f} s (median)")
            for name, seconds in f["startup_phases_median_s"].items()
        ),
        ("simulator VmRSS with the devices", mib(f["simulator_rss_bytes"])),
    ]
    table.append(
        ("what `lockgw run` imports, by stage", "RSS added (Python heap of it), import time")
    )
    table.extend(
        (
            f"  {stage['stage']}",
            (
                f"+{mib(stage['rss_added_bytes'])} ({mib(stage['heap_added_bytes'])}), "
                f"{stage['import_s'] * 1000:.0f} ms"
            ),
        )
        for stage in f["imports"]
    )
    for name, value in f.get("sim_fleet", {}).items():
        table.append((f"sim_fleet: {name}", value))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__)
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--records", type=int, default=100, help="records waiting per device")
    parser.add_argument("--slots", type=int, default=5)
    parser.add_argument("--advertising-interval", type=float, default=0.5)
    parser.add_argument("--pairing-advertising-interval", type=float, default=0.05)
    parser.add_argument("--startups", type=int, default=7, help="start-up runs (median)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before the reading")
    parser.add_argument("--budget", type=float, default=WAIT, help="seconds for each stage")
    parser.add_argument("--sim-devices", type=int, default=1000, help="(c); 0 skips it")
    parser.add_argument("--sim-sessions", type=int, default=100, help="(c): sessions, a sample")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--workdir", type=Path, help="a new directory to keep (default: temporary)")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.startups < 1 or args.records < 0:
        parser.error("--devices and --startups must be positive, --records not negative")
    load_before = load_average()
    figures = asyncio.run(bench(args))
    load_after = load_average()
    print_table(
        f"python {sys.version.split()[0]}; load average before {load_before}, after {load_after}",
        rows(figures),
    )
    write_json(
        args.json,
        {"bench": "footprint", "load_average": {"before": load_before, "after": load_after},
         **figures},
    )  # fmt: skip
    return 0 if figures["rss_meets_bar"] and figures["startup_meets_bar"] else BAR_MISSED


if __name__ == "__main__":
    sys.exit(main())
