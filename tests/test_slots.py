"""Time-division device shares (lumen.policy.slots): the schedule's properties, and a live cluster whose
workers start every engine step inside their own slot (their step logs against the schedule)."""

from __future__ import annotations

import csv
import math
import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lumen.policy.slots import (
    LONG_STEP_START_FRACTION,
    MAX_SLOT_S,
    MIN_SLOT_S,
    SlotSchedule,
    default_slot_s,
    resolve_device_share,
    share_groups,
)

times = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)
slots = st.floats(min_value=1e-3, max_value=1.0, allow_nan=False)
counts = st.integers(min_value=1, max_value=16)


@given(t=times, count=counts, slot_s=slots)
def test_every_instant_has_exactly_one_owner(t, count, slot_s):
    schedules = [SlotSchedule(i, count, slot_s) for i in range(count)]
    inside = [s.index for s in schedules if s.window(t)[0] <= t]  # t lies in that worker's own slot
    assert inside == [schedules[0].owner(t)]


@given(t=times, count=counts, data=st.data(), slot_s=slots,
       step_frac=st.floats(min_value=0.0, max_value=3.0, allow_nan=False))
def test_a_step_starts_only_in_its_own_slot_and_as_early_as_it_fits(t, count, data, slot_s, step_frac):
    index = data.draw(st.integers(min_value=0, max_value=count - 1))
    s = SlotSchedule(index, count, slot_s)
    step_s = step_frac * slot_s
    at = s.start_at(t, step_s)
    assert at >= t
    start, end = s.window(at)
    assert s.owner(at) == index and start <= at < end  # never in another worker's (a dead one's) slot
    assert at - t <= s.cycle_s + slot_s  # within about a cycle
    tol = 1e-9 * max(1.0, end)  # rounding of t // slot_s aside
    near_start = at - start <= LONG_STEP_START_FRACTION * slot_s + tol
    assert at + step_s <= end + tol or near_start  # it fits, or starts near its slot's start
    if step_s >= slot_s:
        assert near_start  # it fits no slot
    here = s.window(t)
    if here[0] <= t and (t + step_s <= here[1] or t - here[0] <= LONG_STEP_START_FRACTION * slot_s):
        assert at == t  # allowed now: no wait
    # never a whole cycle lost: a step may start in every one of its worker's slots
    assert at - t <= s.cycle_s + tol
    assert s.wait_s(t, step_s) == pytest.approx(at - t)


@given(count=st.integers(min_value=2, max_value=8), slot_s=slots, data=st.data())
@settings(max_examples=50)
def test_a_dead_workers_slot_stays_empty(count, slot_s, data):
    """Whoever is alive, no survivor's step starts in a dead worker's slot: the capacity is lost."""
    dead = data.draw(st.integers(min_value=0, max_value=count - 1))
    for index in range(count):
        if index == dead:
            continue
        s = SlotSchedule(index, count, slot_s)
        t = data.draw(times)
        for step_frac in (0.0, 0.3, 0.99, 1.5):
            at = s.start_at(t, step_frac * slot_s)
            assert s.owner(at) != dead


def test_overrun_is_measured_from_the_slot_the_step_started_in():
    s = SlotSchedule(3, 4, 0.1)  # slot 11 = [1.1, 1.2) is worker 3's
    assert s.overrun_s(1.15, 1.19) == 0.0
    assert s.overrun_s(1.15, 1.23) == pytest.approx(0.03)


def test_share_groups_and_modes():
    assert share_groups(["cpu"] * 3) == [(0, 3), (1, 3), (2, 3)]
    assert share_groups(["cuda:0", "cuda:1", "cuda:0", "cuda:1"]) == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert share_groups(["cuda:0", "cuda:1"]) == [(0, 1), (0, 1)]
    assert resolve_device_share("auto", 4) == "slots"
    assert resolve_device_share("auto", 1) == "shared"  # one worker per GPU: unchanged
    assert resolve_device_share("shared", 4) == "shared"
    with pytest.raises(ValueError):
        resolve_device_share("timeslice", 2)
    assert default_slot_s(0.005) == pytest.approx(0.04)
    assert default_slot_s(1e-6) == MIN_SLOT_S and default_slot_s(10.0) == MAX_SLOT_S
    with pytest.raises(ValueError):
        SlotSchedule(2, 2, 0.1)


