"""The simulator beside the live `lumen bench` run under time slots on one H100 (issue 23 item 5).

    python benchmarks/sim_fidelity_slots_gpu.py --out docs/results/sim-fidelity-h100-slots-2026-12-07

The live run (docs/results/gpu-2026-12-07-slots/bench-runs.tgz, repro-qwen3-8b-slots/records/
no-failure-seed0.jsonl): 4 workers of the Qwen3-8B shape (random weights, bf16) on one H100 80GB HBM3,
`--device-share auto` (slots) `--slot-ms auto` (70 ms: `default_slot_s` of 16.38 GB / 2.1 TB/s + 1 ms),
`--num-blocks 500` (8,000 KV tokens per worker), `--max-model-len 2048`, the serve defaults `--max-batch
512` and (CUDA) `--chunk-tokens 1024`, stop-restart, no failure; `lumen bench` seed 0, `--qps 2.103444725547324
--duration 48 --lengths splitwise-conv --max-prompt 1024 --max-output 256`: 101 requests.

Part 1, fidelity (no failure): the same 101 requests (the workload of seed 0 is checked against the live
records: ids, arrivals, lengths), simulated with 4 workers, workers_per_device 4, slots of 70 ms (and, for
contrast, `shared`), kv_tokens 8000, chunk 1024, max batch 512, policy stop-restart, no failure, under
four step-cost models:

  profile    the fit of `lumen profile --quick` on a whole H100 the same day (16 rows,
             docs/results/device-share-gpu-2026-12-07/block/profile_gpu.csv): what the brief asks for
  live-fit   the mean of the 4 live workers' own step-time fits at the end of the run (`step_c0..c5` in
             the run's end state, `policy.fit_step_time` on their in-slot steps; c2 + c5 as the per-
             sequence cost, exact where no step verifies drafts): a diagnostic, in-sample for step cost
  roofline   the simulator's default for qwen3-8b on an h100 (no profile)
  measured-prefill   diagnostic, in-sample: decode steps as live-fit, a step carrying prefill as long as
             the live token times show (medians: a 1,024-token prompt's first chunk, its last small chunk,
             a single-chunk shorter prompt)

and two slot gates: "exact" (the simulator's: `start_at` asked with the step's cost) and "ema" (diagnostic:
the live worker's, `start_at` asked with the EMA of its past prefill-carrying steps for a prefill step, of
its decode steps otherwise; `EmaGate`), each under the current `start_at` and the one before 0ef64ed that
the live run ran. The bench's calibration probe (64 requests at t = 0) is simulated too (makespan).

The live slot phase is not logged; it is found from the token times (a cycle of 4 x 70 ms: tokens almost never
arrive in the first ~7 ms of a slot, when its first step is still running), and the simulated arrivals are
shifted so that the simulated slots line up with the live ones (`--phase-sweep` shows how much the phase
matters). The same token times give each request's worker (its tokens fall in one slot of the cycle), and
each live worker's visible steps (token times of its requests within 1.5 ms of each other), steps per slot
used, in-slot gaps by batch size (the live decode step, loop included) and first tokens that arrive after
their worker's slot has ended (an overrunning step).

Part 2, prediction (NOT a fidelity result: no live failure run exists): seeds 0-4 of the same workload
with worker 1 failing at 10 s (the live bench's `t=10s:worker=1:SIGKILL`), restart calibrated to the live
restarted worker's 24.6-25.5 s from kill to SERVING (docs/gpu-results.md; its phases: process up 5.0-5.4 s
after the kill, disk -> host 14.5-14.8 s, host -> device 1.51 s and warm-up 3.6-3.9 s, both gated by its
slot), policies stop-restart, fixed-ckpt, lumen, lumen-no-spec, summarised as `lumen bench` does (window
101 // 12 = 8, threshold 0.05, settle 3, recovery not before the failure, outage = failure .. the killed
worker SERVING again), under the profile (exact gate) and measured-prefill (EMA gate); `--qps-sweep` runs
stop-restart at other rates to find where the kill costs latency.

Other GPUs (the H200 runs of 2026-12-07, docs/simulation.md 4.11): no profile exists, so `--profile none
--models measured-prefill live-fit` with the costs from that archive's own no-failure runs (`--cost-runs`:
every worker's fit, each prefill median the mean of the runs'), the restart calibrated to the mean of its
failure runs' reloads (`--restart-runs`: kill -> SERVING and the restarted worker's phases from each end
state), `--step-overhead-ms` as a sensitivity (more per fitted step: the live loop's time the fit leaves out),
`--per-seed` for the sweep's seeds; testbed.json records the costs and the calibration:

    python benchmarks/sim_fidelity_slots_gpu.py --live docs/results/gpu-2026-12-07e-slots-q2.7-h200/bench-runs.tgz \
        --gpu h200 --profile none --models measured-prefill live-fit --step-overhead-ms 0 1 \
        --cost-runs no-failure-seed0 no-failure-seed1 no-failure-seed2 \
        --restart-runs stop-restart-seed0 stop-restart-seed1 stop-restart-seed2 lumen-no-spec-seed0 lumen-no-spec-seed1 \
        --part none --per-seed --qps-sweep 2.7 3.0 3.2 3.4 3.6 3.8 4.0 4.5 --out <dir>

Only the Python API is used (the CLI has no --max-prompt/--max-output); Simulator._apply and _transition
are wrapped to count each worker's iterations and slots and to see when the restarted worker serves.
Nothing under src/ is changed.
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import math
import os
import platform
import statistics
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import lumen.policy.slots as slots_mod
from lumen.bench.runner import BenchConfig
from lumen.metrics import RequestRecord, ci95, summarize_run
from lumen.policy import WorkerState as S
from lumen.sim import FailurePlan, FailureSpec, SimConfig, load_profile
from lumen.sim.core import Simulator
from lumen.sim.cost import FittedCost
from lumen.workload import RequestSpec, make_workload

LIVE_TGZ = Path("docs/results/gpu-2026-12-07-slots/bench-runs.tgz")
LIVE_PREFIX = "repro-qwen3-8b-slots/records/no-failure-seed0"
PROFILE = Path("docs/results/device-share-gpu-2026-12-07/block/profile_gpu.csv")
QPS = 2.103444725547324
DURATION = 48.0
LENGTHS = "splitwise-conv"
MAX_PROMPT, MAX_OUTPUT = 1024, 256
SLOT_MS = 70.0
WORKERS = 4
KV_TOKENS = 8000          # --num-blocks 500 of 16 tokens
CHUNK = 1024              # EngineConfig.chunk_tokens on CUDA (serve: --chunk-tokens default None -> 1024)
MAX_BATCH = 512           # serve --max-batch default
WINDOW = BenchConfig(window=None).window_for(101)  # lumen bench --window auto, for the live run's 101 requests
THRESHOLD, SETTLE = 0.05, 3
FAIL_AT, FAIL_WORKER = 10.0, 1
# restart, calibrated to the live restarted worker (2026-12-07 blocks 1 and 2): kill -> SERVING 24.63 / 25.51 s
WEIGHT_BYTES = 16_381_452_288   # the simulator's qwen3-8b (the live files: 16,381,517,032 bytes)
LIVE_KILL_TO_SERVING = (24.63, 25.51)
LIVE_PHASES = {"kill_to_switching_s": (5.02, 5.37), "disk_to_host_s": (14.51, 14.76),
               "weights_to_device_s": (1.514, 1.507), "engine_init_s": (0.026, 0.018), "warmup_s": (3.556, 3.856)}
GAP_KEYS = ("ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "tpot_mean_s", "tpot_p99_s", "e2e_mean_s",
            "ttft_mean_prompt_1024_s", "ttft_mean_prompt_lt_1024_s")
POLICIES = ("stop-restart", "fixed-ckpt", "lumen", "lumen-no-spec")


# ------------------------------------------------------------------ live side
def load_live(tgz: Path, prefix: str = LIVE_PREFIX) -> tuple[list[dict], dict]:
    """One live run of a bench's runs archive: its records (sorted by id) and end state (.run.json)."""
    with tarfile.open(tgz) as tf:
        recs = [json.loads(ln) for ln in io.TextIOWrapper(tf.extractfile(prefix + ".jsonl"), "utf-8") if ln.strip()]
        run = json.load(tf.extractfile(prefix + ".run.json"))
    recs.sort(key=lambda r: r["req_id"])
    return recs, run


