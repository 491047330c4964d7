"""The lockgw demo: a care site in real processes, or the device protocol alone.

``python -m simulators.demo`` starts a Mosquitto broker, installs a gateway with the
``lockgw`` CLI, starts the device simulator and ``lockgw run`` as child processes and
plays the registry in-process (:class:`SiteDemo`): pairing, an access list, a day of care
visits on an accelerated clock, a fleet-wide revocation and an audit export.

``--protocol-only`` is the walk through the device protocol, end to end in one process
(:class:`Demo`): a gateway pairs a simulated door lock with the code from its label,
provisions it, opens a certificate-checked session, pushes a signed access list and a
revocation, and collects and verifies the lock's event log. Both ends run the real
protocol code; only the radio is replaced by a pipe that carries the same ATT fragments.
Keys and pairing codes are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from gateway import audit
from gateway import cli as gateway_cli
from gateway.keys import load_credentials, load_signing_key
from gateway.pairing import WorkOrder, pair_device
from gateway.radio.bumble import BumbleRadio
from gateway.store import Store
from gateway.topics import Topics
from gateway.worker import BlockingWorker
from protocols.access import Activation, Decision
from protocols.enums import DeviceKind
from protocols.envelopes import (
    AccessEntry,
    AuthorisationUpdate,
    RevocationEntry,
    Role,
    ScheduleWindow,
    Scope,
    Target,
    UpdateKind,
    decode_certificate,
    encode_certificate,
    encode_update,
    issue_certificate,
    sign_update,
)
from protocols.errors import ErrorCode, LocalProtocolError, LogVerificationError
from protocols.identity import format_device_id, parse_device_id
from protocols.logrecords import (
    ChainState,
    LogBatch,
    VerifiedBatch,
    decode_batch,
    encode_batch,
    verify_batch,
)
from protocols.messages import (
    AuthUpdate,
    ErrorReply,
    LogAck,
    LogBatchMessage,
    LogRead,
    Message,
    Provision,
    TimeSync,
)
from protocols.pairing import LabelPayload, PairingCode
from protocols.session import (
    GatewaySessionConfig,
    HandshakeComplete,
    MessageReceived,
    Session,
    SessionFailed,
    SessionMode,
)
from simulators.broker import Broker, BrokerError
from simulators.device import DeviceConnection, VirtualDevice
from simulators.registry import ReferenceRegistry

SITE_ID = 42
LOST_KEY = 4711
COLLEAGUE_KEY = 4712
DAY = 86_400
ALWAYS = ScheduleWindow(days=0x7F, start_minute=0, end_minute=1440)


class DemoError(Exception):
    """The demo saw something the protocol should have prevented."""


@dataclass
class Gateway:
    """The gateway's keys and certificate, as the authority issued them."""

    signing_key: Ed25519PrivateKey
    noise_key: X25519PrivateKey
    certificate: bytes


class Pipe:
    """Carries ATT fragments between a gateway session and a device, as the radio would."""

    def __init__(self, gateway: Session, device: DeviceConnection) -> None:
        self.gateway = gateway
        self.device = device
        self.fragments = 0

    def pump(self) -> list[HandshakeComplete | MessageReceived | SessionFailed]:
        while True:
            outgoing = self.gateway.data_to_send()
            if not outgoing:
                return self.gateway.events()
            for fragment in outgoing:
                self.fragments += 1
                for answer in self.device.receive(fragment):
                    self.fragments += 1
                    self.gateway.receive_fragment(answer)

    def open(self) -> HandshakeComplete | SessionFailed:
        self.gateway.start()
        events = self.pump()
        # The gateway's handshake completes with message 3; the device may still refuse it.
        failures = [event for event in events if isinstance(event, SessionFailed)]
        done = [event for event in events if isinstance(event, HandshakeComplete)]
        if failures or not done:
            if failures:
                return failures[0]
            return SessionFailed(LocalProtocolError(ErrorCode.HANDSHAKE_FAILED), by_peer=False)
        return done[0]

    def request(self, message: Message) -> Message:
        request_id = self.gateway.send_request(message)
        for event in self.pump():
            if isinstance(event, MessageReceived) and event.request_id == request_id:
                return event.message
            if isinstance(event, SessionFailed):
                raise DemoError(event.error.message)
        msg = f"no answer to {type(message).__name__}"
        raise DemoError(msg)


def expect(condition: object, failure: str) -> None:
    """Stop the demo when the protocol did not behave as it must."""
    if not condition:
        raise DemoError(failure)


