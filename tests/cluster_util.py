"""Start and stop real `lumen serve` clusters for tests (real processes on 127.0.0.1 ports)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_tiny_model_dir(out: Path) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer: real HTTP text paths, fast steps."""
    import torch

    from lumen.model import ModelConfig
    from lumen.model.hub import default_paths, prepare_default
    from lumen.model.loader import random_model, save_model

    prepare_default()
    tok_dir = default_paths()[0]
    cfg = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                      max_position=4096, tie_embeddings=True, qk_norm=False, bos_token_id=1,
                      eos_token_ids=(2,), name="tiny-smol")
    save_model(random_model(cfg, "cpu", torch.float32, seed=7, std=0.2), cfg, out, tokenizer_dir=tok_dir)
    return out


def wait_until(predicate, timeout: float, what: str):
    """Poll ``predicate`` every 50 ms; return its first truthy value, or raise TimeoutError(what)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


def worker_pids_alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                alive.append(pid)
        except FileNotFoundError:
            pass
    return alive


def lumen_worker_processes() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"lumen.runtime.worker" in cmd:
                pids.extend(worker_pids_alive([int(entry)]))
    return pids


class Cluster:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc = proc
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=60)
        self.seen_pids: set[int] = set()

    def state(self) -> dict:
        data = self.client.get("/lumen/cluster").json()
        self.seen_pids.update(w["pid"] for w in data["workers"] if w["pid"])
        return data

    def worker(self, wid: int) -> dict:
        return next(w for w in self.state()["workers"] if w["id"] == wid)

    def wait_serving(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ws = self.state()["workers"]
                if sum(w["state"] == "serving" for w in ws) >= n:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"fewer than {n} workers serving after {timeout}s: {self.state()}")

    def executor_of(self, timeout: float = 30) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reqs = [r for r in self.state()["requests"] if r["executor"] is not None]
            if reqs:
                return reqs[0]["executor"]
            time.sleep(0.01)
        raise TimeoutError("no request is executing")

    def kill(self, wid: int, sig=signal.SIGKILL) -> int:
        pid = self.worker(wid)["pid"]
        os.kill(pid, sig)
        return pid

    def complete(self, prompt, **kw) -> dict:
        body = {"model": kw.pop("model", "tiny"), "prompt": prompt, "temperature": 0, "return_token_ids": True}
        body.update(kw)
        r = self.client.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.json()

    def stream_tokens(self, prompt, on_token=None, **kw) -> tuple[list[int], str | None, list[dict]]:
        """Stream a completion; returns (token ids, finish reason, error events)."""
        body = {"model": kw.pop("model", "tiny"), "prompt": prompt, "temperature": 0, "stream": True,
                "return_token_ids": True}
        body.update(kw)
        ids: list[int] = []
        finish = None
        errors = []
        with self.client.stream("POST", "/v1/completions", json=body, timeout=120) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    errors.append(chunk["error"])
                    continue
                choice = chunk["choices"][0]
                ids.extend(choice.get("token_ids") or [])
                if on_token is not None:
                    on_token(len(ids))
                finish = choice.get("finish_reason") or finish
        return ids, finish, errors


@contextmanager
def run_cluster(model: str, workers: int = 2, policy: str = "stop-restart", extra: list[str] | None = None,
                name: str = "tiny", env: dict | None = None, ready_timeout: float = 180, log_path=None):
    port = free_port()
    extra = list(extra or [])  # clusters default to 10 missed heartbeats (1 s) before a verdict
    cmd = [sys.executable, "-m", "lumen", "serve", "--model", model, "--workers", str(workers), "--policy",
           policy, "--port", str(port), "--served-model-name", name, *extra]
    full_env = dict(os.environ, **(env or {}))
    # log_path: the cluster's stderr (gateway, controller, launcher, workers) to a file, for tests
    # that read it after the cluster has stopped
    log = open(log_path, "w") if log_path else None  # noqa: SIM115 -- closed in the finally below
    proc = subprocess.Popen(cmd, env=full_env, start_new_session=True, stderr=log)
    url = f"http://127.0.0.1:{port}"
    cluster = Cluster(proc, url)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"lumen serve exited with {proc.returncode}")
            try:
                if cluster.client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("cluster did not become healthy")
            time.sleep(0.2)
        cluster.wait_serving(workers, timeout=ready_timeout)
        yield cluster
    finally:
        try:
            cluster.state()
        except Exception:
            pass
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        cluster.client.close()
        if log is not None:
            log.close()
        # no orphan processes, ever: every worker pid this cluster had is gone
        deadline = time.monotonic() + 5
        while worker_pids_alive(cluster.seen_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = worker_pids_alive(cluster.seen_pids)
        assert not left, f"orphan worker processes: {left}"
