"""The gateway's settings: one TOML file, read once at start-up into frozen dataclasses.

:func:`load_config` reads the file and returns :class:`Settings`, or raises
:class:`ConfigError` listing *every* problem, one per line, as
``<file>: <dotted.field>: <reason> (got <value>)``. An operator who starts the daemon
after editing the file sees all mistakes at once instead of fixing them one restart at a
time, and a typo in a key name is an error rather than a silently ignored setting (every
section reports the keys it did not read). Secret values (the MQTT password, anything
under a key that looks like key material) are never echoed back.

Conventions, documented key by key in ``config/gateway.example.toml``:

* Durations are numbers of seconds (``30``, ``0.5``) or strings with one unit:
  ``"500ms"``, ``"30s"``, ``"5m"``, ``"6h"``, ``"30d"``. Once read, durations are
  ``float`` seconds, ready for :func:`asyncio.sleep` and :func:`asyncio.timeout`.
* Relative paths resolve against the directory of the configuration file, not the
  working directory, so a unit file and a developer's shell read the same files.
* Files the daemon needs (keys, certificates, CA bundle) must exist and be readable when
  the configuration is loaded, so a wrong path fails the start, not the first session.

Each section is read key by key with :class:`gateway.fields.Fields` (by the section's
``read`` class method), which is strict about types: TOML is typed, so ``slots = "5"`` is a
mistake worth reporting rather than a value worth coercing. Checks between keys of a
section run only on keys read without a problem, so a wrong value is reported once.
This is done by hand rather than with a validation library, which would cost the daemon
about a fifth of its memory budget.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, Literal, Self, TypeAlias

from gateway.fields import (
    NOTHING,
    Fields,
    Invalid,
    Problem,
    boolean,
    integer,
    one_of,
    text,
)

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
    "Secret",
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

MAX_SOCKET_PATH: Final = 107
"""Longest path a Unix socket can be bound to on Linux (sun_path holds 108 bytes)."""

_UNKNOWN_KEY: Final = "unknown key (see config/gateway.example.toml for the valid keys)"


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------
# Value types and converters
# --------------------------------------------------------------------------------------------


Duration: TypeAlias = float
"""A positive duration in seconds, written as a number or a string with a unit."""

Backend: TypeAlias = Literal["bleak", "bumble"]
MqttProtocol: TypeAlias = Literal["5", "3.1.1"]
LogLevel: TypeAlias = Literal["debug", "info", "warning", "error"]
LogFormat: TypeAlias = Literal["auto", "json", "console"]


@dataclasses.dataclass(frozen=True, slots=True, repr=False)
class Secret:
    """A string that is never shown: its repr and str are masked, :meth:`reveal` gives it.

    Settings end up in reprs, log lines and tracebacks; only the one place that needs the
    value asks for it.
    """

    _value: str

    def reveal(self) -> str:
        """The secret itself."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('[redacted]')"

    def __str__(self) -> str:
        return "[redacted]"


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


def _duration(value: object) -> Duration:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise Invalid(str(exc)) from exc
    if seconds <= 0:
        msg = "must be longer than zero"
        raise Invalid(msg)
    return seconds


def _keepalive(value: object) -> Duration:
    seconds = _duration(value)
    if seconds != int(seconds) or seconds > MQTT_MAX_KEEPALIVE:
        msg = f"must be whole seconds from 1 to {MQTT_MAX_KEEPALIVE}"
        raise Invalid(msg)
    return seconds


_STRING: Final = text()


def _non_empty(max_length: int | None = None) -> Callable[[object], str]:
    """A string with something in it besides white space."""
    as_text = text(max_length=max_length)

    def convert(value: object) -> str:
        result = as_text(value)
        if not result.strip():
            msg = "must not be empty"
            raise Invalid(msg)
        return result

    return convert


_NON_EMPTY: Final = _non_empty()

_gateway_id: Final = text(_GATEWAY_ID_RE, reason="must be 1 to 64 characters of a-z, 0-9 and '-'")


def _secret(value: object) -> Secret:
    return Secret(_STRING(value))