class Demo:
    """The walk-through, step by step; ``say`` writes what a newcomer reads."""

    def __init__(self, out: TextIO, *, mtu: int) -> None:
        self.out = out
        self.mtu = mtu
        self.now = int(time.time())
        self.authority = Ed25519PrivateKey.generate()
        self.gateway = issue_gateway(self.authority, self.now)
        self.lock = VirtualDevice(DeviceKind.DOOR_LOCK)
        self.fragments = 0

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def run(self) -> int:
        self.say(
            f"A door lock is mounted: device {format_device_id(self.lock.device_id)}, "
            f"advertising pairing mode: {self.lock.advert().pairing_mode}. "
            f"Radio fragments are cut to an ATT MTU of {self.mtu}."
        )
        pinned = self.pair()
        session = self.open_session(pinned)
        self.push_access(session)
        self.revoke(session)
        self.audit(session)
        self.fragments += session.fragments
        self.say(
            f"\nDone: {self.fragments} radio fragments exchanged; pairing, revocation and "
            "audit all behaved."
        )
        return 0

    def pair(self) -> tuple[bytes, bytes]:
        self.say("\n1. Pairing")
        failure = self.pairing_pipe(PairingCode.generate()).open()
        expect(isinstance(failure, SessionFailed), "a wrong pairing code was accepted")
        self.say(
            f"   A mistyped code is refused ({failure_code(failure)}); "
            f"the lock is still unpaired: {not self.lock.paired}."
        )
        pipe = self.pairing_pipe(self.lock.pairing_code)
        done = pipe.open()
        expect(isinstance(done, HandshakeComplete) and done.device, "pairing failed")
        self.say(
            "   With the code from the label the Noise_XXpsk3 handshake completes and the "
            "gateway pins the lock's keys."
        )
        answer = pipe.request(
            Provision(
                device_id=self.lock.device_id,
                authority_key=self.authority.public_key().public_bytes_raw(),
                site_id=SITE_ID,
                time=self.now,
            )
        )
        self.say(f"   Provisioned with the authority key and site {SITE_ID}: {describe(answer)}.")
        self.fragments += pipe.fragments
        return self.lock.identity.signing_public, self.lock.identity.noise_public

    def open_session(self, pinned: tuple[bytes, bytes]) -> Pipe:
        self.say("\n2. A normal session, checked both ways")
        config = GatewaySessionConfig(
            noise_key=self.gateway.noise_key,
            device_id=self.lock.device_id,
            now=self.now,
            certificate=self.gateway.certificate,
            pinned_signing_key=pinned[0],
            pinned_noise_key=pinned[1],
        )
        session = Pipe(Session.gateway(config, mtu=self.mtu), self.connection())
        expect(isinstance(session.open(), HandshakeComplete), "the normal session failed")
        self.say(
            "   Noise_XX: the lock checked the gateway certificate (signature, validity, "
            "scope); the gateway checked the lock's pinned keys."
        )
        sync = session.request(TimeSync(gateway_time_ms=self.now * 1000))
        self.say(f"   Clock synchronised: {describe(sync)}.")
        return session

    def push_access(self, session: Pipe) -> None:
        update = AuthorisationUpdate(
            kind=UpdateKind.ACCESS_FULL,
            target=Target.device(self.lock.device_id),
            version=1,
            base_version=0,
            issued_at=self.now - 60,
            expires_at=self.now + DAY,
            access=tuple(
                AccessEntry(key, self.now - DAY, self.now + 30 * DAY, (ALWAYS,))
                for key in (LOST_KEY, COLLEAGUE_KEY)
            ),
        )
        result = session.request(AuthUpdate(self.sign(update)))
        self.say(
            f"   Signed access list v1 for keys {LOST_KEY} and {COLLEAGUE_KEY}: {describe(result)}."
        )
        replayed = session.request(AuthUpdate(self.sign(update)))
        self.say(f"   The same update again is a rollback: {describe(replayed)}.")
        decision = self.lock.present_key(LOST_KEY, self.activation(LOST_KEY))
        self.say(
            f"   Key {LOST_KEY} with today's 2-factor activation: {describe_decision(decision)}."
        )
        self.lock.open_door(LOST_KEY)
        self.lock.close_door(LOST_KEY)

    def revoke(self, session: Pipe) -> None:
        self.say("\n3. A key is lost: revocation")
        revocation = AuthorisationUpdate(
            kind=UpdateKind.REVOCATION,
            target=Target.fleet(),
            version=1,
            base_version=0,
            issued_at=self.now - 60,
            expires_at=self.now + DAY,
            revocations=(RevocationEntry(LOST_KEY, self.now + 60 * DAY),),
        )
        result = session.request(AuthUpdate(self.sign(revocation)))
        self.say(f"   Fleet-wide revocation of key {LOST_KEY}: {describe(result)}.")
        refused = self.lock.present_key(LOST_KEY, self.activation(LOST_KEY))
        expect(not refused.granted, "a revoked key opened the door")
        self.say(f"   Key {LOST_KEY} presented again: {describe_decision(refused)}.")
        colleague = self.lock.present_key(COLLEAGUE_KEY, self.activation(COLLEAGUE_KEY))
        self.say(f"   Key {COLLEAGUE_KEY} still works: {describe_decision(colleague)}.")

    def audit(self, session: Pipe) -> None:
        self.say("\n4. Audit: collect and verify the lock's log")
        answer = session.request(LogRead(from_sequence=0, max_records=1000))
        expect(isinstance(answer, LogBatchMessage), f"log read refused: {describe(answer)}")
        assert isinstance(answer, LogBatchMessage)
        batch = decode_batch(answer.batch)
        verified = self.verify(batch)
        self.say(f"   {len(verified.records)} records; hash chain and signed checkpoint verified:")
        for record in verified.records:
            key = f"key {record.key_id}" if record.key_id else ""
            self.say(
                f"     #{record.sequence:<3} {record.event.name:<24} {record.reason.name:<12} {key}"
            )
        acked = session.request(LogAck(up_to_sequence=verified.state.next_sequence - 1))
        self.say(f"   Stored, then acknowledged to the lock: {describe(acked)}.")
        victim = batch.records[2]
        altered = replace(victim, key_id=victim.key_id + 1)
        tampered = replace(batch, records=(*batch.records[:2], altered, *batch.records[3:]))
        try:
            self.verify(decode_batch(encode_batch(tampered)))
        except LogVerificationError as exc:
            self.say(
                f"   A copy with record #{victim.sequence} altered fails: {exc.code.name} "
                f"at record #{exc.sequence}."
            )
        else:
            msg = "a tampered log verified"
            raise DemoError(msg)

    def verify(self, batch: LogBatch) -> VerifiedBatch:
        return verify_batch(
            batch,
            device_id=self.lock.device_id,
            device_key=self.lock.identity.signing_key.public_key(),
            state=ChainState.genesis(self.lock.device_id),
        )

    def pairing_pipe(self, code: PairingCode) -> Pipe:
        config = GatewaySessionConfig(
            noise_key=self.gateway.noise_key,
            device_id=self.lock.device_id,
            now=self.now,
            mode=SessionMode.PAIRING,
            pairing_code=code,
        )
        return Pipe(Session.gateway(config, mtu=self.mtu), self.connection())

    def connection(self) -> DeviceConnection:
        return DeviceConnection(self.lock, mtu=self.mtu)

    def activation(self, key_id: int) -> Activation:
        return Activation(key_id=key_id, expires_at=self.now + 12 * 3600)

    def sign(self, update: AuthorisationUpdate) -> bytes:
        certificate = decode_certificate(self.gateway.certificate)
        signed = sign_update(update, key=self.gateway.signing_key, certificate=certificate)
        return encode_update(signed)


