"""Fixtures for protocol tests."""

from __future__ import annotations

import pytest

from tests.protocols.world import World


@pytest.fixture
def world() -> World:
    return World()
