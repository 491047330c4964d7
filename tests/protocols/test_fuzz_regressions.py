"""Inputs that crashed a fuzz target, or were found by hand to threaten one.

Each input is fed to its target through :func:`tests.fuzz_targets.check`, which lets only
the target's typed refusals through: the test fails if the input raises anything else.
A crash found by fuzz/run.py goes here minimised (``python -m fuzz.run HARNESS --minimize
CRASH``), without its first byte, which only picks the target.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.audit import MALFORMED, verify_file
from tests.fuzz_targets import COMMAND_DEVICE, check, command_claims

DEEP_JSON = b"[" * 100_000
"""Python's JSON decoder raises RecursionError, not ValueError, past ~1000 levels."""

DEEP_ARGS = command_claims("get_state").replace(
    f'"device_id":"{COMMAND_DEVICE}"'.encode(),
    b'"device_id":' + b"[" * 980 + b"]" * 980,
)
"""Signed claims that parse, with arguments nested almost as deep as the parser allows:
the verifier serialises them again to validate them."""

# (target, input, what it tests). The coverage-guided runs have found no crash so far;
# these are hazards checked by hand. The deep export crashed verify_file (RecursionError
# out of json.loads) until gateway/audit.py caught it.
REGRESSIONS: list[tuple[str, bytes, str]] = [
    ("access-state", DEEP_JSON, "deep-json"),
    ("audit-export", DEEP_JSON, "deep-json"),
    ("command", DEEP_JSON[:60_000], "deep-json-unsigned"),
    ("command-claims", DEEP_JSON, "deep-json-claims"),
    ("command-claims", DEEP_ARGS, "nearly-too-deep-args"),
]


@pytest.mark.parametrize(
    ("target", "data"),
    [pytest.param(target, data, id=f"{target}-{why}") for target, data, why in REGRESSIONS],
)
def test_regression_input_is_refused_with_a_typed_error(target: str, data: bytes) -> None:
    check(target, data)


def test_a_deeply_nested_export_file_is_malformed(tmp_path: Path) -> None:
    # The audit-export target reads bytes as verify_file does; this pins the file path.
    path = tmp_path / "export.json"
    path.write_bytes(DEEP_JSON)
    result = verify_file(path, None)
    assert result.failure is not None
    assert result.failure.code == MALFORMED
