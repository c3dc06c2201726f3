"""Simulation configuration and failure schedules."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from lumen.policy.slots import default_slot_s, resolve_device_share, share_groups

from ..units import parse_duration
from .cost import DEFAULT_DRAFT, DEVICES, MODELS, CostModel, DeviceSpec, ModelShape, RooflineCost

# The "typical batch" whose decode step sizes the default slot (`SimConfig.slot_s`): this many decoding
# sequences (at most max_batch) of SLOT_REF_CONTEXT tokens of context each.
SLOT_REF_BATCH = 8
SLOT_REF_CONTEXT = 1024

# how the partner's verify positions are chosen (SimConfig.spec_rule)
SPEC_RULES = ("goodput", "fixed")


@dataclass(frozen=True)
class SimConfig:
    """Everything about the simulated cluster. Defaults are the paper's simulation setup
    (digest section 7): Llama-3-70B on 4 A100s per worker, draft Llama-3-8B with alpha = 0.6,
    K = 4, chunk 1,024, batch cap 512, 26 GB/s host<->device, 2 GB/s SSD."""

    workers: int = 10
    model: str = "llama-3-70b"
    device: str = "a100"
    tp: int = 4
    draft: str | None = None            # None: DEFAULT_DRAFT[model]
    alpha: float = 0.6                  # draft acceptance rate per token
    k: int = 4                          # draft tokens proposed per request per round
    chunk_tokens: int = 1024            # per-step token budget (chunked prefill, Sarathi-style)
    max_batch: int = 512                # running requests per worker
    page_tokens: int = 16               # KV page (checkpoint unit)
    h2d_gbps: float = 26.0              # host <-> device per GPU, GB/s (restore, weight copy)
    disk_gbps: float = 2.0              # SSD read per worker, GB/s
    net_gbps: float = 10.0              # per-worker NIC for checkpoint streaming, Gbit/s
    ckpt_export_interval_ms: float = 100.0  # exports at most this often (lumen serve's default)
    ckpt_budget_gb: float = 160.0       # host memory per worker for others' checkpoints
    detect_s: float = 0.3               # failure -> declared dead, for a crash/kill (the live system sees
                                        # one through its process sentinel; only a hang waits for the
                                        # heartbeat deadline, 1 s by default)
    restart_s: float = 2.0              # declared dead -> new process up (CUDA init etc.)
    warmup_s: float = 1.0               # after weights are on device (graph capture, warm-up)
    # draft weights resident in host memory on the node (only the host->device copy remains, and the
    # target's disk read starts at once). None: resident under the goodput rule, read from disk first
    # under the fixed rule (the figures before issue 24). False under goodput: a cold restart (node
    # reboot): `policy.draft_phase_pays` decides whether the draft is read before the target at all.
    draft_cached: bool | None = None
    # mechanism 3's verify positions (issue 24): "goodput" asks `policy.choose_spec_lengths` per
    # mirrored request each step and pairs by `policy.pairing_gain`; "fixed" verifies K+1 positions for
    # every request of an assisted partner and pairs with `policy.pick_partner` (the rule before).
    spec_rule: str = "goodput"
    pair_interval_s: float = 1.0        # goodput: pairing re-evaluated this often while drafts wait/assist
    lam: float = 1.0                    # lambda of the placement objective
    gpu_mem_util: float = 0.9           # share of HBM for weights + KV
    kv_tokens: int | None = None        # KV capacity per worker in tokens; None: from HBM
    nodes: int | None = None            # workers are spread over this many nodes (round robin)
    # Failure domains (issue 25): workers split into this many equal contiguous domains (worker i in
    # domain i * domains // workers: 4 domains of 64 workers = 0-15, 16-31, ...). Placement spreads
    # copies over them (the policy view's node column) and `--fail t=..:domains=N` fails whole ones.
    # None: the node (`nodes`, round robin) is the domain, or every worker its own.
    domains: int | None = None
    domain_aware: bool = True           # False: placement does not see the domains (failures still follow them)
    # Checkpoint copies per request (issue 25): 1 (the paper), K >= 2, or "auto" (`policy.choose_replicas`
    # per request, at most ckpt_replicas_max, planning for the failure model below at the copy prices).
    ckpt_replicas: int | str = 1
    ckpt_replicas_max: int = 3
    # how an executor's NIC orders the copies' pages: "fifo" (one queue) or "primary-first" (a request's
    # first copy ahead of its later copies: later copies use what bandwidth is left)
    ckpt_stream_order: str = "fifo"
    ckpt_worker_mtbf_s: float | None = 3600.0   # auto: independent failures of one worker, MTBF
    ckpt_domain_mtbf_s: float | None = None     # auto: failures of a whole domain at once, MTBF per domain
    ckpt_price_net: float = 1e-4        # auto: a copy's price, recompute seconds per NIC second it streams
    ckpt_price_mem: float = 1e-6        # auto: ... plus recompute seconds per GB-second of host memory it holds
    # Several workers on one device (`lumen serve --devices` round robin): worker i is on device
    # i % ceil(workers / workers_per_device). "shared": they use it freely (co-located slowdown, see
    # core.py); "slots": time-division shares (lumen.policy.slots), each steps only in its own slot;
    # "auto": slots where workers_per_device > 1. slot_ms None: `slot_s`'s default.
    workers_per_device: int = 1
    device_share: str = "shared"
    slot_ms: float | None = None
    max_epoch_iters: int = 4096         # cap on identical iterations jumped at once
    cost: CostModel | None = None       # None: roofline of model/device/tp

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.draft_name not in MODELS:
            raise ValueError(f"unknown draft model {self.draft_name!r}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if self.workers < 1 or self.tp < 1 or self.k < 1 or self.chunk_tokens < 1 or self.max_batch < 1:
            raise ValueError("workers, tp, k, chunk_tokens and max_batch must be >= 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        if self.workers_per_device < 1:
            raise ValueError("workers_per_device must be >= 1")
        resolve_device_share(self.device_share, self.workers_per_device)   # raises on an unknown mode
        if self.slot_ms is not None and not (self.slot_ms > 0 and math.isfinite(self.slot_ms)):
            raise ValueError("slot_ms must be positive and finite")
        if self.spec_rule not in SPEC_RULES:
            raise ValueError(f"spec_rule must be one of {', '.join(SPEC_RULES)}, got {self.spec_rule!r}")
        if not (self.pair_interval_s > 0 and math.isfinite(self.pair_interval_s)):
            raise ValueError("pair_interval_s must be positive and finite")
        if self.domains is not None and not 1 <= self.domains <= self.workers:
            raise ValueError("domains must be in 1..workers")
        k = self.ckpt_replicas
        if not (k == "auto" or (isinstance(k, int) and not isinstance(k, bool) and k >= 1)):
            raise ValueError(f"ckpt_replicas must be an int >= 1 or 'auto', got {k!r}")
        if self.ckpt_stream_order not in ("fifo", "primary-first"):
            raise ValueError(f"ckpt_stream_order must be 'fifo' or 'primary-first', got {self.ckpt_stream_order!r}")
        if self.ckpt_replicas_max < 1:
            raise ValueError("ckpt_replicas_max must be >= 1")
        for name in ("ckpt_worker_mtbf_s", "ckpt_domain_mtbf_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be > 0 or None")
        if not (self.ckpt_price_net >= 0 and self.ckpt_price_mem >= 0):
            raise ValueError("copy prices must be >= 0")

    def domain_of(self, wid: int) -> int | None:
        """Worker wid's failure domain: its block of `domains`, else its node, else None (its own)."""
        if self.domains is not None:
            return wid * self.domains // self.workers
        return None if self.nodes is None else wid % self.nodes

    @property
    def draft_resident(self) -> bool:
        """Whether the draft is in host memory at a restart (`draft_cached`, or the rule's default)."""
        return self.draft_cached if self.draft_cached is not None else self.spec_rule == "goodput"

    @property
    def share_mode(self) -> str:
        """"shared" or "slots" ("auto" resolved by `lumen.policy.slots.resolve_device_share`)."""
        return resolve_device_share(self.device_share, self.workers_per_device)

    @property
    def num_devices(self) -> int:
        return math.ceil(self.workers / self.workers_per_device)

    def device_groups(self) -> list[tuple[int, int, int]]:
        """(device, index, count) per worker: its device (round robin, as `lumen serve --devices`) and
        its (index, count) among the workers on that device (`lumen.policy.slots.share_groups`)."""
        devs = [i % self.num_devices for i in range(self.workers)]
        return [(d, i, c) for d, (i, c) in zip(devs, share_groups([f"dev{d}" for d in devs]), strict=True)]

    @property
    def slot_s(self) -> float:
        """Slot length: slot_ms, or `default_slot_s` of the cost model's decode step for a typical batch
        (SLOT_REF_BATCH sequences, at most max_batch, of SLOT_REF_CONTEXT tokens each)."""
        if self.slot_ms is not None:
            return self.slot_ms / 1e3
        b = min(SLOT_REF_BATCH, self.max_batch)
        return default_slot_s(self.cost_model().step_time(0, b, float(b * SLOT_REF_CONTEXT)))

    @property
    def draft_name(self) -> str:
        return self.draft or DEFAULT_DRAFT[self.model]

    @property
    def shape(self) -> ModelShape:
        return MODELS[self.model]

    @property
    def draft_shape(self) -> ModelShape:
        return MODELS[self.draft_name]

    @property
    def dev(self) -> DeviceSpec:
        return DEVICES[self.device]

    def cost_model(self) -> CostModel:
        return self.cost or RooflineCost(self.shape, self.dev, self.tp)

    def draft_cost_model(self) -> CostModel:
        return RooflineCost(self.draft_shape, self.dev, self.tp)

    def kv_capacity_tokens(self, sharing: int = 1) -> int:
        """KV tokens per worker; `sharing` workers on the device each hold their own weights and split
        what is left (kv_tokens, when set, is per worker as given)."""
        if self.kv_tokens is not None:
            return self.kv_tokens
        free = self.dev.hbm_gb * 1e9 * self.tp * self.gpu_mem_util - sharing * self.shape.weight_bytes
        if free <= 0:
            raise ValueError(f"{sharing} x {self.model} do not fit {self.tp} x {self.device}" if sharing > 1
                             else f"{self.model} does not fit {self.tp} x {self.device}")
        per_worker = free if sharing == 1 else free / sharing
        return int(per_worker // self.shape.kv_bytes_per_token)

    def expected_accepted(self) -> float:
        """Tokens committed per verify step: (1 - a^(K+1)) / (1 - a) (accepted prefix plus the
        target's own token), K + 1 when every proposal is accepted."""
        a, k = self.alpha, self.k
        return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)

    def with_(self, **kw) -> SimConfig:
        return replace(self, **kw)


