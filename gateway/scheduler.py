"""Which device to connect to next, in a bounded number of connection slots.

BLE adapters hold a handful of simultaneous connections (BlueZ typically five), and every
connection costs the device battery. So the gateway decides from adverts alone whether a
device needs a visit (an older list version than one it must push, log records waiting,
a change in its alarms, a routine status visit that is due), gives every free slot to the
most urgent device (revocations, then pairing, access updates, audit pulls, log
collection, status), and does all of a device's pending work in that one connection.

A central sets up one connection at a time, and a device can only be connected to just
after one of its adverts. So the scheduler starts the next connection only when the last
one is up, and among equally urgent devices picks the one whose next advert is due
soonest (each device's advertising interval is learnt from its adverts): the wait for an
advert is then a fraction of an interval instead of half of one on average, which is
what bounds a fleet revocation (bench/revocation.py).

Failures back off per device with full jitter; a device not heard for
``unreachable_after`` is reported unreachable, and its pending updates with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from gateway.device_session import (
    DeviceError,
    DeviceSession,
    DeviceUnavailable,
    RequestRefused,
    SessionError,
)
from gateway.keys import GatewayCredentials
from gateway.metrics import Metrics
from gateway.pipeline import LogCollectionError, LogPipeline, alarm_payload
from gateway.radio.base import Radio, RadioError, ScanResult
from gateway.store import DeviceRecord, OutboxMessage, PropagationState, Store
from gateway.topics import Topics
from gateway.updates import Priority, UpdateService
from gateway.worker import BlockingWorker
from protocols.advert import Advert, decode_manufacturer_payload
from protocols.enums import AlarmFlags, DeviceKind
from protocols.errors import ErrorCode, ProtocolError
from protocols.gatt import COMPANY_ID
from protocols.identity import format_device_id
from protocols.messages import (
    DeviceStatus,
    DoorState,
    LockState,
    Status,
    StatusRequest,
    TimeSync,
    TimeSyncResult,
)
from protocols.session import GatewaySessionConfig, SessionMode

log = structlog.get_logger(__name__)

TICK: Final = 1.0
CONNECT_LEAD: Final = 0.02
"""Seconds a connection request needs before the advert it is to catch: an advert due
sooner than this is taken as missed, and the one after it is waited for."""
MIN_ADVERTISING_INTERVAL: Final = 0.02
"""The shortest advertising interval BLE allows (Core spec Vol 6 Part B 4.4.2.2); two
reports closer than this are one advert heard twice, not an interval."""
UNKNOWN_ADVERT_WAIT: Final = 0.5
"""The expected wait for the advert of a device whose interval is not known yet."""
"""Seconds between scheduling rounds when nothing wakes the scheduler sooner."""

Job = Callable[[DeviceSession, DeviceRecord], Awaitable[Any]]


@dataclass(frozen=True)
class SchedulerSettings:
    slots: int = 5
    mtu: int = 517
    connect_timeout: float = 10.0
    idle_timeout: float = 5.0
    max_session: float = 60.0
    unreachable_after: float = 6 * 3600.0
    backoff_initial: float = 5.0
    backoff_max: float = 600.0
    routine_interval: float = 12 * 3600.0
    clock_drift_threshold: float = 30.0


@dataclass(order=True)
class _Request:
    """Work asked for from outside (an audit pull, a status, a time sync)."""

    priority: int
    sequence: int
    job: Job = field(compare=False)
    future: asyncio.Future[Any] = field(compare=False)


@dataclass
class DeviceView:
    """The scheduler's live picture of one paired device."""

    device_id: bytes
    address: str | None = None
    advert: Advert | None = None
    advert_time: float = 0.0
    advert_interval: float = 0.0
    """The device's advertising interval as learnt from its adverts (0: not yet known)."""
    last_heard: float | None = None
    last_session: float = 0.0
    failures: int = 0
    backoff_until: float = 0.0
    busy: bool = False
    holds_slot: bool = False
    """A connection slot is taken for this device (busy, and not yet disconnected)."""
    visited_alarms: AlarmFlags | None = None
    clock_behind_reported: bool = False
    unreachable: bool = False
    requests: list[_Request] = field(default_factory=list)


