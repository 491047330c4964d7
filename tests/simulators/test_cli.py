"""``python -m simulators``: its commands, and the process a gateway talks to over HCI/TCP."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from protocols.enums import DeviceKind
from protocols.identity import format_device_id
from protocols.messages import Status, StatusRequest
from protocols.pairing import LabelPayload
from simulators import cli
from simulators.node import Fleet
from simulators.scenario import SimClock
from tests.processes import SimProcess

from .radio_central import Central, ConnectFailed, Credentials, LinkDropped, open_session, pair


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[cli.Simulator]:
    fleet = Fleet()
    fleet.create(DeviceKind.DOOR_LOCK)
    fleet.create(DeviceKind.KEY_CABINET)
    await fleet.start()
    yield cli.Simulator(fleet, SimClock(), state_dir=tmp_path / "state")
    await fleet.stop()


def ids(sim: cli.Simulator) -> tuple[str, str]:
    lock, cabinet = list(sim.fleet)
    return format_device_id(lock.device_id), format_device_id(cabinet.device_id)


# --------------------------------------------------------------------------------------------
# The commands, in process
# --------------------------------------------------------------------------------------------


async def test_commands_act_on_the_devices(sim: cli.Simulator) -> None:
    lock, cabinet = ids(sim)
    device = sim.fleet.get(bytes.fromhex(lock))

    answer = await sim.handle({"cmd": "present_key", "device_id": lock, "key_id": 7, "id": 1})
    assert answer == {
        "ok": True,
        "id": 1,
        "cmd": "present_key",
        "granted": False,
        "reason": "KEY_UNKNOWN",
    }
    assert (await sim.handle({"cmd": "door", "device_id": lock, "state": "open"}))["door"] == "open"
    assert (await sim.handle({"cmd": "battery", "device_id": lock, "percent": 15}))["ok"]
    assert device.device.battery_percent == 15
    assert (await sim.handle({"cmd": "battery", "device_id": lock, "replace": True}))[
        "battery_percent"
    ] == 100
    assert "TAMPER" in (await sim.handle({"cmd": "tamper", "device_id": lock}))["alarms"]
    taken = await sim.handle({"cmd": "take_key", "device_id": cabinet, "slot": 2, "key_id": 9})
    assert taken["slots"]["2"] == 9
    back = await sim.handle({"cmd": "return_key", "device_id": cabinet, "slot": 2})
    assert back["slots"]["2"] == 0

    status = await sim.handle({"cmd": "status", "device_id": lock})
    [summary] = status["devices"]
    assert summary["door"] == "open"
    assert summary["alarms"] == ["TAMPER", "CLOCK_UNSET", "DOOR_HELD_OPEN"]
    assert "label" not in summary  # status never shows the secret

    listed = await sim.handle({"cmd": "devices"})
    assert LabelPayload.parse(listed["devices"][0]["label"]).device_id == bytes.fromhex(lock)


async def test_fault_commands(sim: cli.Simulator) -> None:
    lock, _ = ids(sim)
    device = sim.fleet.get(bytes.fromhex(lock))
    answer = await sim.handle(
        {"cmd": "fault", "device_id": lock, "drop_after_frames": 5, "answer_delay": 0.1}
    )
    assert answer["faults"] == {"drop_after_frames": 5, "answer_delay": 0.1}
    assert device.faults.drop_after_frames == 5

    answer = await sim.handle({"cmd": "fault", "device_id": lock, "clear": True, "fill_log": 10})
    assert answer["faults"] == {}
    assert device.device.log.waiting == 11

    await sim.handle({"cmd": "fault", "device_id": lock, "drift_ppm": 250})
    assert device.device.clock.drift_ppm == 250

    bad = await sim.handle({"cmd": "fault", "device_id": lock, "corrupt_probability": 2})
    assert not bad["ok"]
    assert "corrupt_probability" in bad["error"]
    half_bad = await sim.handle(
        {"cmd": "fault", "device_id": lock, "corrupt_next": 3, "answer_delay": -1}
    )
    assert not half_bad["ok"]
    assert device.faults.corrupt_next == 0  # nothing of a refused command applies
    unknown = await sim.handle({"cmd": "fault", "device_id": lock, "explode": True})
    assert unknown == {"ok": False, "cmd": "fault", "error": "unknown fault(s) explode"}


async def test_power_add_save_and_quit(sim: cli.Simulator, tmp_path: Path) -> None:
    lock, _ = ids(sim)
    off = await sim.handle({"cmd": "power", "device_id": lock, "on": False})
    assert off["powered"] is False
    assert not sim.fleet.get(bytes.fromhex(lock)).powered
    assert (await sim.handle({"cmd": "power", "device_id": lock, "on": True}))["powered"]

    added = await sim.handle({"cmd": "add", "kind": "medicine-cabinet", "count": 2})
    assert [d["kind"] for d in added["devices"]] == ["medicine_cabinet"] * 2
    assert len(sim.fleet) == 4

    saved = await sim.handle({"cmd": "save"})
    assert saved["saved"] == 4
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert len(files) == 5
    assert cli.CLOCK_FILE in files

    assert not sim.stopping.is_set()
    assert (await sim.handle({"cmd": "quit"}))["ok"]
    assert sim.stopping.is_set()


async def test_bad_commands_get_typed_answers(sim: cli.Simulator) -> None:
    lock, _ = ids(sim)
    for command, error in [
        ([1, 2], "a command is a JSON object"),
        ({"cmd": "fly"}, "unknown cmd 'fly'"),
        ({"cmd": "door", "device_id": "xyz"}, "16 hex digits"),
        ({"cmd": "door", "device_id": "00" * 8, "state": "open"}, "no device"),
        ({"cmd": "door", "device_id": lock, "state": "ajar"}, "state must be"),
        ({"cmd": "present_key", "device_id": lock, "key_id": "7"}, "key_id must be an integer"),
        ({"cmd": "battery", "device_id": lock, "percent": 101}, "does not recharge"),
        ({"cmd": "power", "device_id": lock}, "on must be true or false"),
        ({"cmd": "take_key", "device_id": lock, "slot": 99, "key_id": 1}, "no slot 99"),
        ({"cmd": "add", "kind": "toaster"}, "unknown device kind"),
        ({"cmd": "present_key", "device_id": lock, "key_id": -1}, "key"),
    ]:
        answer = await sim.handle(command)
        assert answer["ok"] is False, command
        assert error in answer["error"], (command, answer)
    sim.state_dir = None
    assert (await sim.handle({"cmd": "save"}))["error"] == "no --state-dir to save to"


def test_arguments_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--devices", "2", "--locks", "1"],
        ["--locks", "-1"],
        ["--speed", "0"],
        ["--residents", "0"],
    ):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 2
    assert "error" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The process, from another process's point of view
# --------------------------------------------------------------------------------------------


async def test_the_simulator_process_pairs_takes_faults_and_saves(tmp_path: Path) -> None:
    state = tmp_path / "state"
    sim = await SimProcess.start(
        "--devices", "3", "--serve", "tcp-server:127.0.0.1:0", "--state-dir", str(state)
    )
    try:
        assert sim.ready["transport"].startswith("tcp-client:127.0.0.1:")
        devices = sim.ready["devices"]
        assert [d["kind"] for d in devices] == ["door_lock"] * 3
        assert not any(d["paired"] for d in devices)
        first, second, third = devices
        assert LabelPayload.parse(first["label"]).device_id.hex() == first["device_id"]

        credentials = Credentials.issue()
        central = await Central.over_transport(sim.ready["transport"])
        try:
            await central.scan_for(d["address"] for d in devices)
            pinned = await pair(central, first["address"], first["label"], credentials)

            # A fault takes effect at once: the second device now refuses connections.
            answer = await sim.command(
                cmd="fault", device_id=second["device_id"], refuse_connections=True
            )
            assert answer["ok"], answer
            with pytest.raises(ConnectFailed):
                await central.connect(second["address"])
            # And the paired one drops the link two frames into a session: after handshake
            # message 2, so the gateway learns it when it sends its first request.
            await sim.command(cmd="fault", device_id=first["device_id"], drop_after_frames=2)
            dropped = await open_session(central, first["address"], pinned, credentials)
            with pytest.raises(LinkDropped):
                await dropped.request(StatusRequest())
            await sim.command(cmd="fault", device_id=first["device_id"], clear=True)
            session = await open_session(central, first["address"], pinned, credentials)
            async with session.link:
                assert isinstance(await session.request(StatusRequest()), Status)

            off = await sim.command(cmd="power", device_id=third["device_id"], on=False)
            assert off["powered"] is False
            seen = await central.scan(duration=0.5)
            assert third["address"] not in seen
            assert first["address"] in seen
        finally:
            await central.close()

        status = await sim.command(cmd="status")
        paired = {d["device_id"]: d["paired"] for d in status["devices"]}
        assert paired == {
            first["device_id"]: True,
            second["device_id"]: False,
            third["device_id"]: False,
        }
        assert status["devices"][1]["faults"] == {"refuse_connections": True}
    finally:
        code = await sim.finish()
    assert code == 0
    files = {path.name for path in state.iterdir()}
    assert files == {f"{d['device_id']}.json" for d in devices} | {cli.CLOCK_FILE}
    saved = json.loads((state / f"{first['device_id']}.json").read_text(encoding="utf-8"))
    assert saved["device"]["authority_key"] == credentials.authority_public.hex()
    assert saved["address"] == first["address"]

    # Restarted on the same state: the same devices, still paired; EOF ends it cleanly.
    again = await SimProcess.start("--state-dir", str(state))
    try:
        assert again.ready["transport"] is None
        restored = {d["device_id"]: d for d in again.ready["devices"]}
        assert restored.keys() == {d["device_id"] for d in devices}
        assert restored[first["device_id"]]["paired"]
        assert restored[first["device_id"]]["address"] == first["address"]
        assert restored[first["device_id"]]["label"] == first["label"]
    finally:
        code = await again.finish(via_eof=True)
    assert code == 0


async def test_a_scenario_process_reports_progress() -> None:
    # Two days: the first runs from the start time to midnight, which late in the evening
    # may hold no visit at all; the second is a whole day of them.
    sim = await SimProcess.start(
        "--scenario", "--seed", "4", "--residents", "2", "--speed", "20000", "--days", "2"
    )
    try:
        kinds = {d["kind"] for d in sim.ready["devices"]}
        assert {"door_lock", "key_cabinet"} <= kinds
        status: dict[str, Any] = {}
        for _ in range(40):
            status = await sim.command(cmd="status")
            if status["scenario"]["applied"] > 0:
                break
            await asyncio.sleep(0.1)
        assert status["scenario"]["applied"] > 0
        assert status["speed"] == 20000
        assert {entry["shift"] for entry in status["staff"]} == {"day", "evening", "night"}
    finally:
        code = await sim.finish()
    assert code == 0
