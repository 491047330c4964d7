"""The ``lockgw`` command line.

Errors are one line on stderr and a non-zero exit: 2 for a bad command line, 78
(EX_CONFIG, which the systemd unit does not restart on) for a bad configuration or key
file, 1 for anything else that failed.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway import audit, technician
from gateway.authority import (
    SigningRequest,
    SigningRequestError,
    gateway_signing_request,
    issue,
    registry_signing_request,
)
from gateway.config import ConfigError, load_config
from gateway.device_session import DeviceError, SessionError
from gateway.keys import (
    GatewayCredentials,
    GatewayKeys,
    KeyFileError,
    load_credentials,
    load_public_key,
    load_signing_key,
    public_key_pem,
    save_gateway_keys,
    save_signing_key,
)
from gateway.pairing import PairingResult, WorkOrder, pair_device
from gateway.radio.base import Radio, RadioError
from gateway.store import Store
from gateway.topics import Topics
from gateway.worker import BlockingWorker
from protocols.enums import DeviceKind
from protocols.envelopes import Scope, encode_certificate
from protocols.errors import ErrorCode, ProtocolError
from protocols.identity import format_device_id, parse_device_id
from protocols.pairing import PairingCode, parse_code_or_label

EX_CONFIG: Final = 78


class CliError(Exception):
    """A failure to report in one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.handler(args)
    except CliError as exc:
        sys.stderr.write(f"lockgw: {exc}\n")
        return exc.code
    except (ConfigError, KeyFileError) as exc:
        sys.stderr.write(f"lockgw: {exc}\n")
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lockgw",
        description="Gateway between the Bluetooth LE locks of home care and the registry.",
    )
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the gateway daemon")
    run.add_argument("--config", type=Path, required=True, help="gateway TOML configuration")
    run.set_defaults(handler=_run)

    check = commands.add_parser("check-config", help="validate a configuration and exit")
    check.add_argument("--config", type=Path, required=True)
    check.set_defaults(handler=_check_config)

    devices = commands.add_parser("devices", help="list the devices paired to this gateway")
    devices.add_argument("--config", type=Path, required=True)
    devices.add_argument("--json", action="store_true", help="one JSON document for scripts")
    devices.set_defaults(handler=_devices)

    _technician_parsers(commands)

    keys = commands.add_parser("keys", help="the gateway's own keys")
    key_commands = keys.add_subparsers(required=True, metavar="ACTION")
    generate = key_commands.add_parser(
        "generate", help="create the gateway's keys and a signing request for the authority"
    )
    generate.add_argument("--id", required=True, help="gateway id, as in the configuration")
    generate.add_argument("--key", type=Path, required=True, help="private key file to write")
    generate.add_argument("--request", type=Path, required=True, help="signing request to write")
    generate.set_defaults(handler=_keys_generate)

    authority = commands.add_parser("authority", help="the organisation's authority")
    authority_commands = authority.add_subparsers(required=True, metavar="ACTION")
    init = authority_commands.add_parser("init", help="create the authority key")
    init.add_argument("--key", type=Path, required=True, help="private key file to write")
    init.add_argument("--public", type=Path, required=True, help="public key file to write")
    init.set_defaults(handler=_authority_init)
    registry = authority_commands.add_parser(
        "registry-key", help="create a registry key and its signing request"
    )
    registry.add_argument("--subject", required=True)
    registry.add_argument("--key", type=Path, required=True)
    registry.add_argument("--request", type=Path, required=True)
    registry.set_defaults(handler=_registry_key)
    sign = authority_commands.add_parser("issue", help="issue a certificate for a request")
    sign.add_argument("--key", type=Path, required=True, help="the authority's private key")
    sign.add_argument("--request", type=Path, required=True, help="a signing request")
    sign.add_argument("--out", type=Path, required=True, help="certificate file to write")
    sign.add_argument("--sites", default="", help="comma-separated site ids in scope")
    sign.add_argument("--devices", default="", help="comma-separated device ids in scope")
    sign.add_argument("--organisation-wide", action="store_true", help="every device in scope")
    sign.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    sign.set_defaults(handler=_authority_issue)
    _add_audit_commands(commands)
    return parser


