"""Failure-free cost of LUMEN's checkpoint streaming: lumen vs stop-restart on the same seeded workload.

    python benchmarks/checkpoint_overhead.py --model default --workers 2 --qps 2 --requests 60
    python benchmarks/checkpoint_overhead.py --model preset:qwen3-8b --devices cuda:0,cuda:1 --qps 8

Both policies serve the same requests (same seed, same arrival times) with no failure; runs alternate
(stop-restart, lumen, stop-restart, lumen, ...) so that drift of the machine hits both alike. Reports
mean TTFT and TPOT of each policy, the lumen/stop-restart ratio, and the checkpoint traffic lumen
generated (pages and bytes sent to holders, per second of the run).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from lumen.bench.client import ClientConfig, replay
from lumen.bench.cluster import ClusterProcess, free_port, serve_command, wait_ready
from lumen.metrics import tpot, ttft
from lumen.workload import make_workload


async def one_run(args, policy: str, seed: int, log_dir: Path) -> dict:
    port = free_port()
    cmd = serve_command(args.model, args.workers, policy, port, devices=args.devices,
                        extra=args.serve_args.split() if args.serve_args else ())
    url = f"http://127.0.0.1:{port}"
    with ClusterProcess(cmd, log_dir / f"{policy}-{seed}.log") as proc:
        await wait_ready(url, 900, workers=args.workers, proc=proc.proc, log_path=proc.log_path)
        specs = make_workload(args.requests, args.qps, lengths=args.lengths, seed=seed,
                              max_prompt=args.max_prompt, max_output=args.max_output)
        warm = make_workload(2 * args.workers, 100.0, lengths=args.lengths, seed=seed + 1000,
                             max_prompt=args.max_prompt, max_output=8)
        await replay(warm, ClientConfig(url=url))
        t0 = time.monotonic()
        records = await replay(specs, ClientConfig(url=url))
        elapsed = time.monotonic() - t0
        async with httpx.AsyncClient(base_url=url) as http:
            info = (await http.get("/lumen/cluster")).json()
    ok = [r for r in records if r.error is None and r.first_token is not None]
    pages = sum(int(w["stats"].get("pages_sent", 0)) for w in info["workers"])
    page_bytes = max((int(w["stats"].get("ckpt_page_nbytes", 0)) for w in info["workers"]), default=0)
    tpots = [t for t in (tpot(r) for r in ok) if t is not None]
    return {"policy": policy, "seed": seed, "completed": len(ok), "errors": len(records) - len(ok),
            "mean_ttft_s": statistics.fmean(ttft(r) for r in ok), "mean_tpot_s": statistics.fmean(tpots),
            "ckpt_pages_sent": pages, "ckpt_bytes_sent": pages * page_bytes, "elapsed_s": elapsed}


async def main_async(args) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix="ckpt-overhead-"))
    runs = []
    for rep in range(args.repeats):
        for policy in ("stop-restart", "lumen"):
            r = await one_run(args, policy, args.seed + rep, log_dir)
            print(json.dumps(r), flush=True)
            runs.append(r)
    summary = {}
    for policy in ("stop-restart", "lumen"):
        rs = [r for r in runs if r["policy"] == policy]
        summary[policy] = {k: statistics.fmean(r[k] for r in rs) for k in ("mean_ttft_s", "mean_tpot_s")}
    lumen_runs = [r for r in runs if r["policy"] == "lumen"]
    return {
        "env": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.node(),
                "python": platform.python_version()},
        "args": vars(args), "runs": runs, "summary": summary,
        "tpot_ratio_lumen_over_stop_restart": summary["lumen"]["mean_tpot_s"] / summary["stop-restart"]["mean_tpot_s"],
        "ttft_ratio_lumen_over_stop_restart": summary["lumen"]["mean_ttft_s"] / summary["stop-restart"]["mean_ttft_s"],
        "ckpt_MBps": statistics.fmean(r["ckpt_bytes_sent"] / r["elapsed_s"] for r in lumen_runs) / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--devices", default=None)
    ap.add_argument("--qps", type=float, default=2.0)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--lengths", default="sharegpt")
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--serve-args", default="", help="extra `lumen serve` arguments")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
