"""gateway.metrics: the operators' metrics, scraped over real HTTP from the asyncio endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import prometheus_client
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

import gateway.metrics as metrics_module
from gateway.metrics import (
    MAX_COMMAND_OPS,
    MAX_REQUEST_SIZE,
    Metrics,
    MetricsServer,
    RevocationCoverage,
)
from protocols.errors import ErrorCode


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics(clock: FakeClock) -> Metrics:
    return Metrics(version="1.2.3", clock=clock)


@pytest.fixture
async def server(metrics: Metrics) -> AsyncIterator[MetricsServer]:
    async with await metrics.serve("127.0.0.1:0") as running:
        yield running


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a raw request and read the response to EOF: (status, headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, body


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return await http(port, f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())


async def scrape(port: int) -> dict[str, Metric]:
    """Family name -> metric family, parsed with prometheus_client's own parser."""
    status, headers, body = await get(port, "/metrics")
    assert status == 200
    assert headers["content-type"] == prometheus_client.CONTENT_TYPE_LATEST
    assert int(headers["content-length"]) == len(body)
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def value(family: Metric, name: str, **labels: str) -> float:
    matches = [s.value for s in family.samples if s.name == name and s.labels == labels]
    assert len(matches) == 1, (name, labels, family.samples)
    return matches[0]


# --------------------------------------------------------------------------------------------
# Metrics over HTTP
# --------------------------------------------------------------------------------------------


async def test_every_metric_is_exposed(server: MetricsServer) -> None:
    families = await scrape(server.port)
    expected = {
        "lockgw_build_info": "gauge",
        "lockgw_uptime_seconds": "gauge",
        "lockgw_devices": "gauge",
        "lockgw_outbox_depth": "gauge",
        "lockgw_outbox_oldest_age_seconds": "gauge",
        "lockgw_revocation_applied_ratio": "gauge",
        "lockgw_revocation_pending_devices": "gauge",
        "lockgw_sessions": "counter",
        "lockgw_slots_busy": "gauge",
        "lockgw_slots": "gauge",
        "lockgw_log_records": "counter",
        "lockgw_log_verification_failures": "counter",
        "lockgw_mqtt_connected": "gauge",
        "lockgw_mqtt_reconnects": "counter",
        "lockgw_commands": "counter",
        "lockgw_clock_drift_seconds": "histogram",
    }
    for name, kind in expected.items():
        assert families[name].type == kind, name
    assert value(families["lockgw_build_info"], "lockgw_build_info", version="1.2.3") == 1
    for state in ("reachable", "unreachable", "decommissioned"):
        assert value(families["lockgw_devices"], "lockgw_devices", state=state) == 0
    # Session outcomes read 0 from the start, so that rate() works before the first one.
    assert (
        value(families["lockgw_sessions"], "lockgw_sessions_total", outcome="ok", code="none") == 0
    )


