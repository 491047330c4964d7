"""Replayed radio frames: captured over Bumble's virtual radio, replayed, never accepted.

The frames a gateway wrote in real sessions (the gateway's DeviceSession and a simulated
lock, over the virtual radio) are captured at the radio link and written again: in the
same session, in a new session with the same lock, and to another lock. A frame is
*accepted* if the lock hands a request in it to its application (counted by wrapping the
lock's request handler), so the count must stay 0; every replay must end the session with
the protocol's code. (The MQTT command replays are in test_attacks_commands.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Final

import pytest

from gateway.device_session import DeviceSession
from gateway.radio.base import Link
from protocols.enums import DeviceKind
from protocols.errors import ErrorCode
from protocols.messages import AuthUpdate, Message, Status, StatusRequest, UpdateResult
from protocols.session import GatewaySessionConfig, SessionMode
from simulators.node import Fleet, SimulatedDevice
from tests.gateway import test_core
from tests.gateway.test_core import Gateway, started
from tests.reliability.conftest import Figures
from tests.reliability.test_attacks_updates import access_update, signed

FRAMES: Final = ("handshake_1", "handshake_3", "status_request", "auth_update", "status_again")
"""The captured session's messages, in order."""
SETTLE: Final = 0.3
"""Seconds a lock is given to process an injected frame."""


class RecordingLink(Link):
    """A link that keeps every fragment the gateway writes, and can inject others."""

    def __init__(self, inner: Link) -> None:
        self.inner = inner
        self.written: list[bytes] = []

    @property
    def address(self) -> str:
        return self.inner.address

    @property
    def mtu(self) -> int:
        return self.inner.mtu

    @property
    def is_connected(self) -> bool:
        return self.inner.is_connected

    async def write(self, fragment: bytes) -> None:
        self.written.append(bytes(fragment))
        await self.inner.write(fragment)

    async def receive(self) -> bytes:
        return await self.inner.receive()

    async def disconnect(self) -> None:
        await self.inner.disconnect()

    def add_disconnect_callback(self, callback: Callable[[], None]) -> None:
        self.inner.add_disconnect_callback(callback)

    def messages(self) -> list[list[bytes]]:
        """The written fragments grouped into framed messages (FIRST bit starts one)."""
        grouped: list[list[bytes]] = []
        for fragment in self.written:
            if fragment[0] & 0x80:
                grouped.append([])
            grouped[-1].append(fragment)
        return grouped


# The gateway's own radio, store and services over the virtual radio, as the core tests
# use them (tests/gateway/test_core.py).
fleet = test_core.fleet
gateway = test_core.gateway


async def open_session(gateway: Gateway, lock: SimulatedDevice) -> DeviceSession:
    """A normal session, as the scheduler opens one, over a recording link."""
    record = await gateway.worker.run(gateway.store.get_device, lock.device_id)
    assert record is not None
    link = RecordingLink(await gateway.radio.connect(lock.address, mtu=247, timeout=5.0))
    config = GatewaySessionConfig(
        noise_key=gateway.credentials.keys.noise_key,
        device_id=record.device_id,
        now=int(time.time()),
        mode=SessionMode.NORMAL,
        certificate=gateway.credentials.certificate_bytes,
        pinned_signing_key=record.signing_key,
        pinned_noise_key=record.noise_key,
    )
    session = DeviceSession(link, config, timeout=5.0)
    await session.open()
    return session