def _technician_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``scan`` and ``pair``: what a field technician types at a newly mounted lock."""
    scan = commands.add_parser(
        "scan", help="list the lockgw devices in range, from their adverts (no connection)"
    )
    scan.add_argument("--config", type=Path, required=True)
    scan.add_argument("--duration", type=float, default=5.0, help="seconds to listen (default 5)")
    scan.add_argument("--json", action="store_true", help="one JSON document for scripts")
    scan.set_defaults(handler=_scan)

    pair = commands.add_parser(
        "pair", help="pair a newly mounted device with the code on its label"
    )
    pair.add_argument("--config", type=Path, required=True)
    pair.add_argument("--work-order", required=True, help="the work order for the mounting")
    pair.add_argument("--consent", required=True, help="the property owner's consent reference")
    pair.add_argument("--device", help="device id (else: the one device in pairing mode)")
    pair.add_argument(
        "--code",
        help="pairing code or the label's QR payload; asked for (hidden) when not given",
    )
    pair.add_argument("--site", type=int, help="site id (default: the gateway's only site)")
    pair.add_argument("--json", action="store_true", help="one JSON document for scripts")
    pair.set_defaults(handler=_pair)

    decommission = commands.add_parser(
        "decommission",
        help="take a device out of service: asks the registry, collects the log, resets it",
        description=(
            "Asks the registry (through the running daemon) whether any other service still "
            "needs the lock. If none does, or --force gives the reason to go ahead anyway, the "
            "daemon collects the door log, resets the device to its factory state and "
            "de-registers it. Exit 0 when done, 1 when refused or failed: then nothing changed."
        ),
    )
    decommission.add_argument("device", help="device id, 16 hex digits")
    decommission.add_argument("--config", type=Path, required=True)
    decommission.add_argument("--reason", required=True, help="why (e.g. the work order)")
    decommission.add_argument(
        "--force",
        metavar="REASON",
        help="go ahead even if another service still needs the lock, for this reason",
    )
    decommission.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the registry (60)"
    )
    decommission.add_argument("--json", action="store_true", help="one JSON document for scripts")
    decommission.set_defaults(handler=_decommission)


def _run(args: argparse.Namespace) -> int:
    # The daemon never draws on a terminal, but structlog imports rich (for tracebacks it
    # is told not to use, see gateway.logs) whenever rich is installed: 4.6 MiB of the
    # daemon's memory. A None entry makes that import fail as if rich were absent.
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    from gateway import app  # noqa: PLC0415 - the daemon's imports are only paid for by `run`

    settings = load_config(args.config)
    try:
        app.run(settings)
    except app.StartupError as exc:
        raise CliError(str(exc), EX_CONFIG) from exc
    return 0


def _check_config(args: argparse.Namespace) -> int:
    settings = load_config(args.config)
    sys.stdout.write(f"{args.config}: valid configuration for gateway {settings.gateway.id}\n")
    return 0


def _devices(args: argparse.Namespace) -> int:
    settings = load_config(args.config)
    path = settings.gateway.store_path
    if not path.exists():
        msg = f"no store at {path}: the gateway has not run yet"
        raise CliError(msg)
    with Store.open(path) as store:
        devices = store.list_devices(include_decommissioned=True)
    rows = [
        {
            "device_id": format_device_id(device.device_id),
            "kind": DeviceKind(device.kind).name.lower(),
            "site": device.site_id,
            "battery": device.battery,
            "access": device.access_version,
            "revocation": device.revocation_version,
            "reachable": device.reachable,
            "last_heard": device.last_heard,
            "decommissioned": device.decommissioned_at is not None,
        }
        for device in devices
    ]
    if args.json:
        sys.stdout.write(json.dumps({"devices": rows}, indent=2) + "\n")
        return 0
    sys.stdout.write(_table(rows) + "\n")
    return 0


def _scan(args: argparse.Namespace) -> int:
    from gateway.app import make_radio  # noqa: PLC0415 - radio backends load only for radio commands

    if not 0 < args.duration <= 600:
        msg = "--duration must be more than 0 and at most 600 seconds"
        raise CliError(msg, 2)
    settings = load_config(args.config)
    rows, shown = asyncio.run(_scan_rows(make_radio(settings), args.duration, json_only=args.json))
    if args.json:
        sys.stdout.write(json.dumps({"devices": rows}, indent=2) + "\n")
    elif not (shown and sys.stdout.isatty()):  # the live table already stays on the screen
        sys.stdout.write(f"{len(rows)} device(s) in range\n")
        if rows:
            sys.stdout.write(_table(rows) + "\n")
    return 0


async def _scan_rows(
    radio: Radio, duration: float, *, json_only: bool
) -> tuple[list[dict[str, object]], bool]:
    """The devices heard, and whether a live table showed them on the terminal."""
    from gateway import console  # noqa: PLC0415 - the terminal library loads for people only

    latest: dict[str, dict[str, object]] = {}

    def rows() -> list[dict[str, object]]:
        return sorted(latest.values(), key=lambda row: (str(row["kind"]), str(row["device_id"])))

    started = time.monotonic()
    try:
        with console.LiveTable("scanning", enabled=not json_only) as live:
            async with radio:
                async for seen, first in technician.scan_devices(radio, duration):
                    row = latest[seen.device_id] = seen.row()
                    if live.is_live:
                        left = max(0.0, duration - (time.monotonic() - started))
                        live.show(rows(), f"{len(latest)} device(s) in range, {left:.0f} s left")
                    elif first and not json_only:
                        sys.stderr.write(f"  found {row['device']} ({row['kind']})\n")
                        sys.stderr.flush()
            live.show(rows(), f"{len(latest)} device(s) in range")
    except RadioError as exc:
        msg = f"scanning failed: {exc}"
        raise CliError(msg) from exc
    return rows(), live.is_live and not json_only


def _pair(args: argparse.Namespace) -> int:
    from gateway.app import make_radio  # noqa: PLC0415 - radio backends load only for radio commands

    settings = load_config(args.config)
    site = args.site
    if site is None:
        if len(settings.gateway.site_ids) != 1:
            msg = "name the site with --site (the gateway serves more than one, or none listed)"
            raise CliError(msg, 2)
        site = settings.gateway.site_ids[0]
    text = args.code or getpass.getpass("Pairing code or label payload: ")
    try:
        code, label_device = parse_code_or_label(text)
        named = parse_device_id(args.device) if args.device else None
        order = WorkOrder(args.work_order, args.consent)
    except (ProtocolError, ValueError) as exc:
        raise CliError(str(exc), 2) from exc
    if named is not None and label_device is not None and named != label_device:
        msg = "the label names another device than --device"
        raise CliError(msg, 2)
    credentials = load_credentials(
        settings.gateway.key_file,
        settings.gateway.certificate_file,
        settings.gateway.authority_key_file,
    )
    settings.gateway.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with Store.open(settings.gateway.store_path) as store:
        result = asyncio.run(
            _pair_device(
                make_radio(settings),
                named or label_device,
                code,
                site,
                order,
                credentials=credentials,
                store=store,
                topics=Topics(settings.mqtt.prefix, settings.gateway.id),
                mtu=settings.radio.mtu,
            )
        )
    device = result.device
    summary = {
        "device_id": format_device_id(device.device_id),
        "kind": DeviceKind(device.kind).name.lower(),
        "site": device.site_id,
        "firmware": result.firmware,
        "registration": "queued",
    }
    if args.json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    else:
        sys.stdout.write(
            f"paired {summary['kind']} {summary['device_id']} at site {device.site_id}; "
            "its registration waits in the outbox and goes to the registry as soon as the "
            "gateway is connected\n"
        )
    return 0


async def _pair_device(
    radio: Radio,
    device_id: bytes | None,
    code: PairingCode,
    site: int,
    order: WorkOrder,
    *,
    credentials: GatewayCredentials,
    store: Store,
    topics: Topics,
    mtu: int,
) -> PairingResult:
    from gateway import console  # noqa: PLC0415 - the terminal library loads for people only

    try:
        with console.steps("looking for the device in pairing mode") as step:
            async with radio, BlockingWorker("store") as worker:
                found, address = await technician.find_in_pairing_mode(
                    radio, device_id, within=15.0
                )
                step(f"pairing {format_device_id(found)}: handshake, provisioning, storing keys")
                return await pair_device(
                    radio=radio,
                    address=address,
                    device_id=found,
                    code=code,
                    site_id=site,
                    order=order,
                    credentials=credentials,
                    store=store,
                    worker=worker,
                    topics=topics,
                    mtu=mtu,
                )
    except technician.NoDeviceError as exc:
        raise CliError(str(exc)) from exc
    except SessionError as exc:
        if exc.code is ErrorCode.BAD_PAIRING_CODE:
            msg = "the pairing code does not match this device; it stays unpaired"
            raise CliError(msg) from exc
        msg = f"pairing failed: {exc}"
        raise CliError(msg) from exc
    except (DeviceError, RadioError) as exc:
        msg = f"pairing failed: {exc}; the device stays unpaired"
        raise CliError(msg) from exc


def _decommission(args: argparse.Namespace) -> int:
    from gateway import console, control  # noqa: PLC0415 - loaded for this command only

    try:
        device_id = parse_device_id(args.device)
    except ProtocolError as exc:
        raise CliError(str(exc), 2) from exc
    if args.force is not None and not args.force.strip():
        msg = "--force needs the reason to override the other services"
        raise CliError(msg, 2)
    if not 0 < args.timeout <= 600:
        msg = "--timeout must be more than 0 and at most 600 seconds"
        raise CliError(msg, 2)
    settings = load_config(args.config)
    request = {
        "device_id": format_device_id(device_id),
        "reason": args.reason,
        "override": args.force,
        "timeout": args.timeout,
    }
    with console.steps("asking the gateway daemon") as step:
        try:
            result = asyncio.run(
                control.call(settings.gateway.control_path, "decommission", request, progress=step)
            )
        except control.ControlError as exc:
            if exc.code == "declined":
                needed = ", ".join(exc.details.get("needed_by", [])) or "the registry"
                msg = (
                    f"refused: {exc.message}; nothing was changed. To decommission anyway, "
                    f"give the reason with --force (needed by {needed})"
                )
                raise CliError(msg) from exc
            raise CliError(exc.message) from exc
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write(
            f"decommissioned {result['device_id']}: door log collected, device reset to its "
            "factory state, de-registration sent to the registry\n"
        )
    return 0


def _table(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return "no devices"
    headers = list(rows[0])
    cells = [[cell(row[header]) for header in headers] for row in rows]
    widths = [
        max(len(header), *(len(line[i]) for line in cells)) for i, header in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def cell(value: object) -> str:
    """A table cell: ``-`` for nothing, local date and time for a timestamp."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(value))
    return str(value)


