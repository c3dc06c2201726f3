"""Issue 9's setup on the machine at hand: a Qwen3-shaped target, its self-draft, and the bandwidths
that bound a recovery. The experiment itself is `lumen bench` (see benchmarks/gpu_repro.sh).

    python3 benchmarks/gpu_repro.py prepare --preset qwen3-8b --out prepare.json

1. The target: random weights (seeded, drawn on the device), written once as safetensors under
   $LUMEN_HOME/models/repro-PRESET, so that every worker (re)load is a real read of that file.
2. The draft: random weights make a separately trained small draft useless, so the draft is a
   self-draft, the target's first k layers plus its embeddings, final norm and head, written as its
   own model directory. k is the smallest layer count whose greedy acceptance rate (K draft tokens
   per round, measured on the target) reaches --acceptance (default 0.6, the paper's α).
3. The numbers a recovery is made of: the disk's direct-read bandwidth (O_DIRECT, page cache
   bypassed), pinned host -> device copy bandwidth, and the draft/target decode step cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch

from lumen.model import PRESETS
from lumen.model.decoder import Decoder
from lumen.model.draft import copy_layers
from lumen.model.hub import lumen_home
from lumen.model.loader import load_model, random_model, save_model
from lumen.model.specmeasure import SpecStats, decode_step_time, greedy_spec_decode


def _target(preset: str, device: str, dtype: torch.dtype) -> tuple[Decoder, Path, dict]:
    cfg = PRESETS[preset]
    out = lumen_home() / "models" / f"repro-{preset}"
    info: dict = {"preset": preset, "dir": str(out), "params": cfg.param_count()}
    if (out / "config.json").is_file():
        t = time.perf_counter()
        model = load_model(out, device, dtype, progress=False).model
        info["load_s"] = time.perf_counter() - t
    else:
        t = time.perf_counter()
        model = random_model(cfg, device, dtype)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, cfg, tmp)
        os.sync()
        tmp.rename(out)
        info["write_s"] = time.perf_counter() - t
    info["bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return model, out, info


def _first_layers(target: Decoder, k: int) -> Decoder:
    """A k-layer Decoder sharing the target's tensors (no copy): the self-draft, for measuring."""
    cfg = dataclasses.replace(target.config, num_layers=k)
    with torch.device("meta"):
        draft = Decoder(cfg)
    state = {n: p for n, p in target.state_dict().items()
             if not n.startswith("layers.") or int(n.split(".")[1]) < k}
    draft.load_state_dict(state, strict=True, assign=True)
    return draft.eval()


def _acceptance(target: Decoder, k: int, prompts: list[list[int]], max_new: int, spec_k: int) -> SpecStats:
    stats = SpecStats()
    draft = _first_layers(target, k)
    with torch.inference_mode():
        for p in prompts:
            greedy_spec_decode(target, draft, p, max_new, k=spec_k, stats=stats)
    return stats


def pick_k(target: Decoder, goal: float, prompts: list[list[int]], max_new: int, spec_k: int) -> tuple[int, list]:
    """Smallest k whose acceptance reaches `goal` (bisection: acceptance grows with k; the full
    model accepts everything)."""
    n = target.config.num_layers
    tried: dict[int, SpecStats] = {}

    def acc(k: int) -> float:
        if k not in tried:
            t = time.perf_counter()
            tried[k] = _acceptance(target, k, prompts, max_new, spec_k)
            print(f"  k={k:3d}: acceptance {tried[k].acceptance:.3f} "
                  f"({tried[k].accepted}/{tried[k].proposed}) in {time.perf_counter() - t:.1f} s", flush=True)
        return tried[k].acceptance

    lo, hi = 0, n - 1  # acc(lo) < goal assumed (k=0 is no draft); hi: the largest proper draft
    if acc(hi) < goal:
        lo = hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if acc(mid) >= goal:
            hi = mid
        else:
            lo = mid
    # report the candidate closest to the goal among the two bracketing ones
    best = min((k for k in tried if k in (lo, hi)), key=lambda k: abs(tried[k].acceptance - goal), default=hi)
    table = [{"k": k, "acceptance": s.acceptance, "accepted": s.accepted, "proposed": s.proposed,
              "tokens_per_target_call": s.tokens_per_target_call} for k, s in sorted(tried.items())]
    return best, table


