"""The import rules of the design: protocols/ is sans-IO; gateway/ carries no test code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "protocols": {
        "asyncio",
        "bleak",
        "aiomqtt",
        "paho",
        "structlog",
        "socket",
        "gateway",
        "simulators",
    },
    "gateway": {"simulators"},
}


def imported_roots(path: Path) -> set[str]:
    """Top-level module names that ``path`` imports, wherever in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_import_rules(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    offences = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in files
    }
    assert {name: mods for name, mods in offences.items() if mods} == {}


def test_checker_sees_nested_and_aliased_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\n"
        "def f():\n"
        "    import asyncio as aio\n"
        "    from bleak.backends import client\n"
        "    return aio, client\n",
        encoding="utf-8",
    )
    assert imported_roots(sample) == {"os", "asyncio", "bleak"}
