"""The gateway's settings: one TOML file, validated once at start-up into frozen models.

:func:`load_config` reads the file and returns :class:`Settings`, or raises
:class:`ConfigError` listing *every* problem, one per line, as
``<file>: <dotted.field>: <reason> (got <value>)``. An operator who starts the daemon
after editing the file sees all mistakes at once instead of fixing them one restart at a
time, and a typo in a key name is an error rather than a silently ignored setting
(``extra="forbid"``). Secret values (the MQTT password, anything under a key that looks
like key material) are never echoed back.

Conventions, documented key by key in ``config/gateway.example.toml``:

* Durations are numbers of seconds (``30``, ``0.5``) or strings with one unit:
  ``"500ms"``, ``"30s"``, ``"5m"``, ``"6h"``, ``"30d"``. Validated durations are
  ``float`` seconds, ready for :func:`asyncio.sleep` and :func:`asyncio.timeout`.
* Relative paths resolve against the directory of the configuration file, not the
  working directory, so a unit file and a developer's shell read the same files.
* Files the daemon needs (keys, certificates, CA bundle) must exist and be readable when
  the configuration is loaded, so a wrong path fails the start, not the first session.

Validation is strict about types: TOML is typed, so ``slots = "5"`` is a mistake worth
reporting rather than a value worth coercing.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "DEFAULT_METRICS_LISTEN",
    "ConfigError",
    "Duration",
    "GatewaySettings",
    "LogSettings",
    "LoggingSettings",
    "MetricsSettings",
    "MqttSettings",
    "RadioSettings",
    "SchedulerSettings",
    "Settings",
    "load_config",
    "parse_duration",
    "split_host_port",
]

STORE_FILENAME: Final = "lockgw.sqlite3"
CONTROL_FILENAME: Final = "control.sock"
"""The SQLite store's file name inside ``gateway.state_dir``."""

DEFAULT_METRICS_LISTEN: Final = "127.0.0.1:9310"
"""Loopback only by default: metrics reveal fleet state and need no remote exposure."""

_MINUTE: Final = 60.0
_HOUR: Final = 60 * _MINUTE
_DAY: Final = 24 * _HOUR

_UNITS: Final[Mapping[str, float]] = {
    "ms": 0.001,
    "s": 1.0,
    "m": _MINUTE,
    "h": _HOUR,
    "d": _DAY,
}
_DURATION_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*")

_GATEWAY_ID_RE: Final = re.compile(r"[a-z0-9-]{1,64}")
_HOSTNAME_RE: Final = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)

MQTT_MAX_KEEPALIVE: Final = 65535
"""The MQTT keep-alive is a 16-bit number of seconds."""


_INVALID: Final = "lockgw_invalid"
"""pydantic error type of a value our own validators refuse; the message is the reason."""

