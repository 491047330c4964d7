"""A Mosquitto broker as a child process on a free port of 127.0.0.1 (demo and tests).

:class:`Broker` writes a plain (no TLS) configuration into a directory, starts
``mosquitto -c FILE``, waits until the port accepts connections, and stops it with
SIGTERM (SIGKILL when it hangs). ``scripts/setup --with-broker`` installs Mosquitto.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Final, Self

__all__ = ["Broker", "BrokerError", "find_mosquitto", "free_port"]

HOST: Final = "127.0.0.1"
START_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 5.0
FALLBACK_BINARY: Final = Path("/usr/sbin/mosquitto")


class BrokerError(RuntimeError):
    """The broker could not be found, did not start, or died."""


def find_mosquitto() -> str:
    """The mosquitto binary (PATH, then /usr/sbin); BrokerError when there is none."""
    found = shutil.which("mosquitto")
    if found:
        return found
    if FALLBACK_BINARY.is_file() and os.access(FALLBACK_BINARY, os.X_OK):
        return str(FALLBACK_BINARY)
    msg = (
        "no `mosquitto` binary was found (PATH, /usr/sbin): run scripts/setup --with-broker, "
        "which installs the Debian package mosquitto, or give --broker mqtt://HOST:PORT"
    )
    raise BrokerError(msg)


def free_port(host: str = HOST) -> int:
    """A TCP port of ``host`` that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class Broker:
    """One Mosquitto process listening on ``127.0.0.1:port``, anonymous, no TLS."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.binary = find_mosquitto()
        self.host = HOST
        self.port = free_port()
        self.config_file = directory / "mosquitto.conf"
        self.log_file = directory / "mosquitto.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.config_file.write_text("\n".join(self._config_lines()) + "\n", encoding="utf-8")

    def _config_lines(self) -> list[str]:
        """The configuration file's lines; a subclass adds TLS, ACLs or persistence."""
        lines = [
            "persistence false",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            # Latency, not throughput: Nagle's algorithm would hold back small messages.
            "set_tcp_nodelay true",
        ]
        if os.geteuid() == 0:
            # As root, Mosquitto would switch to the user "mosquitto", which cannot read
            # files in a private temporary directory.
            lines.append("user root")
        return [*lines, f"listener {self.port} {self.host}", "allow_anonymous true"]

    @property
    def running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        """What the broker logged so far."""
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Start the broker and wait until its port accepts connections."""
        if self.running:
            msg = "the broker is already running"
            raise BrokerError(msg)
        self._process = subprocess.Popen(  # noqa: S603 - a fixed binary and our own config file
            [self.binary, "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                _, errors = self._process.communicate()
                self._process = None
                msg = f"mosquitto exited at start: {errors.decode(errors='replace')}"
                raise BrokerError(msg + "\n" + self.log_text())
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.01)
        self.stop()
        msg = f"mosquitto did not accept connections on port {self.port}\n{self.log_text()}"
        raise BrokerError(msg)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL if it hangs); harmless when stopped."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused (SIGSTOP) broker cannot act on SIGTERM
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
        if process.stderr is not None:
            process.stderr.close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        """Where the broker listens."""
        return f"<Broker {self.host}:{self.port} running={self.running}>"