def _mqtt_prefix(value: object) -> str:
    prefix = _STRING(value)
    if not prefix or prefix.startswith("/") or prefix.endswith("/"):
        msg = "must be non-empty, without a leading or trailing '/'"
        raise Invalid(msg)
    if any(char in prefix for char in "+#\x00"):
        msg = "must not contain the wildcards '+' or '#'"
        raise Invalid(msg)
    if "//" in prefix:
        msg = "must not contain an empty topic level ('//')"
        raise Invalid(msg)
    return prefix


_backend: Final[Callable[[object], Backend]] = one_of("bleak", "bumble")
_protocol_choice: Final[Callable[[object], MqttProtocol]] = one_of("5", "3.1.1")
_level_choice: Final[Callable[[object], LogLevel]] = one_of("debug", "info", "warning", "error")
_log_format: Final[Callable[[object], LogFormat]] = one_of("auto", "json", "console")


def _mqtt_protocol(value: object) -> MqttProtocol:
    # ``protocol = 5`` (a TOML integer) is an obvious intention; accept it as "5".
    return _protocol_choice("5" if type(value) is int and value == 5 else value)


def _log_level(value: object) -> LogLevel:
    return _level_choice(value.lower() if isinstance(value, str) else value)


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


def _listen(value: object) -> str:
    listen = _STRING(value)
    try:
        _, port = split_host_port(listen)
    except ValueError as exc:
        raise Invalid(str(exc)) from exc
    if port == 0:
        msg = "the port must be fixed (1 to 65535) for scraping"
        raise Invalid(msg)
    return listen


# Paths. A check returns what is wrong with the resolved path, or None.

_PathCheck: TypeAlias = Callable[[Path], str | None]


def _readable_file(path: Path) -> str | None:
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a regular file"
    try:
        # Opening is the only honest readability test: os.access() ignores ACLs, LSMs and
        # the credentials the service actually runs with.
        with path.open("rb"):
            pass
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def _directory(path: Path) -> str | None:
    # It need not exist yet: systemd's StateDirectory= or the daemon creates it.
    if path.exists() and not path.is_dir():
        return "exists but is not a directory"
    return None


def _socket_path(path: Path) -> str | None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        return f"longer than the {MAX_SOCKET_PATH} bytes a Unix socket path can have"
    if path.exists() and not path.is_socket():
        return "exists but is not a socket"
    return None


