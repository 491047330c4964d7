"""gateway.logs: structlog and stdlib logging in one format, with secrets redacted."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import structlog

from gateway.logs import NOISY_LOGGERS, configure_logging, get_logger, is_sensitive_name, redact
from protocols.errors import ErrorCode

# Created at import time, before any configuration, as daemon modules do.
MODULE_LOG = get_logger(component="import-time")


class TtyStream(io.StringIO):
    """A StringIO that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    was_configured = structlog.is_configured()
    config = structlog.get_config()
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    for name, noisy_level in noisy.items():
        logging.getLogger(name).setLevel(noisy_level)
    structlog.contextvars.clear_contextvars()
    if was_configured:
        structlog.configure(**config)
    else:
        structlog.reset_defaults()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_standard_fields() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    get_logger(device="0a0b").bind(session=3).info("session opened", slot=2)

    (line,) = json_lines(stream)
    assert line["event"] == "session opened"
    assert line["level"] == "info"
    assert line["logger"] == __name__
    assert (line["device"], line["session"], line["slot"]) == ("0a0b", 3, 2)
    assert line["timestamp"].endswith("Z")
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.tzinfo is not None
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 60


def test_auto_is_json_when_not_a_terminal() -> None:
    stream = io.StringIO()
    configure_logging("info", "auto", stream=stream)
    get_logger().info("hello")
    assert json_lines(stream)[0]["event"] == "hello"


def test_auto_is_console_on_a_terminal() -> None:
    stream = TtyStream()
    configure_logging("info", "auto", stream=stream)
    get_logger().info("hello", slot=2)
    output = stream.getvalue()
    assert "hello" in output
    assert "slot" in output
    with pytest.raises(json.JSONDecodeError):
        json.loads(output)


def test_json_on_a_terminal_when_asked() -> None:
    stream = TtyStream()
    configure_logging("info", "json", stream=stream)
    get_logger().info("hello")
    assert json_lines(stream)[0]["event"] == "hello"


def test_level_filters_structlog_events() -> None:
    stream = io.StringIO()
    configure_logging("warning", "json", stream=stream)
    log = get_logger()
    log.info("quiet")
    log.warning("loud")
    assert [line["event"] for line in json_lines(stream)] == ["loud"]


def test_import_time_logger_follows_later_configuration() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    MODULE_LOG.info("still works")
    (line,) = json_lines(stream)
    assert line["component"] == "import-time"
    assert line["logger"] == __name__


def test_contextvars_are_merged() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    structlog.contextvars.bind_contextvars(request="r-1")
    get_logger().info("handled")
    assert json_lines(stream)[0]["request"] == "r-1"


def test_configuring_twice_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", stream=first)
    configure_logging("info", "json", stream=second)
    get_logger().info("once")
    assert first.getvalue() == ""
    assert len(json_lines(second)) == 1


def test_other_root_handlers_are_left_alone() -> None:
    root = logging.getLogger()
    other = logging.StreamHandler(io.StringIO())
    root.addHandler(other)
    try:
        configure_logging("info", "json", stream=io.StringIO())
        configure_logging("info", "json", stream=io.StringIO())
        assert other in root.handlers
    finally:
        root.removeHandler(other)


@pytest.mark.parametrize(("level", "fmt"), [("verbose", "json"), ("info", "xml")])
def test_bad_level_or_format(level: str, fmt: str) -> None:
    with pytest.raises(ValueError, match="unknown log"):
        configure_logging(level, fmt, stream=io.StringIO())


# --------------------------------------------------------------------------------------------
# stdlib records
# --------------------------------------------------------------------------------------------


def test_stdlib_records_come_out_in_the_same_format() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    logging.getLogger("gateway.some_module").info("plain %s record", "stdlib", extra={"slot": 4})
    logging.getLogger("aiomqtt").warning("broker said %d", 7)

    first, second = json_lines(stream)
    assert first["event"] == "plain stdlib record"
    assert first["level"] == "info"
    assert first["logger"] == "gateway.some_module"
    assert first["slot"] == 4
    assert first["timestamp"].endswith("Z")
    assert second == {
        "event": "broker said 7",
        "level": "warning",
        "logger": "aiomqtt",
        "timestamp": second["timestamp"],
    }


def test_stdlib_exceptions_are_rendered() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        logging.getLogger("bleak").exception("scan failed")
    (line,) = json_lines(stream)
    assert "ZeroDivisionError" in line["exception"]