def direct_read_gbps(path: Path, gib: int = 4) -> float | None:
    """dd with O_DIRECT: the disk, not the page cache."""
    size = path.stat().st_size
    count = max(1, min(gib * 16, size // (64 << 20)))
    try:
        r = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=64M", f"count={count}", "iflag=direct"],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", r.stderr)
    return int(m.group(1)) / float(m.group(2)) / 1e9 if m else None


def pinned_h2d_gbps(device: str, mib: int = 1024) -> float | None:
    if not device.startswith("cuda"):
        return None
    host = torch.empty(mib << 20, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device=device)
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return (mib << 20) / sorted(times)[len(times) // 2] / 1e9


def reload_rates(model_dir: Path, device: str, dtype: torch.dtype) -> dict:
    """A worker's reload, cold page cache: disk -> host by safetensors' mmap reader (what workers
    used before 2026-11-28) and by lumen's chunked parallel reader, then host -> device."""
    from safetensors import safe_open

    from lumen.model.loader import build_model_from_host, read_config, read_weights_to_host
    from lumen.runtime.page_cache import evict_models

    files = sorted(model_dir.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    out: dict = {"bytes": size}
    os.sync()
    evict_models([model_dir])
    t = time.perf_counter()
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                h.get_tensor(k).clone()  # get_tensor maps lazily: touch the bytes as a load would
    out["mmap_reader_GBps"] = size / (time.perf_counter() - t) / 1e9
    evict_models([model_dir])
    pin = device.startswith("cuda")
    t = time.perf_counter()
    host = read_weights_to_host(model_dir, dtype=dtype, pin=pin)
    out["chunked_reader_GBps"] = size / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    model = build_model_from_host(read_config(model_dir), host, device, dtype)
    out["host_to_device_GBps"] = size / (time.perf_counter() - t) / 1e9
    del model, host
    return out


def prepare(args: argparse.Namespace) -> dict:
    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    result: dict = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "machine": platform.node(), "device": device,
                    "gpu": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
                    "torch": torch.__version__}
    target, target_dir, result["target"] = _target(args.preset, device, dtype)
    print(f"target {target_dir}: {result['target']}", flush=True)
    draft_dir = target_dir.with_name(target_dir.name + "-selfdraft")
    meta_path = draft_dir / "lumen_selfdraft.json"
    if meta_path.is_file() and not args.reselect:
        result["draft"] = json.loads(meta_path.read_text())
        print(f"draft {draft_dir}: k={result['draft']['k']} (already selected)", flush=True)
    else:
        gen = torch.Generator().manual_seed(args.seed)
        vocab = target.config.vocab_size
        prompts = [torch.randint(100, min(vocab, 30000), (args.prompt_len,), generator=gen).tolist()
                   for _ in range(args.prompts)]
        t = time.perf_counter()
        k, table = pick_k(target, args.acceptance, prompts, args.max_new, args.spec_k)
        select_s = time.perf_counter() - t
        t_target = decode_step_time(target)
        t_draft = decode_step_time(_first_layers(target, k))
        shutil.rmtree(draft_dir, ignore_errors=True)
        draft_dir.mkdir(parents=True)
        t = time.perf_counter()
        copy_layers(target_dir, draft_dir, list(range(k)), dtype=torch.bfloat16, name=draft_dir.name)
        write_s = time.perf_counter() - t
        chosen = next(row for row in table if row["k"] == k)
        result["draft"] = {"dir": str(draft_dir), "k": k, "target_layers": target.config.num_layers,
                           "goal": args.acceptance, "acceptance": chosen["acceptance"],
                           "tokens_per_target_call": chosen["tokens_per_target_call"], "spec_k": args.spec_k,
                           "prompts": args.prompts, "prompt_len": args.prompt_len, "max_new": args.max_new,
                           "search": table, "select_s": select_s, "write_s": write_s,
                           "target_step_s": t_target, "draft_step_s": t_draft,
                           "draft_over_target_cost": t_draft / t_target,
                           "bytes": sum(f.stat().st_size for f in draft_dir.glob("*.safetensors"))}
        meta_path.write_text(json.dumps(result["draft"], indent=2))
        print(f"draft {draft_dir}: k={k}, acceptance {chosen['acceptance']:.3f}, "
              f"step cost {t_draft / t_target:.2f} of the target", flush=True)
    del target
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    result["disk_direct_read_GBps"] = direct_read_gbps(target_dir / "model.safetensors")
    if args.reload:
        result["reload"] = reload_rates(target_dir, device, dtype)
        print(f"reload: {result['reload']}", flush=True)
    result["pinned_h2d_GBps"] = pinned_h2d_gbps(device)
    print(f"disk (O_DIRECT) {result['disk_direct_read_GBps']} GB/s, pinned H2D {result['pinned_h2d_GBps']} GB/s",
          flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the target, select and write the self-draft, measure bandwidths")
    p.add_argument("--preset", default="qwen3-8b", choices=sorted(PRESETS))
    p.add_argument("--device", default=None, help="default: cuda:0 if present, else cpu (a dry run)")
    p.add_argument("--acceptance", type=float, default=0.6, help="greedy acceptance the self-draft should reach")
    p.add_argument("--spec-k", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reselect", action="store_true", help="measure k again even if a self-draft exists")
    p.add_argument("--reload", action="store_true", help="also time a cold reload of the target, both readers")
    p.add_argument("--out", default=None)
    args = ap.parse_args()
    result = prepare(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
