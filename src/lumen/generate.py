"""`lumen generate`: offline generation in one process, for quick checks."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from .engine import Engine, EngineConfig, SamplingParams
from .model.loader import load_model
from .model.tokenizer import IncrementalDecoder
from .runtime.stop_strings import StopMatcher


def generate_cli(args: argparse.Namespace) -> int:
    if not args.prompt:
        raise ValueError("the prompt is empty")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed).validate()
    dtype = torch.float64 if args.deterministic else (torch.bfloat16 if args.device.startswith("cuda")
                                                      else torch.float32)
    loaded = load_model(args.model, device=args.device, dtype=dtype, progress=True)
    if loaded.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer; lumen generate needs text in and out")
    draft = load_model(args.draft_model, device=args.device, dtype=dtype, progress=True) \
        if args.draft_model else None
    tok = loaded.tokenizer
    if args.no_chat:
        prompt_ids = tok.encode(args.prompt)
    else:
        prompt_ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=True)
    limit = loaded.config.max_position
    if len(prompt_ids) + params.max_tokens > limit:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                         f"context length {limit}")
    engine = Engine(loaded, EngineConfig(device=args.device, deterministic=args.deterministic, draft=draft,
                                         num_draft_tokens=args.spec_k))
    engine.add_request("cli", prompt_ids, params)
    decoder, stops = IncrementalDecoder(tok), StopMatcher(args.stop)
    start, n = time.perf_counter(), 0
    while engine.has_work():
        for out in engine.step():
            n += len(out.token_ids)
            sys.stdout.write(stops.push(decoder.add(out.token_ids)))
            sys.stdout.flush()
            if stops.stopped:
                engine.abort("cli")
            elif out.finished:
                sys.stdout.write(stops.push(decoder.flush()) + stops.flush())
    elapsed = time.perf_counter() - start
    stats = engine.stats()
    extra = ""
    if draft is not None and stats["spec_draft_tokens"]:
        extra = f", draft acceptance {stats['spec_acceptance']:.2f}"
    print(f"\n[{n} tokens in {elapsed:.2f}s, {n / max(elapsed, 1e-9):.1f} tok/s{extra}]", file=sys.stderr)
    return 0
