"""The one-command demo (``python -m simulators.demo``): a care site in real processes.

Runs the demo's entry point in-process with a small site on a fast clock: a Mosquitto
child process, the simulator and ``lockgw run`` as subprocesses, the reference registry
in-process. Asserts the exit code and the lines a newcomer relies on.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from simulators import demo


def test_site_demo_walks_through_a_care_site(tmp_path: Path) -> None:
    out = io.StringIO()
    code = demo.main(
        ["--residents", "2", "--speed", "28800", "--workdir", str(tmp_path / "demo")], out=out
    )
    text = out.getvalue()
    assert code == 0, text
    paired = re.findall(
        r"^   paired (door lock|key safe|medicine cabinet|key cabinet) ", text, re.M
    )
    assert len(paired) >= 3, text  # two door locks and the office key cabinet at least
    assert "door lock" in paired
    assert "key cabinet" in paired
    assert "is online at the registry" in text
    total = len(paired)
    assert text.count("   access list applied ") == total
    assert f"revocation applied on every device ({total}/{total} applied, 0 pending" in text
    assert "refused (KEY_REVOKED)" in text
    assert "the refusal reached the registry" in text
    assert re.search(r"verification with the registered device key: intact: \d+ records", text)
    assert "every process stopped; the gateway exited 0" in text
    for line in text.splitlines():  # never a pairing code or a key
        assert "LOCKGW1:" not in line
    files = list((tmp_path / "demo").glob("audit-*"))
    assert {f.suffix for f in files} == {".json", ".html"}


def test_protocol_only_demo_still_runs() -> None:
    out = io.StringIO()
    assert demo.main(["--protocol-only"], out=out) == 0
    assert "Done:" in out.getvalue()


def test_a_bad_broker_url_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--broker", "http://x"], out=io.StringIO())
    assert exit_.value.code == 2
