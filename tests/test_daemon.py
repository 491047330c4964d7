"""The daemon end to end: `lockgw run` and the simulator as real processes, a real broker.

The gateway is installed as an operator would install it (authority, keys, signing
request, certificate, configuration: all through the `lockgw` CLI), its devices are paired
by a technician before it starts, and the registry is played by the reference registry
(:class:`simulators.registry.ReferenceRegistry`), which signs its commands, de-duplicates
events, re-verifies every batch against the device's registered key and here checks every
payload against docs/schemas.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import sys
import time
import uuid
from pathlib import Path

import aiomqtt
import pytest

from gateway import cli
from gateway.audit import verify_export
from protocols.pairing import LabelPayload, PairingCode
from simulators.registry import DecommissionRefused, ReferenceRegistry
from tests.broker import Mosquitto
from tests.conftest import Schemas
from tests.installation import (
    GATEWAY_ID,
    KEY,
    SITE,
    WAIT,
    install,
    kinds,
    lockgw,
    make_registry,
    online,
    organisation,
    pair_all,
    start_daemon,
    stop_daemon,
)
from tests.processes import REPO_ROOT, SimProcess


async def test_daemon_collects_revokes_and_survives_a_broker_outage(
    tmp_path: Path, broker: Mosquitto, schemas: Schemas
) -> None:
    sim = await SimProcess.start(
        "--locks", "2", "--serve", "tcp-server:127.0.0.1:0", "--advertising-interval", "0.05"
    )
    log = tmp_path / "daemon.log"
    daemon: asyncio.subprocess.Process | None = None
    registry: ReferenceRegistry | None = None
    listener: asyncio.Task[None] | None = None
    try:
        installation = install(tmp_path / "gw", transport=sim.ready["transport"], broker=broker)
        await pair_all(installation, sim)
        devices = [device["device_id"] for device in sim.ready["devices"]]
        registry = make_registry(installation, broker, schemas)
        listener = asyncio.create_task(registry.run())
        daemon = await start_daemon(installation.config, log)
        reg = registry  # narrowed, for the lambdas
        await reg.wait_for(lambda: online(reg), WAIT, "the gateway online")
        # Pairing happened while the daemon was down: the registrations waited in the
        # outbox and arrive now, with the keys the registry verifies events against.
        await reg.wait_for(lambda: set(reg.registrations) == set(devices), WAIT, "registrations")
        assert {r.gateway for r in reg.registrations.values()} == {GATEWAY_ID}
        await reg.wait_for(
            lambda: all(("PAIRED", "REMOTE", 0) in kinds(reg, d) for d in devices),
            WAIT,
            "the pairing events collected and verified",
        )

        now = int(time.time())
        entries = [{"key_id": KEY, "valid_from": now - 3600, "valid_until": now + 86400,
                    "windows": [{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                                 "start": "00:00", "end": "24:00"}]}]  # fmt: skip
        answer = await reg.set_access(
            "access-1",
            {"kind": "site", "site_id": SITE},
            entries,
            version=1,
            expires_at=now + 3600,
            gateway=GATEWAY_ID,
            timeout=WAIT,
        )
        assert answer["status"] == "ok", answer
        await reg.wait_for(
            lambda: reg.coverage("access-1")["applied"] == 2,
            WAIT,
            "the access list applied on both locks",
        )
        for device in devices:
            reply = await sim.command(cmd="present_key", device_id=device, key_id=KEY,
                                      activation_expires_at=now + 3600)  # fmt: skip
            assert reply["granted"], reply

        answer = await reg.revoke(
            "revoke-4711", [KEY], prune_after=now + 90 * 86400, expires_at=now + 3600, timeout=WAIT
        )
        assert answer["status"] == "ok", answer
        assert reg.revocation_version == 1
        await reg.wait_for(
            lambda: reg.coverage("revoke-4711") == {
                "applied": 2, "pending": 0, "failed": 0, "unreachable": 0
            },
            WAIT,
            "the revocation applied on both locks",
        )  # fmt: skip
        for device in devices:
            reply = await sim.command(cmd="present_key", device_id=device, key_id=KEY,
                                      activation_expires_at=now + 3600)  # fmt: skip
            assert not reply["granted"]
            assert reply["reason"] == "KEY_REVOKED"
        await reg.wait_for(
            lambda: all(("ACCESS_DENIED", "KEY_REVOKED", KEY) in kinds(reg, d) for d in devices),
            WAIT,
            "the refusals reach the registry",
        )
        answer = await reg.get_state(GATEWAY_ID, timeout=WAIT)
        assert answer["status"] == "ok", answer

        async with aiomqtt.Client(
            broker.host, broker.port, identifier=f"sender-{uuid.uuid4().hex[:6]}"
        ) as sender:
            await sender.publish(f"lockgw/gw/{GATEWAY_ID}/commands", b"not a command", qos=1)
            await reg.wait_for(
                lambda: any(
                    r["id"] is None and r["error"]["code"] == "malformed" for r in reg.uncorrelated
                ),
                WAIT,
                "the garbage command answered with a typed error",
            )

        # The broker goes away while the locks keep logging; nothing may be lost.
        before = {device: len(reg.events.get(device, {})) for device in devices}
        broker.stop()
        for _ in range(15):
            for device in devices:
                await sim.command(cmd="door", device_id=device, state="open")
                await sim.command(cmd="door", device_id=device, state="closed")
        await asyncio.sleep(2.0)  # collected into the store while the broker is down
        broker.start()
        await reg.wait_for(
            lambda: all(len(reg.events.get(d, {})) >= before[d] + 30 for d in devices),
            60,
            "every event logged during the outage",
        )
        assert reg.connections >= 2, "the registry reconnected with its session"
        for device in devices:
            sequences = sorted(registry.events[device])
            assert sequences == list(range(len(sequences))), "no gap, no duplicate"

        # Journey 3, the audit: the registry asks for one lock's events of the hour and
        # re-verifies chain and checkpoints itself; a tampered copy names the record.
        audited = devices[0]
        answer = await reg.pull_logs(GATEWAY_ID, audited, now - 3600, int(time.time()) + 60)
        assert answer["status"] == "ok", answer
        document = answer["result"]["export"]
        assert document["device_key"] == reg.registrations[audited].signing_key.hex()
        verdict = verify_export(document)
        assert verdict.intact, verdict
        assert verdict.records == len(reg.events[audited])
        tampered = copy.deepcopy(document)
        raw = bytearray.fromhex(tampered["batches"][0]["records"])
        raw[30 + 9] ^= 0x01  # the reason byte of the second record
        tampered["batches"][0]["records"] = raw.hex()
        failure = verify_export(tampered).failure
        assert failure is not None
        assert failure.sequence == tampered["batches"][0]["start_sequence"] + 1
        # Reading a door log is itself reported: who, which device, what range.
        await reg.wait_for(
            lambda: any(notice["device_id"] == audited for notice in reg.audits),
            WAIT,
            "the audit pull reported",
        )

        # Journey 1, decommissioning: refused while another service needs the lock, then
        # the log is collected, the lock reset to pairing mode and de-registered.
        retired = devices[1]
        reg.services[retired] = {"home-nursing"}
        with pytest.raises(DecommissionRefused):
            await reg.decommission(GATEWAY_ID, retired, "resident moved")
        reg.services.pop(retired)
        answer = await reg.decommission(GATEWAY_ID, retired, "resident moved")
        assert answer["status"] == "ok", answer
        await reg.wait_for(lambda: retired in reg.decommissions, WAIT, "the de-registration")
        [summary] = (await sim.command(cmd="status", device_id=retired))["devices"]
        assert not summary["paired"]
        assert daemon.returncode is None, log.read_text()
    finally:
        if daemon is not None:
            code = await stop_daemon(daemon)
            assert code == 0, log.read_text()[-3000:]
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        await sim.finish()
    assert registry is not None
    assert {"status", "registration", "events", "response", "progress", "device-state"} <= set(
        registry.validated
    ), registry.validated
    assert registry.invalid == [], registry.invalid  # every payload matched its schema
    assert registry.failures == [], registry.failures  # every batch re-verified
    assert registry.gaps == []
    await asyncio.sleep(0)  # the offline status is retained for anyone who asks now
    async with aiomqtt.Client(broker.host, broker.port, identifier="late") as late:
        await late.subscribe(f"lockgw/gw/{GATEWAY_ID}/status", qos=1)
        async with asyncio.timeout(5):
            async for message in late.messages:
                assert isinstance(message.payload, bytes)
                assert json.loads(message.payload)["state"] == "offline"
                break


def test_bad_configuration_exits_78_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[gateway]\nid = "Bad Id!"\n[mqtt]\nhost = "x"\n', encoding="utf-8")
    assert cli.main(["run", "--config", str(config)]) == cli.EX_CONFIG
    assert cli.main(["check-config", "--config", str(tmp_path / "absent.toml")]) == cli.EX_CONFIG


async def test_fleet_revocation_across_three_gateways(
    tmp_path: Path, broker: Mosquitto, schemas: Schemas
) -> None:
    """Journey 2: a lost key is revoked fleet-wide; every gateway signs and pushes it to its
    own locks; a lock switched off during the push is reported unreachable and gets the
    update when it returns; the revoked key is refused afterwards and the refusal reaches
    the registry."""
    org = organisation(tmp_path / "org")
    sims: list[SimProcess] = []
    daemons: list[tuple[asyncio.subprocess.Process, Path]] = []
    listener: asyncio.Task[None] | None = None
    try:
        installations = []
        for index in range(3):
            sim = await SimProcess.start(
                "--locks", "2", "--serve", "tcp-server:127.0.0.1:0",
                "--advertising-interval", "0.05",
            )  # fmt: skip
            sims.append(sim)
            installation = install(
                tmp_path / f"gw-{index}",
                transport=sim.ready["transport"],
                broker=broker,
                org=org,
                gateway_id=f"gw-{index}",
                site=40 + index,
                unreachable_after="2s",
            )
            await pair_all(installation, sim)
            installations.append(installation)
        registry = make_registry(installations[0], broker, schemas)
        listener = asyncio.create_task(registry.run())
        for installation in installations:
            log = installation.root / "daemon.log"
            daemons.append((await start_daemon(installation.config, log), log))
        await registry.wait_for(
            lambda: all(
                (status := registry.gateways.get(f"gw-{index}")) is not None
                and status.state == "online"
                for index in range(3)
            ),
            WAIT,
            "three gateways online",
        )
        devices = {sim.ready["devices"][0]["device_id"] for sim in sims} | {
            sim.ready["devices"][1]["device_id"] for sim in sims
        }
        await registry.wait_for(lambda: set(registry.registrations) == devices, WAIT, "six locks")
        switched_off = sims[2].ready["devices"][1]["device_id"]
        reply = await sims[2].command(cmd="power", device_id=switched_off, on=False)
        assert reply["ok"], reply

        now = int(time.time())
        answer = await registry.revoke("lost-key-4711", [KEY], now + 90 * 86400, now + 3600)
        assert answer["status"] == "ok", answer
        await registry.wait_for(
            lambda: registry.coverage("lost-key-4711") == {
                "applied": 5, "pending": 0, "failed": 0, "unreachable": 1
            },
            WAIT,
            "five locks applied, the switched-off one reported unreachable",
        )  # fmt: skip
        progress = registry.progress["lost-key-4711"]
        assert progress[switched_off].state == "unreachable"
        assert {report.gateway for report in progress.values()} == {"gw-0", "gw-1", "gw-2"}

        reply = await sims[2].command(cmd="power", device_id=switched_off, on=True)
        assert reply["ok"], reply
        await registry.wait_for(
            lambda: registry.coverage("lost-key-4711")["applied"] == 6,
            WAIT,
            "the returning lock catches up",
        )
        for sim in sims:
            for device in sim.ready["devices"]:
                reply = await sim.command(
                    cmd="present_key", device_id=device["device_id"], key_id=KEY,
                    activation_expires_at=now + 3600,
                )  # fmt: skip
                assert not reply["granted"]
                assert reply["reason"] == "KEY_REVOKED"
        await registry.wait_for(
            lambda: all(
                ("ACCESS_DENIED", "KEY_REVOKED", KEY) in kinds(registry, d) for d in devices
            ),
            WAIT,
            "every refusal reaches the registry",
        )
        assert not registry.failures
    finally:
        for process, log in daemons:
            code = await stop_daemon(process)
            assert code == 0, log.read_text()[-3000:]
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        for sim in sims:
            await sim.finish()


async def test_scan_lists_devices_in_range_from_adverts(tmp_path: Path, broker: Mosquitto) -> None:
    """The technician's `lockgw scan`: devices in range, from their adverts alone."""
    sim = await SimProcess.start(
        "--locks", "2", "--key-safes", "1", "--serve", "tcp-server:127.0.0.1:0",
        "--advertising-interval", "0.05",
    )  # fmt: skip
    try:
        installation = install(tmp_path / "gw", transport=sim.ready["transport"], broker=broker)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "scan", "--config", str(installation.config),
            "--duration", "2", "--json",
            cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(60):
            stdout, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
    finally:
        await sim.finish()
    rows = json.loads(stdout)["devices"]
    assert sorted(row["device_id"] for row in rows) == sorted(
        device["device_id"] for device in sim.ready["devices"]
    )
    assert {row["kind"] for row in rows} == {"door_lock", "key_safe"}
    assert all(row["device"] == "unpaired (pairing mode)" for row in rows)
    assert all(row["battery"] == 100 and row["waiting"] >= 1 for row in rows)


