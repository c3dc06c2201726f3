"""Step-time cost models for the simulator: a roofline from model shapes and device data, and a
model fitted to profiles of the real engine.

One engine step (one iteration of the continuous-batching scheduler) is described by three
numbers, which are also the columns of a profile CSV:

    num_prefill_tokens     prompt (or recovery-prefill) tokens processed in the step, all chunks
    num_decode_seqs        decode positions in the step: 1 per decoding sequence, K+1 per
                           sequence while a speculative verify is fused into the step
    total_context_tokens   sum over the sequences in the step of the KV length each one attends
                           over after the step (decode: its full length; prefill chunk: prefix +
                           chunk)
    step_time_s            measured wall time of the step (profile only), seconds

Profile CSV (written by `lumen profile`, the live engine's profiler; read by
`lumen simulate --profile FILE`): a header row with at least those four column names, one row
per measured step, extra columns ignored, `#` comment lines allowed. Example:

    num_prefill_tokens,num_decode_seqs,total_context_tokens,step_time_s
    0,1,128,0.0061
    512,8,1600,0.0412

`FittedCost` fits  t = c0 + c1*P + c2*D + c3*C + c4*P^2  by non-negative least squares (more work
never makes a step faster; the P^2 term is the quadratic self-attention of a prefill chunk).

Optional column `colocated_busy`: how many other workers of the same host were stepping at the same
time (`lumen profile --procs N` writes it: N profiling processes at once, as N CPU workers of one
host). Rows with 0 (or no such column) fit the coefficients; rows with k > 0 give
`colocated_slowdown` s, the median of (t / t_fit - 1) / k, so that a step while k co-located
workers are busy takes t_fit * (1 + s*k). Workers on one host share its cores and memory
bandwidth; on CPU that interference is of the order of the step time itself, on separate GPUs it
is absent (s = 0, the default). The simulator applies it to workers of the same node
(`SimConfig.nodes`).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from lumen.policy import fit_step_time

PROFILE_COLUMNS = ("num_prefill_tokens", "num_decode_seqs", "total_context_tokens", "step_time_s")
COLOCATED_COLUMN = "colocated_busy"


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Decoder shapes, as plain data (the simulator does not import lumen.model)."""

    name: str
    layers: int
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool = False
    dtype_bytes: int = 2  # bf16

    @property
    def layer_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)   # q, o, k, v
        mlp = 3 * self.hidden * self.inter                                          # gate, up, down
        return attn + mlp + 2 * self.hidden                                        # 2 norms

    @property
    def params(self) -> int:
        emb = self.vocab * self.hidden
        return self.layers * self.layer_params + emb * (1 if self.tied_embeddings else 2) + self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def _m(name, layers, hidden, inter, heads, kv, hd, vocab, tied=False) -> ModelShape:
    return ModelShape(name, layers, hidden, inter, heads, kv, hd, vocab, tied)


# Shapes from the models' published config.json files.
MODELS: dict[str, ModelShape] = {m.name: m for m in (
    _m("llama-3-70b", 80, 8192, 28672, 64, 8, 128, 128256),
    _m("llama-3-8b", 32, 4096, 14336, 32, 8, 128, 128256),
    _m("qwen3-0.6b", 28, 1024, 3072, 16, 8, 128, 151936, True),
    _m("qwen3-1.7b", 28, 2048, 6144, 16, 8, 128, 151936, True),
    _m("qwen3-4b", 36, 2560, 9728, 32, 8, 128, 151936, True),
    _m("qwen3-8b", 36, 4096, 12288, 32, 8, 128, 151936),
    _m("qwen3-14b", 40, 5120, 17408, 40, 8, 128, 151936),
    _m("qwen3-32b", 64, 5120, 25600, 64, 8, 128, 151936),
    _m("smollm2-135m", 30, 576, 1536, 9, 3, 64, 49152, True),
)}

# The draft each target is paired with by default (the paper's pairs where it names one).
DEFAULT_DRAFT: dict[str, str] = {
    "llama-3-70b": "llama-3-8b", "qwen3-32b": "qwen3-4b", "qwen3-14b": "qwen3-1.7b",
    "qwen3-8b": "qwen3-0.6b", "qwen3-4b": "qwen3-0.6b", "qwen3-1.7b": "qwen3-0.6b",
    "llama-3-8b": "qwen3-0.6b", "qwen3-0.6b": "smollm2-135m", "smollm2-135m": "smollm2-135m",
}


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """Datasheet figures of one GPU (dense, no sparsity)."""

    name: str
    bf16_tflops: float
    hbm_gb_s: float
    hbm_gb: float
    link_gb_s: float        # intra-node GPU interconnect per direction (NVLink), for TP all-reduce
    h2d_gb_s: float         # host -> device, PCIe, achievable


