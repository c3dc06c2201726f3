"""benchmarks/sim_fidelity.py --device-share slots: the simulator side (no live cluster)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("sim_fidelity", ROOT / "benchmarks" / "sim_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(mod, share: str, slot_ms: float | None = None):
    # the parser's defaults, as main() completes them, with a short run of 4 workers
    return mod.argparse.Namespace(workers=4, requests=24, qps=0.5, lengths="fixed:32:16", max_prompt=None,
                                  max_output=None, fail_at=20.0, fail_worker=0, repeats=1, seed=0, window_n=5,
                                  chunk_tokens=256, kv_tokens=mod.DEFAULT_KV_TOKENS, detect_s=0.3, restart_s=5.0,
                                  fit="relative", device_share=share, slot_ms_live=slot_ms)


def test_slots_put_every_worker_in_turns_on_one_device(tmp_path):
    mod = _module()
    profile = tmp_path / "profile.csv"
    with profile.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("num_prefill_tokens", "num_decode_seqs", "total_context_tokens", "step_time_s"))
        for p in (0, 32, 256):
            for d in (0, 1, 4):
                if p or d:
                    w.writerow((p, d, p + 64 * d, 0.02 + 0.001 * p + 0.01 * d))
    log: dict = {}
    shared, _ = mod.run_sim(_args(mod, "shared"), profile, log, colocated=False)
    slots, _ = mod.run_sim(_args(mod, "slots", 200.0), profile, log, colocated=False)
    assert log["sim_independent"]["device_share"] == "slots" and log["sim_independent"]["slot_ms"] == 200.0
    ref = {name: next(s for s in runs if s.policy == "no-failure") for name, runs in (("shared", shared), ("slots", slots))}
    # a quarter of the device each: a token waits for the worker's next slot, so TPOT is far longer
    assert ref["slots"].tpot_mean > 2 * ref["shared"].tpot_mean


def test_live_slot_ms_is_what_the_cluster_reported(tmp_path):
    mod = _module()
    args = mod.argparse.Namespace(model="default", slot_ms="auto")
    assert mod.live_slot_ms(args, [({"slot_ms": None}, {}), ({"slot_ms": 321.0}, {})]) == 321.0
