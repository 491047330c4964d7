"""The atheris harnesses: the fuzz targets grouped by module, at most six in all.

A harness dispatches on the first byte of its input (modulo the number of its targets)
and feeds the rest to that target, so one run covers every target of its group and the
fuzzer can carry what it learnt about one into another. This module names targets only;
it imports none of the code under test, so that the code can be instrumented first.
"""

from __future__ import annotations

from typing import Final

HARNESSES: Final[dict[str, tuple[str, ...]]] = {
    "wire": ("message", "fragments", "device-session"),
    "noise": ("noise-handshake", "noise-handshake-2"),
    "logs": ("record", "checkpoint", "batch"),
    "envelopes": ("certificate", "update", "access-state"),
    "identity": ("advert-payload", "advertising-data", "pairing-code", "label", "device-id"),
    "gateway": ("command", "command-claims", "audit-export"),
}
"""Harness name -> its targets (keys of ``tests.fuzz_targets.TARGETS``), in dispatch order."""


def pick(targets: tuple[str, ...], data: bytes) -> tuple[str, bytes] | None:
    """Which of ``targets`` a harness input is for, and that target's input.

    None for empty input, which has no dispatch byte.
    """
    if not data:
        return None
    return targets[data[0] % len(targets)], data[1:]
