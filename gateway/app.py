"""The daemon: every part of the gateway, started in order and stopped by leaving contexts.

Start-up loads and checks everything before it touches the radio or the broker (a bad
configuration or key file ends the process with a clear message), opens the store, then
runs the radio scheduler, the MQTT bridge, the local control socket (gateway.control),
the metrics endpoint, retention and the systemd watchdog side by side. Stopping (SIGTERM)
cancels the task group: in-flight sessions end, the bridge says offline, the store
closes; nothing unfinished is lost, because every job lives in the store and resumes at
the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Final

import structlog

from gateway import control, systemd
from gateway.commands import CommandVerifier
from gateway.config import Settings
from gateway.handlers import CommandHandler
from gateway.keys import GatewayCredentials, load_credentials
from gateway.logs import configure_logging
from gateway.metrics import Metrics, RevocationCoverage
from gateway.mqtt import MqttBridge, MqttSettings, MqttTls, status_payload
from gateway.pipeline import LogPipeline
from gateway.radio.base import Radio
from gateway.scheduler import Scheduler, SchedulerSettings
from gateway.store import PropagationState, Store
from gateway.topics import Topics
from gateway.updates import UpdateService
from gateway.worker import BlockingWorker
from protocols.envelopes import Role, UpdateKind, verify_certificate
from protocols.errors import ProtocolError

log = structlog.get_logger(__name__)

RETENTION_INTERVAL: Final = 3600.0
METRICS_INTERVAL: Final = 5.0
CERTIFICATE_WARNING: Final = 30 * 86400


class StartupError(Exception):
    """Something the operator must fix before the daemon can start."""


def check_credentials(credentials: GatewayCredentials, gateway_id: str, now: float) -> None:
    """Refuse to start with a certificate the devices would refuse."""
    certificate = credentials.certificate
    try:
        verify_certificate(certificate, credentials.authority_key, role=Role.GATEWAY, now=int(now))
    except ProtocolError as exc:
        msg = f"the gateway certificate is not usable: {exc.code.name} ({exc.message})"
        raise StartupError(msg) from exc
    if certificate.subject != gateway_id:
        msg = f"the certificate is for {certificate.subject!r}, not gateway {gateway_id!r}"
        raise StartupError(msg)
    if certificate.not_after - now < CERTIFICATE_WARNING:
        log.warning("certificate_expires_soon", not_after=certificate.not_after)


def make_radio(settings: Settings) -> Radio:
    if settings.radio.backend == "bumble":
        from gateway.radio.bumble import BumbleRadio  # noqa: PLC0415 - only the chosen backend loads

        assert settings.radio.transport is not None  # the configuration requires it
        return BumbleRadio(settings.radio.transport)
    from gateway.radio.bleak import BleakRadio  # noqa: PLC0415 - only the chosen backend loads

    return BleakRadio(settings.radio.adapter)


def mqtt_settings(settings: Settings) -> MqttSettings:
    mqtt = settings.mqtt
    tls = None
    if mqtt.tls:
        assert mqtt.ca_file
        assert mqtt.cert_file
        assert mqtt.key_file
        tls = MqttTls(ca_file=mqtt.ca_file, cert_file=mqtt.cert_file, key_file=mqtt.key_file)
    return MqttSettings(
        host=mqtt.host,
        port=mqtt.port,
        gateway_id=settings.gateway.id,
        client_id=mqtt.client_id,
        prefix=mqtt.prefix,
        tls=tls,
        username=mqtt.username,
        password=mqtt.password.reveal() if mqtt.password else None,
        keepalive=int(mqtt.keepalive),
        protocol=mqtt.protocol,
        reconnect_min=mqtt.reconnect_min,
        reconnect_max=mqtt.reconnect_max,
        publish_batch=mqtt.publish_batch,
    )


def scheduler_settings(settings: Settings) -> SchedulerSettings:
    return SchedulerSettings(
        slots=settings.scheduler.slots,
        mtu=settings.radio.mtu,
        connect_timeout=settings.radio.connect_timeout,
        idle_timeout=settings.scheduler.session_idle_timeout,
        max_session=settings.scheduler.max_session,
        unreachable_after=settings.scheduler.unreachable_after,
        backoff_initial=settings.scheduler.backoff_initial,
        backoff_max=settings.scheduler.backoff_max,
        routine_interval=settings.scheduler.routine_interval,
        clock_drift_threshold=settings.log.clock_drift_threshold,
    )


class Daemon:
    """One running gateway."""

    def __init__(self, settings: Settings, credentials: GatewayCredentials) -> None:
        self.settings = settings
        self.credentials = credentials
        self.metrics = Metrics()
        self.topics = Topics(settings.mqtt.prefix, settings.gateway.id)

    async def run(self) -> None:
        settings = self.settings
        settings.gateway.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        store = Store.open(settings.gateway.store_path)
        try:
            async with BlockingWorker("store") as worker:
                await self._run(store, worker)
        finally:
            store.close()

    async def _run(self, store: Store, worker: BlockingWorker) -> None:
        settings = self.settings
        pipeline = LogPipeline(
            store, worker, self.topics, batch_size=settings.log.batch_size, metrics=self.metrics
        )
        updates = UpdateService(store, worker, self.credentials, self.topics)
        radio = make_radio(settings)
        scheduler = Scheduler(
            radio=radio,
            store=store,
            worker=worker,
            credentials=self.credentials,
            pipeline=pipeline,
            updates=updates,
            topics=self.topics,
            settings=scheduler_settings(settings),
            metrics=self.metrics,
        )
        handler = CommandHandler(
            store, worker, scheduler, updates, pipeline, self.topics, metrics=self.metrics
        )

        async def remember(jti: str, expires_at: float, now: float) -> bool:
            return await worker.run(store.remember_command, jti, expires_at, now)

        verifier = CommandVerifier(self.credentials.authority_key, settings.gateway.id, remember)
        bridge = MqttBridge(mqtt_settings(settings), worker, store, verifier, handler)
        scheduler.on_outbox = bridge.notify_outbox
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(radio)
            socket_path = settings.gateway.control_path
            try:
                await stack.enter_async_context(
                    control.ControlServer(socket_path, control.operations(handler))
                )
            except OSError as exc:
                msg = f"cannot listen on the control socket {socket_path}: {exc}"
                raise StartupError(msg) from exc
            if settings.metrics.enabled:
                await stack.enter_async_context(await self.metrics.serve(settings.metrics.listen))
            log.info("started", gateway=settings.gateway.id, slots=settings.scheduler.slots)
            systemd.ready(f"gateway {settings.gateway.id} running")
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(bridge.run(), name="mqtt")
                    tasks.create_task(scheduler.run(), name="scheduler")
                    tasks.create_task(systemd.watchdog_task(), name="watchdog")
                    tasks.create_task(self._retention(store, worker), name="retention")
                    tasks.create_task(self._heartbeat(bridge), name="heartbeat")
                    tasks.create_task(
                        self._observe(store, worker, scheduler, bridge), name="metrics"
                    )
            finally:
                systemd.stopping()
                log.info("stopping", gateway=settings.gateway.id)

    async def _retention(self, store: Store, worker: BlockingWorker) -> None:
        """Door logs are personal data: published events go after the retention time."""
        while True:
            cutoff = time.time() - self.settings.log.retention
            pruned = await worker.run(store.prune_published, cutoff)
            if pruned:
                log.info("retention_pruned", events=pruned)
            await asyncio.sleep(RETENTION_INTERVAL)

    async def _heartbeat(self, bridge: MqttBridge) -> None:
        """Re-publish the retained online status, so a stale one is told from a live one."""
        started = time.time()
        while True:
            await asyncio.sleep(self.settings.scheduler.status_interval)
            payload = status_payload("online", self.settings.gateway.id, started)
            await bridge.publish_retained(self.topics.status, payload)

    async def _observe(
        self, store: Store, worker: BlockingWorker, scheduler: Scheduler, bridge: MqttBridge
    ) -> None:
        while True:
            now = time.time()
            depth = await worker.run(store.outbox_depth)
            age = await worker.run(store.outbox_oldest_age, now)
            self.metrics.set_outbox(depth=depth, oldest_age=age or 0.0)
            devices = await worker.run(store.list_devices, include_decommissioned=True)
            self.metrics.set_devices(
                reachable=sum(d.reachable and d.decommissioned_at is None for d in devices),
                unreachable=sum(not d.reachable and d.decommissioned_at is None for d in devices),
                decommissioned=sum(d.decommissioned_at is not None for d in devices),
            )
            self.metrics.set_slots(busy=scheduler.busy_slots, total=scheduler.settings.slots)
            coverage = {}
            for update in await worker.run(store.unfinished_updates):
                if update.kind != UpdateKind.REVOCATION:
                    continue
                rows = (await worker.run(store.propagation, update.update_id)).values()
                applied = sum(row.state is PropagationState.APPLIED for row in rows)
                coverage[update.update_id] = RevocationCoverage(
                    applied=applied, pending=len(rows) - applied, total=len(rows)
                )
            self.metrics.set_revocations(coverage)
            if bridge.connected:
                self.metrics.mqtt_up()
            else:
                self.metrics.mqtt_down()
            await asyncio.sleep(METRICS_INTERVAL)


def run(settings: Settings) -> None:
    """Load credentials, then run until SIGTERM or SIGINT."""
    configure_logging(settings.logging.level, settings.logging.format)
    credentials = load_credentials(
        settings.gateway.key_file,
        settings.gateway.certificate_file,
        settings.gateway.authority_key_file,
    )
    check_credentials(credentials, settings.gateway.id, time.time())
    asyncio.run(_main(Daemon(settings, credentials)))


async def _main(daemon: Daemon) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await daemon.run()
