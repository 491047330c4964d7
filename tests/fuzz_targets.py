"""The fuzz targets: every parser and verifier of untrusted input, with a valid seed.

One definition, shared by the hypothesis tests (tests/protocols/test_fuzz.py) and the
coverage-guided harnesses (fuzz/run.py). A target takes bytes and either returns or
raises one of its typed refusals; anything else it raises is a bug (:func:`check`).

Keys are derived from fixed labels and the gateway-side targets run on a fixed clock, so
the seeds are the same in every process and a crashing input found in one run reproduces
in another.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import Callable, Coroutine
from typing import Any, Final, NamedTuple, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway.audit import FORMAT, verify_export
from gateway.commands import (
    ALGORITHM,
    CERTIFICATE_HEADER,
    COMMAND_TYPE,
    CommandError,
    CommandVerifier,
)
from protocols import access, advert, envelopes, identity, logrecords, messages, pairing
from protocols.enums import EventType, Reason
from protocols.envelopes import Role, Scope
from protocols.errors import ProtocolError
from protocols.framing import Reassembler
from protocols.identity import DeviceIdentity
from protocols.noise import HandshakeState
from protocols.pairing import PairingCode
from protocols.session import NORMAL_PROTOCOL, SessionFailed
from tests.protocols import test_spec
from tests.protocols.world import NOW, World


class Target(NamedTuple):
    """A parser or verifier fed raw bytes, the input it accepts, and how it may refuse."""

    parse: Callable[[bytes], object]
    seed: bytes
    refusals: tuple[type[Exception], ...] = (ProtocolError,)
    """The typed errors that are a correct answer to bad input; anything else is a bug."""
    more_seeds: tuple[bytes, ...] = ()
    """Further valid inputs, for the coverage-guided corpus (paths one seed cannot show)."""


def fixed_ed25519(label: str) -> Ed25519PrivateKey:
    """An Ed25519 key derived from ``label``: the same in every run, for fuzzing only."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


def fixed_x25519(label: str) -> X25519PrivateKey:
    """An X25519 key derived from ``label``, as :func:`fixed_ed25519`."""
    return X25519PrivateKey.from_private_bytes(hashlib.sha256(label.encode()).digest())


# --------------------------------------------------------------------- device protocol


def feed_reassembler(data: bytes) -> object:
    reassembler = Reassembler()
    return [reassembler.feed(data[start : start + 40]) for start in range(0, len(data), 40)]


WORLD: Final = World(
    authority=fixed_ed25519("fuzz authority"),
    gateway_signing=fixed_ed25519("fuzz gateway signing"),
    gateway_noise=fixed_x25519("fuzz gateway noise"),
    device=DeviceIdentity(fixed_ed25519("fuzz device"), fixed_x25519("fuzz device noise")),
    code=PairingCode(hashlib.sha256(b"fuzz pairing code").digest()[:10]),
)


def feed_device_session(data: bytes) -> object:
    session = WORLD.device_session()
    session.receive_fragment(data)
    failures = [event for event in session.events() if isinstance(event, SessionFailed)]
    if failures:
        raise failures[0].error
    return session.data_to_send()


def first_fragment() -> bytes:
    gateway = WORLD.gateway_session(mtu=517)
    gateway.start()
    [fragment] = gateway.data_to_send()
    return fragment


def read_handshake(data: bytes) -> object:
    responder = HandshakeState(
        NORMAL_PROTOCOL, initiator=False, s=fixed_x25519("fuzz noise responder")
    )
    return responder.read_message(data)


def first_handshake_message() -> bytes:
    return noise_initiator().write_message()


def noise_initiator() -> HandshakeState:
    """An initiator of the normal protocol with fixed keys, before its first message."""
    return HandshakeState(
        NORMAL_PROTOCOL,
        initiator=True,
        s=fixed_x25519("fuzz noise initiator"),
        e=fixed_x25519("fuzz noise initiator ephemeral"),
    )


def read_second_handshake_message(data: bytes) -> object:
    """The initiator reading the responder's ``<- e, ee, s, es``: DH, decryption, keys."""
    initiator = noise_initiator()
    initiator.write_message()
    return initiator.read_message(data)


def second_handshake_message() -> bytes:
    responder = HandshakeState(
        NORMAL_PROTOCOL,
        initiator=False,
        s=fixed_x25519("fuzz noise responder"),
        e=fixed_x25519("fuzz noise responder ephemeral"),
    )
    responder.read_message(noise_initiator().write_message())
    return responder.write_message(b"payload")


def batch() -> bytes:
    log = logrecords.DeviceLog(bytes(8), capacity=10)
    log.append(1_700_000_000, EventType.BOOT, Reason.POWER_ON)
    return logrecords.encode_batch(log.read(0, 10, key=fixed_ed25519("fuzz log"), now=1))


