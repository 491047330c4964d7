"""How far one simulator process scales: a thousand devices on one virtual radio.

Measures, for N simulated devices on one ScalableLink in this process: resident memory
(VmRSS), start-up time, the time the gateway's radio needs to see every device in a scan,
and the time the gateway needs to open a session (connect, MTU exchange, discovery,
subscription, Noise_XX
handshake with certificate checks, one status request) with each device in turn (or with
an evenly spread sample when ``--sessions`` is below N, or when ``--budget`` runs out).

Run from the repository root (it borrows the tests' credential and provisioning helpers)::

    .venv/bin/python -m bench.sim_fleet --devices 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bumble.transport.common import AsyncPipeSink

from gateway.device_session import DeviceSession
from gateway.radio.bumble import BumbleRadio
from protocols.enums import DeviceKind
from protocols.messages import Status, StatusRequest
from protocols.session import GatewaySessionConfig
from simulators.node import Fleet
from simulators.radio import VirtualController
from tests.simulators.radio_central import Credentials, PinnedDevice, provision_directly

KINDS = (
    DeviceKind.DOOR_LOCK,
    DeviceKind.DOOR_LOCK,
    DeviceKind.KEY_SAFE,
    DeviceKind.MEDICINE_CABINET,
    DeviceKind.DOOR_LOCK,
)
"""The mix of a care site: mostly door locks (key cabinets are few; one per 50 devices)."""


def rss_mib() -> float:
    """Resident set size of this process, from /proc/self/status (Linux)."""
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: Sequence[float], share: float) -> float:
    """The value below which ``share`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def sessions(
    radio: BumbleRadio,
    fleet: Fleet,
    pinned: dict[bytes, PinnedDevice],
    credentials: Credentials,
    args: argparse.Namespace,
) -> list[tuple[str, str]]:
    """With the gateway's own radio and DeviceSession: handshake and a status request with
    each device in turn, or an even sample of them."""
    devices = list(fleet)
    wanted = min(args.sessions, len(devices))
    step = len(devices) / wanted
    sample = [devices[int(i * step)] for i in range(wanted)]
    durations: list[float] = []
    began = time.perf_counter()
    for device in sample:
        if time.perf_counter() - began > args.budget:
            break
        opened = time.perf_counter()
        known = pinned[device.device_id]
        link = await radio.connect(device.address, mtu=args.mtu, timeout=10.0)
        config = GatewaySessionConfig(
            noise_key=credentials.noise_key,
            device_id=known.device_id,
            now=int(time.time()),
            certificate=credentials.certificate,
            pinned_signing_key=known.signing_key,
            pinned_noise_key=known.noise_key,
        )
        async with DeviceSession(link, config) as session:
            await session.request(StatusRequest(), Status)
        durations.append(time.perf_counter() - opened)
    total = time.perf_counter() - began
    what = "each device in turn" if len(durations) == len(devices) else "an even sample"
    ms = [d * 1000 for d in durations]
    return [
        (
            f"gateway sessions, {what} (MTU {args.mtu})",
            f"{len(durations)} of {len(devices)} in {total:.1f} s",
        ),
        (
            "  per session: mean / p50 / p95 / max",
            (
                f"{statistics.mean(ms):.0f} / {percentile(ms, 0.5):.0f} / "
                f"{percentile(ms, 0.95):.0f} / {max(ms):.0f} ms"
            ),
        ),
    ]


async def scan_all(radio: BumbleRadio, addresses: set[str], budget: float) -> None:
    """Scan with the gateway's radio until every address has been seen."""
    unseen = set(addresses)
    async with asyncio.timeout(budget), contextlib.aclosing(radio.scan()) as results:
        async for result in results:
            unseen.discard(result.address)
            if not unseen:
                return


async def bench(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Run the measurements; the table's rows."""
    rows: list[tuple[str, str]] = []
    rss_before = rss_mib()
    now = int(time.time())
    credentials = Credentials.issue(now=now)
    fleet = Fleet(advertising_interval=args.advertising_interval)

    began = time.perf_counter()
    pinned: dict[bytes, PinnedDevice] = {}
    for index in range(args.devices):
        kind = DeviceKind.KEY_CABINET if index % 50 == 49 else KINDS[index % len(KINDS)]
        [device] = fleet.create(kind)
        pinned[device.device_id] = provision_directly(device.device, credentials, now=now)
    rows.append(("devices", f"{args.devices}"))
    rows.append(("device models (keys, provisioning)", f"{time.perf_counter() - began:.2f} s"))

    began = time.perf_counter()
    await fleet.start()
    start_up = time.perf_counter() - began
    rss_started = rss_mib()
    per_device = (rss_started - rss_before) * 1024 / args.devices
    rows.append(("start-up on the radio (power on, advertise)", f"{start_up:.2f} s"))
    rows.append(
        (
            "RSS before / with devices running",
            f"{rss_before:.0f} / {rss_started:.0f} MiB ({per_device:.0f} KiB per device)",
        )
    )

    controller = VirtualController("gateway", link=fleet.link)
    async with BumbleRadio.from_hci(controller, AsyncPipeSink(controller)) as radio:
        addresses = {device.address for device in fleet}
        began = time.perf_counter()
        await scan_all(radio, addresses, args.budget)
        rows.append(
            (
                f"gateway scan until all {len(addresses)} seen",
                f"{time.perf_counter() - began:.2f} s",
            )
        )
        rows += await sessions(radio, fleet, pinned, credentials, args)
    rows.append(("RSS after the sessions", f"{rss_mib():.0f} MiB"))

    began = time.perf_counter()
    await fleet.stop()
    rows.append(("shut-down", f"{time.perf_counter() - began:.2f} s"))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, measure, print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.sim_fleet", description=__doc__)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument(
        "--sessions", type=int, default=1000, help="devices to open a session with (a sample)"
    )
    parser.add_argument(
        "--budget", type=float, default=300.0, help="seconds for the scan, and for sessions"
    )
    parser.add_argument("--mtu", type=int, default=185)
    parser.add_argument("--advertising-interval", type=float, default=0.1)
    args = parser.parse_args(argv)
    if args.devices < 1 or args.sessions < 1:
        parser.error("--devices and --sessions must be positive")
    rows = asyncio.run(bench(args))
    width = max(len(name) for name, _ in rows)
    print(f"python {sys.version.split()[0]}, advertising every {args.advertising_interval} s")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
