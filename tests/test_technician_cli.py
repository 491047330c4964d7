"""The technician's and the auditor's commands, typed as people type them.

`lockgw decommission` and `lockgw audit pull` go through the running daemon's control
socket (the daemon owns the radio); `lockgw pair` and `lockgw scan` are also run on a
pseudo-terminal, where the pairing code is asked for without echo and the scan table
refreshes in place. Everything runs as real processes against simulated devices, a real
Mosquitto and the reference registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from protocols.pairing import LabelPayload
from simulators.registry import ReferenceRegistry
from tests.broker import Mosquitto
from tests.conftest import Schemas
from tests.installation import (
    KEY,
    SITE,
    WAIT,
    install,
    lockgw,
    make_registry,
    online,
    pair_all,
    start_daemon,
    stop_daemon,
)
from tests.processes import REPO_ROOT, SimProcess

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r")


@contextlib.asynccontextmanager
async def listening(registry: ReferenceRegistry) -> AsyncIterator[None]:
    task = asyncio.create_task(registry.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_auditor_pulls_and_technician_decommissions_through_the_daemon(
    tmp_path: Path, broker: Mosquitto, schemas: Schemas
) -> None:
    sim = await SimProcess.start(
        "--locks", "2", "--serve", "tcp-server:127.0.0.1:0", "--advertising-interval", "0.05"
    )  # fmt: skip
    installation = install(tmp_path / "gw", transport=sim.ready["transport"], broker=broker)
    config = str(installation.config)
    audited, retired = (device["device_id"] for device in sim.ready["devices"])
    registry = make_registry(installation, broker, schemas)
    daemon: asyncio.subprocess.Process | None = None
    try:
        await pair_all(installation, sim)
        # Without the daemon there is nobody to ask: a clear one-line error.
        code, _, stderr = await lockgw("audit", "pull", audited, "--config", config,
                                       "--from", "0", "--to", "4000000000",
                                       "--out", str(tmp_path / "none.json"))  # fmt: skip
        assert code == 1
        assert "the gateway daemon is not running" in stderr
        assert stderr.count("\n") == 1, stderr

        async with listening(registry):
            daemon = await start_daemon(installation.config, installation.root / "daemon.log")
            await registry.wait_for(lambda: online(registry), WAIT, "the gateway online")
            await registry.wait_for(
                lambda: {audited, retired} <= set(registry.registrations), WAIT, "registrations"
            )
            # A door event happens just before the pull: the pull collects it first.
            now = int(time.time())
            reply = await sim.command(cmd="present_key", device_id=audited, key_id=KEY,
                                      activation_expires_at=now + 3600)  # fmt: skip
            assert not reply["granted"]  # no access list yet: denied, and logged
            pull = ["audit", "pull", audited, "--config", config, "--from", str(now - 3600),
                    "--to", str(now + 3600), "--auditor", "audit team"]  # fmt: skip
            exports = {}
            for fmt in ("json", "csv", "html"):
                out = tmp_path / f"pull.{fmt}"
                code, stdout, stderr = await lockgw(*pull, "--format", fmt, "--out", str(out))
                assert code == 0, stderr
                assert "collected from the device first" in stdout
                assert "intact" in stdout
                assert out.stat().st_mode & 0o777 == 0o600
                exports[fmt] = out.read_text(encoding="utf-8")
            document = json.loads(exports["json"])
            events = [(e["event"], e["reason"]) for e in document["events"]]
            assert ("ACCESS_DENIED", "KEY_UNKNOWN") in events, events
            assert all(e["key"] != KEY for e in document["events"])  # pseudonymised
            rows = list(csv.DictReader(io.StringIO(exports["csv"])))
            assert len(rows) == len(document["events"])
            assert "<svg" in exports["html"]
            assert "<script" not in exports["html"]
            # Every pull is reported to the registry: who (as the kernel says), what, when.
            await registry.wait_for(lambda: len(registry.audits) >= 3, WAIT, "audit notices")
            notice = registry.audits[-1]
            assert notice["device_id"] == audited
            assert notice["auditor"].startswith("local:")
            assert notice["auditor"].endswith("(audit team)")

            # The auditor re-verifies offline with the registered device key.
            device_key = registry.registrations[audited].signing_key.hex()
            exported = tmp_path / "pull.json"
            code, stdout, _ = await lockgw("audit", "verify", str(exported),
                                           "--device-key", device_key)  # fmt: skip
            assert code == 0, stdout
            tampered = json.loads(exports["json"])
            raw = bytearray.fromhex(tampered["batches"][-1]["records"])
            raw[-30 + 9] ^= 0x01  # the reason byte of the batch's last record
            tampered["batches"][-1]["records"] = raw.hex()
            bad = tmp_path / "tampered.json"
            bad.write_text(json.dumps(tampered), encoding="utf-8")
            code, stdout, _ = await lockgw("audit", "verify", str(bad),
                                           "--device-key", device_key)  # fmt: skip
            assert code == 1
            last = tampered["batches"][-1]["start_sequence"] + len(raw) // 30 - 1
            assert f"record {last}" in stdout, stdout
            code, stdout, _ = await lockgw("audit", "verify", str(bad), "--json",
                                           "--device-key", device_key)  # fmt: skip
            assert code == 1
            verdict = json.loads(stdout)
            assert not verdict["intact"]
            assert verdict["failure"]["sequence"] == last
            code, stdout, _ = await lockgw(*pull, "--out", str(tmp_path / "p.json"), "--json")
            assert code == 0
            assert json.loads(stdout)["verification"]["intact"] is True

            # Decommission: refused while another service needs the lock; nothing changes.
            registry.services[retired] = {"home-nursing"}
            decommission = ["decommission", retired, "--config", config,
                            "--reason", "resident moved"]  # fmt: skip
            code, _, stderr = await lockgw(*decommission)
            assert code == 1
            assert "home-nursing" in stderr
            assert "--force" in stderr
            [summary] = (await sim.command(cmd="status", device_id=retired))["devices"]
            assert summary["paired"]
            assert retired not in registry.decommissions
            # Forced with a reason: the log is collected, the lock reset and de-registered.
            code, stdout, stderr = await lockgw(
                *decommission, "--force", "care plan ended", "--json"
            )
            assert code == 0, stderr
            assert json.loads(stdout)["decommissioned"] is True
            await registry.wait_for(
                lambda: retired in registry.decommissions, WAIT, "the de-registration"
            )
            assert "care plan ended" in str(registry.decommissions[retired].consent_reference)
            [summary] = (await sim.command(cmd="status", device_id=retired))["devices"]
            assert not summary["paired"]
            assert [r["answer"] for r in registry.requests.values()] == ["decline", "decommission"]

        # The registry is away: the technician is told, and nothing changes.
        code, _, stderr = await lockgw("decommission", audited, "--config", config,
                                       "--reason", "resident moved", "--timeout", "2")  # fmt: skip
        assert code == 1
        assert "did not answer within 2 s; nothing was changed" in stderr
        # The registry comes back and finds the request expired: it does not act on it.
        async with listening(registry):
            await registry.wait_for(lambda: len(registry.requests) == 3, WAIT, "the late request")
            assert list(registry.requests.values())[-1]["answer"] == "expired"
        [summary] = (await sim.command(cmd="status", device_id=audited))["devices"]
        assert summary["paired"]
        assert daemon.returncode is None
    finally:
        if daemon is not None:
            assert await stop_daemon(daemon) == 0, (installation.root / "daemon.log").read_text()
        await sim.finish()
    assert registry.invalid == [], registry.invalid
    assert "request" in registry.validated


# -------------------------------------------------------------------- on a terminal

# The child makes the pseudo-terminal its controlling terminal (as a login does), so that
# getpass reads the code from it with echo off, then becomes `lockgw`.
_ON_TERMINAL = (
    "import os, sys; os.login_tty(0); "
    "os.execv(sys.executable, [sys.executable, '-m', 'gateway.cli', *sys.argv[1:]])"
)


def on_terminal(
    args: Sequence[str], answers: Sequence[tuple[bytes, bytes]], within: float = 60.0
) -> tuple[int, bytes]:
    """Run `lockgw ARGS` on a pseudo-terminal; type each answer once its prompt shows.

    Returns the exit code and everything the terminal showed, without escape sequences.
    """
    import pty  # noqa: PLC0415 - POSIX only, like the daemon
    import termios  # noqa: PLC0415

    primary, secondary = pty.openpty()
    # 40 rows x 160 columns, so the tables are not cut.
    termios.tcsetwinsize(secondary, (40, 160))
    process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-c", _ON_TERMINAL, *args],
        stdin=secondary, stdout=secondary, stderr=secondary, cwd=REPO_ROOT,
        env={**os.environ, "TERM": "xterm-256color"},
    )  # fmt: skip
    os.close(secondary)
    shown = bytearray()
    pending = list(answers)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(primary, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                shown += chunk
            if pending and pending[0][0] in shown:
                os.write(primary, pending.pop(0)[1])
            if process.poll() is not None and not ready:
                break
        code = process.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(primary)
    return code, _ANSI.sub(b"", bytes(shown))


async def test_pairing_on_a_terminal_hides_the_code_and_scan_refreshes_live(
    tmp_path: Path, broker: Mosquitto
) -> None:
    sim = await SimProcess.start(
        "--locks", "1", "--serve", "tcp-server:127.0.0.1:0", "--advertising-interval", "0.05"
    )  # fmt: skip
    try:
        installation = install(tmp_path / "gw", transport=sim.ready["transport"], broker=broker)
        config = str(installation.config)
        [device] = sim.ready["devices"]
        label = LabelPayload.parse(device["label"])

        code, shown = await asyncio.to_thread(
            on_terminal, ["scan", "--config", config, "--duration", "2"], []
        )
        assert code == 0, shown
        assert b"device(s) in range" in shown
        assert b"unpaired (pairing mode)" in shown

        pair = ["pair", "--config", config, "--work-order", "WO-5", "--consent", "CR-5",
                "--site", str(SITE)]  # fmt: skip
        typed = label.code.text().encode()
        code, shown = await asyncio.to_thread(
            on_terminal, pair, [(b"Pairing code or label payload: ", typed + b"\n")]
        )
        assert code == 0, shown
        assert typed not in shown, "the pairing code was echoed"
        assert f"paired door_lock {device['device_id']}".encode() in shown, shown
        assert b"registration waits in the outbox" in shown
        [summary] = (await sim.command(cmd="status", device_id=device["device_id"]))["devices"]
        assert summary["paired"]
    finally:
        await sim.finish()