_CROSS_FIELD: Final = "lockgw_cross_field"
"""pydantic error type that carries every cross-field problem of one model."""


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------
# Value types
# --------------------------------------------------------------------------------------------


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as ``"500ms"``, ``"30s"``, ``"5m"``, ``"6h"``
    or ``"30d"``.

    Raises :class:`ValueError` for anything else (booleans included: ``true`` is not a
    duration even though Python counts it as 1).
    """
    if isinstance(value, bool):
        msg = "a duration is a number of seconds or a string like '30s', '5m', '6h', '30d'"
        raise ValueError(msg)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value)
        if match is None:
            msg = "a duration is a number followed by one unit: ms, s, m, h or d (e.g. '30s')"
            raise ValueError(msg)
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        msg = "a duration is a number of seconds or a string like '30s', '5m', '6h', '30d'"
        raise ValueError(msg)
    if not math.isfinite(seconds):
        msg = "a duration must be finite"
        raise ValueError(msg)
    return seconds


def _duration(value: object) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise PydanticCustomError(_INVALID, str(exc)) from exc
    if seconds <= 0:
        raise PydanticCustomError(_INVALID, "must be longer than zero")
    return seconds


Duration = Annotated[float, BeforeValidator(_duration)]
"""A positive duration in seconds, written as a number or a string with a unit."""


def _to_path(value: object) -> object:
    # The model is strict (a TOML string is not silently a path elsewhere), so paths are
    # converted explicitly; anything that is not a non-empty string is left for the type
    # check to report.
    if isinstance(value, str):
        if not value.strip():
            raise PydanticCustomError(_INVALID, "a path must not be empty")
        return Path(value)
    return value


def _resolve(value: Path, info: ValidationInfo) -> Path:
    if value.is_absolute():
        return value
    base = info.context.get("base_dir") if isinstance(info.context, Mapping) else None
    return (base if isinstance(base, Path) else Path.cwd()) / value


def _path_problem(path: Path, info: ValidationInfo, reason: str) -> PydanticCustomError:
    # The "got" part shows the path as written; when it was relative, say where we looked.
    if isinstance(info.context, Mapping) and path != _resolve(path, info):
        return PydanticCustomError(
            _INVALID, "{reason}: {path}", {"reason": reason, "path": str(_resolve(path, info))}
        )
    return PydanticCustomError(_INVALID, reason)


def _readable_file(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    if not path.exists():
        raise _path_problem(value, info, "no such file")
    if not path.is_file():
        raise _path_problem(value, info, "not a regular file")
    try:
        # Opening is the only honest readability test: os.access() ignores ACLs, LSMs and
        # the credentials the service actually runs with.
        with path.open("rb"):
            pass
    except OSError as exc:
        raise _path_problem(value, info, f"cannot be read ({exc.strerror or exc})") from exc
    return path


def _directory(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    if path.exists() and not path.is_dir():
        raise _path_problem(value, info, "exists but is not a directory")
    return path


ReadableFile = Annotated[Path, BeforeValidator(_to_path), AfterValidator(_readable_file)]
"""A path to a regular file that exists and can be read now; relative paths resolve against
the configuration file's directory."""

Directory = Annotated[Path, BeforeValidator(_to_path), AfterValidator(_directory)]
"""A directory; it need not exist yet (systemd's StateDirectory= or the daemon creates it)."""


MAX_SOCKET_PATH: Final = 107
"""Longest path a Unix socket can be bound to on Linux (sun_path holds 108 bytes)."""


def _socket_path(value: Path, info: ValidationInfo) -> Path:
    path = _resolve(value, info)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise _path_problem(
            value, info, f"longer than the {MAX_SOCKET_PATH} bytes a Unix socket path can have"
        )
    if path.exists() and not path.is_socket():
        raise _path_problem(value, info, "exists but is not a socket")
    return path


SocketPath = Annotated[Path, BeforeValidator(_to_path), AfterValidator(_socket_path)]
"""Where the daemon listens for local clients; the directory must exist when it starts."""


def _list_to_tuple(value: object) -> object:
    # TOML arrays arrive as lists; the frozen models hold tuples so settings stay hashable.
    return tuple(value) if isinstance(value, list) else value


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _gateway_id(value: str) -> str:
    if _GATEWAY_ID_RE.fullmatch(value) is None:
        raise PydanticCustomError(_INVALID, "must be 1 to 64 characters of a-z, 0-9 and '-'")
    return value


