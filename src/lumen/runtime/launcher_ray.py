"""Ray launcher: lumen workers as Ray actors placed across the nodes of a Ray cluster.

Only process lifecycle moves to Ray. The control plane (the controller's ZeroMQ ROUTER on the
driver) and the data plane (each worker's PULL socket) stay exactly as with `LocalLauncher`:
workers bind their data socket on their own node's IP and report host:port in HELLO, and every
message is HMAC-authenticated with the cluster secret.

Design: each worker incarnation is one small *supervisor* actor (`LumenWorker`) that starts
`python -m lumen.runtime.worker ...` as a child process on its node and waits for it. We chose
this over running the worker loop inside the actor process because:

* the worker runs exactly the code path `LocalLauncher` runs (its own main thread, its own
  SIGTERM handler, its own ZeroMQ context, `torch.set_num_threads`), with nothing of Ray's
  threads, signal handlers or stdout capture in the process that holds the engine;
* the supervisor is an *async* actor, so while `wait()` is pending it still answers `signal()`
  (SIGTERM for a graceful stop, SIGSTOP/SIGCONT for hang injection) on any node, where the
  driver's `os.kill` could only reach its own machine;
* the pid that `/lumen/cluster` shows and `lumen bench --fail` SIGKILLs is the process holding
  the model, as with local workers.

No orphans, by three independent mechanisms: the child is started with PR_SET_PDEATHSIG=SIGKILL
from the actor's event-loop thread (which lives as long as the actor), so the child dies with its
actor however the actor dies (`ray.kill`, SIGKILL, OOM); it stays in the actor's process group,
which the raylet signals when it reaps a dead or killed worker; and the worker's own heartbeat
thread kills itself when it is re-parented. The actors are *not* detached, so Ray kills them when
the driver (the gateway) exits or dies; `shutdown()` kills every actor, removes the placement
group and, when this launcher started Ray itself, calls `ray.shutdown()`.

Failure detection: a watcher task per incarnation awaits the actor's long-running `wait()` call.
It resolves with the child's exit status (the worker process died: as immediate as the local
sentinel) or raises `RayActorError` (the actor or its node died); both become the launcher's
`on_exit` callbacks. A dead node is noticed by Ray only after its health checks fail (seconds);
lumen's heartbeats (default 100 ms) usually declare the node's workers dead first.

Placement: one placement group with one bundle per worker (`{"GPU": 1, "CPU": 1}` on GPU clusters,
`{"CPU": 1}` otherwise; `LUMEN_RAY_WORKER_RESOURCES` overrides), strategy SPREAD (default) or PACK.
Every incarnation asks for *any* free bundle (`placement_group_bundle_index=-1`): a restart takes
the slot its dead predecessor freed, and when a node dies Ray reschedules that node's bundles onto
nodes with room, so restarts land on any node with a free slot, under a new epoch, and load their
weights there. Node identity (the Ray node id) is reported in `WorkerHandle.node`; the controller
puts it in `WorkerView.node`, and LUMEN's placement then prefers checkpoint holders on another node
than the executor.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from .launcher import Launcher, WorkerHandle, WorkerSpec

log = logging.getLogger("lumen.launcher.ray")

STRATEGIES = ("SPREAD", "PACK")
RESOURCES_ENV = "LUMEN_RAY_WORKER_RESOURCES"
# forwarded from the driver to every worker (like LocalLauncher's inherited environment); the
# cluster secret is never among them (it travels through the object store, see `start`), and the
# gateway's API key is no business of the workers
_NOT_FORWARDED = ("LUMEN_CLUSTER_SECRET", "LUMEN_API_KEY")
_LOOPBACK_OR_ANY = ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", "")


def _require_ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("--launcher ray needs Ray: pip install 'lumen-serve[ray]'") from exc
    return ray


# ---------------------------------------------------------------------------- pure helpers
def worker_resources(on_gpu: bool, override: str | None = None) -> dict[str, float]:
    """The bundle (and actor resources) of one worker: one GPU per worker on GPU clusters, one CPU
    otherwise (a CPU worker runs one torch thread by default). `override` is a JSON object, e.g.
    '{"CPU": 0.5, "lumen_node": 1}', for custom resources that pin workers to some nodes."""
    if override:
        res = json.loads(override)
        if not isinstance(res, dict) or not res or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and v >= 0 for k, v in res.items()):
            raise ValueError(f"{RESOURCES_ENV} must be a JSON object of resource -> amount >= 0, got {override!r}")
        return {k: float(v) for k, v in res.items()}
    return {"GPU": 1.0, "CPU": 1.0} if on_gpu else {"CPU": 1.0}


def internal_host(http_host: str, node_ip: str) -> str:
    """The interface the controller's ROUTER binds and advertises to workers on other nodes.

    A loopback `--host` keeps the HTTP gateway private, but workers on other machines must reach
    the ROUTER, so it binds the driver's node IP (the address Ray itself uses for this node).
    A wildcard cannot be advertised either. A specific `--host` is used as given: the operator
    chose the interface (it must be reachable from every node)."""
    return node_ip if http_host in _LOOPBACK_OR_ANY else http_host


def rewrite_worker_argv(argv: list[str], host: str, device: str | None) -> list[str]:
    """The controller's worker argv with `--host` set to the node's IP (the data socket must be
    reachable from other nodes) and, on GPU, `--device` set to the GPU Ray assigned to the actor."""
    out = list(argv)
    for flag, value in (("--host", host), ("--device", device)):
        if value is None:
            continue
        if flag in out:
            i = out.index(flag)
            if i + 1 >= len(out):
                raise ValueError(f"worker argv ends with {flag}")
            out[i + 1] = value
        else:
            out += [flag, value]
    return out


def cuda_device_for(gpu_ids: list, env: dict[str, str]) -> str:
    """The torch device of the GPU Ray assigned: Ray narrows CUDA_VISIBLE_DEVICES to it (cuda:0),
    unless the cluster disabled that (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES)."""
    if not gpu_ids:
        raise RuntimeError("the worker actor was given no GPU")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.split(",")[0].strip() == str(gpu_ids[0]):
        return "cuda:0"
    return f"cuda:{int(gpu_ids[0])}"


def model_paths(argv: list[str]) -> list[str]:
    """The model directories a worker will read (absolute paths, resolved by the driver)."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1])
            if a in ("--model", "--draft-model") and argv[i + 1].startswith("/")]