def _keys_generate(args: argparse.Namespace) -> int:
    _refuse_overwrite(args.key)
    keys = GatewayKeys.generate()
    save_gateway_keys(args.key, keys)
    args.request.write_bytes(gateway_signing_request(keys, args.id))
    sys.stdout.write(f"wrote {args.key} (private, mode 600) and {args.request}\n")
    return 0


def _authority_init(args: argparse.Namespace) -> int:
    _refuse_overwrite(args.key)
    key = Ed25519PrivateKey.generate()
    save_signing_key(args.key, key)
    args.public.write_bytes(public_key_pem(key.public_key()))
    sys.stdout.write(f"wrote {args.key} (private, mode 600) and {args.public}\n")
    return 0


def _registry_key(args: argparse.Namespace) -> int:
    _refuse_overwrite(args.key)
    key = Ed25519PrivateKey.generate()
    save_signing_key(args.key, key)
    args.request.write_bytes(registry_signing_request(key, args.subject))
    sys.stdout.write(f"wrote {args.key} (private, mode 600) and {args.request}\n")
    return 0


def _authority_issue(args: argparse.Namespace) -> int:
    authority = load_signing_key(args.key)
    try:
        request = SigningRequest.from_bytes(args.request.read_bytes())
    except OSError as exc:
        msg = f"{args.request}: {exc.strerror}"
        raise CliError(msg) from exc
    except SigningRequestError as exc:
        msg = f"{args.request}: {exc}"
        raise CliError(msg) from exc
    try:
        scope = Scope(
            sites=frozenset(int(site) for site in _split(args.sites)),
            devices=frozenset(parse_device_id(device) for device in _split(args.devices)),
            organisation_wide=args.organisation_wide,
        )
        certificate = issue(
            authority,
            request,
            scope=scope,
            not_before=int(time.time()) - 300,
            validity_days=args.days,
        )
    except (ValueError, ProtocolError, SigningRequestError) as exc:
        msg = f"cannot issue: {exc}"
        raise CliError(msg, 2) from exc
    args.out.write_bytes(encode_certificate(certificate))
    sys.stdout.write(
        f"issued {certificate.role.name.lower()} certificate for {certificate.subject!r}, "
        f"serial {certificate.serial}, valid {args.days} days -> {args.out}\n"
    )
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _refuse_overwrite(path: Path) -> None:
    if path.exists():
        msg = f"{path} exists; refusing to overwrite a private key"
        raise CliError(msg, 2)


