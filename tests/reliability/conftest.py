"""The reliability and security suite: every family records the figures it measured.

``figures(family, **numbers)`` adds one result line. With ``LOCKGW_FIGURES=FILE`` in the
environment each line is also appended to FILE as JSON, which is how the table of
docs/reliability.md is made (``scripts/reliability``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import pytest

Figures: TypeAlias = Callable[..., None]


@pytest.fixture
def figures(request: pytest.FixtureRequest, record_property: Callable[[str, Any], None]) -> Figures:
    """Record the numbers of one test family for docs/reliability.md."""
    target = os.environ.get("LOCKGW_FIGURES")

    def record(family: str, **numbers: Any) -> None:
        line = {"family": family, "test": request.node.nodeid, "time": time.time(), **numbers}
        record_property(family, numbers)
        if target:
            with Path(target).open("a", encoding="utf-8") as output:
                output.write(json.dumps(line, sort_keys=True) + "\n")

    return record