def count_requests(lock: SimulatedDevice, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count every request the lock's application handles (what a replay must not reach)."""
    handled: Counter[str] = Counter()
    original = lock.device.handle

    def handle(message: Message, *, mode: SessionMode) -> Message:
        handled[type(message).__name__] += 1
        return original(message, mode=mode)

    monkeypatch.setattr(lock.device, "handle", handle)
    return handled


async def inject(session: DeviceSession, frames: list[list[bytes]]) -> None:
    link = session.link
    assert isinstance(link, RecordingLink)
    for message in frames:
        for fragment in message:
            await link.inner.write(fragment)
    await asyncio.sleep(SETTLE)


async def test_replayed_radio_frames_are_never_accepted(
    gateway: Gateway, fleet: Fleet, monkeypatch: pytest.MonkeyPatch, figures: Figures
) -> None:
    lock, other = await started(fleet, DeviceKind.DOOR_LOCK, 2)
    await gateway.pair(lock)
    await gateway.pair(other)
    handled = {lock.device_id: count_requests(lock, monkeypatch)}
    handled[other.device_id] = count_requests(other, monkeypatch)

    async def work(session: DeviceSession, version: int) -> None:
        """A session's requests: status, an access list, status again."""
        await session.request(StatusRequest(), Status)
        update = signed(gateway, access_update(lock.device_id, version))
        await session.request(AuthUpdate(update=update), UpdateResult)
        await session.request(StatusRequest(), Status)

    # The capture: one whole session with the lock.
    session = await open_session(gateway, lock)
    try:
        await work(session, 1)
    finally:
        await session.close()
    assert isinstance(session.link, RecordingLink)
    captured = session.link.messages()
    assert len(captured) == 5  # handshake 1 and 3, three requests
    assert lock.device.access.access_version == 1

    outcomes: dict[str, Counter[str]] = {"same": Counter(), "new": Counter(), "other": Counter()}
    attempts = 0
    accepted = 0

    async def attempt(where: str, target: SimulatedDevice, frames: list[list[bytes]],
                      session: DeviceSession) -> None:  # fmt: skip
        nonlocal attempts, accepted
        counter = handled[target.device_id]
        before = sum(counter.values())
        target.last_failure = None
        try:
            await inject(session, frames)
        finally:
            await session.close()
        attempts += 1
        accepted += sum(counter.values()) - before
        code = target.last_failure
        frame = FRAMES[len(outcomes[where])]
        outcomes[where][f"{frame}:{code.name if code is not None else None}"] += 1
        assert code in {ErrorCode.DECRYPT_FAILED, ErrorCode.UNEXPECTED_MESSAGE}, (where, code)

    # 1. In the same session: each of its own frames written again after the session's work.
    for index in range(len(captured)):
        session = await open_session(gateway, lock)
        await work(session, 2 + index)
        assert isinstance(session.link, RecordingLink)
        own = session.link.messages()
        await attempt("same", lock, [own[index]], session)
    # 2. In a new session with the same lock, and 3. against another lock.
    for where, target in (("new", lock), ("other", other)):
        for frame in captured:
            session = await open_session(gateway, target)
            # Once the lock has confirmed the handshake (open() returns as the gateway
            # writes its last handshake message, which the injection must not overtake).
            await session.request(StatusRequest(), Status)
            await attempt(where, target, [frame], session)

    # 4. A whole captured session replayed on a bare connection, to both locks: the lock
    # answers the replayed first message with a fresh ephemeral key, so the replayed third
    # one cannot decrypt, and nothing after it is read.
    whole: Counter[str] = Counter()
    for target in (lock, other):
        counter = handled[target.device_id]
        before = sum(counter.values())
        target.last_failure = None
        link = await gateway.radio.connect(target.address, mtu=247, timeout=5.0)
        try:
            for message in captured:
                for fragment in message:
                    await link.write(fragment)
            await asyncio.sleep(SETTLE)
        finally:
            await link.disconnect()
        attempts += 1
        accepted += sum(counter.values()) - before
        code = target.last_failure
        whole[code.name if code is not None else "none"] += 1
        assert code in {ErrorCode.HANDSHAKE_FAILED, ErrorCode.DECRYPT_FAILED}, code

    assert accepted == 0
    # The replays left the lists where the real sessions put them.
    assert lock.device.access.access_version == 1 + len(captured)
    assert other.device.access.access_version == 0
    figures(
        "replay",
        channel="radio",
        capture="gateway DeviceSession over the Bumble virtual radio",
        attempts=attempts,
        accepted=accepted,
        per_place={where: sum(c.values()) for where, c in outcomes.items()}
        | {"whole_session": sum(whole.values())},
        codes={where: dict(c) for where, c in outcomes.items()} | {"whole_session": dict(whole)},
    )
