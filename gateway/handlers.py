"""What each verified registry command does.

The MQTT bridge has already checked signature, certificate, expiry, replay and argument
types, and built the authorisation update a ``revoke`` or ``set_access`` carries; here a
command becomes work: a signed update for the update service, a request in the
scheduler's queue for one device, or an answer from the store. Failures are typed
:class:`~gateway.commands.CommandError` answers; nothing is half-done.

The same handler serves the people at the gateway (through gateway.control): an audit
pull (:meth:`CommandHandler.pull`) and a technician's decommission, which is asked of the
registry (:meth:`CommandHandler.ask_decommission`) and carried out only when the registry
answers with a signed ``decommission`` command naming the request, while the technician
still waits; a ``decline`` ends the request instead.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Final

from gateway import audit
from gateway.commands import (
    Command,
    CommandError,
    DeclineArgs,
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
from gateway.store import DeviceRecord, OutboxMessage, Store
from gateway.topics import Topics
from gateway.updates import Priority, UpdateService
from gateway.worker import BlockingWorker
from protocols.envelopes import TargetKind
from protocols.errors import ProtocolError
from protocols.identity import format_device_id, parse_device_id
from protocols.messages import TimeSync, TimeSyncResult

NOT_FOUND: Final = "not_found"
DEVICE_ERROR: Final = "device_error"
LOG_VERIFICATION_FAILED: Final = "log_verification_failed"
NO_REQUEST: Final = "no_request"
DECLINED: Final = "declined"
INTERRUPTED: Final = "interrupted"
REGISTRY_TIMEOUT: Final = "registry_timeout"
PULL_COLLECT_TIMEOUT: Final = 30.0
"""Seconds an audit pull waits for the device's newest records before answering."""

_Handler = Callable[["CommandHandler", Command], Awaitable[dict[str, Any]]]
Progress = Callable[[str], None]
"""Told, in a few words, what a long operation is doing now (for the person waiting)."""


def _quiet(_step: str) -> None:
    pass


def _request_error(exc: BaseException) -> RequestError:
    """What the waiting technician is told when the decommission failed with ``exc``."""
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, CommandError):
        return RequestError(exc.code, exc.message)
    if isinstance(exc, DeviceError):
        return RequestError(DEVICE_ERROR, f"{exc.code.name}: {exc}")
    if isinstance(exc, LogCollectionError):
        return RequestError(LOG_VERIFICATION_FAILED, exc.error.code.name)
    return RequestError(
        INTERRUPTED,
        "the decommission was interrupted (the daemon stopping, or the command timing out); "
        "`lockgw devices` shows whether the device is still paired",
    )


class RequestError(Exception):
    """A technician's request ended without being carried out; ``code`` says why."""

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details or {})


