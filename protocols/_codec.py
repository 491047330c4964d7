"""Helpers that keep construct at the edge of each codec module.

construct raises its own exceptions and returns Containers; callers of this library see
neither. ``parse_exact`` turns every failure into a :class:`DecodeError` and refuses
trailing bytes, so one encoding maps to one value.
"""

from __future__ import annotations

import io
from typing import Any

import construct

from protocols.errors import DecodeError, ErrorCode, LocalProtocolError


def parse_exact(
    struct: construct.Construct[Any, Any],
    data: bytes,
    what: str,
    code: ErrorCode = ErrorCode.MALFORMED,
) -> Any:
    """Parse ``data`` completely as ``struct``; any failure is a :class:`DecodeError`."""
    raw: object = data  # callers pass what a peer sent; trust no annotation
    if not isinstance(raw, bytes | bytearray | memoryview):
        msg = f"{what}: expected bytes, got {type(raw).__name__}"
        raise DecodeError(msg, code)
    data = bytes(raw)
    try:
        value, consumed = _parse_counting(struct, data)
    except (construct.ConstructError, ValueError, OverflowError, UnicodeDecodeError) as exc:
        msg = f"{what}: {_short(exc)}"
        raise DecodeError(msg, code) from exc
    if consumed != len(data):
        msg = f"{what}: {len(data) - consumed} trailing byte(s)"
        raise DecodeError(msg, code)
    return value


def build(struct: construct.Construct[Any, Any], value: Any, what: str) -> bytes:
    """Build ``value``; a value that does not fit the layout is a local error."""
    try:
        return struct.build(value)
    except (construct.ConstructError, ValueError, OverflowError, UnicodeEncodeError) as exc:
        msg = f"{what}: {_short(exc)}"
        raise LocalProtocolError(ErrorCode.MALFORMED, msg) from exc


def _parse_counting(struct: construct.Construct[Any, Any], data: bytes) -> tuple[Any, int]:
    stream = io.BytesIO(data)
    value = struct.parse_stream(stream)
    return value, stream.tell()


def _short(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
