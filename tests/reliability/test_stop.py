"""A daemon told to stop in its first instants stops (Python 3.11's lost cancellations).

SIGTERM arrives just as the broker acknowledges the online status and the controller
answers the scan command: on Python 3.11 ``asyncio.wait_for`` inside aiomqtt and Bumble
could swallow that cancellation and leave the daemon running until killed.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import aiomqtt

from tests.broker import Mosquitto
from tests.installation import GATEWAY_ID, install, start_daemon
from tests.processes import SimProcess
from tests.reliability.conftest import Figures

ROUNDS = 6
STOP_WITHIN = 10.0


async def test_a_stop_right_after_online_is_never_lost(
    tmp_path: Path, mosquitto: Mosquitto, figures: Figures
) -> None:
    sim = await SimProcess.start("--locks", "1", "--serve", "tcp-server:127.0.0.1:0")
    stops: list[float] = []
    try:
        installation = install(tmp_path / "gw", transport=sim.ready["transport"], broker=mosquitto)
        topic = f"lockgw/gw/{GATEWAY_ID}/status"
        for round_ in range(ROUNDS):
            async with aiomqtt.Client(
                mosquitto.host, mosquitto.port, identifier=f"watch-{round_}"
            ) as watch:
                await watch.subscribe(topic, qos=1)
                log = tmp_path / f"daemon-{round_}.log"
                daemon = await start_daemon(installation.config, log)
                try:
                    async with asyncio.timeout(30):
                        async for message in watch.messages:
                            assert isinstance(message.payload, bytes)
                            if message.payload and json.loads(message.payload)["state"] == "online":
                                break
                    daemon.send_signal(signal.SIGTERM)  # in the same instant
                    began = time.monotonic()
                    async with asyncio.timeout(STOP_WITHIN):
                        code = await daemon.wait()
                    stops.append(time.monotonic() - began)
                    assert code == 0, log.read_text()[-2000:]
                finally:
                    if daemon.returncode is None:
                        daemon.kill()
                        await daemon.wait()
    finally:
        await sim.finish()
    figures("prompt_stop", rounds=ROUNDS, stopped=len(stops), slowest_stop_s=max(stops))