def test_serve_resolves_slots_per_device():
    from lumen.runtime.config import ClusterConfig

    cfg = ClusterConfig(model="m", served_model_name="m", num_workers=4, devices=["cuda", "cuda:1"],
                        device_share="slots", slot_ms=40)
    assert [cfg.slot_of(i) for i in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    cfg.device_share = "shared"
    assert cfg.slot_of(0) is None


def test_cpu_workers_under_slots_get_lanes_of_cores():
    from lumen.runtime.config import ClusterConfig

    cfg = ClusterConfig(model="m", served_model_name="m", num_workers=4, devices=["cpu"], device_share="slots",
                        slot_ms=100, cpu_cores=[0, 1])
    assert [cfg.slot_of(i) for i in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]  # the whole CPU, in turn
    assert cfg.cpu_cores_of(3) == [0, 1]
    cfg.cpu_lanes_max = 2  # a core each, two workers per core
    assert [cfg.slot_of(i) for i in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [cfg.cpu_cores_of(i) for i in range(4)] == [[0], [1], [0], [1]]
    wide = ClusterConfig(model="m", served_model_name="m", num_workers=2, devices=["cpu"], device_share="slots",
                         slot_ms=100, cpu_cores=list(range(8)), cpu_lanes_max=4)
    assert [wide.slot_of(i) for i in range(2)] == [(0, 1), (0, 1)]  # a lane each: partitioned, no turns
    assert wide.cpu_cores_of(1) == [4, 5, 6, 7]


@pytest.mark.cluster
def test_live_workers_step_only_inside_their_slots(tmp_path):
    """Two CPU workers time-slice the box; one is SIGKILLed and comes back. Every engine step in the
    workers' step logs (monotonic start, shared by the host's processes) lies in that worker's own slot,
    and the stats count exactly the steps that ran past their slot's end."""
    from cluster_util import make_tiny_model_dir, run_cluster, wait_until

    model = make_tiny_model_dir(tmp_path / "tiny")
    slot_ms = 30.0
    logs = tmp_path / "steps"
    with run_cluster(str(model), workers=2, extra=["--device-share", "slots", "--slot-ms", str(slot_ms)],
                     env={"LUMEN_STEP_LOG": str(logs)}) as c:
        state = c.state()
        assert state["device_share"] == "slots" and state["slot_ms"] == slot_ms
        assert [w["slot"] for w in state["workers"]] == [[0, 2], [1, 2]]
        ref = c.complete("The quick brown fox", max_tokens=24, ignore_eos=True)["choices"][0]["token_ids"]
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda _: c.complete("The quick brown fox", max_tokens=24, ignore_eos=True),
                                 range(6)))
        assert all(o["choices"][0]["token_ids"] == ref for o in outs)  # slots change no answer
        # worker 1 stepped before its kill (its step log may lose those rows to the SIGKILL: see below)
        wait_until(lambda: c.worker(1)["stats"].get("slot_steps", 0) > 0, 10, "worker 1's first slot steps")
        c.kill(1, signal.SIGKILL)
        wait_until(lambda: c.worker(1)["epoch"] == 2 and c.worker(1)["state"] == "serving", 90,
                   "worker 1 back")
        with cf.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: c.complete("Once upon a time", max_tokens=16, ignore_eos=True), range(4)))
        import time

        time.sleep(0.5)  # the last heartbeat carries the last step's counts
        stats = {w["id"]: w["stats"] for w in c.state()["workers"]}
    rows = {}
    for path in logs.glob("worker*-epoch*.csv"):
        with open(path) as f:
            rows[path.stem] = [r for r in csv.DictReader(f)]
    assert {"worker0-epoch1", "worker1-epoch2"} <= set(rows)
    for name, steps in rows.items():
        index = int(name[len("worker")])
        s = SlotSchedule(index, 2, slot_ms / 1e3)
        # the log flushes about once a second: the SIGKILLed incarnation may lose its unflushed rows (all
        # of them when it served for under a second); every row that reached the file is still checked
        assert steps or name == "worker1-epoch1", name
        for r in steps:
            start, end = float(r["mono_start_s"]), float(r["mono_end_s"])
            assert s.owner(start) == index, f"{name}: a step started at {start:.4f}, in slot of {s.owner(start)}"
            assert end >= start
    # the survivor's stats (its incarnation logged every step): overruns counted exactly
    w0 = rows["worker0-epoch1"]
    s0 = SlotSchedule(0, 2, slot_ms / 1e3)
    late = sum(1 for r in w0 if s0.overrun_s(float(r["mono_start_s"]), float(r["mono_end_s"])) > 0)
    assert stats[0]["slot_overruns"] == late
    assert stats[0]["slot_steps"] == len(w0)
    assert math.isfinite(stats[0]["slot_wait_s"]) and stats[0]["slot_wait_s"] > 0