@dataclass(frozen=True)
class FailureSpec:
    """One failure event: at time `t` (seconds, or a share of the arrival span if `t_frac`), the
    listed workers, or `count` of them, or a fraction `frac` of the cluster (rounded, at least
    1), chosen with the run's seed; or whole failure domains at once (correlated): the listed
    `domain_ids`, or `domains` of them chosen with the seed (every worker of each fails)."""

    t: float
    workers: tuple[int, ...] = ()
    count: int | None = None
    frac: float | None = None
    t_frac: bool = False
    domains: int | None = None
    domain_ids: tuple[int, ...] = ()

    def time(self, horizon: float) -> float:
        return self.t * horizon if self.t_frac else self.t

    def resolve(self, n_workers: int, rng: np.random.Generator,
                domain_of: Sequence[int | None] | None = None) -> tuple[int, ...]:
        if self.domains is not None or self.domain_ids:
            labels = sorted({d for d in (domain_of or ()) if d is not None})
            if not labels:
                raise ValueError("a domain failure needs failure domains (--domains or --nodes)")
            if self.domain_ids:
                bad = [d for d in self.domain_ids if d not in labels]
                if bad:
                    raise ValueError(f"failure names domains {bad}; the cluster has {labels}")
                chosen = set(self.domain_ids)
            else:
                k = min(max(1, self.domains or 1), len(labels))
                chosen = {labels[int(i)] for i in rng.choice(len(labels), size=k, replace=False)}
            return tuple(w for w, d in enumerate(domain_of or ()) if d in chosen)
        if self.workers:
            bad = [w for w in self.workers if not 0 <= w < n_workers]
            if bad:
                raise ValueError(f"failure names workers {bad} outside 0..{n_workers - 1}")
            return tuple(sorted(set(self.workers)))
        k = self.count if self.count is not None else max(1, round((self.frac or 0.0) * n_workers))
        k = min(k, n_workers)
        return tuple(sorted(int(x) for x in rng.choice(n_workers, size=k, replace=False)))

    def to_spec(self) -> str:
        t = f"{self.t * 100:g}%" if self.t_frac else f"{self.t:g}s"
        if self.domain_ids:
            return f"t={t}:domain={'+'.join(map(str, self.domain_ids))}"
        if self.domains is not None:
            return f"t={t}:domains={self.domains}"
        if self.workers:
            return f"t={t}:worker={'+'.join(map(str, self.workers))}"
        if self.count is not None:
            return f"t={t}:count={self.count}"
        return f"t={t}:frac={self.frac:g}"


