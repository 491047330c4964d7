"""Fixtures of the radio tests: a virtual link, simulated devices and a central on it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest
from bumble.transport.common import AsyncPipeSink

from gateway.radio.bumble import BumbleRadio
from simulators.radio import ScalableLink, VirtualController, VirtualPeripheral


class PeripheralFactory(Protocol):
    async def __call__(self, **kwargs: Any) -> VirtualPeripheral: ...


@pytest.fixture
def link() -> ScalableLink:
    return ScalableLink()


@pytest.fixture
async def make_peripheral(link: ScalableLink) -> AsyncIterator[PeripheralFactory]:
    """Start VirtualPeripherals on the link (keyword arguments as VirtualPeripheral's); all are
    stopped after the test."""
    started: list[VirtualPeripheral] = []

    async def make(**kwargs: Any) -> VirtualPeripheral:
        peripheral = VirtualPeripheral(link, **kwargs)
        started.append(peripheral)
        await peripheral.start()
        return peripheral

    yield make
    for peripheral in started:
        await peripheral.stop()


@pytest.fixture
async def central_controller(link: ScalableLink) -> AsyncIterator[VirtualController]:
    controller = VirtualController("central", link=link)
    yield controller
    link.remove_controller(controller)


@pytest.fixture
async def central(central_controller: VirtualController) -> AsyncIterator[BumbleRadio]:
    """The gateway's Bumble radio on an in-process controller of the link."""
    radio = BumbleRadio.from_hci(central_controller, AsyncPipeSink(central_controller))
    async with radio:
        yield radio
