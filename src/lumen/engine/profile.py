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

DEFAULT_GRID = [(p, d, c) for p in (0, 64, 256, 1024) for d in (0, 1, 8, 32, 128) for c in (128, 1024)
                if p or d]


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="HF dir, preset:NAME, default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    from lumen.model.loader import load_model
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    loaded = load_model(a.model, device=a.device, dtype=dtype)
    rows = profile_engine(loaded, DEFAULT_GRID, a.out, config=EngineConfig(device=a.device), repeats=a.repeats)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
