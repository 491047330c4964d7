"""The ``lockgw`` command line.

Errors are one line on stderr and a non-zero exit: 2 for a bad command line, 78
(EX_CONFIG, which the systemd unit does not restart on) for a bad configuration or key
file, 1 for anything else that failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.authority import (
    SigningRequest,
    SigningRequestError,
    gateway_signing_request,
    issue,
    registry_signing_request,
)
from gateway.config import ConfigError, load_config
from gateway.keys import (
    GatewayKeys,
    KeyFileError,
    load_signing_key,
    public_key_pem,
    save_gateway_keys,
    save_signing_key,
)
from protocols.enums import DeviceKind
from protocols.envelopes import Scope, encode_certificate
from protocols.errors import ProtocolError
from protocols.identity import format_device_id, parse_device_id

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
    return parser


def _run(args: argparse.Namespace) -> int:
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
    from gateway.store import Store  # noqa: PLC0415 - only this command needs the store

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


def _table(rows: Sequence[Mapping[str, object]]) -> str:
    if not rows:
        return "no devices"
    headers = list(rows[0])
    cells = [[_cell(row[header]) for header in headers] for row in rows]
    widths = [
        max(len(header), *(len(line[i]) for line in cells)) for i, header in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def _cell(value: object) -> str:
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


if __name__ == "__main__":
    sys.exit(main())
