"""Fixtures shared by the test modules."""

from __future__ import annotations

import os

import pytest
import zmq
from hypothesis import settings

# Property tests check decisions, not speed: on a loaded 2-core box a 200 ms example deadline failed
# a ClusterTable property that passes every time on its own (2026-12-07)
settings.register_profile("lumen", deadline=None)
settings.load_profile("lumen")


@pytest.fixture(scope="session", autouse=True)
def draft_copies_in_a_temporary_dir(tmp_path_factory):
    """Workers keep a copy of their draft in /dev/shm (RAM) for later restarts, by design never removed
    while it may be used. Each test's model is a new directory, so its copy is a new one: 22 copies
    (589 MB of RAM) were left there after a day of test runs (2026-12-07). The test clusters inherit this
    environment and keep their copies in a directory pytest removes instead."""
    root = tmp_path_factory.mktemp("draft-shm")
    old = os.environ.get("LUMEN_DRAFT_SHM")
    os.environ["LUMEN_DRAFT_SHM"] = str(root)
    yield root
    if old is None:
        os.environ.pop("LUMEN_DRAFT_SHM", None)
    else:
        os.environ["LUMEN_DRAFT_SHM"] = old


@pytest.fixture
def ctx():
    """A ZeroMQ context, destroyed without lingering so an unsent message cannot hang the test."""
    c = zmq.Context()
    yield c
    c.destroy(linger=0)
