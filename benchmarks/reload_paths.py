"""Why is the target's disk read shorter on lumen's reload path? The two paths side by side, cold cache.

On the GPU (docs/gpu-results.md, 2026-12-07 fourth and fifth sessions) a restarted worker's
`disk_to_host_s` was 8.0-11.4 s under lumen and 11.0-17.4 s under every other policy, in every pair.
The paths differ in where the read runs: `worker._load_plain` reads on the main thread;
`worker._load_progressively` reads on a background thread while the main thread polls every 5 ms and
loads the draft. This times the read in each arrangement, after evicting the files from the page cache
(as `--cold-restart` does), modes interleaved so drift in the disk hits them alike:

  main          read on the calling thread (the plain path)
  thread        read on a thread, the main thread waking every 5 ms (the progressive path, no draft)
  thread+draft  the same while the main thread reads the draft beside it (the progressive path)

    python benchmarks/reload_paths.py --model DIR --draft DIR --device cuda:0 --repeats 3 --out reload.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from lumen.model.loader import read_weights_to_host
from lumen.runtime.page_cache import evict_models

MODES = ("main", "thread", "thread+draft")


def _read(model: Path, pin: bool, dtype: torch.dtype) -> float:
    t0 = time.monotonic()
    state = read_weights_to_host(model, dtype=dtype, pin=pin)
    dt = time.monotonic() - t0
    del state
    return dt


def time_mode(mode: str, model: Path, draft: Path | None, pin: bool, dtype: torch.dtype) -> dict:
    """Seconds the target's read took in `mode` (and the draft's, where read beside it)."""
    evict_models([model, draft])
    if mode == "main":
        return {"target_s": _read(model, pin, dtype)}
    out: dict = {}

    def target():
        out["target_s"] = _read(model, pin, dtype)

    t = threading.Thread(target=target, name="target-loader")
    t.start()
    if mode == "thread+draft" and draft is not None:
        out["draft_s"] = _read(draft, pin, dtype)
    while t.is_alive():
        t.join(timeout=0.005)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--draft", type=Path, help="the draft read beside the target (mode thread+draft)")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu",
                    help="a cuda device reads into page-locked buffers, as a GPU worker does")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    pin = a.device.startswith("cuda")
    if pin:
        torch.cuda.init()  # the context exists before any timed read, as in a worker
    dtype = getattr(torch, a.dtype)
    modes = [m for m in MODES if m != "thread+draft" or a.draft is not None]
    time_mode("main", a.model, a.draft, pin, dtype)  # untimed: the first read pays one-time costs (imports, allocator)
    rows = []
    for rep in range(a.repeats):
        for i in range(len(modes)):
            mode = modes[(i + rep) % len(modes)]  # rotate the order each repeat
            r = {"repeat": rep, "mode": mode, **time_mode(mode, a.model, a.draft, pin, dtype)}
            rows.append(r)
            print(f"repeat {rep} {mode:13s} target {r['target_s']:7.2f} s"
                  + (f"  draft {r['draft_s']:6.2f} s" if "draft_s" in r else ""), flush=True)
    summary = {}
    for m in modes:
        ts = [r["target_s"] for r in rows if r["mode"] == m]
        summary[m] = {"mean_s": statistics.fmean(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}
    base = summary["main"]["mean_s"]
    for m, s in summary.items():
        print(f"{m:13s} mean {s['mean_s']:7.2f} s ({s['min_s']:.2f}-{s['max_s']:.2f}), x{s['mean_s'] / base:.3f} of main")
    doc = {"model": str(a.model), "draft": str(a.draft) if a.draft else None, "device": a.device, "pin": pin,
           "dtype": a.dtype, "rows": rows, "summary": summary,
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
