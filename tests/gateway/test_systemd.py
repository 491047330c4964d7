"""gateway.systemd and systemd/: sd_notify over a real socket, the watchdog, the unit files."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway import systemd

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "lockgw.service"
SYSUSERS = ROOT / "systemd" / "lockgw.sysusers.conf"
TMPFILES = ROOT / "systemd" / "lockgw.tmpfiles.conf"


class Listener:
    """systemd's end of NOTIFY_SOCKET: a datagram socket and a thread that records what
    arrives, with the time, so a blocked event loop cannot delay the recording."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.02)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def texts(self) -> list[str]:
        with self._lock:
            return [text for _, text in self.messages]

    def times(self, text: str) -> list[float]:
        with self._lock:
            return [stamp for stamp, message in self.messages if message == text]

    def wait_for(self, count: int, timeout: float = 2.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.texts()) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.texts()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    path = tmp_path / "notify"
    assert len(str(path)) < 100, "sun_path holds 108 bytes"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    receiver = Listener(str(path))
    yield receiver
    receiver.close()


# --------------------------------------------------------------------------------------------
# sd_notify
# --------------------------------------------------------------------------------------------


def test_no_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.status("x") is False
    assert systemd.stopping() is False


def test_ready(listener: Listener) -> None:
    assert systemd.ready() is True
    assert listener.wait_for(1) == ["READY=1"]


def test_ready_with_status(listener: Listener) -> None:
    assert systemd.ready("12 devices") is True
    assert listener.wait_for(1) == ["READY=1\nSTATUS=12 devices"]


def test_status_and_stopping(listener: Listener) -> None:
    assert systemd.status("collecting logs")
    assert systemd.stopping()
    assert listener.wait_for(2) == ["STATUS=collecting logs", "STOPPING=1"]


def test_status_cannot_inject_assignments(listener: Listener) -> None:
    systemd.status("line one\nSTOPPING=1\r\nend")
    assert listener.wait_for(1) == ["STATUS=line one STOPPING=1 end"]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"lockgw-test-{uuid.uuid4().hex}"
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    receiver = Listener("\0" + name)
    try:
        assert systemd.ready() is True
        assert receiver.wait_for(1) == ["READY=1"]
    finally:
        receiver.close()


def test_unreachable_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False


def test_unsupported_address_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


