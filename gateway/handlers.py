"""What each verified registry command does.

The MQTT bridge has already checked signature, certificate, expiry, replay and argument
types, and built the authorisation update a ``revoke`` or ``set_access`` carries; here a
command becomes work: a signed update for the update service, a request in the
scheduler's queue for one device, or an answer from the store. Failures are typed
:class:`~gateway.commands.CommandError` answers; nothing is half-done.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Final

from gateway import audit
from gateway.commands import (
    Command,
    CommandError,
    DecommissionArgs,
    ErrorCode,
    GetStateArgs,
    PullLogsArgs,
    RegisterArgs,
    TimeSyncArgs,
)
from gateway.device_session import DeviceError, DeviceSession
from gateway.metrics import Metrics
from gateway.pairing import decommission_device
from gateway.pipeline import LogCollectionError, LogPipeline
from gateway.scheduler import Scheduler, state_payload
from gateway.store import DeviceRecord, Store
from gateway.topics import Topics
from gateway.updates import Priority, UpdateService
from gateway.worker import BlockingWorker
from protocols.errors import ProtocolError
from protocols.identity import format_device_id, parse_device_id
from protocols.messages import TimeSync, TimeSyncResult

NOT_FOUND: Final = "not_found"
DEVICE_ERROR: Final = "device_error"
LOG_VERIFICATION_FAILED: Final = "log_verification_failed"
PULL_COLLECT_TIMEOUT: Final = 30.0
"""Seconds an audit pull waits for the device's newest records before answering."""

_Handler = Callable[["CommandHandler", Command], Awaitable[dict[str, Any]]]


