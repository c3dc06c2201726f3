"""Issue 9's setup on the machine at hand: a Qwen3-shaped target, its self-draft, and the bandwidths
that bound a recovery. The experiment itself is `lumen bench` (see benchmarks/gpu_repro.sh).

    python3 benchmarks/gpu_repro.py prepare --preset qwen3-8b --out prepare.json

1. The target: random weights (seeded, drawn on the device), written once as safetensors under
   $LUMEN_HOME/models/repro-PRESET, so that every worker (re)load is a real read of that file.
2. The draft: random weights make a separately trained small draft useless, so the draft is a
   self-draft, the target's first k layers plus its embeddings, final norm and head, written as its
   own model directory (k = 1/8 of the layers by default). Plain random layers all move the argmax
   alike (no proper self-draft reached 0.6 in the pilot), so the target is drawn with a depth decay
   (lumen.model.selfdraft): layer l's residual branches are scaled by decay**l, and the decay is
   bisected until the k-layer draft's greedy acceptance is within --tolerance of --acceptance
   (default 0.6, the paper's alpha). Then the target is written with that decay.
3. The numbers a recovery is made of: the disk's direct-read bandwidth (O_DIRECT, page cache
   bypassed), pinned host -> device copy bandwidth, and the draft/target decode step cost.
"""

from __future__ import annotations

import argparse
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
from lumen.model.loader import random_model, save_model
from lumen.model.selfdraft import first_layers, pick_decay
from lumen.model.specmeasure import decode_step_time


def _write(model: Decoder, cfg, out: Path) -> float:
    """Write a model directory atomically (a half-written target must never look prepared)."""
    t = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, cfg, tmp, split_shared=True)  # its self-draft links the shared shard
    os.sync()
    tmp.rename(out)
    return time.perf_counter() - t


def _prompts(args: argparse.Namespace, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(args.seed)
    return [torch.randint(100, min(vocab, 30000), (args.prompt_len,), generator=gen).tolist()
            for _ in range(args.prompts)]


def make_target_and_draft(args: argparse.Namespace, device: str, dtype: torch.dtype) -> dict:
    """Draw the target, pick the depth decay for a k-layer self-draft, write both (once: a later call
    with the same settings reuses them; lumen_repro.json, written last, marks a finished pair)."""
    cfg = PRESETS[args.preset]
    target_dir = lumen_home() / "models" / f"repro-{args.preset}"
    draft_dir = target_dir.with_name(target_dir.name + "-selfdraft")
    meta_path = target_dir / "lumen_repro.json"
    k = args.draft_layers or max(1, round(cfg.num_layers / 8))
    settings = {"preset": args.preset, "k": k, "goal": args.acceptance, "tolerance": args.tolerance,
                "spec_k": args.spec_k, "prompts": args.prompts, "prompt_len": args.prompt_len,
                "max_new": args.max_new, "seed": args.seed, "dtype": str(dtype),
                # the draft links the target's embedding/norm/head shard (read once on a restart)
                "draft_shares_target": True}
    if meta_path.is_file() and not args.reselect:
        info = json.loads(meta_path.read_text())
        if info.get("settings") == settings:
            print(f"target {target_dir} and its draft already prepared", flush=True)
            return info
    # never pair a new target with an old draft, even if this call fails half-way
    shutil.rmtree(target_dir, ignore_errors=True)
    shutil.rmtree(draft_dir, ignore_errors=True)
    t = time.perf_counter()
    target = random_model(cfg, device, dtype)
    draw_s = time.perf_counter() - t
    t = time.perf_counter()
    decay, search = pick_decay(target, k, args.acceptance, _prompts(args, cfg.vocab_size), args.max_new,
                               args.spec_k, tolerance=args.tolerance)
    select_s = time.perf_counter() - t
    chosen = next(row for row in search if row["decay"] == decay)
    within = abs(chosen["acceptance"] - args.acceptance) <= args.tolerance
    if not within:
        print(f"WARNING: no decay brought the {k}-layer draft within {args.tolerance} of acceptance "
              f"{args.acceptance}; using the closest, {chosen['acceptance']:.3f}", flush=True)
    t_target = decode_step_time(target)
    t_draft = decode_step_time(first_layers(target, k))
    write_s = _write(target, cfg, target_dir)
    del target
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    draft_dir.mkdir(parents=True)
    copy_layers(target_dir, draft_dir, list(range(k)), dtype=dtype, name=draft_dir.name, share_with_target=True)
    info = {
        "settings": settings,
        "target": {"preset": args.preset, "dir": str(target_dir), "params": cfg.param_count(),
                   "depth_decay": decay, "draw_s": draw_s, "write_s": write_s,
                   "bytes": sum(f.stat().st_size for f in target_dir.glob("*.safetensors"))},
        "draft": {"dir": str(draft_dir), "k": k, "target_layers": cfg.num_layers, "goal": args.acceptance,
                  "acceptance": chosen["acceptance"], "within_tolerance": within,
                  "tokens_per_target_call": chosen["tokens_per_target_call"], "search": search,
                  "select_s": select_s, "target_step_s": t_target, "draft_step_s": t_draft,
                  "draft_over_target_cost": t_draft / t_target,
                  "bytes": sum(f.stat().st_size for f in draft_dir.glob("*.safetensors")),
                  # what a restarted worker reads for the draft beyond the target's own bytes
                  "own_bytes": sum(f.stat().st_size for f in draft_dir.glob("*.safetensors") if not f.is_symlink())},
    }
    meta_path.write_text(json.dumps(info, indent=2))
    print(f"target {target_dir}: decay {decay:.4f}; draft k={k}: acceptance {chosen['acceptance']:.3f}, "
          f"step cost {t_draft / t_target:.2f} of the target", flush=True)
    return info


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
    result.update(make_target_and_draft(args, device, dtype))
    target_dir = Path(result["target"]["dir"])
    result["disk_direct_read_GBps"] = direct_read_gbps(max(target_dir.glob("*.safetensors"),
                                                         key=lambda f: f.stat().st_size))
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
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft-layers", type=int, default=None,
                   help="self-draft depth k (default: 1/8 of the target's layers, as Qwen3-4B is to 32B)")
    p.add_argument("--tolerance", type=float, default=0.03, help="how close to --acceptance the decay search stops")
    p.add_argument("--reselect", action="store_true", help="draw and write target and draft again even if prepared")
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
