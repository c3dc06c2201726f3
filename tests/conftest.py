"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import zmq
from hypothesis import settings

# Property tests check decisions, not speed: on a loaded 2-core box a 200 ms example deadline failed
# a ClusterTable property that passes every time on its own (2026-12-07)
settings.register_profile("lumen", deadline=None)
settings.load_profile("lumen")


@pytest.fixture
def ctx():
    """A ZeroMQ context, destroyed without lingering so an unsent message cannot hang the test."""
    c = zmq.Context()
    yield c
    c.destroy(linger=0)
