"""Failure-free cost of LUMEN's checkpoint streaming: lumen vs stop-restart on the same seeded workload.

    python benchmarks/checkpoint_overhead.py --model default --workers 2 --qps 2 --requests 60
    python benchmarks/checkpoint_overhead.py --model preset:qwen3-8b --devices cuda:0,cuda:1 --qps 8

Both policies serve the same requests (same seed, same arrival times) with no failure. First an
unmeasured priming run (stop-restart, a short workload) takes the machine's one-time costs: kernels
compiled and cached on disk, weights in the page cache. On the H200 the first measured cluster of a
fresh machine was 5-11% slower in each of three runs (2026-12-04), which read as a negative lumen
overhead. Then the order alternates per repeat (stop-restart, lumen, then lumen, stop-restart, ...;
with a third arm its order reversed every other repeat) so that, over an even number of repeats,
drift of the machine hits every arm alike. Reports
mean TTFT and TPOT of each policy, the lumen/stop-restart ratio, and the checkpoint traffic lumen
generated (pages and bytes sent to holders, per second of the run). The lumen arm exports as `lumen
serve` does by default (at most every 100 ms); `--export-interval-ms X` adds a third arm in the same
run, lumen with `--ckpt-export-interval-ms X` (0: after every step, the brief's rule), and
`--replicas K` another, lumen with K checkpoint copies per request (issue 25; needs workers > K).

To tell where an overhead comes from, each run also reports (`engine`, `pages`):
- the engine's own step time over the measured requests (LUMEN_STEP_LOG, decode-only and prefill
  steps separately): a slower *step* under lumen means contention inside the step (GIL, GPU, copies
  on the step's stream); an unchanged step with a worse TPOT means time lost between steps;
- that time between steps, measured: the gap from one step's end to the next one's start on a
  worker with work, the worker loop's own cost (outputs sent, pages exported, commands polled, GIL
  waits). Gaps of GAP_BUSY_S or more count as idle time, not as loop cost: that cut is the idle
  worker's poll timeout, so it also drops any stall that long (`long_gaps` counts them apart);
- the worker loop's busy turns split into their parts (`loop`: commands polled, the step, outputs
  sent, pages exported, stats published; microseconds per turn), and the share of the run each
  worker's loop thread and page threads spent on a CPU: a part that grows under lumen without doing
  more work, with page threads on a CPU, points at the GIL;
- the engine-thread time the workers spent exporting pages (`ckpt_export_s`, per step);
- the fate of the pages: exported by the engine, sent, refused by the sender (queue bound, holder
  not draining), accepted and rejected by the holders, and requests left unprotected.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from lumen.bench.client import ClientConfig, replay
from lumen.bench.cluster import ClusterProcess, free_port, serve_command, wait_ready
from lumen.metrics import tpot, ttft
from lumen.runtime.ckpt_store import REJECT_REASONS
from lumen.runtime.worker import LOOP_PARTS
from lumen.workload import make_workload

PAGE_STATS = ("exported_pages", "export_deferred", "pages_sent", "pages_sent_later_copies", "pages_refused", "pages_stalled",
              "pages_forgotten", "pages_obsolete", "ckpt_pages_accepted", "ckpt_rejected_pages", "kv_early_held",
              *(f"ckpt_rejected_{r}" for r in REJECT_REASONS), "ckpt_export_s", "steps",
              "kv_tx_queued_s", "kv_tx_copy_wait_s", "kv_wait_s", "kv_tx_send_s", "kv_rx_pages",
              "kv_rx_busy_s")


# the worker loop's busy turns by part, and CPU time of its threads (stats of every worker, summed)
LOOP_STATS = ("loop_turns", *(f"loop_{part}_s" for part in LOOP_PARTS), "cpu_loop_s", "cpu_kv_tx_s", "cpu_kv_rx_s")


def loop_summary(stats: dict, elapsed_s: float, workers: int) -> dict:
    """Per busy turn of the worker loop, microseconds in each part (poll, step, outputs, export,
    stats); and per worker, the share of the run's wall time its threads were on a CPU."""
    turns = stats["loop_turns"]
    out = {f"{part}_us_per_turn": 1e6 * stats[f"loop_{part}_s"] / turns if turns else None for part in LOOP_PARTS}
    out["outside_step_us_per_turn"] = (1e6 * sum(stats[f"loop_{p}_s"] for p in LOOP_PARTS if p != "step") / turns
                                       if turns else None)
    for key in ("cpu_loop_s", "cpu_kv_tx_s", "cpu_kv_rx_s"):
        out[key.replace("_s", "_share")] = stats[key] / (elapsed_s * workers) if elapsed_s else None
    return out


