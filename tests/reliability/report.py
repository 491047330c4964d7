"""The figures of a reliability run as a Markdown table (``python -m tests.reliability.report``).

Reads the JSON lines the ``figures`` fixture appends to ``LOCKGW_FIGURES`` and prints one
row per family and test: the numbers recorded, and whether the run was the soak size.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

_SKIP = frozenset({"family", "test", "time"})


def _value(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


def table(lines: Iterable[Mapping[str, Any]]) -> str:
    rows = ["| family | test | figures |", "| --- | --- | --- |"]
    for line in sorted(lines, key=lambda item: (str(item["family"]), str(item["test"]))):
        numbers = "; ".join(f"{k} = {_value(v)}" for k, v in line.items() if k not in _SKIP)
        test = str(line["test"]).split("::", 1)[-1]
        rows.append(f"| {line['family']} | `{test}` | {numbers.replace('|', '/')} |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m tests.reliability.report FIGURES.jsonl\n")
        return 2
    path = Path(args[0])
    if not path.exists():
        sys.stderr.write(f"{path}: no figures (run scripts/reliability)\n")
        return 1
    text = path.read_text(encoding="utf-8")
    sys.stdout.write(table(json.loads(line) for line in text.splitlines() if line) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