def issue_gateway(authority: Ed25519PrivateKey, now: int) -> Gateway:
    signing, noise = Ed25519PrivateKey.generate(), X25519PrivateKey.generate()
    certificate = issue_certificate(
        authority,
        role=Role.GATEWAY,
        subject="gw-demo",
        serial=1,
        signing_key=signing.public_key(),
        noise_key=noise.public_key(),
        scope=Scope(sites=frozenset({SITE_ID})),
        not_before=now - 3600,
        not_after=now + 365 * DAY,
    )
    return Gateway(signing, noise, encode_certificate(certificate))


def failure_code(outcome: HandshakeComplete | SessionFailed) -> str:
    return outcome.error.code.name if isinstance(outcome, SessionFailed) else "none"


def describe(message: Message) -> str:
    if isinstance(message, ErrorReply):
        return f"refused, {message.code.name}"
    return type(message).__name__


def describe_decision(decision: Decision) -> str:
    return f"{'opens' if decision.granted else 'stays shut'} ({decision.reason.name})"


# --------------------------------------------------------------------------------------------
# The care-site demo: real processes (broker, simulator, `lockgw run`) and the registry
# --------------------------------------------------------------------------------------------

GATEWAY_ID = "gw-demo-1"
SITE_ID_DEMO = 42
WAIT = 30.0
DEFAULT_SPEED = 3600.0  # one simulated day in 24 s
REPO_ROOT = Path(__file__).resolve().parent.parent
KIND_WORDS = {
    "door_lock": "door lock",
    "key_safe": "key safe",
    "medicine_cabinet": "medicine cabinet",
    "key_cabinet": "key cabinet",
}
WEEKDAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