def live_runs(tgz: Path, names: list[str]) -> list[tuple[list[dict], dict]]:
    """The runs `names` (e.g. no-failure-seed1) of a bench's runs archive, wherever its records directory
    is: [(records, end state)], in the order given."""
    with tarfile.open(tgz) as tf:
        where = {Path(m.name).name.removesuffix(".run.json"): m.name.removesuffix(".run.json")
                 for m in tf.getmembers() if m.name.endswith(".run.json") and "/records/" in m.name}
    missing = [n for n in names if n not in where]
    if missing:
        raise SystemExit(f"{tgz} has no run {', '.join(missing)} (it has {', '.join(sorted(where))})")
    return [load_live(tgz, where[n]) for n in names]


def to_records(recs: list[dict]) -> list[RequestRecord]:
    return [RequestRecord(r["req_id"], r["arrival"], r["first_token"], r["finish"], r["prompt_tokens"],
                          r["output_tokens"], r["interrupted"], r["error"], r.get("token_times")) for r in recs]


def workload(seed: int, qps: float = QPS) -> list[RequestSpec]:
    return make_workload(math.ceil(DURATION * qps), qps, LENGTHS, seed=seed, max_prompt=MAX_PROMPT, max_output=MAX_OUTPUT)


def check_workload(recs: list[dict], seed: int = 0, qps: float = QPS) -> dict:
    """The simulated workload of `seed` at `qps` against a live run's records (sorted by id)."""
    wl = workload(seed, qps)
    mism = [s.req_id for s, r in zip(wl, recs, strict=False)
            if (s.req_id, s.prompt_tokens, s.output_tokens) != (r["req_id"], r["prompt_tokens"], r["output_tokens"])]
    dt = max(abs(s.arrival - r["arrival"]) for s, r in zip(wl, recs, strict=False))
    return {"sim_requests": len(wl), "live_requests": len(recs), "mismatched_ids_or_lengths": mism,
            "max_arrival_diff_s": dt, "identical": len(wl) == len(recs) and not mism and dt < 1e-9}


def slot_phase(recs: list[dict], slot: float) -> float:
    """Where (mod slot) the live slots begin: the start of the 7 ms window (0.5 ms steps) holding the
    fewest token arrivals (a slot's first step is still running then)."""
    t = np.concatenate([np.asarray(r["token_times"]) for r in recs])
    ph = np.mod(t, slot)
    best, arg = None, 0.0
    for x in np.arange(0.0, slot, 0.0005):
        n = int(np.sum(np.mod(ph - x, slot) < 0.007))
        if best is None or n < best:
            best, arg = n, float(x)
    return arg