DEVICES: dict[str, DeviceSpec] = {
    # H100 SXM5 80GB: 989 dense BF16 TFLOP/s, 3.35 TB/s HBM3, NVLink4 450 GB/s/dir, PCIe Gen5.
    "h100": DeviceSpec("H100 SXM 80GB", 989.0, 3350.0, 80.0, 450.0, 55.0),
    # A100 SXM4 80GB: 312 dense BF16 TFLOP/s, 2.039 TB/s HBM2e, NVLink3 300 GB/s/dir, PCIe Gen4.
    "a100": DeviceSpec("A100 SXM 80GB", 312.0, 2039.0, 80.0, 300.0, 26.0),
    # A800 SXM4 80GB: the export A100 -- same compute and HBM, NVLink cut to 400 GB/s total.
    "a800": DeviceSpec("A800 SXM 80GB", 312.0, 2039.0, 80.0, 200.0, 26.0),
}


class CostModel(Protocol):
    def step_time(self, num_prefill_tokens: int, num_decode_seqs: int,
                  total_context_tokens: float) -> float: ...


@dataclass(frozen=True)
class RooflineCost:
    """max(compute time, memory time) per step on `tp` GPUs, plus tensor-parallel all-reduce
    and a fixed per-step overhead (scheduler, launches, sampling).

    compute = 2*params_linear*(P+D) + 2*hidden*vocab*(D + [P>0]) + 4*L*heads*hd*(C + P^2/2)
      (the attention term counts each new token against its sequence's context; P^2/2 is the
      causal self-attention within a chunk)
    memory  = weights + kv_bytes_per_token*(C + P + D)   (read all KV attended, write new KV)
    all-reduce: 2 per layer of (P+D)*hidden*2 bytes, ring: 2(tp-1)/tp of that over the link,
      plus a latency per all-reduce.
    `mfu` / `mbu` are achievable fractions of the datasheet peaks.
    """

    model: ModelShape
    device: DeviceSpec
    tp: int = 1
    mfu: float = 0.6
    mbu: float = 0.8
    step_overhead_s: float = 0.002
    allreduce_latency_s: float = 8e-6

    def __post_init__(self) -> None:
        # constants of the hot path, computed once (the simulator calls step_time per epoch)
        m, d = self.model, self.device
        linear = m.params - m.vocab * m.hidden * (1 if m.tied_embeddings else 2)
        flop_s = self.tp * d.bf16_tflops * 1e12 * self.mfu
        byte_s = self.tp * d.hbm_gb_s * 1e9 * self.mbu
        ar = 0.0
        ar_tok = 0.0
        if self.tp > 1:
            ar = 2 * m.layers * self.allreduce_latency_s
            ar_tok = 2 * m.layers * m.hidden * m.dtype_bytes * 2.0 * (self.tp - 1) / self.tp / (d.link_gb_s * 1e9)
        object.__setattr__(self, "_k", (
            2.0 * linear / flop_s,                                # per token, linear layers
            2.0 * m.hidden * m.vocab / flop_s,                    # per logit row
            4.0 * m.layers * m.heads * m.head_dim / flop_s,       # per attended context token
            m.weight_bytes / byte_s,                              # weights read once per step
            m.kv_bytes_per_token / byte_s,                        # per KV token read or written
            ar, ar_tok, self.step_overhead_s))

    def step_time(self, num_prefill_tokens: int, num_decode_seqs: int,
                  total_context_tokens: float) -> float:
        p, d, c = num_prefill_tokens, num_decode_seqs, total_context_tokens
        toks = p + d
        if toks <= 0:
            return 0.0
        k_lin, k_head, k_attn, t_w, k_kv, ar, ar_tok, over = self._k  # type: ignore[attr-defined]
        compute = k_lin * toks + k_head * (d + (1 if p else 0)) + k_attn * (c + 0.5 * p * p)
        memory = t_w + k_kv * (c + toks)
        t = compute if compute > memory else memory
        if ar:
            t += ar + ar_tok * toks
        return t + over