def _path(base_dir: Path, check: _PathCheck) -> Callable[[object], Path]:
    """A path resolved against ``base_dir`` (the configuration file's directory) that
    passes ``check``."""

    def convert(value: object) -> Path:
        written_text = _STRING(value)
        if not written_text.strip():
            msg = "a path must not be empty"
            raise Invalid(msg)
        written = Path(written_text)
        path = base_dir / written  # an absolute path stays as it is
        reason = check(path)
        if reason is None:
            return path
        # The "got" part shows the path as written; when it was relative, say where we looked.
        raise Invalid(reason if written.is_absolute() else f"{reason}: {path}")

    return convert


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
#
# frozen: settings are read everywhere and changed nowhere (and stay hashable). kw_only:
# required fields follow defaulted ones in the documented order. Each ``read`` gives every
# field with a default that same default, so an absent key reads as the dataclass default.


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySettings:
    """``[gateway]``: who this gateway is and where its state and keys live."""

    id: str
    """1 to 64 characters of ``[a-z0-9-]``; appears in MQTT topics and the client id."""
    site_ids: tuple[int, ...] = ()
    """Sites this gateway serves; informational (reported in status, not enforced)."""
    state_dir: Path
    """Directory of the SQLite store (:attr:`store_path`)."""
    key_file: Path
    """The gateway's private keys."""
    certificate_file: Path
    """The gateway certificate, binary or hex."""
    authority_key_file: Path
    """The authority's Ed25519 public key: 32 raw bytes, hex, or PEM."""
    control_socket: Path | None = None
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

    @classmethod
    def read(cls, fields: Fields, *, base_dir: Path) -> Self:
        """The ``[gateway]`` table; relative paths resolve against ``base_dir``."""
        readable = _path(base_dir, _readable_file)
        return cls(
            id=fields.get("id", _gateway_id),
            site_ids=fields.array("site_ids", integer(), default=()),
            state_dir=fields.get("state_dir", _path(base_dir, _directory)),
            key_file=fields.get("key_file", readable),
            certificate_file=fields.get("certificate_file", readable),
            authority_key_file=fields.get("authority_key_file", readable),
            control_socket=fields.get("control_socket", _path(base_dir, _socket_path), None),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RadioSettings:
    """``[radio]``: the Bluetooth LE backend."""

    backend: Backend = "bleak"
    """``bleak`` (BlueZ over D-Bus) or ``bumble`` (a controller Bumble drives directly)."""
    transport: str | None = None
    """Bumble transport moniker, e.g. ``tcp-client:127.0.0.1:5555`` or ``usb:0``; bumble only."""
    adapter: str | None = None
    """BlueZ adapter for bleak, e.g. ``hci0``; None for the system's default adapter."""
    mtu: int = 517
    """Largest ATT MTU to negotiate."""
    connect_timeout: Duration = 10.0
    """From the connect call to an established, subscribed link."""

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """The ``[radio]`` table."""
        settings = cls(
            backend=fields.get("backend", _backend, "bleak"),
            transport=fields.get("transport", _NON_EMPTY, None),
            adapter=fields.get("adapter", _NON_EMPTY, None),
            mtu=fields.get("mtu", integer(23, 517), 517),
            connect_timeout=fields.get("connect_timeout", _duration, 10.0),
        )
        # Which keys belong to which backend is a matter of presence, so it is reported
        # even when the values themselves are wrong; it needs a backend that was read.
        if fields.valid("backend"):
            if settings.backend == "bumble":
                if not fields.has("transport"):
                    fields.problem("transport", "required when backend = 'bumble'")
                if fields.has("adapter"):
                    fields.problem(
                        "adapter",
                        "only used with backend = 'bleak'; use transport",
                        fields.data["adapter"],
                    )
            elif fields.has("transport"):
                fields.problem(
                    "transport",
                    "only used with backend = 'bumble'; use adapter",
                    fields.data["transport"],
                )
        return settings


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerSettings:
    """``[scheduler]``: how devices are visited."""

    slots: int = 5
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

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """The ``[scheduler]`` table."""
        settings = cls(
            slots=fields.get("slots", integer(1, 16), 5),
            unreachable_after=fields.get("unreachable_after", _duration, 6 * _HOUR),
            backoff_initial=fields.get("backoff_initial", _duration, 5.0),
            backoff_max=fields.get("backoff_max", _duration, 10 * _MINUTE),
            routine_interval=fields.get("routine_interval", _duration, 12 * _HOUR),
            status_interval=fields.get("status_interval", _duration, 5 * _MINUTE),
            session_idle_timeout=fields.get("session_idle_timeout", _duration, 2.0),
            max_session=fields.get("max_session", _duration, 60.0),
        )
        if (
            fields.valid("backoff_initial", "backoff_max")
            and settings.backoff_initial > settings.backoff_max
        ):
            fields.problem(
                "backoff_initial", "must not exceed backoff_max", settings.backoff_initial
            )
        if (
            fields.valid("session_idle_timeout", "max_session")
            and settings.session_idle_timeout > settings.max_session
        ):
            fields.problem(
                "session_idle_timeout",
                "must not exceed max_session",
                settings.session_idle_timeout,
            )
        return settings


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LogSettings:
    """``[log]``: collection of the devices' event logs."""

    batch_size: int = 500
    """Records asked for per log batch."""
    retention: Duration = 30 * _DAY
    """Published events are kept locally this long, then pruned."""
    clock_drift_threshold: Duration = 30.0
    """A device clock further off than this is corrected (and reported)."""

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """The ``[log]`` table."""
        return cls(
            batch_size=fields.get("batch_size", integer(1, 1000), 500),
            retention=fields.get("retention", _duration, 30 * _DAY),
            clock_drift_threshold=fields.get("clock_drift_threshold", _duration, 30.0),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MqttSettings:
    """``[mqtt]``: the connection to the registry's broker."""

    host: str
    """Broker host name or address."""
    port: int
    """Broker port; defaults to 8883 with TLS and 1883 without."""
    tls: bool = True
    """TLS with a client certificate; turn off only for a broker on the same host."""
    ca_file: Path | None = None
    """CA bundle the broker's certificate must chain to (required with tls)."""
    cert_file: Path | None = None
    """The gateway's client certificate, PEM (required with tls)."""
    key_file: Path | None = None
    """Private key of cert_file, PEM (required with tls)."""
    username: str | None = None
    """Optional user name, for brokers that want one on top of the certificate."""
    password: Secret | None = None
    """Optional password; requires username. Never logged or echoed."""
    client_id: str
    """MQTT client id; defaults to ``lockgw-<gateway id>`` (a stable id keeps the session)."""
    prefix: str = "lockgw"
    """First topic level of everything the gateway publishes and subscribes to."""
    protocol: MqttProtocol = "5"
    """MQTT protocol version."""
    keepalive: Duration = 30.0
    """MQTT keep-alive; whole seconds, at most 65535."""
    reconnect_min: Duration = 1.0
    """First wait before reconnecting; doubles up to reconnect_max."""
    reconnect_max: Duration = 60.0
    """Longest wait between reconnection attempts."""
    publish_batch: int = 100
    """Outbox messages in flight at once."""

    @classmethod
    def read(cls, fields: Fields, *, base_dir: Path, default_client_id: str) -> Self:
        """The ``[mqtt]`` table; relative paths resolve against ``base_dir``."""
        readable = _path(base_dir, _readable_file)
        # Anything but an explicit false keeps TLS on (a wrong type is reported on tls).
        default_port = 1883 if fields.data.get("tls", True) is False else 8883
        settings = cls(
            host=fields.get("host", _NON_EMPTY),
            port=fields.get("port", integer(1, 65535), default_port),
            tls=fields.get("tls", boolean, True),
            ca_file=fields.get("ca_file", readable, None),
            cert_file=fields.get("cert_file", readable, None),
            key_file=fields.get("key_file", readable, None),
            username=fields.get("username", _NON_EMPTY, None),
            password=fields.get("password", _secret, None),
            client_id=fields.get("client_id", _non_empty(max_length=256), default_client_id),
            prefix=fields.get("prefix", _mqtt_prefix, "lockgw"),
            protocol=fields.get("protocol", _mqtt_protocol, "5"),
            keepalive=fields.get("keepalive", _keepalive, 30.0),
            reconnect_min=fields.get("reconnect_min", _duration, 1.0),
            reconnect_max=fields.get("reconnect_max", _duration, 60.0),
            publish_batch=fields.get("publish_batch", integer(1, 10_000), 100),
        )
        # Which keys are needed together is a matter of presence, reported even when
        # their values are wrong, as long as tls itself was read.
        if fields.valid("tls") and settings.tls:
            for name in ("ca_file", "cert_file", "key_file"):
                if not fields.has(name):
                    fields.problem(name, "required when tls = true")
        if fields.has("password") and not fields.has("username"):
            fields.problem("username", "required when a password is set")
        if (
            fields.valid("reconnect_min", "reconnect_max")
            and settings.reconnect_min > settings.reconnect_max
        ):
            fields.problem("reconnect_min", "must not exceed reconnect_max", settings.reconnect_min)
        return settings


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LoggingSettings:
    """``[logging]``: the daemon's own log output (stderr, i.e. the journal)."""

    level: LogLevel = "info"
    """Least severe level written; third-party libraries stay at warning unless debug."""
    format: LogFormat = "auto"
    """``json`` lines, ``console`` for people, ``auto``: console on a terminal, json otherwise."""

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """The ``[logging]`` table; the level in any case."""
        return cls(
            level=fields.get("level", _log_level, "info"),
            format=fields.get("format", _log_format, "auto"),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MetricsSettings:
    """``[metrics]``: the Prometheus endpoint."""

    enabled: bool = True
    """Serve /metrics and /healthz."""
    listen: str = DEFAULT_METRICS_LISTEN
    """``host:port`` to listen on; IPv6 in brackets."""

    @property
    def host(self) -> str:
        """The host part of :attr:`listen`, without IPv6 brackets."""
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        """The port part of :attr:`listen`."""
        return split_host_port(self.listen)[1]

    @classmethod
    def read(cls, fields: Fields) -> Self:
        """The ``[metrics]`` table."""
        return cls(
            enabled=fields.get("enabled", boolean, True),
            listen=fields.get("listen", _listen, DEFAULT_METRICS_LISTEN),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything the daemon is configured with; the root of the TOML file."""

    gateway: GatewaySettings
    radio: RadioSettings = RadioSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    log: LogSettings = LogSettings()
    mqtt: MqttSettings
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()

    @classmethod
    def read(cls, fields: Fields, *, base_dir: Path) -> Self:
        """Every section of the parsed file; the caller reports unknown top-level keys
        (:meth:`Fields.finish`). Relative paths resolve against ``base_dir``."""
        client_id = _default_client_id(fields.data)
        return cls(
            gateway=fields.table(
                "gateway", lambda section: GatewaySettings.read(section, base_dir=base_dir)
            ),
            radio=fields.table("radio", RadioSettings.read, optional=True),
            scheduler=fields.table("scheduler", SchedulerSettings.read, optional=True),
            log=fields.table("log", LogSettings.read, optional=True),
            mqtt=fields.table(
                "mqtt",
                lambda section: MqttSettings.read(
                    section, base_dir=base_dir, default_client_id=client_id
                ),
            ),
            logging=fields.table("logging", LoggingSettings.read, optional=True),
            metrics=fields.table("metrics", MetricsSettings.read, optional=True),
        )


def _default_client_id(data: Mapping[str, object]) -> str:
    """``lockgw-<gateway id>``, from the raw file: the id lives in another section."""
    gateway = data.get("gateway")
    if isinstance(gateway, Mapping):
        try:
            return f"lockgw-{_gateway_id(gateway.get('id'))}"
        except Invalid:
            pass
    # gateway.id is reported on its own; a stand-in keeps that the only complaint.
    return "lockgw"


# --------------------------------------------------------------------------------------------
# Loading and error reporting
# --------------------------------------------------------------------------------------------

_SECRET_FIELD_RE: Final = re.compile(r"pass|secret|token|psk|private|(^|_)key($|_)(?!file)")
"""Field names whose values are never shown: ``password``, ``*_secret``, ``key`` ... but not
``key_file`` (a path is not a secret, and showing it is the point of the message)."""

_MAX_SHOWN: Final = 80


def _is_secret_field(loc: Sequence[int | str]) -> bool:
    return any(isinstance(part, str) and _SECRET_FIELD_RE.search(part.lower()) for part in loc)


def _show(value: object) -> str:
    """A TOML-flavoured, truncated rendering of a value; tables are never expanded, since
    they may hold a secret under another name."""
    if value is NOTHING:
        return "nothing"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, Mapping):
        return "a table"
    elif isinstance(value, Secret):
        return "[redacted]"
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    else:
        text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def _problem_line(path: Path, problem: Problem) -> str:
    secret = _is_secret_field(problem.location) and problem.value is not NOTHING
    shown = "[redacted]" if secret else _show(problem.value)
    return f"{path}: {problem.dotted}: {problem.reason} (got {shown})"


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
    fields = Fields(data, unknown=_UNKNOWN_KEY)
    settings = Settings.read(fields, base_dir=path.parent.absolute())
    fields.finish()
    if fields.problems:
        # The same line twice says nothing new.
        lines = dict.fromkeys(_problem_line(path, problem) for problem in fields.problems)
        # "from None": nothing that carries raw values (the MQTT password among them) may
        # ride along on the exception to a traceback in the journal.
        raise ConfigError(list(lines)) from None
    return settings
