"""Start, wait for and stop a local ``lumen serve`` cluster as a subprocess.

The cluster runs in its own session/process group so that stopping it (SIGTERM, then SIGKILL
after a grace period, both to the whole group) takes every process it started with it; on Linux
it also gets SIGTERM from the kernel if the bench itself dies (PR_SET_PDEATHSIG). lumen's
workers put themselves in their own groups but die with their parent (PDEATHSIG); as a last
guard we also SIGKILL any worker pid the cluster reported that is still alive afterwards, after
checking its command line is a lumen process (pids are not reused within seconds, but we check).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

__all__ = ["ClusterProcess", "ClusterStartError", "free_port", "wait_ready", "serve_command"]

READY_STATES = ("serving",)


class ClusterStartError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_command(
    model: str,
    workers: int,
    policy: str,
    port: int,
    host: str = "127.0.0.1",
    devices: str | None = None,
    extra: Sequence[str] = (),
    python: str | None = None,
) -> list[str]:
    cmd = [python or sys.executable, "-m", "lumen", "serve", "--model", model, "--workers", str(workers)]
    cmd += ["--policy", policy, "--port", str(port), "--host", host]
    if devices:
        cmd += ["--devices", devices]
    return cmd + list(extra)


async def wait_ready(
    url: str,
    timeout_s: float,
    workers: int | None = None,
    proc: subprocess.Popen | None = None,
    log_path: Path | None = None,
) -> dict | None:
    """Poll until ``GET /health`` is 200 and, where ``/lumen/cluster`` exists, every worker is
    serving (and there are ``workers`` of them). Returns the cluster JSON (or None without that
    endpoint). Raises ClusterStartError on timeout or when ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    async with httpx.AsyncClient(base_url=url, timeout=5.0) as http:
        while True:
            if proc is not None and proc.poll() is not None:
                raise ClusterStartError(f"cluster exited with code {proc.returncode} before it was ready{_tail(log_path)}")
            try:
                r = await http.get("/health")
                if r.status_code == 200:
                    c = await http.get("/lumen/cluster")
                    if c.status_code == 404:
                        return None
                    if c.status_code == 200:
                        info = c.json()
                        ws = info.get("workers", [])
                        states = [str(w.get("state", "")).lower() for w in ws]
                        if states and all(s in READY_STATES for s in states) and (workers is None or len(ws) == workers):
                            return info
                        last = f"workers: {states}"
                    else:
                        last = f"/lumen/cluster -> {c.status_code}"
                else:
                    last = f"/health -> {r.status_code}"
            except (httpx.HTTPError, ValueError) as e:
                last = f"{type(e).__name__}"
            if time.monotonic() > deadline:
                raise ClusterStartError(f"cluster at {url} not ready after {timeout_s:g}s ({last}){_tail(log_path)}")
            await asyncio.sleep(0.25)


def _tail(log_path: Path | None, n: int = 20) -> str:
    if log_path is None or not log_path.is_file():
        return ""
    lines = log_path.read_text(errors="replace").splitlines()[-n:]
    return f"\n--- last lines of {log_path} ---\n" + "\n".join(lines)


def _term_with_parent() -> None:
    # Runs in the child before exec: if the bench dies without cleaning up (SIGKILL, crash), the
    # kernel sends the cluster SIGTERM, and lumen's workers die with the cluster in turn.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    # a SIGTERM blocked in the bench's mask would be inherited and make that signal a no-op
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


def _is_lumen_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"lumen" in f.read()
    except OSError:
        return False


class ClusterProcess:
    """One ``lumen serve`` (or any command) in its own process group, logging to ``log_path``."""

    def __init__(self, cmd: Sequence[str], log_path: Path, env: dict | None = None, grace_s: float = 10.0) -> None:
        self.cmd = list(cmd)
        self.log_path = Path(log_path)
        self.env = env
        self.grace_s = grace_s
        self.proc: subprocess.Popen | None = None
        self.worker_pids: set[int] = set()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own group: stop() signals all of it, Ctrl-C here doesn't
                preexec_fn=_term_with_parent if sys.platform.startswith("linux") else None,
                env=self.env,
            )
        finally:
            log.close()

    def note_workers(self, info: dict | None) -> None:
        for w in (info or {}).get("workers", []):
            if isinstance(w, dict) and isinstance(w.get("pid"), int) and w["pid"] > 1:
                self.worker_pids.add(w["pid"])

    def stop(self) -> int | None:
        """SIGTERM the group, wait ``grace_s``, then SIGKILL it; reap; kill leftover workers."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGTERM)
                os.killpg(p.pid, signal.SIGCONT)  # a SIGSTOPped member can only act on TERM once resumed
            try:
                p.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)  # whatever is left of the group, leader gone or not
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(5.0)
        for pid in sorted(self.worker_pids):
            if _is_lumen_process(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        return p.returncode

    def __enter__(self) -> ClusterProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
