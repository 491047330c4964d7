"""Builders for protocol tests: an authority, a gateway, a device, and a pump between them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocols import PROTOCOL_VERSION
from protocols.enums import AlarmFlags, DeviceKind
from protocols.envelopes import Role, Scope, encode_certificate, issue_certificate
from protocols.identity import DeviceIdentity
from protocols.messages import DeviceHello, DeviceStatus, DoorState, LockState
from protocols.pairing import PairingCode
from protocols.session import (
    DeviceSessionConfig,
    GatewaySessionConfig,
    Session,
    SessionMode,
)

NOW = 1_800_000_000
SITE = 42


@dataclass
class World:
    """An organisation with one gateway and one device, built from fresh keys."""

    authority: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    gateway_signing: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    gateway_noise: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    device: DeviceIdentity = field(default_factory=DeviceIdentity.generate)
    code: PairingCode = field(default_factory=PairingCode.generate)

    def certificate(
        self,
        *,
        scope: Scope | None = None,
        not_before: int = NOW - 3600,
        not_after: int = NOW + 86400,
        issuer: Ed25519PrivateKey | None = None,
        noise_key: X25519PrivateKey | None = None,
        role: Role = Role.GATEWAY,
    ) -> bytes:
        return encode_certificate(
            issue_certificate(
                issuer or self.authority,
                role=role,
                subject="gw-test",
                serial=1,
                signing_key=self.gateway_signing.public_key(),
                noise_key=(noise_key or self.gateway_noise).public_key()
                if role is Role.GATEWAY
                else None,
                scope=scope if scope is not None else Scope(sites=frozenset({SITE})),
                not_before=not_before,
                not_after=not_after,
            )
        )

    def hello(self, *, paired: bool = True) -> DeviceHello:
        status = DeviceStatus(
            battery_percent=87,
            door=DoorState.CLOSED,
            lock=LockState.LOCKED,
            alarms=AlarmFlags.NONE,
            clock=NOW,
            time_floor=NOW - 60,
            access_version=3,
            revocation_version=5,
            next_sequence=10,
            oldest_sequence=0,
            records_waiting=10,
        )
        return DeviceHello(
            protocol_version=PROTOCOL_VERSION,
            kind=DeviceKind.DOOR_LOCK,
            device_id=self.device.device_id,
            signing_key=self.device.signing_public,
            binding_signature=self.device.binding_signature(),
            paired=paired,
            site_id=SITE if paired else 0,
            firmware="sim-1",
            status=status,
        )

    def gateway_session(self, *, mtu: int = 247, **changes: object) -> Session:
        config = GatewaySessionConfig(
            noise_key=self.gateway_noise,
            device_id=self.device.device_id,
            now=NOW,
            certificate=self.certificate(),
            pinned_signing_key=self.device.signing_public,
            pinned_noise_key=self.device.noise_public,
        )
        return Session.gateway(replace(config, **changes), mtu=mtu)  # type: ignore[arg-type]  # test override

    def pairing_gateway_session(self, code: PairingCode | None = None, mtu: int = 247) -> Session:
        config = GatewaySessionConfig(
            noise_key=self.gateway_noise,
            device_id=self.device.device_id,
            now=NOW,
            mode=SessionMode.PAIRING,
            pairing_code=code or self.code,
        )
        return Session.gateway(config, mtu=mtu)

    def device_session(self, *, paired: bool = True, mtu: int = 247, now: int = NOW) -> Session:
        config = DeviceSessionConfig(
            identity=self.device,
            hello=self.hello(paired=paired),
            now=now,
            authority_key=self.authority.public_key() if paired else None,
            pairing_code=None if paired else self.code,
        )
        return Session.device(config, mtu=mtu)


def pump(a: Session, b: Session, *, limit: int = 10_000) -> int:
    """Carry fragments both ways until neither side has anything to send; returns the count."""
    carried = 0
    for _ in range(limit):
        from_a, from_b = a.data_to_send(), b.data_to_send()
        if not from_a and not from_b:
            return carried
        for fragment in from_a:
            b.receive_fragment(fragment)
        for fragment in from_b:
            a.receive_fragment(fragment)
        carried += len(from_a) + len(from_b)
    msg = "sessions kept talking"
    raise AssertionError(msg)