GAP_BUSY_S = 0.02  # a longer pause between two steps is a worker without work, not loop overhead


def step_summary(step_dir: Path, t0: float, t1: float) -> dict:
    """Mean engine step times (ms) of the steps that ended in [t0, t1] (Unix s), over every worker's
    step log in step_dir: decode-only steps and steps with prefill tokens apart; and the mean gap
    between consecutive steps of a busy worker (its loop's time outside the step)."""
    dec, pre, batch, gaps, long_gaps = [], [], [], [], 0
    for path in sorted(step_dir.glob("worker*.csv")):
        prev_end = None
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    t, dt = float(row["time_s"]), float(row["step_time_s"])
                    prefill, decodes = int(row["num_prefill_tokens"]), int(row["num_decode_seqs"])
                except (KeyError, TypeError, ValueError):
                    continue
                if not t0 <= t <= t1:
                    continue
                if prev_end is not None:
                    if 0 <= t - dt - prev_end < GAP_BUSY_S:
                        gaps.append(t - dt - prev_end)
                    else:
                        long_gaps += 1
                prev_end = t
                if prefill:
                    pre.append(dt)
                else:
                    dec.append(dt)
                    batch.append(decodes)

    def mean_ms(xs: list[float]) -> float | None:
        return 1e3 * statistics.fmean(xs) if xs else None

    return {"decode_steps": len(dec), "mean_decode_step_ms": mean_ms(dec),
            "median_decode_step_ms": 1e3 * statistics.median(dec) if dec else None,
            "mean_decode_batch": statistics.fmean(batch) if batch else None,
            "prefill_steps": len(pre), "mean_prefill_step_ms": mean_ms(pre),
            "busy_gaps": len(gaps), "long_gaps": long_gaps, "mean_step_gap_ms": mean_ms(gaps),
            "p99_step_gap_ms": 1e3 * statistics.quantiles(gaps, n=100)[98] if len(gaps) >= 100 else None}


PRIME_REQUESTS = 20


def arm_order(arms: list, rep: int) -> list:
    """The arms in repeat rep's order: as given on even repeats, reversed on odd ones, so that over an
    even number of repeats every arm's mean position is the same (drift hits each alike)."""
    return list(arms) if rep % 2 == 0 else list(arms)[::-1]


