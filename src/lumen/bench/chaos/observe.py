"""What lumen chaos watches: process resources from /proc, the cluster's state over time, and the
end state (every worker serving, nothing left behind)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from pathlib import Path

import httpx

__all__ = ["process_stats", "snapshot", "Monitor", "wait_all_serving", "wait_drained"]


def process_stats(pid: int) -> dict | None:
    """RSS (MiB), open FDs and threads of ``pid`` from /proc; None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields.get("VmRSS", "0 kB").split()[0])
    return {"pid": pid, "rss_mib": round(rss_kb / 1024, 1), "fds": fds, "threads": int(fields["Threads"])}


def snapshot(server_pid: int | None, cluster: dict) -> dict:
    procs = {}
    if server_pid:
        procs["gateway"] = process_stats(server_pid)
    for w in cluster.get("workers", []):
        if isinstance(w.get("pid"), int):
            procs[f"worker{w['id']}"] = process_stats(w["pid"])
    return procs


class Monitor:
    """Polls /lumen/cluster every ``period`` s; keeps (t, {worker id: (state, epoch, alive)})."""

    def __init__(self, http: httpx.AsyncClient, now, period: float = 0.1) -> None:
        self.http, self.now, self.period = http, now, period
        self.timeline: list[tuple[float, dict[int, tuple[str, int, bool]]]] = []
        self.last: dict = {}

    async def poll(self) -> dict:
        r = await self.http.get("/lumen/cluster")
        r.raise_for_status()
        self.last = r.json()
        self.timeline.append((self.now(), {w["id"]: (w["state"], w["epoch"], w["alive"])
                                           for w in self.last["workers"]}))
        return self.last

    async def run(self) -> None:
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                await self.poll()
            await asyncio.sleep(self.period)

    def detection_and_recovery(self, wid: int, at: float, epoch: int, until: float = math.inf
                               ) -> tuple[float | None, float | None]:
        """Seconds from ``at`` until the controller saw this incarnation of worker ``wid`` fail
        (declared dead, or replaced by a newer epoch) and until the worker served again under a
        newer epoch; recovery is None if it was hit again (at ``until``) before it served."""
        detect = recover = None
        was_alive = None
        for t, ws in self.timeline:
            if wid not in ws:
                continue
            state, ep, alive = ws[wid]
            if t < at:
                was_alive = alive
                continue
            if detect is None and (ep > epoch or (was_alive and not alive)):
                detect = t - at
            if detect is not None and ep > epoch and state == "serving":
                recover = t - at if t <= until else None
                break
        return detect, recover


async def wait_all_serving(http: httpx.AsyncClient, n: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            last = (await http.get("/lumen/cluster")).json()
            ws = last.get("workers", [])
            if len(ws) == n and all(w["state"] == "serving" and w["alive"] for w in ws):
                return last
        await asyncio.sleep(0.25)
    raise TimeoutError(f"workers not all serving after {timeout:g}s: "
                       f"{[(w.get('id'), w.get('state')) for w in last.get('workers', [])]}")


async def wait_drained(http: httpx.AsyncClient, timeout: float) -> tuple[dict, list[str]]:
    """Wait until no request, reservation, stored checkpoint page or KV page is left anywhere."""
    deadline = time.monotonic() + timeout
    while True:
        c = (await http.get("/lumen/cluster")).json()
        left = []
        if c.get("requests"):
            left.append(f"{len(c['requests'])} requests still in the controller")
        for w in c["workers"]:
            st = w.get("stats") or {}
            if w.get("ckpt_reserved_bytes"):
                left.append(f"worker {w['id']}: {w['ckpt_reserved_bytes']} checkpoint bytes reserved")
            for key in ("ckpt_reserved_bytes", "ckpt_stored_bytes", "ckpt_requests", "num_running", "num_waiting"):
                if st.get(key):
                    left.append(f"worker {w['id']}: {key}={st[key]}")
            if st.get("kv_usage"):
                left.append(f"worker {w['id']}: kv_usage={st['kv_usage']}")
        if not left or time.monotonic() > deadline:
            return c, left
        await asyncio.sleep(0.5)


class ProcessTracker:
    """Samples RSS / FDs / threads of the gateway and of every serving worker process every ``period``
    seconds, keeping each process's first sample (once it serves) and its latest: a leak shows as
    growth within one long-lived process, which start/end snapshots across restarts cannot show."""

    def __init__(self, server_pid: int | None, period: float = 5.0) -> None:
        self.server_pid, self.period = server_pid, period
        self.procs: dict[int, dict] = {}

    def sample(self, cluster: dict, now: float) -> None:
        named = [("gateway", self.server_pid)] if self.server_pid else []
        named += [(f"worker{w['id']}", w.get("pid")) for w in cluster.get("workers", [])
                  if w.get("state") == "serving" and isinstance(w.get("pid"), int)]
        for name, pid in named:
            stats = process_stats(pid)
            if stats is None:
                continue
            rec = self.procs.setdefault(pid, {"name": name, "pid": pid, "t_first": now, "first": stats})
            rec["t_last"], rec["last"] = now, stats

    async def run(self, monitor: Monitor) -> None:
        while True:
            self.sample(monitor.last, monitor.now())
            await asyncio.sleep(self.period)

    def longest_lived(self) -> list[dict]:
        """Per name (the gateway, each worker id), the process that was sampled over the longest time."""
        best: dict[str, dict] = {}
        for rec in self.procs.values():
            life = rec["t_last"] - rec["t_first"]
            if rec["name"] not in best or life > best[rec["name"]]["lived_s"]:
                best[rec["name"]] = {**rec, "lived_s": round(life, 1)}
        return [best[k] for k in sorted(best)]
