"""gateway.config: the TOML file validated once into frozen settings, every problem at once."""

from __future__ import annotations

import dataclasses
import re
import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    ConfigError,
    GatewaySettings,
    LoggingSettings,
    LogSettings,
    MetricsSettings,
    MqttSettings,
    RadioSettings,
    SchedulerSettings,
    Secret,
    Settings,
    load_config,
    parse_duration,
    split_host_port,
)
from gateway.fields import Fields

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "gateway.example.toml"

SECTIONS: dict[str, type[Any]] = {
    "gateway": GatewaySettings,
    "radio": RadioSettings,
    "scheduler": SchedulerSettings,
    "log": LogSettings,
    "mqtt": MqttSettings,
    "logging": LoggingSettings,
    "metrics": MetricsSettings,
}

LINE_RE = re.compile(
    r"(?P<file>/\S+): (?P<field>[a-z_][a-z_.\[\]0-9]*): (?P<reason>.+) \(got (?P<value>.*)\)"
)

MINIMAL = """\
[gateway]
id = "gw-1"
state_dir = "state"
key_file = "keys/gateway.key"
certificate_file = "keys/gateway.cert"
authority_key_file = "keys/authority.pub"

[mqtt]
host = "broker.example.org"
ca_file = "keys/ca.pem"
cert_file = "keys/client.pem"
key_file = "keys/client.key"
"""

KEY_FILES = ("gateway.key", "gateway.cert", "authority.pub", "ca.pem", "client.pem", "client.key")


@pytest.fixture
def confdir(tmp_path: Path) -> Path:
    """A configuration directory with every key file the minimal configuration names."""
    directory = tmp_path / "etc"
    (directory / "keys").mkdir(parents=True)
    for name in KEY_FILES:
        (directory / "keys" / name).write_bytes(b"\x00" * 32)
    return directory