@dataclass(frozen=True)
class SiteOptions:
    """The knobs of the care-site demo (see ``--help``)."""

    residents: int = 3
    speed: float = DEFAULT_SPEED
    broker: tuple[str, int] | None = None
    workdir: Path | None = None
    seed: int = 7


class SimChild:
    """``python -m simulators`` as a child process, driven by JSON lines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.ready: dict[str, Any] = {}

    @classmethod
    async def start(cls, log: Path, *args: str) -> SimChild:
        with log.open("ab") as errors:  # the child keeps its own copy of the descriptor
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "simulators", *args,
                cwd=REPO_ROOT, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=errors,
            )  # fmt: skip
        sim = cls(process)
        try:
            sim.ready = await sim.line(WAIT)
        except BaseException:
            await sim.finish()
            raise
        return sim

    async def line(self, within: float = 10.0) -> dict[str, Any]:
        if self.process.stdout is None:
            msg = "the simulator has no stdout pipe"
            raise DemoError(msg)
        async with asyncio.timeout(within):
            text = await self.process.stdout.readline()
        if not text:
            msg = "the simulator exited (see its log in the work directory)"
            raise DemoError(msg)
        document: dict[str, Any] = json.loads(text)
        return document

    async def command(self, **command: object) -> dict[str, Any]:
        if self.process.stdin is None:
            msg = "the simulator has no stdin pipe"
            raise DemoError(msg)
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        answer = await self.line()
        if not answer.get("ok"):
            msg = f"the simulator refused {command}: {answer.get('error')}"
            raise DemoError(msg)
        return answer

    async def finish(self) -> int:
        """Ask it to save and quit (SIGTERM); kill it if it hangs. Its exit code."""
        return await stop_process(self.process)


async def stop_process(process: asyncio.subprocess.Process, within: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after ``within`` seconds; the exit code."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(within):
            return await process.wait()
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise


def parse_broker(url: str) -> tuple[str, int]:
    """``mqtt://host:port`` (port 1883 when left out)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "mqtt" or not parsed.hostname:
        msg = f"--broker must look like mqtt://HOST:PORT, got {url!r}"
        raise ValueError(msg)
    return parsed.hostname, parsed.port or 1883


def counted(counts: Counter[str]) -> str:
    """``3 door locks, 1 key cabinet``."""
    return ", ".join(
        f"{n} {KIND_WORDS.get(kind, kind)}{'s' if n != 1 else ''}"
        for kind, n in sorted(counts.items())
    )


def hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