def parse_fail(spec: str) -> FailureSpec:
    """"t=30s:worker=1" | "t=30s:worker=1+3" | "t=30s:count=4" | "t=30s:frac=0.25" |
    "t=30s:domains=1" (whole failure domains, chosen with the seed) | "t=30s:domain=0+2";
    t may also be a share of the workload's arrival span: "t=30%:worker=0"."""
    parts = dict(p.split("=", 1) for p in spec.split(":") if "=" in p)
    if "t" not in parts or len(parts) != len([p for p in spec.split(":") if p]):
        raise ValueError(f"bad --fail {spec!r}: expected t=<time>:worker=<id>|count=<n>|frac=<f>|domains=<n>|domain=<id>")
    ts = parts.pop("t").strip()
    t_frac = ts.endswith("%")
    t = float(ts[:-1]) / 100.0 if t_frac else parse_duration(ts)
    if len(parts) != 1:
        raise ValueError(f"bad --fail {spec!r}: give exactly one of worker=, count=, frac=, domains=, domain=")
    (k, v), = parts.items()
    if k == "worker":
        return FailureSpec(t, workers=tuple(int(x) for x in re.split(r"[+,]", v)), t_frac=t_frac)
    if k == "count":
        return FailureSpec(t, count=int(v), t_frac=t_frac)
    if k == "frac":
        f = float(v)
        if not 0 < f <= 1:
            raise ValueError("frac must be in (0, 1]")
        return FailureSpec(t, frac=f, t_frac=t_frac)
    if k == "domains":
        n = int(v)
        if n < 1:
            raise ValueError("domains must be >= 1")
        return FailureSpec(t, domains=n, t_frac=t_frac)
    if k == "domain":
        return FailureSpec(t, domain_ids=tuple(int(x) for x in re.split(r"[+,]", v)), t_frac=t_frac)
    raise ValueError(f"bad --fail {spec!r}: unknown key {k!r}")