def live_analysis(recs: list[dict], slot: float, count: int, phase: float, cost_models: dict) -> dict:
    def slotno(t):
        return np.floor((np.asarray(t) - phase) / slot).astype(int)

    def own_start(t: float, w: int) -> float:
        k = int(slotno(t))
        while k % count != w:
            k -= 1
        return phase + k * slot

    owner, purity = {}, []
    for r in recs:
        c = collections.Counter((slotno(r["token_times"]) % count).tolist())
        w, n = c.most_common(1)[0]
        owner[r["req_id"]] = w
        purity.append(n / len(r["token_times"]))
    workers = {}
    by_batch: dict[int, list[float]] = collections.defaultdict(list)
    for w in range(count):
        mine = [r for r in recs if owner[r["req_id"]] == w]
        ts = np.sort(np.concatenate([np.asarray(r["token_times"]) for r in mine]))
        steps = [[ts[0]]]
        for t in ts[1:]:
            if t - steps[-1][-1] > 0.0015:
                steps.append([t])
            else:
                steps[-1].append(t)
        ends = np.array([s[0] for s in steps])
        batch = np.array([len(s) for s in steps])
        sl = slotno(ends)
        same = np.diff(sl) == 0
        gaps = np.diff(ends)[same]
        for b, g in zip(batch[1:][same], gaps, strict=True):
            by_batch[int(b)].append(float(g))
        workers[w] = {"requests": len(mine), "visible_steps": len(ends), "slots_used": len(set(sl.tolist())),
                      "steps_per_slot": len(ends) / len(set(sl.tolist())),
                      "in_slot_gap_median_ms": float(np.median(gaps) * 1e3),
                      "tokens": int(sum(len(r["token_times"]) for r in mine))}
    decode = {}
    for b in sorted(by_batch):
        g = np.asarray(by_batch[b])
        if len(g) < 20:
            continue
        ctx = b * 800.0  # context tokens hardly matter here (c3 ~ 1e-7 s/token)
        decode[b] = {"n": len(g), "live_median_ms": float(np.median(g) * 1e3),
                     "live_p10_ms": float(np.percentile(g, 10) * 1e3), "live_p90_ms": float(np.percentile(g, 90) * 1e3),
                     **{f"{k}_ms": m.step_time(0, b, ctx) * 1e3 for k, m in cost_models.items()}}
    over = []
    for r in recs:
        o = r["first_token"] - own_start(r["first_token"], owner[r["req_id"]]) - slot
        over.append(o)
    over = np.asarray(over)
    late_tokens = sum(1 for r in recs for t in r["token_times"][1:]
                      if t - own_start(t, owner[r["req_id"]]) > slot + 0.0005)
    # prefill steps, timed from the token times: a request that waited since before its worker's slot
    # began and whose first token is that slot's first visible step (the step began at the slot's start)
    steps_of = {}
    for w in range(count):
        ts = np.sort(np.concatenate([np.asarray(r["token_times"]) for r in recs if owner[r["req_id"]] == w]))
        st: list[list] = []
        for t in ts:
            if st and t - st[-1][0] <= 0.0015:
                st[-1][1] += 1
            else:
                st.append([t, 1])
        steps_of[w] = st
    single, final, chunk1, idle_tail, two_slot = [], [], [], [], 0
    for r in recs:
        w, ft = owner[r["req_id"]], r["first_token"]
        s0 = own_start(ft - 0.0005, w)
        if r["arrival"] >= s0 or any(s0 <= t < ft - 0.0015 for t, _ in steps_of[w]):
            continue
        (final if r["prompt_tokens"] == 1024 else single).append(ft - s0)
        if r["prompt_tokens"] == 1024:
            p0 = s0 - count * slot
            prev = [t - p0 for t, _ in steps_of[w] if p0 <= t < p0 + slot + 0.0005]
            if r["arrival"] < p0 and len(prev) == 1:   # the 1024 - D chunk alone in the slot before
                two_slot += 1
                chunk1.append(prev[0])
                idle_tail.append(slot - prev[0])

    def q(v):
        v = np.asarray(v) * 1e3
        return {"n": len(v), "median_ms": float(np.median(v)), "p10_ms": float(np.percentile(v, 10)),
                "p90_ms": float(np.percentile(v, 90))} if len(v) else None
    # own slots from the arrival's to the first token's (1: the first own slot after the arrival)
    cycles = {"prompt_1024": collections.Counter(), "prompt_lt_1024": collections.Counter()}
    for r in recs:
        w = owner[r["req_id"]]
        k = int(slotno(r["arrival"]))
        while k % count != w:
            k -= 1
        n = 0
        while phase + k * slot < r["first_token"]:
            if phase + (k + 1) * slot > r["arrival"]:
                n += 1
            k += count
        cycles["prompt_1024" if r["prompt_tokens"] == 1024 else "prompt_lt_1024"][n] += 1
    prefill_steps = {"own_slots_arrival_to_first_token": {k: dict(sorted(v.items())) for k, v in cycles.items()},
                     "single_chunk_prompt_lt_1024": q(single), "final_chunk_prompt_1024": q(final),
                     "first_chunk_prompt_1024_alone_in_slot_before": q(chunk1),
                     "idle_rest_of_that_slot": q(idle_tail), "prompt_1024_first_token_one_cycle_later": two_slot}
    ttft = np.array([r["first_token"] - r["arrival"] for r in recs])
    p = np.array([r["prompt_tokens"] for r in recs])
    return {"prefill_steps": prefill_steps,"slot_phase_s": phase, "token_slot_purity_mean": float(np.mean(purity)),
            "token_slot_purity_min": float(np.min(purity)), "workers": workers, "decode_gap_by_batch": decode,
            "first_tokens_after_slot_end": int(np.sum(over > 0.0005)),
            "first_token_overrun_ms": sorted(round(float(x) * 1e3, 1) for x in over[over > 0.0005]),
            "later_tokens_after_slot_end": late_tokens,
            "later_tokens": int(sum(len(r["token_times"]) - 1 for r in recs)),
            "ttft_mean_prompt_1024_s": float(ttft[p == 1024].mean()), "n_prompt_1024": int(np.sum(p == 1024)),
            "ttft_mean_prompt_lt_1024_s": float(ttft[p < 1024].mean())}


# ------------------------------------------------------------------ simulator side
def live_fit_cost(*runs: dict) -> tuple[FittedCost, list[list[float]]]:
    """The mean of the live workers' step-time fits (`step_c0..c5`) in the end states of `runs`
    (every worker of every run alike), and each worker's coefficients."""
    cs = []
    for run in runs:
        for w in run["cluster_end"]["workers"]:
            s = w["stats"]
            cs.append([s["step_c0"], s["step_c1"], s["step_c2"], s["step_c3"], s["step_c4"], s["step_c5"]])
    m = np.mean(np.asarray(cs), axis=0)
    # S = D (no verify positions): c2 + c5 per decoding sequence
    return FittedCost((float(m[0]), float(m[1]), float(m[2] + m[5]), float(m[3]), float(m[4]))), cs


class MeasuredPrefill:
    """Diagnostic, in-sample: decode-only steps as `decode` (the live workers' fit), a step carrying
    prefill as the live token times timed them (`live_analysis` prefill_steps, medians): a prompt's
    first 1024 - D chunk (P >= big_from), its small last chunk (P <= small_to), else a single-chunk
    prompt."""

    def __init__(self, decode, big_s: float, small_s: float, single_s: float, big_from: int = 1000, small_to: int = 64):
        self.decode, self.big_s, self.small_s, self.single_s = decode, big_s, small_s, single_s
        self.big_from, self.small_to = big_from, small_to

    def step_time(self, p: int, d: int, c: float) -> float:
        if p <= 0:
            return self.decode.step_time(0, d, c)
        return self.big_s if p >= self.big_from else self.small_s if p <= self.small_to else self.single_s


def _old_start_at(self, t: float, step_s: float) -> float:
    """SlotSchedule.start_at before 0ef64ed (2026-12-07 05:01), the rule the live run (04:40) ran: a step
    shorter than a slot starts only where it fits; a longer one only in the first 10% of a slot."""
    start, end = self.window(t)
    now = max(t, start)
    if step_s < self.slot_s:
        if now + step_s <= end:
            return now
    elif now - start <= slots_mod.LONG_STEP_START_FRACTION * self.slot_s:
        return now
    return self.window(end)[0]


EMA_WEIGHT = 0.2            # engine.py: ema = 0.8 * ema + 0.2 * dt, per kind of step
UNKNOWN_STEP_SLOT_SHARE = 0.5  # worker.py: a step of unknown length counts as half a slot