def _non_empty(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError(_INVALID, "must not be empty")
    return value


def _mqtt_prefix(value: str) -> str:
    if not value or value.startswith("/") or value.endswith("/"):
        raise PydanticCustomError(_INVALID, "must be non-empty, without a leading or trailing '/'")
    if any(char in value for char in "+#\x00"):
        raise PydanticCustomError(_INVALID, "must not contain the wildcards '+' or '#'")
    if "//" in value:
        raise PydanticCustomError(_INVALID, "must not contain an empty topic level ('//')")
    return value


def _keepalive(value: float) -> float:
    if value != int(value) or value > MQTT_MAX_KEEPALIVE:
        raise PydanticCustomError(_INVALID, "must be whole seconds from 1 to 65535")
    return value


def _mqtt_protocol(value: object) -> object:
    # ``protocol = 5`` (a TOML integer) is an obvious intention; accept it as "5".
    return "5" if value == 5 and not isinstance(value, bool) else value


def split_host_port(text: str) -> tuple[str, int]:
    """Split ``"host:port"`` (IPv6 as ``"[::1]:9310"``) into the host and the port.

    The host is an IP address or a DNS name; the port is 0 to 65535. Raises
    :class:`ValueError` with the reason otherwise.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        msg = "must be host:port, e.g. '127.0.0.1:9310' or '[::1]:9310'"
        raise ValueError(msg)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as exc:
            msg = "the part in brackets must be an IPv6 address"
            raise ValueError(msg) from exc
    elif ":" in host:
        msg = "an IPv6 address must be in brackets, e.g. '[::1]:9310'"
        raise ValueError(msg)
    elif _HOSTNAME_RE.fullmatch(host) is None:
        msg = "the host must be an IP address or a DNS name"
        raise ValueError(msg)
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        msg = "the port must be a number from 0 to 65535"
        raise ValueError(msg)
    return host, int(port_text)


def _listen(value: str) -> str:
    try:
        _, port = split_host_port(value)
    except ValueError as exc:
        raise PydanticCustomError(_INVALID, str(exc)) from exc
    if port == 0:
        raise PydanticCustomError(_INVALID, "the port must be fixed (1 to 65535) for scraping")
    return value


# --------------------------------------------------------------------------------------------
# Cross-field problems
# --------------------------------------------------------------------------------------------

_Problem = tuple[str, str, object]
"""(field relative to the model, reason, value shown; :data:`_NOTHING` for none)."""


class _Nothing:
    def __repr__(self) -> str:
        return "nothing"


_NOTHING: Final = _Nothing()


def _raise_problems(problems: list[_Problem]) -> None:
    # One custom error carries every cross-field problem of a model; the formatter in
    # load_config unpacks them so each still gets its own line and dotted field.
    if problems:
        raise PydanticCustomError(
            _CROSS_FIELD,
            "{count} cross-field problem(s)",
            {"count": len(problems), "problems": problems},
        )


def _radio_presence(data: Mapping[str, object]) -> list[_Problem]:
    """Which keys [radio] needs or must not have, given the backend.

    Works on raw and on validated data alike: :func:`load_config` also runs it on the raw
    section when the section has other errors (and its model validator did not run), so
    the operator sees these problems in the same round.
    """
    problems: list[_Problem] = []
    transport, adapter = data.get("transport"), data.get("adapter")
    if data.get("backend", "bleak") == "bumble":
        if transport is None:
            problems.append(("transport", "required when backend = 'bumble'", _NOTHING))
        if adapter is not None:
            problems.append(("adapter", "only used with backend = 'bleak'; use transport", adapter))
    elif transport is not None:
        problems.append(("transport", "only used with backend = 'bumble'; use adapter", transport))
    return problems


def _mqtt_presence(data: Mapping[str, object]) -> list[_Problem]:
    """Which keys [mqtt] needs together; raw or validated data, as :func:`_radio_presence`."""
    problems: list[_Problem] = []
    if data.get("tls", True) is True:
        problems.extend(
            (name, "required when tls = true", _NOTHING)
            for name in ("ca_file", "cert_file", "key_file")
            if data.get(name) is None
        )
    if data.get("password") is not None and data.get("username") is None:
        problems.append(("username", "required when a password is set", _NOTHING))
    return problems


_PRESENCE_CHECKS: Final[Mapping[str, Callable[[Mapping[str, object]], list[_Problem]]]] = {
    "radio": _radio_presence,
    "mqtt": _mqtt_presence,
}


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


class _Section(BaseModel):
    # frozen: settings are read everywhere and changed nowhere. extra="forbid": a typo is
    # an error. strict: TOML is typed, so "5" for a number is a mistake, not a number.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class GatewaySettings(_Section):
    """``[gateway]``: who this gateway is and where its state and keys live."""

    id: Annotated[str, AfterValidator(_gateway_id)]
    """1 to 64 characters of ``[a-z0-9-]``; appears in MQTT topics and the client id."""
    site_ids: Annotated[tuple[int, ...], BeforeValidator(_list_to_tuple)] = ()
    """Sites this gateway serves; informational (reported in status, not enforced)."""
    state_dir: Directory
    """Directory of the SQLite store (:attr:`store_path`)."""
    key_file: ReadableFile
    """The gateway's private keys."""
    certificate_file: ReadableFile
    """The gateway certificate, binary or hex."""
    authority_key_file: ReadableFile
    """The authority's Ed25519 public key: 32 raw bytes, hex, or PEM."""
    control_socket: SocketPath | None = None
    """The daemon's local control socket, for ``lockgw decommission`` and ``lockgw audit
    pull`` (default ``state_dir/control.sock``; under systemd ``/run/lockgw/control.sock``,
    so that members of the lockgw group can reach it)."""

    @property
    def store_path(self) -> Path:
        """The SQLite store: ``state_dir / lockgw.sqlite3``."""
        return self.state_dir / STORE_FILENAME

    @property
    def control_path(self) -> Path:
        """Where the control socket is: :attr:`control_socket` or its default."""
        return self.control_socket or self.state_dir / CONTROL_FILENAME


class RadioSettings(_Section):
    """``[radio]``: the Bluetooth LE backend."""

    backend: Literal["bleak", "bumble"] = "bleak"
    """``bleak`` (BlueZ over D-Bus) or ``bumble`` (a controller Bumble drives directly)."""
    transport: Annotated[str, AfterValidator(_non_empty)] | None = None
    """Bumble transport moniker, e.g. ``tcp-client:127.0.0.1:5555`` or ``usb:0``; bumble only."""
    adapter: Annotated[str, AfterValidator(_non_empty)] | None = None
    """BlueZ adapter for bleak, e.g. ``hci0``; None for the system's default adapter."""
    mtu: Annotated[int, Field(ge=23, le=517)] = 517
    """Largest ATT MTU to negotiate."""
    connect_timeout: Duration = 10.0
    """From the connect call to an established, subscribed link."""

    @model_validator(mode="after")
    def _check_backend(self) -> Self:
        _raise_problems(_radio_presence(dict(self)))
        return self


class SchedulerSettings(_Section):
    """``[scheduler]``: how devices are visited."""

    slots: Annotated[int, Field(ge=1, le=16)] = 5
    """Radio sessions at once (the controller's connection limit bounds it)."""
    unreachable_after: Duration = 6 * _HOUR
    """A device not heard for this long is reported unreachable."""
    backoff_initial: Duration = 5.0
    """First wait after a failed session; doubles per failure up to backoff_max."""
    backoff_max: Duration = 10 * _MINUTE
    """Longest wait between attempts at a failing device."""
    routine_interval: Duration = 12 * _HOUR
    """How often a device with nothing waiting is still visited for status and logs."""
    status_interval: Duration = 5 * _MINUTE
    """How often the gateway re-publishes its retained online status over MQTT."""
    session_idle_timeout: Duration = 2.0
    """A session with no traffic from the device for this long is given up."""
    max_session: Duration = 60.0
    """Hard limit on one session, so one device cannot hold a slot."""

    @model_validator(mode="after")
    def _check_order(self) -> Self:
        problems: list[_Problem] = []
        if self.backoff_initial > self.backoff_max:
            problems.append(
                ("backoff_initial", "must not exceed backoff_max", self.backoff_initial)
            )
        if self.session_idle_timeout > self.max_session:
            problems.append(
                ("session_idle_timeout", "must not exceed max_session", self.session_idle_timeout)
            )
        _raise_problems(problems)
        return self


class LogSettings(_Section):
    """``[log]``: collection of the devices' event logs."""

    batch_size: Annotated[int, Field(ge=1, le=1000)] = 500
    """Records asked for per log batch."""
    retention: Duration = 30 * _DAY
    """Published events are kept locally this long, then pruned."""
    clock_drift_threshold: Duration = 30.0
    """A device clock further off than this is corrected (and reported)."""


class MqttSettings(_Section):
    """``[mqtt]``: the connection to the registry's broker."""

    host: Annotated[str, AfterValidator(_non_empty)]
    """Broker host name or address."""
    port: Annotated[int, Field(ge=1, le=65535)]
    """Broker port; defaults to 8883 with TLS and 1883 without."""
    tls: bool = True
    """TLS with a client certificate; turn off only for a broker on the same host."""
    ca_file: ReadableFile | None = None
    """CA bundle the broker's certificate must chain to (required with tls)."""
    cert_file: ReadableFile | None = None
    """The gateway's client certificate, PEM (required with tls)."""
    key_file: ReadableFile | None = None
    """Private key of cert_file, PEM (required with tls)."""
    username: Annotated[str, AfterValidator(_non_empty)] | None = None
    """Optional user name, for brokers that want one on top of the certificate."""
    password: SecretStr | None = None
    """Optional password; requires username. Never logged or echoed."""
    client_id: Annotated[str, AfterValidator(_non_empty), Field(max_length=256)]
    """MQTT client id; defaults to ``lockgw-<gateway id>`` (a stable id keeps the session)."""
    prefix: Annotated[str, AfterValidator(_mqtt_prefix)] = "lockgw"
    """First topic level of everything the gateway publishes and subscribes to."""
    protocol: Annotated[Literal["5", "3.1.1"], BeforeValidator(_mqtt_protocol)] = "5"
    """MQTT protocol version."""
    keepalive: Annotated[Duration, AfterValidator(_keepalive)] = 30.0
    """MQTT keep-alive; whole seconds, at most 65535."""
    reconnect_min: Duration = 1.0
    """First wait before reconnecting; doubles up to reconnect_max."""
    reconnect_max: Duration = 60.0
    """Longest wait between reconnection attempts."""
    publish_batch: Annotated[int, Field(ge=1, le=10_000)] = 100
    """Outbox messages in flight at once."""

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "port" not in data:
            # Anything but an explicit false keeps TLS on (a wrong type is reported on tls).
            return {**data, "port": 1883 if data.get("tls", True) is False else 8883}
        return data

    @model_validator(mode="after")
    def _check_tls(self) -> Self:
        problems = _mqtt_presence(dict(self))
        if self.reconnect_min > self.reconnect_max:
            problems.append(("reconnect_min", "must not exceed reconnect_max", self.reconnect_min))
        _raise_problems(problems)
        return self


class LoggingSettings(_Section):
    """``[logging]``: the daemon's own log output (stderr, i.e. the journal)."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"
    """Least severe level written; third-party libraries stay at warning unless debug."""
    format: Literal["auto", "json", "console"] = "auto"
    """``json`` lines, ``console`` for people, ``auto``: console on a terminal, json otherwise."""


class MetricsSettings(_Section):
    """``[metrics]``: the Prometheus endpoint."""

    enabled: bool = True
    """Serve /metrics and /healthz."""
    listen: Annotated[str, AfterValidator(_listen)] = DEFAULT_METRICS_LISTEN
    """``host:port`` to listen on; IPv6 in brackets."""

    @property
    def host(self) -> str:
        """The host part of :attr:`listen`, without IPv6 brackets."""
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        """The port part of :attr:`listen`."""
        return split_host_port(self.listen)[1]


class Settings(_Section):
    """Everything the daemon is configured with; the root of the TOML file."""

    gateway: GatewaySettings
    radio: RadioSettings = RadioSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    log: LogSettings = LogSettings()
    mqtt: MqttSettings
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()

    @model_validator(mode="before")
    @classmethod
    def _default_client_id(cls, data: Any) -> Any:
        # The client id defaults to one derived from the gateway id, which lives in another
        # section; fill it in before the sections are validated.
        if not isinstance(data, Mapping):
            return data
        gateway, mqtt = data.get("gateway"), data.get("mqtt")
        if not isinstance(mqtt, Mapping) or "client_id" in mqtt:
            return data
        gateway_id = gateway.get("id") if isinstance(gateway, Mapping) else None
        if isinstance(gateway_id, str) and _GATEWAY_ID_RE.fullmatch(gateway_id):
            client_id = f"lockgw-{gateway_id}"
        else:
            # gateway.id is reported on its own; a stand-in keeps that the only complaint.
            client_id = "lockgw"
        return {**data, "mqtt": {**mqtt, "client_id": client_id}}


# --------------------------------------------------------------------------------------------
# Loading and error reporting
# --------------------------------------------------------------------------------------------

_SECRET_FIELD_RE: Final = re.compile(r"pass|secret|token|psk|private|(^|_)key($|_)(?!file)")
"""Field names whose values are never shown: ``password``, ``*_secret``, ``key`` ... but not
``key_file`` (a path is not a secret, and showing it is the point of the message)."""

_MAX_SHOWN: Final = 80

_REASONS: Final[Mapping[str, str]] = {
    "extra_forbidden": "unknown key (see config/gateway.example.toml for the valid keys)",
    "missing": "required",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
}


def _is_secret_field(loc: Sequence[int | str]) -> bool:
    return any(isinstance(part, str) and _SECRET_FIELD_RE.search(part.lower()) for part in loc)


def _show(value: object) -> str:
    """A TOML-flavoured, truncated rendering of a value; tables are never expanded, since
    they may hold a secret under another name."""
    if value is _NOTHING:
        return "nothing"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, Mapping):
        return "a table"
    elif isinstance(value, SecretStr):
        return "[redacted]"
    elif isinstance(value, Path):
        text = repr(str(value))
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _dotted(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(top level)"


def _problem_line(path: Path, loc: Sequence[int | str], reason: str, value: object) -> str:
    secret = _is_secret_field(loc) and value is not _NOTHING
    return f"{path}: {_dotted(loc)}: {reason} (got {'[redacted]' if secret else _show(value)})"


def _format_errors(path: Path, error: ValidationError, data: Mapping[str, object]) -> list[str]:
    lines: list[str] = []
    failed_sections: set[str] = set()
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        if item["type"] == _CROSS_FIELD:
            lines.extend(
                _problem_line(path, (*loc, field), reason, value)
                for field, reason, value in item["ctx"]["problems"]
            )
            continue
        if loc and isinstance(loc[0], str):
            failed_sections.add(loc[0])
        value = _NOTHING if item["type"] == "missing" else item.get("input")
        lines.append(_problem_line(path, loc, _REASONS.get(item["type"], item["msg"]), value))
    # A section with field errors never reached its model validator; check the keys that
    # belong together on its raw table, so those problems are not left for the next round.
    for section in sorted(failed_sections & _PRESENCE_CHECKS.keys()):
        raw = data.get(section)
        if isinstance(raw, Mapping):
            lines.extend(
                _problem_line(path, (section, field), reason, value)
                for field, reason, value in _PRESENCE_CHECKS[section](raw)
            )
    return list(dict.fromkeys(lines))  # the same line twice says nothing new


def load_config(path: Path) -> Settings:
    """Read and validate the TOML configuration at ``path``.

    Raises :class:`ConfigError` for a missing or unreadable file, a TOML syntax error
    (with its line and column), and every invalid, missing or unknown setting at once.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError([f"{path}: no such file"]) from exc
    except IsADirectoryError as exc:
        raise ConfigError([f"{path}: is a directory, not a configuration file"]) from exc
    except OSError as exc:
        raise ConfigError([f"{path}: cannot be read: {exc.strerror or exc}"]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        msg = f"{path}: not UTF-8 text (invalid byte at offset {exc.start})"
        raise ConfigError([msg]) from exc
    except tomllib.TOMLDecodeError as exc:
        # The message carries the position: "Expected '=' ... (at line 3, column 7)".
        raise ConfigError([f"{path}: TOML syntax error: {exc}"]) from exc
    try:
        return Settings.model_validate(data, context={"base_dir": path.parent.absolute()})
    except ValidationError as exc:
        # "from None": pydantic's own rendering of the error shows raw input values,
        # the MQTT password among them, and a traceback must not carry it to the journal.
        raise ConfigError(_format_errors(path, exc, data)) from None