def text(parse: Callable[[str], object]) -> Callable[[bytes], object]:
    return lambda data: parse(data.decode("utf-8", errors="replace"))


# ------------------------------------------------------------------- registry commands

GATEWAY_ID: Final = "gw-fuzz"
COMMAND_AUTHORITY: Final = fixed_ed25519("fuzz command authority")
COMMAND_REGISTRY: Final = fixed_ed25519("fuzz command registry")
COMMAND_SITE: Final = 4711
COMMAND_DEVICE: Final = "0011223344556677"
COMMAND_CERTIFICATE: Final = envelopes.encode_certificate(
    envelopes.issue_certificate(
        COMMAND_AUTHORITY,
        role=Role.REGISTRY,
        subject="registry",
        serial=1,
        signing_key=COMMAND_REGISTRY.public_key(),
        noise_key=None,
        # Not organisation-wide, so that the scope checks of fleet and site targets run.
        scope=Scope(sites=frozenset({COMMAND_SITE})),
        not_before=NOW - 3600,
        not_after=NOW + 86_400,
    )
)


async def _remember(_jti: str, _expires_at: float, _now: float) -> bool:
    # Every jti is new: a replay store would refuse the fuzzer's repeats of a good input.
    return True


VERIFIER: Final = CommandVerifier(
    COMMAND_AUTHORITY.public_key(), GATEWAY_ID, _remember, clock=lambda: float(NOW)
)


T = TypeVar("T")


