"""The controller: cluster membership, routing, failure detection and recovery dispatch.

It runs in the gateway's asyncio process and owns the truth about every in-flight request: its
prompt, the tokens the client has been sent, where it executes and where its checkpoint lives.
Every decision (routing, checkpoint placement, recovery dispatch, pairing) is a call into
`lumen.policy`, the same functions the simulator calls.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from ..engine.kv_pages import TAG_BYTES, page_tags
from ..policy import (
    ClusterView,
    NoServingWorker,
    Policy,
    ReplicaRule,
    RequestView,
    WorkerState,
    WorkerView,
    checkpoint_reservation,
    dispatch_interrupted,
    features,
    may_assist,
    parse_policy,
    pick_partner,
    pick_partner_by_gain,
    place_checkpoints,
    restore_source,
    route_new,
)
from . import assist_pricing
from . import metrics_prom as M
from .config import DRAFT_FIRST_CHOICES, ClusterConfig
from .launcher import Launcher, WorkerSpec
from .model_dirs import resolve_model_dir
from .page_cache import evict_models
from .protocol import SCHEMA, sampling_params_to_wire
from .transport import AsyncRouterEndpoint, Codec, Message, frame_ints, ints_frame, secret_to_hex

log = logging.getLogger("lumen.controller")


class ClusterUnavailable(Exception):
    """No worker can take a request right now (HTTP 503)."""


class ClusterBusy(Exception):
    """Back-pressure: too many requests in flight (HTTP 429)."""


@dataclass
class CkptCopy:
    """One checkpoint copy of a request (`--ckpt-replicas` of them; the paper keeps one)."""

    holder: int
    epoch: int                         # the holder's incarnation when the copy was reserved
    reservation: int                   # host bytes reserved there
    gen: int                           # the RESERVE the holder must confirm before the executor streams
    confirmed: bool = False            # the holder confirmed: the executor streams to it
    valid_pages: int = 0               # valid pages, as the holder last reported


@dataclass
class RequestState:
    id: str
    prompt_ids: list[int]
    params: Any                        # engine SamplingParams
    arrival: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    executor: int | None = None
    exec_epoch: int = -1
    copies: list[CkptCopy] = field(default_factory=list)  # first copy first
    replicas: int = 1                  # copies the request should have (placement's K)
    needs_placement: bool = True       # holders are chosen when (re)prefill completes
    started: bool = False              # produced a token since its last assignment
    first_token_at: float | None = None
    done: bool = False
    interrupts: int = 0

    @property
    def context_len(self) -> int:
        return len(self.prompt_ids) + len(self.generated)

    @property
    def holder(self) -> int | None:
        """The first copy's holder (None: unprotected)."""
        return self.copies[0].holder if self.copies else None

    def copy_on(self, w: WorkerRecord) -> CkptCopy | None:
        """The request's copy on this incarnation of w, if any."""
        return next((c for c in self.copies if c.holder == w.id and c.epoch == w.epoch), None)


@dataclass
class WorkerRecord:
    id: int
    epoch: int = 0
    state: WorkerState = WorkerState.DOWN
    alive: bool = False                # process up (launcher's view)
    fenced: bool = True                # declared dead (or not started): its messages are ignored
    identity: bytes | None = None      # ROUTER identity of the incarnation's main socket
    data_addr: str = ""                # PULL for assisted-recovery traffic
    kv_addr: str = ""                  # PULL for checkpoint pages (its own thread on the worker)
    pid: int | None = None
    device: str = ""
    host: str = ""                     # the incarnation's machine, as its launcher reports it
    node: str | None = None            # node identity from the launcher (Ray); placement avoids same-node holders
    last_hb: float = 0.0
    stats: dict = field(default_factory=dict)
    ckpt_reserved: int = 0             # R_w, the controller's own bookkeeping
    partner: int | None = None
    restarts: int = 0
    spawned_at: float = 0.0
    heard: bool = False                # the incarnation has spoken: heartbeat deadlines apply from now
    down_since: float | None = None
    phase_s: dict = field(default_factory=dict)
    restart_task: asyncio.Task | None = None
    draft_ready: bool = False          # a restarting worker holds its loaded draft (pairing may use it)
    waited_for_gain: bool = False      # said once that no survivor would gain from its assistance
    paired_at: float = 0.0             # monotonic time of its latest pairing (as a drafter)
    # interrupted requests dispatched here, over the cluster's life (lumen.metrics.targets reads it):
    # {"restored": n, "recomputed": n, "tokens": context tokens of those requests}
    recovered_here: dict = field(default_factory=lambda: {"restored": 0, "recomputed": 0, "tokens": 0})