def test_serve_config_resolves_the_device_share(tmp_path):
    import argparse

    from cluster_util import make_tiny_model_dir

    from lumen.runtime.server import add_serve_arguments, build_config

    model = str(make_tiny_model_dir(tmp_path / "tiny"))
    p = argparse.ArgumentParser()
    add_serve_arguments(p)

    def cfg(*argv):
        return build_config(p.parse_args(["--model", model, *argv]))[0]

    assert cfg("--workers", "4", "--devices", "cpu").device_share == "shared"  # serve's default
    slots = cfg("--workers", "4", "--devices", "cpu", "--device-share", "auto")
    assert slots.device_share == "slots" and slots.slot_ms >= 20 and slots.slot_of(3) == (3, 4)
    assert cfg("--workers", "2", "--devices", "cuda:0,cuda:1", "--device-share", "auto").device_share == "shared"
    assert cfg("--workers", "4", "--devices", "cpu", "--device-share", "slots", "--slot-ms", "40").slot_ms == 40
    with pytest.raises(ValueError, match="slot-ms"):
        cfg("--workers", "2", "--devices", "cpu", "--device-share", "slots", "--slot-ms", "0")
    with pytest.raises(ValueError, match="not both"):
        cfg("--workers", "4", "--devices", "cpu,cuda:0", "--device-share", "slots")


def test_a_step_just_shorter_than_its_slot_still_runs_in_most_of_its_slots(monkeypatch):
    """The worker's own loop, slot-gated (2 workers, 20 ms slots), with an engine whose every step takes
    19.5 ms: such a step fits a slot only when started in its first half millisecond; it may now start
    anywhere in the slot's first tenth. On the quiet CPU box the loop stepped in 28 of 30 cycles, against
    22 when only a fitting start was allowed (2026-12-07); a loop that wakes later than the window, cycle
    after cycle, would not step at all."""
    import threading
    import time

    from lumen.runtime.transport import SECRET_ENV, secret_to_hex
    from lumen.runtime.worker import Worker, parse_args

    monkeypatch.setenv(SECRET_ENV, secret_to_hex(bytes(32)))
    w = Worker(parse_args(["--worker-id", "0", "--epoch", "1", "--controller", "127.0.0.1:1", "--model", "unused",
                           "--slot-index", "0", "--slot-count", "2", "--slot-ms", "20"]))
    step_s = 0.0195

    class Busy:  # always has work; each step takes step_s
        steps, last_step = 0, None

        def has_work(self):
            return True

        def expected_step_s(self):
            return step_s

        def step(self):
            Busy.steps += 1
            time.sleep(step_s)
            return []

    w.engine = Busy()
    w._stream_pages = w._publish_stats = lambda: None
    w.step_times.record = lambda step: None
    loop = threading.Thread(target=w.run, daemon=True)
    try:
        loop.start()
        time.sleep(1.2)  # 30 cycles of 40 ms
        w.running = False
        loop.join(5)
    finally:
        w.close()
    assert Busy.steps >= 15, Busy.steps
