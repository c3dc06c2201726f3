"""Why is the target's disk read shorter on lumen's reload path? The paths side by side, cold cache.

On the GPU (docs/gpu-results.md, 2026-12-07 fourth and fifth sessions) a restarted worker's
`disk_to_host_s` was 8.0-11.4 s under lumen and 11.0-17.4 s under every other policy, in every pair,
while on the CPU box (no page-locking) the paths read alike. What differs between the paths:
`worker._load_plain` reads on the main thread; `worker._load_progressively` reads on a background
thread while the main thread loads the draft onto the device; under the checkpointing policies a thread
page-locks the checkpoint store meanwhile. On a GPU the read page-locks its buffers, and the first
CUDA call of a fresh process creates its context; a restarted worker is a fresh process. So each trial
here is a fresh process, timed from the point where a worker starts its load, after evicting the files
from the page cache (as `--cold-restart` does; the draft is read from its resident copy in /dev/shm, as in
the live runs), arms interleaved so drift in the disk hits them alike:

  plain         read on the main thread (stop-restart's reload)
  plain+store   the same with the checkpoint store page-locked on a thread beside it (lumen-no-spec,
                fixed-ckpt)
  thread+draft  read on a thread while the main thread loads the draft onto the device, store beside
                (lumen's reload with its draft)
  plain+ctx     read on the main thread while a thread creates the CUDA context (a candidate fix)
  draft         the resident draft alone, as lumen's worker loads it (read, page-locked, copied to the device)
  draft-pageable  the same without page-locking (a one-time copy from pageable memory)

The draft arms ask why a resident draft took 5.4 s (H100) and 9.3 s (H200) to load live, 8.7 s of it
`draft_disk_to_host_s` for 4 GB already in RAM, where the paper's premise is the host -> device copy
alone (0.18 s measured): whether the read and page-locking are slow by themselves, or only beside the
target's read and the store's page-locking (thread+draft). Each draft load reports its read (with the
page-locking) and its copy to the device apart. After its load the draft then runs draft rounds as the
recovering worker's drafter does (`draft_rounds`): beside the target's read until it ends (thread+draft),
and alone (draft), which separates a fresh process's first-use costs from the page-locking beside them.

    python benchmarks/reload_paths.py --model DIR --draft DIR --device cuda:0 --repeats 2 --out reload.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path

ARMS = ("plain", "plain+store", "thread+draft", "plain+ctx", "draft", "draft-pageable")
DRAFT_ONLY = ("draft", "draft-pageable")


def _trial(arm: str, model: str, draft: str | None, device: str, store_gb: float, conn) -> None:
    """One reload in this (fresh) process; sends {target_s, ...} or {error}."""
    try:
        conn.send(_reload(arm, model, draft, device, store_gb))
    except BaseException as e:  # reported by the parent, which exits 1
        conn.send({"error": f"{type(e).__name__}: {e}"})


MAX_ROUNDS = 400     # draft rounds beside the target's read (it ends them sooner)
ALONE_ROUNDS = 30    # draft rounds with nothing beside them
MIRRORED, CONTEXT = 8, 512  # the mirrored requests of the rounds and their context tokens


def draft_rounds(model, device: str, keep_going, max_rounds: int, at_least: int = 0) -> list[float]:
    """Seconds of each draft round as the recovering worker's `Drafter` runs them (the same
    `DraftProposer`, one token per request a round): the first prefills MIRRORED requests of CONTEXT
    tokens, each later one decodes, every guess accepted. Rounds go on while `keep_going()` (at least
    `at_least` of them). Live on one H100 (2026-12-07) the rounds beside the target's read took 1.4-5.9 s,
    against 0.5 / 0.04 s on the CPU box: first use in a fresh process, or the page-locking beside them?"""
    import torch

    from lumen.engine.draft import DraftProposer
    from lumen.engine.params import SamplingParams
    from lumen.engine.sequence import Sequence
    from lumen.runtime.assist import Drafter

    cfg = model.config
    proposer = DraftProposer(model, 1, 16, Drafter.pool_blocks(cfg.max_position, 16, None), chunk_tokens=1 << 14,
                             max_batch=MIRRORED)
    gen = torch.Generator().manual_seed(0)
    ctx = {f"r{i}": torch.randint(0, cfg.vocab_size, (CONTEXT,), generator=gen).tolist() for i in range(MIRRORED)}
    params = SamplingParams(max_tokens=cfg.max_position)
    times: list[float] = []
    while len(times) < max_rounds and (len(times) < at_least or keep_going()):
        t = time.monotonic()
        seqs = [Sequence(rid, toks, params, 0, 0) for rid, toks in ctx.items()]
        proposals = proposer.propose(seqs)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.monotonic() - t)
        for seq in seqs:
            ctx[seq.req_id].extend(proposals.get(seq) or [0])
    return times


def _reload(arm: str, model: str, draft: str | None, device: str, store_gb: float) -> dict:
    import torch

    from lumen.model.loader import build_model_from_host, read_config, read_weights_to_host
    from lumen.runtime.ckpt_store import CheckpointStore
    from lumen.runtime.page_cache import evict_models

    pin = device.startswith("cuda")
    dtype = torch.bfloat16 if pin else torch.float32
    evict_models([model])
    out: dict = {}
    threads: list[threading.Thread] = []
    errors: list[str] = []

    def timed(fn):
        t = time.monotonic()
        fn()
        return time.monotonic() - t

    def beside(name: str, fn) -> None:
        """`fn` timed on a thread of its own; its failure fails the trial."""
        def body():
            try:
                out[name] = timed(fn)
            except BaseException as e:
                errors.append(f"{name}: {type(e).__name__}: {e}")
        t = threading.Thread(target=body, name=name)
        t.start()
        threads.append(t)

    def read_target():
        read_weights_to_host(model, dtype=dtype, pin=pin)

    def store():  # sized as `lumen serve --ckpt-budget-gb` sizes it (GiB), pages of 16 tokens
        cfg = read_config(model)
        CheckpointStore(int(store_gb * (1 << 30)), cfg.kv_bytes_per_token(dtype) * 16).allocate()

    def load_draft(pin_draft: bool = pin):
        t = time.monotonic()
        host = read_weights_to_host(draft, dtype=dtype, pin=pin_draft)
        out["draft_read_s"] = time.monotonic() - t
        t = time.monotonic()
        model = build_model_from_host(read_config(draft), host, device=device, dtype=dtype)
        if pin:
            torch.cuda.synchronize()
        out["draft_copy_s"] = time.monotonic() - t
        return model

    def target_reading() -> bool:
        return any(t.name == "target_s" and t.is_alive() for t in threads)

    t0 = time.monotonic()
    try:
        if arm in ("plain+store", "thread+draft") and store_gb > 0:
            beside("store_s", store)
        if arm == "plain+ctx" and pin:
            beside("ctx_s", torch.cuda.init)
        if arm == "thread+draft":
            beside("target_s", read_target)
            if draft is not None:
                t = time.monotonic()
                model = load_draft()
                out["draft_s"] = time.monotonic() - t
                # then draft as the recovering worker does, for as long as the target is still being read
                out["draft_rounds_s"] = draft_rounds(model, device, target_reading, MAX_ROUNDS)
        elif arm in DRAFT_ONLY:
            if pin:
                torch.cuda.init()  # a worker's context exists before its draft load: not counted here
            t = time.monotonic()
            model = load_draft(pin_draft=pin and arm == "draft")
            out["draft_s"] = time.monotonic() - t
            if arm == "draft":  # the same rounds with nothing beside them
                out["draft_rounds_s"] = draft_rounds(model, device, lambda: True, ALONE_ROUNDS, at_least=ALONE_ROUNDS)
        else:
            out["target_s"] = timed(read_target)
    finally:
        for t in threads:  # on the error path too: no thread still reading at interpreter exit
            t.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    out["total_s"] = time.monotonic() - t0
    return out


def run_trial(arm: str, model: Path, draft: Path | None, device: str, store_gb: float, timeout_s: float) -> dict:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_trial, args=(arm, str(model), str(draft) if draft else None, device, store_gb, send))
    p.start()
    send.close()  # the child holds the only writer: a dead child ends the wait at once (EOFError)
    try:
        got = recv.recv() if recv.poll(timeout_s) else {"error": f"no result within {timeout_s:.0f} s"}
    except EOFError:
        p.join(timeout=30)
        got = {"error": f"the trial's process died (exit code {p.exitcode})"}
    p.join(timeout=30)
    if p.is_alive():
        p.kill()
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--draft", type=Path, help="the draft lumen loads beside the target (arm thread+draft)")
    ap.add_argument("--device", default=None, help="cuda:N (page-locked reads, as a GPU worker) or cpu; "
                    "default: cuda:0 where there is one")
    ap.add_argument("--store-gb", type=float, default=6.0, help="the checkpoint store page-locked beside the "
                    "read (the bench's --ckpt-budget-gb)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds one trial may take")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    for flag, d in (("--model", a.model), ("--draft", a.draft)):
        if d is not None and not (d / "config.json").is_file():
            ap.error(f"{flag} {d}: no config.json there")
    if a.device is None:
        import torch
        a.device = "cuda:0" if torch.cuda.is_available() else "cpu"
    if a.draft is not None:
        # the live runs' draft was resident (draft_resident 1): its copy in /dev/shm, made as a worker makes it
        from lumen.runtime import draft_cache

        resident = draft_cache.stage(a.draft)
        print(f"draft: {resident or a.draft}" + ("" if resident else " (no resident copy: read from disk)"), flush=True)
        a.draft = resident or a.draft
    arms = [m for m in ARMS if (m not in ("thread+draft", *DRAFT_ONLY) or a.draft is not None)
            and (m not in ("plain+ctx", "draft-pageable") or a.device.startswith("cuda"))]
    rows: list[dict] = []
    for rep in range(a.repeats):
        for i in range(len(arms)):
            arm = arms[(i + rep) % len(arms)]  # rotate the order each repeat
            r = {"repeat": rep, "arm": arm, **run_trial(arm, a.model, a.draft, a.device, a.store_gb, a.timeout)}
            rows.append(r)
            _write(a, rows)  # after every trial: a block's time limit keeps what ran
            if "error" in r:
                print(f"repeat {rep} {arm}: {r['error']}", file=sys.stderr)
                continue
            shown = ("target_s", "draft_s", "draft_read_s", "draft_copy_s", "store_s", "ctx_s")
            print(f"repeat {rep} {arm:14s}" + "".join(f"  {k[:-2]} {r[k]:6.2f} s" for k in shown if k in r), flush=True)
    summary = _write(a, rows)
    base = summary.get("plain", {}).get("mean_s")
    for m, s in summary.items():
        if "mean_s" not in s:
            continue
        ratio = f", x{s['mean_s'] / base:.3f} of plain" if base else ""
        print(f"{m:14s} target read mean {s['mean_s']:7.2f} s ({s['min_s']:.2f}-{s['max_s']:.2f}){ratio}")
    for m, s in summary.items():
        if "draft" in s:
            d = s["draft"]
            print(f"{m:14s} draft load mean {d['mean_s']:7.2f} s (read {d['read_mean_s']:.2f} s, "
                  f"to the device {d['copy_mean_s']:.2f} s; n={d['n']})")
    for m, s in summary.items():
        if "rounds" in s:
            d = s["rounds"]
            later = "-" if d["later_median_s"] is None else f"{d['later_median_s']:.3f} s (max {d['later_max_s']:.3f})"
            print(f"{m:14s} draft rounds: first {d['first_s']:.3f} s, later median {later}, "
                  f"{d['count_mean']:.0f} rounds a trial")
    return 1 if any("error" in r for r in rows) else 0


def _write(a, rows: list[dict]) -> dict:
    """Each arm's mean target read so far; the whole document to --out, if given."""
    summary = {}
    for m in ARMS:
        ts = [r["target_s"] for r in rows if r["arm"] == m and "target_s" in r]
        if ts:
            summary[m] = {"mean_s": statistics.fmean(ts), "min_s": min(ts), "max_s": max(ts), "n": len(ts)}
        ds = [r for r in rows if r["arm"] == m and "draft_s" in r]
        if ds:
            summary.setdefault(m, {})["draft"] = {
                "mean_s": statistics.fmean(r["draft_s"] for r in ds), "n": len(ds),
                "read_mean_s": statistics.fmean(r["draft_read_s"] for r in ds),
                "copy_mean_s": statistics.fmean(r["draft_copy_s"] for r in ds)}
        rounds = [r["draft_rounds_s"] for r in rows if r["arm"] == m and r.get("draft_rounds_s")]
        if rounds:
            summary.setdefault(m, {})["rounds"] = {
                "first_s": statistics.fmean(x[0] for x in rounds),
                "later_median_s": statistics.median(t for x in rounds for t in x[1:]) if any(len(x) > 1 for x in rounds) else None,
                "later_max_s": max((t for x in rounds for t in x[1:]), default=None),
                "count_mean": statistics.fmean(len(x) for x in rounds)}
    if a.out:
        doc = {"model": str(a.model), "draft": str(a.draft) if a.draft else None, "device": a.device,
               "store_gb": a.store_gb, "rows": rows, "summary": summary,
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        a.out.write_text(json.dumps(doc, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main())
