"""Engine-thread cost of exporting KV pages, and of the GIL traffic of page streaming, without a cluster.

    python benchmarks/export_cost.py --preset qwen3-1.7b --device cuda:0 --out export_cost.json
    python benchmarks/export_cost.py --preset tiny --device cpu          # dry run

On the H200 (2026-12-04) lumen's decode step matched stop-restart's while the gap between a busy
worker's steps grew by ~0.12 ms (0.25 -> 0.36 ms), 0.08 ms of it in `export_pages`: ~0.8 ms of engine
thread per exported page, far more than a gather and a copy should cost. This tells the candidates
apart, in one process with a real engine:

- `Engine.export_pages` per call for 1 / 4 / 16 / 32 pages: per-call vs per-page cost;
- the same, and a decode step, while two threads do what a worker's page sender and receiver do to
  the GIL (an HMAC over each 1.8 MB page and a copy, both of which release it, plus a little Python)
  at the rate a checkpointing worker streams (`--rate` pages/s each);
- the same with a 0.5 ms GIL switch interval.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import statistics
import sys
import threading
import time

import numpy as np
import torch

from lumen.engine import Engine, EngineConfig, SamplingParams
from lumen.engine.model_runner import EXPORT_SLOT_PAGES
from lumen.model import PRESETS
from lumen.model.loader import random_model

SIZES = (1, 4, 16, 32)


class PageTraffic:
    """Two threads doing a page sender's and a page receiver's GIL work at `rate` pages/s each."""

    def __init__(self, page_bytes: int, rate: float) -> None:
        self.page = np.random.default_rng(0).integers(0, 255, page_bytes, dtype=np.uint8)
        self.rate, self.stop, self.pages = rate, threading.Event(), 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self) -> None:
        key, dst, period = b"k" * 32, np.empty_like(self.page), 1.0 / self.rate
        meta: dict[str, int] = {}
        nxt = time.perf_counter()
        while not self.stop.is_set():
            mac = hmac.new(key, memoryview(self.page), hashlib.sha256).digest()  # releases the GIL
            np.copyto(dst, self.page)  # releases the GIL
            for i in range(50):  # the bookkeeping a page costs in Python: headers, dicts, counters
                meta[f"{i}"] = len(mac) + i
            self.pages += 1
            nxt += period
            time.sleep(max(0.0, nxt - time.perf_counter()))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def reexport(eng: Engine, rid: str, n: int, device: str | None = None) -> float:
    """Export the last n full pages of rid again, wait for their copies and let them go; returns the
    seconds of the export call alone (after syncing `device`, where given, so that it starts idle)."""
    seq = eng._seqs[rid]
    seq.num_exported_pages = seq.num_computed_tokens // eng.block_size - n
    if device is not None:
        sync(device)
    t = time.perf_counter()
    pages = eng.export_pages([rid])
    spent = time.perf_counter() - t
    assert len(pages) == n, (len(pages), n)
    for p in pages:
        p.wait()
    return spent


def measure(eng: Engine, rids: list[str], device: str, reps: int, steps: int) -> dict:
    """Export cost per call (us, median) for each size, then the mean decode step (ms)."""
    out = {}
    for n in SIZES:
        times = [reexport(eng, rids[r % len(rids)], n, device) for r in range(reps)]
        out[f"export_{n}_us"] = 1e6 * statistics.median(times)
        out[f"export_{n}_us_per_page"] = out[f"export_{n}_us"] / n
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    sync(device)
    out["decode_step_ms"] = 1e3 * (time.perf_counter() - t) / steps
    return out


def profile_exports(eng: Engine, rids: list[str], device: str, n: int = 1, reps: int = 50) -> str:
    """Where an export call's host time goes: torch's operator table (CPU time per aten op and CUDA
    runtime call) and the Python functions by own time, over `reps` exports of `n` pages."""
    import cProfile
    import pstats
    from pathlib import Path

    def exports() -> None:
        for r in range(reps):
            reexport(eng, rids[r % len(rids)], n)

    sync(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        exports()
    ops = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    sync(device)
    cp = cProfile.Profile()
    cp.enable()
    exports()
    cp.disable()
    rows = sorted(pstats.Stats(cp).stats.items(), key=lambda kv: -kv[1][2])[:30]
    lines = [f"{1e6 * tt / reps:9.1f} {1e6 * ct / reps:9.1f} {nc / reps:6.1f}  {Path(f).name}:{line}({name})"
             for (f, line, name), (_, nc, tt, ct, _) in rows]
    head = "  own us  cum us  calls  (per export)"
    return (f"== torch operators, {reps} exports of {n} page(s)\n{ops}\n== Python, by own time\n{head}\n"
            + "\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen3-1.7b")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rate", type=float, default=80.0, help="pages/s per traffic thread (a worker's stream)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--slot-pages", type=int, default=EXPORT_SLOT_PAGES,
                    help="pages per export-ring slot (the 2026-12-04 H200 figures: 8)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", default=None, help="also write where an export's host time goes to this file")
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    cuda = args.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = random_model(cfg, device=args.device, dtype=dtype, seed=0)
    eng = Engine(model, EngineConfig(device=args.device, num_blocks=1024, block_size=16, max_batch=8,
                                     compile=False, export_slots=-(-2 * max(SIZES) // args.slot_pages),
                                     export_slot_pages=args.slot_pages, export_ring_bytes=1 << 40))
    prompt_len = 16 * (max(SIZES) + 1)
    if prompt_len + 10 + 4 * args.steps + 100 > cfg.max_position:  # the requests must outlive the measures
        ap.error(f"--steps {args.steps} is too many for {args.preset}'s {cfg.max_position} positions")
    rids = [f"r{i}" for i in range(4)]
    rng = np.random.default_rng(1)
    for rid in rids:
        eng.add_request(rid, [int(x) for x in rng.integers(2, cfg.vocab_size, prompt_len)],
                        SamplingParams(max_tokens=100_000, ignore_eos=True))
    while any(eng._seqs[r].num_computed_tokens < prompt_len for r in rids):
        eng.step()
    eng.pages_due()
    measure(eng, rids, args.device, 3, 10)  # first calls of every path
    page_bytes = eng.runner.ring.pages[0, 0].numel() * eng.runner.ring.pages.element_size()
    result = {"preset": args.preset, "device": args.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(args.device) if cuda else None, "page_bytes": page_bytes,
              "rate_pages_per_s_per_thread": args.rate, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    result["quiet"] = measure(eng, rids, args.device, args.reps, args.steps)
    with PageTraffic(page_bytes, args.rate) as traffic:
        result["page_traffic"] = measure(eng, rids, args.device, args.reps, args.steps)
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        try:
            result["page_traffic_switch_0.5ms"] = measure(eng, rids, args.device, args.reps, args.steps)
        finally:
            sys.setswitchinterval(interval)
    result["traffic_pages"] = traffic.pages
    result["quiet_again"] = measure(eng, rids, args.device, args.reps, args.steps)
    if args.profile:
        with open(args.profile, "w") as f:
            f.write(profile_exports(eng, rids, args.device))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
