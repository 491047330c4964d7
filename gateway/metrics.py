"""Prometheus metrics for the operators, and the small HTTP endpoint that serves them.

:class:`Metrics` owns a private :class:`~prometheus_client.CollectorRegistry` (not the
process-wide default), so two daemons in one test process, or two tests, never share a
counter. The daemon updates it through the methods below; :meth:`Metrics.serve` exposes
it on ``GET /metrics`` (text exposition format) next to ``GET /healthz``.

Every label takes values from a bounded set, because each distinct value is a time series
kept for the life of the process: error codes are :class:`~protocols.errors.ErrorCode`
names, outcomes and device states are fixed lists, command operations are capped
(:data:`MAX_COMMAND_OPS`), and per-update series are replaced wholesale by
:meth:`Metrics.set_revocations` so finished updates disappear.

The endpoint is deliberately tiny (one request per connection, ``Connection: close``):
it answers a scraper every 15 s or so on loopback, and a framework would be a dependency
for nothing. Requests are bounded in size (:data:`MAX_REQUEST_SIZE`), in time
(:data:`REQUEST_TIMEOUT`) and in concurrency (:data:`MAX_CONNECTIONS`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Final, Literal, Self

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from gateway import __version__
from gateway.config import split_host_port
from protocols.errors import ErrorCode

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "DEVICE_STATES",
    "MAX_COMMAND_OPS",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_SIZE",
    "REQUEST_TIMEOUT",
    "SESSION_OUTCOMES",
    "Metrics",
    "MetricsServer",
    "RevocationCoverage",
]

DeviceState = Literal["reachable", "unreachable", "decommissioned"]
DEVICE_STATES: Final[tuple[DeviceState, ...]] = ("reachable", "unreachable", "decommissioned")

SessionOutcome = Literal["ok", "failed", "refused", "timeout"]
SESSION_OUTCOMES: Final[tuple[SessionOutcome, ...]] = ("ok", "failed", "refused", "timeout")

CommandStatus = Literal["ok", "rejected", "failed"]
"""How a registry command ended when no protocol error code says more."""

NO_CODE: Final = "none"
"""``code`` label value when there is no error code."""

UNKNOWN_CODE: Final = "unknown"
"""``code`` label value for a number that is not an :class:`ErrorCode`."""

MAX_COMMAND_OPS: Final = 32
"""Distinct ``op`` label values; later ones count as ``other`` (the registry, not we,
decides what operations arrive, so the label must not grow without bound)."""

_OP_RE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,31}")

CLOCK_DRIFT_BUCKETS: Final = (0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 86400, float("inf"))
"""Seconds of absolute drift: sub-second is healthy, tens of seconds gets corrected, hours
and a day mean a device lost its time (battery swap)."""

MAX_REQUEST_SIZE: Final = 8192
"""Request line plus headers; a scraper sends a few hundred bytes."""

REQUEST_TIMEOUT: Final = 5.0
"""Seconds a client has to send its request and to take the response."""

MAX_CONNECTIONS: Final = 16
"""Connections served at once; more are closed at once."""


@dataclass(frozen=True, slots=True)
class RevocationCoverage:
    """How far one signed update has spread over its target devices."""

    applied: int
    """Devices that confirmed it."""
    pending: int
    """Devices it has still to reach (pending or unreachable)."""
    total: int
    """Devices it targets."""


class Metrics:
    """The gateway's metrics, in a registry of their own.

    The metric objects are public for the rare caller that needs them directly; the
    methods keep label values bounded and are the intended way in.
    """

    def __init__(
        self, *, version: str | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """``version`` defaults to this lockgw's; ``clock`` measures the uptime."""
        if version is None:
            version = __version__
        self.registry: Final = CollectorRegistry(auto_describe=True)
        registry = self.registry
        # Memory, CPU, open files and start time of the process (Linux /proc; nothing
        # elsewhere): a daemon that runs for months is watched for slow leaks.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)

        self.build_info: Final = Gauge(
            "lockgw_build_info",
            "Always 1; the version in its label.",
            ["version"],
            registry=registry,
        )
        self.build_info.labels(version=version).set(1)
        started = clock()
        self.uptime: Final = Gauge(
            "lockgw_uptime_seconds", "Seconds since the daemon started.", registry=registry
        )
        self.uptime.set_function(lambda: clock() - started)

        self.devices: Final = Gauge(
            "lockgw_devices", "Paired devices by state.", ["state"], registry=registry
        )
        self.outbox_depth: Final = Gauge(
            "lockgw_outbox_depth",
            "MQTT messages stored and not yet acknowledged by the broker.",
            registry=registry,
        )
        self.outbox_oldest_age: Final = Gauge(
            "lockgw_outbox_oldest_age_seconds",
            "Age of the oldest unacknowledged outbox message; 0 when the outbox is empty.",
            registry=registry,
        )
        self.revocation_applied_ratio: Final = Gauge(
            "lockgw_revocation_applied_ratio",
            "Share of its target devices that applied a signed update (0 to 1).",
            ["update_id"],
            registry=registry,
        )
        self.revocation_pending_devices: Final = Gauge(
            "lockgw_revocation_pending_devices",
            "Target devices a signed update has still to reach.",
            ["update_id"],
            registry=registry,
        )
        self.sessions: Final = Counter(
            "lockgw_sessions",
            "Device sessions by outcome and protocol error code.",
            ["outcome", "code"],
            registry=registry,
        )
        self.slots_busy: Final = Gauge(
            "lockgw_slots_busy", "Radio session slots in use.", registry=registry
        )
        self.slots_total: Final = Gauge(
            "lockgw_slots", "Radio session slots configured.", registry=registry
        )
        self.log_records: Final = Counter(
            "lockgw_log_records",
            "Event log records collected, verified and stored.",
            registry=registry,
        )
        self.log_verification_failures: Final = Counter(
            "lockgw_log_verification_failures",
            "Log batches that failed verification, by error code.",
            ["code"],
            registry=registry,
        )
        self.mqtt_connected: Final = Gauge(
            "lockgw_mqtt_connected", "1 while connected to the broker, else 0.", registry=registry
        )
        self.mqtt_reconnects: Final = Counter(
            "lockgw_mqtt_reconnects",
            "Connections to the broker re-established after a loss.",
            registry=registry,
        )
        self.commands: Final = Counter(
            "lockgw_commands",
            "Registry commands handled, by operation and status (ok, rejected, failed or an "
            "error code name).",
            ["op", "status"],
            registry=registry,
        )
        self.clock_drift: Final = Histogram(
            "lockgw_clock_drift_seconds",
            "Absolute difference between a device's clock and the gateway's, per reading.",
            buckets=CLOCK_DRIFT_BUCKETS,
            registry=registry,
        )
        self._command_ops: set[str] = set()
        self._mqtt_was_up = False

        # Series that should read 0 rather than be absent before the first event, so that
        # rate() and alerts work from the start.
        for state in DEVICE_STATES:
            self.devices.labels(state=state).set(0)
        for outcome in SESSION_OUTCOMES:
            self.sessions.labels(outcome=outcome, code=NO_CODE)

    # ----------------------------------------------------------------------------------------
    # Updates from the daemon
    # ----------------------------------------------------------------------------------------

    def set_devices(self, *, reachable: int, unreachable: int, decommissioned: int) -> None:
        """Set the device counts by state."""
        self.devices.labels(state="reachable").set(reachable)
        self.devices.labels(state="unreachable").set(unreachable)
        self.devices.labels(state="decommissioned").set(decommissioned)

    def set_outbox(self, *, depth: int, oldest_age: float) -> None:
        """Set the outbox depth and the age in seconds of its oldest message (0 if empty)."""
        self.outbox_depth.set(depth)
        self.outbox_oldest_age.set(oldest_age if depth else 0.0)

    def set_revocations(self, coverage: Mapping[str, RevocationCoverage]) -> None:
        """Replace the per-update series with ``coverage`` (update id -> coverage).

        Pass the updates still propagating; series of updates not in ``coverage`` are
        removed, which keeps the ``update_id`` label bounded.
        """
        self.revocation_applied_ratio.clear()
        self.revocation_pending_devices.clear()
        for update_id, item in coverage.items():
            ratio = item.applied / item.total if item.total else 1.0
            self.revocation_applied_ratio.labels(update_id=update_id).set(ratio)
            self.revocation_pending_devices.labels(update_id=update_id).set(item.pending)

    def session(self, outcome: SessionOutcome, code: ErrorCode | int | None = None) -> None:
        """Count one finished session."""
        if outcome not in SESSION_OUTCOMES:
            msg = f"unknown session outcome {outcome!r}"
            raise ValueError(msg)
        self.sessions.labels(outcome=outcome, code=_code_label(code)).inc()

    def set_slots(self, *, busy: int, total: int) -> None:
        """Set the busy and configured radio session slots."""
        self.slots_busy.set(busy)
        self.slots_total.set(total)

    def log_records_collected(self, count: int) -> None:
        """Count event log records stored after verification."""
        self.log_records.inc(count)

    def log_verification_failed(self, code: ErrorCode | int) -> None:
        """Count one log batch that failed verification with ``code``."""
        self.log_verification_failures.labels(code=_code_label(code)).inc()

    def mqtt_up(self) -> None:
        """The broker connection is up; every connection after the first is a reconnect."""
        if self._mqtt_was_up:
            self.mqtt_reconnects.inc()
        self._mqtt_was_up = True
        self.mqtt_connected.set(1)

    def mqtt_down(self) -> None:
        """The broker connection is down."""
        self.mqtt_connected.set(0)

    def command(self, op: str, status: CommandStatus | ErrorCode) -> None:
        """Count one registry command by its operation and how it ended."""
        label = status.name if isinstance(status, ErrorCode) else status
        self.commands.labels(op=self._op_label(op), status=label).inc()

    def clock_drift_observed(self, drift: float) -> None:
        """Record one clock reading's drift in seconds (the sign is dropped)."""
        self.clock_drift.observe(abs(drift))

    def _op_label(self, op: str) -> str:
        if _OP_RE.fullmatch(op) is None:
            return "invalid"
        if op not in self._command_ops:
            if len(self._command_ops) >= MAX_COMMAND_OPS:
                return "other"
            self._command_ops.add(op)
        return op

    # ----------------------------------------------------------------------------------------
    # Exposition
    # ----------------------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format."""
        return generate_latest(self.registry)

    async def serve(self, listen: str) -> MetricsServer:
        """Serve ``GET /metrics`` and ``GET /healthz`` on ``listen`` (``host:port``).

        Port 0 picks a free port (see :attr:`MetricsServer.port`). Close the returned
        server (``await server.aclose()`` or ``async with``) to stop.
        """
        host, port = split_host_port(listen)
        server = MetricsServer(self)
        await server.start(host, port)
        return server