@dataclass
class _Waiting:
    """A technician's request waiting for the registry's answer."""

    device_id: bytes
    progress: Progress
    answer: asyncio.Future[dict[str, Any]]
    started: bool = False
    moved: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the registry's answer arrives: the decommission starts, or is declined."""


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
    _waiting: dict[str, _Waiting] = field(default_factory=dict, init=False)

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
        target = command.update.target
        if target.kind is TargetKind.DEVICE:
            # The verifier checked fleet and site targets; whether the registry's scope
            # covers one device depends on the device's site, which only the store knows.
            assert target.device_id is not None
            device = await self.worker.run(self.store.get_device, target.device_id)
            if device is not None and not command.covers(device.device_id, device.site_id):
                raise CommandError(
                    ErrorCode.OUT_OF_SCOPE,
                    f"device {format_device_id(device.device_id)} is outside the registry's scope",
                )
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
        try:
            collected, exported = await self.pull(
                device,
                time_from=args.time_from,
                time_to=args.time_to,
                auditor=f"registry:{command.registry_subject}",
            )
        except audit.AuditError as exc:
            raise CommandError(ErrorCode.BAD_ARGS, str(exc)) from exc
        return {
            "device_id": format_device_id(device.device_id),
            "collected_from_device": collected,
            "export": exported.document,
        }

    async def pull(
        self,
        device: DeviceRecord,
        *,
        time_from: int,
        time_to: int,
        auditor: str,
        reveal_reason: str | None = None,
        fmt: audit.ExportFormat = "json",
        progress: Progress = _quiet,
    ) -> tuple[bool, audit.AuditExport]:
        """An audit pull: collect what waits on the device, then export from the store.

        Returns whether the device was reached, and the export (recorded on the audit
        topic like every export). A device out of reach is answered from the store: newer
        records may then still wait on it, and the first value says so.
        """
        if time_to < time_from:
            msg = "the range ends before it starts"
            raise audit.AuditError(msg)

        async def collect(session: DeviceSession, record: DeviceRecord) -> None:
            progress("collecting the newest records from the device")
            await self.pipeline.collect(session, record)

        progress("waiting for a radio slot to reach the device")
        collected = True
        try:
            # Newer records may wait on the device: collect first, but not for ever.
            async with asyncio.timeout(PULL_COLLECT_TIMEOUT):
                await self.scheduler.request(device.device_id, Priority.AUDIT_PULL, collect)
        except (DeviceError, TimeoutError):
            collected = False
            progress("the device could not be reached; exporting what the store holds")
        progress("verifying and exporting")
        exported = await self.worker.run(
            audit.export,
            self.store,
            device.device_id,
            time_from=time_from,
            time_to=time_to,
            reveal_reason=reveal_reason,
            auditor=auditor,
            now=time.time(),
            topics=self.topics,
            fmt=fmt,
        )
        self.scheduler.on_outbox()
        return collected, exported

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
        waiting = None
        if args.request_id is not None:
            waiting = self._waiting.get(args.request_id)
            if waiting is None or waiting.device_id != device.device_id or waiting.started:
                raise CommandError(
                    NO_REQUEST, f"no technician request {args.request_id} waits for this device"
                )
            waiting.started = True
            waiting.moved.set()
        progress = waiting.progress if waiting is not None else _quiet

        async def collect_then_reset(session: DeviceSession, record: DeviceRecord) -> None:
            # The door log is collected first: a reset device keeps nothing to collect later.
            progress("collecting the door log before the reset")
            await self.pipeline.collect(session, record)
            progress("resetting the device to its factory state")
            await decommission_device(
                session,
                record,
                reason=args.reason,
                store=self.store,
                worker=self.worker,
                topics=self.topics,
            )

        try:
            if waiting is not None:
                progress("the registry agreed; waiting for a radio slot to reach the device")
            await self.scheduler.request(device.device_id, Priority.PAIRING, collect_then_reset)
            await self.scheduler.reload()
        except BaseException as exc:
            if waiting is not None and not waiting.answer.done():
                waiting.answer.set_exception(_request_error(exc))
            raise
        self.scheduler.on_outbox()
        result = {"device_id": format_device_id(device.device_id), "decommissioned": True}
        if waiting is not None and not waiting.answer.done():
            waiting.answer.set_result({**result, "reason": args.reason})
        return result

    async def _decline(self, command: Command) -> dict[str, Any]:
        args = command.args
        assert isinstance(args, DeclineArgs)
        waiting = self._waiting.get(args.request_id)
        if waiting is None or waiting.started or waiting.answer.done():
            raise CommandError(NO_REQUEST, f"no technician request {args.request_id} waits")
        waiting.answer.set_exception(
            RequestError(DECLINED, args.reason, {"needed_by": list(args.needed_by)})
        )
        waiting.moved.set()
        return {"request_id": args.request_id, "declined": True}

    async def ask_decommission(
        self,
        device_id: bytes,
        *,
        reason: str,
        override: str | None,
        requested_by: str,
        timeout: float,  # noqa: ASYNC109 - how long the technician waits for the registry
        progress: Progress = _quiet,
    ) -> dict[str, Any]:
        """A technician's decommission: ask the registry, and do it if it agrees.

        The request goes out on the ``requests`` topic; the registry checks whether any
        other service still needs the lock and answers with a signed ``decommission``
        (carried out here, with the door log collected first) or a ``decline``
        (:class:`RequestError` ``declined``). ``override`` is the reason to go ahead even
        if another service needs the lock; the registry decides whether it accepts it.
        Without an answer within ``timeout`` nothing is done (``RequestError``
        ``registry_timeout``), and a later answer is refused.
        """
        device = await self.worker.run(self.store.get_device, device_id)
        if device is None or device.decommissioned_at is not None:
            msg = f"device {format_device_id(device_id)} is not paired here"
            raise RequestError(NOT_FOUND, msg)
        request_id = uuid.uuid4().hex
        now = time.time()
        body = {
            "request_id": request_id,
            "gateway": self.topics.gateway_id,
            "op": "decommission",
            "device_id": format_device_id(device_id),
            "reason": reason,
            "override": override,
            "requested_by": requested_by,
            "time": now,
            "expires_at": now + timeout,
        }
        message = OutboxMessage(
            topic=self.topics.requests,
            payload=json.dumps(body, separators=(",", ":")).encode(),
            kind="request",
        )
        waiting = _Waiting(device_id, progress, asyncio.get_running_loop().create_future())
        self._waiting[request_id] = waiting
        try:
            await self.worker.run(self.store.enqueue, [message], now=now)
            self.scheduler.on_outbox()
            progress("asking the registry whether another service still needs the lock")
            try:
                async with asyncio.timeout(timeout):
                    await waiting.moved.wait()
            except TimeoutError:
                msg = (
                    f"the registry did not answer within {timeout:g} s; nothing was changed "
                    "(is the gateway connected to the broker?)"
                )
                raise RequestError(REGISTRY_TIMEOUT, msg) from None
            # Once the decommission has started it is seen through, however long it takes.
            return await waiting.answer
        finally:
            del self._waiting[request_id]

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
            "decline": _decline,
        }
    )
