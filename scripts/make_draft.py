#!/usr/bin/env python
"""Produce and measure the draft of the embedded default model (SmolLM2-135M-Instruct).

The draft is the target with some decoder layers removed (stored in bf16). Which layers: a greedy
search on teacher-forced top-1 agreement with the target, over text the target itself generated
(greedy) for a TRAINING prompt set that is disjoint from the measurement prompts.

    python scripts/make_draft.py search     # ~10 min on 2 CPU cores: writes src/lumen/model/data/default_draft.json
    python scripts/make_draft.py measure    # acceptance (K=4, greedy) on the fixed prompt set + step-cost ratio

`search` is deterministic (greedy decoding, fixed prompts); `measure` reports
acceptance = accepted draft tokens / proposed draft tokens, with the target verifying K+1
positions per round on DenseKV, and the batch-1 decode step time of draft / target measured in
the same process, interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lumen.model import PRESETS, Decoder, load_model  # noqa: F401  (PRESETS: handy in a REPL)
from lumen.model.draft import RECIPE_FILE
from lumen.model.specmeasure import PROMPTS, SpecStats, decode_step_time, greedy_spec_decode

RECIPE_PATH = Path(__file__).resolve().parents[1] / "src" / "lumen" / "model" / "data" / RECIPE_FILE

TOPICS = ["volcanoes", "the Roman Empire", "machine learning", "coffee", "electric cars", "honey bees",
          "the moon landing", "chess", "climate change", "jazz music", "the internet", "dinosaurs",
          "recycling", "the human heart", "rainforests", "ancient Egypt"]
TEMPLATES = ["Explain {} in simple terms.", "Write a short story about {}.", "What are three interesting facts about {}?"]
TRAIN_PROMPTS = [t.format(x) for x in TOPICS for t in TEMPLATES]
assert not set(TRAIN_PROMPTS) & set(PROMPTS), "search and measurement prompts must be disjoint"


# ------------------------------------------------------------------ batched target generation

class _BatchKV:
    """Attention backend for B sequences: prefill one slot at a time, then one token per slot."""

    def __init__(self, cfg, batch: int, cap: int) -> None:
        shape = (batch, cap, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape) for _ in range(cfg.num_layers)]
        self.lens = torch.zeros(batch, dtype=torch.long)
        self.gqa = cfg.num_heads // cfg.num_kv_heads
        self.slot: int | None = None

    def __call__(self, li, q, k, v):
        if self.slot is not None:
            s, n, t = self.slot, int(self.lens[self.slot]), q.shape[0]
            self.k[li][s, n:n + t], self.v[li][s, n:n + t] = k, v
            ks = self.k[li][s, :n + t].repeat_interleave(self.gqa, 1).transpose(0, 1)
            vs = self.v[li][s, :n + t].repeat_interleave(self.gqa, 1).transpose(0, 1)
            mask = torch.arange(n + t)[None] <= torch.arange(n, n + t)[:, None]
            return F.scaled_dot_product_attention(q.transpose(0, 1), ks, vs, attn_mask=mask).transpose(0, 1)
        rows = torch.arange(q.shape[0])
        self.k[li][rows, self.lens], self.v[li][rows, self.lens] = k, v
        m = int(self.lens.max()) + 1
        ks = self.k[li][:, :m].repeat_interleave(self.gqa, 2).transpose(1, 2)
        vs = self.v[li][:, :m].repeat_interleave(self.gqa, 2).transpose(1, 2)
        mask = (torch.arange(m)[None] <= self.lens[:, None])[:, None, None, :]
        return F.scaled_dot_product_attention(q[:, :, None], ks, vs, attn_mask=mask)[:, :, 0]


@torch.no_grad()
def batch_greedy(model: Decoder, prompts: list[list[int]], max_new: int, stop: tuple[int, ...]) -> list[list[int]]:
    kv = _BatchKV(model.config, len(prompts), max(map(len, prompts)) + max_new + 1)
    outs = []
    for s, p in enumerate(prompts):
        kv.slot = s
        h = model(torch.tensor(p), torch.arange(len(p)), kv)
        kv.lens[s] = len(p)
        outs.append([int(model.logits(h[-1:]).argmax())])
    kv.slot = None
    for _ in range(max_new - 1):
        h = model(torch.tensor([o[-1] for o in outs]), kv.lens.clone(), kv)
        kv.lens += 1
        for o, t in zip(outs, model.logits(h).argmax(-1).tolist(), strict=True):
            o.append(t)
    # cut each continuation after its first stop token
    return [o[:next((i + 1 for i, t in enumerate(o) if t in stop), len(o))] for o in outs]


# ------------------------------------------------------------------ teacher-forced agreement

class _Packed:
    """Causal attention over packed whole sequences (teacher forcing, nothing cached)."""

    def __init__(self, lens: list[int], gqa: int) -> None:
        self.lens, self.gqa = lens, gqa

    def __call__(self, li, q, k, v):
        out = []
        for qs, ks, vs in zip(q.split(self.lens), k.split(self.lens), v.split(self.lens), strict=True):
            ks, vs = ks.repeat_interleave(self.gqa, 1), vs.repeat_interleave(self.gqa, 1)
            out.append(F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1),
                                                      is_causal=True).transpose(0, 1))
        return torch.cat(out)


class Agreement:
    """Caches the target's residual stream at every layer boundary once, so evaluating a drop set
    D only runs the layers from min(D) on."""

    @torch.no_grad()
    def __init__(self, model: Decoder, seqs: list[tuple[list[int], list[int]]]) -> None:
        self.m = model
        self.lens = [len(p) + len(o) for p, o in seqs]
        ids = torch.tensor([t for p, o in seqs for t in p + o])
        self.pos = torch.cat([torch.arange(n) for n in self.lens])
        # positions whose next token the draft would have to propose: last prompt token .. last-but-one output
        sel, start = [], 0
        for (p, o), n in zip(seqs, self.lens, strict=True):
            sel += range(start + len(p) - 1, start + len(p) + len(o) - 1)
            start += n
        self.sel = torch.tensor(sel)
        self.attn = _Packed(self.lens, model.config.num_heads // model.config.num_kv_heads)
        x = model.embed_tokens(ids)
        self.cos, self.sin = model.rotary(self.pos, x.dtype)
        self.hidden = [x]
        for layer in model.layers:
            x = layer(x, self.cos, self.sin, self.attn)
            self.hidden.append(x)
        self.labels = model.logits(model.norm(x[self.sel])).argmax(-1)

    @torch.no_grad()
    def __call__(self, drop: set[int]) -> float:
        first = min(drop) if drop else len(self.m.layers)
        x = self.hidden[first]
        for i in range(first, len(self.m.layers)):
            if i not in drop:
                x = self.m.layers[i](x, self.cos, self.sin, self.attn)
        pred = self.m.logits(self.m.norm(x[self.sel])).argmax(-1)
        return (pred == self.labels).float().mean().item()


def _chat_ids(tok, prompts):
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]


def cmd_search(args) -> None:
    torch.set_num_threads(args.threads)
    tgt = load_model("default", progress=False)
    t0 = time.perf_counter()
    prompts = _chat_ids(tgt.tokenizer, TRAIN_PROMPTS)
    outs = batch_greedy(tgt.model, prompts, args.max_new, tgt.config.eos_token_ids)
    print(f"generated {sum(map(len, outs))} target tokens for {len(prompts)} training prompts "
          f"in {time.perf_counter() - t0:.0f}s", flush=True)
    agree = Agreement(tgt.model, list(zip(prompts, outs, strict=True)))
    n = tgt.config.num_layers
    drop: set[int] = set()
    history = []
    while len(drop) < args.max_drop:
        scores = {j: agree(drop | {j}) for j in range(n) if j not in drop}
        best = max(scores, key=lambda j: (scores[j], -j))
        print(f"drop {sorted(drop)} + one of the rest, agreement by candidate: "
              + " ".join(f"{j}:{s:.3f}" for j, s in sorted(scores.items())), flush=True)
        if scores[best] < args.min_agreement:
            print(f"best next ({best}: {scores[best]:.3f}) is below --min-agreement {args.min_agreement}; stop")
            break
        drop.add(best)
        history.append({"drop": sorted(drop), "agreement": round(scores[best], 4)})
    recipe = {
        "target": "smollm2-135m-instruct",
        "drop_layers": sorted(drop),
        "dtype": "bfloat16",
        "search": {"command": "python scripts/make_draft.py search", "min_agreement": args.min_agreement,
                   "train_prompts": len(TRAIN_PROMPTS), "max_new": args.max_new,
                   "positions": len(agree.sel), "history": history},
    }
    RECIPE_PATH.write_text(json.dumps(recipe, indent=2) + "\n")
    print(f"wrote {RECIPE_PATH}: drop layers {sorted(drop)} ({time.perf_counter() - t0:.0f}s)")


def cmd_measure(args) -> None:
    torch.set_num_threads(args.threads)
    tgt = load_model("default", progress=False)
    draft = load_model(args.draft, progress=False)
    stats = SpecStats()
    t0 = time.perf_counter()
    for p in _chat_ids(tgt.tokenizer, PROMPTS):
        greedy_spec_decode(tgt.model, draft.model, p, args.max_new, args.k, tgt.config.eos_token_ids, stats)
    spec_s = time.perf_counter() - t0
    t_target, t_draft = [], []
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit both alike
        t_target.append(decode_step_time(tgt.model, repeats=1))
        t_draft.append(decode_step_time(draft.model, repeats=1))
    result = {
        "draft": str(draft.path), "draft_layers": draft.config.num_layers, "target_layers": tgt.config.num_layers,
        "k": args.k, "prompts": len(PROMPTS), "max_new": args.max_new,
        "proposed": stats.proposed, "accepted": stats.accepted, "acceptance": round(stats.acceptance, 4),
        "tokens_per_target_forward": round(stats.tokens_per_target_call, 3),
        # min over interleaved repeats (interference only adds time); the median pairwise ratio
        # shows how noisy the machine was
        "target_step_ms": round(1e3 * min(t_target), 2),
        "draft_step_ms": round(1e3 * min(t_draft), 2),
        "step_cost_ratio": round(min(t_draft) / min(t_target), 3),
        "step_cost_ratio_median_pairwise": round(statistics.median(
            d / t for d, t in zip(t_draft, t_target, strict=True)), 3),
        "param_ratio": round(sum(p.numel() for p in draft.model.parameters())
                             / sum(p.numel() for p in tgt.model.parameters()), 3),
        "threads": args.threads, "spec_seconds": round(spec_s, 1),
    }
    print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("search", help="choose the layers to drop; writes the committed recipe")
    s.add_argument("--max-new", type=int, default=48)
    s.add_argument("--min-agreement", type=float, default=0.78,
                   help="stop dropping layers below this teacher-forced top-1 agreement (0.78 ~ acceptance 0.55)")
    s.add_argument("--max-drop", type=int, default=8)
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=cmd_search)
    m = sub.add_parser("measure", help="acceptance rate and step-cost ratio of a draft")
    m.add_argument("--draft", default="default-draft")
    m.add_argument("--k", type=int, default=4)
    m.add_argument("--max-new", type=int, default=48)
    m.add_argument("--repeats", type=int, default=9)
    m.add_argument("--threads", type=int, default=1)
    m.set_defaults(func=cmd_measure)
    args = ap.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
