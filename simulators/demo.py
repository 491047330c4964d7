"""A walk through the device protocol, end to end in one process.

A gateway pairs a simulated door lock with the code from its label, provisions it, opens
a certificate-checked session, pushes a signed access list and a revocation, and collects
and verifies the lock's event log. Both ends run the real protocol code; only the radio is
replaced by a pipe that carries the same ATT fragments. Keys and pairing codes are never
printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TextIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

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
from protocols.identity import format_device_id
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
from protocols.pairing import PairingCode
from protocols.session import (
    GatewaySessionConfig,
    HandshakeComplete,
    MessageReceived,
    Session,
    SessionFailed,
    SessionMode,
)
from simulators.device import DeviceConnection, VirtualDevice

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.demo", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "--mtu", type=int, default=23, help="ATT MTU of the simulated link (23..517)"
    )
    args = parser.parse_args(argv)
    if not 23 <= args.mtu <= 517:
        parser.error("--mtu must be 23..517")
    try:
        return Demo(sys.stdout, mtu=args.mtu).run()
    except DemoError as exc:
        sys.stderr.write(f"demo failed: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