async def test_values_reach_the_scrape(
    metrics: Metrics, server: MetricsServer, clock: FakeClock
) -> None:
    metrics.set_devices(reachable=7, unreachable=2, decommissioned=1)
    metrics.set_outbox(depth=12, oldest_age=33.5)
    metrics.set_slots(busy=3, total=5)
    metrics.session("ok")
    metrics.session("ok")
    metrics.session("refused", ErrorCode.CERT_EXPIRED)
    metrics.session("failed", 0x77)  # not an ErrorCode: bounded to "unknown"
    metrics.log_records_collected(500)
    metrics.log_records_collected(20)
    metrics.log_verification_failed(ErrorCode.LOG_GAP)
    metrics.command("revoke", "ok")
    metrics.command("revoke", ErrorCode.UPDATE_ROLLBACK)
    metrics.clock_drift_observed(-3.0)
    metrics.clock_drift_observed(45.0)
    clock.now += 90

    f = await scrape(server.port)
    assert value(f["lockgw_devices"], "lockgw_devices", state="reachable") == 7
    assert value(f["lockgw_devices"], "lockgw_devices", state="unreachable") == 2
    assert value(f["lockgw_devices"], "lockgw_devices", state="decommissioned") == 1
    assert value(f["lockgw_outbox_depth"], "lockgw_outbox_depth") == 12
    assert value(f["lockgw_outbox_oldest_age_seconds"], "lockgw_outbox_oldest_age_seconds") == 33.5
    assert value(f["lockgw_slots_busy"], "lockgw_slots_busy") == 3
    assert value(f["lockgw_slots"], "lockgw_slots") == 5
    sessions = f["lockgw_sessions"]
    assert value(sessions, "lockgw_sessions_total", outcome="ok", code="none") == 2
    assert value(sessions, "lockgw_sessions_total", outcome="refused", code="CERT_EXPIRED") == 1
    assert value(sessions, "lockgw_sessions_total", outcome="failed", code="unknown") == 1
    assert value(f["lockgw_log_records"], "lockgw_log_records_total") == 520
    failures = f["lockgw_log_verification_failures"]
    assert value(failures, "lockgw_log_verification_failures_total", code="LOG_GAP") == 1
    commands = f["lockgw_commands"]
    assert value(commands, "lockgw_commands_total", op="revoke", status="ok") == 1
    assert value(commands, "lockgw_commands_total", op="revoke", status="UPDATE_ROLLBACK") == 1
    drift = f["lockgw_clock_drift_seconds"]
    assert value(drift, "lockgw_clock_drift_seconds_count") == 2
    assert value(drift, "lockgw_clock_drift_seconds_sum") == 48.0
    assert value(drift, "lockgw_clock_drift_seconds_bucket", le="5.0") == 1
    assert value(drift, "lockgw_clock_drift_seconds_bucket", le="60.0") == 2
    assert value(f["lockgw_uptime_seconds"], "lockgw_uptime_seconds") == 90


async def test_outbox_age_is_zero_when_empty(metrics: Metrics, server: MetricsServer) -> None:
    metrics.set_outbox(depth=0, oldest_age=99.0)
    f = await scrape(server.port)
    assert value(f["lockgw_outbox_oldest_age_seconds"], "lockgw_outbox_oldest_age_seconds") == 0


async def test_revocation_series_are_replaced(metrics: Metrics, server: MetricsServer) -> None:
    metrics.set_revocations(
        {
            "rev-1": RevocationCoverage(applied=3, pending=1, total=4),
            "rev-2": RevocationCoverage(0, 0, 0),
        }
    )
    f = await scrape(server.port)
    ratio = f["lockgw_revocation_applied_ratio"]
    assert value(ratio, "lockgw_revocation_applied_ratio", update_id="rev-1") == 0.75
    assert value(ratio, "lockgw_revocation_applied_ratio", update_id="rev-2") == 1.0
    pending = f["lockgw_revocation_pending_devices"]
    assert value(pending, "lockgw_revocation_pending_devices", update_id="rev-1") == 1

    metrics.set_revocations({"rev-3": RevocationCoverage(applied=1, pending=1, total=2)})
    f = await scrape(server.port)
    assert {s.labels["update_id"] for s in f["lockgw_revocation_applied_ratio"].samples} == {
        "rev-3"
    }
    assert {s.labels["update_id"] for s in f["lockgw_revocation_pending_devices"].samples} == {
        "rev-3"
    }


async def test_mqtt_connection_and_reconnects(metrics: Metrics, server: MetricsServer) -> None:
    metrics.mqtt_up()  # the first connection is not a reconnect
    f = await scrape(server.port)
    assert value(f["lockgw_mqtt_connected"], "lockgw_mqtt_connected") == 1
    assert value(f["lockgw_mqtt_reconnects"], "lockgw_mqtt_reconnects_total") == 0
    metrics.mqtt_down()
    f = await scrape(server.port)
    assert value(f["lockgw_mqtt_connected"], "lockgw_mqtt_connected") == 0
    metrics.mqtt_up()
    metrics.mqtt_down()
    metrics.mqtt_up()
    f = await scrape(server.port)
    assert value(f["lockgw_mqtt_connected"], "lockgw_mqtt_connected") == 1
    assert value(f["lockgw_mqtt_reconnects"], "lockgw_mqtt_reconnects_total") == 2