async def one_run(args, policy: str, seed: int, log_dir: Path, requests: int | None = None,
                  label: str | None = None, extra: tuple[str, ...] = ()) -> dict:
    port = free_port()
    cmd = serve_command(args.model, args.workers, policy, port, devices=args.devices,
                        extra=[*(args.serve_args.split() if args.serve_args else ()), *extra])
    url = f"http://127.0.0.1:{port}"
    label = label or f"{policy}-{seed}"
    step_dir = log_dir / f"steps-{label}"
    env = dict(os.environ, LUMEN_STEP_LOG=str(step_dir))
    with ClusterProcess(cmd, log_dir / f"{label}.log", env=env) as proc:
        await wait_ready(url, 900, workers=args.workers, proc=proc.proc, log_path=proc.log_path)
        specs = make_workload(requests or args.requests, args.qps, lengths=args.lengths, seed=seed,
                              max_prompt=args.max_prompt, max_output=args.max_output)
        warm = make_workload(2 * args.workers, 100.0, lengths=args.lengths, seed=seed + 1000,
                             max_prompt=args.max_prompt, max_output=8)
        await replay(warm, ClientConfig(url=url))
        async with httpx.AsyncClient(base_url=url) as http:
            before = (await http.get("/lumen/cluster")).json()  # the warm-up's counters, subtracted below
        t0, w0 = time.monotonic(), time.time()
        records = await replay(specs, ClientConfig(url=url))
        elapsed, w1 = time.monotonic() - t0, time.time()
        await asyncio.sleep(0.3)  # a few heartbeats: the workers' counters as of the end of the run
        async with httpx.AsyncClient(base_url=url) as http:
            info = (await http.get("/lumen/cluster")).json()
    ok = [r for r in records if r.error is None and r.first_token is not None]

    def total(cluster: dict, key: str) -> float:
        return sum(float(w["stats"].get(key, 0) or 0) for w in cluster["workers"])

    page_stats = {k: total(info, k) - total(before, k) for k in PAGE_STATS}
    loop_stats = {k: total(info, k) - total(before, k) for k in LOOP_STATS}
    page_stats["unprotected_requests"] = info.get("unprotected_requests", 0) - before.get("unprotected_requests", 0)
    steps = page_stats.pop("steps")
    # the longest a page waited in a sender's queue, over the whole life of the workers (warm-up included)
    page_stats["kv_tx_queued_max_s"] = max((float(w["stats"].get("kv_tx_queued_max_s", 0) or 0)
                                            for w in info["workers"]), default=0.0)
    page_stats["ckpt_export_ms_per_step"] = 1e3 * page_stats["ckpt_export_s"] / steps if steps else None
    pages = int(page_stats["pages_sent"])
    page_bytes = max((int(w["stats"].get("ckpt_page_nbytes", 0)) for w in info["workers"]), default=0)
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    return {"policy": policy, "seed": seed, "completed": len(ok), "errors": len(records) - len(ok),
            "mean_ttft_s": statistics.fmean(ttft(r) for r in ok), "mean_tpot_s": statistics.fmean(tpots),
            "ckpt_pages_sent": pages, "ckpt_bytes_sent": pages * page_bytes, "elapsed_s": elapsed,
            "engine": step_summary(step_dir, w0, w1), "pages": page_stats,
            "loop": loop_summary(loop_stats, elapsed, args.workers)}


