"""Greedy acceptance rate of the default draft and its per-step cost relative to the target.

    python benchmarks/draft_acceptance.py --max-new 64 --out draft.json

Fixed prompt set (lumen.model.specmeasure.PROMPTS, rendered with the chat template), K draft tokens
per round, the target verifies K+1 positions per round (plain DenseKV loop, fp32, CPU). Acceptance =
accepted draft tokens / proposed draft tokens. Cost ratio = draft / target batch-1 decode step time,
timed alternately (target, draft, target, ...) in the same process: the minimum of each over the
repeats (interference on a shared machine only adds time) and the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics

import torch

from lumen.model.loader import load_model
from lumen.model.quant import QUANT_KEY
from lumen.model.specmeasure import PROMPTS, SpecStats, decode_step_time, greedy_decode, greedy_spec_decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="default")
    ap.add_argument("--draft", default="default-draft")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=9, help="alternating timing repeats")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    target = load_model(args.target, progress=False)
    draft = load_model(args.draft, progress=False)
    tok = target.tokenizer
    stats = SpecStats()
    stop = tuple(target.config.eos_token_ids)
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True)
        out = greedy_spec_decode(target.model, draft.model, ids, args.max_new, k=args.k, stop=stop, stats=stats)
        assert out == greedy_decode(target.model, ids, args.max_new, stop=stop), "speculation changed the output"
    t_target, t_draft = [], []
    for _ in range(args.repeats):
        t_target.append(decode_step_time(target.model, repeats=1))
        t_draft.append(decode_step_time(draft.model, repeats=1))
    ratios = [d / t for d, t in zip(t_draft, t_target, strict=True)]
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "machine": platform.node(),
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "load_average": os.getloadavg(), "draft_path": str(draft.path),
              "draft_quantization": json.loads((draft.path / "config.json").read_text()).get(QUANT_KEY),
              "target": args.target, "draft": args.draft, "draft_layers": draft.config.num_layers,
              "target_layers": target.config.num_layers, "k": args.k, "prompts": len(PROMPTS),
              "max_new": args.max_new, "proposed": stats.proposed, "accepted": stats.accepted,
              "acceptance": stats.acceptance, "tokens_per_target_call": stats.tokens_per_target_call,
              "target_step_s": min(t_target), "draft_step_s": min(t_draft),
              "draft_over_target_cost": min(t_draft) / min(t_target),
              "draft_over_target_cost_median_pairwise": statistics.median(ratios),
              "timing_repeats": {"target_step_s": t_target, "draft_step_s": t_draft}}
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
