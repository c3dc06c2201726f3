"""Does a failure cost capacity? N workers saturated on one device, one SIGKILLed: each survivor's
tokens/s before and after the kill, with the device shared freely and time-sliced (issue 23).

    python benchmarks/device_share.py --model default --workers 4                    # the CPU box
    python benchmarks/device_share.py --model preset:qwen3-8b --workers 4 --devices cuda:0 \\
        --max-batch 32 --max-tokens 256                                              # one GPU

For each mode (`--modes shared,slots`) a `lumen serve --policy stop-restart` cluster starts, a closed
loop of `workers x max-batch x 2` streams keeps every worker's batch full (`--max-batch` caps it, so a
survivor's batch is the same before and after the kill, and only its share of the device can change
its rate), and /lumen/cluster is sampled every `--sample-s`. After `--warmup-s`, `--before-s` seconds
are measured, worker `--kill` is SIGKILLed, `--settle-s` pass (its interrupted requests re-enter the
survivors' queues), and `--after-s` seconds are measured while it is still down (its reload is held
back with LUMEN_FAULT_SLOW_RELOAD_S). Rates are generated tokens per second from the workers' own
counters (`decode_tokens`).

Targets (issue 23): under slots each survivor's rate changes by less than 5%; the cluster's rate
with every worker alive is at least 0.9x that of shared. Writes results.json and device_share.png to
--out and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shlex
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from lumen.bench.cluster import ClusterProcess, free_port, serve_command, wait_ready

PROMPT_TOKENS = 32  # token ids, not text: a preset model has no tokenizer


async def _stream_forever(http: httpx.AsyncClient, model: str, vocab: int, max_tokens: int, stop: asyncio.Event,
                          counts: list, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        # distinct prompts: no two requests share a prefix that a cache could serve
        prompt = [rng.randrange(1, vocab) for _ in range(PROMPT_TOKENS)]
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        try:
            r = await http.post("/v1/completions", json=body)
            if r.status_code == 200:
                counts[0] += 1
            else:
                counts[1] += 1
                if len(counts) < 3:
                    counts.append(f"{r.status_code}: {r.text[:300]}")  # the first error, for the report
                await asyncio.sleep(0.2)
        except httpx.HTTPError:
            counts[1] += 1
            await asyncio.sleep(0.2)


def _rate(samples: list[dict], wid: int, t0: float, t1: float) -> float | None:
    """Generated tokens per second of worker `wid` between the samples nearest t0 and t1 (same incarnation)."""
    inside = [s for s in samples if t0 <= s["t"] <= t1 and wid in s["workers"]]
    if len(inside) < 2:
        return None
    a, b = inside[0], inside[-1]
    if a["workers"][wid]["epoch"] != b["workers"][wid]["epoch"]:
        return None
    return (b["workers"][wid]["decode_tokens"] - a["workers"][wid]["decode_tokens"]) / (b["t"] - a["t"])


def _snapshot(info: dict, t: float) -> dict:
    out = {}
    for w in info.get("workers", []):
        st = w.get("stats") or {}
        if w.get("state") == "serving" and "decode_tokens" in st:
            out[w["id"]] = {"epoch": w["epoch"], "decode_tokens": st["decode_tokens"], "steps": st.get("steps", 0),
                            "ema_decode_step_s": st.get("ema_decode_step_s"), "num_running": st.get("num_running"),
                            **{k: v for k, v in st.items() if k.startswith("slot")}}
    return {"t": t, "workers": out}


async def run_mode(args, mode: str, out: Path, console: Console) -> dict:
    port = free_port()
    extra = ["--device-share", mode, "--slot-ms", str(args.slot_ms), "--max-batch", str(args.max_batch),
             *shlex.split(args.serve_args)]
    cmd = serve_command(args.model, args.workers, "stop-restart", port, devices=args.devices, extra=extra)
    env = dict(os.environ, LUMEN_FAULT_SLOW_RELOAD_S=str(args.settle_s + args.after_s + 30))
    url = f"http://127.0.0.1:{port}"
    samples: list[dict] = []
    counts = [0, 0]
    with ClusterProcess(cmd, out / f"cluster-{mode}.log", env=env) as cluster:
        info = await wait_ready(url, args.startup_timeout, workers=args.workers, proc=cluster.proc,
                                log_path=cluster.log_path)
        cluster.note_workers(info)
        slot_ms = info.get("slot_ms")
        console.print(f"[bold]{mode}[/]: {args.workers} workers serving" + (f", {slot_ms:g} ms slots" if slot_ms else ""))
        stop = asyncio.Event()
        limits = httpx.Limits(max_connections=args.streams + 8, max_keepalive_connections=args.streams + 8)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            served = (await http.get("/v1/models")).json()["data"][0]
            model, vocab = served["id"], min(int(served.get("vocab_size") or 1000), 1000)
            loaders = [asyncio.create_task(_stream_forever(http, model, vocab, args.max_tokens, stop, counts, i))
                       for i in range(args.streams)]
            start = time.monotonic()
            t_kill = start + args.warmup_s + args.before_s
            t_end = t_kill + args.settle_s + args.after_s
            killed = None
            while (now := time.monotonic()) < t_end:
                try:
                    r = await http.get("/lumen/cluster")
                    samples.append(_snapshot(r.json(), time.monotonic() - start))
                except (httpx.HTTPError, ValueError):
                    pass
                if killed is None and now >= t_kill:
                    pid = next(w["pid"] for w in (await http.get("/lumen/cluster")).json()["workers"]
                               if w["id"] == args.kill)
                    os.kill(pid, signal.SIGKILL)
                    killed = time.monotonic() - start
                    console.print(f"  t={killed:.1f}s: SIGKILL worker {args.kill} (pid {pid})")
                await asyncio.sleep(args.sample_s)
            stop.set()
            for t in loaders:
                t.cancel()
            await asyncio.gather(*loaders, return_exceptions=True)
    before = (killed - args.before_s, killed)
    after = (killed + args.settle_s, killed + args.settle_s + args.after_s)
    workers = {}
    for wid in range(args.workers):
        b, a = _rate(samples, wid, *before), _rate(samples, wid, *after)
        workers[wid] = {"before_tok_s": b, "after_tok_s": a,
                        "after_over_before": (a / b) if a is not None and b else None}
    survivors = [w for wid, w in workers.items() if wid != args.kill and w["after_over_before"] is not None]
    last = samples[-1]["workers"] if samples else {}
    return {"mode": mode, "slot_ms": slot_ms, "kill_at_s": killed, "before_window_s": before, "after_window_s": after,
            "workers": workers, "cluster_before_tok_s": sum(w["before_tok_s"] or 0 for w in workers.values()),
            "survivor_change_mean": statistics.fmean(w["after_over_before"] for w in survivors) - 1 if survivors else None,
            "survivor_change_max_abs": max(abs(w["after_over_before"] - 1) for w in survivors) if survivors else None,
            "requests_done": counts[0], "request_errors": counts[1], "first_error": counts[2] if len(counts) > 2 else None, "last_stats": last, "samples": samples}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _plot(results: list[dict], kill: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.8), squeeze=False, sharey=True)
    for ax, res in zip(axes[0], results, strict=True):
        ids = sorted(res["workers"])
        ws = [res["workers"][i] for i in ids]
        x = range(len(ids))
        ax.bar([i - 0.2 for i in x], [w["before_tok_s"] or 0 for w in ws], 0.4, label="before the kill")
        ax.bar([i + 0.2 for i in x], [w["after_tok_s"] or 0 for w in ws], 0.4, label="after (killed one down)")
        ax.set_xticks(list(x), [f"w{i}" + (" (killed)" if i == kill else "") for i in ids])
        title = res["mode"] + (f" ({res['slot_ms']:g} ms slots)" if res.get("slot_ms") else "")
        ch = res["survivor_change_mean"]
        ax.set_title(title + (f"\nsurvivors {ch:+.1%}" if ch is not None else ""))
        ax.set_ylabel("generated tokens/s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--devices", default=None)
    p.add_argument("--modes", default="shared,slots")
    p.add_argument("--slot-ms", default="auto")
    p.add_argument("--max-batch", type=int, default=4, help="running requests per worker (the saturated batch)")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    p.add_argument("--streams", type=int, default=None, help="closed-loop streams (default: workers x max-batch x 2)")
    p.add_argument("--kill", type=int, default=1, help="worker to SIGKILL")
    p.add_argument("--warmup-s", type=float, default=15.0)
    p.add_argument("--before-s", type=float, default=30.0)
    p.add_argument("--settle-s", type=float, default=5.0)
    p.add_argument("--after-s", type=float, default=30.0)
    p.add_argument("--sample-s", type=float, default=0.5)
    p.add_argument("--serve-args", default="")
    p.add_argument("--startup-timeout", type=float, default=900.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    args.streams = args.streams or args.workers * args.max_batch * 2
    out = Path(args.out or tempfile.mkdtemp(prefix="device-share-"))
    out.mkdir(parents=True, exist_ok=True)
    console = Console(width=None if os.isatty(1) else 140)
    results = [asyncio.run(run_mode(args, m.strip(), out, console)) for m in args.modes.split(",") if m.strip()]
    by_mode = {r["mode"]: r for r in results}
    table = Table(title=f"{args.workers} workers on one device, worker {args.kill} SIGKILLed: generated tokens/s")
    for col in ("mode", "worker", "before", "after", "after/before"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for r in results:
        for wid, w in r["workers"].items():
            ratio = "-" if w["after_over_before"] is None else f"{w['after_over_before']:.3f}"
            table.add_row(r["mode"], f"w{wid}" + (" (killed)" if wid == args.kill else ""), _fmt(w["before_tok_s"]),
                          _fmt(w["after_tok_s"]), ratio)
        table.add_row(r["mode"], "all, before", f"{r['cluster_before_tok_s']:.1f}", "", "")
    console.print(table)
    summary = {}
    for m, r in by_mode.items():
        summary[m] = {"survivor_change_mean": r["survivor_change_mean"],
                      "survivor_change_max_abs": r["survivor_change_max_abs"],
                      "cluster_before_tok_s": r["cluster_before_tok_s"]}
        console.print(f"{m}: survivors' rate after the kill {r['survivor_change_mean']:+.1%} on average "
                      f"(largest change {r['survivor_change_max_abs']:.1%})"
                      if r["survivor_change_mean"] is not None else f"{m}: no survivor rate measured")
    if "shared" in by_mode and "slots" in by_mode and by_mode["shared"]["cluster_before_tok_s"]:
        cost = by_mode["slots"]["cluster_before_tok_s"] / by_mode["shared"]["cluster_before_tok_s"]
        summary["slots_over_shared_throughput"] = cost
        console.print(f"cluster throughput, all alive: slots / shared = {cost:.3f} (target >= 0.9)")
    meta = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "host": platform.node(),
            "cpu_count": os.cpu_count(), "argv": vars(args)}
    try:
        import torch

        if torch.cuda.is_available():
            meta["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1))
    _plot(results, args.kill, out / "device_share.png")
    console.print(f"results: {out / 'results.json'}, plot: {out / 'device_share.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
