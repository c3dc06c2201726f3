"""Measure real step times over a grid of batch compositions (the simulator fits its cost model on it).

Each grid point is (num_prefill_tokens, num_decode_seqs, decode_context_len): one step that runs a
prefill chunk of num_prefill_tokens tokens (from position 0) together with num_decode_seqs decoding
sequences of decode_context_len tokens each. A row records
    num_prefill_tokens, num_decode_seqs, total_context_tokens, step_time_s
where total_context_tokens = num_decode_seqs * decode_context_len + num_prefill_tokens (the KV tokens
attended over) and step_time_s is the median wall time of the forward pass plus sampling (device
synchronised), measured after warm-up (which also captures the CUDA graph a decode-only step uses).

    python -m lumen.engine.profile --model preset:qwen3-8b --device cuda --out profile.csv
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from .engine import Engine, EngineConfig
from .model_runner import ForwardItem
from .params import SamplingParams
from .scheduler import ScheduledSeq
from .sequence import Sequence

COLUMNS = ("num_prefill_tokens", "num_decode_seqs", "total_context_tokens", "step_time_s")
COLOCATED = "colocated_busy"  # other processes profiling at the same time (lumen.sim.cost docstring)

DEFAULT_GRID = [(p, d, c) for p in (0, 64, 256, 1024) for d in (0, 1, 8, 32, 128) for c in (128, 1024)
                if p or d]
# CPU: the engine's token budget is 256 there (EngineConfig.chunk_tokens) and a CPU worker runs a
# handful of sequences, so the grid covers that range instead (and finishes in about a minute).
CPU_GRID = [(p, d, c) for p in (0, 32, 128, 256) for d in (0, 1, 2, 4, 8) for c in (64, 256) if p or d]
QUICK_GRID = [(p, d, c) for p in (0, 32, 128) for d in (0, 1, 4) for c in (64, 256) if p or d]


STEP_LOG_ENV = "LUMEN_STEP_LOG"  # DIR: each worker appends its engine's steps to DIR/worker<id>-epoch<e>.csv
STEP_LOG_TIME = "time_s"
# the host's monotonic clock (time.monotonic, shared by its processes) when the worker started the step and
# when it returned: a time-sliced worker's steps checked against its slots (lumen.policy.slots)
STEP_LOG_MONO = ("mono_start_s", "mono_end_s")


class StepLog:
    """Appends one profile row (COLUMNS, then STEP_LOG_TIME: the wall clock, Unix seconds, at the end
    of the step, then STEP_LOG_MONO when the caller passes them) per engine step to a CSV: the live
    engine profiled in place. The extra columns let a reader pick one run's steps out of a file that
    several clusters appended to, and check steps against time slots; the simulator's profile reader
    ignores them.

    `record(engine)` after each `engine.step()` writes `engine.last_step` when a step ran (a new
    dict: `Engine._account` builds one per step). Writes are buffered and flushed about every
    `flush_s` seconds and on close; the header is written once, when the file is new or empty."""

    def __init__(self, path: str | Path, flush_s: float = 1.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", newline="", buffering=1 << 16)  # noqa: SIM115
        self._w = csv.writer(self._f)
        if self._f.tell() == 0:
            self._w.writerow((*COLUMNS, STEP_LOG_TIME, *STEP_LOG_MONO))
        self.flush_s = flush_s
        self._flushed = time.monotonic()
        self._last: object = None
        self.rows = 0

    @classmethod
    def from_env(cls, worker_id: int, epoch: int) -> StepLog | None:
        import os

        d = os.environ.get(STEP_LOG_ENV)
        return cls(Path(d) / f"worker{worker_id}-epoch{epoch}.csv") if d else None

    def record(self, engine, started: float | None = None, ended: float | None = None) -> None:
        step = engine.last_step
        if not step or step is self._last:
            return
        self._last = step
        mono = ["" if t is None else f"{t:.6f}" for t in (started, ended)]
        self._w.writerow([*(step[c] for c in COLUMNS), f"{time.time():.6f}", *mono])
        self.rows += 1
        if time.monotonic() - self._flushed >= self.flush_s:
            self._f.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def profile_engine(loaded_model, grid: Iterable[tuple[int, int, int]] = DEFAULT_GRID,
                   out_csv: str | Path | None = None, *, config: EngineConfig | None = None,
                   repeats: int = 3, warmup: int = 1, seed: int = 0, strict: bool = False) -> list[dict[str, float]]:
    """loaded_model: a LoadedModel / Decoder (an Engine is built with `config`) or an Engine.
    Points that do not fit the KV pool are skipped (strict=True: ValueError)."""
    if isinstance(loaded_model, Engine):
        eng = loaded_model
    else:
        model = getattr(loaded_model, "model", loaded_model)
        eng = Engine(loaded_model, config or EngineConfig(device=str(model.device)))
    rng = random.Random(seed)
    vocab = eng.model_config.vocab_size
    bm = eng.block_manager
    params = SamplingParams(max_tokens=1 << 30, ignore_eos=True)
    rows: list[dict[str, float]] = []
    for n_pre, n_dec, ctx in grid:
        if n_pre < 0 or n_dec < 0 or ctx < 1 or not (n_pre or n_dec):
            raise ValueError(f"bad grid point {(n_pre, n_dec, ctx)}")
        if bm.blocks_for(ctx) * n_dec + bm.blocks_for(n_pre) > bm.num_free:
            if strict:
                raise ValueError(f"grid point {(n_pre, n_dec, ctx)} does not fit {bm.num_free} free KV blocks")
            continue
        seqs: list[Sequence] = []
        sched: list[ScheduledSeq] = []
        try:
            for i in range(n_dec):
                s = Sequence(f"d{i}", [rng.randrange(vocab) for _ in range(ctx)], params, i, 0)
                s.num_computed_tokens = ctx - 1
                seqs.append(s)
                bm.ensure(s, ctx)
                sched.append(ScheduledSeq(s, ctx - 1, [s.last_token], [], True, True))
            if n_pre:
                s = Sequence("p", [rng.randrange(vocab) for _ in range(n_pre)], params, 0, 0)
                seqs.append(s)
                bm.ensure(s, n_pre)
                sched.append(ScheduledSeq(s, 0, list(s.token_ids), [], True))
            items = [ForwardItem(x.tokens, x.start, x.seq.block_table, x.num_logits) for x in sched]
            times = []
            for r in range(warmup + repeats):
                _sync(eng.device)
                t0 = time.perf_counter()
                eng.sampler(eng.runner.forward(items), sched)  # .tolist() inside syncs the device
                _sync(eng.device)
                if r >= warmup:
                    times.append(time.perf_counter() - t0)
        finally:
            for s in seqs:
                bm.free(s)
        rows.append(dict(num_prefill_tokens=n_pre, num_decode_seqs=n_dec,
                         total_context_tokens=n_dec * ctx + n_pre, step_time_s=statistics.median(times)))
    if out_csv is not None:
        with open(out_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
    return rows


def profile_cli(args: argparse.Namespace) -> int:
    """`lumen profile`: profile `args.model` on `args.device` and write `args.out` (CSV).

    On CPU the torch thread count is what a CPU worker uses (LUMEN_WORKER_THREADS, default 1), so
    the profile measures the same kind of step a live worker runs."""
    import os

    from lumen.model.loader import load_model

    device = args.device
    if device == "cpu":
        torch.set_num_threads(int(getattr(args, "threads", None) or os.environ.get("LUMEN_WORKER_THREADS", "1")))
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    loaded = load_model(args.model, device=device, dtype=dtype, progress=False)
    if getattr(args, "quick", False):
        grid = QUICK_GRID
    else:
        grid = CPU_GRID if device == "cpu" else DEFAULT_GRID
    repeats = int(getattr(args, "repeats", None) or 3)
    t0 = time.perf_counter()
    rows = profile_engine(loaded, grid, args.out, config=EngineConfig(device=device), repeats=repeats)
    print(f"{len(rows)} grid points in {time.perf_counter() - t0:.1f} s on {device} "
          f"({torch.get_num_threads()} threads) -> {args.out}")
    procs = int(getattr(args, "procs", None) or 1)
    if procs > 1:
        del loaded
        t1 = time.perf_counter()
        co = profile_colocated(args.model, device, procs, repeats, torch.get_num_threads())
        for r in rows:
            r[COLOCATED] = 0
        rows += co
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=(*COLUMNS, COLOCATED))
            w.writeheader()
            w.writerows(rows)
        print(f"{len(co)} rows alone / {procs} processes at once / alone in {time.perf_counter() - t1:.1f} s -> {args.out}")
    return 0


def profile_colocated(model: str, device: str, procs: int, repeats: int, threads: int,
                      grid: str = "quick") -> list[dict[str, float]]:
    """The same grid profiled by `procs` processes at once (as `procs` workers of one host), rows
    tagged colocated_busy = procs - 1, between two runs of one process alone (colocated_busy = 0),
    so that the slowdown is measured against the same points under the same background load.
    The processes load the model first and start measuring together (a barrier file)."""
    rows = _profile_procs(model, device, 1, repeats, threads, grid)
    rows += _profile_procs(model, device, procs, repeats, threads, grid)
    rows += _profile_procs(model, device, 1, repeats, threads, grid)
    return rows


def _profile_procs(model: str, device: str, procs: int, repeats: int, threads: int,
                   grid: str) -> list[dict[str, float]]:
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lumen-profile-") as tmp:
        go = os.path.join(tmp, "go")
        ps = []
        for i in range(procs):
            cmd = [sys.executable, "-m", "lumen.engine.profile", "--model", model, "--device", device,
                   "--out", os.path.join(tmp, f"p{i}.csv"), "--repeats", str(repeats), "--grid", grid,
                   "--threads", str(threads), "--ready", os.path.join(tmp, f"ready{i}"), "--go", go]
            ps.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 600
        while not all(os.path.exists(os.path.join(tmp, f"ready{i}")) for i in range(procs)):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in ps):
                for p in ps:
                    p.kill()
                raise RuntimeError("co-located profiling processes did not start")
            time.sleep(0.1)
        open(go, "w").close()
        for p in ps:
            if p.wait() != 0:
                raise RuntimeError("a co-located profiling process failed")
        out: list[dict[str, float]] = []
        for i in range(procs):
            with open(os.path.join(tmp, f"p{i}.csv"), newline="") as f:
                for r in csv.DictReader(f):
                    out.append({**{k: float(v) for k, v in r.items()}, COLOCATED: procs - 1})
        return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="HF dir, preset:NAME, default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--grid", default="default", choices=("default", "cpu", "quick"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--ready", default=None, help=argparse.SUPPRESS)  # barrier for profile_colocated
    ap.add_argument("--go", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    import os

    from lumen.model.loader import load_model
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    loaded = load_model(a.model, device=a.device, dtype=dtype, progress=False)
    grid = {"default": DEFAULT_GRID, "cpu": CPU_GRID, "quick": QUICK_GRID}[a.grid]
    if a.ready:
        eng = Engine(loaded, EngineConfig(device=a.device))
        open(a.ready, "w").close()
        while a.go and not os.path.exists(a.go):
            time.sleep(0.05)
        rows = profile_engine(eng, grid, a.out, repeats=a.repeats)
        return
    rows = profile_engine(loaded, grid, a.out, config=EngineConfig(device=a.device), repeats=a.repeats)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