class SiteDemo:
    """A care site in real processes, narrated step by step for a newcomer."""

    def __init__(self, out: TextIO, options: SiteOptions) -> None:
        self.out = out
        self.options = options
        self.started = time.monotonic()
        self.kinds: dict[str, str] = {}  # device id -> kind name
        self.files: list[Path] = []
        self.revocation_coverage = ""

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def heading(self, number: int, text: str) -> None:
        self.say(f"\n{number}. {text}")

    def device_words(self, device_id: str) -> str:
        return f"{KIND_WORDS.get(self.kinds.get(device_id, ''), 'device')} {device_id}"

    def run(self) -> int:
        workdir = self.options.workdir
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            return asyncio.run(self.site(workdir.resolve()))
        with tempfile.TemporaryDirectory(prefix="lockgw-demo-") as temporary:
            return asyncio.run(self.site(Path(temporary)))

    async def site(self, root: Path) -> int:  # noqa: PLR0915 - the story, step by step
        broker: Broker | None = None
        sim: SimChild | None = None
        daemon: asyncio.subprocess.Process | None = None
        listener: asyncio.Task[None] | None = None
        code = 1
        try:
            self.heading(1, "Broker")
            if self.options.broker is None:
                broker = Broker(root / "broker")
                broker.start()
                host, port = broker.host, broker.port
                self.say(f"   Mosquitto started as a child process on mqtt://{host}:{port}")
            else:
                host, port = self.options.broker
                self.say(f"   using the broker at mqtt://{host}:{port}")

            self.heading(2, "Organisation and gateway (with the lockgw CLI)")
            self.install(root)

            self.heading(3, "The care site (simulator process)")
            state = root / "site-state"
            sim = await SimChild.start(
                root / "simulator.log", *self.sim_args(state, days=0, speed=1.0)
            )
            devices = sim.ready["devices"]
            self.kinds = {d["device_id"]: d["kind"] for d in devices}
            counts = Counter(d["kind"] for d in devices)
            self.say(
                f"   {self.options.residents} residents, {len(devices)} devices: {counted(counts)}"
            )
            self.say(f"   radio served at {sim.ready['transport']}")

            self.heading(4, "A technician pairs every device (label code, work order, consent)")
            await self.pair_all(root, sim)
            await sim.finish()  # saves the paired devices; the day starts on restart
            self.say(
                f"   the site restarts on the accelerated clock ({self.options.speed:g}x), "
                "paired devices kept"
            )
            sim = await SimChild.start(
                root / "simulator.log",
                *self.sim_args(state, days=2, speed=self.options.speed),
            )
            status = await sim.command(cmd="status")
            day_start = int(status["simulated_time"])
            self.write_config(root, sim.ready["transport"], host, port)

            self.heading(5, "Gateway and registry")
            registry = self.make_registry(root, host, port)
            listener = asyncio.create_task(registry.run())
            with (root / "gateway.log").open("ab") as log:
                daemon = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "gateway.cli", "run", "--config",
                    str(root / "gateway.toml"), cwd=REPO_ROOT, stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                )  # fmt: skip
            self.say(f"   lockgw run started (pid {daemon.pid}), log: {root / 'gateway.log'}")
            await registry.wait_for(lambda: online(registry), WAIT, "the gateway online")
            self.say(f"   gateway {GATEWAY_ID} is online at the registry")
            await registry.wait_for(
                lambda: set(registry.registrations) >= set(self.kinds), WAIT, "registrations"
            )
            for device_id in sorted(self.kinds, key=lambda d: (self.kinds[d], d)):
                reg = registry.registrations[device_id]
                self.say(
                    f"   registered: {self.device_words(device_id)} "
                    f"(site {reg.site_id}, {reg.work_order})"
                )

            self.heading(6, "Access list for the staff keys")
            await self.push_access(registry, status["staff"])

            self.heading(7, "A day of care visits (accelerated clock)")
            await self.care_day(registry, sim, day_start)

            self.heading(8, "A key is lost: fleet-wide revocation")
            lost = next(s["key_id"] for s in status["staff"] if s["shift"] == "day")
            await self.revoke(registry, sim, lost)

            self.heading(9, "Audit")
            lock = sorted(d for d, k in self.kinds.items() if k == "door_lock")[0]
            await self.audit(root, registry, lock, day_start)

            code = await stop_process(daemon)
            daemon = None
            if code != 0:
                msg = f"the gateway exited {code}; see {root / 'gateway.log'}"
                raise DemoError(msg)
            self.heading(10, "Summary")
            self.summary(registry)
            return 0
        except (DemoError, TimeoutError, BrokerError, OSError) as exc:
            self.say(f"\ndemo failed: {exc}")
            self.say(f"   logs are in {root}")
            return 1
        finally:
            if daemon is not None:
                await stop_process(daemon)
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener
            if sim is not None:
                await sim.finish()
            if broker is not None:
                broker.stop()
            if code == 0:
                self.say("   every process stopped; the gateway exited 0")

    # -- the steps ----------------------------------------------------------------------------

    def sim_args(self, state: Path, *, days: int, speed: float) -> list[str]:
        return [
            "--scenario", "--seed", str(self.options.seed),
            "--residents", str(self.options.residents), "--days", str(days),
            "--speed", str(speed), "--state-dir", str(state),
            "--serve", "tcp-server:127.0.0.1:0", "--advertising-interval", "0.05",
        ]  # fmt: skip

    def cli(self, root: Path, *step: str) -> None:
        argv = [
            str(root / part) if part.endswith((".key", ".pub", ".req", ".cert")) else part
            for part in step
        ]
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            code = gateway_cli.main(argv)
        if code != 0:
            msg = f"lockgw {' '.join(step)} exited {code}: {quiet.getvalue().strip()}"
            raise DemoError(msg)

    def install(self, root: Path) -> None:
        self.cli(root, "authority", "init", "--key", "authority.key", "--public", "authority.pub")
        self.say("   lockgw authority init: the organisation's signing authority")
        self.cli(root, "keys", "generate", "--id", GATEWAY_ID, "--key", "gateway.key",
                 "--request", "gateway.req")  # fmt: skip
        self.cli(root, "authority", "issue", "--key", "authority.key", "--request",
                 "gateway.req", "--out", "gateway.cert", "--sites", str(SITE_ID_DEMO))  # fmt: skip
        self.say(f"   lockgw keys generate + authority issue: {GATEWAY_ID}, site {SITE_ID_DEMO}")
        self.cli(root, "authority", "registry-key", "--subject", "registry", "--key",
                 "registry.key", "--request", "registry.req")  # fmt: skip
        self.cli(root, "authority", "issue", "--key", "authority.key", "--request",
                 "registry.req", "--out", "registry.cert", "--organisation-wide")  # fmt: skip
        self.say("   lockgw authority registry-key + issue: the registry's signing certificate")

    def write_config(self, root: Path, transport: str, host: str, port: int) -> None:
        (root / "gateway.toml").write_text(
            f"""[gateway]
id = "{GATEWAY_ID}"
state_dir = "{root / "state"}"
key_file = "{root / "gateway.key"}"
certificate_file = "{root / "gateway.cert"}"
authority_key_file = "{root / "authority.pub"}"

[radio]
backend = "bumble"
transport = "{transport}"
mtu = 247

[scheduler]
slots = 2
backoff_initial = "500ms"
backoff_max = "3s"
unreachable_after = "6h"

[log]
# The simulated devices run on the accelerated clock: leave their time alone.
clock_drift_threshold = "3650d"

[mqtt]
host = "{host}"
port = {port}
tls = false
reconnect_min = "200ms"
reconnect_max = "2s"

[logging]
format = "json"

[metrics]
enabled = false
""",
            encoding="utf-8",
        )
        self.cli(root, "check-config", "--config", str(root / "gateway.toml"))
        self.say(f"   configuration {root / 'gateway.toml'} checked; radio {transport}")

    async def pair_all(self, root: Path, sim: SimChild) -> None:
        credentials = load_credentials(
            root / "gateway.key", root / "gateway.cert", root / "authority.pub"
        )
        (root / "state").mkdir(exist_ok=True)
        store = Store.open(root / "state" / "lockgw.sqlite3")
        try:
            async with (
                BumbleRadio(sim.ready["transport"]) as radio,
                BlockingWorker("store") as worker,
            ):
                for number, device in enumerate(sim.ready["devices"], 1):
                    label = LabelPayload.parse(device["label"])  # the QR code on the sticker
                    order = WorkOrder(f"WO-2024-{number:03d}", f"consent-{number:03d}")
                    await pair_device(
                        radio=radio,
                        address=device["address"],
                        device_id=label.device_id,
                        code=label.code,
                        site_id=SITE_ID_DEMO,
                        order=order,
                        credentials=credentials,
                        store=store,
                        worker=worker,
                        topics=Topics("lockgw", GATEWAY_ID),
                    )
                    self.say(
                        f"   paired {self.device_words(device['device_id'])}: "
                        f"work order {order.work_order}, consent {order.consent_reference}"
                    )
        finally:
            store.close()

    def make_registry(self, root: Path, host: str, port: int) -> ReferenceRegistry:
        return ReferenceRegistry(
            host=host,
            port=port,
            key=load_signing_key(root / "registry.key"),
            certificate=(root / "registry.cert").read_bytes(),
            authority=load_signing_key(root / "authority.key").public_key(),
            client_id=f"registry-demo-{os.getpid()}",
        )

    async def watch(
        self, registry: ReferenceRegistry, update_id: str, what: str, expected: int
    ) -> dict[str, int]:
        """Print each device's state as it changes, until every device applied."""
        seen: dict[str, str] = {}

        def report() -> bool:
            for device_id, progress in sorted(registry.progress.get(update_id, {}).items()):
                if progress.state != "pending" and seen.get(device_id) != progress.state:
                    seen[device_id] = progress.state
                    coverage = registry.coverage(update_id)
                    self.say(
                        f"   {what} {progress.state:<11} {self.device_words(device_id)}   "
                        f"[applied {coverage['applied']}, pending {coverage['pending']}, "
                        f"unreachable {coverage['unreachable']}]"
                    )
            return registry.coverage(update_id)["applied"] >= expected

        await registry.wait_for(report, WAIT, f"{what} applied on every device")
        return registry.coverage(update_id)

    async def push_access(self, registry: ReferenceRegistry, staff: list[dict[str, Any]]) -> None:
        now = int(time.time())
        entries = [
            {
                "key_id": key["key_id"],
                "valid_from": now - DAY,
                "valid_until": now + 30 * DAY,
                "windows": [
                    {"days": WEEKDAYS, "start": hhmm(start), "end": hhmm(end)}
                    for start, end in key["minutes"]
                ],
            }
            for key in staff
        ]
        for key in staff:
            windows = ", ".join(f"{hhmm(s)}-{hhmm(e)}" for s, e in key["minutes"])
            self.say(f"   staff key {key['key_id']}: {key['shift']} shift, {windows}")
        answer = await registry.set_access(
            "access-1",
            {"kind": "site", "site_id": SITE_ID_DEMO},
            entries,
            version=1,
            expires_at=now + 30 * DAY,
            gateway=GATEWAY_ID,
            timeout=WAIT,
        )
        if answer.get("status") != "ok":
            msg = f"the gateway refused the access list: {answer}"
            raise DemoError(msg)
        self.say(
            f"   signed access list accepted by the gateway; pushing to {len(self.kinds)} devices:"
        )
        await self.watch(registry, "access-1", "access list", len(self.kinds))

    def verified(self, registry: ReferenceRegistry) -> Counter[str]:
        counts: Counter[str] = Counter()
        for device_id, events in registry.events.items():
            counts[self.kinds.get(device_id, "other")] += len(events)
        return counts

    def count_line(self, registry: ReferenceRegistry) -> str:
        counts = self.verified(registry)
        parts = ", ".join(f"{KIND_WORDS.get(k, k)} {n}" for k, n in sorted(counts.items()))
        return f"{sum(counts.values())} verified events ({parts})"

    async def care_day(self, registry: ReferenceRegistry, sim: SimChild, day_start: int) -> None:
        speed = self.options.speed
        length = DAY / speed
        self.say(f"   one simulated day takes {length:.0f} s (speed {speed:g}x)")
        deadline = time.monotonic() + length
        interval = max(1.0, length / 6)
        while True:
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            status = await sim.command(cmd="status")
            simulated = int(status["simulated_time"])
            hours = (simulated - day_start) / 3600
            scenario = status["scenario"]
            self.say(
                f"   +{hours:4.1f} h  {scenario['applied']:>4} actions at the devices; "
                f"registry: {self.count_line(registry)}"
            )
            if time.monotonic() >= deadline:
                break
        decisions = status["scenario"]["decisions"]
        words = ", ".join(f"{name} {n}" for name, n in sorted(decisions.items()))
        self.say(f"   key decisions at the devices: {words or 'none'}")
        if "KEY_UNKNOWN" in decisions:
            self.say("   (KEY_UNKNOWN: visits before the access list had arrived)")

    async def revoke(self, registry: ReferenceRegistry, sim: SimChild, key: int) -> None:
        now = int(time.time())
        self.say(f"   staff key {key} is reported lost; the registry revokes it on every device")
        answer = await registry.revoke(
            f"lost-key-{key}", [key], prune_after=now + 90 * DAY, expires_at=now + 30 * DAY,
            timeout=WAIT,
        )  # fmt: skip
        if answer.get("status") != "ok":
            msg = f"the gateway refused the revocation: {answer}"
            raise DemoError(msg)
        coverage = await self.watch(registry, f"lost-key-{key}", "revocation", len(self.kinds))
        self.revocation_coverage = (
            f"{coverage['applied']}/{len(self.kinds)} applied, {coverage['pending']} pending, "
            f"{coverage['unreachable']} unreachable"
        )
        self.say(f"   revocation applied on every device ({self.revocation_coverage})")
        door = sorted(d for d, k in self.kinds.items() if k == "door_lock")[0]
        status = await sim.command(cmd="status")
        reply = await sim.command(
            cmd="present_key",
            device_id=door,
            key_id=key,
            activation_expires_at=int(status["simulated_time"]) + 3600,
        )
        if reply["granted"] or reply["reason"] != "KEY_REVOKED":
            msg = f"the revoked key was not refused: {reply}"
            raise DemoError(msg)
        self.say(
            f"   key {key} presented at {self.device_words(door)}: refused ({reply['reason']})"
        )

        def refused() -> bool:
            return any(
                e["event"] == "ACCESS_DENIED"
                and e["reason"] == "KEY_REVOKED"
                and e["key_id"] == key
                for e in registry.events.get(door, {}).values()
            )

        await registry.wait_for(refused, WAIT, "the refusal at the registry")
        self.say("   the refusal reached the registry, verified: ACCESS_DENIED KEY_REVOKED")

    async def audit(
        self, root: Path, registry: ReferenceRegistry, lock: str, day_start: int
    ) -> None:
        def export() -> audit.AuditExport:
            # A second connection to the gateway's store, next to the running daemon.
            with Store.open(root / "state" / "lockgw.sqlite3") as store:
                return audit.export(
                    store,
                    parse_device_id(lock),
                    time_from=day_start,
                    time_to=day_start + DAY,
                    reveal_reason=None,
                    auditor="demo auditor",
                    now=time.time(),
                    topics=Topics("lockgw", GATEWAY_ID),
                )

        result = await asyncio.to_thread(export)
        stem = root / f"audit-{lock}"
        json_file, html_file = stem.with_suffix(".json"), stem.with_suffix(".html")
        json_file.write_text(audit.render(result, "json"), encoding="utf-8")
        html_file.write_text(audit.render(result, "html"), encoding="utf-8")
        self.files += [json_file, html_file]
        self.say(f"   {self.device_words(lock)}: {len(result.in_range)} records of the day")
        self.say(f"   wrote {json_file}")
        self.say(f"   wrote {html_file}")
        key = registry.registrations[lock].signing_key
        verification = audit.verify_file(json_file, key)
        self.say(
            f"   offline verification with the registered device key: {verification.summary()}"
        )
        if not verification.intact:
            msg = "the audit export did not verify"
            raise DemoError(msg)

    def summary(self, registry: ReferenceRegistry) -> None:
        counts = Counter(self.kinds.values())
        self.say(f"   devices: {len(self.kinds)} paired ({counted(counts)})")
        self.say(f"   events verified at the registry: {self.count_line(registry)}")
        failures = len(registry.failures)
        self.say(f"   batches refused by the registry: {failures}")
        self.say(f"   revocation coverage: {self.revocation_coverage}")
        kept = (
            "" if self.options.workdir else " (a temporary directory: use --workdir to keep them)"
        )
        self.say(f"   files written: {', '.join(str(f) for f in self.files)}{kept}")
        self.say(f"   took {time.monotonic() - self.started:.0f} s")
        if failures:
            msg = "the registry refused batches"
            raise DemoError(msg)


