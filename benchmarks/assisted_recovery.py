"""Assisted recovery on a live cluster: acceptance rate while a restarted worker drafts for its partner,
and the duration of each phase of its recovery.

    python benchmarks/assisted_recovery.py --model default --slow-reload 20 --out assisted.json

Two workers, policy lumen. Requests with natural prompts run on the cluster; worker 1 is SIGKILLed,
restarts, loads the draft, pairs with worker 0 (the only serving worker) and drafts for its requests
while its target weights load. `--slow-reload S` makes the reload S seconds longer (the
LUMEN_FAULT_SLOW_RELOAD_S hook), as a model larger than the 135M default would on this CPU, so the
assisting phase lasts long enough to measure. Reports the partner's speculative counters (drafts,
draft tokens, accepted tokens: acceptance rate and committed tokens per verify step) and the phases
(draft load, assisting, disk -> host, host -> device) reported by the recovering worker.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how vaccines train the immune system, step by step.",
    "Describe a walk through a busy market in the morning.",
    "What are the main causes of the French Revolution?",
    "Give me a detailed recipe for a vegetable lasagna.",
    "Explain the difference between weather and climate to a child.",
]


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--slow-reload", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--spec-k", type=int, default=4)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "lumen", "serve", "--model", args.model, "--workers", "2", "--policy", "lumen",
           "--port", str(port), "--spec-k", str(args.spec_k)]
    if args.draft_model:
        cmd += ["--draft-model", args.draft_model]
    env = dict(os.environ, LUMEN_FAULT_SLOW_RELOAD_S=str(args.slow_reload))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=600)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                ws = http.get("/lumen/cluster").json()["workers"]
                if all(w["state"] == "serving" for w in ws):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("cluster did not start")
            time.sleep(0.5)
        model = http.get("/v1/models").json()["data"][0]["id"]
        done: list[int] = []

        def run(prompt: str) -> None:
            r = http.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                "temperature": 0})
            done.append(r.json()["usage"]["completion_tokens"])

        threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        time.sleep(2.0)
        victim = http.get("/lumen/cluster").json()["workers"][1]
        os.kill(victim["pid"], signal.SIGKILL)
        t_kill = time.monotonic()
        states_seen = []
        while True:
            w = http.get("/lumen/cluster").json()["workers"][1]
            if not states_seen or states_seen[-1][1] != w["state"]:
                states_seen.append((round(time.monotonic() - t_kill, 2), w["state"]))
            if w["state"] == "serving" and w["epoch"] > victim["epoch"]:
                break
            time.sleep(0.05)
        for t in threads:
            t.join()
        info = http.get("/lumen/cluster").json()
        partner = info["workers"][0]["stats"]
        recovering = info["workers"][1]
        drafts, dtoks, acc = (int(partner.get(k, 0)) for k in
                              ("spec_drafts", "spec_draft_tokens", "spec_accepted_tokens"))
        result = {
            "env": {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                    "machine": platform.node(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
            "args": vars(args),
            "partner": {"spec_drafts": drafts, "spec_draft_tokens": dtoks, "spec_accepted_tokens": acc,
                        "acceptance_rate": acc / dtoks if dtoks else None,
                        "tokens_per_verify_step": (drafts + acc) / drafts if drafts else None,
                        "proposals_received": partner.get("assist_proposals_received"),
                        "proposals_stale": partner.get("assist_proposals_stale")},
            "recovering_phases_s": recovering["phases_s"],
            "states_after_kill_s": states_seen,
            "completion_tokens": done,
        }
        text = json.dumps(result, indent=2)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
