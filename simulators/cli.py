"""``python -m simulators`` (``lockgw-sim``): simulated lockgw devices on a virtual radio.

Starts a fleet of simulated devices, optionally serves the virtual radio to a gateway in
another process (``--serve tcp-server:127.0.0.1:0``; the gateway opens
``BumbleRadio("tcp-client:127.0.0.1:PORT")``), and optionally runs care-visit traffic on
an accelerated clock (``--scenario --speed 600``).

When ready it prints ONE JSON line to stdout::

    {"transport": "tcp-client:127.0.0.1:PORT",
     "devices": [{"device_id": ..., "kind": ..., "address": ..., "label": ..., "paired": ...}]}

``label`` is the QR payload of the device's sticker (``LOCKGW1:<id>:<code>``), which a
technician would scan to pair it. Then it reads JSON-lines commands on stdin and answers
each with one JSON line, ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}`` (see
:data:`COMMANDS`). SIGTERM, SIGINT, EOF on stdin or ``{"cmd": "quit"}`` save the state
(with ``--state-dir``) and exit 0. Logs go to stderr; stdout carries only JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from bumble import core

from protocols.access import Activation
from protocols.enums import DeviceKind
from protocols.errors import DecodeError, ProtocolError
from protocols.identity import format_device_id, parse_device_id
from simulators.faults import DEVICE_FAULTS, Faults, apply_device_fault
from simulators.node import Fleet, SimulatedDevice, kind_name, parse_kind
from simulators.radio import (
    DEFAULT_ADVERTISING_INTERVAL,
    RemoteHost,
    ScalableLink,
    attach_remote_host,
)
from simulators.scenario import Scenario, ScenarioRunner, SimClock, Site
from simulators.timing import TIMINGS

__all__ = ["COMMANDS", "Simulator", "build_parser", "main", "run"]

logger = logging.getLogger(__name__)

CLOCK_FILE: Final = "clock.json"
"""Simulated time at the last save, so a restarted simulator resumes it."""
DEFAULT_SAVE_INTERVAL: Final = 60.0
MAX_COUNT: Final = 10_000

_FAULT_KNOBS: Final = frozenset(
    {
        "drop_after_frames",
        "corrupt_probability",
        "corrupt_byte_probability",
        "corrupt_next",
        "truncate_next",
        "answer_delay",
        "refuse_connections",
        "jam_on_open",
        "seed",
    }
)

Command = Callable[["Simulator", Mapping[str, Any]], Awaitable[dict[str, Any]]]
COMMANDS: dict[str, Command] = {}
"""The stdin commands by ``cmd`` name."""


class CommandError(ValueError):
    """A command that cannot be carried out; its text is the answer's ``error``."""


def _command(name: str) -> Callable[[Command], Command]:
    def register(function: Command) -> Command:
        COMMANDS[name] = function
        return function

    return register


def _int(command: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = command.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool):
        msg = f"{name} must be an integer"
        raise CommandError(msg)
    return value


def _bool(command: Mapping[str, Any], name: str) -> bool:
    value = command.get(name)
    if not isinstance(value, bool):
        msg = f"{name} must be true or false"
        raise CommandError(msg)
    return value


def device_entry(device: SimulatedDevice) -> dict[str, Any]:
    """A device as the ready line lists it; ``label`` is its sticker's secret QR payload."""
    return {
        "device_id": format_device_id(device.device_id),
        "kind": kind_name(device.kind),
        "address": device.address,
        "label": device.label,
        "paired": device.device.paired,
    }


