"""Greedy speculative-decoding measurement on DenseKV: acceptance rate and per-step cost.

Used by scripts/make_draft.py and the draft tests; independent of the engine so the draft's
quality is established against the plain decoder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .decoder import Decoder
from .dense_kv import DenseKV

# Fixed prompt set for the default draft's acceptance figure (chat prompts, rendered with the
# model's own template). Changing it changes the reported number: keep it stable.
PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a CPU cache is in two sentences.",
    "Give me three tips for staying productive while working from home.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Romeo and Juliet.",
    "How do plants make their food?",
    "Write a haiku about autumn leaves.",
    "What are the health benefits of drinking water?",
    "Describe a sunset over the mountains.",
    "How does a bicycle work?",
    "Tell me a fun fact about octopuses.",
    "What should I pack for a weekend camping trip?",
    "Explain gravity to a ten-year-old.",
    "Write a polite email asking my manager for a day off.",
    "Why is the sky blue?",
]


@dataclass
class SpecStats:
    proposed: int = 0
    accepted: int = 0
    generated: int = 0
    target_calls: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def tokens_per_target_call(self) -> float:
        return self.generated / max(self.target_calls, 1)


@torch.no_grad()
def greedy_spec_decode(target: Decoder, draft: Decoder, prompt: list[int], max_new: int, k: int = 4,
                       stop: tuple[int, ...] = (), stats: SpecStats | None = None) -> list[int]:
    """Draft proposes k tokens greedily, target verifies k+1 positions in one forward; returns the
    generated ids (identical to the target's own greedy output by construction)."""
    stats = stats or SpecStats()
    dev = target.device
    cap = len(prompt) + max_new + k + 2
    tkv = DenseKV(target.config, dev, target.dtype, capacity=cap)
    dkv = DenseKV(draft.config, dev, draft.dtype, capacity=cap)
    # Invariant: tkv holds every committed token but the newest; dkv holds some prefix of them.
    nxt = int(target.logits(target(torch.tensor(prompt, device=dev),
                                   torch.arange(len(prompt), device=dev), tkv)[-1:]).argmax(-1))
    stats.target_calls += 1
    out = [nxt]
    while len(out) < max_new and out[-1] not in stop:
        committed = prompt + out
        # --- propose n tokens: feed the committed tokens the draft lacks, then its own guesses
        n = min(k, max_new - len(out))
        pending = committed[dkv.length:]
        h = draft(torch.tensor(pending, device=dev),
                  torch.arange(dkv.length, len(committed), device=dev), dkv)
        props = [int(draft.logits(h[-1:]).argmax(-1))]
        for _ in range(n - 1):
            h = draft(torch.tensor(props[-1:], device=dev), torch.tensor([dkv.length], device=dev), dkv)
            props.append(int(draft.logits(h).argmax(-1)))
        # --- verify [newest committed, p1..pn] in one target forward
        start = tkv.length
        x = torch.tensor([out[-1], *props], device=dev)
        choice = target.logits(target(x, torch.arange(start, start + n + 1, device=dev), tkv)).argmax(-1).tolist()
        stats.target_calls += 1
        acc = 0
        while acc < n and props[acc] == choice[acc]:
            acc += 1
        stats.proposed += n
        stats.accepted += acc
        # --- roll back rejected positions in both caches
        tkv.truncate(start + 1 + acc)
        dkv.truncate(min(dkv.length, len(committed) + acc))
        for t in props[:acc] + [choice[acc]]:
            out.append(t)
            if t in stop or len(out) >= max_new:
                break
    stats.generated += len(out)
    return out


@torch.no_grad()
def greedy_decode(model: Decoder, prompt: list[int], max_new: int, stop: tuple[int, ...] = ()) -> list[int]:
    dev = model.device
    kv = DenseKV(model.config, dev, model.dtype, capacity=len(prompt) + max_new + 1)
    h = model(torch.tensor(prompt, device=dev), torch.arange(len(prompt), device=dev), kv)
    out = [int(model.logits(h[-1:]).argmax(-1))]
    while len(out) < max_new and out[-1] not in stop:
        h = model(torch.tensor(out[-1:], device=dev), torch.tensor([kv.length], device=dev), kv)
        out.append(int(model.logits(h).argmax(-1)))
    return out


@torch.no_grad()
def decode_step_time(model: Decoder, context: int = 128, steps: int = 32, repeats: int = 3) -> float:
    """Seconds per batch-1 decode step (one token forward + logits) after `context` tokens.

    The minimum over repeats: on a shared machine interference only ever adds time.
    """
    dev = model.device
    times = []
    for _ in range(repeats):
        kv = DenseKV(model.config, dev, model.dtype, capacity=context + steps + 1)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (context,), generator=gen).to(dev)
        model(ids, torch.arange(context, device=dev), kv)
        tok = torch.tensor([5], device=dev)
        t0 = time.perf_counter()
        for i in range(steps):
            model.logits(model(tok, torch.tensor([context + i], device=dev), kv)).argmax(-1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / steps)
    return min(times)