async def test_technician_pairs_with_the_cli_and_the_registration_waits(
    tmp_path: Path, broker: Mosquitto, schemas: Schemas
) -> None:
    """Journey 1 with the CLI: a wrong code leaves the lock unpaired; the label's QR payload
    pairs it; the registration waits in the outbox until the gateway runs."""
    sim = await SimProcess.start(
        "--locks", "1", "--serve", "tcp-server:127.0.0.1:0", "--advertising-interval", "0.05"
    )  # fmt: skip
    daemon: asyncio.subprocess.Process | None = None
    listener: asyncio.Task[None] | None = None
    try:
        installation = install(tmp_path / "gw", transport=sim.ready["transport"], broker=broker)
        [device] = sim.ready["devices"]
        pair_args = ["pair", "--config", str(installation.config), "--work-order", "WO-77",
                     "--consent", "owner-consent-77", "--site", str(SITE)]  # fmt: skip
        wrong = LabelPayload.parse(device["label"])
        other_code = LabelPayload(wrong.device_id, PairingCode.generate()).code.text()
        code, _, stderr = await lockgw(
            *pair_args, "--device", device["device_id"], "--code", other_code
        )
        assert code == 1
        assert "does not match this device; it stays unpaired" in stderr
        [summary] = (await sim.command(cmd="status", device_id=device["device_id"]))["devices"]
        assert not summary["paired"]

        code, stdout, stderr = await lockgw(*pair_args, "--code", device["label"], "--json")
        assert code == 0, stderr
        assert json.loads(stdout)["device_id"] == device["device_id"]
        [summary] = (await sim.command(cmd="status", device_id=device["device_id"]))["devices"]
        assert summary["paired"]

        registry = make_registry(installation, broker, schemas)
        listener = asyncio.create_task(registry.run())
        daemon = await start_daemon(installation.config, installation.root / "daemon.log")
        await registry.wait_for(
            lambda: device["device_id"] in registry.registrations, WAIT, "the queued registration"
        )
        registration = registry.registrations[device["device_id"]]
        assert registration.work_order == "WO-77"
        assert registration.consent_reference == "owner-consent-77"
    finally:
        if daemon is not None:
            assert await stop_daemon(daemon) == 0
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        await sim.finish()
