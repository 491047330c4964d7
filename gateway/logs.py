"""Structured logging: one format for the daemon and the libraries beneath it.

:func:`configure_logging` sets up structlog on top of the standard library's logging, so
that the daemon's own events and the records of bleak, bumble and aiomqtt (which use
:mod:`logging`) go through the same processors and come out in the same format: JSON lines
for the journal and log shippers, or structlog's console renderer on a terminal.

Every event passes :func:`redact` before it reaches any handler: the value of a key whose
*name* says it is secret is replaced by ``"[redacted]"``, however deeply nested. That is
belt and braces: code must not log secrets in the first place, but a device session that
logs ``noise_key=...`` by mistake must not put key material into the journal for months.

Which names are secret (:func:`is_sensitive_name`)
    The name is split into words at ``_``, ``-``, ``.`` and camelCase humps. It is
    sensitive when a word is one of :data:`SENSITIVE_WORDS` (``key``, ``secret``,
    ``password``, ``psk``, ``token``, ``jws``, ``signature``, ``payload``, ``code``, ...), or
    the lower-cased name contains one of :data:`SENSITIVE_SUBSTRINGS` (``password``,
    ``secret``, ``token``, ... so ``mqttpassword`` is caught too). Two exceptions keep
    diagnostics readable:

    * metadata about a secret is not the secret: a name whose *last* word is one of
      :data:`METADATA_WORDS` (``key_id``, ``key_file``, ``payload_size``,
      ``token_count``) is shown;
    * ``code`` is a secret (a pairing code) unless it is qualified as a diagnostic:
      ``error_code``, ``status_code``, ``reason_code``, ``exit_code`` are shown. Log
      protocol refusals as ``error_code=``, not ``code=``.

Besides redacting, the same pass renders bytes as hex and enum members by name, so device
ids and error codes read naturally in both formats.
"""

from __future__ import annotations

import enum
import inspect
import logging
import re
import sys
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = [
    "LEVELS",
    "METADATA_WORDS",
    "NOISY_LOGGERS",
    "REDACTED",
    "SENSITIVE_SUBSTRINGS",
    "SENSITIVE_WORDS",
    "configure_logging",
    "get_logger",
    "is_sensitive_name",
    "redact",
]

REDACTED: Final = "[redacted]"