# --------------------------------------------------------------------------------------------
# Watchdog
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("200000", None, 0.1),
        ("30000000", None, 15.0),
        ("200000", "own", 0.1),
        ("200000", "other", None),
        ("soon", None, None),
        ("0", None, None),
        ("-5", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for name, env in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if env is None:
            monkeypatch.delenv(name, raising=False)
        else:
            own = os.getpid()
            monkeypatch.setenv(name, {"own": str(own), "other": str(own + 1)}.get(env, env))
    assert systemd.watchdog_interval() == expected


async def test_watchdog_without_systemd_returns_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    async with asyncio.timeout(1):
        await systemd.watchdog_task()


async def test_watchdog_for_another_pid_returns_at_once(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    async with asyncio.timeout(1):
        await systemd.watchdog_task()
    assert listener.texts() == []


async def run_watchdog_for(seconds: float, healthy: Callable[[], bool] | None = None) -> None:
    task = asyncio.create_task(systemd.watchdog_task(healthy))
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_watchdog_pings_at_half_the_timeout(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    await run_watchdog_for(0.5)
    await asyncio.sleep(0.05)  # let the recorder catch up
    pings = listener.times("WATCHDOG=1")
    # One at once, then one per 0.1 s: about 5 or 6. A count range, not a stopwatch.
    assert 3 <= len(pings) <= 8, pings
    assert set(listener.texts()) == {"WATCHDOG=1"}


async def test_stuck_loop_stops_the_pings(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 0.05 s
    task = asyncio.create_task(systemd.watchdog_task())
    await asyncio.sleep(0.15)
    blocked_from = time.monotonic()
    time.sleep(0.4)  # noqa: ASYNC251 -- blocking the event loop is what this test simulates
    blocked_until = time.monotonic()
    await asyncio.sleep(0.15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    pings = listener.times("WATCHDOG=1")
    during = [t for t in pings if blocked_from + 0.02 < t < blocked_until - 0.02]
    assert during == []
    assert any(t < blocked_from for t in pings)
    assert any(t >= blocked_until for t in pings)


async def test_unhealthy_daemon_withholds_pings(
    listener: Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    healthy = False
    await run_watchdog_for(0.3, healthy=lambda: healthy)
    await asyncio.sleep(0.05)
    assert listener.texts() == []
    healthy = True
    await run_watchdog_for(0.3, healthy=lambda: healthy)
    assert len(listener.wait_for(3)) >= 3


# --------------------------------------------------------------------------------------------
# Unit files
# --------------------------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) in order; repeated keys stay repeated, as systemd reads them."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if header := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(header[1], [])
            continue
        assert current is not None, f"directive outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [value for name, value in section if name == key]


def single(section: list[tuple[str, str]], key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, (key, found)
    return found[0]


def test_unit_is_notify_with_watchdog_and_restart() -> None:
    unit = parse_unit(UNIT.read_text(encoding="utf-8"))
    service = unit["Service"]
    assert single(service, "Type") == "notify"
    assert single(service, "ExecStart") == "/usr/bin/lockgw run --config /etc/lockgw/gateway.toml"
    assert single(service, "NotifyAccess") == "main"
    assert single(service, "WatchdogSec") == "30"
    assert single(service, "Restart") == "on-failure"
    assert single(service, "RestartSec") == "5"
    assert single(service, "User") == "lockgw"
    assert single(service, "Group") == "lockgw"
    assert single(service, "StateDirectory") == "lockgw"
    assert single(service, "StateDirectoryMode") == "0700"
    assert single(service, "ConfigurationDirectory") == "lockgw"
    assert single(service, "UMask") == "0077"
    assert values(unit["Install"], "WantedBy") == ["multi-user.target"]


def test_unit_hardening() -> None:
    service = parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]
    expected = {
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "NoNewPrivileges": "true",
        "PrivateDevices": "true",
        "ProtectKernelTunables": "true",
        "ProtectKernelModules": "true",
        "ProtectControlGroups": "true",
        "RestrictNamespaces": "true",
        "LockPersonality": "true",
        "MemoryDenyWriteExecute": "true",
        "RestrictRealtime": "true",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert single(service, key) == value, key
    families = single(service, "RestrictAddressFamilies").split()
    assert set(families) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_BLUETOOTH"}
    assert values(service, "SystemCallFilter")[0] == "@system-service"
    assert all(f.startswith("~") for f in values(service, "SystemCallFilter")[1:])


def test_every_unit_directive_is_commented() -> None:
    previous = ""
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            assert previous.startswith("#"), f"no comment above: {line}"
        if line:
            previous = line


def test_watchdog_pings_fit_the_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    service = parse_unit(UNIT.read_text(encoding="utf-8"))["Service"]
    # systemd passes WatchdogSec= to the service as WATCHDOG_USEC, in microseconds.
    monkeypatch.setenv("WATCHDOG_USEC", str(int(single(service, "WatchdogSec")) * 1_000_000))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 15.0


def test_sysusers() -> None:
    lines = [
        shlex.split(line)
        for line in SYSUSERS.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    assert lines == [
        ["u", "lockgw", "-", "lockgw gateway daemon", "/var/lib/lockgw"],
        ["m", "lockgw", "bluetooth"],
    ]


def test_tmpfiles() -> None:
    lines = [
        line.split()
        for line in TMPFILES.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    assert ["d", "/var/lib/lockgw", "0700", "lockgw", "lockgw", "-"] in lines


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here"
)
def test_systemd_analyze_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    true = shutil.which("true")
    assert analyze is not None
    assert true is not None
    # verify insists that ExecStart= exists; everything else is checked as shipped.
    text = UNIT.read_text(encoding="utf-8").replace(
        "ExecStart=/usr/bin/lockgw", f"ExecStart={true}"
    )
    unit = tmp_path / "lockgw.service"
    unit.write_text(text, encoding="utf-8")

    verify = subprocess.run(  # noqa: S603 -- a fixed tool on a file we just wrote
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=30, check=False
    )
    output = verify.stdout + verify.stderr
    assert verify.returncode == 0, output
    # verify reports unknown directives and bad values as warnings with a zero exit code.
    assert [line for line in output.splitlines() if unit.name in line] == []

    version = subprocess.run(  # noqa: S603 -- as above
        [analyze, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    match = re.search(r"systemd (\d+)", version)
    if match and int(match[1]) >= 250:  # --offline appeared in systemd 250
        security = subprocess.run(  # noqa: S603 -- as above
            [analyze, "security", "--offline=true", "--threshold=25", "--no-pager", str(unit)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        # Exposure is 0 (best) to 10 (worst), the threshold 0 to 100: 25 means 2.5, "OK".
        assert security.returncode == 0, security.stdout + security.stderr