class Controller:
    def __init__(self, cfg: ClusterConfig, launcher: Launcher, secret: bytes):
        if cfg.draft_first not in DRAFT_FIRST_CHOICES:
            raise ValueError(f"draft_first must be one of {', '.join(DRAFT_FIRST_CHOICES)}, not {cfg.draft_first!r}")
        self.cfg = cfg
        self.policy: Policy = parse_policy(cfg.policy)
        self.features = features(self.policy)
        self.replica_rule = ReplicaRule(cfg.ckpt_replicas, cfg.ckpt_replicas_max, cfg.failure_model())
        self.launcher = launcher
        self._pairs_reviewed_at = 0.0
        self.secret = secret
        self.codec = Codec(secret, "controller", 0, schema=SCHEMA)
        self.codec.on_stale_epoch = self._fence_older
        self.ctx = zmq.asyncio.Context()
        self.router: AsyncRouterEndpoint | None = None
        self.workers: dict[int, WorkerRecord] = {i: WorkerRecord(i) for i in range(cfg.num_workers)}
        # each worker's (index, count) on its device under slots, else None: fixed for the cluster's life,
        # and read by every view() (routing, placement), so worked out once
        self.slots = [cfg.slot_of(i) for i in range(cfg.num_workers)]
        self.requests: dict[str, RequestState] = {}
        # interrupted requests waiting for any worker to serve again (every survivor is reloading)
        self.pending: list[tuple[float, RequestState, int]] = []
        self.stale_messages = 0
        self.unprotected = 0
        self._reserve_gen = 0
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self._ready = asyncio.Event()
        self.launcher.on_exit(self._on_process_exit)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.router = AsyncRouterEndpoint(self.ctx, self.codec, host=self.cfg.host, port=0)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._recv_loop()), loop.create_task(self._monitor_loop())]
        for w in self.workers.values():
            await self._spawn(w, initial=True)

    async def wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def stop(self, drain_s: float = 30.0) -> None:
        """Drain in-flight requests (bounded), then stop every worker."""
        deadline = time.monotonic() + drain_s
        while any(not r.done for r in self.requests.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._stopping = True
        for r in list(self.requests.values()):
            if not r.done:
                self._fail(r, 503, "server is shutting down")
        for w in self.workers.values():
            if w.identity is not None:
                self._send(w, "SHUTDOWN", {})
            if w.restart_task:
                w.restart_task.cancel()
        await self.launcher.shutdown(grace_s=5.0)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.router:
            self.router.close()
        self.ctx.term()

    # ------------------------------------------------------------------ spawning
    def _worker_argv(self, w: WorkerRecord) -> list[str]:
        c = self.cfg
        argv = ["--worker-id", str(w.id), "--epoch", str(w.epoch), "--controller", self.router.address,
                "--model", c.model, "--device", c.device_for(w.id), "--policy", self.policy.value,
                "--host", c.host, "--hb-interval", str(c.hb_interval_s), "--hb-misses", str(c.hb_misses),
                "--ckpt-budget-bytes", str(c.ckpt_budget_bytes),
                "--ckpt-export-interval-ms", str(c.ckpt_export_interval_ms), "--block-size", str(c.block_size),
                "--max-batch", str(c.max_batch), "--chunk-tokens", str(c.chunk_tokens),
                "--spec-k", str(c.spec_k), "--spec-acceptance", f"{c.spec_acceptance:g}"]
        if c.num_blocks:
            argv += ["--num-blocks", str(c.num_blocks)]
        if c.deterministic:
            argv.append("--deterministic")
        if c.draft_model:
            if w.epoch <= 1 or may_assist(self.view(), w.id):
                argv += ["--draft-model", c.draft_model]
                if w.epoch > 1 and self.features.speculation:
                    argv += ["--draft-first", "1" if self._draft_first(w) else "0"]
            elif self.features.speculation:
                log.info("worker %d reloads without its draft: %s serves other workers too", w.id,
                         c.device_for(w.id))
        if c.dtype:
            argv += ["--dtype", c.dtype]
        slot = self.slots[w.id]
        if slot is not None and slot[1] > 1:
            argv += ["--slot-index", str(slot[0]), "--slot-count", str(slot[1]), "--slot-ms", f"{c.slot_ms:g}"]
        if slot is not None and c.device_for(w.id) == "cpu":
            argv += ["--cpu-cores", ",".join(map(str, c.cpu_cores_of(w.id)))]
        return argv

    async def _spawn(self, w: WorkerRecord, initial: bool = False) -> None:
        w.epoch += 1
        w.fenced = False
        w.identity = None
        w.stats = {}
        w.alive = True
        w.last_hb = w.spawned_at = time.monotonic()
        w.heard = False
        w.phase_s = {"restart_at": time.time()}
        if self.cfg.cold_restart and not initial:
            covered = await asyncio.to_thread(evict_models, [self.cfg.model, self.cfg.draft_model])
            log.info("worker %d: %.2f GB of weight files evicted from the page cache before restart",
                     w.id, covered / 1e9)
        env = {"LUMEN_CLUSTER_SECRET": secret_to_hex(self.secret)}
        if self.slots[w.id] and self.cfg.device_for(w.id) == "cpu" and "OMP_WAIT_POLICY" not in os.environ:
            # a time-sliced CPU worker runs a thread per core in its slot; OpenMP's spinning barriers then
            # stall whenever another process holds a core (the gateway, a load client): 2.7 s decode steps
            # against 0.09 s with passive waits on the 2-core box (docs/benchmarks.md, 2026-12-06)
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        spec = WorkerSpec(w.id, w.epoch, self._worker_argv(w), env=env)
        handle = await self.launcher.start(spec)
        w.pid = handle.pid
        w.host, w.node = handle.host, handle.node
        M.WORKER_STATE.labels(worker=str(w.id)).set(0)

    async def _restart_later(self, w: WorkerRecord) -> None:
        # back off when a worker dies again and again (e.g. killed during its own reload)
        delay = min(self.cfg.restart_backoff_s * (2 ** max(0, w.restarts - 1)), 10.0) if w.restarts > 1 else 0
        await asyncio.sleep(delay)
        if self._stopping or w.state != WorkerState.DOWN:
            return
        M.RESTARTS.labels(worker=str(w.id)).inc()
        await self._spawn(w)

    # ------------------------------------------------------------------ messaging
    def _send(self, w: WorkerRecord, type_: str, body: dict, frames=()) -> bool:
        if w.identity is None or self.router is None:
            return False
        body = dict(body, to_ep=w.epoch)
        return self.router.send(w.identity, type_, body, frames)

    async def _recv_loop(self) -> None:
        while True:
            got = await self.router.recv()
            if got is None:
                continue
            identity, msg = got
            try:
                self._handle(identity, msg)
            except Exception:  # a bug in one handler must not take the controller down
                log.exception("error handling %s from %s", msg.type, msg.src)

    def _sender(self, msg: Message) -> WorkerRecord | None:
        """The worker record a message comes from, if it is the current incarnation."""
        name = msg.src.split(".", 1)[0]
        if not name.startswith("w") or not name[1:].isdigit():
            return None
        w = self.workers.get(int(name[1:]))
        if w is None or msg.epoch != w.epoch or w.fenced:
            self._stale(msg.src, msg.epoch)
            return None
        return w

    def _stale(self, src: str, epoch: int) -> None:
        """A message from an incarnation that is not the current one: counted, and fenced."""
        self.stale_messages += 1
        M.STALE_MESSAGES.inc()
        self._fence_older(src, epoch)

    def _fence_older(self, src: str, epoch: int) -> None:
        """An older incarnation that resumed is told to exit (fencing, DESIGN.md invariant 6). Also for
        messages the transport itself dropped as from an older epoch than it has seen from `src` (counted
        there, as transport drops): once the new incarnation has spoken, the old one's messages never
        reach `_sender`."""
        name = src.split(".", 1)[0]
        w = self.workers.get(int(name[1:])) if name.startswith("w") and name[1:].isdigit() else None
        if w is not None and epoch < w.epoch:
            asyncio.get_running_loop().create_task(self.launcher.kill(w.id, epoch))

    def _handle(self, identity: bytes, msg: Message) -> None:
        w = self._sender(msg)
        if w is None:
            return
        now = time.monotonic()
        w.last_hb = now
        w.heard = True
        t = msg.type
        if t == "HELLO":
            w.identity = identity
            w.data_addr = msg.body["data_addr"]
            w.kv_addr = msg.body["kv_addr"]
            w.pid = msg.body["pid"]
            w.device = msg.body["device"]
            log.info("worker %d epoch %d: pid %d on %s, data at %s", w.id, w.epoch, w.pid, w.device, w.data_addr)
        elif t == "HB":
            stats = _clean_stats(msg.body["stats"])
            self._count_spec(w, stats)
            w.stats = stats
        elif t == "STATE":
            self._on_state(w, msg.body["state"], _clean_stats(msg.body.get("info") or {}, numbers_only=True))
        elif t == "OUT":
            self._on_output(w, msg)
        elif t == "CKPT":
            for rid, n in msg.body["valid"].items():
                r = self.requests.get(rid) if isinstance(rid, str) else None
                c = r.copy_on(w) if r is not None else None
                if c is not None and isinstance(n, int):
                    c.valid_pages = max(0, n)
        elif t == "RESERVED":
            self._on_reserved(w, msg.body["req"], msg.body["gen"], bool(msg.body["ok"]))

    def _count_spec(self, w: WorkerRecord, stats: dict) -> None:
        for key, counter in (("spec_drafts", M.SPEC_DRAFTS), ("spec_draft_tokens", M.SPEC_DRAFT_TOKENS),
                             ("spec_accepted_tokens", M.SPEC_ACCEPTED)):
            new, old = stats.get(key, 0), w.stats.get(key, 0)
            if isinstance(new, (int, float)) and isinstance(old, (int, float)) and new > old:
                counter.inc(new - old)
        rate = stats.get("spec_acceptance")
        if isinstance(rate, (int, float)) and stats.get("spec_draft_tokens"):
            M.SPEC_ACCEPTANCE.labels(worker=str(w.id)).set(rate)

    def _on_state(self, w: WorkerRecord, state: str, info: dict) -> None:
        for k, v in info.items():
            if isinstance(v, (int, float)):
                w.phase_s[k] = v
                if k.endswith("_s") and w.epoch > 1:
                    M.RECOVERY_PHASE.labels(phase=k[:-2]).observe(v)
        try:
            new = WorkerState(state)
        except ValueError:
            return
        old, w.state = w.state, new
        M.WORKER_STATE.labels(worker=str(w.id)).set(list(WorkerState).index(new))
        log.info("worker %d epoch %d: %s -> %s %s", w.id, w.epoch, old.value, new.value,
                 {k: round(v, 3) for k, v in info.items() if isinstance(v, float)})
        if new == WorkerState.SERVING:
            w.phase_s["serving_at"] = time.time()  # wall clock, as restart_at: a bench maps it onto its run
            if self.pending:
                waiting, self.pending = self.pending, []
                for _, r, dead_id in waiting:
                    if not r.done:
                        self._dispatch([r], dead_id)
            if w.down_since is not None:
                M.RECOVERY_SECONDS.observe(time.monotonic() - w.down_since)
                w.down_since = None
            w.restarts = 0
            self._ready.set()
        if new == WorkerState.LOADING_DRAFT and info.get("draft_ready"):
            w.draft_ready = True
            if w.partner is None and self.features.speculation:
                self._try_pair(w, self._assist_gains())
        if new in (WorkerState.SWITCHING, WorkerState.DOWN, WorkerState.SERVING):
            w.draft_ready = False
        if new == WorkerState.SWITCHING:
            self._unpair(w)  # the draft is released: its partner decodes alone again

    # ------------------------------------------------------------------ requests
    def view(self) -> ClusterView:
        workers = []
        for w in self.workers.values():
            waiting = running = 0
            for r in self.requests.values():
                if r.executor == w.id and not r.done:
                    if not r.started:
                        waiting += 1
                    else:
                        running += 1
            workers.append(WorkerView(
                id=w.id, state=w.state, epoch=w.epoch, alive=w.alive, waiting=waiting, running=running,
                q_wait_s=_num(w.stats, "q_wait_s"), ckpt_reserved_bytes=w.ckpt_reserved,
                ckpt_budget_bytes=self.cfg.ckpt_budget_bytes, h2d_bytes_per_s=self.cfg.h2d_bytes_per_s,
                node=self.domain_of(w), partner=w.partner, accelerator=self._accelerator(w.id)))
        return ClusterView(tuple(workers), lam=self.cfg.lam)

    def domain_of(self, w: WorkerRecord) -> str | None:
        """w's failure domain: its --domains label, else its node (Ray's node id), else None (its own)."""
        return self.cfg.domain_label(w.id) or w.node or self.cfg.node_of(w.id)

    def _accelerator(self, worker_id: int) -> str | None:
        if not self.cfg.device_for(worker_id).startswith("cuda"):
            return None  # CPU workers each use their own threads
        device = self.cfg.share_device(worker_id)
        # a fixed MPS share or a time slot of its own: as good as a GPU of its own for a restarting worker
        # (under slots its slot stays empty while it reloads, so a draft there takes nothing from others)
        return f"{device}/share{worker_id}" if self.cfg.gpu_share_fixed or self.slots[worker_id] else device

    def in_flight(self) -> int:
        return sum(1 for r in self.requests.values() if not r.done)

    def serving_workers(self) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.state == WorkerState.SERVING]

    def submit(self, request_id: str, prompt_ids: list[int], params) -> RequestState:
        if self.in_flight() >= self.cfg.max_pending:
            M.REJECTED.labels(reason="busy").inc()
            raise ClusterBusy(f"{self.in_flight()} requests in flight; the limit is {self.cfg.max_pending}")
        target = route_new(self.view())
        if target is None:
            M.REJECTED.labels(reason="no_worker").inc()
            raise ClusterUnavailable("no worker is serving right now; retry shortly")
        r = RequestState(request_id, list(prompt_ids), params, time.monotonic())
        self.requests[request_id] = r
        self._assign(r, self.workers[target], restore=False)
        return r

    def _assign(self, r: RequestState, w: WorkerRecord, restore: bool) -> None:
        r.executor, r.exec_epoch = w.id, w.epoch
        r.needs_placement, r.started = True, False
        context = r.prompt_ids + r.generated
        tags: list[bytes] = []
        restore_pages = 0
        if restore and r.copy_on(w) is not None:
            # tags come from the gateway's own history: a page the holder has is used only if its tag
            # matches what this request's tokens really were (DESIGN.md invariant 4)
            n_pages = max(0, (len(context) - 1) // self.cfg.block_size)
            tags = page_tags(context[:n_pages * self.cfg.block_size], self.cfg.block_size)
            assert all(len(t) == TAG_BYTES for t in tags)
            restore_pages = n_pages
            M.RESTORES.inc()
        body = {"req": r.id, "n_prompt": len(r.prompt_ids), "params": sampling_params_to_wire(r.params),
                "restore_pages": restore_pages}
        if not self._send(w, "ADD", body, [ints_frame(context), b"".join(tags)]):
            log.warning("could not send request %s to worker %d", r.id, w.id)

    def abort(self, request_id: str) -> None:
        """Client went away (or a stop string matched): free the request everywhere."""
        r = self.requests.get(request_id)
        if r is None or r.done:
            return
        r.done = True
        if r.executor is not None:
            self._send(self.workers[r.executor], "ABORT", {"req": r.id})
        self._release_copies(r)
        self.requests.pop(request_id, None)

    def finished(self, request_id: str) -> None:
        """The gateway has delivered the last event of a request."""
        self.requests.pop(request_id, None)

    def _fail(self, r: RequestState, status: int, message: str) -> None:
        r.done = True
        self._release_copies(r)
        M.REQUEST_ERRORS.labels(status=str(status)).inc()
        r.events.put_nowait(("error", status, message))

    def _on_output(self, w: WorkerRecord, msg: Message) -> None:
        ids = frame_ints(msg.frames[0])
        pos = 0
        now = time.monotonic()
        for rid, n, finish in msg.body["items"]:
            if not isinstance(rid, str) or not isinstance(n, int) or n < 0 or pos + n > len(ids):
                return
            toks = ids[pos:pos + n]
            pos += n
            r = self.requests.get(rid)
            if r is None or r.done or r.executor != w.id or r.exec_epoch != w.epoch:
                continue  # a stale or aborted request's tokens are not the client's
            if toks:
                r.started = True
                if r.first_token_at is None:
                    r.first_token_at = now
                r.generated.extend(toks)
                # the worker rides with its tokens: r.executor may have moved on by the time the gateway reads them
                r.events.put_nowait(("tokens", toks, w.id))
                if r.needs_placement:
                    r.needs_placement = False
                    self._place_checkpoint(r, w)
            if finish and str(finish).startswith("error:"):
                log.error("request %s failed on worker %d: %s", rid, w.id, finish)
                self._fail(r, 500, f"the worker could not run the request: {finish[6:]}")
            elif finish:
                r.done = True
                self._release_copies(r)
                r.events.put_nowait(("finish", str(finish)))

    # ------------------------------------------------------------------ checkpoints
    def _place_checkpoint(self, r: RequestState, executor: WorkerRecord) -> None:
        """Choose r's holders (K of them: `--ckpt-replicas`) and reserve on each; the executor learns a
        holder only once it confirms the reservation (RESERVED), so no page reaches a holder that cannot
        store it yet. (Sent together, a fast executor's first burst beat the RESERVE that the holder's
        engine thread reads between steps: on an H200 only 4% of the pages were restorable.)"""
        if self.features.checkpointing is None:
            return
        self._release_copies(r)
        s = checkpoint_reservation(len(r.prompt_ids), r.params.max_tokens, self.cfg.kv_bytes_per_token,
                                   self.cfg.block_size)
        r.replicas = self._replicas_for(r, executor, s)
        self._add_copies(r, executor, s)

    def _replicas_for(self, r: RequestState, executor: WorkerRecord, s: int) -> int:
        """K for r (policy.ReplicaRule). Under auto its inputs come from the executor's fitted step-time
        model: the recompute cost is one prefill of r's whole context, the lifetime its remaining output
        at the executor's decode step now; an executor without a model yet (its first seconds) gives 1."""
        if self.replica_rule.replicas != "auto":
            return int(self.replica_rule.replicas)
        model, load = assist_pricing.step_model(executor.stats), assist_pricing.partner_load(executor.stats)
        if model is None or load is None:
            return 1
        context = len(r.prompt_ids) + r.params.max_tokens
        recompute = model(context, 0, 0.0)
        d = max(1, load.decoding)
        step = model(0, d, load.context_tokens)
        life = max(0, r.params.max_tokens - len(r.generated)) * step
        return self.replica_rule.k_for(self.view(), recompute, life, s, self.cfg.ckpt_net_bytes_per_s)

    def _add_copies(self, r: RequestState, executor: WorkerRecord, s: int) -> None:
        """Reserve the copies r lacks (of r.replicas) on holders that keep none of it yet."""
        want = r.replicas - len(r.copies)
        if want <= 0:
            return
        hs = place_checkpoints(self.view(), self.policy, executor.id, s, want, [c.holder for c in r.copies])
        if not hs and not r.copies:
            self._count_unprotected()
        for h in hs:
            holder = self.workers[h]
            holder.ckpt_reserved += s
            self._reserve_gen += 1
            r.copies.append(CkptCopy(h, holder.epoch, s, self._reserve_gen))
            self._send(holder, "RESERVE", {"req": r.id, "bytes": s, "owner": executor.id, "gen": self._reserve_gen})

    def _send_holders(self, r: RequestState) -> None:
        """Tell r's executor the confirmed copies it streams to, first copy first (the whole list)."""
        ex = self.workers.get(r.executor) if r.executor is not None else None
        if ex is None or ex.epoch != r.exec_epoch or not ex.alive:
            return  # being recovered: holders are chosen again once it runs
        holders = [[c.holder, self.workers[c.holder].kv_addr] for c in r.copies if c.confirmed]
        self._send(ex, "HOLDER", {"req": r.id, "holders": holders})

    def _on_reserved(self, holder: WorkerRecord, rid: str, gen: int, ok: bool) -> None:
        """A holder's answer to RESERVE: the executor streams to it too, or the copy is dropped. An
        answer to a RESERVE since superseded (the request finished, moved or got other holders)
        changes nothing: its RELEASE is on its way to the holder after the RESERVE."""
        r = self.requests.get(rid)
        c = r.copy_on(holder) if r is not None and not r.done else None
        if c is None or c.gen != gen:
            return
        if not ok:  # the holder's own budget check refused (its view and ours can differ briefly)
            log.warning("worker %d refused a checkpoint copy of request %s", holder.id, rid)
            holder.ckpt_reserved = max(0, holder.ckpt_reserved - c.reservation)
            r.copies.remove(c)
            if not r.copies:
                self._count_unprotected()
            return
        c.confirmed = True
        self._send_holders(r)

    def _count_unprotected(self) -> None:
        self.unprotected += 1
        M.UNPROTECTED.inc()

    def _release_copy(self, r: RequestState, c: CkptCopy) -> None:
        holder = self.workers[c.holder]
        if holder.epoch == c.epoch:
            holder.ckpt_reserved = max(0, holder.ckpt_reserved - c.reservation)
            self._send(holder, "RELEASE", {"req": r.id})
        r.copies.remove(c)

    def _release_copies(self, r: RequestState) -> None:
        for c in list(r.copies):
            self._release_copy(r, c)

    # ------------------------------------------------------------------ failures
    async def _on_process_exit(self, worker_id: int, epoch: int, returncode: int | None) -> None:
        w = self.workers.get(worker_id)
        if w is None or epoch != w.epoch or self._stopping:
            return
        w.alive = False
        self._declare_dead(w, f"process exited ({returncode})")

    async def _monitor_loop(self) -> None:
        interval = self.cfg.hb_interval_s
        budget = interval * self.cfg.hb_misses
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            lag, last = now - last - interval, now
            try:
                if lag > interval:
                    # this loop was starved itself: heartbeats may be queued unread; judge next round
                    for w in self.workers.values():
                        w.last_hb = max(w.last_hb, now - interval)
                else:
                    self._check_workers(now, budget)
                    self._expire_pending(now)
                self._refresh_gauges()
                if now - self._pairs_reviewed_at >= 1.0:
                    self._pairs_reviewed_at = now
                    self._review_pairs()
            except Exception:  # failure detection must outlive any bug in one round of it
                log.exception("error in the failure detector")

    def _check_workers(self, now: float, budget: float) -> None:
        for w in self.workers.values():
            if w.fenced or not w.alive or self._stopping:
                continue
            # before its first word a starting process is covered by the sentinel (a crash) and
            # by a start-up deadline (a hang while importing or loading)
            # a loading or assisting worker holds no requests (an assisting one only proposes, and
            # its partner never waits for it): a slow verdict costs little there, a false one a whole
            # reload, so only serving workers are held to the tight budget (a SIGKILL is seen at
            # once through the process sentinel either way)
            limit = budget if w.state == WorkerState.SERVING else max(budget, self.cfg.loading_hb_timeout_s)
            if w.heard and now - w.last_hb > limit:
                self._declare_dead(w, f"no heartbeat for {now - w.last_hb:.2f}s")
            elif _num(w.stats, "loop_age_s") > self.cfg.loop_stall_s:
                # the heartbeat thread lives but the engine loop is stuck (a deadlock, a hung device)
                self._declare_dead(w, f"engine loop stalled for {_num(w.stats, 'loop_age_s'):.0f}s")
            elif not w.heard and now - w.spawned_at > self.cfg.startup_timeout_s:
                self._declare_dead(w, f"silent for {now - w.spawned_at:.0f}s after start")

    def _expire_pending(self, now: float) -> None:
        if not self.pending:
            return
        keep = []
        for since, r, dead_id in self.pending:
            if r.done:
                continue
            if now - since > self.cfg.pending_timeout_s:
                self._fail(r, 503, "no worker came back in time to recover the request")
            else:
                keep.append((since, r, dead_id))
        self.pending = keep

    def _declare_dead(self, w: WorkerRecord, reason: str) -> None:
        if self._stopping or w.fenced:
            return
        w.fenced = True
        log.warning("worker %d epoch %d declared dead: %s", w.id, w.epoch, reason)
        M.FAILURES.labels(worker=str(w.id)).inc()
        w.state = WorkerState.DOWN
        w.identity = None
        w.ckpt_reserved = 0
        w.down_since = w.down_since or time.monotonic()
        M.WORKER_STATE.labels(worker=str(w.id)).set(0)
        old_epoch = w.epoch
        # fence: kill the incarnation (a hung one may otherwise come back); its messages are ignored
        loop = asyncio.get_running_loop()
        loop.create_task(self._fence_and_kill(w.id, old_epoch))
        self._unpair(w)
        self._recover_from(w)
        w.restarts += 1
        w.restart_task = loop.create_task(self._restart_later(w))

    async def _fence_and_kill(self, worker_id: int, epoch: int) -> None:
        if self.cfg.fence_grace_s > 0:
            await asyncio.sleep(self.cfg.fence_grace_s)
        await self.launcher.kill(worker_id, epoch)

    def _recover_from(self, dead: WorkerRecord) -> None:
        # copies that lived on the dead worker are gone; the requests still running elsewhere stop
        # streaming to it now and get the missing copies (re-protection) on other holders
        for r in self.requests.values():
            lost = [c for c in r.copies if c.holder == dead.id]
            if not lost or r.done:
                continue
            for c in lost:
                r.copies.remove(c)  # (the dead worker's reservations were dropped with it)
            if r.executor is not None and r.executor != dead.id:
                self._send_holders(r)
                if r.first_token_at is not None and not r.needs_placement:
                    M.REPROTECTED.inc()
                    self._add_copies(r, self.workers[r.executor], lost[0].reservation)
        interrupted = [r for r in self.requests.values() if r.executor == dead.id and not r.done]
        if not interrupted:
            return
        M.INTERRUPTED.inc(len(interrupted))
        for r in interrupted:
            r.interrupts += 1
            r.executor = None
        self._dispatch(interrupted, dead.id)

    def _dispatch(self, interrupted: list[RequestState], dead_id: int) -> None:
        """Recovery dispatch (policy.dispatch_interrupted) of requests whose executor died, each from its
        best surviving copy (policy.restore_source: the live holder with the longest valid prefix). The
        other copies stay until the request runs again (then placement releases them), so a restore whose
        holder dies before it starts falls back on the next copy, not on a recompute."""
        view = self.view()
        bs = self.cfg.block_size
        chosen: list[CkptCopy | None] = []
        for r in interrupted:
            # a copy with no valid page restores nothing: that is a recompute (e.g. one placed after its
            # executor had died unseen), counted as one
            copies = [c for c in r.copies if c.confirmed and c.valid_pages > 0]
            h = restore_source(view, [(c.holder, min(c.valid_pages * bs, r.context_len), c.epoch) for c in copies])
            chosen.append(next((c for c in copies if c.holder == h), None))
        views = [RequestView(id=i, executor=dead_id, holder=c.holder if c else None,
                             reservation_bytes=c.reservation if c else 0,
                             valid_prefix_tokens=min(c.valid_pages * bs, r.context_len) if c else 0,
                             total_tokens=r.context_len, holder_epoch=c.epoch if c else None)
                 for i, (r, c) in enumerate(zip(interrupted, chosen, strict=True))]
        try:
            assignments = dispatch_interrupted(view, self.policy, views)
        except NoServingWorker:
            assignments = []
        if not assignments:
            if any(w.alive and not w.fenced for w in self.workers.values()):
                now = time.monotonic()
                self.pending.extend((now, r, dead_id) for r in interrupted)
                log.warning("%d interrupted requests wait for a worker to finish reloading", len(interrupted))
                return
            for r in interrupted:
                self._fail(r, 503, "every worker has failed; the request could not be recovered")
            return
        for a in assignments:
            r, c = interrupted[a.request_id], chosen[a.request_id]
            target = self.workers[a.target]
            restore = a.mode == "restore"
            if not restore:
                M.RECOMPUTE_TOKENS.inc(r.context_len)
            target.recovered_here["restored" if restore else "recomputed"] += 1
            target.recovered_here["tokens"] += r.context_len
            log.info("request %s: %s on worker %d (%d tokens, %d checkpointed)", r.id, a.mode, target.id,
                     r.context_len, c.valid_pages * self.cfg.block_size if c else 0)
            self._assign(r, target, restore=restore)
            if restore and c is not None:
                # the holder consumes its pages: that copy ends (its store frees it at the restore)
                target.ckpt_reserved = max(0, target.ckpt_reserved - c.reservation)
                r.copies.remove(c)

    # ------------------------------------------------------------------ assisted recovery
    def _assist_gains(self) -> dict[int, float] | None:
        return assist_pricing.gains(((p.id, p.stats) for p in self.serving_workers()),
                                    self.cfg.spec_acceptance, self.cfg.spec_k)

    def _try_pair(self, w: WorkerRecord, gains: dict[int, float] | None) -> None:
        """Pair by gain (policy.pick_partner_by_gain on `gains`, from `_assist_gains`): the survivor that
        assistance would gain most on, none while no one would gain (asked again by `_review_pairs`).
        Before every survivor has a fitted step-time model (gains None), by waiting time
        (policy.pick_partner)."""
        view = self.view()
        partner = pick_partner(view, w.id) if gains is None else pick_partner_by_gain(view, w.id, gains)
        if partner is None:
            if gains is not None and not w.waited_for_gain:
                w.waited_for_gain = True
                log.info("worker %d keeps its draft and waits: assisting gains nothing now (tokens/s by worker: %s)",
                         w.id, {k: round(v, 2) for k, v in gains.items()})
            return
        self._pair(w, self.workers[partner], None if gains is None else gains.get(partner))

    def _review_pairs(self) -> None:
        """Every second: pair drafters that wait for a partner, and move a drafter to another partner when
        the gain has moved there (policy.pick_partner_by_gain with its current partner)."""
        if not self.features.speculation:
            return
        drafters = [w for w in self.workers.values() if w.draft_ready and w.alive]
        if not drafters:
            return
        gains = self._assist_gains()  # from the workers' last stats: the same for every drafter this round
        for w in drafters:
            if w.partner is None and w.state == WorkerState.LOADING_DRAFT:
                self._try_pair(w, gains)
            elif w.partner is not None and w.state == WorkerState.ASSISTING and gains is not None:
                best = pick_partner_by_gain(self.view(), w.id, gains, current=w.partner,
                                            paired_for_s=time.monotonic() - w.paired_at)
                if best is not None and best != w.partner:
                    old = self.workers[w.partner]
                    old.partner = None
                    self._send(old, "ASSIST", {"role": "none", "peer": -1, "addr": "", "k": self.cfg.spec_k})
                    log.info("worker %d moves from assisting worker %d to worker %d (gain %.1f -> %.1f tokens/s)",
                             w.id, old.id, best, gains.get(old.id, 0.0), gains[best])
                    self._pair(w, self.workers[best], gains[best])

    def _draft_first(self, w: WorkerRecord) -> bool:
        """--draft-first for a restart under speculation (cfg.draft_first): 'always' (the paper) and
        'never' as told, 'auto' as priced by `_draft_first_pays`."""
        if self.cfg.draft_first == "always":
            return True
        if self.cfg.draft_first == "never":
            return False
        return self._draft_first_pays(w)

    def _draft_first_pays(self, w: WorkerRecord) -> bool:
        """For a restart whose draft is not resident in host memory (the worker checks): whether its
        disk read before the target's pays (policy.draft_phase_pays), from what the survivors would
        gain now and what this worker served before, at the disk rate of its last load."""
        gains = self._assist_gains()
        if gains is None:
            # no survivor can price a position yet (their batches never changed size: light load, where
            # assistance pays and a later return delays no queue): read it, as the paper does
            return True
        disk_s = w.phase_s.get("disk_to_host_s")
        target = assist_pricing.weight_bytes(_model_dir(self.cfg.model))
        draft = assist_pricing.weight_bytes(_model_dir(self.cfg.draft_model))
        bps = target / disk_s if isinstance(disk_s, (int, float)) and disk_s > 0 and target else 0.0
        return assist_pricing.draft_first(max(gains.values(), default=0.0), draft, target, bps,
                                          assist_pricing.plain_rate(w.stats))

    def _pair(self, w: WorkerRecord, p: WorkerRecord, gain: float | None = None) -> None:
        w.partner, p.partner = p.id, w.id
        w.paired_at = time.monotonic()
        self._send(w, "ASSIST", {"role": "drafter", "peer": p.id, "addr": p.data_addr, "k": self.cfg.spec_k})
        self._send(p, "ASSIST", {"role": "verifier", "peer": w.id, "addr": w.data_addr, "k": self.cfg.spec_k})
        # the price is per second of the partner's step time (policy.pairing_gain): under time slots the
        # partner steps in one slot of each cycle, so per wall second it is about that share of it
        log.info("worker %d assists worker %d (%s)", w.id, p.id,
                 "by waiting time: no step-time model yet" if gain is None
                 else f"priced gain {gain:.1f} tokens per second of its step time")

    def _unpair(self, w: WorkerRecord) -> None:
        if w.partner is None:
            return
        p = self.workers[w.partner]
        w.partner = None
        if p.partner == w.id:
            p.partner = None
            self._send(p, "ASSIST", {"role": "none", "peer": -1, "addr": "", "k": self.cfg.spec_k})
            if p.state == WorkerState.ASSISTING:  # a drafter whose partner died looks for another
                p.state = WorkerState.LOADING_DRAFT
                self._try_pair(p, self._assist_gains())

    # ------------------------------------------------------------------ introspection
    def _refresh_gauges(self) -> None:
        running = waiting = 0
        for r in self.requests.values():
            if not r.done:
                if not r.started:
                    waiting += 1
                else:
                    running += 1
        M.RUNNING.set(running)
        M.WAITING.set(waiting)
        usages = [_num(w.stats, "kv_usage") for w in self.serving_workers()]
        M.KV_USAGE.set(sum(usages) / len(usages) if usages else 0.0)
        M.CKPT_RESERVED.set(sum(w.ckpt_reserved for w in self.workers.values()))
        M.CKPT_STORED.set(sum(_num(w.stats, "ckpt_stored_bytes") for w in self.workers.values()))
        for w in self.workers.values():
            M.HB_LATE_MAX.labels(worker=str(w.id)).set(_num(w.stats, "hb_late_max_ms") / 1000)
            if "slot_overruns" in w.stats:
                M.SLOT_OVERRUNS.labels(worker=str(w.id)).set(_num(w.stats, "slot_overruns"))
                M.SLOT_OVERRUN_SECONDS.labels(worker=str(w.id)).set(_num(w.stats, "slot_overrun_s"))
        # messages dropped by the transport (bad MAC, replay, malformed, ...): the controller's own socket,
        # and each worker's sockets as its last heartbeat reported them
        for reason, n in self.codec.stats.items():
            M.TRANSPORT_DROPS.labels(process="controller", reason=reason).set(n)
        for w in self.workers.values():
            for reason in self.codec.stats:
                if f"drop_{reason}" in w.stats:
                    M.TRANSPORT_DROPS.labels(process=f"worker{w.id}", reason=reason).set(
                        _num(w.stats, f"drop_{reason}"))

    def cluster_json(self) -> dict:
        now = time.monotonic()
        workers = []
        for w in self.workers.values():
            workers.append({
                "id": w.id, "state": w.state.value, "epoch": w.epoch, "alive": w.alive, "pid": w.pid,
                "host": w.host if w.node else (
                    "127.0.0.1" if self.cfg.host in ("127.0.0.1", "localhost") else self.cfg.host),
                "node": w.node, "domain": self.domain_of(w),
                "device": w.device or self.cfg.device_for(w.id), "slot": self.slots[w.id], "data_addr": w.data_addr, "kv_addr": w.kv_addr,
                "last_heartbeat_ms": round((now - w.last_hb) * 1000, 1), "partner": w.partner,
                "load": {k: w.stats.get(k) for k in ("num_waiting", "num_running", "q_wait_s", "kv_usage")},
                "ckpt_reserved_bytes": w.ckpt_reserved, "stats": w.stats, "phases_s": w.phase_s,
                "recovered_here": dict(w.recovered_here), "restarts_in_a_row": w.restarts})
        bs = self.cfg.block_size
        requests = [{"id": r.id, "executor": r.executor, "holder": r.holder,
                     "holders": [{"worker": c.holder, "confirmed": c.confirmed, "valid_ckpt_tokens": c.valid_pages * bs}
                                 for c in r.copies],
                     "prompt_tokens": len(r.prompt_ids), "generated_tokens": len(r.generated),
                     "valid_ckpt_tokens": max((c.valid_pages for c in r.copies), default=0) * bs,
                     "interrupts": r.interrupts} for r in self.requests.values() if not r.done]
        slots = {"device_share": self.cfg.device_share, "slot_ms": self.cfg.slot_ms if self.cfg.device_share == "slots" else None}
        return {"policy": self.policy.value, "model": self.cfg.served_model_name, "workers": workers, **slots,
                "ckpt_replicas": self.replica_rule.replicas,
                "control_addr": self.router.address if self.router else None,
                "hb_deadline_s": self.cfg.hb_interval_s * self.cfg.hb_misses,
                "requests": requests, "in_flight": len(requests), "stale_messages": self.stale_messages,
                "unprotected_requests": self.unprotected, "transport_drops": dict(self.codec.stats)}


def _clean_stats(d: dict, numbers_only: bool = False) -> dict:
    """A worker's stats or state info as the controller may keep them: string keys; finite numbers (and,
    unless numbers_only, bounded strings). The schema bounds the size of these maps but not their values:
    a NaN, a bytes key or a list from a buggy or mismatched worker would otherwise break the failure
    detector, routing or the JSON of /lumen/cluster long after the message was accepted."""
    out = {}
    for k, v in d.items():
        if not isinstance(k, str) or len(k) > 64:
            continue
        if isinstance(v, int | float) and math.isfinite(v):
            out[k] = v
        elif isinstance(v, str) and not numbers_only:
            out[k] = v[:256]
    return out


def _num(stats: dict, key: str) -> float:
    v = stats.get(key, 0.0)
    return float(v) if isinstance(v, int | float) else 0.0


def _model_dir(spec: str | None):
    if not spec:
        return ""
    try:
        return resolve_model_dir(spec)
    except (OSError, ValueError):
        return ""