LEVELS: Final[Mapping[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

FORMATS: Final = frozenset({"auto", "json", "console"})

NOISY_LOGGERS: Final = ("aiomqtt", "bleak", "bumble", "dbus_fast", "paho", "usb1")
"""Third-party loggers held at WARNING unless the level is debug: bumble alone logs every
HCI packet at debug and a good deal at info."""

SENSITIVE_WORDS: Final = frozenset(
    {
        "key",
        "keys",
        "secret",
        "secrets",
        "password",
        "passwd",
        "passphrase",
        "psk",
        "token",
        "jws",
        "signature",
        "sig",
        "payload",
        "code",
        "pin",
        "credential",
        "credentials",
        "private",
        "privkey",
        "seed",
        "cookie",
        "authorization",
    }
)
"""Words that make a name sensitive."""

SENSITIVE_SUBSTRINGS: Final = ("password", "passwd", "secret", "token", "privkey", "apikey")
"""Fragments that make a name sensitive even inside a longer word (``mqttpassword``)."""

METADATA_WORDS: Final = frozenset(
    {
        "id",
        "ids",
        "file",
        "path",
        "dir",
        "count",
        "size",
        "len",
        "length",
        "version",
        "type",
        "kind",
        "name",
        "fingerprint",
        "algorithm",
    }
)
"""A last word that makes a name describe a secret rather than hold it (``key_id``)."""

_DIAGNOSTIC_CODE_QUALIFIERS: Final = frozenset(
    {"error", "status", "reason", "exit", "result", "return", "http", "response"}
)
"""Words before ``code`` that make it a diagnostic code rather than a pairing code."""

_WORD_RE: Final = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")

_PASS_THROUGH: Final = frozenset({"exc_info", "stack_info", "_record", "_from_structlog"})
"""Keys later processors need exactly as they are (an exc_info tuple, the LogRecord)."""

_MAX_DEPTH: Final = 16
"""Nesting beyond this is replaced wholesale rather than walked (cycles, runaway data)."""


def _words(name: str) -> list[str]:
    return [word.lower() for word in _WORD_RE.findall(name)]


def is_sensitive_name(name: str) -> bool:
    """True if a value logged under ``name`` must be redacted (see the module docstring)."""
    words = _words(name)
    if not words or words[-1] in METADATA_WORDS:
        return False
    lowered = name.lower()
    if any(fragment in lowered for fragment in SENSITIVE_SUBSTRINGS):
        return True
    for index, word in enumerate(words):
        if word not in SENSITIVE_WORDS:
            continue
        if word == "code" and index > 0 and words[index - 1] in _DIAGNOSTIC_CODE_QUALIFIERS:
            continue
        return True
    return False


def _clean(value: object, depth: int) -> object:
    """Redact sensitive keys in nested containers; bytes as hex, enums by name."""
    if depth > _MAX_DEPTH:
        return "[too deep]"
    if isinstance(value, Mapping):
        return {
            key: REDACTED
            if isinstance(key, str) and is_sensitive_name(key)
            else _clean(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, tuple):
        return tuple(_clean(item, depth + 1) for item in value)
    if isinstance(value, list | set | frozenset):
        return [_clean(item, depth + 1) for item in value]
    return value


def redact(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """structlog processor: redact sensitive values (see the module docstring)."""
    return {
        key: value
        if key in _PASS_THROUGH
        else REDACTED
        if is_sensitive_name(key)
        else _clean(value, 1)
        for key, value in event_dict.items()
    }


def _drop_formatter_leftovers(
    _logger: WrappedLogger, _method: str, event_dict: EventDict
) -> EventDict:
    # A stdlib Formatter on another handler (pytest's, an embedding application's) that
    # ran first leaves "message" and "asctime" on the record, and ExtraAdder would take
    # them for extras: the message is already the event, the time is our timestamp.
    event_dict.pop("message", None)
    event_dict.pop("asctime", None)
    return event_dict


def _is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


class _LockgwHandler(logging.StreamHandler[TextIO]):
    """The handler :func:`configure_logging` installs; marked so a second call replaces it
    without touching handlers others (pytest, an embedding application) added."""


def _shared_processors() -> list[Processor]:
    return [
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


def configure_logging(level: str, fmt: str, *, stream: TextIO = sys.stderr) -> None:
    """Route structlog and stdlib logging to ``stream`` at ``level`` in format ``fmt``.

    ``level`` is debug, info, warning or error; ``fmt`` is ``json`` (JSON lines),
    ``console`` (structlog's ConsoleRenderer) or ``auto`` (console on a terminal, json
    otherwise). Calling it again replaces the previous set-up.
    """
    try:
        level_number = LEVELS[level.lower()]
    except KeyError:
        msg = f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}"
        raise ValueError(msg) from None
    if fmt not in FORMATS:
        msg = f"unknown log format {fmt!r}; expected one of {', '.join(sorted(FORMATS))}"
        raise ValueError(msg)
    console = fmt == "console" or (fmt == "auto" and _is_tty(stream))

    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if console:
        final.append(
            structlog.dev.ConsoleRenderer(
                colors=_is_tty(stream),
                # The default formatter may be rich's, which can print local variables
                # (key material among them) in tracebacks.
                exception_formatter=structlog.dev.plain_traceback,
            )
        )
    else:
        final += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]

    # Records from stdlib loggers (bleak, bumble, aiomqtt): add what structlog events get.
    foreign_pre_chain: list[Processor] = [
        *_shared_processors(),
        structlog.stdlib.ExtraAdder(),
        _drop_formatter_leftovers,
        redact,
    ]
    handler = _LockgwHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=foreign_pre_chain, processors=final)
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _LockgwHandler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level_number)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(
            logging.NOTSET if level_number == logging.DEBUG else max(logging.WARNING, level_number)
        )

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            # Redact before the event leaves structlog, so that any other handler on the
            # root logger sees the redacted event too, not just ours.
            redact,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        context_class=dict,
        logger_factory=structlog.stdlib.LoggerFactory(),
        # Loggers are created at import time, before configure_logging runs; caching would
        # freeze whatever configuration was current at their first use.
        cache_logger_on_first_use=False,
    )


def get_logger(**bind: Any) -> structlog.stdlib.BoundLogger:
    """A logger named after the calling module, with ``bind`` as its initial context.

    Safe to call at import time: the logger resolves the configuration on each use.
    """
    frame = inspect.currentframe()
    try:
        caller = frame.f_back if frame is not None else None
        name = str(caller.f_globals.get("__name__", "lockgw")) if caller else "lockgw"
    finally:
        del frame  # frames in locals make reference cycles
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name, **bind)
    return logger