class Simulator:
    """A running fleet and what the commands may do to it."""

    def __init__(
        self,
        fleet: Fleet,
        clock: SimClock,
        *,
        state_dir: Path | None = None,
        runner: ScenarioRunner | None = None,
        scenario: Scenario | None = None,
    ) -> None:
        self.fleet = fleet
        self.clock = clock
        self.state_dir = state_dir
        self.runner = runner
        self.scenario = scenario
        self.stopping = asyncio.Event()

    async def handle(self, command: object) -> dict[str, Any]:
        """Carry out one command; the answer to print. Never raises for a bad command."""
        if not isinstance(command, dict):
            return {"ok": False, "error": "a command is a JSON object"}
        name = command.get("cmd")
        answer: dict[str, Any] = {"ok": False}
        if "id" in command:
            answer["id"] = command["id"]  # lets a script match answers to commands
        function = COMMANDS.get(name) if isinstance(name, str) else None
        if function is None:
            answer["error"] = f"unknown cmd {name!r} (one of {', '.join(sorted(COMMANDS))})"
            return answer
        answer["cmd"] = name
        try:
            answer.update(await function(self, command))
        except (CommandError, ValueError, KeyError, ProtocolError) as exc:
            answer["error"] = exc.args[0] if exc.args else type(exc).__name__
            return answer
        answer["ok"] = True
        return answer

    def device(self, command: Mapping[str, Any]) -> SimulatedDevice:
        """The device a command names by ``device_id``; CommandError or KeyError."""
        text = command.get("device_id")
        if not isinstance(text, str):
            msg = "device_id (16 hex digits) is required"
            raise CommandError(msg)
        try:
            device_id = parse_device_id(text)
        except DecodeError as exc:
            raise CommandError(exc.message) from exc
        return self.fleet.get(device_id)

    def save(self) -> int:
        """Write every device's state and the simulated time; returns how many devices."""
        if self.state_dir is None:
            return 0
        count = self.fleet.save(self.state_dir)
        clock = {"simulated_time": self.clock.now(), "speed": self.clock.speed}
        path = self.state_dir / CLOCK_FILE
        partial = path.with_name(path.name + ".tmp")
        partial.write_text(json.dumps(clock), encoding="utf-8")
        partial.replace(path)
        return count


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


@_command("fault")
async def _fault(sim: Simulator, command: Mapping[str, Any]) -> dict[str, Any]:
    """Set fault knobs (Faults fields), device faults (drift_ppm, fill_log,
    drain_battery) and/or ``"clear": true``."""
    device = sim.device(command)
    settings = {k: v for k, v in command.items() if k not in ("cmd", "id", "device_id")}
    unknown = set(settings) - _FAULT_KNOBS - set(DEVICE_FAULTS) - {"clear"}
    if unknown:
        msg = f"unknown fault(s) {', '.join(sorted(unknown))}"
        raise CommandError(msg)
    clear = settings.pop("clear", False)
    if not isinstance(clear, bool):
        msg = "clear must be true or false"
        raise CommandError(msg)
    knobs = {k: v for k, v in settings.items() if k in _FAULT_KNOBS}
    Faults().update(knobs)  # checks every value first: a bad command changes nothing
    if clear:
        device.faults.clear()
    device.faults.update(knobs)
    for name, value in settings.items():
        if name in DEVICE_FAULTS:
            apply_device_fault(device.device, name, value)
    device.changed()
    return {"device_id": format_device_id(device.device_id), "faults": device.faults.to_json()}


@_command("present_key")
async def _present_key(sim: Simulator, command: Mapping[str, Any]) -> dict[str, Any]:
    """A staff key at the reader, with an activation until ``activation_expires_at``
    (absent or null: none)."""
    device = sim.device(command)
    key_id = _int(command, "key_id")
    expires = command.get("activation_expires_at")
    if expires is not None:
        expires = _int(command, "activation_expires_at")
    activation = None if expires is None else Activation(key_id, expires)
    decision = device.present_key(key_id, activation)
    return {"granted": decision.granted, "reason": decision.reason.name}


@_command("door")
async def _door(sim: Simulator, command: Mapping[str, Any]) -> dict[str, Any]:
    """``"state": "open"`` or ``"closed"``, optionally by ``key_id``."""
    device = sim.device(command)
    state = command.get("state")
    key_id = _int(command, "key_id", 0)
    if state == "open":
        device.open_door(key_id)
    elif state == "closed":
        device.close_door(key_id)
    else:
        msg = 'state must be "open" or "closed"'
        raise CommandError(msg)
    return {"door": device.device.door.name.lower(), "lock": device.device.lock.name.lower()}


@_command("battery")
async def _battery(sim: Simulator, command: Mapping[str, Any]) -> dict[str, Any]:
    """``"percent": p`` runs the battery down to p; ``"drain": n`` takes n points off;
    ``"replace": true`` puts in a new one (the clock loses its time)."""
    device = sim.device(command)
    if command.get("replace") is True:
        device.change_battery()
    elif "percent" in command:
        percent = _int(command, "percent")
        current = device.device.battery_percent
        if not 0 <= percent <= current:
            msg = f"percent must be 0..{current}: a battery does not recharge (use replace)"
            raise CommandError(msg)
        device.drain_battery(current - percent)
    elif "drain" in command:
        drain = _int(command, "drain")
        if drain < 0:
            msg = "drain must be >= 0"
            raise CommandError(msg)
        device.drain_battery(drain)
    else:
        msg = 'battery needs "percent", "drain" or "replace": true'
        raise CommandError(msg)
    return {"battery_percent": device.device.battery_percent}