@dataclass
class CommandHandler:
    """Carries out verified commands; one instance serves the bridge for the daemon's life."""

    store: Store
    worker: BlockingWorker
    scheduler: Scheduler
    updates: UpdateService
    pipeline: LogPipeline
    topics: Topics
    metrics: Metrics | None = None

    async def __call__(self, command: Command) -> dict[str, Any]:
        try:
            result = await self._carry_out(command)
        except CommandError:
            if self.metrics is not None:
                self.metrics.command(command.op, "failed")
            raise
        if self.metrics is not None:
            self.metrics.command(command.op, "ok")
        return result

    async def _carry_out(self, command: Command) -> dict[str, Any]:
        try:
            if command.update is not None:
                return await self._submit(command)
            handler = self._HANDLERS.get(command.op)
            if handler is None:
                raise CommandError(ErrorCode.UNKNOWN_OP, f"no operation {command.op!r}")
            result: dict[str, Any] = await handler(self, command)
        except DeviceError as exc:
            raise CommandError(DEVICE_ERROR, f"{exc.code.name}: {exc}") from exc
        except LogCollectionError as exc:
            raise CommandError(LOG_VERIFICATION_FAILED, exc.error.code.name) from exc
        except ProtocolError as exc:
            raise CommandError(ErrorCode.BAD_ARGS, exc.message) from exc
        return result

    # -- updates ---------------------------------------------------------------------------

    async def _submit(self, command: Command) -> dict[str, Any]:
        assert command.update is not None  # only revoke and set_access carry one
        update_id: str = command.args.update_id  # type: ignore[union-attr]  # both carry it
        devices = await self.updates.submit(update_id, command.update)
        await self.scheduler.reload()
        return {
            "update_id": update_id,
            "devices": [format_device_id(device_id) for device_id in devices],
            "state": "pending",
        }

    # -- one device ------------------------------------------------------------------------

    async def _pull_logs(self, command: Command) -> dict[str, Any]:
        args = command.args
        assert isinstance(args, PullLogsArgs)
        device = await self._device(command, args.device_id)

        async def collect(session: DeviceSession, record: DeviceRecord) -> None:
            await self.pipeline.collect(session, record)

        collected = True
        try:
            # Newer records may wait on the device: collect first, but not for ever; a lock
            # out of reach is answered from the store, and the answer says so.
            async with asyncio.timeout(PULL_COLLECT_TIMEOUT):
                await self.scheduler.request(device.device_id, Priority.AUDIT_PULL, collect)
        except (DeviceError, TimeoutError):
            collected = False
        try:
            exported = await self.worker.run(
                audit.export,
                self.store,
                device.device_id,
                time_from=args.time_from,
                time_to=args.time_to,
                reveal_reason=None,
                auditor=f"registry:{command.registry_subject}",
                now=time.time(),
                topics=self.topics,
            )
        except audit.AuditError as exc:
            raise CommandError(ErrorCode.BAD_ARGS, str(exc)) from exc
        return {
            "device_id": format_device_id(device.device_id),
            "collected_from_device": collected,
            "export": exported.document,
        }

    async def _time_sync(self, command: Command) -> dict[str, Any]:
        args = command.args
        assert isinstance(args, TimeSyncArgs)
        devices = await self._devices(command, args.device_id)

        async def sync(session: DeviceSession, _record: DeviceRecord) -> int:
            now_ms = round(time.time() * 1000)
            result = await session.request(TimeSync(gateway_time_ms=now_ms), TimeSyncResult)
            return result.device_time_before_ms - now_ms

        drifts: dict[str, int | str] = {}
        for device in devices:
            key = format_device_id(device.device_id)
            try:
                drifts[key] = await self.scheduler.request(device.device_id, Priority.STATUS, sync)
            except DeviceError as exc:
                drifts[key] = exc.code.name
        return {"drift_ms": drifts}

    async def _get_state(self, command: Command) -> dict[str, Any]:
        args = command.args
        assert isinstance(args, GetStateArgs)
        devices = await self._devices(command, args.device_id)
        return {
            "devices": [
                json.loads(state_payload(self.topics.gateway_id, device)) for device in devices
            ]
        }

    async def _register(self, command: Command) -> dict[str, Any]:
        args = command.args
        assert isinstance(args, RegisterArgs)
        device = await self._device(command, args.device_id)
        return {"device_id": format_device_id(device.device_id), "registered": True}

    async def _decommission(self, command: Command) -> dict[str, Any]:
        args = command.args
        assert isinstance(args, DecommissionArgs)
        device = await self._device(command, args.device_id)

        async def collect_then_reset(session: DeviceSession, record: DeviceRecord) -> None:
            # The door log is collected first: a reset device keeps nothing to collect later.
            await self.pipeline.collect(session, record)
            await decommission_device(
                session,
                record,
                reason=args.reason,
                store=self.store,
                worker=self.worker,
                topics=self.topics,
            )

        await self.scheduler.request(device.device_id, Priority.PAIRING, collect_then_reset)
        await self.scheduler.reload()
        return {"device_id": format_device_id(device.device_id), "decommissioned": True}

    # -- helpers ---------------------------------------------------------------------------

    async def _device(self, command: Command, device_hex: str) -> DeviceRecord:
        try:
            device_id = parse_device_id(device_hex)
        except ProtocolError as exc:
            raise CommandError(ErrorCode.BAD_ARGS, exc.message) from exc
        device = await self.worker.run(self.store.get_device, device_id)
        if device is None or device.decommissioned_at is not None:
            raise CommandError(NOT_FOUND, f"device {device_hex} is not paired here")
        if not command.covers(device.device_id, device.site_id):
            raise CommandError(
                ErrorCode.OUT_OF_SCOPE, f"device {device_hex} is outside the registry's scope"
            )
        return device

    async def _devices(self, command: Command, device_hex: str | None) -> list[DeviceRecord]:
        if device_hex is not None:
            return [await self._device(command, device_hex)]
        devices = await self.worker.run(self.store.list_devices)
        return [device for device in devices if command.covers(device.device_id, device.site_id)]

    _HANDLERS: ClassVar[Mapping[str, _Handler]] = MappingProxyType(
        {
            "pull_logs": _pull_logs,
            "time_sync": _time_sync,
            "get_state": _get_state,
            "register": _register,
            "decommission": _decommission,
        }
    )
