"""What the radio-timing benchmarks share: a gateway side and paired devices in one process,
a recorder of each connection's traffic, and the table and JSON they report.

The gateway side is the daemon's own components (BumbleRadio, Store, BlockingWorker,
LogPipeline, UpdateService, Scheduler) on a VirtualController on the fleet's link; devices
are paired through their model (as ``tests.simulators.radio_central.provision_directly``
does) and stored as the pairing flow stores them, so set-up costs no radio time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import structlog
from bumble import hci
from bumble.transport.common import AsyncPipeSink
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.authority import SigningRequest, gateway_signing_request, issue
from gateway.keys import GatewayCredentials, GatewayKeys
from gateway.pipeline import LogPipeline
from gateway.radio.bumble import BumbleRadio
from gateway.scheduler import Scheduler, SchedulerSettings
from gateway.store import DeviceRecord, Store
from gateway.topics import Topics
from gateway.updates import UpdateService
from gateway.worker import BlockingWorker
from protocols.envelopes import Scope, encode_certificate
from protocols.logrecords import chain_genesis
from protocols.messages import Provision, Provisioned
from protocols.session import SessionMode
from simulators.node import Fleet
from simulators.radio import ScalableLink, VirtualController

SITE = 42


def quiet_logs() -> None:
    """Warnings and errors only: the gateway logs every session at info level."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` shows them."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def gateway_credentials(authority: Ed25519PrivateKey) -> GatewayCredentials:
    """Gateway keys and a certificate for site :data:`SITE`, issued by ``authority``."""
    keys = GatewayKeys.generate()
    request = SigningRequest.from_bytes(gateway_signing_request(keys, "gw-bench"))
    certificate = issue(
        authority,
        request,
        scope=Scope(sites=frozenset({SITE})),
        not_before=int(time.time()) - 3600,
        validity_days=30,
    )
    return GatewayCredentials(
        keys, certificate, encode_certificate(certificate), authority.public_key()
    )


@dataclass
class GatewaySide:
    """The daemon's components, wired as ``gateway.app`` wires them (no MQTT)."""

    radio: BumbleRadio
    store: Store
    reader: Store
    worker: BlockingWorker
    credentials: GatewayCredentials
    topics: Topics
    pipeline: LogPipeline
    updates: UpdateService

    def scheduler(self, slots: int) -> Scheduler:
        return Scheduler(
            radio=self.radio,
            store=self.store,
            worker=self.worker,
            credentials=self.credentials,
            pipeline=self.pipeline,
            updates=self.updates,
            topics=self.topics,
            settings=SchedulerSettings(slots=slots),
        )

    def pair_directly(self, fleet: Fleet) -> None:
        """Provision every device of ``fleet`` through its model and store it as paired
        (call with the fleet started: the devices then advertise as paired)."""
        now = int(time.time())
        authority = self.credentials.authority_key.public_bytes_raw()
        for simulated in fleet:
            device = simulated.device
            answer = device.handle(
                Provision(device.device_id, authority, SITE, now), mode=SessionMode.PAIRING
            )
            if not isinstance(answer, Provisioned):
                msg = f"provisioning refused: {answer}"
                raise RuntimeError(msg)
            self.store.upsert_device(
                DeviceRecord(
                    device_id=device.device_id,
                    kind=int(simulated.kind),
                    address=simulated.address,
                    signing_key=device.identity.signing_public,
                    noise_key=device.identity.noise_public,
                    site_id=SITE,
                    paired_at=now,
                    chain_next_sequence=0,
                    chain_head=chain_genesis(device.device_id),
                    reachable=True,
                    last_heard=float(now),
                )
            )
            simulated.changed()  # advertise as paired


