"""How many checkpoint copies a request gets, and which copy a recovery restores from (issue 25;
docs/replicas.md).

The paper keeps one copy per request; a failure that also takes its holder forces a full
recompute. With K holders (`placement.place_checkpoints`) a request loses its checkpoint only when
its executor and all K holders fail together. This module holds the rest of that decision:

- a failure model: each worker fails on its own with probability p over the request's remaining
  lifetime, and each failure domain (a node, a rack) fails as a whole with probability q, all
  independently (`FailureModel` turns rates into p and q for a lifetime);
- `co_failure_probability`: P(every one of a request's workers fails) for workers laid out over
  domains, and `spread_occupancy`: the layout `place_checkpoints` gives K copies;
- `choose_replicas`: the `auto` rule, K per request from its expected loss against a copy's price
  (`CopyPrice`, in seconds of recompute: the loss's unit);
- `ReplicaRule`: `--ckpt-replicas` (a fixed K or `auto`) as one call, `k_for`, from what the caller
  knows of a request (its recompute cost, remaining lifetime, copy size) and the NIC; the simulator
  and the live controller both ask it;
- `restore_source`: the live holder with the longest valid prefix.

Pure functions over their arguments; nothing here reads the cluster except `restore_source`,
which reads a `ClusterView` like every decision in `lumen.policy`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .view import ClusterView


def _prob(x: float, name: str) -> float:
    x = float(x)
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {x}")
    return x


@dataclass(frozen=True)
class FailureModel:
    """The failures the `auto` rule plans for: independent failures of single workers
    (`worker_rate_per_s` = 1 / a worker's MTBF) and failures of a whole domain at once
    (`domain_rate_per_s` = 1 / a domain's MTBF), all Poisson and independent of each other."""

    worker_rate_per_s: float = 0.0
    domain_rate_per_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("worker_rate_per_s", "domain_rate_per_s"):
            v = getattr(self, name)
            if not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")

    @classmethod
    def from_mtbf(cls, worker_mtbf_s: float | None = None, domain_mtbf_s: float | None = None) -> FailureModel:
        """None (or inf): that kind of failure is not planned for."""
        def rate(m: float | None) -> float:
            if m is None or math.isinf(m):
                return 0.0
            if not m > 0:
                raise ValueError(f"an MTBF must be > 0, got {m}")
            return 1.0 / m
        return cls(rate(worker_mtbf_s), rate(domain_mtbf_s))

    def over(self, lifetime_s: float) -> tuple[float, float]:
        """(p, q) over `lifetime_s` seconds: p = 1 - exp(-worker_rate * T), q likewise per domain."""
        t = max(0.0, float(lifetime_s))
        return -math.expm1(-self.worker_rate_per_s * t), -math.expm1(-self.domain_rate_per_s * t)


def co_failure_probability(p: float, q: float, occupancy: Sequence[int]) -> float:
    """P(all of a request's workers fail): `occupancy[d]` of them (executor and holders) sit in
    domain d. A domain fails whole with probability q; otherwise each of its workers fails on its
    own with probability p; domains are independent. So

        P = prod_d ( q + (1 - q) * p ** occupancy[d] ).

    Non-decreasing in p and in q; adding a worker to any domain (or a new domain) never raises it.
    A worker of unknown domain is a domain of its own (occupancy 1)."""
    p, q = _prob(p, "p"), _prob(q, "q")
    out = 1.0
    for n in occupancy:
        if n < 0:
            raise ValueError("occupancy must be >= 0")
        if n:
            out *= q + (1.0 - q) * p ** n
    return out


def spread_occupancy(k: int, domains: int | None) -> tuple[int, ...]:
    """Occupancy of the executor and `k` holders as `place_checkpoints` lays them out when enough
    workers fit: over `domains` domains as evenly as possible (the executor's counted), so with
    domains > k every one is alone in its domain. None: domains unknown, every worker its own."""
    if k < 0:
        raise ValueError("k must be >= 0")
    n = k + 1
    if domains is None or domains >= n:
        return (1,) * n
    if domains < 1:
        raise ValueError("domains must be >= 1")
    base, extra = divmod(n, domains)
    return tuple(base + 1 if i < extra else base for i in range(domains))


def loss_probability(k: int, p: float, q: float, domains: int | None = None) -> float:
    """P(a request with k copies spread by `place_checkpoints` loses all of them together with its
    executor): `co_failure_probability` of `spread_occupancy(k, domains)`. Non-increasing in k."""
    return co_failure_probability(p, q, spread_occupancy(k, domains))


@dataclass(frozen=True)
class CopyPrice:
    """What one checkpoint copy costs, in seconds of recompute (the unit of the expected loss):
    `per_net_s` recompute seconds per second of NIC time its pages take to stream
    (bytes / NIC bandwidth), plus `per_gb_s` recompute seconds per GB-second of host memory it
    keeps reserved at its holder (reservation x lifetime). Streaming is off the critical path and
    host memory within the budget is otherwise idle, so both prices are small; they are the knob
    that sets how much protection `auto` buys (docs/replicas.md shows the trade-off)."""

    per_net_s: float = 1e-4
    per_gb_s: float = 1e-6

    def __post_init__(self) -> None:
        if not (self.per_net_s >= 0 and self.per_gb_s >= 0
                and math.isfinite(self.per_net_s) and math.isfinite(self.per_gb_s)):
            raise ValueError("copy prices must be finite and >= 0")

    def cost_s(self, copy_bytes: float, net_bytes_per_s: float, reserved_bytes: float, lifetime_s: float) -> float:
        """The price of one copy that streams `copy_bytes` over a NIC of `net_bytes_per_s` and
        reserves `reserved_bytes` for `lifetime_s` seconds."""
        if not net_bytes_per_s > 0:
            raise ValueError("net_bytes_per_s must be > 0")
        return (self.per_net_s * max(0.0, copy_bytes) / net_bytes_per_s
                + self.per_gb_s * max(0.0, reserved_bytes) / 1e9 * max(0.0, lifetime_s))


def choose_replicas(recompute_s: float, copy_cost_s: float, p: float, q: float, k_max: int,
                    domains: int | None = None) -> int:
    """The `auto` rule: how many checkpoint copies (1..k_max) a request gets.

    `recompute_s`: what losing every copy costs, in seconds of recompute (the request's context
    times the recompute rate); `copy_cost_s`: one copy's price in the same unit (`CopyPrice`);
    p, q: the failure model over the request's remaining lifetime (`FailureModel.over`); `domains`:
    how many failure domains hold candidate holders (None: unknown, every worker its own).

    K = the smallest K in 1..k_max whose remaining expected loss is no more than one copy costs,

        recompute_s * loss_probability(K, p, q, domains) <= copy_cost_s,

    else k_max: copies are added while the loss the request still risks is worth more than a copy.
    Where copies pay at all (f = q + (1 - q) p << 1) the next copy removes a share (1 - f) ~ 1 of
    that remaining loss, so this is the marginal rule "add a copy while it saves more than it
    costs"; unlike the marginal rule it is monotone: more risk (p or q up) never lowers K, a
    pricier copy never raises it, and K = 1 when failures are rare (p = q = 0) or recompute is
    free. One copy is the floor (the paper's rule; `place_checkpoint`): the rule only adds copies.
    """
    if k_max < 1:
        raise ValueError("k_max must be >= 1")
    if not (recompute_s >= 0 and copy_cost_s >= 0):
        raise ValueError("recompute_s and copy_cost_s must be >= 0")
    p, q = _prob(p, "p"), _prob(q, "q")
    for k in range(1, k_max):
        if recompute_s * loss_probability(k, p, q, domains) <= copy_cost_s:
            return k
    return k_max


def parse_replicas(value) -> int | str:
    """--ckpt-replicas: an int >= 1 or 'auto' (ValueError otherwise)."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        k = int(text)
    except ValueError:
        raise ValueError(f"checkpoint replicas must be an integer >= 1 or 'auto', not {value!r}") from None
    if k < 1:
        raise ValueError(f"checkpoint replicas must be >= 1, not {k}")
    return k


@dataclass(frozen=True)
class ReplicaRule:
    """How many copies each request gets: `replicas` copies, or under "auto" `choose_replicas` with at
    most `k_max`, planning for `failures` at the prices `price`."""

    replicas: int | str = 1
    k_max: int = 3
    failures: FailureModel = FailureModel()
    price: CopyPrice = CopyPrice()

    def __post_init__(self) -> None:
        object.__setattr__(self, "replicas", parse_replicas(self.replicas))
        if self.k_max < 1:
            raise ValueError("k_max must be >= 1")

    @property
    def most(self) -> int:
        """The most copies a request may get."""
        return self.k_max if self.replicas == "auto" else int(self.replicas)

    def k_for(self, view: ClusterView, recompute_s: float, lifetime_s: float, copy_bytes: float,
              net_bytes_per_s: float) -> int:
        """K for one request: `recompute_s` what losing every copy costs (its context at the recompute
        rate), `lifetime_s` its remaining lifetime, `copy_bytes` the bytes one copy streams and keeps
        reserved, `net_bytes_per_s` the executor's NIC; domains are counted in `view`."""
        if self.replicas != "auto":
            return int(self.replicas)
        p, q = self.failures.over(lifetime_s)
        cost = self.price.cost_s(copy_bytes, net_bytes_per_s, copy_bytes, lifetime_s)
        return choose_replicas(recompute_s, cost, p, q, self.k_max, domain_count(view))


def restore_source(view: ClusterView, copies: Sequence[tuple[int, int, int | None]]) -> int | None:
    """Which copy a recovery restores from: `copies` are (holder id, valid prefix tokens, holder
    epoch when the copy was made, None = not tracked) of one request. Returns the holder that is
    alive and SERVING in the same epoch with the longest valid prefix, ties to the lowest id; None
    when no holder survives (full recompute). The chosen holder goes into the request's
    `RequestView.holder`, so `dispatch_interrupted` (unchanged) restores there or sheds it."""
    c = view.columns
    elig = c.eligible()
    best: tuple[int, int] | None = None
    for h, prefix, epoch in copies:
        i = c.idx(h)
        if i is None or not elig[i] or (epoch is not None and epoch != int(c.epoch[i])):
            continue
        key = (-int(prefix), int(h))
        if best is None or key < best:
            best = key
    return None if best is None else best[1]


def domain_count(view: ClusterView) -> int | None:
    """Failure domains among the SERVING workers of `view` (the `domains` argument of
    `choose_replicas`): distinct known nodes, plus one per worker of unknown node; None when no
    worker's node is known (every worker its own domain)."""
    c = view.columns
    elig = c.eligible()
    nodes = c.node[elig]
    known = nodes[nodes >= 0]
    if known.size == 0:
        return None
    return int(len(set(known.tolist())) + (nodes < 0).sum())
