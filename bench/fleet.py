"""A fleet on one broker: a fleet-wide revocation across many gateway processes.

``--gateways`` real ``lockgw run`` processes share one Mosquitto, each with its own site
and its own simulated devices (a simulator process per gateway, serving its virtual radio
over TCP, ``--devices`` door locks each). One authority; every gateway is installed with
the CLI as an operator installs one (keys, signing request, certificate for its site,
configuration) and its devices are paired before it starts (``tests.installation``). The
reference registry (:class:`simulators.registry.ReferenceRegistry`) follows every gateway.

Once every gateway is online and every device registered and collected, the registry
signs one revocation for the whole fleet and publishes it on ``lockgw/fleet/commands``.
Measured from that publish: the first gateway's response, the time each device is
reported applied (the registry's per-device progress), and the time to full coverage
(every device of every gateway applied). The broker's message rate over the same window
is counted by a subscriber to ``lockgw/#`` (every message the gateways and the registry
publish, by kind); Mosquitto's ``$SYS/broker/messages/received`` (every MQTT packet it
received, acknowledgements and keep-alives too; published every second here) is given
beside it.

Run from the repository root (it uses the end-to-end tests' installation helpers)::

    .venv/bin/python -m bench.fleet
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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from bench._common import Listener, load_average, percentile
from bench.footprint import check_exit, daemon_defaults, proc_cpu, proc_status
from simulators.registry import ReferenceRegistry
from tests.broker import Mosquitto
from tests.installation import (
    Installation,
    install,
    make_registry,
    organisation,
    pair_all,
    start_daemon,
    stop_daemon,
)
from tests.processes import SimProcess

KEY = 4711
"""The staff key that is lost and revoked."""
BAR_GATEWAYS = 20
MIB = 1024 * 1024


class SysBroker(Mosquitto):
    """The tests' Mosquitto, publishing its ``$SYS`` figures every second."""

    def _config_lines(self) -> list[str]:
        return [*super()._config_lines(), "sys_interval 1"]


@dataclass
class Traffic(Listener):
    """Every message on ``lockgw/#`` and the broker's ``$SYS`` counters, timestamped."""

    broker: Mosquitto
    messages: list[tuple[float, str]] = field(default_factory=list)
    sys_values: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def _run(self) -> None:
        async with aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            identifier=f"bench-fleet-traffic-{os.getpid()}",
            max_queued_incoming_messages=0,
        ) as client:
            await client.subscribe(
                [
                    ("lockgw/#", 0),
                    ("$SYS/broker/messages/received", 0),
                    ("$SYS/broker/load/messages/received/1min", 0),
                    ("$SYS/broker/clients/connected", 0),
                ]
            )
            self._ready.set()
            async for message in client.messages:
                now = time.perf_counter()
                topic = str(message.topic)
                if topic.startswith("$SYS/"):
                    with contextlib.suppress(ValueError, TypeError):
                        value = float(message.payload)
                        self.sys_values.setdefault(topic, []).append((now, value))
                elif not message.retain:
                    self.messages.append((now, topic))

    def count(self, began: float, ended: float) -> tuple[int, Counter[str]]:
        """Messages that arrived between ``began`` and ``ended``, and by kind (the topic's
        last level: progress, responses, events, state, ...)."""
        kinds: Counter[str] = Counter()
        for arrived, topic in self.messages:
            if began <= arrived <= ended:
                kinds[topic.rsplit("/", 1)[-1]] += 1
        return kinds.total(), kinds

    def sys_before(self, topic: str, moment: float) -> tuple[float, float] | None:
        """(arrival, value) of the last ``$SYS`` value published at or before ``moment``."""
        values = [item for item in self.sys_values.get(topic, ()) if item[0] <= moment]
        return values[-1] if values else None

    def sys_after(self, topic: str, moment: float) -> tuple[float, float] | None:
        """(arrival, value) of the first ``$SYS`` value published at or after ``moment``."""
        values = [item for item in self.sys_values.get(topic, ()) if item[0] >= moment]
        return values[0] if values else None


@dataclass
class Site:
    installation: Installation
    sim: SimProcess
    devices: list[str]
    daemon: asyncio.subprocess.Process | None = None


async def build(args: argparse.Namespace, root: Path, broker: Mosquitto) -> list[Site]:
    """Simulators, installations made with the CLI, and every device paired."""
    with contextlib.redirect_stdout(io.StringIO()):  # the CLI's lines about key files
        org = organisation(root / "org")
    sims = await asyncio.gather(
        *(
            SimProcess.start(
                "--locks",
                str(args.devices),
                "--serve",
                "tcp-server:127.0.0.1:0",
                "--advertising-interval",
                str(args.advertising_interval),
            )
            for _ in range(args.gateways)
        )
    )
    sites = []
    for index, sim in enumerate(sims):
        with contextlib.redirect_stdout(io.StringIO()):
            installation = install(
                root / f"gw-{index:02d}",
                transport=sim.ready["transport"],
                broker=broker,
                org=org,
                gateway_id=f"gw-{index:02d}",
                site=100 + index,
            )
        daemon_defaults(installation, slots=args.slots)
        devices = [device["device_id"] for device in sim.ready["devices"]]
        sites.append(Site(installation, sim, devices))
    pairing = asyncio.Semaphore(4)

    async def pair(site: Site) -> None:
        async with pairing:
            await pair_all(site.installation, site.sim)

    await asyncio.gather(*(pair(site) for site in sites))
    return sites