def forwarded_env(environ: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k.startswith("LUMEN_") and k not in _NOT_FORWARDED}


# ---------------------------------------------------------------------------- the actor
def _pdeathsig_hook():
    """A preexec_fn that makes the child get SIGKILL when the thread that forked it (the actor's
    event-loop thread, alive as long as the actor) dies. libc is loaded here, in the parent: the
    actor process has many threads, and a dlopen between fork and exec could deadlock on a loader
    lock another thread held at the fork. No setpgrp: staying in the actor's process group lets the
    raylet's kill of a dead actor's group reach the child too."""
    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    return functools.partial(prctl, 1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


class LumenWorker:
    """Supervisor actor of one worker incarnation (an async actor: its methods share one event
    loop thread, so `signal` runs while `wait` is pending)."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None

    async def ready(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    async def spawn(self, argv: list[str], sealed_env: list, env: dict[str, str], on_gpu: bool) -> dict:
        import ray

        # sealed_env is [ObjectRef]: a ref nested in a list is not resolved by Ray into the call's
        # arguments, so the secret is fetched here, from the object store, by this actor only
        secret_env = await sealed_env[0]
        ip = ray.util.get_node_ip_address()
        for path in model_paths(argv):
            if not os.path.isdir(path):
                # say so here, once, rather than let every incarnation crash on import of the weights
                raise FileNotFoundError(f"model directory {path} does not exist on node {ip}: lumen needs it "
                                        "at the same path on every node (see docs/multinode.md)")
        device = cuda_device_for(ray.get_gpu_ids(), dict(os.environ)) if on_gpu else None
        child_env = dict(os.environ)
        child_env.update(env)
        child_env.update(secret_env)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lumen.runtime.worker", *rewrite_worker_argv(argv, ip, device),
            env=child_env, stdin=asyncio.subprocess.DEVNULL, preexec_fn=_pdeathsig_hook())
        return {"pid": self.proc.pid, "actor_pid": os.getpid(), "ip": ip,
                "node_id": ray.get_runtime_context().get_node_id(), "device": device or "cpu"}

    async def wait(self) -> int:
        """Returns the worker process's exit status when it ends (negative: killed by a signal)."""
        assert self.proc is not None
        return await self.proc.wait()

    async def signal(self, sig: int) -> bool:
        if self.proc is None or self.proc.returncode is not None:
            return False
        try:
            self.proc.send_signal(sig)
            if sig == signal.SIGTERM:
                self.proc.send_signal(signal.SIGCONT)  # a SIGSTOPped worker acts on TERM only once resumed
        except ProcessLookupError:
            return False
        return True


# ---------------------------------------------------------------------------- the launcher
@dataclass
class _Incarnation:
    worker_id: int
    epoch: int
    actor: Any
    info: dict | None = None        # from spawn(): pid, actor_pid, ip, node_id, device
    done_ref: Any = None            # the pending wait() call
    exited: bool = False


class RayLauncher(Launcher):
    """Workers as Ray actors. Use `connect()` before the controller starts and `prepare()` once the
    cluster configuration is known; then the controller drives it like any launcher."""

    def __init__(self, address: str | None = None, strategy: str = "SPREAD",
                 pg_timeout_s: float = 120.0) -> None:
        super().__init__()
        strategy = strategy.upper()
        if strategy not in STRATEGIES:
            raise ValueError(f"placement strategy must be one of {STRATEGIES}, got {strategy!r}")
        if address and address.startswith("ray://"):
            # a Ray Client driver runs off-cluster: the workers could not reach the controller's ROUTER
            raise ValueError("Ray Client addresses (ray://) are not supported: run `lumen serve` on a node "
                             "of the cluster with --ray-address auto or HOST:PORT")
        self.address = address
        self.strategy = strategy
        self.pg_timeout_s = pg_timeout_s
        self.started_ray = False
        self._initialised = False   # this launcher called ray.init (so it calls ray.shutdown)
        self.on_gpu = False
        self.resources: dict[str, float] = {}
        self._pg = None
        self._actor_cls = None
        self._sealed: tuple[tuple, Any] | None = None   # (env items, ObjectRef) of the secret env
        self._incs: dict[tuple[int, int], _Incarnation] = {}
        self._pool: list = []   # actors started together by prepare(), taken by the first incarnations
        self._watchers: set[asyncio.Task] = set()

    # -------------------------------------------------------------- setup
    def connect(self) -> None:
        """Join the Ray cluster at `address` ('auto', HOST:PORT), or start a private single-node Ray
        when no address is given (then `shutdown` stops it)."""
        ray = _require_ray()
        if ray.is_initialized():
            return  # whoever initialised Ray owns it: shutdown() leaves it connected
        # "local" forces a fresh private instance: plain None would silently join whatever cluster
        # RAY_ADDRESS or the last `ray start` on this machine points at
        self.started_ray = not self.address
        self._initialised = True
        ray.init(address=self.address or "local", namespace="lumen", log_to_driver=True)
        log.info("ray: %s cluster, driver on node %s (%s), resources %s",
                 "private" if self.started_ray else "joined", ray.get_runtime_context().get_node_id()[:12],
                 ray.util.get_node_ip_address(), ray.cluster_resources())

    def node_ip(self) -> str:
        return _require_ray().util.get_node_ip_address()

    def cluster_has_gpus(self) -> bool:
        return _require_ray().cluster_resources().get("GPU", 0) >= 1

    async def prepare(self, num_workers: int, on_gpu: bool) -> None:
        """Reserve one bundle per worker in a placement group; fail clearly if the cluster lacks room."""
        ray = _require_ray()
        from ray.util.placement_group import placement_group

        self.on_gpu = on_gpu
        self.resources = worker_resources(on_gpu, os.environ.get(RESOURCES_ENV))
        self._actor_cls = ray.remote(LumenWorker)
        self._pg = placement_group([dict(self.resources) for _ in range(num_workers)], strategy=self.strategy)
        try:
            await asyncio.wait_for(self._pg.ready(), self.pg_timeout_s)
        except TimeoutError:
            raise RuntimeError(
                f"the Ray cluster has no room for {num_workers} workers of {self.resources} within "
                f"{self.pg_timeout_s:.0f}s (available: {ray.available_resources()})") from None
        log.info("placement group ready: %d x %s, %s", num_workers, self.resources, self.strategy)
        # the controller starts its workers one after another; starting their actors (a Ray worker
        # process each, about a second) all at once here keeps a large cluster's start-up short
        pool = [self._new_actor() for _ in range(num_workers)]
        try:
            await asyncio.wait_for(asyncio.gather(*(a.ready.remote() for a in pool)), self.pg_timeout_s)
        except BaseException:
            for a in pool:
                self._kill_actor(a)
            raise
        self._pool = pool

    def _new_actor(self):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts: dict[str, Any] = {
            "num_cpus": self.resources.get("CPU", 0.0), "num_gpus": self.resources.get("GPU", 0.0),
            # any free bundle: the slot a dead predecessor freed, or one Ray moved off a dead node
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=-1),
            "max_restarts": 0,   # the controller restarts workers itself, under a new epoch
            "lifetime": None,    # not detached: fate-shares with the driver, so no orphan outlives it
        }
        custom = {k: v for k, v in self.resources.items() if k not in ("CPU", "GPU")}
        if custom:
            opts["resources"] = custom
        return self._actor_cls.options(**opts).remote()

    # -------------------------------------------------------------- Launcher interface
    def _sealed_env(self, env: dict[str, str]):
        """The spec's env (it carries the cluster secret) as an object-store ref, put once.

        Why the object store: runtime_env env_vars and plain actor/task arguments are recorded by
        Ray (task specs, the dashboard, `ray list`), a file would need a filesystem shared by every
        node. An object is readable only through the ref, which is held by this driver and handed
        to the actors nested in a list (Ray does not inline nested refs into the call's arguments).
        Whoever can reach the object store can also run code on the cluster, which is the trust
        boundary Ray has anyway: run Ray and lumen's internal ports on a private network."""
        ray = _require_ray()
        key = tuple(sorted(env.items()))
        if self._sealed is None or self._sealed[0] != key:
            self._sealed = (key, ray.put(dict(env)))
        return self._sealed[1]

    async def start(self, spec: WorkerSpec) -> WorkerHandle:
        if self._pg is None:
            raise RuntimeError("RayLauncher.prepare() must run before start()")
        actor = self._pool.pop() if self._pool else self._new_actor()
        inc = _Incarnation(spec.worker_id, spec.epoch, actor)
        self._incs[(spec.worker_id, spec.epoch)] = inc
        call = actor.spawn.remote(spec.argv, [self._sealed_env(spec.env)], forwarded_env(dict(os.environ)),
                                  self.on_gpu)
        try:
            inc.info = await self._await_placement(spec, call)
        except Exception as exc:
            # killed while waiting for a slot, or its node died: report it like any dead incarnation,
            # so the controller's restart (with back-off) takes over
            log.warning("worker %d (epoch %d) could not start: %s", spec.worker_id, spec.epoch, exc)
            self._incs.pop((spec.worker_id, spec.epoch), None)
            self._kill_actor(actor)
            self._spawn_task(self._notify_exit(spec.worker_id, spec.epoch, None))
            return WorkerHandle(spec.worker_id, spec.epoch, 0, "", None)
        inc.done_ref = actor.wait.remote()
        self._spawn_task(self._watch(inc))
        i = inc.info
        log.info("worker %d (epoch %d) started as pid %d on node %s (%s), actor pid %d", spec.worker_id,
                 spec.epoch, i["pid"], i["node_id"][:12], i["ip"], i["actor_pid"])
        return WorkerHandle(spec.worker_id, spec.epoch, i["pid"], i["ip"], i["node_id"])

    async def _await_placement(self, spec: WorkerSpec, call) -> dict:
        fut = asyncio.ensure_future(call)
        waited = 0.0
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(fut), 15.0)
            except TimeoutError:
                waited += 15.0
                # normal while Ray moves a dead node's bundles; permanent if the cluster lost capacity
                log.warning("worker %d (epoch %d) has waited %.0fs for a free slot (%s)", spec.worker_id,
                            spec.epoch, waited, self.resources)

    async def _watch(self, inc: _Incarnation) -> None:
        ray = _require_ray()
        try:
            rc: int | None = await inc.done_ref
            why = f"exit status {rc}"
        except ray.exceptions.RayError as exc:  # RayActorError: the actor, its process or its node died
            rc, why = None, f"actor died ({type(exc).__name__})"
        inc.exited = True
        self._incs.pop((inc.worker_id, inc.epoch), None)
        self._kill_actor(inc.actor)  # free the bundle for the next incarnation
        log.info("worker %d (epoch %d, pid %s) ended: %s", inc.worker_id, inc.epoch,
                 inc.info["pid"] if inc.info else "?", why)
        await self._notify_exit(inc.worker_id, inc.epoch, rc)

    def _spawn_task(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    @staticmethod
    def _kill_actor(actor) -> None:
        ray = _require_ray()
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone, or Ray is shutting down
            pass

    async def kill(self, worker_id: int, epoch: int | None = None, sig: int = signal.SIGKILL) -> None:
        for (wid, ep), inc in list(self._incs.items()):
            if wid != worker_id or (epoch is not None and ep != epoch) or inc.exited:
                continue
            if sig == signal.SIGKILL:
                # works on any node, for a hung, stopped or still pending incarnation alike: the actor
                # dies and takes its worker process with it (PDEATHSIG, process group)
                self._kill_actor(inc.actor)
            else:
                inc.actor.signal.remote(int(sig))  # fire and forget: SIGTERM / SIGSTOP / SIGCONT

    def handles(self) -> list[WorkerHandle]:
        return [WorkerHandle(i.worker_id, i.epoch, i.info["pid"], i.info["ip"], i.info["node_id"])
                for i in self._incs.values() if i.info is not None and not i.exited]

    async def shutdown(self, grace_s: float = 5.0) -> None:
        ray = _require_ray()
        if not ray.is_initialized():
            return
        for actor in self._pool:
            self._kill_actor(actor)
        self._pool.clear()
        incs = [i for i in self._incs.values() if not i.exited]
        for inc in incs:
            if inc.info is not None:
                inc.actor.signal.remote(int(signal.SIGTERM))
        refs = [i.done_ref for i in incs if i.done_ref is not None]
        if refs:
            # the watchers see the workers exit; give them the grace period
            await asyncio.wait([asyncio.ensure_future(self._quiet(r)) for r in refs], timeout=grace_s)
        for inc in incs:
            self._kill_actor(inc.actor)
        for task in list(self._watchers):
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        self._incs.clear()
        if self._pg is not None:
            from ray.util.placement_group import remove_placement_group
            try:
                remove_placement_group(self._pg)
            except Exception:
                pass
            self._pg = None
        if self._initialised:
            # a private Ray stops here; from a joined cluster this driver disconnects, which ends its
            # job and with it any actor of ours that a lost kill left behind
            ray.shutdown()

    @staticmethod
    async def _quiet(ref) -> None:
        try:
            await ref
        except Exception:
            pass