@dataclass(frozen=True)
class FailurePlan:
    """Scheduled failures plus optional random failures (exponential, per worker MTBF)."""

    scheduled: tuple[FailureSpec, ...] = ()
    mtbf_s: float | None = None
    horizon_s: float | None = None       # MTBF failures drawn in [0, horizon); None: last arrival

    def events(self, n_workers: int, seed: int, horizon: float,
               domains: Sequence[int | None] | None = None) -> list[tuple[float, int]]:
        """(time, worker) pairs, sorted. Same seed -> same failures for every policy. `domains`:
        each worker's failure domain (for domain failures)."""
        rng = np.random.default_rng([seed, 0x5EED])
        out = [(f.time(horizon), w) for f in self.scheduled for w in f.resolve(n_workers, rng, domains)]
        if self.mtbf_s:
            end = self.horizon_s if self.horizon_s is not None else horizon
            for w in range(n_workers):
                t = 0.0
                while True:
                    t += float(rng.exponential(self.mtbf_s))
                    if t >= end or not math.isfinite(t):
                        break
                    out.append((t, w))
        return sorted(out)


@dataclass
class SimStats:
    events: int = 0
    steps: int = 0                        # worker epochs executed (each 1+ identical iterations)
    iterations: int = 0                   # engine iterations represented by those epochs
    policy_calls: dict[str, int] = field(default_factory=dict)
    placed: int = 0
    unprotected: int = 0
    reprotected: int = 0
    interrupted: int = 0
    restores: int = 0
    recomputes: int = 0
    shed: int = 0
    holder_cofailed: int = 0              # interrupted requests whose holder had also failed (all of them, K > 1)
    copies_placed: int = 0                # checkpoint copies placed (K per request where they fit)
    copies_missing: int = 0               # copies wanted (K > 1 or auto) that no holder had room for
    copies_lost: int = 0                  # copies of interrupted requests whose holder had failed too
    no_valid_copy: int = 0                # interrupted requests without a surviving copy holding >= 1 page
    crash_nic_backlog_s: float = 0.0      # checkpoint pages queued on a failed worker's NIC at its crash, seconds (sum)
    k_hist: list[int] = field(default_factory=list)   # [K] -> requests given K copies (K > 1 or auto)
    protected_interrupted: int = 0        # interrupted requests that had a holder
    restored_tokens: int = 0
    recompute_tokens: int = 0
    # per target worker, the interrupted requests dispatched to it (lumen.metrics.targets reads it)
    recovered_here: dict[int, dict[str, int]] = field(default_factory=dict)
    stream_bytes: float = 0.0
    assisted_steps: int = 0               # partner iterations that verified at least one draft token
    verify_positions: int = 0             # draft tokens verified, summed over those iterations
    spec_idle_steps: int = 0              # assisted partner iterations where the rule chose K = 0 for all
    spec_k_hist: list[int] = field(default_factory=list)   # [K] -> request-iterations of a paired partner
    pair_moves: int = 0                   # a recovering worker moved to another partner (goodput)
    draft_skipped: int = 0                # restarts that did not read a cold draft (it did not pay)
    failures: int = 0
    errors: int = 0
    wall_s: float = 0.0