# ------------------------------------------------------------------------------- audit


def _add_audit_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser("audit", help="auditors' exports of device event logs")
    audit_commands = audit.add_subparsers(required=True, metavar="ACTION")
    export = audit_commands.add_parser(
        "export",
        help="export a device's verified events in a time range (exit 1 if not intact)",
    )
    export.add_argument("--device", required=True, help="device id, 16 hex digits")
    _export_arguments(export)
    export.set_defaults(handler=_audit_export)
    pull = audit_commands.add_parser(
        "pull",
        help="collect a device's newest records through the daemon, then export and verify",
        description=(
            "The running daemon first collects the records still waiting on the device "
            "(verifying chain and checkpoints as they arrive), then exports the range from its "
            "store; the export is verified again here. Exit 0 when intact, 1 otherwise."
        ),
    )
    pull.add_argument("device", help="device id, 16 hex digits")
    _export_arguments(pull)
    pull.set_defaults(handler=_audit_pull)
    verify = audit_commands.add_parser("verify", help="re-verify a JSON export offline")
    verify.add_argument("file", type=Path)
    verify.add_argument(
        "--device-key", required=True, help="the device's public key: hex, or a key file"
    )
    verify.add_argument("--json", action="store_true", help="the verdict as JSON for scripts")
    verify.set_defaults(handler=_audit_verify)


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--from", dest="time_from", required=True, help="ISO 8601 or unix")
    parser.add_argument("--to", dest="time_to", required=True, help="ISO 8601 or unix")
    parser.add_argument("--format", choices=audit.FORMATS, default="json")
    parser.add_argument("--out", type=Path, required=True, help="file to write (mode 600)")
    parser.add_argument("--reveal", action="store_true", help="show real staff key ids")
    parser.add_argument("--reason", help="why key ids are revealed (required with --reveal)")
    parser.add_argument("--auditor", help="who exports (default: the login name)")
    parser.add_argument("--json", action="store_true", help="a JSON summary for scripts")