async def main_async(args) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix="ckpt-overhead-"))
    runs = []
    if args.prime:
        primed = await one_run(args, "stop-restart", args.seed, log_dir, requests=PRIME_REQUESTS, label="prime")
        print(json.dumps({"prime": {k: primed[k] for k in ("completed", "mean_ttft_s", "mean_tpot_s")}}), flush=True)
    # arm: (label, policy, extra serve arguments); every arm serves each repeat's seed, in an order
    # reversed every other repeat: over an even number of repeats each arm's mean position is the same
    arms = [("stop-restart", "stop-restart", ()), ("lumen", "lumen", ())]
    if args.export_interval_ms is not None:
        x = args.export_interval_ms
        arms.append((f"lumen-export-{x:g}ms" if x else "lumen-every-step", "lumen",
                     ("--ckpt-export-interval-ms", str(x))))
    if args.replicas is not None:
        arms.append((f"lumen-k{args.replicas}", "lumen", ("--ckpt-replicas", str(args.replicas))))
    by_repeat = []
    for rep in range(args.repeats):
        order = arm_order(arms, rep)
        done = {}
        for i, (label, policy, extra) in enumerate(order):
            r = await one_run(args, policy, args.seed + rep, log_dir, label=f"{label}-{args.seed + rep}", extra=extra)
            r["arm"], r["order"] = label, i
            print(json.dumps(r), flush=True)
            runs.append(r)
            done[label] = r
        by_repeat.append(done)
    summary = {}
    for label, _, _ in arms:
        rs = [r for r in runs if r["arm"] == label]
        summary[label] = {k: statistics.fmean(r[k] for r in rs) for k in ("mean_ttft_s", "mean_tpot_s")}
        for key in ("mean_decode_step_ms", "mean_prefill_step_ms", "mean_step_gap_ms"):
            xs = [r["engine"][key] for r in rs if r["engine"].get(key) is not None]
            summary[label][key] = statistics.fmean(xs) if xs else None
        summary[label]["loop"] = {k: statistics.fmean(r["loop"][k] for r in rs) if all(r["loop"][k] is not None for r in rs)
                                  else None for k in rs[0]["loop"]}

    def per_repeat(label: str) -> list[dict]:
        """Per repeat (same seed, the same few minutes): the arm over stop-restart."""
        out = []
        for done in by_repeat:
            a, b = done["stop-restart"], done[label]
            ratio = {k: b[k] / a[k] for k in ("mean_tpot_s", "mean_ttft_s")}
            for key, name in (("mean_decode_step_ms", "mean_decode_step"), ("mean_step_gap_ms", "mean_step_gap")):
                va, vb = a["engine"].get(key), b["engine"].get(key)
                ratio[name] = vb / va if va and vb else None
            out.append(ratio)
        return out

    def over_sr(label: str, key: str) -> float | None:
        a, b = summary["stop-restart"][key], summary[label][key]
        return b / a if a and b else None

    arm_ratios = {}
    for label, _, _ in arms[1:]:
        reps = per_repeat(label)
        arm_ratios[label] = {"tpot": over_sr(label, "mean_tpot_s"), "ttft": over_sr(label, "mean_ttft_s"),
                             "decode_step": over_sr(label, "mean_decode_step_ms"),
                             "step_gap": over_sr(label, "mean_step_gap_ms"),
                             "median_tpot_per_repeat": statistics.median(r["mean_tpot_s"] for r in reps),
                             "per_repeat": reps,
                             "ckpt_MBps": statistics.fmean(r["ckpt_bytes_sent"] / r["elapsed_s"]
                                                           for r in runs if r["arm"] == label) / 1e6}
    lumen = arm_ratios["lumen"]
    return {
        "env": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
                "python": platform.python_version()},
        "args": vars(args), "runs": runs, "summary": summary,
        "tpot_ratio_lumen_over_stop_restart": lumen["tpot"],
        "ttft_ratio_lumen_over_stop_restart": lumen["ttft"],
        "decode_step_ratio_lumen_over_stop_restart": lumen["decode_step"],
        "per_repeat_ratios": lumen["per_repeat"],
        "median_tpot_ratio": lumen["median_tpot_per_repeat"],
        "ckpt_MBps": lumen["ckpt_MBps"],
        "arm_ratios": arm_ratios,
    }