def write(directory: Path, text: str, name: str = "gateway.toml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def problem_for(problems: tuple[str, ...], field: str) -> str:
    matches = [line for line in problems if f": {field}: " in line]
    assert len(matches) == 1, (field, problems)
    return matches[0]


def field_names(section: type[Any]) -> set[str]:
    return {field.name for field in dataclasses.fields(section)}


def has_default(field: dataclasses.Field[Any]) -> bool:
    return field.default is not dataclasses.MISSING


# --------------------------------------------------------------------------------------------
# A valid file
# --------------------------------------------------------------------------------------------


def test_minimal_config_gets_defaults(
    confdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Relative paths resolve against the file's directory, not the working directory.
    monkeypatch.chdir(tmp_path)
    settings = load_config(write(confdir, MINIMAL))

    assert settings.gateway.id == "gw-1"
    assert settings.gateway.site_ids == ()
    assert settings.gateway.state_dir == confdir / "state"
    assert settings.gateway.store_path == confdir / "state" / "lockgw.sqlite3"
    assert settings.gateway.key_file == confdir / "keys" / "gateway.key"
    assert settings.radio == RadioSettings()
    assert settings.radio.backend == "bleak"
    assert settings.radio.mtu == 517
    assert settings.radio.connect_timeout == 10.0
    assert settings.scheduler == SchedulerSettings()
    assert settings.scheduler.slots == 5
    assert settings.scheduler.unreachable_after == 6 * 3600
    assert settings.scheduler.backoff_max == 600
    assert settings.scheduler.routine_interval == 12 * 3600
    assert settings.log.batch_size == 500
    assert settings.log.retention == 30 * 86400
    assert settings.mqtt.port == 8883
    assert settings.mqtt.tls is True
    assert settings.mqtt.client_id == "lockgw-gw-1"
    assert settings.mqtt.password is None
    assert settings.mqtt.protocol == "5"
    assert settings.logging == LoggingSettings(level="info", format="auto")
    assert settings.metrics.enabled is True
    assert (settings.metrics.host, settings.metrics.port) == ("127.0.0.1", 9310)


def test_settings_are_frozen_and_hashable(confdir: Path) -> None:
    settings = load_config(write(confdir, MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.scheduler.slots = 9  # type: ignore[misc]  # the point: it is read-only
    assert hash(settings) == hash(load_config(write(confdir, MINIMAL)))


def test_every_key_can_be_set(confdir: Path) -> None:
    text = (
        MINIMAL.replace('id = "gw-1"', 'id = "gw-1"\nsite_ids = [3, 7]')
        + """
username = "gw-1"
password = "hunter2"
client_id = "custom"
prefix = "care/north"
protocol = "3.1.1"
keepalive = 45
reconnect_min = "500ms"
reconnect_max = "2m"
publish_batch = 10
port = 1884

[radio]
backend = "bumble"
transport = "tcp-client:127.0.0.1:5555"
mtu = 247
connect_timeout = 4.5

[scheduler]
slots = 16
unreachable_after = "1d"
backoff_initial = "1s"
backoff_max = "1h"
routine_interval = "6h"
status_interval = "30s"
session_idle_timeout = "3s"
max_session = "2m"

[log]
batch_size = 1000
retention = "90d"
clock_drift_threshold = "5s"

[logging]
level = "DEBUG"
format = "json"

[metrics]
enabled = false
listen = "[::1]:9999"
"""
    )
    settings = load_config(write(confdir, text))
    assert settings.gateway.site_ids == (3, 7)
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.reveal() == "hunter2"
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings)
    assert settings.mqtt.client_id == "custom"
    assert settings.mqtt.port == 1884
    assert settings.mqtt.reconnect_min == 0.5
    assert settings.mqtt.reconnect_max == 120
    assert settings.radio.transport == "tcp-client:127.0.0.1:5555"
    assert settings.scheduler.unreachable_after == 86400
    assert settings.scheduler.max_session == 120
    assert settings.log.retention == 90 * 86400
    assert settings.logging.level == "debug"
    assert (settings.metrics.host, settings.metrics.port) == ("::1", 9999)
    assert settings.metrics.enabled is False


def test_without_tls_port_is_1883_and_files_optional(confdir: Path) -> None:
    text = MINIMAL.split("[mqtt]", maxsplit=1)[0] + '[mqtt]\nhost = "localhost"\ntls = false\n'
    settings = load_config(write(confdir, text))
    assert settings.mqtt.port == 1883
    assert settings.mqtt.ca_file is None


def test_absolute_paths_are_kept(confdir: Path) -> None:
    absolute = confdir / "keys" / "gateway.key"
    text = MINIMAL.replace('key_file = "keys/gateway.key"', f'key_file = "{absolute}"')
    assert load_config(write(confdir, text)).gateway.key_file == absolute


def test_mqtt_protocol_accepts_the_number_five(confdir: Path) -> None:
    settings = load_config(write(confdir, MINIMAL + "protocol = 5\n"))
    assert settings.mqtt.protocol == "5"
    # Only the integer: 5.0 is no version number, and true is no 5.
    for other in ("5.0", "true"):
        problems = problems_of(write(confdir, MINIMAL + f"protocol = {other}\n"))
        assert "'5' or '3.1.1'" in problem_for(problems, "mqtt.protocol")


def test_absent_keys_read_as_the_declared_defaults(confdir: Path) -> None:
    # Each section's read repeats its dataclass's defaults; they must not drift apart.
    settings = load_config(write(confdir, MINIMAL))
    set_in_minimal = {"mqtt.ca_file", "mqtt.cert_file", "mqtt.key_file"}
    for name, section_class in SECTIONS.items():
        section = getattr(settings, name)
        for field in dataclasses.fields(section_class):
            if has_default(field) and f"{name}.{field.name}" not in set_in_minimal:
                assert getattr(section, field.name) == field.default, f"{name}.{field.name}"


@pytest.mark.parametrize(
    "section", [RadioSettings, SchedulerSettings, LogSettings, LoggingSettings, MetricsSettings]
)
def test_an_empty_section_reads_as_its_defaults(section: type[Any]) -> None:
    fields = Fields({})
    assert section.read(fields) == section()
    assert fields.problems == []


def test_secret_is_never_shown() -> None:
    secret = Secret("hunter2")
    assert secret.reveal() == "hunter2"
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in str(secret)
    assert "hunter2" not in f"{secret} {secret!r} {[secret]}"
    assert secret == Secret("hunter2")
    assert secret != Secret("hunter3")
    assert hash(secret) == hash(Secret("hunter2"))


def test_the_daemon_gets_the_password_itself(confdir: Path) -> None:
    # Imported here: the daemon pulls in every other module, the rest of this file none.
    from gateway.app import mqtt_settings  # noqa: PLC0415

    text = MINIMAL + 'username = "gw-1"\npassword = "hunter2"\n'
    assert mqtt_settings(load_config(write(confdir, text))).password == "hunter2"  # noqa: S105


def test_control_socket_defaults_to_the_state_directory(confdir: Path) -> None:
    settings = load_config(write(confdir, MINIMAL))
    assert settings.gateway.control_socket is None
    assert settings.gateway.control_path == confdir / "state" / "control.sock"


def test_control_socket_may_be_a_live_socket(confdir: Path) -> None:
    (confdir / "run").mkdir()
    text = MINIMAL.replace('id = "gw-1"', 'id = "gw-1"\ncontrol_socket = "run/control.sock"')
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(confdir / "run" / "control.sock"))
        settings = load_config(write(confdir, text))
    assert settings.gateway.control_socket == confdir / "run" / "control.sock"
    assert settings.gateway.control_path == settings.gateway.control_socket


# --------------------------------------------------------------------------------------------
# Durations and addresses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (30, 30.0),
        (0.25, 0.25),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("6h", 21600.0),
        ("30d", 2592000.0),
        ("1.5h", 5400.0),
        (" 10 s ", 10.0),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "value", ["30", "5 minutes", "", "-5s", "1h30m", "5M", True, [1], None, float("inf"), "1e3s"]
)
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_zero_duration_is_refused(confdir: Path) -> None:
    problems = problems_of(write(confdir, MINIMAL + "[scheduler]\nmax_session = 0\n"))
    assert problems == (
        f"{confdir / 'gateway.toml'}: scheduler.max_session: must be longer than zero (got 0)",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9310", ("127.0.0.1", 9310)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),  # noqa: S104 -- a test value, nothing is bound
        ("localhost:9310", ("localhost", 9310)),
        ("metrics.gw-1.example.org:80", ("metrics.gw-1.example.org", 80)),
        ("[::1]:9310", ("::1", 9310)),
        ("[::]:0", ("::", 0)),
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize(
    "text",
    ["9310", ":9310", "host:", "::1:9310", "[::1]", "[nope]:1", "host:70000", "ho st:1", "host:-1"],
)
def test_split_host_port_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=r"host|port|IPv6|bracket"):
        split_host_port(text)


# --------------------------------------------------------------------------------------------
# Problems: all of them, one line each, no secrets
# --------------------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once(confdir: Path) -> None:
    text = """\
[gateway]
id = "GW_1"
site_ids = [1, "two"]
state_dir = "state"
key_file = "keys/gateway.key"
certificate_file = "keys/missing.cert"
authority_key_file = "keys/authority.pub"
colour = "blue"

[radio]
backend = "bumble"
mtu = 600

[scheduler]
slots = "5"
max_session = "an hour"

[mqtt]
host = "broker"
ca_file = "keys/ca.pem"
keepalive = 1.5

[metrics]
listen = "::1:9310"

[mqqt]
host = "typo"
"""
    path = write(confdir, text)
    problems = problems_of(path)
    for line in problems:
        match = LINE_RE.fullmatch(line)
        assert match is not None, line
        assert match["file"] == str(path)

    assert problem_for(problems, "gateway.id").endswith(
        "must be 1 to 64 characters of a-z, 0-9 and '-' (got 'GW_1')"
    )
    assert problem_for(problems, "gateway.site_ids[1]").endswith("(got 'two')")
    assert problem_for(problems, "gateway.certificate_file").endswith(
        f"no such file: {confdir / 'keys' / 'missing.cert'} (got 'keys/missing.cert')"
    )
    assert "unknown key" in problem_for(problems, "gateway.colour")
    assert problem_for(problems, "radio.mtu").endswith("(got 600)")
    assert problem_for(problems, "radio.transport").endswith(
        "required when backend = 'bumble' (got nothing)"
    )
    assert problem_for(problems, "scheduler.slots").endswith("(got '5')")
    assert "duration" in problem_for(problems, "scheduler.max_session")
    assert problem_for(problems, "mqtt.keepalive").endswith(
        "whole seconds from 1 to 65535 (got 1.5)"
    )
    assert problem_for(problems, "mqtt.cert_file").endswith(
        "required when tls = true (got nothing)"
    )
    assert problem_for(problems, "mqtt.key_file").endswith("required when tls = true (got nothing)")
    assert "brackets" in problem_for(problems, "metrics.listen")
    assert problem_for(problems, "mqqt").endswith("(got a table)")
    assert len(problems) == 13


def test_missing_sections_and_keys(confdir: Path) -> None:
    problems = problems_of(write(confdir, '[gateway]\nid = "gw-1"\n'))
    assert {line.split(": ")[1] for line in problems} == {
        "gateway.state_dir",
        "gateway.key_file",
        "gateway.certificate_file",
        "gateway.authority_key_file",
        "mqtt",
    }
    assert all(line.endswith("required (got nothing)") for line in problems)


def test_unknown_top_level_key(confdir: Path) -> None:
    path = write(confdir, 'colour = "blue"\n' + MINIMAL)
    unknown = "unknown key (see config/gateway.example.toml for the valid keys)"
    assert problems_of(path) == (f"{path}: colour: {unknown} (got 'blue')",)


def test_section_must_be_a_table(confdir: Path) -> None:
    text = 'radio = "bumble"\n' + MINIMAL
    assert problem_for(problems_of(write(confdir, text)), "radio").endswith(
        "must be a table (got 'bumble')"
    )


@pytest.mark.parametrize(
    ("addition", "field", "reason"),
    [
        ("reconnect_min = 90\n", "mqtt.reconnect_min", "must not exceed reconnect_max (got 90)"),
        ('password = "x"\n', "mqtt.username", "required when a password is set (got nothing)"),
        ('prefix = "care/+/x"\n', "mqtt.prefix", "wildcards"),
        ('prefix = "/care"\n', "mqtt.prefix", "leading or trailing"),
        ('protocol = "4"\n', "mqtt.protocol", "'5' or '3.1.1'"),
        ('tls = "yes"\n', "mqtt.tls", "must be true or false (got 'yes')"),
        ("port = 0\n", "mqtt.port", "must be an integer from 1 to 65535 (got 0)"),
        (
            "[scheduler]\nbackoff_initial = '20m'\n",
            "scheduler.backoff_initial",
            "must not exceed backoff_max (got 1200)",
        ),
        (
            "[scheduler]\nsession_idle_timeout = '2m'\n",
            "scheduler.session_idle_timeout",
            "must not exceed max_session (got 120)",
        ),
        ("[scheduler]\nslots = 17\n", "scheduler.slots", "must be an integer from 1 to 16"),
        ("[radio]\nmtu = 22\n", "radio.mtu", "must be an integer from 23 to 517 (got 22)"),
        ("[radio]\nmtu = 247.0\n", "radio.mtu", "must be an integer from 23 to 517"),
        ("[radio]\ntransport = 'usb:0'\n", "radio.transport", "only used with backend = 'bumble'"),
        (
            "[radio]\nbackend = 'bumble'\ntransport = 'usb:0'\nadapter = 'hci0'\n",
            "radio.adapter",
            "only used with backend = 'bleak'",
        ),
        ("[radio]\nbackend = 'bluez'\n", "radio.backend", "'bleak' or 'bumble'"),
        ("[log]\nbatch_size = 0\n", "log.batch_size", "must be an integer from 1 to 1000"),
        ("[logging]\nlevel = 'trace'\n", "logging.level", "'debug', 'info', 'warning' or 'error'"),
        ("[logging]\nformat = 'xml'\n", "logging.format", "'auto', 'json' or 'console'"),
        ("[metrics]\nlisten = '127.0.0.1:0'\n", "metrics.listen", "must be fixed"),
        ("[log]\nretention = '7 days'\n", "log.retention", "one unit"),
        ("protocol = true\n", "mqtt.protocol", "must be '5' or '3.1.1' (got true)"),
        ("keepalive = 70000\n", "mqtt.keepalive", "whole seconds from 1 to 65535 (got 70000)"),
        ("keepalive = '0s'\n", "mqtt.keepalive", "must be longer than zero (got '0s')"),
        (f"client_id = '{'c' * 257}'\n", "mqtt.client_id", "must be at most 256 characters"),
        ("client_id = ' '\n", "mqtt.client_id", "must not be empty (got ' ')"),
        ("username = 7\n", "mqtt.username", "must be a string (got 7)"),
        ("[radio]\nconnect_timeout = true\n", "radio.connect_timeout", "duration"),
        ("[radio]\nadapter = ''\n", "radio.adapter", "must not be empty"),
        ("[logging]\nlevel = 3\n", "logging.level", "'warning' or 'error' (got 3)"),
        ("[metrics]\nlisten = 9310\n", "metrics.listen", "must be a string (got 9310)"),
        ("[metrics]\nenabled = 1\n", "metrics.enabled", "must be true or false (got 1)"),
    ],
)
def test_single_problem(confdir: Path, addition: str, field: str, reason: str) -> None:
    problems = problems_of(write(confdir, MINIMAL + addition))
    assert len(problems) == 1, problems
    assert reason in problem_for(problems, field)


@pytest.mark.parametrize(
    ("addition", "expected"),
    [
        # A key that is there but wrong is not also "required".
        (
            "[radio]\nbackend = 'bumble'\ntransport = ''\n",
            {"radio.transport": "must not be empty (got '')"},
        ),
        # Without a backend that was read, which keys belong to it is unknown.
        (
            "[radio]\nbackend = 'bluez'\ntransport = 'usb:0'\n",
            {"radio.backend": "must be 'bleak' or 'bumble' (got 'bluez')"},
        ),
        # A password is present even when it is wrong.
        (
            "password = 5\n",
            {
                "mqtt.password": "must be a string (got [redacted])",
                "mqtt.username": "required when a password is set (got nothing)",
            },
        ),
        # Comparisons need both sides read: a stand-in default is not the operator's value.
        (
            "reconnect_min = 'soon'\nreconnect_max = 0.5\n",
            {"mqtt.reconnect_min": "duration"},
        ),
        (
            "reconnect_min = 90\nreconnect_max = 0\n",
            {"mqtt.reconnect_max": "must be longer than zero (got 0)"},
        ),
        (
            "[scheduler]\nbackoff_initial = '20m'\nbackoff_max = 'long'\n",
            {"scheduler.backoff_max": "duration"},
        ),
        (
            "[scheduler]\nsession_idle_timeout = [1]\nmax_session = 1\n",
            {"scheduler.session_idle_timeout": "duration"},
        ),
    ],
)
def test_checks_between_keys_use_only_what_was_read(
    confdir: Path, addition: str, expected: dict[str, str]
) -> None:
    problems = problems_of(write(confdir, MINIMAL + addition))
    assert len(problems) == len(expected), problems
    for field, reason in expected.items():
        assert reason in problem_for(problems, field)


def test_site_ids_must_be_an_array(confdir: Path) -> None:
    text = MINIMAL.replace('id = "gw-1"', 'id = "gw-1"\nsite_ids = 3')
    (problem,) = problems_of(write(confdir, text))
    assert problem.endswith(": gateway.site_ids: must be an array (got 3)")


def test_site_ids_must_be_integers(confdir: Path) -> None:
    text = MINIMAL.replace('id = "gw-1"', 'id = "gw-1"\nsite_ids = [1, 2.5, true]')
    problems = problems_of(write(confdir, text))
    assert [line.split(": ", 1)[1] for line in problems] == [
        "gateway.site_ids[1]: must be an integer (got 2.5)",
        "gateway.site_ids[2]: must be an integer (got true)",
    ]


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("5", "must be a string (got 5)"),
        ('""', "a path must not be empty (got '')"),
        ('"  "', "a path must not be empty (got '  ')"),
    ],
)
def test_a_path_is_a_non_empty_string(confdir: Path, value: str, reason: str) -> None:
    text = MINIMAL.replace('key_file = "keys/gateway.key"', f"key_file = {value}")
    (problem,) = problems_of(write(confdir, text))
    assert problem.endswith(f": gateway.key_file: {reason}")