@dataclass(frozen=True)
class FittedCost:
    """t = c0 + c1*P + c2*D + c3*C + c4*P^2 fitted to a profile (see module docstring)."""

    coef: tuple[float, float, float, float, float]
    rows: int = 0
    r2: float = math.nan
    mean_abs_rel_err: float = math.nan
    colocated_slowdown: float = 0.0   # s: t * (1 + s*k) while k other workers of the host step

    def step_time(self, num_prefill_tokens: int, num_decode_seqs: int,
                  total_context_tokens: float) -> float:
        p, d = num_prefill_tokens, num_decode_seqs
        if p + d <= 0:
            return 0.0
        c0, c1, c2, c3, c4 = self.coef
        return c0 + c1 * p + c2 * d + c3 * total_context_tokens + c4 * p * p


def _features(p, d, c) -> np.ndarray:
    p, d, c = (np.asarray(x, dtype=np.float64) for x in (p, d, c))
    return np.stack([np.ones_like(p), p, d, c, p * p], axis=1)


def fit_profile(rows: Sequence[tuple[float, float, float, float]]) -> FittedCost:
    """`policy.fit_step_time` on (P, D, C, t) rows (non-negative least squares in relative error,
    columns scaled so that P^2 does not swamp the others), with its fit quality."""
    if len(rows) < 5:
        raise ValueError(f"need at least 5 profile rows to fit 5 coefficients, got {len(rows)}")
    a = np.asarray(rows, dtype=np.float64)
    x, y = _features(a[:, 0], a[:, 1], a[:, 2]), a[:, 3]
    if np.any(y <= 0) or not np.all(np.isfinite(a)):
        raise ValueError("profile rows must be finite with step_time_s > 0")
    # the one fit of this form, the live worker's too (relative error, scaled columns)
    coef = np.asarray(fit_step_time(a[:, :4]).coef)
    pred = x @ coef
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return FittedCost(tuple(float(v) for v in coef), len(rows),  # type: ignore[arg-type]
                      1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan,
                      float(np.mean(np.abs(pred - y) / y)))


def read_profile_rows(path: str | Path | io.TextIOBase) -> list[tuple[float, float, float, float, int]]:
    """Rows (P, D, C, t, colocated_busy) of a profile CSV; colocated_busy is 0 without that column."""
    f = open(path, newline="") if isinstance(path, str | Path) else path  # noqa: SIM115
    try:
        lines = (ln for ln in f if ln.strip() and not ln.lstrip().startswith("#"))
        reader = csv.DictReader(lines)
        missing = [c for c in PROFILE_COLUMNS if c not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"profile CSV lacks columns {missing}; needs {list(PROFILE_COLUMNS)}")
        return [(*(float(r[c]) for c in PROFILE_COLUMNS), int(float(r.get(COLOCATED_COLUMN) or 0)))  # type: ignore[misc]
                for r in reader]
    finally:
        if isinstance(path, str | Path):
            f.close()


def read_profile(path: str | Path | io.TextIOBase) -> list[tuple[float, float, float, float]]:
    """Rows (P, D, C, t) of a profile CSV (format in the module docstring) measured with no other
    worker of the host busy."""
    return [r[:4] for r in read_profile_rows(path) if r[4] == 0]


def fit_colocated_slowdown(base: FittedCost, rows: Iterable[tuple[float, float, float, float, int]]) -> float:
    """s of the module docstring from rows (P, D, C, t, k) with k > 0; 0 without such rows. Each
    such row is compared with the median solo time of the same (P, D, C) where the profile has
    one (`lumen profile --procs` measures the same points alone right before and after, so the
    comparison sees the same background load and no fit error), else with the fit. The median
    over rows, so that a few steps disturbed by something else do not decide it."""
    rows = list(rows)
    solo: dict[tuple, list[float]] = {}
    for p, d, c, t, k in rows:
        if k == 0:
            solo.setdefault((p, d, c), []).append(t)
    ratios = []
    for p, d, c, t, k in rows:
        if k <= 0:
            continue
        ref = float(np.median(solo[(p, d, c)])) if (p, d, c) in solo else base.step_time(int(p), int(d), c)
        if ref > 0:
            ratios.append((t / ref - 1.0) / k)
    return max(0.0, float(np.median(ratios))) if ratios else 0.0


def write_profile(path: str | Path, rows: Iterable[tuple[float, float, float, float]]) -> Path:
    p = Path(path)
    with p.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PROFILE_COLUMNS)
        for r in rows:
            w.writerow([int(r[0]), int(r[1]), int(r[2]), f"{r[3]:.9g}"])
    return p


def load_profile(path: str | Path) -> FittedCost:
    rows = read_profile_rows(path)
    base = fit_profile([r[:4] for r in rows if r[4] == 0])
    s = fit_colocated_slowdown(base, rows)
    return replace(base, colocated_slowdown=s) if s else base