async def revoke(
    args: argparse.Namespace, sites: Sequence[Site], registry: ReferenceRegistry
) -> dict[str, Any]:
    """One fleet-wide revocation; when each device is reported applied."""
    devices = {device: site.installation.gateway_id for site in sites for device in site.devices}
    update_id = f"lost-key-{KEY}-{int(time.time())}"
    now = int(time.time())
    applied: dict[str, float] = {}
    began = time.perf_counter()
    answer = asyncio.create_task(
        registry.revoke(update_id, [KEY], now + 90 * 86400, now + 3600, timeout=args.budget)
    )
    answered: float | None = None
    async with asyncio.timeout(args.budget):
        while len(applied) < len(devices):
            for device, progress in registry.progress.get(update_id, {}).items():
                if progress.state == "applied" and device not in applied:
                    applied[device] = time.perf_counter()
            if answered is None and answer.done():
                answered = time.perf_counter()
            await asyncio.sleep(0.01)
    ended = time.perf_counter()
    response = await answer
    if answered is None:
        answered = ended
    assert response["status"] == "ok", response
    assert set(applied) == set(devices), "progress names other devices"
    per_gateway: dict[str, float] = {}
    for device, moment in applied.items():
        gateway = devices[device]
        per_gateway[gateway] = max(per_gateway.get(gateway, 0.0), moment - began)
    delays = sorted(moment - began for moment in applied.values())
    return {
        "update_id": update_id,
        "began": began,
        "ended": ended,
        "first_response_s": answered - began,
        "coverage_s": ended - began,
        "device_applied_s": delays,
        "gateway_covered_s": sorted(per_gateway.values()),
        "coverage": registry.coverage(update_id),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"gateways": args.gateways, "devices_per_gateway": args.devices}
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        root = Path(tmp)
        broker = SysBroker(root / "broker")
        broker.start()
        sites: list[Site] = []
        listener: asyncio.Task[None] | None = None
        try:
            began = time.perf_counter()
            sites = await build(args, root, broker)
            figures["set_up_s"] = time.perf_counter() - began
            # One organisation: every installation holds the same registry keys.
            registry = make_registry(
                sites[0].installation, broker, client_id="bench-fleet-registry"
            )
            listener = asyncio.create_task(registry.run())
            async with Traffic(broker) as traffic:
                began = time.perf_counter()
                for site in sites:
                    site.daemon = await start_daemon(
                        site.installation.config, site.installation.root / "daemon.log"
                    )
                await registry.wait_for(
                    lambda: all(
                        (status := registry.gateways.get(site.installation.gateway_id)) is not None
                        and status.state == "online"
                        for site in sites
                    ),
                    args.budget,
                    "every gateway online",
                )
                figures["all_online_s"] = time.perf_counter() - began
                every = {device for site in sites for device in site.devices}
                await registry.wait_for(
                    lambda: (
                        every <= set(registry.registrations)
                        and all(registry.events.get(device) for device in every)
                    ),
                    args.budget,
                    "every device registered and its log collected",
                )
                figures["all_collected_s"] = time.perf_counter() - began
                await asyncio.sleep(args.settle)  # let the first visits end
                quiet_began = time.perf_counter()
                await asyncio.sleep(args.settle)
                quiet, _ = traffic.count(quiet_began, time.perf_counter())
                figures["idle_messages_per_s"] = quiet / args.settle
                result = await revoke(args, sites, registry)
                await asyncio.sleep(1.5)  # the $SYS sample after the window
                figures.update(window_figures(traffic, result))
            figures["failures_at_registry"] = len(registry.failures)
            figures.update(process_figures(sites))
        finally:
            await asyncio.gather(*(stop(site) for site in sites))
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
            broker.stop()
    return figures


def window_figures(traffic: Traffic, result: dict[str, Any]) -> dict[str, Any]:
    began, ended = result["began"], result["ended"]
    window = ended - began
    count, kinds = traffic.count(began, ended)
    figures = {key: value for key, value in result.items() if key not in ("began", "ended")}
    figures["messages_in_window"] = count
    figures["messages_by_kind"] = dict(kinds.most_common())
    figures["messages_per_s"] = count / window
    # Mosquitto publishes a $SYS counter once a second, and only when it changed: the value
    # last published before the window held until the window began, and the first one
    # published after it covers the window and up to a second beyond.
    for name, topic in (("sys_packets_received", "$SYS/broker/messages/received"),):
        before = traffic.sys_before(topic, began)
        after = traffic.sys_after(topic, ended)
        if before is not None and after is not None:
            figures[name] = after[1] - before[1]
            figures[f"{name}_interval_s"] = after[0] - began
            figures[f"{name}_per_s"] = (after[1] - before[1]) / (after[0] - began)
    load = traffic.sys_after("$SYS/broker/load/messages/received/1min", ended)
    figures["sys_load_received_1min"] = None if load is None else load[1]
    clients = traffic.sys_before("$SYS/broker/clients/connected", ended)
    figures["sys_clients_connected"] = None if clients is None else clients[1]
    return figures


