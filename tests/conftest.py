"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import zmq


@pytest.fixture
def ctx():
    """A ZeroMQ context, destroyed without lingering so an unsent message cannot hang the test."""
    c = zmq.Context()
    yield c
    c.destroy(linger=0)
