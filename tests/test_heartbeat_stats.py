"""A worker's heartbeat stats stay within the schema's bound, keeping what the controller decides with."""

from lumen.runtime.protocol import HB_DECISION_KEYS, HB_MAX_STATS, SCHEMA
from lumen.runtime.worker import trim_stats


def test_trim_keeps_the_decision_keys_and_the_bound():
    stats = {f"aaa_{i:03d}": i for i in range(200)} | {k: 1.0 for k in HB_DECISION_KEYS if k != "loop_age_s"}
    trimmed = trim_stats(stats, HB_MAX_STATS - 1)
    assert len(trimmed) == HB_MAX_STATS - 1
    assert all(k in trimmed for k in HB_DECISION_KEYS if k != "loop_age_s")
    # what the heartbeat thread then sends (it adds loop_age_s) passes the schema
    assert SCHEMA.validate("HB", {"stats": dict(trimmed, loop_age_s=0.1)}, 0)
    assert not SCHEMA.validate("HB", {"stats": dict(stats, loop_age_s=0.1)}, 0)  # untrimmed: dropped


def test_stats_under_the_bound_are_left_alone():
    stats = {"num_waiting": 1, "x": 2}
    assert trim_stats(stats, HB_MAX_STATS - 1) is stats