def process_figures(sites: Sequence[Site]) -> dict[str, Any]:
    rss = []
    cpu = []
    for site in sites:
        assert site.daemon is not None
        rss.append(proc_status(site.daemon.pid)["VmRSS"])
        cpu.append(proc_cpu(site.daemon.pid))
    return {
        "daemon_rss_median_bytes": statistics.median(rss),
        "daemon_rss_max_bytes": max(rss),
        "daemon_rss_total_bytes": sum(rss),
        "daemon_cpu_median_s": statistics.median(cpu),
        "daemon_cpu_total_s": sum(cpu),
    }


async def stop(site: Site) -> None:
    try:
        if site.daemon is not None:
            check_exit(site.installation, await stop_daemon(site.daemon))
    finally:
        await site.sim.finish()


def rows(f: dict[str, Any]) -> list[tuple[str, str]]:
    applied = f["device_applied_s"]
    gateways = f["gateway_covered_s"]
    devices = f["gateways"] * f["devices_per_gateway"]
    kinds = ", ".join(f"{kind} {count}" for kind, count in f["messages_by_kind"].items())

    def sys_rate(name: str) -> str:
        if f"{name}_per_s" not in f:
            return "n/a"
        return (
            f"{f[name]:.0f} in {f[f'{name}_interval_s']:.1f} s = "
            f"{f[f'{name}_per_s']:.0f} per second"
        )

    return [
        (
            "gateways (processes) x devices each",
            f"{f['gateways']} x {f['devices_per_gateway']} = {devices} devices",
        ),
        ("set-up: simulators, installations, pairing", f"{f['set_up_s']:.1f} s"),
        (
            "every gateway online / every device collected",
            f"{f['all_online_s']:.1f} / {f['all_collected_s']:.1f} s after the starts",
        ),
        ("revocation: first gateway's response", f"{f['first_response_s']:.2f} s"),
        (
            "device applied: p50 / p95 / last",
            (
                f"{percentile(applied, 0.5):.2f} / {percentile(applied, 0.95):.2f} / "
                f"{applied[-1]:.2f} s"
            ),
        ),
        (
            "gateway fully covered: first / median / last",
            f"{gateways[0]:.2f} / {statistics.median(gateways):.2f} / {gateways[-1]:.2f} s",
        ),
        ("full coverage (every device of every gateway)", f"{f['coverage_s']:.2f} s"),
        ("coverage at the registry", str(f["coverage"])),
        (
            "broker messages in the window (lockgw/#)",
            f"{f['messages_in_window']} = {f['messages_per_s']:.0f} messages/s",
        ),
        ("  by kind", kinds),
        (
            "  MQTT packets the broker received ($SYS; PUBACKs too)",
            sys_rate("sys_packets_received"),
        ),
        ("broker messages while idle (lockgw/#)", f"{f['idle_messages_per_s']:.1f} messages/s"),
        (
            "daemon VmRSS: median / max / all",
            (
                f"{f['daemon_rss_median_bytes'] / MIB:.1f} / {f['daemon_rss_max_bytes'] / MIB:.1f}"
                f" / {f['daemon_rss_total_bytes'] / MIB:.0f} MiB"
            ),
        ),
        (
            "daemon CPU since start: median / all",
            f"{f['daemon_cpu_median_s']:.1f} / {f['daemon_cpu_total_s']:.1f} s",
        ),
        ("verification failures at the registry", str(f["failures_at_registry"])),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--gateways", type=int, default=BAR_GATEWAYS)
    parser.add_argument("--devices", type=int, default=5, help="devices per gateway")
    parser.add_argument("--slots", type=int, default=5, help="[scheduler] slots of each")
    parser.add_argument("--advertising-interval", type=float, default=0.2)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of quiet before")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds for each stage")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    if args.gateways < 1 or args.devices < 1:
        parser.error("--gateways and --devices must be positive")
    load_before = load_average()
    figures = asyncio.run(bench(args))
    load_after = load_average()
    table = rows(figures)
    width = max(len(name) for name, _ in table)
    print(f"python {sys.version.split()[0]}; load average before {load_before}, after {load_after}")
    for name, value in table:
        print(f"{name:<{width}}  {value}")
    if args.json is not None:
        document = {"bench": "fleet", "load_average": {"before": load_before, "after": load_after}}
        args.json.write_text(json.dumps({**document, **figures}, indent=2) + "\n", encoding="utf-8")
    return 0 if not figures["failures_at_registry"] else 1


if __name__ == "__main__":
    sys.exit(main())