def _code_label(code: ErrorCode | int | None) -> str:
    if code is None:
        return NO_CODE
    try:
        return ErrorCode(code).name
    except ValueError:
        return UNKNOWN_CODE


# --------------------------------------------------------------------------------------------
# HTTP endpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Response:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    extra_headers: tuple[tuple[str, str], ...] = ()


class MetricsServer:
    """The running endpoint; created by :meth:`Metrics.serve`."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host``:``port``."""
        self._server = await asyncio.start_server(
            self._handle, host, port, limit=MAX_REQUEST_SIZE, reuse_address=True
        )

    @property
    def port(self) -> int:
        """The port listened on (useful after asking for port 0)."""
        if self._server is None or not self._server.sockets:
            msg = "the metrics server is not listening"
            raise RuntimeError(msg)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def aclose(self) -> None:
        """Stop listening and drop connections in progress. Idempotent."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        # Handlers swallow their own errors; gather only waits for them to finish.
        await asyncio.gather(*handlers, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # start_server runs every handler in a task of its own; aclose() cancels them.
        task = asyncio.current_task()
        try:
            if task is None or len(self._handlers) >= MAX_CONNECTIONS:
                return
            self._handlers.add(task)
            async with asyncio.timeout(REQUEST_TIMEOUT):
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.LimitOverrunError:
                    response = _Response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b"too large\n")
                    await _send(writer, response, head_only=False)
                    return
                response, head_only = self._respond(head)
                await _send(writer, response, head_only=head_only)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away or dawdled; nothing to answer
        finally:
            if task is not None:
                self._handlers.discard(task)
            writer.close()
            with suppress(ConnectionError, TimeoutError):
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await writer.wait_closed()

    def _respond(self, head: bytes) -> tuple[_Response, bool]:
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _Response(HTTPStatus.BAD_REQUEST, b"bad request\n"), False
        method, target, _ = parts
        if method not in {"GET", "HEAD"}:
            allow = (("Allow", "GET, HEAD"),)
            return _Response(
                HTTPStatus.METHOD_NOT_ALLOWED, b"GET or HEAD\n", extra_headers=allow
            ), False
        path = target.split("?", 1)[0]
        if path == "/metrics":
            response = _Response(HTTPStatus.OK, self._metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            response = _Response(HTTPStatus.OK, b"ok\n")
        else:
            response = _Response(HTTPStatus.NOT_FOUND, b"not found\n")
        return response, method == "HEAD"


async def _send(writer: asyncio.StreamWriter, response: _Response, *, head_only: bool) -> None:
    headers = [
        f"HTTP/1.1 {response.status.value} {response.status.phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.extra_headers),
    ]
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(response.body)
    await writer.drain()
