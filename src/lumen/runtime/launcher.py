"""Launchers start, stop and restart worker processes.

The controller talks to workers only through their ZeroMQ addresses (they connect to the
controller and report their own data address), so a launcher's one job is process lifecycle:
start an incarnation, report when it exits (the process sentinel: a SIGKILL is seen at once),
and kill it on demand. `LocalLauncher` runs workers as child processes of this machine; a Ray
launcher can implement the same interface for several machines.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger("lumen.launcher")

ExitCallback = Callable[[int, int, int | None], Awaitable[None] | None]


@dataclass
class WorkerSpec:
    worker_id: int
    epoch: int
    argv: list[str]                     # arguments for `python -m lumen.runtime.worker`
    env: dict[str, str] = field(default_factory=dict)  # secrets travel here, never on argv


@dataclass
class WorkerHandle:
    worker_id: int
    epoch: int
    pid: int
    host: str
    node: str | None = None            # physical node identity (Ray node id); None = this machine


class Launcher(ABC):
    def __init__(self) -> None:
        self._on_exit: list[ExitCallback] = []

    def on_exit(self, callback: ExitCallback) -> None:
        """callback(worker_id, epoch, returncode) runs when an incarnation's process ends."""
        self._on_exit.append(callback)

    async def _notify_exit(self, worker_id: int, epoch: int, returncode: int | None) -> None:
        for cb in self._on_exit:
            result = cb(worker_id, epoch, returncode)
            if asyncio.iscoroutine(result):
                await result

    @abstractmethod
    async def start(self, spec: WorkerSpec) -> WorkerHandle: ...

    @abstractmethod
    async def kill(self, worker_id: int, epoch: int | None = None, sig: int = signal.SIGKILL) -> None: ...

    @abstractmethod
    async def shutdown(self, grace_s: float = 5.0) -> None: ...

    @abstractmethod
    def handles(self) -> list[WorkerHandle]: ...


def _die_with_parent() -> None:
    # PR_SET_PDEATHSIG: the kernel kills the worker if the gateway dies, so no orphan survives a
    # crashed or SIGKILLed gateway.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass
    os.setpgrp()  # own group: a Ctrl-C on the gateway's terminal is handled by the gateway


class LocalLauncher(Launcher):
    """Worker processes on this machine."""

    def __init__(self, python: str | None = None) -> None:
        super().__init__()
        self.python = python or sys.executable
        self._procs: dict[tuple[int, int], asyncio.subprocess.Process] = {}
        self._watchers: set[asyncio.Task] = set()

    async def start(self, spec: WorkerSpec) -> WorkerHandle:
        env = dict(os.environ)
        env.update(spec.env)
        proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "lumen.runtime.worker", *spec.argv,
            env=env, stdin=asyncio.subprocess.DEVNULL, preexec_fn=_die_with_parent)
        self._procs[(spec.worker_id, spec.epoch)] = proc
        task = asyncio.get_running_loop().create_task(self._watch(spec.worker_id, spec.epoch, proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        log.info("worker %d (epoch %d) started as pid %d", spec.worker_id, spec.epoch, proc.pid)
        return WorkerHandle(spec.worker_id, spec.epoch, proc.pid, "127.0.0.1")

    async def _watch(self, worker_id: int, epoch: int, proc: asyncio.subprocess.Process) -> None:
        rc = await proc.wait()
        self._procs.pop((worker_id, epoch), None)
        log.info("worker %d (epoch %d, pid %d) exited with %s", worker_id, epoch, proc.pid, rc)
        await self._notify_exit(worker_id, epoch, rc)

    async def kill(self, worker_id: int, epoch: int | None = None, sig: int = signal.SIGKILL) -> None:
        for (wid, ep), proc in list(self._procs.items()):
            if wid == worker_id and (epoch is None or ep == epoch) and proc.returncode is None:
                try:
                    proc.send_signal(sig)
                    if sig == signal.SIGTERM:
                        # a SIGSTOPped process must be continued to act on SIGTERM
                        proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass

    def handles(self) -> list[WorkerHandle]:
        return [WorkerHandle(w, e, p.pid, "127.0.0.1") for (w, e), p in self._procs.items()
                if p.returncode is None]

    async def shutdown(self, grace_s: float = 5.0) -> None:
        procs = [p for p in self._procs.values() if p.returncode is None]
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
                p.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
        if procs:
            done, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs],
                                               timeout=grace_s)
            for p in procs:
                if p.returncode is None:
                    try:
                        p.kill()
                    except ProcessLookupError:
                        pass
            await asyncio.gather(*(p.wait() for p in procs), return_exceptions=True)
        for task in list(self._watchers):
            await asyncio.gather(task, return_exceptions=True)
