"""A gateway installation for end-to-end tests, made as an operator makes one.

The authority, the gateway's keys and certificate and its configuration are all made with
the `lockgw` CLI; the daemon and the CLI run as real processes; the registry is played by
the reference registry (:class:`simulators.registry.ReferenceRegistry`).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

from gateway import cli
from gateway.keys import load_credentials, load_signing_key
from gateway.pairing import WorkOrder, pair_device
from gateway.radio.bumble import BumbleRadio
from gateway.store import Store
from gateway.topics import Topics
from gateway.worker import BlockingWorker
from protocols.pairing import LabelPayload
from simulators.registry import ReferenceRegistry
from tests.broker import Mosquitto
from tests.conftest import Registry, Schemas
from tests.processes import REPO_ROOT, SimProcess

AnyRegistry = TypeVar("AnyRegistry", bound=ReferenceRegistry)

GATEWAY_ID = "gw-north-1"
SITE = 42
KEY = 4711
WAIT = 30.0


@dataclass
class Installation:
    root: Path
    config: Path
    registry: Registry
    gateway_id: str = GATEWAY_ID
    site: int = SITE


def organisation(root: Path) -> Path:
    """The authority and the registry's key and certificate, made with the CLI."""
    root.mkdir(parents=True, exist_ok=True)
    _cli(root, ["authority", "init", "--key", "authority.key", "--public", "authority.pub"])
    _cli(root, ["authority", "registry-key", "--subject", "registry", "--key", "registry.key",
                "--request", "registry.req"])  # fmt: skip
    _cli(root, ["authority", "issue", "--key", "authority.key", "--request", "registry.req",
                "--out", "registry.cert", "--organisation-wide"])  # fmt: skip
    return root


def _cli(root: Path, step: list[str]) -> None:
    argv = [str(root / part) if part.endswith((".key", ".pub", ".req", ".cert")) else part
            for part in step]  # fmt: skip
    assert cli.main(argv) == 0, step


def install(
    root: Path,
    *,
    transport: str,
    broker: Mosquitto,
    org: Path | None = None,
    gateway_id: str = GATEWAY_ID,
    site: int = SITE,
    unreachable_after: str = "6h",
) -> Installation:
    """A gateway installation made with the CLI, as an operator would make it."""
    root.mkdir(parents=True, exist_ok=True)
    org = org or organisation(root)
    authority = org / "authority.key"
    _cli(root, ["keys", "generate", "--id", gateway_id, "--key", "gateway.key",
                "--request", "gw.req"])  # fmt: skip
    assert cli.main(["authority", "issue", "--key", str(authority), "--request",
                     str(root / "gw.req"), "--out", str(root / "gateway.cert"),
                     "--sites", str(site)]) == 0  # fmt: skip
    config = root / "gateway.toml"
    config.write_text(
        f"""
[gateway]
id = "{gateway_id}"
state_dir = "state"
key_file = "gateway.key"
certificate_file = "gateway.cert"
authority_key_file = "{org / "authority.pub"}"

[radio]
backend = "bumble"
transport = "{transport}"
mtu = 247

[scheduler]
slots = 2
backoff_initial = "500ms"
backoff_max = "3s"
unreachable_after = "{unreachable_after}"

[mqtt]
host = "{broker.host}"
port = {broker.port}
tls = false
reconnect_min = "200ms"
reconnect_max = "2s"

[logging]
format = "json"

[metrics]
enabled = false
""",
        encoding="utf-8",
    )
    registry = Registry(
        authority=load_signing_key(authority),
        key=load_signing_key(org / "registry.key"),
        gateway_id=gateway_id,
        certificate=(org / "registry.cert").read_bytes(),
    )
    return Installation(root, config, registry, gateway_id, site)


async def pair_all(installation: Installation, sim: SimProcess) -> None:
    """The technician's visit: pair every simulated device before the daemon starts."""
    root = installation.root
    credentials = load_credentials(
        root / "gateway.key", root / "gateway.cert", installation_authority(installation)
    )
    (root / "state").mkdir(exist_ok=True)
    store = Store.open(root / "state" / "lockgw.sqlite3")
    try:
        async with BumbleRadio(sim.ready["transport"]) as radio, BlockingWorker("store") as worker:
            for device in sim.ready["devices"]:
                label = LabelPayload.parse(device["label"])
                await pair_device(
                    radio=radio,
                    address=device["address"],
                    device_id=label.device_id,
                    code=label.code,
                    site_id=installation.site,
                    order=WorkOrder(f"WO-{device['device_id'][:6]}", "owner-consent-1"),
                    credentials=credentials,
                    store=store,
                    worker=worker,
                    topics=Topics("lockgw", installation.gateway_id),
                )
    finally:
        store.close()


def installation_authority(installation: Installation) -> Path:
    for line in installation.config.read_text(encoding="utf-8").splitlines():
        if line.startswith("authority_key_file"):
            return Path(line.split("=", 1)[1].strip().strip('"'))
    msg = "no authority_key_file in the configuration"
    raise AssertionError(msg)


@overload
def make_registry(
    installation: Installation,
    broker: Mosquitto,
    schemas: Schemas | None = None,
    *,
    client_id: str = "registry-test",
) -> ReferenceRegistry: ...


@overload
def make_registry(
    installation: Installation,
    broker: Mosquitto,
    schemas: Schemas | None = None,
    *,
    client_id: str = "registry-test",
    factory: Callable[..., AnyRegistry],
    **options: Any,
) -> AnyRegistry: ...


def make_registry(
    installation: Installation,
    broker: Mosquitto,
    schemas: Schemas | None = None,
    *,
    client_id: str = "registry-test",
    factory: Callable[..., ReferenceRegistry] = ReferenceRegistry,
    **options: Any,
) -> ReferenceRegistry:
    """The reference registry (or a subclass: ``factory`` with its ``options``) with the
    installation's keys; checking every payload against the schemas when given them."""
    keys = installation.registry
    return factory(
        host=broker.host,
        port=broker.port,
        key=keys.key,
        certificate=keys.certificate,
        authority=keys.authority.public_key(),
        client_id=client_id,
        validator=schemas,
        **options,
    )


def kinds(registry: ReferenceRegistry, device: str) -> list[tuple[str, str, int]]:
    """(event, reason, key id) of the device's accepted events, in sequence order."""
    return [
        (e["event"], e["reason"], e["key_id"])
        for _, e in sorted(registry.events.get(device, {}).items())
    ]


def online(registry: ReferenceRegistry) -> bool:
    status = registry.gateways.get(GATEWAY_ID)
    return status is not None and status.state == "online"


async def start_daemon(config: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as output:  # the child keeps its own copy of the descriptor
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "run", "--config", str(config),
            cwd=REPO_ROOT, stdout=output, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip


async def stop_daemon(process: asyncio.subprocess.Process) -> int:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(15):
            return await process.wait()
    except TimeoutError:
        process.kill()
        return await process.wait()


async def lockgw(*args: str) -> tuple[int, str, str]:
    """The `lockgw` command as a real process: exit code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args,
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()