def online(registry: ReferenceRegistry) -> bool:
    status = registry.gateways.get(GATEWAY_ID)
    return status is not None and status.state == "online"


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = argparse.ArgumentParser(
        prog="python -m simulators.demo",
        description="A narrated walk through a care site in real processes: a Mosquitto "
        "broker, the device simulator, `lockgw run` and the reference registry. The "
        "gateway is installed with the lockgw CLI, a technician pairs every device, an "
        "access list is pushed, a day of care visits runs on an accelerated clock, a lost "
        "key is revoked fleet-wide and refused at a door, and a lock's log is exported and "
        "verified for an audit.",
    )
    parser.add_argument(
        "--residents", type=int, default=3, help="residents of the site (default 3)"
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=DEFAULT_SPEED,
        help=f"simulated seconds per real second (default {DEFAULT_SPEED:g}: a day in "
        f"{DAY / DEFAULT_SPEED:.0f} s)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the care-visit scenario")
    parser.add_argument(
        "--broker",
        metavar="mqtt://HOST:PORT",
        help="use this broker instead of starting Mosquitto as a child process",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep keys, configuration, logs and audit files here (default: a temporary "
        "directory, removed at the end)",
    )
    parser.add_argument(
        "--protocol-only",
        action="store_true",
        help="instead: the device protocol alone, end to end in one process",
    )
    parser.add_argument(
        "--mtu", type=int, default=23, help="with --protocol-only: ATT MTU of the link (23..517)"
    )
    args = parser.parse_args(argv)
    if not 23 <= args.mtu <= 517:
        parser.error("--mtu must be 23..517")
    if args.protocol_only:
        try:
            return Demo(out, mtu=args.mtu).run()
        except DemoError as exc:
            sys.stderr.write(f"demo failed: {exc}\n")
            return 1
    if not 1 <= args.residents <= 50:
        parser.error("--residents must be 1..50")
    if not 60 <= args.speed <= 1_000_000:
        parser.error("--speed must be 60..1000000")
    try:
        broker = None if args.broker is None else parse_broker(args.broker)
    except ValueError as exc:
        parser.error(str(exc))
    options = SiteOptions(args.residents, args.speed, broker, args.workdir, args.seed)
    try:
        return SiteDemo(out, options).run()
    except KeyboardInterrupt:
        out.write("\ninterrupted; every process stopped\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
