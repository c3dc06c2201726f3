"""Self-drafts for random-weight targets: a target whose later layers refine less, and its first k
layers as the draft (issue 9's GPU reproduction).

With plain random weights every layer adds an O(1) contribution to the residual stream, so every
layer moves the argmax about as much as any other: dropping only the last of 36 layers already cut
greedy acceptance to 0.37 (2x H200 pilot, 2026-11-28), and a draft that accepts 0.6 would have to
be the whole model. Trained LLMs are not like that: their later layers mostly refine a prediction
the earlier ones have largely made. A depth decay gives random weights that property: the output
projections of each layer's two residual branches (attention's o_proj, the MLP's down_proj) are
scaled by decay**layer, which scales that layer's contribution to the residual stream exactly by
decay**layer (both branches are linear in those weights). Every layer still runs at full cost; the
target is written once with the chosen decay, so reloads read it like any model.

`pick_decay` fixes the draft's depth k and bisects the decay until the measured greedy acceptance of
the k-layer draft is within a tolerance of the goal (the paper's alpha = 0.6).
"""

from __future__ import annotations

import dataclasses

import torch

from .decoder import Decoder
from .specmeasure import SpecStats, greedy_spec_decode


def first_layers(target: Decoder, k: int) -> Decoder:
    """A k-layer Decoder sharing the target's tensors (no copy): the self-draft, for measuring."""
    if not 1 <= k <= target.config.num_layers:
        raise ValueError(f"k must be in 1..{target.config.num_layers}, got {k}")
    cfg = dataclasses.replace(target.config, num_layers=k)
    with torch.device("meta"):
        draft = Decoder(cfg)
    state = {n: p for n, p in target.state_dict().items()
             if not n.startswith("layers.") or int(n.split(".")[1]) < k}
    draft.load_state_dict(state, strict=True, assign=True)
    return draft.eval()


def residual_outputs(model: Decoder) -> list[tuple[int, torch.Tensor]]:
    """(layer index, weight) of every projection that writes into the residual stream."""
    return [(i, w) for i, layer in enumerate(model.layers)
            for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight)]


class DepthDecay:
    """Sets a model's depth decay in place, from a copy of its undecayed residual outputs (so trying
    many decays never compounds rounding)."""

    def __init__(self, model: Decoder):
        self.model = model
        self._base = [w.detach().clone() for _, w in residual_outputs(model)]
        self.decay = 1.0

    @torch.no_grad()
    def set(self, decay: float) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        for (layer, w), base in zip(residual_outputs(self.model), self._base, strict=True):
            w.copy_(base * decay ** layer)
        self.decay = decay

    def release(self) -> None:
        """Drop the undecayed copy (its memory) once the decay is chosen."""
        self._base = []


def acceptance(target: Decoder, k: int, prompts: list[list[int]], max_new: int, spec_k: int) -> SpecStats:
    """Greedy acceptance of the target's first k layers as its draft, K = spec_k tokens per round."""
    stats = SpecStats()
    draft = first_layers(target, k)
    with torch.inference_mode():
        for p in prompts:
            greedy_spec_decode(target, draft, p, max_new, k=spec_k, stats=stats)
    return stats


def pick_decay(target: Decoder, k: int, goal: float, prompts: list[list[int]], max_new: int, spec_k: int,
               tolerance: float = 0.03, max_tries: int = 10, log=print) -> tuple[float, list[dict]]:
    """Bisect the depth decay (acceptance falls as the decay rises towards 1, plain random weights)
    until the k-layer draft's acceptance is within `tolerance` of `goal`; returns the decay tried
    closest to the goal and every try. Leaves the target set to the returned decay."""
    scaler = DepthDecay(target)
    tried: list[dict] = []

    def measure(decay: float) -> float:
        scaler.set(decay)
        s = acceptance(target, k, prompts, max_new, spec_k)
        tried.append({"decay": decay, "acceptance": s.acceptance, "accepted": s.accepted,
                      "proposed": s.proposed, "tokens_per_target_call": s.tokens_per_target_call})
        log(f"  decay {decay:.4f}: acceptance {s.acceptance:.3f} ({s.accepted}/{s.proposed})")
        return s.acceptance

    lo, hi = 0.0, 1.0  # acceptance(lo) is high (only layer 0 counts), acceptance(hi) the plain model's
    if measure(hi) < goal - tolerance:
        for _ in range(max_tries - 1):
            mid = (lo + hi) / 2
            a = measure(mid)
            if abs(a - goal) <= tolerance:
                break
            lo, hi = (mid, hi) if a >= goal else (lo, mid)
    best = min(tried, key=lambda row: abs(row["acceptance"] - goal))
    scaler.set(best["decay"])
    scaler.release()
    return best["decay"], tried