@_command("tamper")
async def _tamper(sim: Simulator, command: Mapping[str, Any]) -> dict[str, Any]:
    """Someone forces the device: the TAMPER alarm is set and logged."""
    device = sim.device(command)
    device.set_tamper()
    return {"alarms": device.summary()["alarms"]}


@_command("jam")
async def _jam(sim: Simulator, command: Mapping[str, Any]) -> dict[str, Any]:
    """The bolt jams: keys are refused with LOCK_JAMMED."""
    device = sim.device(command)
    device.jam()
    return {"alarms": device.summary()["alarms"]}


@_command("take_key")
async def _take_key(sim: Simulator, command: Mapping[str, Any]) -> dict[str, Any]:
    """Key cabinet: ``key_id`` takes the key (or with ``"dongle": true`` the dongle) of
    ``slot``."""
    device = sim.device(command)
    device.take_from_slot(
        _int(command, "slot"), _int(command, "key_id"), dongle=command.get("dongle") is True
    )
    return {"slots": {str(slot): key for slot, key in device.device.slots.items()}}


@_command("return_key")
async def _return_key(sim: Simulator, command: Mapping[str, Any]) -> dict[str, Any]:
    """Key cabinet: the key (or dongle) of ``slot`` comes back."""
    device = sim.device(command)
    device.return_to_slot(_int(command, "slot"), dongle=command.get("dongle") is True)
    return {"slots": {str(slot): key for slot, key in device.device.slots.items()}}


@_command("power")
async def _power(sim: Simulator, command: Mapping[str, Any]) -> dict[str, Any]:
    """``"on": false`` switches the device off (no adverts, no connections, a connected
    gateway is dropped); ``"on": true`` back on, with its state kept."""
    device = sim.device(command)
    if _bool(command, "on"):
        await device.start()
    else:
        await device.stop()
    return {"device_id": format_device_id(device.device_id), "powered": device.powered}


@_command("status")
async def _status(sim: Simulator, command: Mapping[str, Any]) -> dict[str, Any]:
    """Every device's state (or one device's, with ``device_id``); no secrets."""
    devices = [sim.device(command)] if "device_id" in command else list(sim.fleet)
    answer: dict[str, Any] = {
        "simulated_time": int(sim.clock.now()),
        "speed": sim.clock.speed,
        "devices": [device.summary() for device in devices],
    }
    if sim.runner is not None and sim.scenario is not None:
        answer["scenario"] = sim.runner.progress()
        answer["staff"] = [
            {"key_id": key.key_id, "shift": str(key.shift), "minutes": key.shift.minutes}
            for key in sim.scenario.staff
        ]
    return answer


@_command("devices")
async def _devices(sim: Simulator, _command: Mapping[str, Any]) -> dict[str, Any]:
    """The device list of the ready line, labels included."""
    return {"devices": [device_entry(device) for device in sim.fleet]}


@_command("add")
async def _add(sim: Simulator, command: Mapping[str, Any]) -> dict[str, Any]:
    """``count`` (default 1) new devices of ``kind``, powered on at once."""
    kind = command.get("kind")
    if not isinstance(kind, str):
        msg = "kind (door_lock, key_safe, medicine_cabinet, key_cabinet) is required"
        raise CommandError(msg)
    count = _int(command, "count", 1)
    if not 1 <= count <= MAX_COUNT:
        msg = f"count must be 1..{MAX_COUNT}"
        raise CommandError(msg)
    devices = sim.fleet.create(parse_kind(kind), count)
    await sim.fleet.start(devices)
    return {"devices": [device_entry(device) for device in devices]}


@_command("save")
async def _save(sim: Simulator, _command: Mapping[str, Any]) -> dict[str, Any]:
    """Write the state now (needs ``--state-dir``)."""
    if sim.state_dir is None:
        msg = "no --state-dir to save to"
        raise CommandError(msg)
    return {"saved": sim.save(), "state_dir": str(sim.state_dir)}


@_command("quit")
async def _quit(sim: Simulator, _command: Mapping[str, Any]) -> dict[str, Any]:
    """Save and exit 0, as SIGTERM does."""
    sim.stopping.set()
    return {}