def test_command_ops_are_bounded(metrics: Metrics) -> None:
    for index in range(MAX_COMMAND_OPS + 5):
        metrics.command(f"op{index}", "ok")
    metrics.command("Not An Op!", "rejected")
    metrics.command("x" * 100, "rejected")
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    ops = {s.labels["op"] for s in families["lockgw_commands"].samples if s.name.endswith("_total")}
    assert len(ops) == MAX_COMMAND_OPS + 2
    assert {"other", "invalid"} <= ops
    assert "op0" in ops
    assert f"op{MAX_COMMAND_OPS}" not in ops


def test_unknown_session_outcome_is_refused(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="outcome"):
        metrics.session("exploded")  # type: ignore[arg-type]  # the point: not an outcome


def test_registries_are_private(clock: FakeClock) -> None:
    first, second = Metrics(clock=clock), Metrics(clock=clock)
    first.log_records_collected(5)
    text = second.exposition().decode()
    assert "lockgw_log_records_total 0.0" in text
    # Nothing of ours lands in the process-wide default registry.
    assert b"lockgw_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY)


# --------------------------------------------------------------------------------------------
# The HTTP endpoint
# --------------------------------------------------------------------------------------------


async def test_healthz(server: MetricsServer) -> None:
    status, headers, body = await get(server.port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["connection"] == "close"


async def test_query_strings_are_ignored(server: MetricsServer) -> None:
    status, _, body = await get(server.port, "/metrics?name[]=lockgw_devices")
    assert status == 200
    assert b"lockgw_devices" in body


async def test_unknown_path_is_404(server: MetricsServer) -> None:
    status, _, _ = await get(server.port, "/admin")
    assert status == 404


async def test_only_get_and_head(server: MetricsServer) -> None:
    status, headers, _ = await http(
        server.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    )
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


async def test_head_has_no_body(server: MetricsServer) -> None:
    status, headers, body = await http(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert status == 200
    assert int(headers["content-length"]) > 0
    assert body == b""


@pytest.mark.parametrize(
    "request_bytes", [b"GARBAGE\r\n\r\n", b"GET /metrics\r\n\r\n", b"GET /metrics SPDY/3\r\n\r\n"]
)
async def test_malformed_request_is_400(server: MetricsServer, request_bytes: bytes) -> None:
    status, _, _ = await http(server.port, request_bytes)
    assert status == 400


async def test_oversized_request_is_refused(server: MetricsServer) -> None:
    request = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * (2 * MAX_REQUEST_SIZE) + b"\r\n\r\n"
    status, _, body = await http(server.port, request)
    assert status == 431
    assert b"lockgw_" not in body


async def test_slow_client_is_dropped(
    server: MetricsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_module, "REQUEST_TIMEOUT", 0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed without an answer
    finally:
        writer.close()
        await writer.wait_closed()


async def test_client_that_leaves_early_does_not_break_the_server(server: MetricsServer) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /met")
    writer.close()
    await writer.wait_closed()
    status, _, _ = await get(server.port, "/healthz")
    assert status == 200


async def test_concurrent_scrapes(metrics: Metrics, server: MetricsServer) -> None:
    metrics.set_slots(busy=1, total=5)
    results = await asyncio.gather(*(scrape(server.port) for _ in range(10)))
    assert all(value(r["lockgw_slots"], "lockgw_slots") == 5 for r in results)


async def test_close_stops_listening_and_is_idempotent(metrics: Metrics) -> None:
    server = await metrics.serve("127.0.0.1:0")
    port = server.port
    assert (await get(port, "/healthz"))[0] == 200
    await server.aclose()
    await server.aclose()
    with pytest.raises(OSError, match=r"[Cc]onnect"):
        await asyncio.open_connection("127.0.0.1", port)
    with pytest.raises(RuntimeError, match="not listening"):
        _ = server.port


async def test_close_drops_a_dawdling_client(metrics: Metrics) -> None:
    server = await metrics.serve("127.0.0.1:0")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)  # let the handler start waiting for the rest
        async with asyncio.timeout(5):
            await server.aclose()
            assert await reader.read() == b""
    finally:
        writer.close()
        await writer.wait_closed()


async def test_serve_refuses_a_bad_address(metrics: Metrics) -> None:
    with pytest.raises(ValueError, match="IPv6"):
        await metrics.serve("::1:9310")