@contextlib.asynccontextmanager
async def gateway_side(fleet: Fleet) -> AsyncIterator[GatewaySide]:
    """A gateway side on ``fleet``'s link, with a store in a temporary directory."""
    controller = VirtualController("gateway", link=fleet.link)
    radio = BumbleRadio.from_hci(controller, AsyncPipeSink(controller))
    credentials = gateway_credentials(Ed25519PrivateKey.generate())
    topics = Topics("lockgw", "gw-bench")
    with tempfile.TemporaryDirectory(prefix="lockgw-bench-") as directory:
        path = Path(directory) / "lockgw.sqlite3"
        async with radio, BlockingWorker("store") as worker:
            store, reader = Store.open(path), Store.open(path)
            try:
                yield GatewaySide(
                    radio=radio,
                    store=store,
                    reader=reader,
                    worker=worker,
                    credentials=credentials,
                    topics=topics,
                    pipeline=LogPipeline(store, worker, topics, batch_size=50),
                    updates=UpdateService(store, worker, credentials, topics),
                )
            finally:
                reader.close()
                store.close()
    fleet.link.remove_controller(controller)


@dataclass
class Trace:
    """The L2CAP PDUs of one connection, ``(from_central, octets)`` in link order."""

    peripheral: str
    started: float
    ended: float | None = None
    pdus: list[tuple[bool, int]] = field(default_factory=list)


class TrafficRecorder:
    """Records every connection's ACL traffic on a link (``ScalableLink.on_acl_pdu``); a
    device's trace starts afresh at each of its connections."""

    def __init__(self, link: ScalableLink, fleet: Fleet) -> None:
        self.traces: list[Trace] = []
        self._current: dict[str, Trace] = {}
        self._devices = {device.address for device in fleet}
        for device in fleet:
            device.peripheral.add_connection_callback(self._connected_callback(device.address))
            device.peripheral.add_disconnection_callback(
                self._disconnected_callback(device.address)
            )
        link.on_acl_pdu = self._on_pdu

    def _connected_callback(self, address: str) -> Any:
        def connected(_central: str) -> None:
            trace = Trace(address, time.time())
            self._current[address] = trace
            self.traces.append(trace)

        return connected

    def _disconnected_callback(self, address: str) -> Any:
        def disconnected() -> None:
            trace = self._current.pop(address, None)
            if trace is not None:
                trace.ended = time.time()

        return disconnected

    def _on_pdu(self, source: hci.Address, destination: hci.Address, pdu: bytes) -> None:
        to_device = str(destination) in self._devices
        peripheral = str(destination) if to_device else str(source)
        trace = self._current.get(peripheral)
        if trace is not None:
            trace.pdus.append((to_device, len(pdu)))

    def since(self, moment: float) -> list[Trace]:
        """Traces of connections made at or after ``moment`` (unix time)."""
        return [trace for trace in self.traces if trace.started >= moment]


def percentile(values: Sequence[float], share: float) -> float:
    """The value below which ``share`` of ``values`` lie (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def report(
    title: str,
    rows: Sequence[tuple[str, float, float, str]],
    notes: Sequence[str],
    json_path: Path | None,
    *,
    extra: dict[str, Any] | None = None,
    columns: tuple[str, str, str] = ("measured", "bound", "ratio"),
) -> None:
    """Print ``rows`` (figure, first value, second value, unit) with the ratio of the two;
    write them as JSON to ``json_path`` if given. ``columns`` names the three values."""
    load = load_average()
    width = max(len(name) for name, *_ in rows)
    first, second, ratio_name = columns
    print(f"{title}\npython {sys.version.split()[0]}, load average {load}")
    print(f"{'figure':<{width}}  {first:>12}  {second:>12}  {ratio_name:>7}  unit")
    for name, measured, bound, unit in rows:
        ratio = measured / bound if bound else float("nan")
        print(f"{name:<{width}}  {measured:>12.3f}  {bound:>12.3f}  {ratio:>7.3f}  {unit}")
    for note in notes:
        print(note)
    if json_path is not None:
        document = {
            "title": title,
            "load_average": load,
            "figures": [
                {
                    "figure": name,
                    first: measured,
                    second: bound,
                    "unit": unit,
                    ratio_name: measured / bound if bound else None,
                }
                for name, measured, bound, unit in rows
            ],
            "notes": list(notes),
            **(extra or {}),
        }
        json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


class Listener:
    """Runs :meth:`_run` in the background while entered (a subscriber, say); ``_run`` sets
    ``_ready`` once it is listening, and entering waits for that."""

    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Event

    async def _run(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        async with asyncio.timeout(10):
            await self._ready.wait()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
