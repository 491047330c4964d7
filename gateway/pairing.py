"""Pairing a newly mounted device, and decommissioning one.

Pairing runs a Noise_XXpsk3 session keyed by the code on the device's label, pins the
device's keys, provisions the trust anchor and the site, stores the device, and queues the
registration for the registry in the same transaction: if the broker is away, the
registration waits in the outbox and nothing is lost. A wrong code leaves the device
unpaired and the store untouched.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from gateway.device_session import DeviceSession
from gateway.keys import GatewayCredentials
from gateway.radio.base import Radio
from gateway.store import DeviceRecord, OutboxMessage, Store
from gateway.topics import Topics
from gateway.worker import BlockingWorker
from protocols.identity import format_device_id
from protocols.logrecords import chain_genesis
from protocols.messages import Decommission, Decommissioned, Provision, Provisioned
from protocols.pairing import PairingCode
from protocols.session import GatewaySessionConfig, SessionMode


@dataclass(frozen=True)
class WorkOrder:
    """Why a device is being paired: the work order and the property owner's consent."""

    work_order: str
    consent_reference: str

    def __post_init__(self) -> None:
        if not self.work_order.strip() or not self.consent_reference.strip():
            msg = "pairing needs a work order and the property owner's consent reference"
            raise ValueError(msg)


@dataclass(frozen=True)
class PairingResult:
    device: DeviceRecord
    firmware: str


async def pair_device(
    *,
    radio: Radio,
    address: str,
    device_id: bytes,
    code: PairingCode,
    site_id: int,
    order: WorkOrder,
    credentials: GatewayCredentials,
    store: Store,
    worker: BlockingWorker,
    topics: Topics,
    mtu: int = 517,
    request_timeout: float = 15.0,
) -> PairingResult:
    """Pair the device at ``address``; raises a DeviceError subclass when it does not."""
    now = time.time()
    link = await radio.connect(address, mtu=mtu, timeout=request_timeout)
    config = GatewaySessionConfig(
        noise_key=credentials.keys.noise_key,
        device_id=device_id,
        now=int(now),
        mode=SessionMode.PAIRING,
        pairing_code=code,
    )
    async with DeviceSession(link, config, timeout=request_timeout) as session:
        hello = session.device
        assert hello is not None  # set by open()
        record = DeviceRecord(
            device_id=device_id,
            kind=int(hello.kind),
            address=address,
            signing_key=hello.signing_key,
            noise_key=link_noise_key(session),
            site_id=site_id,
            paired_at=int(now),
            chain_next_sequence=0,
            chain_head=chain_genesis(device_id),
            reachable=True,
            last_heard=now,
        )
        registration = OutboxMessage(
            topic=topics.registrations,
            payload=registration_payload(topics.gateway_id, "registered", record, order, now),
            kind="registration",
        )

        async def provision_and_store() -> None:
            await session.request(
                Provision(
                    device_id=device_id,
                    authority_key=credentials.authority_key.public_bytes_raw(),
                    site_id=site_id,
                    time=int(now),
                ),
                Provisioned,
            )
            await worker.run(_store_pairing, store, record, registration, now)

        await _uninterrupted(provision_and_store())
    return PairingResult(device=record, firmware=hello.firmware)


async def _uninterrupted(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` to its end even if the caller is cancelled meanwhile (a Ctrl-C).

    Once the device is provisioned the gateway must have pinned its keys, or the lock is
    paired to a gateway that cannot talk to it; the interruption waits for both steps
    (bounded by the session's idle timeout) and is raised after them.
    """
    task = asyncio.create_task(work)
    cancelled = False
    while True:
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            cancelled = True
            continue
        if cancelled:
            raise asyncio.CancelledError
        return


def _store_pairing(store: Store, record: DeviceRecord, message: OutboxMessage, now: float) -> None:
    store.upsert_device(record)
    store.enqueue([message], now=now)


def link_noise_key(session: DeviceSession) -> bytes:
    """The device's Noise static key, as authenticated by the handshake just completed."""
    remote = session.session.peer_static_key
    assert remote is not None  # known once the handshake completed
    return remote


async def decommission_device(
    session: DeviceSession,
    device: DeviceRecord,
    *,
    reason: str,
    store: Store,
    worker: BlockingWorker,
    topics: Topics,
) -> None:
    """Reset the device to its factory state and de-register it, in a normal session."""
    await session.request(Decommission(device_id=device.device_id), Decommissioned)
    now = time.time()
    order = WorkOrder(work_order="decommission", consent_reference=reason)
    message = OutboxMessage(
        topic=topics.registrations,
        payload=registration_payload(topics.gateway_id, "decommissioned", device, order, now),
        kind="registration",
    )

    def store_decommission() -> None:
        store.mark_decommissioned(device.device_id, now)
        store.enqueue([message], now=now)

    await worker.run(store_decommission)


def registration_payload(
    gateway_id: str, action: str, device: DeviceRecord, order: WorkOrder, now: float
) -> bytes:
    body = {
        "message_id": f"{gateway_id}:{action}:{format_device_id(device.device_id)}:{int(now)}",
        "gateway": gateway_id,
        "action": action,
        "device_id": format_device_id(device.device_id),
        "kind": device.kind,
        "signing_key": device.signing_key.hex(),
        "noise_key": device.noise_key.hex(),
        "site_id": device.site_id,
        "work_order": order.work_order,
        "consent_reference": order.consent_reference,
        "time": now,
    }
    return json.dumps(body, separators=(",", ":")).encode()
