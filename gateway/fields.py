"""Strict, typed reading of parsed TOML and JSON, reporting every problem with its place.

The configuration file (:mod:`gateway.config`) and the arguments of registry commands
(:mod:`gateway.commands`) both arrive as plain mappings from a parser. :class:`Fields`
reads one mapping key by key into typed values and, instead of stopping at the first
mistake, records a :class:`Problem` (where, why, what was there) for each wrong, missing or
unknown key and goes on, so that an operator sees every mistake at once. The caller builds
its frozen dataclass from the values and raises if anything was recorded; a value read
with a problem is a stand-in (the default, or None) that must not be used, which is why
cross-field checks ask :meth:`Fields.valid` first.

Reading is strict, because TOML and JSON are typed: ``"5"`` is not 5, ``true`` is not 1,
``1.0`` is not an integer. Converters are plain functions from the parsed value to the
typed one that raise :class:`Invalid` with the reason; the factories here build the
common ones, and callers write their own for anything else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast, overload

__all__ = [
    "NOTHING",
    "Fields",
    "Invalid",
    "Location",
    "Problem",
    "boolean",
    "integer",
    "nullable",
    "number",
    "one_of",
    "text",
]

T = TypeVar("T")
D = TypeVar("D")

Location = tuple[str | int, ...]
"""Keys and array indexes from the top of the document to a value."""


class _Nothing:
    def __repr__(self) -> str:
        return "nothing"


NOTHING: Final = _Nothing()
"""The value of a :class:`Problem` about a key that is not there."""


_SURROGATE: Final = re.compile("[\ud800-\udfff]")

_FAILED: Final[Any] = _Nothing()
"""What a table read with problems stands for; never reaches a caller's result."""


class _Required:
    def __repr__(self) -> str:
        return "required"


_REQUIRED: Final = _Required()


class Invalid(ValueError):
    """A converter refused a value; the message is the reason, for people."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One mistake: where it is, why it is one, and the value found (:data:`NOTHING`
    for a missing key). The value is the caller's to show or hide."""

    location: Location
    reason: str
    value: object

    @property
    def dotted(self) -> str:
        """The location as ``section.key[2].field``."""
        text = ""
        for part in self.location:
            if isinstance(part, int):
                text += f"[{part}]"
            else:
                text += f".{part}" if text else part
        return text or "(top level)"


class Fields:
    """Reads the values of one mapping, recording every problem into ``problems``.

    Every read key counts as known; :meth:`finish` reports the others. Nested tables and
    arrays of tables are read by :meth:`table` and :meth:`tables` with a ``Fields`` of
    their own that shares ``problems``.
    """

    def __init__(
        self,
        data: Mapping[str, object],
        *,
        location: Location = (),
        problems: list[Problem] | None = None,
        unknown: str = "unknown key",
    ) -> None:
        self.data = data
        self.location = location
        self.problems: list[Problem] = [] if problems is None else problems
        self._unknown = unknown
        self._known: set[str] = set()
        self._failed: set[str] = set()

    def problem(self, key: str | int | None, reason: str, value: object = NOTHING) -> None:
        """Record a problem at ``key`` of this mapping (None: the mapping itself)."""
        location = self.location if key is None else (*self.location, key)
        self.problems.append(Problem(location, reason, value))
        if isinstance(key, str):
            self._failed.add(key)

    def valid(self, *keys: str) -> bool:
        """Whether every one of ``keys`` was read without a problem."""
        return self._failed.isdisjoint(keys)

    def has(self, key: str) -> bool:
        """Whether ``key`` is present (it then counts as known)."""
        self._known.add(key)
        return key in self.data

    @overload
    def get(self, key: str, convert: Callable[[object], T]) -> T: ...
    @overload
    def get(self, key: str, convert: Callable[[object], T], default: D) -> T | D: ...
    def get(self, key: str, convert: Callable[[object], Any], default: object = _REQUIRED) -> Any:
        """``convert(value)`` of ``key``; ``default`` when absent (required without one)."""
        self._known.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                self.problem(key, "required")
                return None
            return default
        value = self.data[key]
        try:
            return convert(value)
        except Invalid as exc:
            self.problem(key, str(exc), value)
            return None if default is _REQUIRED else default

    def table(self, key: str, read: Callable[[Fields], T], *, optional: bool = False) -> T:
        """``read`` applied to the table at ``key``, its unknown keys reported.

        An ``optional`` table that is absent reads as an empty one (its own defaults, its
        own required keys); a required one that is absent is a problem.
        """
        self._known.add(key)
        if key not in self.data and not optional:
            self.problem(key, "required")
            return cast("T", None)
        result: T = self._read_table(key, self.data.get(key, {}), read)
        if result is _FAILED:
            self._failed.add(key)
            return cast("T", None)
        return result

    def array(
        self,
        key: str,
        convert: Callable[[object], T],
        *,
        min_length: int = 0,
        max_length: int | None = None,
        default: tuple[T, ...] | None = None,
    ) -> tuple[T, ...]:
        """The array at ``key`` with ``convert`` applied to each item, as a tuple; absent,
        ``default`` (required when None)."""
        items, inner = self._items(key, min_length, max_length, default)
        result: list[T] = []
        for index, value in enumerate(items or ()):
            try:
                result.append(convert(value))
            except Invalid as exc:
                inner.problem(index, str(exc), value)
                self._failed.add(key)
        return default if items is None and default is not None else tuple(result)

    def tables(
        self,
        key: str,
        read: Callable[[Fields], T],
        *,
        min_length: int = 0,
        max_length: int | None = None,
        default: tuple[T, ...] | None = None,
    ) -> tuple[T, ...]:
        """The array of tables at ``key``, each read by ``read``, as a tuple; absent,
        ``default`` (required when None)."""
        items, inner = self._items(key, min_length, max_length, default)
        result = [
            inner._read_table(index, value, read)  # noqa: SLF001 - the same class
            for index, value in enumerate(items or ())
        ]
        if any(item is _FAILED for item in result):
            self._failed.add(key)
        return default if items is None and default is not None else tuple(result)

    def finish(self) -> None:
        """Report every key of the mapping that nothing read."""
        for key, value in self.data.items():
            if key not in self._known:
                self.problem(key, self._unknown, value)

    def _child(self, key: str | int, data: Mapping[str, object]) -> Fields:
        return Fields(
            data, location=(*self.location, key), problems=self.problems, unknown=self._unknown
        )

    def _items(
        self, key: str, min_length: int, max_length: int | None, default: object
    ) -> tuple[Any, Fields]:
        """The items of the array at ``key`` (None when absent, () when wrong) and a
        ``Fields`` located at the array, for the items' problems."""
        self._known.add(key)
        inner = self._child(key, {})
        if key not in self.data:
            if default is None:
                self.problem(key, "required")
                return (), inner
            return None, inner
        value = self.data[key]
        if not isinstance(value, list | tuple):
            self.problem(key, "must be an array", value)
            return (), inner
        if len(value) < min_length or (max_length is not None and len(value) > max_length):
            self.problem(key, _length_reason(min_length, max_length), value)
            return (), inner
        return value, inner

    def _read_table(self, key: str | int, value: object, read: Callable[[Fields], T]) -> Any:
        """``read`` of a nested table, or :data:`_FAILED` if it had any problem."""
        if not isinstance(value, Mapping):
            self.problem(key, "must be a table", value)
            return _FAILED
        before = len(self.problems)
        nested = self._child(key, value)
        result = read(nested)
        nested.finish()
        return _FAILED if len(self.problems) > before else result


