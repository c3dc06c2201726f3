"""Failure plans and their injection into a live local cluster.

Plan syntax (one failure per ``--fail``; several allowed)::

    t=30s:worker=1               SIGKILL worker 1, 30 s after the replay starts
    t=30s:worker=1:SIGKILL       the same, explicit
    t=12.5:worker=0:SIGSTOP:cont_after=5s   hang worker 0 (SIGSTOP), resume it (SIGCONT) 5 s later
    t=25s:worker=busiest         SIGKILL the serving worker with the most requests at that moment
                                 (running + waiting; lowest id on a tie); if none has any, it waits
                                 up to 10 s for one that does, so the failure interrupts work even
                                 at a low load

Times accept ``s``, ``ms`` and ``m`` suffixes (bare numbers are seconds). Only SIGKILL and
SIGSTOP are allowed: they are the two failures the cluster must survive (a crash and a hang);
``cont_after`` is only meaningful for SIGSTOP.

Injection reads ``GET {url}/lumen/cluster`` at the failure time, finds the worker by id and sends
the signal to its pid with ``os.kill``: the worker really dies (or hangs); nothing is simulated.
That needs the worker on this machine, so a worker whose host is not 127.0.0.1/localhost/::1 is
refused with FaultInjectionError.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

__all__ = [
    "FaultSpec",
    "FaultEvent",
    "FaultInjectionError",
    "parse_fault",
    "parse_fail_plan",
    "inject",
    "run_plan",
    "LOCAL_HOSTS",
    "BUSIEST",
]

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_SIGNALS = {"SIGKILL": signal.SIGKILL, "KILL": signal.SIGKILL, "SIGSTOP": signal.SIGSTOP, "STOP": signal.SIGSTOP}
_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m)?\s*$")


class FaultInjectionError(RuntimeError):
    pass


BUSIEST = "busiest"
BUSIEST_WAIT_S = 10.0  # how long worker=busiest waits for a worker with requests before failing an idle one


@dataclass(frozen=True)
class FaultSpec:
    at_s: float  # seconds after the replay starts
    worker: int | str  # a worker id, or BUSIEST (resolved when the failure is injected)
    sig: signal.Signals = signal.SIGKILL
    cont_after_s: float | None = None  # SIGSTOP only: send SIGCONT this long after

    def __str__(self) -> str:
        s = f"t={self.at_s:g}s:worker={self.worker}:{self.sig.name}"
        return s + (f":cont_after={self.cont_after_s:g}s" if self.cont_after_s is not None else "")


@dataclass
class FaultEvent:
    """What the injector did for one FaultSpec (times on the replay clock)."""

    spec: str
    planned_s: float
    injected_s: float | None = None
    injected_wall: float | None = None  # time.time() at the signal: maps the cluster's wall-clock phases
    worker: int = -1
    pid: int | None = None
    worker_state: str | None = None
    signal: str = ""
    verified: bool | None = None  # SIGKILL: the pid was gone or a zombie shortly after
    cont_s: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _duration(text: str, what: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"bad {what} {text!r}: expected a number with an optional s/ms/m suffix")
    v = float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
    return v


def parse_fault(text: str) -> FaultSpec:
    """Parse one plan entry, e.g. ``t=30s:worker=1:SIGKILL`` (see module doc)."""
    at = worker = cont = None
    sig = signal.SIGKILL
    for raw in text.split(":"):
        part = raw.strip()
        if not part:
            continue
        if "=" in part:
            key, _, value = part.partition("=")
            key = key.strip().lower()
            if key == "t":
                at = _duration(value, "time")
            elif key == "worker":
                if value.strip().lower() == BUSIEST:
                    worker = BUSIEST
                elif value.strip().isdigit():
                    worker = int(value)
                else:
                    raise ValueError(f"bad worker {value!r} in {text!r}: expected a worker id (0, 1, ...) or busiest")
            elif key in ("cont_after", "cont"):
                cont = _duration(value, "cont_after")
            elif key in ("signal", "sig"):
                sig = _signal(value, text)
            else:
                raise ValueError(f"unknown key {key!r} in failure {text!r}; keys: t, worker, signal, cont_after")
        else:
            sig = _signal(part, text)
    if at is None or worker is None:
        raise ValueError(f"failure {text!r} needs t=<time> and worker=<id>, e.g. t=30s:worker=1:SIGKILL")
    if cont is not None and sig != signal.SIGSTOP:
        raise ValueError(f"cont_after only applies to SIGSTOP (in {text!r})")
    return FaultSpec(at, worker, sig, cont)


def _signal(name: str, text: str) -> signal.Signals:
    key = name.strip().upper()
    if key not in _SIGNALS:
        raise ValueError(f"unsupported signal {name!r} in {text!r}; use SIGKILL or SIGSTOP")
    return _SIGNALS[key]


def parse_fail_plan(entries: Sequence[str]) -> list[FaultSpec]:
    """Parse every ``--fail`` entry; sorted by time."""
    return sorted((parse_fault(e) for e in entries), key=_order)


def _order(f: FaultSpec) -> tuple:
    return f.at_s, str(f.worker)


def _load(w: dict) -> float:
    counts = w.get("load") if isinstance(w.get("load"), dict) else {}
    return sum(v for v in (counts.get("num_running"), counts.get("num_waiting")) if isinstance(v, (int, float)))


def _busiest(workers: list[dict]) -> dict | None:
    """The serving worker with the most requests (running + waiting), lowest id on a tie."""
    serving = [w for w in workers if isinstance(w, dict) and w.get("state") == "serving" and isinstance(w.get("id"), int)]
    return min(serving, key=lambda w: (-_load(w), w["id"]), default=None)


async def cluster_workers(http: httpx.AsyncClient) -> list[dict]:
    resp = await http.get("/lumen/cluster")
    if resp.status_code != 200:
        raise FaultInjectionError(f"GET /lumen/cluster returned {resp.status_code}")
    try:
        workers = resp.json()["workers"]
        if not isinstance(workers, list):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise FaultInjectionError("GET /lumen/cluster did not return {'workers': [...]}") from None
    return workers


def _pid_gone(pid: int) -> bool:
    # The worker is the serve process's child, not ours: after SIGKILL it stays a zombie until
    # its parent reaps it, so "gone" includes state Z.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


async def inject(http: httpx.AsyncClient, spec: FaultSpec, event: FaultEvent, now) -> None:
    """Signal the worker of ``spec`` now. Raises FaultInjectionError when that is impossible."""
    workers = await cluster_workers(http)
    if spec.worker == BUSIEST:
        # an idle cluster has no busiest worker: wait (bounded) for one to hold requests
        waited, deadline = now(), now() + BUSIEST_WAIT_S
        while (w := _busiest(workers)) is not None and _load(w) == 0 and now() < deadline:
            await asyncio.sleep(0.05)
            workers = await cluster_workers(http)
        if w is None:
            raise FaultInjectionError(f"{spec}: no serving worker to fail")
        event.notes.append(f"busiest: worker {w['id']} with load {w.get('load')} after waiting "
                           f"{now() - waited:.2f} s for work")
    else:
        w = next((w for w in workers if isinstance(w, dict) and w.get("id") == spec.worker), None)
    if w is None:
        ids = sorted(w.get("id") for w in workers if isinstance(w, dict))
        raise FaultInjectionError(f"{spec}: no worker {spec.worker} in the cluster (workers: {ids})")
    event.worker = w["id"]
    host = str(w.get("host", ""))
    if host not in LOCAL_HOSTS:
        raise FaultInjectionError(
            f"{spec}: worker {event.worker} runs on host {host!r}; lumen bench can only signal local workers"
        )
    pid = w.get("pid")
    if not isinstance(pid, int) or pid <= 1 or pid == os.getpid():
        raise FaultInjectionError(f"{spec}: worker {event.worker} reports no usable pid ({pid!r})")
    event.pid, event.worker_state = pid, str(w.get("state"))
    try:
        os.kill(pid, spec.sig)
    except ProcessLookupError:
        raise FaultInjectionError(f"{spec}: worker {event.worker} pid {pid} does not exist") from None
    except PermissionError:
        raise FaultInjectionError(f"{spec}: not permitted to signal pid {pid}") from None
    event.injected_s, event.injected_wall = now(), time.time()
    if spec.sig == signal.SIGKILL:
        for _ in range(50):
            if _pid_gone(pid):
                event.verified = True
                break
            await asyncio.sleep(0.01)
        else:
            event.verified = False
            event.notes.append("pid still running 0.5 s after SIGKILL")


async def run_plan(url: str, plan: Sequence[FaultSpec], t0: float, timeout_s: float = 10.0) -> list[FaultEvent]:
    """Execute ``plan`` against the cluster at ``url``; ``t0`` is the replay's time.monotonic() zero.

    Returns one event per spec. The first failure to inject raises FaultInjectionError (a plan
    that did not happen makes the run meaningless); SIGCONTs are sent even if cancelled.
    """

    def now() -> float:
        return time.monotonic() - t0

    plan = sorted(plan, key=_order)
    events = [FaultEvent(str(s), s.at_s, worker=s.worker if isinstance(s.worker, int) else -1, signal=s.sig.name)
              for s in plan]
    conts: list[asyncio.Task] = []

    async def cont_later(spec: FaultSpec, ev: FaultEvent) -> None:
        try:
            await asyncio.sleep(max(0.0, spec.at_s + (spec.cont_after_s or 0.0) - now()))
        finally:
            # Resume even when cancelled: a SIGSTOPped worker left behind would hang the cluster.
            if ev.pid is not None:
                try:
                    os.kill(ev.pid, signal.SIGCONT)
                    ev.cont_s = now()
                except ProcessLookupError:
                    ev.notes.append("process gone before SIGCONT")

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s) as http:
        try:
            for spec, ev in zip(plan, events, strict=True):
                await asyncio.sleep(max(0.0, spec.at_s - now()))
                try:
                    await inject(http, spec, ev, now)
                except (FaultInjectionError, httpx.HTTPError) as e:
                    ev.error = str(e)
                    raise FaultInjectionError(f"failure injection failed: {e}") from e
                if spec.sig == signal.SIGSTOP and spec.cont_after_s is not None:
                    conts.append(asyncio.create_task(cont_later(spec, ev)))
            if conts:
                await asyncio.gather(*conts)
        finally:
            for t in conts:
                t.cancel()
            if conts:
                await asyncio.gather(*conts, return_exceptions=True)
    return events