def run_to_end(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never waits on anything (no event loop needed, and fast)."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()
    msg = "the coroutine waited on something: run it in an event loop"
    raise RuntimeError(msg)


def verify_command(data: bytes) -> object:
    """What the MQTT bridge does with a raw payload on the gateway's command topic."""
    return run_to_end(VERIFIER.verify(data, fleet=False))


def _b64(data: bytes) -> bytes:
    """Base64url without padding (RFC 7515)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


COMMAND_HEADER: Final = _b64(
    json.dumps(
        {
            "alg": ALGORITHM,
            "typ": COMMAND_TYPE,
            CERTIFICATE_HEADER: _b64(COMMAND_CERTIFICATE).decode("ascii"),
        },
        separators=(",", ":"),
    ).encode()
)


def sign_claims(claims: bytes) -> bytes:
    """``claims`` (any bytes) as the payload of a command the fuzz registry signed."""
    signing_input = COMMAND_HEADER + b"." + _b64(claims)
    return signing_input + b"." + _b64(COMMAND_REGISTRY.sign(signing_input))


def verify_signed_claims(claims: bytes) -> object:
    """The checks after the signature (claims, time, arguments, scope) on signed bytes.

    A forger cannot get past the signature, so mutated payloads never reach the argument
    models; the registry (or its stolen key) can, and the gateway must still refuse bad
    arguments with a typed error.
    """
    return verify_command(sign_claims(claims))


WINDOWS: Final = [
    {"days": ["mon", "tue", "fri"], "start": "07:00", "end": "15:30"},
    {"days": ["sun"], "start": "22:00", "end": "24:00"},
]
COMMAND_ARGS: Final[dict[str, dict[str, Any]]] = {
    "set_access": {
        "update_id": "acc-7",
        "target": {"kind": "site", "site_id": COMMAND_SITE},
        "mode": "delta",
        "version": 12,
        "base_version": 11,
        "entries": [
            {"key_id": 5, "valid_from": NOW - 10, "valid_until": NOW + 86_400, "windows": WINDOWS}
        ],
        "removed": [9, 10],
        "expires_at": NOW + 86_400,
    },
    "revoke": {
        "update_id": "rev-42",
        "version": 43,
        "revocations": [{"key_id": 1207, "prune_after": NOW + 86_400}],
        "target": {"kind": "device", "device_id": COMMAND_DEVICE},
        "expires_at": NOW + 86_400,
    },
    "pull_logs": {"device_id": COMMAND_DEVICE, "from": 10, "to": 20},
    "time_sync": {"device_id": None},
    "get_state": {"device_id": COMMAND_DEVICE},
    "register": {"device_id": COMMAND_DEVICE, "work_order": "WO-1", "consent_reference": "CR-9"},
    "decommission": {"device_id": COMMAND_DEVICE, "reason": "moved out", "force": False},
}


def command_claims(op: str) -> bytes:
    """Valid claims of operation ``op`` for the fuzz gateway, at the fuzz clock's now."""
    claims = {
        "id": f"c-{op}",
        "op": op,
        "gateway": GATEWAY_ID,
        "iat": NOW,
        "exp": NOW + 60,
        "jti": f"jti-{op}-0123456789abcdef",
        "args": COMMAND_ARGS[op],
    }
    return json.dumps(claims, separators=(",", ":")).encode()


# ----------------------------------------------------------------------- audit exports


def verify_export_bytes(data: bytes) -> object:
    """An export file's bytes, read as :func:`gateway.audit.verify_file` reads them.

    What ``verify_file`` turns into a ``MALFORMED`` result (bytes that are not UTF-8 JSON,
    JSON nested too deeply to parse, JSON that is not an object) ends here; everything
    else goes to ``verify_export``, which reports every fault in its result and raises
    nothing. Keep this in step with ``verify_file``.
    """
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    return verify_export(document)


def export_document() -> bytes:
    """A small export that verifies: two batches of two records, revealed key ids."""
    device_id = bytes.fromhex("00a1b2c3d4e5f601")
    key = fixed_ed25519("fuzz audit device")
    log = logrecords.DeviceLog(device_id, capacity=10)
    start = 1_790_000_000
    log.append(start, EventType.ACCESS_GRANTED, Reason.VALID_KEY, 4711)
    log.append(start + 5, EventType.DOOR_OPENED, Reason.NONE)
    first = log.read(0, 10, key=key, now=start + 10)
    log.acknowledge(first.records[-1].sequence)
    log.append(start + 300, EventType.DOOR_CLOSED, Reason.NONE)
    log.append(start + 302, EventType.LOCKED, Reason.NONE)
    second = log.read(first.records[-1].sequence + 1, 10, key=key, now=start + 310)
    batches = [first, second]
    document = {
        "format": FORMAT,
        "device_id": device_id.hex(),
        "device_key": key.public_key().public_bytes_raw().hex(),
        "revealed": True,
        "batches": [
            {
                "start_sequence": item.start_sequence,
                "start_head": item.start_head.hex(),
                "records": b"".join(logrecords.encode_record(r) for r in item.records).hex(),
                "checkpoint": logrecords.encode_checkpoint(item.checkpoint).hex(),
            }
            for item in batches
        ],
        "events": [
            {
                "sequence": record.sequence,
                "time": record.time,
                "event": record.event.name,
                "reason": record.reason.name,
                "key": str(record.key_id) if record.key_id else None,
            }
            for item in batches
            for record in item.records
        ],
    }
    return json.dumps(document, separators=(",", ":")).encode()


# ----------------------------------------------------------------------------- targets

TARGETS: Final[dict[str, Target]] = {
    "message": Target(
        messages.decode_message,
        messages.encode_message(1, messages.LogRead(from_sequence=1, max_records=2)),
    ),
    "advert-payload": Target(
        advert.decode_manufacturer_payload,
        bytes.fromhex(test_spec.advert()[:46]),
    ),
    "advertising-data": Target(
        advert.parse_advertising_data,
        bytes.fromhex(test_spec.advert()[46:]),
    ),
    "fragments": Target(feed_reassembler, bytes.fromhex("8000001a" + "00" * 16)),
    "record": Target(logrecords.decode_record, bytes.fromhex(test_spec.record()[64:124])),
    "checkpoint": Target(logrecords.decode_checkpoint, bytes.fromhex(test_spec.checkpoint())),
    "batch": Target(logrecords.decode_batch, batch()),
    "certificate": Target(envelopes.decode_certificate, bytes.fromhex(test_spec.certificate())),
    "update": Target(envelopes.decode_update, bytes.fromhex(test_spec.update())),
    "access-state": Target(access.from_json, access.to_json(access.AccessState()).encode()),
    "pairing-code": Target(text(pairing.PairingCode.parse), b"000G-40R4-0M30-E209-75QC"),
    "label": Target(
        text(pairing.LabelPayload.parse), b"LOCKGW1:0011223344556677:000G40R40M30E20975QC"
    ),
    "device-id": Target(text(identity.parse_device_id), b"0011223344556677"),
    "device-session": Target(feed_device_session, first_fragment()),
    "noise-handshake": Target(read_handshake, first_handshake_message()),
    "noise-handshake-2": Target(read_second_handshake_message, second_handshake_message()),
    "command": Target(
        verify_command,
        sign_claims(command_claims("set_access")),
        refusals=(CommandError,),
        more_seeds=tuple(sign_claims(command_claims(op)) for op in COMMAND_ARGS),
    ),
    "command-claims": Target(
        verify_signed_claims,
        command_claims("set_access"),
        refusals=(CommandError,),
        more_seeds=tuple(command_claims(op) for op in COMMAND_ARGS),
    ),
    "audit-export": Target(verify_export_bytes, export_document(), refusals=()),
}


def check(target: str, data: bytes) -> None:
    """Feed ``data`` to ``target``: a typed refusal is a correct answer, anything else is
    raised (a bug)."""
    parse = TARGETS[target].parse
    with contextlib.suppress(*TARGETS[target].refusals):
        parse(data)
