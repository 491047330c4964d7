"""The import rules of the design: protocols/ is sans-IO; gateway/ carries no test code."""

from __future__ import annotations

import ast
import subprocess
import sys
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


DAEMON_LEAVES_OUT = ("rich", "pydantic", "gateway.console", "simulators")
"""What ``lockgw run`` must not load: the terminal UI (structlog would import rich for
tracebacks the daemon does not use), a validation library (config and commands are read by
gateway.fields), and the simulators."""


def test_the_daemon_loads_only_what_it_runs(tmp_path: Path) -> None:
    # `lockgw run` up to reading its configuration: every import of the daemon is done.
    probe = (
        "import sys\n"
        "from gateway.cli import main\n"
        f"main(['run', '--config', {str(tmp_path / 'missing.toml')!r}])\n"
        "loaded = {name for name, module in sys.modules.items() if module is not None}\n"
        "print(' '.join(sorted(loaded)))\n"
    )
    result = subprocess.run(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded = set(result.stdout.split())
    assert {"gateway.app", "structlog", "aiomqtt"} <= loaded  # it got as far as the daemon
    for name in DAEMON_LEAVES_OUT:
        assert not [module for module in loaded if module == name or module.startswith(f"{name}.")]