class EmaGate:
    """Diagnostic (gate="ema"): the live worker's slot gate inside the simulator. The live worker asks
    start_at with `engine.expected_step_s()`, the EMA of its past prefill-carrying steps for a step
    that will run prefill, else of its past decode-only steps (0: half a slot); the simulator asks it
    with the step's exact cost. This proxy of a worker's SlotSchedule substitutes the EMA; the step
    still lasts its cost (so a step the EMA underestimates overruns, one it overestimates waits)."""

    def __init__(self, sched, w):
        self._s, self._w = sched, w
        self.ema_pf = self.ema_dec = 0.0

    def __getattr__(self, name):
        return getattr(self._s, name)

    def start_at(self, t: float, step_s: float) -> float:
        est = (self.ema_pf or self.ema_dec) if self._w.ep_p > 0 else (self.ema_dec or self.ema_pf)
        return self._s.start_at(t, est or UNKNOWN_STEP_SLOT_SHARE * self._s.slot_s)

    def wait_s(self, t: float, step_s: float) -> float:
        return self.start_at(t, step_s) - t

    def record(self, prefill: bool, dt: float, n: int) -> None:
        for _ in range(n):
            if prefill:
                self.ema_pf = dt if not self.ema_pf else (1 - EMA_WEIGHT) * self.ema_pf + EMA_WEIGHT * dt
            else:
                self.ema_dec = dt if not self.ema_dec else (1 - EMA_WEIGHT) * self.ema_dec + EMA_WEIGHT * dt


class Counted:
    """A Simulator with per-worker iteration, slot and overrun counts and state-change times."""

    def __init__(self, cfg: SimConfig, wl, policy: str, failures, seed: int, gate: str = "exact"):
        self.sim = sim = Simulator(cfg, wl, policy, failures, seed)
        if gate == "ema":
            for w in sim.workers:
                if w.slot is not None:
                    w.slot = EmaGate(w.slot, w)
        self.iters = collections.Counter()
        self.slots: dict[int, set] = collections.defaultdict(set)
        self.overruns = collections.Counter()
        self.prefill_overruns = collections.Counter()
        self.serving_at: dict[int, list[float]] = collections.defaultdict(list)
        orig_apply, orig_tr = sim._apply, sim._transition

        def apply(w, n, t):
            self.iters[w.id] += n
            if w.slot is not None and n:
                dt = w.ep_dt
                for i in range(n):
                    s0 = sim._iter_start(w, i, dt)
                    st, en = w.slot.window(s0)
                    self.slots[w.id].add(round(st, 6))
                    if s0 + dt > en + 1e-9:
                        self.overruns[w.id] += 1
                        if w.ep_p:
                            self.prefill_overruns[w.id] += 1
                if isinstance(w.slot, EmaGate):
                    w.slot.record(w.ep_p > 0, w.ep_dt, n)
            return orig_apply(w, n, t)

        def transition(w, ev):
            before = w.state
            orig_tr(w, ev)
            if w.state is S.SERVING and before is not S.SERVING:
                self.serving_at[w.id].append(sim.now)

        sim._apply = apply            # type: ignore[method-assign]
        sim._transition = transition  # type: ignore[method-assign]

    def run(self):
        t0 = time.perf_counter()
        res = self.sim.run()
        self.wall_s = time.perf_counter() - t0
        return res

    def per_worker(self) -> dict:
        out = {}
        for w in range(self.sim.cfg.workers):
            used = len(self.slots[w])
            out[w] = {"iterations": self.iters[w], "slots_used": used or None,
                      "steps_per_slot": self.iters[w] / used if used else None,
                      "overruns": self.overruns[w], "prefill_overruns": self.prefill_overruns[w]}
        return out


def base_cfg(cost, share: str, **kw) -> SimConfig:
    return SimConfig(workers=WORKERS, model="qwen3-8b", device="h100", tp=1, workers_per_device=WORKERS,
                     device_share=share, slot_ms=SLOT_MS if share == "slots" else None, kv_tokens=KV_TOKENS,
                     chunk_tokens=CHUNK, max_batch=MAX_BATCH, cost=cost, **kw)


def shifted(wl: list[RequestSpec], dt: float) -> list[RequestSpec]:
    return [replace(s, arrival=s.arrival + dt) for s in wl]


def unshift(records: list[RequestRecord], dt: float) -> list[RequestRecord]:
    def f(x):
        return None if x is None else x - dt
    return [replace(r, arrival=r.arrival - dt, first_token=f(r.first_token), finish=f(r.finish),
                    token_times=None) for r in records]


def metrics(records: list[RequestRecord]) -> dict:
    s = summarize_run(records, records, window=WINDOW, threshold=THRESHOLD, settle=SETTLE)
    ttft = sorted(r.first_token - r.arrival for r in records if r.first_token is not None)
    return {"ttft_mean_s": s.ttft_mean, "ttft_p50_s": float(np.median(ttft)), "ttft_p99_s": s.ttft_p99,
            "tpot_mean_s": s.tpot_mean, "tpot_p99_s": s.tpot_p99, "e2e_mean_s": s.e2e_mean,
            "n_completed": s.n_completed, "n_errors": s.n_errors, "duration_s": s.duration_s,
            "ttft_mean_prompt_1024_s": float(np.mean([r.first_token - r.arrival for r in records if r.prompt_tokens == 1024])),
            "ttft_mean_prompt_lt_1024_s": float(np.mean([r.first_token - r.arrival for r in records if r.prompt_tokens < 1024]))}