def engine_thread_costs(repeats: int = 5) -> dict:
    """`--engine-thread`: what checkpointing costs the worker's engine thread, without a cluster (the
    worker's own `_stream_pages`, its sender replaced by a counter; CPU, one thread).

    - idle: one loop turn when no page is due, for 4 / 16 / 64 protected decoding requests (best of
      `repeats` x 2,000 turns), tiny model;
    - export: engine-thread time per exported page of GPU size (1,835,008 B: 7 layers x 16 KV heads x
      128, fp32 -- the bytes of a Qwen3-1.7B bf16 page), 16 requests of 20-300 prompt tokens and 48
      output tokens, every other one protected; the median over `repeats` runs.
    """
    import random

    import torch

    from lumen.engine import Engine, EngineConfig, SamplingParams
    from lumen.model import PRESETS, ModelConfig
    from lumen.model.loader import random_model
    from lumen.runtime.transport import SECRET_ENV, new_cluster_secret, secret_to_hex
    from lumen.runtime.worker import Worker, parse_args

    torch.set_num_threads(1)
    os.environ.setdefault(SECRET_ENV, secret_to_hex(new_cluster_secret()))

    class Count:
        n = 0

        def submit(self, addr, page, later_copy=False) -> None:
            self.n += 1

        def forget(self, addr) -> None:
            pass

    def worker(model, **cfg) -> tuple[Worker, object]:
        w = Worker(parse_args(["--worker-id", "0", "--epoch", "1", "--controller", "127.0.0.1:1",
                               "--model", "unused", "--ckpt-export-interval-ms", "0"]))  # every turn
        w.engine = Engine(model, EngineConfig(**cfg))
        real, w.kv_tx = w.kv_tx, Count()
        return w, real

    def close(w: Worker, real) -> None:
        w.kv_tx = real
        w.close()

    idle = {}
    w, real = worker(random_model(PRESETS["tiny"], "cpu", torch.float32), num_blocks=4000)
    try:
        for n in (4, 16, 64):
            for rid in list(w.holders):
                w.engine.abort(rid)
                w._set_holder(rid, -1, "", 0)
            for i in range(n):
                w.engine.add_request(f"q{n}-{i}", list(range(2, 40)), SamplingParams(max_tokens=1000, ignore_eos=True))
                w._set_holder(f"q{n}-{i}", 1, "holder", 0)
            while w.engine.scheduler.waiting or any(not s.is_decoding for s in w.engine.scheduler.running):
                w.engine.step()
            w._stream_pages()
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                for _ in range(2000):
                    w._stream_pages()
                best = min(best, (time.perf_counter() - t) / 2000)
            idle[n] = 1e6 * best
    finally:
        close(w, real)

    cfg = ModelConfig(arch="qwen3", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=7,
                      num_heads=16, num_kv_heads=16, head_dim=128, max_position=2048, tie_embeddings=False,
                      qk_norm=True, eos_token_ids=(1,), name="kv-heavy")
    model = random_model(cfg, "cpu", torch.float32)
    per_page = []
    for _ in range(repeats):
        w, real = worker(model, num_blocks=500, chunk_tokens=512)
        try:
            rng = random.Random(0)
            for i in range(16):
                w.engine.add_request(f"r{i}", [rng.randrange(2, 500) for _ in range(rng.randint(20, 300))],
                                     SamplingParams(max_tokens=48, ignore_eos=True))
                if i % 2 == 0:
                    w._set_holder(f"r{i}", 1, "holder", 0)
            spent = 0.0
            while w.engine.has_work():
                w.engine.step()
                t = time.perf_counter()
                w._stream_pages()
                spent += time.perf_counter() - t
            per_page.append(1e6 * spent / max(1, w.kv_tx.n))
        finally:
            close(w, real)
    return {"idle_turn_us_by_protected_requests": idle, "export_us_per_page_median": statistics.median(per_page),
            "export_us_per_page_runs": per_page, "page_bytes": cfg.kv_bytes_per_token(torch.float32) * 16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--devices", default=None)
    ap.add_argument("--qps", type=float, default=2.0)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--lengths", default="sharegpt")
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-prime", dest="prime", action="store_false",
                    help=f"skip the unmeasured priming run ({PRIME_REQUESTS} requests) before the measured ones")
    ap.add_argument("--serve-args", default="", help="extra `lumen serve` arguments")
    ap.add_argument("--export-interval-ms", type=float, default=None,
                    help="also run lumen with `--ckpt-export-interval-ms` this long (0: every step), as a third arm")
    ap.add_argument("--replicas", type=int, default=None, metavar="K",
                    help="also run lumen with `--ckpt-replicas K` (K checkpoint copies per request; needs "
                         "workers > K), as another arm")
    ap.add_argument("--out", default=None)
    ap.add_argument("--engine-thread", action="store_true",
                    help="only measure what checkpointing costs a worker's engine thread (no cluster)")
    args = ap.parse_args()
    if args.export_interval_ms is not None and not 0 <= args.export_interval_ms <= 10_000:
        ap.error("--export-interval-ms must be between 0 and 10000")
    if args.replicas is not None and not 1 <= args.replicas < args.workers:
        ap.error("--replicas K needs 1 <= K < --workers (a copy needs a worker besides the executor)")
    if args.repeats % 2 and args.repeats > 1:
        print(f"note: {args.repeats} repeats: the arms' order is balanced only over an even number", flush=True)
    if args.engine_thread:
        result = {"env": {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                          "load": os.getloadavg()[0]}, "engine_thread": engine_thread_costs()}
    else:
        result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