def _export_request(args: argparse.Namespace) -> tuple[bytes, int, int]:
    """The device id and range of an export or pull; CliError (exit 2) when invalid."""
    if args.reveal and not (args.reason or "").strip():
        msg = "--reveal needs --reason: revealing staff key ids must be justified"
        raise CliError(msg, 2)
    if args.reason is not None and not args.reveal:
        msg = "--reason is only meaningful with --reveal"
        raise CliError(msg, 2)
    try:
        device_id = parse_device_id(args.device)
        time_from = audit.parse_time(args.time_from)
        time_to = audit.parse_time(args.time_to, end_of_day=True)
    except (ProtocolError, audit.AuditError) as exc:
        raise CliError(str(exc), 2) from exc
    return device_id, time_from, time_to


def _write_private(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            out.write(text)
    except OSError as exc:
        msg = f"{path}: {exc.strerror or exc}"
        raise CliError(msg) from exc


def _audit_pull(args: argparse.Namespace) -> int:
    from gateway import console, control  # noqa: PLC0415 - loaded for this command only

    device_id, time_from, time_to = _export_request(args)
    settings = load_config(args.config)
    request = {
        "device_id": format_device_id(device_id),
        "from": time_from,
        "to": time_to,
        "format": args.format,
        "reveal_reason": args.reason if args.reveal else None,
        "auditor": args.auditor,
    }
    with console.steps("asking the gateway daemon") as step:
        try:
            result = asyncio.run(
                control.call(settings.gateway.control_path, "audit_pull", request, progress=step)
            )
        except control.ControlError as exc:
            hint = (
                "; `lockgw audit export` exports what the store already holds"
                if exc.code == control.UNAVAILABLE
                else ""
            )
            raise CliError(exc.message + hint) from exc
        step("verifying the export here")
        # The daemon verified; the auditor's own copy is verified again, independently.
        verification = audit.verify_export(result["export"])
    _write_private(args.out, result["rendered"])
    records = len(result["export"]["events"])
    if args.json:
        _summary(args, records, verification, collected=result["collected_from_device"])
    else:
        source = (
            "collected from the device first"
            if result["collected_from_device"]
            else "the device was out of reach: newer records may still wait on it"
        )
        sys.stdout.write(
            f"{args.out}: {records} records of {args.device} ({source}), "
            f"{'key ids revealed' if args.reveal else 'key ids pseudonymised'}; "
            f"{verification.summary()}\n"
        )
    return 0 if verification.intact else 1


def _summary(
    args: argparse.Namespace,
    records: int,
    verification: audit.VerificationResult,
    *,
    collected: bool | None = None,
) -> None:
    document: dict[str, object] = {
        "out": str(args.out),
        "device_id": args.device,
        "format": args.format,
        "records": records,
        "revealed": args.reveal,
        "verification": verification.to_dict(),
    }
    if collected is not None:
        document["collected_from_device"] = collected
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def _audit_export(args: argparse.Namespace) -> int:
    device_id, time_from, time_to = _export_request(args)
    auditor = args.auditor if args.auditor is not None else getpass.getuser()
    settings = load_config(args.config)
    path = settings.gateway.store_path
    if not path.exists():
        msg = f"no store at {path}: the gateway has not run yet"
        raise CliError(msg)
    with Store.open(path) as store:
        try:
            result = audit.export(
                store,
                device_id,
                time_from=time_from,
                time_to=time_to,
                reveal_reason=args.reason if args.reveal else None,
                auditor=auditor,
                now=time.time(),
                topics=Topics(settings.mqtt.prefix, settings.gateway.id),
                fmt=args.format,
            )
        except audit.AuditError as exc:
            raise CliError(str(exc)) from exc
    _write_private(args.out, audit.render(result, args.format))
    verification = result.verification
    if args.json:
        _summary(args, len(result.in_range), verification)
    else:
        sys.stdout.write(
            f"{args.out}: {len(result.in_range)} records of {args.device}, "
            f"{'key ids revealed' if args.reveal else 'key ids pseudonymised'}; "
            f"{verification.summary()}\n"
        )
    return 0 if verification.intact else 1


def _audit_verify(args: argparse.Namespace) -> int:
    key_arg: str = args.device_key
    key_path = Path(key_arg)
    if key_path.is_file():
        device_key = load_public_key(key_path).public_bytes_raw()
    else:
        try:
            device_key = bytes.fromhex(key_arg.strip())
        except ValueError as exc:
            msg = f"--device-key {key_arg!r} is neither a key file nor hex"
            raise CliError(msg, 2) from exc
        if len(device_key) != 32:
            msg = f"--device-key must be 32 bytes (64 hex digits), got {len(device_key)}"
            raise CliError(msg, 2)
    result = audit.verify_file(args.file, device_key)
    if args.json:
        sys.stdout.write(json.dumps({"file": str(args.file), **result.to_dict()}, indent=2) + "\n")
    else:
        sys.stdout.write(f"{args.file}: {result.summary()}\n")
    return 0 if result.intact else 1


if __name__ == "__main__":
    sys.exit(main())