class Scheduler:
    """Owns the connection slots; everything that talks to paired devices goes through it."""

    def __init__(
        self,
        *,
        radio: Radio,
        store: Store,
        worker: BlockingWorker,
        credentials: GatewayCredentials,
        pipeline: LogPipeline,
        updates: UpdateService,
        topics: Topics,
        settings: SchedulerSettings,
        on_outbox: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.radio = radio
        self.store = store
        self.worker = worker
        self.credentials = credentials
        self.pipeline = pipeline
        self.updates = updates
        self.topics = topics
        self.settings = settings
        self.on_outbox = on_outbox
        self.clock = clock
        self.views: dict[bytes, DeviceView] = {}
        self._busy = 0
        self._connecting: DeviceView | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._sequence = 0
        self._pending_versions: dict[bytes, dict[int, int]] = {}
        self._random = random.Random()  # noqa: S311 - jitter, not a secret

    # -- entry points ----------------------------------------------------------------------

    async def run(self) -> None:
        """Scan, dispatch and watch reachability until cancelled."""
        await self.reload()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._scan(), name="scan")
                tasks.create_task(self._dispatch(), name="dispatch")
                tasks.create_task(self._watch_reachability(), name="reachability")
        finally:
            # Sessions in flight end with the scheduler; their devices keep their records
            # until the next visit acknowledges them, so nothing is lost.
            for task in self._running:
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    async def reload(self) -> None:
        """Re-read paired devices and pending updates from the store (after a change)."""
        devices = await self.worker.run(self.store.list_devices)
        now = self.clock()
        for device in devices:
            view = self.views.get(device.device_id)
            if view is None:
                view = DeviceView(device.device_id, last_session=device.last_heard or 0.0)
                view.unreachable = not device.reachable and device.last_heard is not None
                self.views[device.device_id] = view
            view.address = view.address or device.address or None
            # A device never heard since start-up starts its unreachability clock now.
            view.last_heard = view.last_heard or device.last_heard or now
        known = {device.device_id for device in devices}
        for device_id in [device_id for device_id in self.views if device_id not in known]:
            del self.views[device_id]
        await self._refresh_pending()
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def on_advert(self, result: ScanResult) -> None:
        payload = result.manufacturer_data.get(COMPANY_ID)
        if payload is None:
            return
        try:
            advert = decode_manufacturer_payload(payload)
        except ProtocolError:
            log.warning("advert_malformed", address=result.address)
            return
        view = None if advert.pairing_mode else self.views.get(advert.device_id)
        if view is None:
            return  # waiting to be paired, paired elsewhere, or not registered here
        now = self.clock()
        gap = now - view.advert_time
        if view.advert_time and gap >= MIN_ADVERTISING_INTERVAL:
            # The shortest gap seen is the interval (a missed advert makes a gap of two),
            # allowed to grow slowly in case the device advertises less often from now on.
            known = view.advert_interval
            view.advert_interval = gap if not known else min(gap, known * 1.05)
        view.address, view.advert, view.advert_time, view.last_heard = (
            result.address,
            advert,
            now,
            now,
        )
        if self._need(view, now) is not None or view.unreachable:
            self.wake()

    async def request(self, device_id: bytes, priority: Priority, job: Job) -> Any:
        """Run ``job`` in the next session with ``device_id``; returns its result."""
        view = self.views.get(device_id)
        if view is None:
            msg = f"device {format_device_id(device_id)} is not paired to this gateway"
            raise KeyError(msg)
        self._sequence += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        view.requests.append(_Request(int(priority), self._sequence, job, future))
        view.requests.sort()
        self.wake()
        return await future

    @property
    def busy_slots(self) -> int:
        return self._busy

    # -- loops -----------------------------------------------------------------------------

    async def _scan(self) -> None:
        while True:
            try:
                async with contextlib.aclosing(self.radio.scan()) as results:
                    async for result in results:
                        self.on_advert(result)
            except RadioError as exc:
                log.warning("scan_failed", error=str(exc))
                await asyncio.sleep(self.settings.backoff_initial)

    async def _dispatch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK):
                    await self._wake.wait()
            self._wake.clear()
            # One connection is set up at a time (the radio's initiator is one), so the
            # next device is chosen when the last connection is up, by its next advert.
            if self._busy < self.settings.slots and self._connecting is None:
                view = self._next_device(self.clock())
                if view is not None:
                    view.busy = view.holds_slot = True
                    self._connecting = view
                    self._start(self._visit(view), f"visit {view.address}")

    def _start(self, work: Coroutine[Any, Any, None], name: str) -> None:
        self._busy += 1
        task = asyncio.create_task(work, name=name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _next_device(self, now: float) -> DeviceView | None:
        """The most urgent device; among equals, the one whose next advert comes first."""
        best: tuple[int, float, float] | None = None
        chosen = None
        for view in self.views.values():
            if view.busy or view.address is None or view.backoff_until > now:
                continue
            need = self._need(view, now)
            if need is None:
                continue
            key = (need, self._advert_wait(view, now), view.last_session)
            if best is None or key < best:
                best, chosen = key, view
        return chosen

    @staticmethod
    def _advert_wait(view: DeviceView, now: float) -> float:
        """Seconds until the device's next advert a connection request can still catch."""
        interval = view.advert_interval
        if not interval:
            return UNKNOWN_ADVERT_WAIT
        since = now + CONNECT_LEAD - view.advert_time
        return (math.ceil(since / interval) * interval) - (now - view.advert_time)

    def _connected(self, view: DeviceView) -> None:
        """The connection to ``view`` is up (or failed): the next may be set up."""
        if self._connecting is view:
            self._connecting = None
            self.wake()

    def _need(self, view: DeviceView, now: float) -> int | None:
        """The most urgent reason to visit ``view`` now, or None to let it sleep."""
        needs: list[int] = []
        if view.requests:
            needs.append(view.requests[0].priority)
        for kind_priority, version in self._pending_versions.get(view.device_id, {}).items():
            if view.advert is None or self._held(view.advert, kind_priority) < version:
                needs.append(kind_priority)
        # An advert heard before the last visit ended describes the device as it was then
        # (records since collected, alarms since read): acting on it would wake the device
        # again for nothing.
        if view.advert is not None and view.advert_time > view.last_session:
            if view.advert.records_waiting:
                needs.append(Priority.LOG_COLLECTION)
            if view.visited_alarms is None or view.advert.alarms != view.visited_alarms:
                needs.append(Priority.STATUS)
        if view.advert is not None and now - view.last_session > self.settings.routine_interval:
            needs.append(Priority.STATUS)
        return min(needs) if needs else None

    @staticmethod
    def _held(advert: Advert, priority: int) -> int:
        if priority == Priority.REVOCATION:
            return advert.revocation_version
        return advert.access_version

    async def _refresh_pending(self, device_id: bytes | None = None) -> None:
        """Re-read the versions each device must be brought to: of every device, or only
        of ``device_id`` (after its visit, which changed no other device's)."""
        pending: dict[bytes, dict[int, int]] = (
            {} if device_id is None else dict(self._pending_versions)
        )
        for one in list(self.views) if device_id is None else [device_id]:
            pending.pop(one, None)
            for record in await self.updates.pending_for(one):
                versions = pending.setdefault(one, {})
                versions[record.priority] = max(versions.get(record.priority, 0), record.version)
        self._pending_versions = pending

    async def _watch_reachability(self) -> None:
        interval = max(1.0, min(60.0, self.settings.unreachable_after / 4))
        while True:
            await asyncio.sleep(interval)
            now = self.clock()
            for view in list(self.views.values()):
                silent = view.last_heard is not None and now - view.last_heard >= (
                    self.settings.unreachable_after
                )
                if silent and not view.unreachable:
                    await self._mark_unreachable(view)

    async def _mark_unreachable(self, view: DeviceView) -> None:
        view.unreachable = True
        log.warning("device_unreachable", device_id=format_device_id(view.device_id))
        await self.worker.run(self.store.update_device_status, view.device_id, reachable=False)
        await self.updates.mark_unreachable(view.device_id)
        messages = [self._alarm(view.device_id, "unreachable", {"last_heard": view.last_heard})]
        device = await self.worker.run(self.store.get_device, view.device_id)
        if device is not None:
            messages.append(self._state_message(device))
        await self._enqueue(messages)

    # -- one visit: everything a device needs, in one connection ---------------------------

    async def _visit(self, view: DeviceView) -> None:
        device_hex = format_device_id(view.device_id)
        bound = log.bind(device_id=device_hex, address=view.address)
        outcome = "ok"
        cursor: int | None = None
        try:
            device = await self.worker.run(self.store.get_device, view.device_id)
            if device is None:
                return
            cursor = device.chain_next_sequence
            retry_later = await self._session(view, device)
            bound.info("session_done")
            view.failures, view.backoff_until = 0, 0.0
            view.clock_behind_reported = False
            view.unreachable = False
            if retry_later:
                # The device asked for a later try (its clock is being corrected): wait,
                # rather than wake it again at once and spend its battery on the same refusal.
                self._back_off(view)
        except DeviceError as exc:
            outcome = exc.code.name
            progressed = await self._collected_since(view.device_id, cursor)
            bound.info(
                "session_failed", error_code=exc.code.name, error=str(exc), progressed=progressed
            )
            if progressed:
                # The link failed after records were committed: the device is reachable
                # and its log is draining, so the next visit need not wait out a backoff.
                view.failures, view.backoff_until = 0, 0.0
            else:
                self._back_off(view)
            if exc.code is ErrorCode.CERT_NOT_YET_VALID and not view.clock_behind_reported:
                # The device's clock is behind our certificate's start: no session, so
                # no time sync, until it is corrected on site (or re-paired).
                view.clock_behind_reported = True
                detail = {
                    "drift_ms": None,
                    "clock_was_set": True,
                    "corrected": False,
                    "error_code": exc.code.name,
                }
                await self._enqueue([self._alarm(view.device_id, "clock_drift", detail)])
        except LogCollectionError as exc:
            outcome = exc.error.code.name
            bound.warning("log_verification_failed", error_code=exc.error.code.name)
            self._back_off(view)
        except RadioError as exc:
            outcome = "radio"
            bound.info("connect_failed", error=str(exc))
            self._back_off(view)
        finally:
            self._count(outcome)
            view.last_session = self.clock()
            view.busy = False
            self._free_slot(view)
            self._connected(view)  # if the visit ended before it connected
            self.wake()

    def _free_slot(self, view: DeviceView) -> None:
        """The visit to ``view`` holds no connection any more: its slot is free (once)."""
        if view.holds_slot:
            view.holds_slot = False
            self._busy -= 1
            self.wake()

    async def _collected_since(self, device_id: bytes, cursor: int | None) -> bool:
        """Whether the stored chain cursor of ``device_id`` moved past ``cursor``."""
        if cursor is None:
            return False
        current = await self.worker.run(self.store.get_device, device_id)
        return current is not None and current.chain_next_sequence > cursor

    async def _session(self, view: DeviceView, device: DeviceRecord) -> bool:
        """Everything ``device`` needs, in one connection; True if an update must wait."""
        assert view.address is not None  # only devices with an address are dispatched
        try:
            link = await self.radio.connect(
                view.address,
                mtu=self.settings.mtu,
                timeout=self.settings.connect_timeout,
                on_established=lambda: self._connected(view),
            )
        finally:
            self._connected(view)
        config = GatewaySessionConfig(
            noise_key=self.credentials.keys.noise_key,
            device_id=device.device_id,
            now=int(self.clock()),
            mode=SessionMode.NORMAL,
            certificate=self.credentials.certificate_bytes,
            pinned_signing_key=device.signing_key,
            pinned_noise_key=device.noise_key,
        )
        async with (
            DeviceSession(link, config, timeout=self.settings.idle_timeout) as session,
            _bounded(self.settings.max_session, device.device_id),
        ):
            hello = session.device
            assert hello is not None  # set by open()
            status = hello.status
            log.info(
                "session_started",
                device_id=format_device_id(device.device_id),
                records_waiting=status.records_waiting,
            )
            await self._sync_clock(session, device, status)
            outcomes = await self.updates.push(session, device)
            await self._run_requests(session, device, view)
            if status.records_waiting or (view.advert and view.advert.records_waiting):
                await self.pipeline.collect(session, device)
            final = await session.request(StatusRequest(), Status)
        # Disconnected (the device's radio sleeps again): the slot serves the next device
        # while this visit's books close.
        self._free_slot(view)
        await self._record_status(device, final.status, seen=status.alarms)
        view.visited_alarms = final.status.alarms
        await self._refresh_pending(device.device_id)
        self.on_outbox()
        return any(outcome.state is PropagationState.PENDING for outcome in outcomes)

    async def _sync_clock(
        self, session: DeviceSession, device: DeviceRecord, status: DeviceStatus
    ) -> None:
        """Set the device's clock when it drifted beyond the threshold, or report why not.

        A device never winds its clock back below its time floor, the time of its newest
        record (docs/protocol.md): a clock that ran ahead and logged there cannot be
        corrected by any gateway. That is reported, and the session goes on, so its log is
        still collected and its updates pushed."""
        now = self.clock()
        drift = (status.clock - now) if status.clock else None
        if drift is not None and abs(drift) <= self.settings.clock_drift_threshold:
            return
        if status.time_floor > now:
            await self._uncorrected_drift(device, drift, ErrorCode.TIME_BELOW_FLOOR)
            return
        try:
            result = await session.request(
                TimeSync(gateway_time_ms=round(now * 1000)), TimeSyncResult
            )
        except RequestRefused as exc:
            if exc.code is not ErrorCode.TIME_BELOW_FLOOR:
                raise
            await self._uncorrected_drift(device, drift, exc.code)
            return
        drift_ms = result.device_time_before_ms - round(now * 1000) if status.clock else None
        if self.metrics is not None and drift_ms is not None:
            self.metrics.clock_drift_observed(drift_ms / 1000)
        await self.worker.run(
            self.store.update_device_status, device.device_id, clock_drift_ms=drift_ms
        )
        detail = {"drift_ms": drift_ms, "clock_was_set": bool(status.clock), "corrected": True}
        await self._enqueue([self._alarm(device.device_id, "clock_drift", detail)])

    async def _uncorrected_drift(
        self, device: DeviceRecord, drift: float | None, code: ErrorCode
    ) -> None:
        """Report a drift the gateway cannot correct, once for as long as it stays put."""
        drift_ms = None if drift is None else round(drift * 1000)
        if self.metrics is not None and drift is not None:
            self.metrics.clock_drift_observed(drift)
        known = device.clock_drift_ms
        threshold_ms = self.settings.clock_drift_threshold * 1000
        if known is not None and drift_ms is not None and abs(known - drift_ms) <= threshold_ms:
            return  # reported at an earlier visit
        await self.worker.run(
            self.store.update_device_status, device.device_id, clock_drift_ms=drift_ms
        )
        detail = {
            "drift_ms": drift_ms,
            "clock_was_set": drift is not None,
            "corrected": False,
            "error_code": code.name,
        }
        await self._enqueue([self._alarm(device.device_id, "clock_drift", detail)])

    async def _run_requests(
        self, session: DeviceSession, device: DeviceRecord, view: DeviceView
    ) -> None:
        while view.requests:
            request = view.requests.pop(0)
            try:
                result = await request.job(session, device)
            except (DeviceError, LogCollectionError, ProtocolError) as exc:
                if not request.future.done():
                    request.future.set_exception(exc)
                if isinstance(exc, SessionError):
                    raise
            else:
                if not request.future.done():
                    request.future.set_result(result)

    async def _record_status(
        self, device: DeviceRecord, status: DeviceStatus, *, seen: AlarmFlags = AlarmFlags.NONE
    ) -> None:
        """Store the device's final status and raise its new alarms.

        ``seen`` are the alarms the device reported when the session began: one the session
        itself cleared (an overflow, reported once its log record has been read) is raised
        all the same."""
        now = self.clock()
        await self.worker.run(
            self.store.update_device_status,
            device.device_id,
            battery=status.battery_percent,
            alarms=int(status.alarms),
            door=int(status.door),
            lock=int(status.lock),
            access_version=status.access_version,
            revocation_version=status.revocation_version,
            last_heard=now,
            reachable=True,
        )
        await self.worker.run(
            self.store.record_contact, device.device_id, ok=True, now=now, backoff_until=None
        )
        current = await self.worker.run(self.store.get_device, device.device_id)
        messages = [self._state_message(current or device)]
        new_alarms = (AlarmFlags(status.alarms) | AlarmFlags(seen)) & ~AlarmFlags(device.alarms)
        messages.extend(
            self._alarm(device.device_id, name, {})
            for flag, name in _ALARM_NAMES.items()
            if flag in new_alarms
        )
        await self._enqueue(messages)

    def _count(self, outcome: str) -> None:
        """One finished session for the operators' metrics."""
        if self.metrics is None:
            return
        if outcome == "ok":
            self.metrics.session("ok")
        elif outcome == ErrorCode.BUSY.name:
            self.metrics.session("timeout", ErrorCode.BUSY)
        elif outcome in ErrorCode.__members__:
            self.metrics.session("refused", ErrorCode[outcome])
        else:
            self.metrics.session("failed")

    def _back_off(self, view: DeviceView) -> None:
        view.failures += 1
        ceiling = min(
            self.settings.backoff_max, self.settings.backoff_initial * 2 ** (view.failures - 1)
        )
        # Full jitter: devices that failed together (a gateway restart) do not retry together.
        view.backoff_until = self.clock() + self._random.uniform(
            self.settings.backoff_initial / 2, ceiling
        )

    # -- messages --------------------------------------------------------------------------

    async def _enqueue(self, messages: list[OutboxMessage]) -> None:
        await self.worker.run(self.store.enqueue, messages, now=self.clock())
        self.on_outbox()

    def _alarm(self, device_id: bytes, alarm: str, detail: dict[str, Any]) -> OutboxMessage:
        return OutboxMessage(
            topic=self.topics.alarms,
            payload=alarm_payload(
                self.topics.gateway_id, format_device_id(device_id), alarm, detail, self.clock()
            ),
            kind="alarm",
        )

    def _state_message(self, device: DeviceRecord) -> OutboxMessage:
        device_hex = format_device_id(device.device_id)
        return OutboxMessage(
            topic=self.topics.device_state(device_hex),
            payload=state_payload(self.topics.gateway_id, device),
            kind="state",
            retain=True,
        )


@contextlib.asynccontextmanager
async def _bounded(seconds: float, device_id: bytes) -> AsyncIterator[None]:
    """One session may take ``seconds`` at most, so one device cannot hold a slot."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        message = f"session with {format_device_id(device_id)} longer than {seconds:g} s"
        raise DeviceUnavailable(ErrorCode.BUSY, message) from exc


_ALARM_NAMES: Final = {
    AlarmFlags.BATTERY_LOW: "battery_low",
    AlarmFlags.TAMPER: "tamper",
    AlarmFlags.JAMMED: "jammed",
    AlarmFlags.CLOCK_UNSET: "clock_unset",
    AlarmFlags.LOG_OVERFLOW: "log_overflow",
    AlarmFlags.DOOR_HELD_OPEN: "door_held_open",
}


def state_payload(gateway_id: str, device: DeviceRecord) -> bytes:
    """The retained per-device state operators and the registry read."""
    alarms = AlarmFlags(device.alarms)
    body = {
        "gateway": gateway_id,
        "device_id": format_device_id(device.device_id),
        "kind": DeviceKind(device.kind).name.lower(),
        "site_id": device.site_id,
        "battery": device.battery,
        "door": DoorState(device.door).name.lower(),
        "lock": LockState(device.lock).name.lower(),
        "alarms": sorted(
            (flag.name or "").lower() for flag in AlarmFlags if flag and flag in alarms
        ),
        "access_version": device.access_version,
        "revocation_version": device.revocation_version,
        "clock_drift_ms": device.clock_drift_ms,
        "last_heard": device.last_heard,
        "reachable": device.reachable,
        "decommissioned": device.decommissioned_at is not None,
    }
    return json.dumps(body, separators=(",", ":")).encode()
