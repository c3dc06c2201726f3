#!/usr/bin/env python
"""Produce and measure the draft of the embedded default model (SmolLM2-135M-Instruct).

    python scripts/make_draft.py compare --write   # ~10 min on 2 CPU cores: measures the candidates,
                                                   # writes the best to src/lumen/model/data/default_draft.json
    python scripts/make_draft.py measure           # acceptance (K=4, greedy) on the fixed prompt set + step-cost ratio

`compare` builds each candidate draft the way `lumen models prepare` would and measures, on
TRAINING prompts disjoint from the measurement prompts: greedy acceptance at K (the target
verifying K+1 positions per round on DenseKV), and the batch-1 decode step time of draft / target
(interleaved, median of the per-repeat ratios). It ranks them by the speed-up a round would give,
tokens per target call / (1 + K * step ratio), and `--write` commits the best loadable one.

Candidates: the target without layer 5 in bf16 (the previous default, from a greedy layer-drop
search, see git history of this file); an fp16 copy whose linears the loader packs as fp16 on CPU
(lumen.model.quant); torch.ao dynamic int8 (in memory here only: its activations are quantized per
tensor, and SmolLM2's hidden states have a few huge channels, so its agreement suffers).

`measure` reports the same figures for one draft on the measurement prompts (PROMPTS).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from lumen.model import Decoder, load_model
from lumen.model.draft import RECIPE_FILE
from lumen.model.specmeasure import PROMPTS, SpecStats, decode_step_time, greedy_spec_decode

RECIPE_PATH = Path(__file__).resolve().parents[1] / "src" / "lumen" / "model" / "data" / RECIPE_FILE

TOPICS = ["volcanoes", "the Roman Empire", "machine learning", "coffee", "electric cars", "honey bees",
          "the moon landing", "chess", "climate change", "jazz music", "the internet", "dinosaurs",
          "recycling", "the human heart", "rainforests", "ancient Egypt"]
TEMPLATES = ["Explain {} in simple terms.", "Write a short story about {}.", "What are three interesting facts about {}?"]
TRAIN_PROMPTS = [t.format(x) for x in TOPICS for t in TEMPLATES]
assert not set(TRAIN_PROMPTS) & set(PROMPTS), "training and measurement prompts must be disjoint"


def _chat_ids(tok, prompts):
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}])) for p in prompts]


def _int8_dynamic(target: Decoder) -> Decoder:
    """Candidate kept only here: torch.ao dynamic int8 (per-channel weights, per-tensor activations)
    over every linear, head untied. Measured and rejected (see the module docstring)."""
    import copy
    import warnings

    from torch import nn
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    m = copy.deepcopy(target)
    m.lm_head = nn.Linear(m.config.hidden_size, m.config.vocab_size, bias=False)
    m.lm_head.weight = nn.Parameter(target.embed_tokens.weight.detach().clone())
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(m, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


# name -> recipe (built by lumen.model.draft.build_draft, loaded by the loader) or None (in memory only)
CANDIDATES: dict[str, dict | None] = {
    "drop5-bf16": {"drop_layers": [5], "dtype": "bfloat16"},  # the default before the fp16 draft
    "fp16-weights": {"drop_layers": [], "dtype": "float16", "quantization": "fp16-weights"},
    "int8-dynamic": None,
}


def cmd_compare(args) -> None:
    import tempfile

    from lumen.model.draft import build_draft
    from lumen.model.hub import default_paths, prepare_default
    torch.set_num_threads(args.threads)
    prepare_default()
    target_dir = default_paths()[0]
    tgt = load_model("default", progress=False)
    names = args.candidates or list(CANDIDATES)
    # a fixed sample across topics and templates
    prompts = _chat_ids(tgt.tokenizer, random.Random(0).sample(TRAIN_PROMPTS, min(args.prompts, len(TRAIN_PROMPTS))))
    rows: dict[str, dict] = {}
    models: dict[str, Decoder] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            recipe = CANDIDATES[name]
            if recipe is None:
                models[name] = _int8_dynamic(tgt.model)
            else:
                out = Path(tmp) / name
                out.mkdir()
                build_draft(target_dir, out, {"target": "smollm2-135m-instruct", **recipe})
                models[name] = load_model(out, progress=False).model
    for name, draft in models.items():
        stats = SpecStats()
        for p in prompts:
            greedy_spec_decode(tgt.model, draft, p, args.max_new, args.k, tgt.config.eos_token_ids, stats)
        rows[name] = {"acceptance": round(stats.acceptance, 4),
                      "tokens_per_target_call": round(stats.tokens_per_target_call, 3)}
        print(name, rows[name], flush=True)
    times: dict[str, list[float]] = {n: [] for n in ["target", *models]}
    for _ in range(args.repeats):  # interleaved, so load changes on a shared machine hit all alike
        times["target"].append(decode_step_time(tgt.model, repeats=1))
        for name, draft in models.items():
            times[name].append(decode_step_time(draft, repeats=1))
    for name in models:
        ratio = statistics.median(d / t for d, t in zip(times[name], times["target"], strict=True))
        # a round: k draft steps + one target verify (~ one decode step at batch 1 on CPU)
        rows[name].update(step_cost_ratio=round(ratio, 3),
                          est_speedup=round(rows[name]["tokens_per_target_call"] / (1 + args.k * ratio), 2))
    print(json.dumps(rows, indent=2))
    best = max((n for n in rows if CANDIDATES[n] is not None), key=lambda n: rows[n]["est_speedup"])
    best_any = max(rows, key=lambda n: rows[n]["est_speedup"])
    print(f"best: {best_any}" + ("" if best_any == best else f" (not a loader scheme; best loadable: {best})"))
    if args.write:
        recipe = {"target": "smollm2-135m-instruct", **CANDIDATES[best],
                  "chosen_by": {"command": "python scripts/make_draft.py compare --write", "k": args.k,
                                "train_prompts": len(prompts), "max_new": args.max_new, "threads": args.threads,
                                "candidates": rows}}
        RECIPE_PATH.write_text(json.dumps(recipe, indent=2) + "\n")
        print(f"wrote {RECIPE_PATH}: {best}")


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
        "disk_bytes_ratio": round((draft.path / "model.safetensors").stat().st_size
                                  / (tgt.path / "model.safetensors").stat().st_size, 3),
        "threads": args.threads, "spec_seconds": round(spec_s, 1),
    }
    print(json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="measure candidate drafts; --write commits the best as the recipe")
    c.add_argument("--candidates", nargs="*", choices=list(CANDIDATES))
    c.add_argument("--prompts", type=int, default=16, help="training prompts used (evenly spaced)")
    c.add_argument("--k", type=int, default=4)
    c.add_argument("--max-new", type=int, default=48)
    c.add_argument("--repeats", type=int, default=7)
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--write", action="store_true")
    c.set_defaults(func=cmd_compare)
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
