"""The control socket: one JSON request, progress lines, one answer; clear refusals."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from gateway import control
from gateway.control import Caller, ControlError, ControlServer
from gateway.handlers import DECLINED, Progress, RequestError


async def _echo(args: Mapping[str, Any], caller: Caller, progress: Progress) -> dict[str, Any]:
    progress("step one")
    progress("step two")
    if args.get("refuse"):
        raise RequestError(DECLINED, "still needed", {"needed_by": ["home-nursing"]})
    if args.get("bad"):
        raise ControlError(control.BAD_REQUEST, "bad argument")
    return {"args": dict(args), "uid": caller.uid, "pid": caller.pid}


def _server(path: Path) -> ControlServer:
    return ControlServer(path, {"echo": _echo})


async def _raw(path: Path, data: bytes) -> list[dict[str, Any]]:
    reader, writer = await asyncio.open_unix_connection(os.fspath(path))
    writer.write(data)
    await writer.drain()
    lines = []
    async with asyncio.timeout(15):
        while line := await reader.readline():
            lines.append(json.loads(line))
    writer.close()
    await writer.wait_closed()
    return lines


async def test_a_request_gets_progress_then_its_answer(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    steps: list[str] = []
    async with _server(path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        result = await control.call(path, "echo", {"x": 1}, progress=steps.append)
    assert steps == ["step one", "step two"]
    assert result["args"] == {"x": 1}
    assert result["uid"] == os.getuid()  # from the kernel, not from the request
    assert result["pid"] == os.getpid()
    assert not path.exists(), "the socket is removed on stop"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ({"refuse": True}, "declined", "still needed"),
        ({"bad": True}, "bad_request", "bad argument"),
    ],
)
async def test_refusals_arrive_typed(
    tmp_path: Path, args: dict[str, Any], code: str, message: str
) -> None:
    path = tmp_path / "control.sock"
    async with _server(path):
        with pytest.raises(ControlError) as caught:
            await control.call(path, "echo", args, progress=lambda _step: None)
    assert (caught.value.code, caught.value.message) == (code, message)
    if code == "declined":
        assert caught.value.details == {"needed_by": ["home-nursing"]}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"not json\n", "one line of JSON"),
        (b"[1, 2]\n", '{"op": NAME'),
        (b'{"op": "echo", "args": []}\n', '{"op": NAME'),
        (b'{"op": "format_disk"}\n', "no operation 'format_disk'"),
        (b'{"op": "echo", "args": {"x": "' + b"a" * 20_000 + b'"}}\n', "at most 16384 bytes"),
    ],
)
async def test_bad_requests_are_answered_not_crashed_on(
    tmp_path: Path, data: bytes, expected: str
) -> None:
    path = tmp_path / "control.sock"
    async with _server(path):
        [answer] = await _raw(path, data)
        # The server still serves the next client.
        assert (await control.call(path, "echo", {}, progress=lambda _s: None))["args"] == {}
    assert answer["ok"] is False
    assert answer["error"]["code"] == "bad_request"
    assert expected in answer["error"]["message"]


async def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="the gateway daemon is not running") as caught:
        await control.call(tmp_path / "none.sock", "echo", {}, progress=lambda _s: None)
    assert caught.value.code == control.UNAVAILABLE


async def test_a_stale_socket_is_replaced_but_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(os.fspath(path))  # bound, never listening: what a killed daemon leaves
    stale.close()
    async with _server(path):
        with pytest.raises(OSError, match="another daemon listens"):
            async with _server(path):
                pass
        assert (await control.call(path, "echo", {}, progress=lambda _s: None))["args"] == {}


async def test_a_client_hanging_up_abandons_its_request(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(
        _args: Mapping[str, Any], _caller: Caller, _progress: Progress
    ) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    async with ControlServer(path, {"slow": slow}):
        _reader, writer = await asyncio.open_unix_connection(os.fspath(path))
        writer.write(b'{"op": "slow"}\n')
        await writer.drain()
        async with asyncio.timeout(10):
            await started.wait()
        writer.close()  # Ctrl-C in the CLI
        await writer.wait_closed()
        async with asyncio.timeout(10):
            await cancelled.wait()


async def test_a_failing_operation_still_answers(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def broken(
        _args: Mapping[str, Any], _caller: Caller, _progress: Progress
    ) -> dict[str, Any]:
        message = "a bug"
        raise RuntimeError(message)

    async with ControlServer(path, {"broken": broken}):
        with pytest.raises(ControlError) as caught:
            await control.call(path, "broken", {}, progress=lambda _s: None)
    assert caught.value.code == control.INTERNAL
    assert "bug" not in caught.value.message