def test_control_socket_is_checked(confdir: Path) -> None:
    too_long = "/" + "s" * 107
    relative_too_long = "run/" + "s" * 104
    path = confdir / "gateway.toml"

    def problem_with(control_socket: str) -> str:
        text = MINIMAL.replace('id = "gw-1"', f'id = "gw-1"\ncontrol_socket = "{control_socket}"')
        (problem,) = problems_of(write(confdir, text))
        return problem

    assert problem_with("keys/gateway.key") == (
        f"{path}: gateway.control_socket: exists but is not a socket: "
        f"{confdir / 'keys' / 'gateway.key'} (got 'keys/gateway.key')"
    )
    # An absolute path is shown as written (shortened, as every long value is).
    assert problem_with(too_long).startswith(
        f"{path}: gateway.control_socket: longer than the 107 bytes a Unix socket path can "
        "have (got '/sss"
    )
    assert problem_with(relative_too_long).startswith(
        f"{path}: gateway.control_socket: longer than the 107 bytes a Unix socket path can "
        f"have: {confdir / relative_too_long} (got 'run/sss"
    )


def test_tls_requires_all_three_files(confdir: Path) -> None:
    text = MINIMAL.split("[mqtt]", maxsplit=1)[0] + '[mqtt]\nhost = "broker"\n'
    problems = problems_of(write(confdir, text))
    assert [line.split(": ")[1] for line in problems] == [
        "mqtt.ca_file",
        "mqtt.cert_file",
        "mqtt.key_file",
    ]