# --------------------------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``lockgw-sim``."""
    parser = argparse.ArgumentParser(
        prog="lockgw-sim",
        description="Simulated lockgw devices (door locks, key safes, medicine cabinets, key "
        "cabinets) on a virtual Bluetooth LE radio. Prints one JSON line when ready, then "
        "answers JSON-lines commands on stdin.",
    )
    counts = parser.add_argument_group("devices (added to those loaded from --state-dir)")
    counts.add_argument("--devices", type=int, metavar="N", help="N door locks")
    counts.add_argument("--locks", type=int, default=0, metavar="N")
    counts.add_argument("--key-safes", type=int, default=0, metavar="N")
    counts.add_argument("--medicine-cabinets", type=int, default=0, metavar="N")
    counts.add_argument("--key-cabinets", type=int, default=0, metavar="N")
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="load devices saved here; save them here on exit, periodically and on 'save'",
    )
    parser.add_argument(
        "--save-interval", type=float, default=DEFAULT_SAVE_INTERVAL, metavar="SECONDS"
    )
    parser.add_argument(
        "--serve",
        metavar="MONIKER",
        help="serve the radio to a host in another process, e.g. tcp-server:127.0.0.1:0",
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="simulated seconds per real second of the devices' clocks (default 1)",
    )
    parser.add_argument(
        "--scenario", action="store_true", help="run care-visit traffic on the devices"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the scenario")
    parser.add_argument("--days", type=int, default=1, help="days of scenario traffic")
    parser.add_argument(
        "--residents",
        type=int,
        default=4,
        help="residents of the site the scenario lays out when no devices are given",
    )
    parser.add_argument("--advertising-interval", type=float, default=DEFAULT_ADVERTISING_INTERVAL)
    parser.add_argument(
        "--timing",
        choices=sorted(TIMINGS),
        help="time the virtual radio like a real one (connection events, PHY, MTU); "
        "the model's advertising interval replaces --advertising-interval",
    )
    parser.add_argument("--no-stdin", action="store_true", help="ignore stdin; run until SIGTERM")
    parser.add_argument("--log-level", default="WARNING")
    return parser


def _wanted(args: argparse.Namespace) -> dict[DeviceKind, int]:
    return {
        DeviceKind.DOOR_LOCK: args.locks + (args.devices or 0),
        DeviceKind.KEY_SAFE: args.key_safes,
        DeviceKind.MEDICINE_CABINET: args.medicine_cabinets,
        DeviceKind.KEY_CABINET: args.key_cabinets,
    }


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.devices is not None and (
        args.locks or args.key_safes or args.medicine_cabinets or args.key_cabinets
    ):
        parser.error("--devices is a shorthand for --locks; give one or the per-kind counts")
    if any(not 0 <= count <= MAX_COUNT for count in _wanted(args).values()):
        parser.error(f"device counts must be 0..{MAX_COUNT}")
    if not args.speed > 0:
        parser.error("--speed must be positive")
    if args.days < 0 or args.residents < 1:
        parser.error("--days must be >= 0 and --residents >= 1")
    if args.save_interval <= 0:
        parser.error("--save-interval must be positive")


def _load_clock(state_dir: Path | None, speed: float) -> SimClock:
    """The simulated clock, resumed from a saved state (never behind real time)."""
    start = time.time()
    if state_dir is not None:
        path = state_dir / CLOCK_FILE
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            start = max(
                start, float(json.loads(path.read_text(encoding="utf-8"))["simulated_time"])
            )
    return SimClock(start, speed)


def _reachable(moniker: str, remote: RemoteHost) -> str:
    """How the other process reaches a served transport (``tcp-server`` -> ``tcp-client``)."""
    if moniker.startswith("tcp-server:") and remote.port is not None:
        host = moniker.split(":")[1]
        if host in ("_", "0.0.0.0", ""):  # noqa: S104  # listening on every interface
            host = "127.0.0.1"
        return f"tcp-client:{host}:{remote.port}"
    return moniker


class _Stdin:
    """Lines of stdin, read in a daemon thread (a pipe, a terminal or a file alike)."""

    def __init__(self, stream: TextIO) -> None:
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def read() -> None:
            try:
                for line in stream:
                    loop.call_soon_threadsafe(self.lines.put_nowait, line)
                loop.call_soon_threadsafe(self.lines.put_nowait, None)
            except (RuntimeError, ValueError, OSError):
                return  # the loop or the stream closed under us: we are exiting anyway

        threading.Thread(target=read, name="stdin", daemon=True).start()


def _emit(out: TextIO, document: Mapping[str, Any]) -> None:
    out.write(json.dumps(document, separators=(",", ":")) + "\n")
    out.flush()


async def _commands(sim: Simulator, stdin: TextIO, out: TextIO) -> None:
    reader = _Stdin(stdin)
    while True:
        line = await reader.lines.get()
        if line is None:
            sim.stopping.set()  # EOF: whoever started us is gone
            return
        if not line.strip():
            continue
        try:
            command = json.loads(line)
        except ValueError:
            _emit(out, {"ok": False, "error": "not a JSON line"})
            continue
        try:
            answer = await sim.handle(command)
        except Exception as exc:
            # A bug or a radio failure: say so, and keep serving the other devices.
            logger.exception("command %r failed", command)
            answer = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        _emit(out, answer)


async def _save_periodically(sim: Simulator, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            sim.save()
        except OSError:
            logger.exception("periodic save failed")


def _prepare_scenario(args: argparse.Namespace, fleet: Fleet, clock: SimClock) -> Scenario:
    """The scenario's site: its own (devices built from the seed), or the fleet's."""
    start = clock.now()
    own = Scenario(args.seed, args.residents, args.days, start)
    if not len(fleet):
        for device in own.build_devices(clock):
            fleet.add(device)
        return own
    if all(device_id in fleet for device_id in own.site.device_ids()):
        return own  # restarted from the state this scenario laid out
    site = Site.from_devices(device.device for device in fleet)
    if not site.residents:
        msg = "the scenario needs at least one door lock"
        raise ValueError(msg)
    return Scenario(args.seed, site, args.days, start)


def _build_fleet(args: argparse.Namespace, clock: SimClock) -> tuple[Fleet, Scenario | None]:
    """The devices: loaded from the state directory, topped up to the counts asked for
    (or laid out by the scenario); ValueError or OSError for a state that does not load."""
    timing = TIMINGS[args.timing] if args.timing else None
    fleet = Fleet(
        ScalableLink(timing) if timing else None,
        clock_source=clock,
        advertising_interval=timing.advertising_interval if timing else args.advertising_interval,
    )
    if args.state_dir is not None:
        fleet.load(args.state_dir)
    wanted = _wanted(args)
    if not args.scenario and not len(fleet) and not any(wanted.values()):
        wanted[DeviceKind.DOOR_LOCK] = 1  # something to talk to
    for kind, count in wanted.items():
        fleet.create(kind, max(0, count - len(fleet.of_kind(kind))))
    scenario = _prepare_scenario(args, fleet, clock) if args.scenario else None
    return fleet, scenario


async def _serve(sim: Simulator, args: argparse.Namespace, *, stdin: TextIO, out: TextIO) -> None:
    """Start the fleet, announce it, and run until told to stop."""
    remote: RemoteHost | None = None
    tasks: list[asyncio.Task[None]] = []
    try:
        transport = None
        if args.serve:
            remote = await attach_remote_host(sim.fleet.link, args.serve, name="gateway-host")
            transport = _reachable(args.serve, remote)
        await sim.fleet.start()
        _emit(out, {"transport": transport, "devices": [device_entry(d) for d in sim.fleet]})
        if not args.no_stdin:
            tasks.append(asyncio.create_task(_commands(sim, stdin, out)))
        if args.state_dir is not None:
            sim.save()  # new devices are on disk at once
            tasks.append(asyncio.create_task(_save_periodically(sim, args.save_interval)))
        if sim.runner is not None:
            tasks.append(asyncio.create_task(sim.runner.run()))
        await sim.stopping.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            sim.save()
        finally:
            await sim.fleet.stop()
            if remote is not None:
                await remote.close()


async def run(args: argparse.Namespace, *, stdin: TextIO, out: TextIO) -> int:
    """The simulator process: returns its exit code."""
    clock = _load_clock(args.state_dir, args.speed)
    try:
        fleet, scenario = _build_fleet(args, clock)
    except (ValueError, OSError) as exc:
        sys.stderr.write(f"lockgw-sim: {exc}\n")
        return 1
    runner = ScenarioRunner(scenario.actions(), fleet, clock) if scenario else None
    sim = Simulator(fleet, clock, state_dir=args.state_dir, runner=runner, scenario=scenario)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sim.stopping.set)
    try:
        await _serve(sim, args, stdin=stdin, out=out)
    except (OSError, core.BaseBumbleError) as exc:
        sys.stderr.write(f"lockgw-sim: {exc}\n")  # e.g. the --serve port is taken
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lockgw-sim`` and ``python -m simulators``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    return asyncio.run(run(args, stdin=sys.stdin, out=sys.stdout))