def fidelity(a, recs, run, out: Path) -> dict:
    live_recs = to_records(recs)
    live = metrics(live_recs)
    prof = load_profile(a.profile)
    lfit, per_worker_coef = live_fit_cost(run)
    cm = {"profile": prof, "live_fit": lfit, "roofline": base_cfg(None, "slots").cost_model()}
    slot = SLOT_MS / 1e3
    phase = slot_phase(recs, slot)
    la = live_analysis(recs, slot, WORKERS, phase, cm)
    ps = la["prefill_steps"]
    meas = MeasuredPrefill(lfit, ps["first_chunk_prompt_1024_alone_in_slot_before"]["median_ms"] / 1e3,
                           ps["final_chunk_prompt_1024"]["median_ms"] / 1e3, ps["single_chunk_prompt_lt_1024"]["median_ms"] / 1e3)
    costs = {"profile": prof, "live-fit": lfit, "roofline": None, "measured-prefill": meas}
    print("live prefill steps (slot start -> first token etc.):", json.dumps(ps))
    # live slot k (k * slot + phase) is simulated slot k: shift arrivals by slot - phase (mod slot)
    shift = (slot - phase) % slot
    wl = workload(0)
    shape = {k: {"decode_1_ctx1100_ms": m.step_time(0, 1, 1100) * 1e3, "decode_4_ctx4000_ms": m.step_time(0, 4, 4000) * 1e3,
                 "prefill_512_ms": m.step_time(512, 0, 512) * 1e3, "prefill_1024_ms": m.step_time(1024, 0, 1024) * 1e3}
             for k, m in cm.items()}
    result = {"live": live, "live_analysis": la, "workload_check": check_workload(recs), "shift_s": shift,
              "cost": {"profile": {"coef": prof.coef, "rows": prof.rows, "r2": prof.r2, "mean_abs_rel_err": prof.mean_abs_rel_err},
                       "live_fit": {"coef": lfit.coef, "per_worker_c0_c5": per_worker_coef},
                       "step_ms": shape},
              "runs": []}
    print(f"workload check: {result['workload_check']}")
    print(f"live: TTFT mean {live['ttft_mean_s'] * 1e3:.1f} ms, P99 {live['ttft_p99_s'] * 1e3:.1f}, "
          f"TPOT mean {live['tpot_mean_s'] * 1e3:.2f} ms; slot phase {phase * 1e3:.1f} ms (shift {shift * 1e3:.1f} ms)")
    rules = {"new": None, "old": _old_start_at}
    variants = [("slots", "exact", "new"), ("slots", "exact", "old"), ("slots", "ema", "old"), ("slots", "ema", "new"),
                ("shared", "exact", None)]
    for cname, cost in costs.items():
        for share, gate, rule in variants:
            cfg = base_cfg(cost, share)
            saved = slots_mod.SlotSchedule.start_at
            if rule is not None and rules[rule] is not None:
                slots_mod.SlotSchedule.start_at = rules[rule]
            try:
                c = Counted(cfg, shifted(wl, shift), "stop-restart", None, 0, gate=gate)
                res = c.run()
            finally:
                slots_mod.SlotSchedule.start_at = saved
            m = metrics(unshift(res.records, shift))
            gap = {k: (m[k] - live[k]) / live[k] for k in GAP_KEYS}
            row = {"cost": cname, "share": share, "gate": gate if share == "slots" else None, "start_rule": rule, **m,
                   "gap": gap, "per_worker": c.per_worker(), "sim_wall_s": c.wall_s,
                   "stats": {"iterations": res.stats.iterations, "steps": res.stats.steps, "events": res.stats.events}}
            result["runs"].append(row)
            pw = row["per_worker"].values()
            print(f"{cname:9s} {share:6s} gate {str(row['gate']):5s} rule {str(rule):4s}: TTFT mean {m['ttft_mean_s'] * 1e3:6.1f} "
                  f"({gap['ttft_mean_s']:+.1%}) P99 {m['ttft_p99_s'] * 1e3:6.1f} ({gap['ttft_p99_s']:+.1%})  TPOT "
                  f"{m['tpot_mean_s'] * 1e3:5.2f} ({gap['tpot_mean_s']:+.1%})  TTFT P=1024 {m['ttft_mean_prompt_1024_s'] * 1e3:5.0f} "
                  f"P<1024 {m['ttft_mean_prompt_lt_1024_s'] * 1e3:5.0f}  iters {[v['iterations'] for v in pw]}"
                  f"  steps/slot {[None if v['steps_per_slot'] is None else round(v['steps_per_slot'], 2) for v in pw]}"
                  f"  overruns {[v['overruns'] for v in pw]}", flush=True)
    # the bench's calibration probe (runner._calibrate): 64 requests of seed 1,000,003 at t = 0; live makespan 27.38 s
    cal = json.load(io.TextIOWrapper(tarfile.open(a.live).extractfile("repro-qwen3-8b-slots/results.json"), "utf-8"))["meta"]["calibration"]
    probe = [RequestSpec(q.req_id, 0.0, q.prompt_tokens, q.output_tokens)
             for q in make_workload(cal["probe_requests"], 1.0, LENGTHS, seed=1_000_003, max_prompt=MAX_PROMPT, max_output=MAX_OUTPUT)]
    result["calibration_probe"] = {"live_makespan_s": cal["makespan_s"], "live_rps": cal["saturated_rps"], "sim": []}
    for cname, cost in costs.items():
        for share, gate in (("slots", "exact"), ("slots", "ema"), ("shared", "exact")):
            res = Counted(base_cfg(cost, share), probe, "stop-restart", None, 0, gate=gate).run()
            mk = max(r.finish for r in res.records)
            result["calibration_probe"]["sim"].append({"cost": cname, "share": share, "gate": gate, "makespan_s": mk,
                                                       "gap": (mk - cal["makespan_s"]) / cal["makespan_s"]})
            print(f"calibration probe ({cal['probe_requests']} at t=0): {cname:16s} {share:6s} gate {gate:5s} makespan {mk:6.2f} s "
                  f"(live {cal['makespan_s']:.2f} s, {(mk - cal['makespan_s']) / cal['makespan_s']:+.1%})")
    # how much the slot phase matters (slots, new rule): arrivals shifted by 0 .. cycle in steps of 35 ms
    if a.phase_sweep:
        result["phase_sweep"] = []
        for cname, gate in (("profile", "exact"), ("live-fit", "exact"), ("measured-prefill", "ema")):
            vals = []
            for k in range(8):
                s = k * 0.035
                c = Counted(base_cfg(costs[cname], "slots"), shifted(wl, s), "stop-restart", None, 0, gate=gate)
                m = metrics(unshift(c.run().records, s))
                vals.append({"shift_s": s, "ttft_mean_s": m["ttft_mean_s"], "ttft_p99_s": m["ttft_p99_s"], "tpot_mean_s": m["tpot_mean_s"]})
            result["phase_sweep"].append({"cost": cname, "gate": gate, "runs": vals})
            tt = [v["ttft_mean_s"] * 1e3 for v in vals]
            tp = [v["tpot_mean_s"] * 1e3 for v in vals]
            print(f"phase sweep {cname} gate {gate}: TTFT mean {min(tt):.1f}-{max(tt):.1f} ms, TPOT {min(tp):.2f}-{max(tp):.2f} ms over 8 shifts")
    (out / "fidelity.json").write_text(json.dumps(result, indent=1, default=float))
    with (out / "fidelity.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["cost", "share", "gate", "start_rule", "metric", "live", "sim", "gap"])
        for r in result["runs"]:
            for k in GAP_KEYS:
                w.writerow([r["cost"], r["share"], r["gate"], r["start_rule"], k, f"{live[k]:.6f}", f"{r[k]:.6f}", f"{r['gap'][k]:.4f}"])
    return result


# ------------------------------------------------------------------ prediction
def restart_cfg() -> dict:
    """detect 0.3 s + restart_s to the new process (live: switching 5.0-5.4 s after the kill), disk at
    the live read rate, then host -> device and warm-up, which the simulator runs in the worker's own
    slots only (about 4x their work on a 4-slot cycle, as the live gated copy and warm-up took)."""
    return restart_settings(statistics.mean(LIVE_PHASES["kill_to_switching_s"]),
                            statistics.mean(LIVE_PHASES["disk_to_host_s"]),
                            statistics.mean(LIVE_PHASES["weights_to_device_s"]),
                            statistics.mean(LIVE_PHASES["engine_init_s"]) + statistics.mean(LIVE_PHASES["warmup_s"]))


def restart_settings(up_s: float, disk_s: float, h2d_s: float, warm_s: float) -> dict:
    """SimConfig's restart fields from a reload's measured phases: kill -> process up (detection 0.3 s of it),
    the disk read, and the host -> device copy and warm-up, which ran gated by the worker's own slots."""
    return {"detect_s": 0.3, "restart_s": max(0.0, up_s - 0.3), "disk_gbps": WEIGHT_BYTES / disk_s / 1e9,
            "h2d_gbps": WEIGHT_BYTES / (h2d_s / WORKERS) / 1e9, "warmup_s": warm_s / WORKERS}


def reload_of(run: dict) -> tuple[float, dict] | None:
    """A failure run's restarted worker from its end state (.run.json): (kill -> SERVING as the bench
    counts it, outage_end_s - the kill's injected_s; the worker's load phases), None where it did not return."""
    kill = [e["injected_s"] for e in run.get("events", []) if e.get("worker") == FAIL_WORKER]
    for w in (run.get("cluster_end") or {}).get("workers", []):
        if w.get("id") == FAIL_WORKER and w.get("epoch", 1) > 1 and kill and run.get("outage_end_s") is not None:
            return run["outage_end_s"] - kill[0], w.get("phases_s", {})
    return None


def reload_parts(kill_to_serving_s: float, phases: dict) -> tuple[float, float, float, float]:
    """One live reload as `restart_settings` takes it: the process comes up (what kill -> SERVING leaves
    after the load phases), then the disk read, the host -> device copy and the warm-up (engine init
    included). Lumen's `disk_to_host_s` counts from the start of its draft phase: the target's read is
    what follows `target_read_start_s` (0 with a resident draft)."""
    disk = phases["disk_to_host_s"] - phases.get("target_read_start_s", 0.0)
    h2d = phases["weights_to_device_s"]
    warm = phases.get("engine_init_s", 0.0) + phases.get("warmup_s", 0.0)
    return kill_to_serving_s - disk - h2d - warm, disk, h2d, warm


def restart_from_reloads(reloads: list[tuple[float, dict]]) -> dict:
    """The restart calibrated to several live reloads [(kill -> SERVING, phases)]: each part the mean of theirs."""
    return restart_settings(*(statistics.mean(c) for c in zip(*(reload_parts(k, p) for k, p in reloads), strict=True)))


def failure_run(cfg: SimConfig, wl, policy: str, seed: int, gate: str, base_records, window: int):
    """One simulated failure run (worker FAIL_WORKER at FAIL_AT) summarised against the no-failure run's
    records as `lumen bench` does: (summary dict with kill_to_serving_s, simulator result, Counted)."""
    c = Counted(cfg, wl, policy, FailurePlan((FailureSpec(FAIL_AT, workers=(FAIL_WORKER,)),)), seed, gate=gate)
    res = c.run()
    back = [t for t in c.serving_at[FAIL_WORKER] if t > FAIL_AT]
    outage_end = back[0] if back else None
    d = summarize_run(res.records, base_records, window=window, threshold=THRESHOLD, settle=SETTLE, policy=policy,
                      seed=seed, failure_times=res.failure_times, not_before=FAIL_AT, outage_end=outage_end).to_dict()
    d["kill_to_serving_s"] = None if outage_end is None else outage_end - FAIL_AT
    return d, res, c


PREFILL_KINDS = ("first_chunk_prompt_1024_alone_in_slot_before", "final_chunk_prompt_1024", "single_chunk_prompt_lt_1024")


def prefill_medians(recs) -> list[float]:
    """A live run's prefill steps from its token times (`live_analysis`), medians in s: a 1,024-token
    prompt's first chunk, its last chunk, a single-chunk shorter prompt (MeasuredPrefill's order)."""
    slot = SLOT_MS / 1e3
    ps = live_analysis(recs, slot, WORKERS, slot_phase(recs, slot), {})["prefill_steps"]
    return [ps[k]["median_ms"] / 1e3 for k in PREFILL_KINDS]


def measured_cost(recs, run, *more) -> MeasuredPrefill:
    """measured-prefill from a live run (records, end state), or from several (`more`: further
    (records, end state) pairs of the same testbed): the live fit of all their workers, each kind of
    prefill step the mean of the runs' medians."""
    pairs = [(recs, run), *more]
    lfit, _ = live_fit_cost(*(r for _, r in pairs))
    meds = [prefill_medians(rc) for rc, _ in pairs]
    return MeasuredPrefill(lfit, *(statistics.mean(m) for m in zip(*meds, strict=True)))


def with_step_overhead(cost, dt: float):
    """A live-fit or measured-prefill cost with `dt` s more per fitted step (measured-prefill: its decode
    steps; the prefill medians are wall times already): the live loop's time between the engine's steps
    and at a slot's edges, which the workers' fit leaves out."""
    if isinstance(cost, MeasuredPrefill):
        return MeasuredPrefill(with_step_overhead(cost.decode, dt), cost.big_s, cost.small_s, cost.single_s,
                               cost.big_from, cost.small_to)
    return replace(cost, coef=(cost.coef[0] + dt, *cost.coef[1:]))


def cost_models(models, pairs, step_overhead_ms=(0.0,), profile=None) -> list[tuple[str, object, str]]:
    """(name, step cost, slot gate) of the prediction's models (--models): the profile (exact gate), the
    live workers' fit (exact gate) and measured-prefill (EMA gate), these two from the live runs `pairs`,
    each with every step overhead in ms (0: as fitted; else named '<model>+<ms>ms')."""
    out = []
    for name in models:
        if name == "profile":
            out.append((name, load_profile(profile), "exact"))
            continue
        cost, gate = ((live_fit_cost(*(run for _, run in pairs))[0], "exact") if name == "live-fit"
                      else (measured_cost(*pairs[0], *pairs[1:]), "ema"))
        for ms in step_overhead_ms:
            out.append((name, cost, gate) if ms == 0 else (f"{name}+{ms:g}ms", with_step_overhead(cost, ms / 1e3), gate))
    return out


def prediction(a, pairs, out: Path, cal: dict) -> dict:
    rc = cal["restart"]
    result = {"restart": rc, "live_kill_to_serving_s": cal["kill_to_serving_s"], "live_phases": cal["phases"],
              "qps": a.prediction_qps, "window": BenchConfig(window=None).window_for(len(workload(0, a.prediction_qps))), "seeds": list(range(a.seeds)), "fail": f"t={FAIL_AT:g}s:worker={FAIL_WORKER}", "configs": []}
    rows = []
    for cname, cost, gate in cost_models(a.models, pairs, a.step_overhead_ms, a.profile):
        for share in ("slots", "shared"):
            if share == "shared" and not a.shared_prediction:
                continue
            gate = gate if share == "slots" else "exact"
            cfg = base_cfg(cost, share, ckpt_budget_gb=6.0, **rc)
            summaries = collections.defaultdict(list)
            restart_s = []
            for seed in range(a.seeds):
                wl = workload(seed, a.prediction_qps)
                base = Counted(cfg, wl, "stop-restart", None, seed, gate=gate)
                bres = base.run()
                for pol in POLICIES:
                    d, res, c = failure_run(cfg, wl, pol, seed, gate, bres.records, result["window"])
                    if d["kill_to_serving_s"] is not None:
                        restart_s.append(d["kill_to_serving_s"])
                    for k in ("window_mid_arrival", "window_mean_ttft", "baseline_window_mean_ttft"):
                        d.pop(k, None)
                    d.update(restores=res.stats.restores, recomputes=res.stats.recomputes,
                             assisted_steps=res.stats.assisted_steps, per_worker=c.per_worker())
                    summaries[pol].append(d)
            agg = {}
            for pol in POLICIES:
                ss = summaries[pol]
                agg[pol] = {k: ci95([x[k] if x[k] is not None else math.nan for x in ss])
                            for k in ("recovery_time_s", "affected_ttft_mean", "affected_ttft_p99", "affected_tpot_mean",
                                      "ttft_mean", "tpot_mean", "outage_ttft_vs_baseline", "outage_tpot_vs_baseline",
                                      "kill_to_serving_s", "affected_requests", "n_interrupted")}
                agg[pol]["recovered"] = sum(1 for x in ss if x["recovered"])
                agg[pol]["capacity_lost_seeds"] = sum(1 for x in ss if (x["outage_ttft_vs_baseline"] or 0) > 1)
                agg[pol]["baseline_ttft_mean"] = ci95([x["baseline_ttft_mean"] for x in ss])
                agg[pol]["baseline_tpot_mean"] = ci95([x["baseline_tpot_mean"] for x in ss])
            result["configs"].append({"cost": cname, "share": share, "gate": gate, "runs": summaries, "aggregate": agg,
                                      "kill_to_serving_s": [min(restart_s), max(restart_s)] if restart_s else None})
            print(f"\nprediction at {a.prediction_qps:g} req/s, {cname}, {share}, gate {gate}: {a.seeds} seeds, kill -> SERVING "
                  f"{min(restart_s):.2f}-{max(restart_s):.2f} s; no-failure TTFT {agg['stop-restart']['baseline_ttft_mean'][0] * 1e3:.0f} ms, "
                  f"TPOT {agg['stop-restart']['baseline_tpot_mean'][0] * 1e3:.1f} ms")
            print(f"  {'policy':14s} {'rec/all':>7s} {'recovery s':>14s} {'aff. TTFT ms':>16s} {'aff. TPOT ms':>14s} "
                  f"{'outage TTFT x':>14s} {'outage TPOT x':>14s}")
            for pol in POLICIES:
                g = agg[pol]

                def f(k, sc=1.0, d=1, g=g):
                    m, h = g[k]
                    return "-" if not math.isfinite(m) else f"{m * sc:.{d}f} ± {h * sc:.{d}f}" if math.isfinite(h) else f"{m * sc:.{d}f}"
                print(f"  {pol:14s} {g['recovered']:>3d}/{a.seeds:<3d} {f('recovery_time_s'):>14s} {f('affected_ttft_mean', 1e3, 0):>16s} "
                      f"{f('affected_tpot_mean', 1e3, 1):>14s} {f('outage_ttft_vs_baseline', 1, 2):>14s} {f('outage_tpot_vs_baseline', 1, 2):>14s}")
                rows.append({"cost": cname, "share": share, "gate": gate, "policy": pol, "recovered": g["recovered"], "runs": a.seeds,
                             **{f"{k}_mean": g[k][0] for k in g if isinstance(g[k], tuple)},
                             **{f"{k}_ci95": g[k][1] for k in g if isinstance(g[k], tuple)}})
    (out / "prediction.json").write_text(json.dumps(result, indent=1, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else float(x)))
    with (out / "prediction.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return result


def qps_sweep(a, pairs, out: Path, cal: dict) -> dict:
    """Where would the kill cost capacity? stop-restart's outage TTFT ratio (and the no-failure TTFT) at
    higher rates than the live 2.10 req/s, the same 48 s of arrivals, seeds as --seeds (a prediction)."""
    cfgs = {cname: (base_cfg(cost, "slots", ckpt_budget_gb=6.0, **cal["restart"]), gate)
            for cname, cost, gate in cost_models(a.models, pairs, a.step_overhead_ms, a.profile)}
    rows = []
    print("\nqps sweep (stop-restart, slots; mean over seeds; outage TTFT x = TTFT of arrivals while worker 1 is down "
          "over the same arrivals without the failure)")
    for cname, (cfg, gate) in cfgs.items():
        for qps in a.qps_sweep:
            vals = collections.defaultdict(list)
            for seed in range(a.seeds):
                wl = workload(seed, qps)
                window = max(5, len(wl) // 12)
                bres = Counted(cfg, wl, "stop-restart", None, seed, gate=gate).run()
                sm, _, _ = failure_run(cfg, wl, "stop-restart", seed, gate, bres.records, window)
                for k in ("baseline_ttft_mean", "baseline_tpot_mean", "outage_ttft_vs_baseline", "outage_tpot_vs_baseline",
                          "affected_ttft_mean", "recovery_time_s"):
                    vals[k].append(math.nan if sm[k] is None else sm[k])
                vals["recovered"].append(sm["recovered"])
            row = {"cost": cname, "gate": gate, "qps": qps, "requests": math.ceil(DURATION * qps),
                   **{k: ci95(v) for k, v in vals.items() if k != "recovered"}, "recovered": sum(vals["recovered"])}
            if a.per_seed:
                row["per_seed"] = {k: v for k, v in vals.items() if k != "recovered"}
            rows.append(row)
            print(f"  {cname:16s} {qps:5.2f} req/s: no-failure TTFT {row['baseline_ttft_mean'][0] * 1e3:6.0f} ms TPOT "
                  f"{row['baseline_tpot_mean'][0] * 1e3:5.1f} ms | outage TTFT x {row['outage_ttft_vs_baseline'][0]:.2f} ± "
                  f"{row['outage_ttft_vs_baseline'][1]:.2f}, TPOT x {row['outage_tpot_vs_baseline'][0]:.2f} | recovered "
                  f"{row['recovered']}/{a.seeds}", flush=True)
            if a.per_seed:
                ps = row["per_seed"]
                print(f"  {'':16s} {'':5s}        per seed: no-failure TTFT ms "
                      f"{[round(x * 1e3) for x in ps['baseline_ttft_mean']]}, outage TTFT x "
                      f"{[round(x, 2) for x in ps['outage_ttft_vs_baseline']]}", flush=True)
    (out / "qps_sweep.json").write_text(json.dumps(rows, indent=1, default=float))
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--live", type=Path, default=LIVE_TGZ, help="a bench's runs archive (bench-runs.tgz)")
    ap.add_argument("--profile", type=lambda x: None if x.lower() == "none" else Path(x), default=PROFILE,
                    help="a `lumen profile` CSV for the profile model, or 'none' (no profile of that GPU)")
    ap.add_argument("--gpu", default="h100",
                    help="the live runs' GPU, for the record (testbed.json). The simulator has no H200 device: "
                         "its step costs come from --cost-runs, and device 'h100' sets only the draft's roofline cost")
    ap.add_argument("--cost-runs", nargs="+", metavar="RUN",
                    help="the runs of --live (e.g. no-failure-seed0 no-failure-seed1) whose end states and token "
                         "times give live-fit and measured-prefill: all their workers' fits, each prefill step the "
                         "mean of their medians (default: the H100 run, LIVE_PREFIX; the fidelity part needs it)")
    ap.add_argument("--restart-runs", nargs="+", metavar="RUN",
                    help="calibrate the restart to the mean reload of these failure runs of --live (their end "
                         "states: kill -> SERVING and the restarted worker's phases; default: LIVE_PHASES, the H100's)")
    ap.add_argument("--models", nargs="+", choices=("profile", "live-fit", "measured-prefill"),
                    default=["profile", "measured-prefill"], help="prediction and sweep: the step-cost models")
    ap.add_argument("--per-seed", action="store_true", help="--qps-sweep: also keep and print each seed's figures")
    ap.add_argument("--step-overhead-ms", type=float, nargs="+", default=[0.0],
                    help="prediction and sweep, live-fit and measured-prefill: also (or only) with this much more "
                         "per fitted step (a sensitivity: the live loop's overhead the workers' fit leaves out)")
    ap.add_argument("--part", choices=("fidelity", "prediction", "all", "none"), default="all")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--phase-sweep", action="store_true")
    ap.add_argument("--qps-sweep", type=float, nargs="*", default=[], help="prediction: stop-restart at these rates too")
    ap.add_argument("--prediction-qps", type=float, default=QPS,
                    help="prediction: the bench's rate (default: the live run's calibrated %(default).3f; the GPU runs "
                         "of 2026-12-07 evening use QPS=2.7)")
    ap.add_argument("--shared-prediction", action="store_true", help="also predict under --device-share shared")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    if a.cost_runs and a.part in ("fidelity", "all"):
        ap.error("the fidelity part is the H100 run's (LIVE_PREFIX): with --cost-runs use --part prediction or none "
                 "(sim_vs_live_failures.py --no-failure sets other runs beside the simulator)")
    if "profile" in a.models and a.profile is None:
        ap.error("--models profile needs --profile")
    a.out.mkdir(parents=True, exist_ok=True)
    pairs = live_runs(a.live, a.cost_runs) if a.cost_runs else [load_live(a.live)]
    recs, run = pairs[0]
    import subprocess
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "python": platform.python_version(),
            "commit": rev, "nproc": os.cpu_count(),
            "argv": {k: str(v) for k, v in vars(a).items()}}
    (a.out / "meta.json").write_text(json.dumps(meta, indent=1))
    cal = {"restart": restart_cfg(), "kill_to_serving_s": LIVE_KILL_TO_SERVING, "phases": LIVE_PHASES}
    if a.restart_runs:
        reloads = [reload_of(r) for _, r in live_runs(a.live, a.restart_runs)]
        if None in reloads:
            raise SystemExit(f"no restarted worker {FAIL_WORKER} in {[n for n, x in zip(a.restart_runs, reloads, strict=True) if x is None]}")
        parts = list(zip(*(reload_parts(k, p) for k, p in reloads), strict=True))
        cal = {"restart": restart_from_reloads(reloads), "kill_to_serving_s": [k for k, _ in reloads],
               "phases": dict(zip(("process_up_s", "disk_to_host_s", "weights_to_device_s", "warmup_s"), parts, strict=True))}
    if a.cost_runs or a.restart_runs:
        lfit, coefs = live_fit_cost(*(r for _, r in pairs))
        meds = {n: prefill_medians(rc) for n, (rc, _) in zip(a.cost_runs or ["LIVE_PREFIX"], pairs, strict=True)}
        tb = {"gpu": a.gpu, "live": str(a.live), "cost_runs": a.cost_runs, "live_fit_coef": lfit.coef,
              "live_fit_per_worker_c0_c5": coefs, "prefill_medians_s": meds,
              "measured_prefill_s": [statistics.mean(m) for m in zip(*meds.values(), strict=True)],
              "prefill_kinds": PREFILL_KINDS, "restart_runs": a.restart_runs, **{f"calibration_{k}": v for k, v in cal.items()}}
        (a.out / "testbed.json").write_text(json.dumps(tb, indent=1))
        print(f"{a.gpu}: live-fit from {len(coefs)} workers of {a.cost_runs}: c0..c4 "
              f"{[f'{c:.3g}' for c in lfit.coef]}; decode 1 / 4 sequences {lfit.step_time(0, 1, 1100) * 1e3:.2f} / "
              f"{lfit.step_time(0, 4, 4000) * 1e3:.2f} ms")
        print(f"{a.gpu}: prefill medians ms (first chunk of 1,024, its last chunk, single chunk < 1,024) "
              + "; ".join(f"{n} {[round(x * 1e3, 1) for x in m]}" for n, m in meds.items())
              + f"; mean {[round(x * 1e3, 1) for x in tb['measured_prefill_s']]}")
        print(f"{a.gpu}: restart from {a.restart_runs or 'LIVE_PHASES'}: kill -> SERVING "
              f"{[round(k, 2) for k in cal['kill_to_serving_s']]} s; settings "
              + json.dumps({k: round(v, 4) for k, v in cal['restart'].items()}), flush=True)
    if a.part in ("fidelity", "all"):
        fidelity(a, recs, run, a.out)
    if a.part in ("prediction", "all"):
        prediction(a, pairs, a.out, cal)
    if a.qps_sweep:
        qps_sweep(a, pairs, a.out, cal)


if __name__ == "__main__":
    main()