def test_files_must_exist_and_be_readable(confdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (confdir / "keys" / "gateway.cert").unlink()
    (confdir / "keys" / "ca.pem").unlink()
    (confdir / "keys" / "ca.pem").mkdir()
    (confdir / "state").write_text("not a directory", encoding="utf-8")
    unreadable = confdir / "keys" / "client.key"
    real_open = Path.open

    def fake_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        # chmod 000 does not stop root, so refuse the read the way the kernel would.
        if self == unreadable:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", fake_open)
    problems = problems_of(write(confdir, MINIMAL))
    assert problem_for(problems, "gateway.certificate_file") == (
        f"{confdir / 'gateway.toml'}: gateway.certificate_file: no such file: "
        f"{confdir / 'keys' / 'gateway.cert'} (got 'keys/gateway.cert')"
    )
    assert "not a regular file" in problem_for(problems, "mqtt.ca_file")
    assert f"cannot be read (Permission denied): {unreadable}" in problem_for(
        problems, "mqtt.key_file"
    )
    assert "exists but is not a directory" in problem_for(problems, "gateway.state_dir")
    assert len(problems) == 4


def test_secrets_are_never_echoed(confdir: Path) -> None:
    text = MINIMAL + 'password = 987654321\npasswd = "hunter2-typo"\napi_token = "tok-555"\n'
    problems = problems_of(write(confdir, text))
    joined = "\n".join(problems)
    for secret in ("987654321", "hunter2-typo", "tok-555"):
        assert secret not in joined
    assert problem_for(problems, "mqtt.password").endswith("(got [redacted])")
    assert problem_for(problems, "mqtt.passwd").endswith("(got [redacted])")
    assert problem_for(problems, "mqtt.api_token").endswith("(got [redacted])")


def test_no_secret_in_the_exception_chain(confdir: Path) -> None:
    # The password is valid but another key in its section is not: an error that carried
    # the input of the section would carry the password too.
    text = MINIMAL + 'username = "u"\npassword = "s3cret-value"\nkeepalive = "often"\n'
    with pytest.raises(ConfigError) as info:
        load_config(write(confdir, text))
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    assert "s3cret-value" not in str(info.value)


def test_tables_are_not_expanded_in_messages(confdir: Path) -> None:
    text = MINIMAL + '[radio.extra]\nsecretive = "nope-999"\n'
    problems = problems_of(write(confdir, text))
    assert problem_for(problems, "radio.extra").endswith("(got a table)")
    assert "nope-999" not in "\n".join(problems)


# --------------------------------------------------------------------------------------------
# The file itself
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert problems_of(path) == (f"{path}: no such file",)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert problems_of(tmp_path) == (f"{tmp_path}: is a directory, not a configuration file",)


def test_unreadable_file(confdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(confdir, MINIMAL)

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert problems_of(path) == (f"{path}: cannot be read: Permission denied",)


def test_toml_syntax_error_has_line_and_column(confdir: Path) -> None:
    path = write(confdir, '[gateway]\nid = "gw-1"\nstate_dir "state"\n')
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: TOML syntax error: ")
    assert "line 3, column 11" in problem


def test_not_utf8(confdir: Path) -> None:
    path = confdir / "latin1.toml"
    path.write_bytes(b'[gateway]\nid = "gw-\xe9"\n')
    (problem,) = problems_of(path)
    assert problem == f"{path}: not UTF-8 text (invalid byte at offset 19)"


@pytest.mark.parametrize("gateway_id", ["", "GW-1", "gw_1", "gw 1", "g" * 65, "gw-ü"])
def test_gateway_id_is_checked(confdir: Path, gateway_id: str) -> None:
    text = MINIMAL.replace('id = "gw-1"', f'id = "{gateway_id}"')
    (problem,) = problems_of(write(confdir, text))
    assert ": gateway.id: must be 1 to 64 characters" in problem


def test_gateway_id_of_64_characters(confdir: Path) -> None:
    text = MINIMAL.replace('id = "gw-1"', f'id = "{"a" * 64}"')
    assert load_config(write(confdir, text)).mqtt.client_id == "lockgw-" + "a" * 64


# --------------------------------------------------------------------------------------------
# The documented example
# --------------------------------------------------------------------------------------------


def documented_keys() -> dict[str, set[str]]:
    """Section -> keys that the example sets or shows commented out."""
    keys: dict[str, set[str]] = {}
    section = None
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if header := re.fullmatch(r"\[(\w+)\]", line):
            section = header[1]
            keys[section] = set()
        elif section and (key := re.match(r"#? ?([a-z_]+) = ", line)):
            keys[section].add(key[1])
    return keys


def test_example_documents_every_key() -> None:
    documented = documented_keys()
    assert documented.keys() == SECTIONS.keys() == field_names(Settings)
    for name, section in SECTIONS.items():
        assert documented[name] == field_names(section), name


def test_example_loads_and_shows_the_defaults(confdir: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    tomllib.loads(text)  # valid TOML as shipped
    text = text.replace("/etc/lockgw/keys/", f"{confdir / 'keys'}/")
    for name in ("mqtt-ca.pem", "mqtt-client.pem", "mqtt-client.key"):
        (confdir / "keys" / name).write_bytes(b"pem")
    text = text.replace('"/var/lib/lockgw"', f'"{confdir / "state"}"')
    settings = load_config(write(confdir, text))

    # The example sets these on purpose: TLS is on, so they are needed.
    set_on_purpose = {"mqtt.ca_file", "mqtt.cert_file", "mqtt.key_file"}
    for name, section_class in SECTIONS.items():
        section = getattr(settings, name)
        for field in dataclasses.fields(section_class):
            if has_default(field) and f"{name}.{field.name}" not in set_on_purpose:
                assert getattr(section, field.name) == field.default, f"{name}.{field.name}"
    assert settings.mqtt.port == 8883
    assert settings.mqtt.client_id == "lockgw-gw-example-1"