def _length_reason(low: int, high: int | None) -> str:
    if high is None:
        return f"must have at least {low} item{'s' * (low != 1)}"
    if low == 0:
        return f"must have at most {high} item{'s' * (high != 1)}"
    return f"must have {low} to {high} items"


def _range_reason(kind: str, low: float | None, high: float | None) -> str:
    # Integers exactly (4294967295, not 4.29497e+09); fractions as written (0.5).
    shown = [f"{bound:g}" if isinstance(bound, float) else str(bound) for bound in (low, high)]
    if low is not None and high is not None:
        return f"must be {kind} from {shown[0]} to {shown[1]}"
    if low is not None:
        return f"must be {kind} of at least {shown[0]}"
    return f"must be {kind} of at most {shown[1]}"


def integer(low: int | None = None, high: int | None = None) -> Callable[[object], int]:
    """An integer (not a boolean, not ``1.0``) from ``low`` to ``high`` inclusive."""
    reason = _range_reason("an integer", low, high) if low is not None or high is not None else ""

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(reason or "must be an integer")
        if (low is not None and value < low) or (high is not None and value > high):
            raise Invalid(reason)
        return value

    return convert


def number(low: float | None = None, high: float | None = None) -> Callable[[object], float]:
    """A finite number, integer or not (never a boolean), from ``low`` to ``high``."""
    reason = _range_reason("a number", low, high) if low is not None or high is not None else ""

    def convert(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid(reason or "must be a number")
        result = float(value)
        if not math.isfinite(result):
            msg = "must be a finite number"
            raise Invalid(msg)
        if (low is not None and result < low) or (high is not None and result > high):
            raise Invalid(reason)
        return result

    return convert


def boolean(value: object) -> bool:
    """``true`` or ``false``, nothing that merely counts as one."""
    if not isinstance(value, bool):
        msg = "must be true or false"
        raise Invalid(msg)
    return value


def text(
    pattern: str | re.Pattern[str] | None = None,
    *,
    reason: str | None = None,
    max_length: int | None = None,
) -> Callable[[object], str]:
    """A string matching ``pattern`` in full (``reason`` says what it must look like),
    of at most ``max_length`` characters, that is valid Unicode."""
    compiled = re.compile(pattern) if isinstance(pattern, str) else pattern

    def convert(value: object) -> str:
        if not isinstance(value, str):
            msg = "must be a string"
            raise Invalid(msg)
        if not value.isascii() and _SURROGATE.search(value):
            # JSON escapes can spell lone surrogates ("\ud800"), which no UTF-8 log line
            # or response can hold.
            msg = "must be valid Unicode (no lone surrogates)"
            raise Invalid(msg)
        if max_length is not None and len(value) > max_length:
            msg = f"must be at most {max_length} characters"
            raise Invalid(msg)
        if compiled is not None and compiled.fullmatch(value) is None:
            raise Invalid(reason or f"must match {compiled.pattern}")
        return value

    return convert


def nullable(convert: Callable[[object], T]) -> Callable[[object], T | None]:
    """``convert``, or None for a JSON ``null``."""

    def convert_or_null(value: object) -> T | None:
        return None if value is None else convert(value)

    return convert_or_null


def one_of(*options: T) -> Callable[[object], T]:
    """Exactly one of ``options`` (strings compare case-sensitively; ``True`` is not 1)."""
    shown = [repr(option) for option in options]
    reason = "must be " + (
        shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]
    )

    def convert(value: object) -> T:
        for option in options:
            if type(value) is type(option) and value == option:
                return option
        raise Invalid(reason)

    return convert
