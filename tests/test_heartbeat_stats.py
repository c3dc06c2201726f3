"""A worker's heartbeat stats stay within the schema's bound, keeping what the controller decides with."""

from lumen.runtime.protocol import HB_DECISION_KEYS, HB_MAX_STATS, SCHEMA
from lumen.runtime.worker import HB_OWN_STATS, trim_stats

LIMIT = HB_MAX_STATS - len(HB_OWN_STATS)  # what the worker's main thread may publish


def test_trim_keeps_the_decision_keys_and_the_bound():
    stats = {f"aaa_{i:03d}": i for i in range(200)} | {k: 1.0 for k in HB_DECISION_KEYS if k not in HB_OWN_STATS}
    trimmed = trim_stats(stats, LIMIT)
    assert len(trimmed) == LIMIT
    assert all(k in trimmed for k in HB_DECISION_KEYS if k not in HB_OWN_STATS)
    # what the heartbeat thread then sends (it adds its own stats) passes the schema
    own = dict.fromkeys(HB_OWN_STATS, 0.1)
    assert SCHEMA.validate("HB", {"stats": dict(trimmed, **own)}, 0)
    assert not SCHEMA.validate("HB", {"stats": dict(stats, **own)}, 0)  # untrimmed: dropped


def test_stats_under_the_bound_are_left_alone():
    stats = {"num_waiting": 1, "x": 2}
    assert trim_stats(stats, LIMIT) is stats