def test_structlog_exceptions_are_rendered() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        get_logger().exception("session crashed")
    (line,) = json_lines(stream)
    assert line["level"] == "error"
    assert "ZeroDivisionError: division by zero" in line["exception"]


def test_noisy_libraries_are_held_at_warning() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    logging.getLogger("bumble.hci").info("packet")
    logging.getLogger("bleak.backends").info("chatter")
    logging.getLogger("bumble.hci").warning("controller reset")
    logging.getLogger("gateway.scheduler").info("ours")
    assert [line["event"] for line in json_lines(stream)] == ["controller reset", "ours"]


def test_noisy_libraries_speak_at_debug() -> None:
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    logging.getLogger("bumble.hci").debug("packet")
    assert [line["event"] for line in json_lines(stream)] == ["packet"]


def test_error_level_also_quiets_library_warnings() -> None:
    stream = io.StringIO()
    configure_logging("error", "json", stream=stream)
    logging.getLogger("aiomqtt").warning("hidden")
    logging.getLogger("aiomqtt").error("shown")
    assert [line["event"] for line in json_lines(stream)] == ["shown"]


# --------------------------------------------------------------------------------------------
# Redaction
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "key",
        "signing_key",
        "noise_key",
        "noiseKey",
        "private_keys",
        "secret",
        "client_secret",
        "password",
        "mqttpassword",
        "psk",
        "pairing_code",
        "code",
        "pin",
        "signature",
        "token",
        "api_token",
        "jws",
        "payload",
        "payload_hex",
    ],
)
def test_sensitive_names(name: str) -> None:
    assert is_sensitive_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "key_id",
        "key_file",
        "payload_size",
        "token_count",
        "signature_algorithm",
        "error_code",
        "status_code",
        "ErrorCode",
        "device_id",
        "keepalive",
        "monkey",
        "event",
        "slot",
        "",
    ],
)
def test_not_sensitive_names(name: str) -> None:
    assert not is_sensitive_name(name)


def test_redaction_reaches_into_nested_containers() -> None:
    event = {
        "event": "provisioned",
        "device": {"id": "0a0b", "noise_key": "aa", "certs": [{"signature": "bb", "role": 1}]},
        "batches": ({"payload": "cc", "count": 3},),
        "password": None,
    }
    assert redact(None, "info", event) == {
        "event": "provisioned",
        "device": {
            "id": "0a0b",
            "noise_key": "[redacted]",
            "certs": [{"signature": "[redacted]", "role": 1}],
        },
        "batches": ({"payload": "[redacted]", "count": 3},),
        "password": "[redacted]",
    }


def test_redaction_leaves_exc_info_intact() -> None:
    exc_info = (ValueError, ValueError("x"), None)
    assert redact(None, "error", {"event": "e", "exc_info": exc_info})["exc_info"] is exc_info


def test_bytes_are_hex_and_enums_by_name() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    get_logger().info("refused", device_id=b"\x0a\x0b", error_code=ErrorCode.BUSY)
    line = json_lines(stream)[0]
    assert line["device_id"] == "0a0b"
    assert line["error_code"] == "BUSY"


def test_redacted_in_json_output_nested() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    get_logger().info("session", peer={"address": "AA:BB", "session": {"psk": "zz", "n": 1}})
    line = json_lines(stream)[0]
    assert line["peer"] == {"address": "AA:BB", "session": {"psk": "[redacted]", "n": 1}}


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_key_bytes_leak(fmt: str) -> None:
    key = os.urandom(32)
    stream = io.StringIO()
    configure_logging("debug", fmt, stream=stream)
    log = get_logger(signing_key=key)
    log.info("handshake", noise_key=key, peer={"static_key": key, "keys": [key]})
    log.debug("bytes", private=bytearray(key), secret=memoryview(key))
    logging.getLogger("bumble").info("stdlib", extra={"session_key": key})
    output = stream.getvalue()
    assert output.count("[redacted]") >= 7
    for leak in (key.hex(), repr(key)[2:20], key.hex()[:16], str(list(key))[1:20]):
        assert leak not in output


def test_other_handlers_on_root_see_redacted_events() -> None:
    # Redaction happens before the event leaves structlog, not only in our formatter.
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    root = logging.getLogger()
    collector = Collect()
    root.addHandler(collector)
    secret = os.urandom(8).hex()
    try:
        configure_logging("info", "json", stream=io.StringIO())
        get_logger().info("x", password=secret)
    finally:
        root.removeHandler(collector)
    assert records
    assert secret not in str(records[0].msg)
