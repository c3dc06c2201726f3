"""The discrete-event simulator: one heapq event loop over workers that batch like the real
engine, with checkpointing, failures, recovery and assisted reload.

Every decision -- routing, checkpoint placement, recovery dispatch, pairing, worker state
transitions -- is a call into `lumen.policy` (through the module object `P`, so a test can spy on
or replace it). Nothing here re-decides anything.

Model of one worker (the live engine's scheduler, iteration level):
- Each iteration runs every decoding request (1 position, or K+1 while a partner's draft
  proposals are verified in the same pass) plus prefill chunks filling the rest of a token
  budget (`chunk_tokens`): first the requests already prefilling (FCFS), then new admissions
  from the waiting queue while budget, the batch cap and KV capacity allow. A request is
  admitted only if its whole context (prompt + output) fits the free KV: no preemption is
  modelled.
- The prefill chunk that finishes a prompt produces the first token; each decode iteration then
  produces 1 token per request (g > 1 in expectation while assisted).
- Epochs: when the batch composition does not change between iterations (decode only; or one
  long prompt that takes the whole budget), the worker jumps over n identical iterations at
  once: n runs up to the next request finishing. The step time of those n iterations is
  evaluated at the epoch's middle context length: exact for a cost that is affine in the
  context (the fitted model), a close approximation for the roofline's max(). An external
  change (arrival, restore ready, assist start/stop) truncates the epoch after the iteration in
  flight, as continuous batching would take the change at the next iteration boundary.
- Generated tokens are tracked lazily with a per-worker token clock G (advanced by g per
  decode iteration) and a heap of finish clocks, so an epoch costs O(log n), not O(batch).

Checkpoint streaming: when a request's prefill completes, `P.place_checkpoint` picks a holder
and reserves s_r there (released when the request finishes, is interrupted, or its holder dies).
The executor's NIC (`net_gbps`) is a FIFO: the prompt's full pages go first (the valid prefix
grows linearly while they transfer), then decode pages as they fill, after half an export interval
on average (`ckpt_export_interval_ms`: the live worker exports at most that often). At a failure, the valid
prefix of a request is the pages fully transferred by the failure time. Streaming is off the
critical path (no step-time cost), as in the paper's measurement.

Failures: the worker stops at once (the iteration in flight is lost); the controller learns at
`detect_s`. Requests routed to it in between wait there and are interrupted with the rest.
Workers failing at the same instant are detected and dispatched together. Interrupted requests
go through `P.dispatch_interrupted`; a restore waits for prefix_bytes / B_h2d on the target
(a per-worker FIFO) and then prefills only the tail; a recompute prefills prompt + generated
tokens. If the holder dies, the requests it protected get a new holder (`P.place_checkpoint`)
and their pages are streamed again from scratch (re-protection).

K copies (`ckpt_replicas` > 1 or "auto"; issue 25, docs/replicas.md): `P.place_checkpoints` picks K
distinct holders spread over failure domains (`domains`, else `nodes`; the table's node column), K
from `P.choose_replicas` under "auto". Every holder gets every page: each copy reserves s_r at its
holder and its pages join the executor's NIC FIFO (a copy's prompt burst after the previous one's;
decode pages once per copy), so stream bytes count each copy. `ckpt_stream_order`: "fifo" (one
queue for all copies' pages), or "primary-first" (a request's first copy is sent as if no later copy
existed; later copies get what is left: their pages wait for every page queued before them, first
copies' included, a lower bound on strict priority that ignores first-copy pages arriving later). A recovery restores from
`P.restore_source` (the live holder with the longest valid prefix); when a holder dies only its copy
is lost, and the missing copies are placed again (`existing` = the surviving holders). K = 1 runs the
code path above unchanged (`place_checkpoint`, no new policy calls).

Reload: after `restart_s`, policies with speculation load the draft and assist a serving partner
while the target loads; policies without speculation read the target at once and sit idle. Two
rules (`SimConfig.spec_rule`):
- "goodput" (issue 24, the default): the draft is resident in host memory, so it costs only its
  host->device copy and the target's disk read starts at once (a cold draft, `draft_cached=False`,
  is read first only where `P.draft_phase_pays`, else the restart is plain). A worker with its draft
  pairs by `P.pick_partner_by_gain` on `P.pairing_gain` of each serving worker's load, again every
  `pair_interval_s` while drafts wait or assist (moving when the policy names another partner). Each
  epoch of an assisted partner asks `P.choose_spec_lengths` for K_r per decoding request (its load:
  decoding requests and context, pending prefill tokens, waiting and prefilling requests, the chunk
  budget): the step verifies D + sum(K_r) positions and commits mean_r expected_tokens(alpha, K_r)
  tokens per request.
- "fixed" (before issue 24): the draft is read from disk before the target (one disk; unless
  `draft_cached`), pairs with `P.pick_partner`, and the partner verifies K+1 positions per decoding
  request, committing (1-a^(K+1))/(1-a) tokens each in expectation.
Either way the tokens per step are scaled down when the draft round (max K_r draft steps) is slower
than the partner's step, since late proposals are dropped. The target reads from disk at
`disk_gbps`, then host->device (one PCIe link per GPU) and `warmup_s`.

Several workers on one device (`workers_per_device` > 1; worker i on device i % num_devices):
- "shared": they use the device freely. A step takes (1 + s*k) x its cost while k other workers of the
  device are stepping (the co-located slowdown above, grouped by device instead of node), with s the
  profile's measured `colocated_slowdown`, else 1 (the device's time divides evenly among the workers
  stepping on it). A dead, loading or idle worker steps on nothing, so the survivors speed up.
- "slots": time-division shares (`lumen.policy.slots`). Worker `index` of `count` starts each engine
  iteration only at `SlotSchedule.start_at(t, step_s)`, as the live worker does; a slot whose owner is
  dead, loading or idle stays empty, so each worker runs like a device of 1/count speed and losing one
  costs 1/count of the device. No co-located slowdown: one worker at a time has the whole device (a
  step longer than a slot overruns into the next owner's slot without slowing it: not modelled). An
  epoch of n iterations of dt each fills what is left of the current slot (as many as start_at
  allows), then m per later own slot (one cycle apart): `_slot_layout`, `_ep_end`, `_iter_start`; an
  iteration no slot can hold (dt >= slot) is planned alone. A change while the worker waits for its
  slot ends the epoch at once, so the iteration at the slot's start takes it (as the live worker
  schedules its batch when its wait ends). A restarting worker's device work also runs in its own
  slots only, as in the live worker: the target's host->device copy and the warm-up, the draft's
  catch-up prefill (`_slot_span`: divisible work), and its draft rounds count `count` x their cost
  against the partner's steps. Not gated: disk reads, the draft's weight copy, KV restores (the live
  worker does not gate them either). A worker alone on its device has no schedule (nor has the live
  one).
- Either way each worker holds its own weights, so the KV capacity from HBM is split among them, and
  `policy.may_assist` (given each worker's accelerator: the device, or its own slot of it) decides
  whether a restarting worker loads a draft, as the live controller does.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import lumen.policy.slots as slots
from lumen import policy as P
from lumen.metrics import RequestRecord
from lumen.metrics.records import with_worker
from lumen.metrics.targets import COUNT_KEYS
from lumen.policy import WorkerEvent as E
from lumen.policy import WorkerState as S
from lumen.workload import RequestSpec

from .config import FailurePlan, SimConfig, SimStats

# event kinds
(_EV_STEP, _EV_FAIL, _EV_DETECT, _EV_RESTART, _EV_DRAFT, _EV_HOST, _EV_READY, _EV_WAKE, _EV_ASSIST,
 _EV_PAIR) = range(10)
_EPS = 1e-9


class _Copy:
    """One checkpoint copy of a request: its holder (and the holder's epoch when placed), the bytes
    reserved there, its prompt burst on the executor's NIC (t0..t1, `burst` tokens) and, after the
    executor failed, the valid prefix the holder has (tokens)."""

    __slots__ = ("holder", "epoch", "res", "t0", "t1", "burst", "valid")

    def __init__(self, holder: int, epoch: int, res: int):
        self.holder = holder
        self.epoch = epoch
        self.res = res
        self.t0 = self.t1 = 0.0
        self.burst = 0
        self.valid = 0


class SimRequest:
    __slots__ = ("id", "arrival", "prompt", "output", "gen", "worker", "pf_total", "pf_done",
                 "first_token", "finish", "interrupted", "error", "copies", "k_want", "ready_at", "g0",
                 "kv_join", "kv_alloc", "decoding", "protected_once", "workers")

    def __init__(self, spec: RequestSpec):
        self.id = spec.req_id
        self.arrival = spec.arrival
        self.prompt = spec.prompt_tokens
        self.output = max(1, spec.output_tokens)
        self.gen = 0
        self.worker = -1
        self.pf_total = self.prompt
        self.pf_done = 0
        self.first_token: float | None = None
        self.finish: float | None = None
        self.interrupted = False
        self.error: str | None = None
        self.copies: list[_Copy] = []   # checkpoint copies (the paper: at most one)
        self.k_want = 0                  # copies this request gets (decided at its first placement)
        self.ready_at = 0.0
        self.g0 = 0.0
        self.kv_join = 0
        self.kv_alloc = 0
        self.decoding = False
        self.protected_once = False
        self.workers: list[int] | None = None  # the workers that produced its tokens (RequestRecord.workers)

    @property
    def holder(self) -> int | None:
        """The first copy's holder (the only one under K = 1), None if unprotected."""
        return self.copies[0].holder if self.copies else None


class SimWorker:
    """One simulated worker. The fields named like `lumen.policy.WorkerView`'s are mirrored into
    the simulator's `ClusterTable` (`Simulator._sync`) whenever they change, so every decision
    reads the current state without rebuilding 1,024 views per call."""

    __slots__ = (
        # mirrored into the ClusterTable the policy reads
        "id", "state", "epoch", "alive", "waiting", "running", "q_wait_s", "ckpt_reserved_bytes",
        "ckpt_budget_bytes", "h2d_bytes_per_s", "node", "partner",
        # failure domain (mirrored as the table's node column): `domains` if set, else the node
        "domain",
        # simulator state
        "crashed", "detect_at", "wq", "transit", "prefilling", "heap", "G", "S_dec", "kv_used",
        "kv_cap", "pending_pf", "busy", "ep_start", "ep_dt", "ep_n", "ep_token", "ep_chunks",
        "ep_g", "link_free_at", "link_all_free_at", "n_prim_dec", "h2d_free_at", "held", "assist_g", "assist_from", "draft_ready", "paired_at",
        "n_prot_dec", "sec_per_pf", "last_dt", "wake_pending", "ep_p", "ep_dpos", "ep_ctx0", "ep_grow",
        "ep_slow", "slow_counted",
        # the verify positions of the epoch (beyond one per decoding request) and its K histogram
        "ep_extra", "ep_khist",
        # device sharing: co-location group (node or device), slot schedule (None: no gating), wall
        # seconds per second of device time (count under slots), cached slot layout of the epoch
        "group", "slot", "stretch", "sl",
    )

    def __init__(self, wid: int, cfg: SimConfig, kv_cap: int):
        self.id = wid
        self.state = S.SERVING
        self.epoch = 0
        self.alive = True
        self.waiting = 0
        self.running = 0
        self.q_wait_s = 0.0
        self.ckpt_reserved_bytes = 0
        self.ckpt_budget_bytes = int(cfg.ckpt_budget_gb * 1e9)
        self.h2d_bytes_per_s = cfg.h2d_gbps * 1e9 * cfg.tp   # one PCIe link per GPU
        self.node = None if cfg.nodes is None else wid % cfg.nodes
        self.domain = cfg.domain_of(wid)
        self.group: int | None = None
        self.slot: slots.SlotSchedule | None = None
        self.stretch = 1.0
        self.sl: tuple | None = None
        self.partner: int | None = None
        self.crashed = False
        self.detect_at = math.inf
        self.kv_cap = kv_cap
        self.held: dict[int, SimRequest] = {}   # checkpoints this worker holds (by request id)
        self.link_free_at = 0.0       # NIC clock (fifo: all checkpoint pages; primary-first: first copies')
        self.link_all_free_at = 0.0   # primary-first: the clock of all pages, which the later copies wait for
        self.h2d_free_at = 0.0
        self.assist_g = 1.0          # tokens committed per decode iteration (> 1 while assisted)
        self.assist_from = math.inf  # assisted decoding starts at this time (draft caught up)
        self.draft_ready = False
        self.paired_at = 0.0          # when it last paired (as a drafter): the policy's minimum dwell
        self.sec_per_pf = 0.0
        self.last_dt = 0.0
        self.ep_token = 0
        self.wake_pending = False
        self.reset()

    def reset(self) -> None:
        """Empty the engine (at a crash: GPU state is gone)."""
        self.wq: deque[SimRequest] = deque()
        self.transit: list[tuple[float, int, SimRequest]] = []  # restores copying in (heap)
        self.prefilling: list[SimRequest] = []
        self.heap: list[tuple[float, int, SimRequest]] = []     # (finish clock, id, req)
        self.G = 0.0
        self.S_dec = 0.0
        self.kv_used = 0
        self.pending_pf = 0
        self.busy = False
        self.ep_slow = 1.0          # step-time factor from co-located busy workers (CPU hosts)
        self.slow_counted = False   # counted as busy in Simulator._node_busy
        self.ep_token += 1
        self.ep_chunks: list[tuple[SimRequest, int]] = []
        self.ep_extra = 0
        self.ep_khist: list[tuple[int, int]] | None = None
        self.n_prot_dec = 0     # copies of decoding requests (each streams every decode page)
        self.n_prim_dec = 0     # decoding requests with at least one copy (their first copies)
        self.waiting = 0
        self.running = 0
        self.q_wait_s = 0.0


@dataclass
class SimResult:
    policy: str
    records: list[RequestRecord]
    stats: SimStats
    failure_times: list[float]
    end_time: float


class Simulator:
    def __init__(self, cfg: SimConfig, workload: Sequence[RequestSpec], policy: str,
                 failures: FailurePlan | None = None, seed: int = 0):
        self.cfg = cfg
        self.policy = P.parse_policy(policy)
        self.feats = P.features(self.policy)
        self.cost = cfg.cost_model()
        self.draft_cost = cfg.draft_cost_model()
        self.kvb = cfg.shape.kv_bytes_per_token
        self.page = cfg.page_tokens
        self.net_bw = cfg.net_gbps * 1e9 / 8.0
        # a decode page waits for the next export: half an interval on average, exports spaced by it
        self.export_wait_s = cfg.ckpt_export_interval_ms / 2e3
        groups = cfg.device_groups()
        kv_caps = {c: cfg.kv_capacity_tokens(c) for c in {c for _, _, c in groups}}
        self.workers = [SimWorker(i, cfg, kv_caps[groups[i][2]]) for i in range(cfg.workers)]
        # co-located interference (CPU workers sharing one host's cores and memory bandwidth): a
        # step takes (1 + s*k) x the fitted time while k other workers of its node are stepping;
        # only with a cost model that measured s (`lumen profile --procs N`) and nodes configured.
        # Workers sharing a device freely ("shared"): the same, grouped by device, s = 1 if unmeasured.
        self.slowdown = float(getattr(self.cost, "colocated_slowdown", 0.0) or 0.0)
        self._node_busy: dict[int, int] = {}
        self._node_members: dict[int, list[SimWorker]] = {}
        self.shared_devices = cfg.workers_per_device > 1
        self.slot_s: float | None = None      # slot length where any worker is slot-gated
        if self.shared_devices and cfg.share_mode == "slots":
            slot_s = cfg.slot_s
            for w, (_, index, count) in zip(self.workers, groups, strict=True):
                if count > 1:
                    w.slot = slots.SlotSchedule(index, count, slot_s)
                    w.stretch = float(count)
                    self.slot_s = slot_s
        elif self.shared_devices:
            self.slowdown = self.slowdown or 1.0
            for w, (dev, _, count) in zip(self.workers, groups, strict=True):
                if count > 1:
                    w.group = dev
                    self._node_members.setdefault(dev, []).append(w)
        elif self.slowdown > 0 and cfg.nodes is not None:
            for w in self.workers:
                w.group = w.node
                self._node_members.setdefault(w.node, []).append(w)
        self.accelerators = [f"dev{d}" + (f"/slot{i}" if self.slot_s is not None else "") for d, i, _ in groups]
        self.table = P.ClusterTable(cfg.workers)
        self.view = self.table.view(cfg.lam)
        for w in self.workers:
            self._sync(w)
        self.reqs = [SimRequest(s) for s in sorted(workload, key=lambda s: (s.arrival, s.req_id))]
        self.by_id = {r.id: r for r in self.reqs}
        if len(self.by_id) != len(self.reqs):
            raise ValueError("duplicate req_id in workload")
        horizon = self.reqs[-1].arrival if self.reqs else 0.0
        self.fail_events = (failures or FailurePlan()).events(
            cfg.workers, seed, horizon, domains=[w.domain for w in self.workers])
        # K copies per request (issue 25): None under K = 1 (the paper's path, unchanged)
        self.multi = cfg.ckpt_replicas != 1
        self.prio = self.multi and cfg.ckpt_stream_order == "primary-first"
        self.replica_rule = P.ReplicaRule(
            cfg.ckpt_replicas, cfg.ckpt_replicas_max,
            P.FailureModel.from_mtbf(cfg.ckpt_worker_mtbf_s, cfg.ckpt_domain_mtbf_s),
            P.CopyPrice(cfg.ckpt_price_net, cfg.ckpt_price_mem))
        self.heap: list[tuple] = []
        self.seq = 0
        self.now = 0.0
        self.stats = SimStats()
        self.orphans: list[SimRequest] = []   # interrupted while no worker was SERVING
        self.parked: list[SimRequest] = []    # arrivals while no worker was SERVING
        self.done = 0
        self.k1 = cfg.k + 1
        self.E = cfg.expected_accepted()
        self.goodput = cfg.spec_rule == "goodput"
        self.pair_tick = False        # a pairing re-evaluation (_EV_PAIR) is scheduled
        w = cfg.shape.weight_bytes
        d = cfg.draft_shape.weight_bytes
        pcie = cfg.h2d_gbps * 1e9 * cfg.tp
        disk = cfg.disk_gbps * 1e9
        self.t_target_h2d = w / pcie + cfg.warmup_s
        self.t_plain_reload = w / disk
        self.t_draft_disk = d / disk
        # one SSD per worker: the draft is read first, then the target (unless the draft is kept
        # in host memory, when only its host->device copy remains and the target's read starts at once)
        d_disk = 0.0 if cfg.draft_resident else d
        self.t_draft_load = d_disk / disk + d / pcie
        self.t_target_disk_after_draft = (d_disk + w) / disk
        # seconds per prefill token of a full chunk on an idle worker: the q_w estimate's unit
        self.base_sec_per_pf = self.cost.step_time(cfg.chunk_tokens, 0, cfg.chunk_tokens) / cfg.chunk_tokens

    # ------------------------------------------------------------------ plumbing
    def _push(self, t: float, kind: int, a: int, b: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def _call(self, name: str):
        c = self.stats.policy_calls
        c[name] = c.get(name, 0) + 1
        return getattr(P, name)

    def _transition(self, w: SimWorker, ev: E) -> None:
        w.state = self._call("next_state")(w.state, ev)
        self._sync(w)

    def _sync(self, w: SimWorker) -> None:
        """Mirror w's policy-visible fields into the table (called after every change)."""
        T, i = self.table, w.id
        T.set_alive(i, w.alive)
        T.set_state(i, w.state)
        T.waiting[i] = w.waiting
        T.running[i] = w.running
        T.q[i] = w.q_wait_s
        T.reserved[i] = w.ckpt_reserved_bytes
        T.budget[i] = w.ckpt_budget_bytes
        T.h2d[i] = w.h2d_bytes_per_s
        T.node[i] = -1 if w.domain is None or not self.cfg.domain_aware else w.domain
        T.partnered[i] = w.partner is not None
        T.epoch[i] = w.epoch

    def _sync_load(self, w: SimWorker) -> None:
        T, i = self.table, w.id
        T.waiting[i] = w.waiting
        T.running[i] = w.running
        T.q[i] = w.q_wait_s

    # ------------------------------------------------------------------ main loop
    def run(self) -> SimResult:
        t0 = time.perf_counter()
        for t, wid in self.fail_events:
            self._push(t, _EV_FAIL, wid)
        reqs, n = self.reqs, len(self.reqs)
        ai = 0
        heap = self.heap
        pop = heapq.heappop
        events = 0
        while self.done < n:
            if ai < n and (not heap or reqs[ai].arrival <= heap[0][0]):
                r = reqs[ai]
                ai += 1
                self.now = r.arrival
                self._arrive(r)
                events += 1
                continue
            if not heap:
                break   # nothing can make progress (cannot happen while a worker restarts)
            t, _, kind, a, b = pop(heap)
            self.now = t
            events += 1
            if kind == _EV_STEP:
                w = self.workers[a]
                if b == w.ep_token:
                    self._end_epoch(w, t)
            elif kind == _EV_WAKE:
                self._wake(self.workers[a], t)
            elif kind == _EV_FAIL:
                self._crash(self.workers[a], t)
            elif kind == _EV_DETECT:
                self._detect(t)
            elif kind == _EV_RESTART:
                self._restart(self.workers[a], b)
            elif kind == _EV_DRAFT:
                self._draft_loaded(self.workers[a], b)
            elif kind == _EV_HOST:
                self._host_loaded(self.workers[a], b)
            elif kind == _EV_READY:
                self._ready(self.workers[a], b)
            elif kind == _EV_ASSIST:
                w = self.workers[a]
                if w.partner is not None and w.state is S.SERVING:
                    self._poke(w, t)
            elif kind == _EV_PAIR:
                self.pair_tick = False
                self._pair_by_gain(t, reassess=True)
        for r in reqs:   # anything left could not be served (no worker ever came back)
            if r.finish is None and r.error is None:
                r.error = "unavailable: no serving worker"
                self.stats.errors += 1
        self.stats.events = events
        self.stats.wall_s = time.perf_counter() - t0
        recs = [RequestRecord(r.id, r.arrival, r.first_token, r.finish, r.prompt,
                              r.gen if r.error else r.output, r.interrupted, r.error, workers=r.workers)
                for r in reqs]
        recs.sort(key=lambda x: x.req_id)
        end = max((r.finish for r in reqs if r.finish is not None), default=0.0)
        return SimResult(str(self.policy), recs, self.stats,
                         sorted({t for t, _ in self.fail_events}), end)

    # ------------------------------------------------------------------ arrivals and routing
    def _arrive(self, r: SimRequest) -> None:
        wid = self._call("route_new")(self.view)
        if wid is None:
            self.parked.append(r)
            return
        self._enqueue(self.workers[wid], r, self.now)

    def _enqueue(self, w: SimWorker, r: SimRequest, now: float) -> None:
        r.worker = w.id
        need = r.pf_total - r.pf_done
        if r.prompt + r.output > w.kv_cap:
            r.error = "too_long: context exceeds a worker's KV capacity"
            r.finish = None
            self.stats.errors += 1
            self.done += 1
            return
        w.pending_pf += need
        w.waiting += 1
        if r.ready_at > now + _EPS:
            heapq.heappush(w.transit, (r.ready_at, r.id, r))
            self._push(r.ready_at, _EV_WAKE, w.id)
        else:
            w.wq.append(r)
        w.q_wait_s = w.pending_pf * w.sec_per_pf if w.sec_per_pf else w.pending_pf * self.base_sec_per_pf * w.stretch
        self._sync_load(w)
        if not w.crashed:
            self._poke(w, now)

    def _wake(self, w: SimWorker, now: float) -> None:
        w.wake_pending = False
        moved = False
        while w.transit and w.transit[0][0] <= now + _EPS:
            _, _, r = heapq.heappop(w.transit)
            w.wq.append(r)
            moved = True
        if w.crashed or w.state is not S.SERVING:
            return
        if not w.busy:
            self._plan(w, now)
        elif moved:
            self._poke(w, now)

    # ------------------------------------------------------------------ worker stepping
    def _poke(self, w: SimWorker, now: float) -> None:
        """Something changed on w: take it at the next iteration boundary."""
        if not w.busy:
            # an idle engine starts its next step "now", but after every other event of this
            # same instant (e.g. simultaneous arrivals), so those are batched together
            if w.state is S.SERVING and not w.crashed and not w.wake_pending:
                w.wake_pending = True
                self._push(now, _EV_WAKE, w.id)
            return
        if w.slot is not None:
            k = self._iters_done_by(w, now)
            if k >= w.ep_n:
                return            # the epoch ends by now: its end event takes the change
            if self._iter_start(w, k, w.ep_dt) > now + _EPS:
                # waiting for its slot, nothing in flight: end the epoch now, so that the iteration
                # at the slot's start is planned with the change
                w.ep_n = k
                if k:
                    w.ep_dt = self._epoch_dt(w, k)
                w.ep_token += 1
                self._push(now, _EV_STEP, w.id, w.ep_token)
                return
            k += 1
            if k < w.ep_n:
                w.ep_n = k
                w.ep_dt = self._epoch_dt(w, k)
                w.ep_token += 1
                self._push(self._ep_end(w, k, w.ep_dt), _EV_STEP, w.id, w.ep_token)
            return
        if w.ep_n > 1:
            k = self._iters_done_by(w, now) + 1
            if k < w.ep_n:
                w.ep_n = k
                w.ep_dt = self._epoch_dt(w, k)
                w.ep_token += 1
                self._push(w.ep_start + k * w.ep_dt, _EV_STEP, w.id, w.ep_token)

    def _epoch_dt(self, w: SimWorker, n: int) -> float:
        """Step time of an n-iteration epoch: the cost at the epoch's middle context (exact for
        a cost affine in the context: the sum over an arithmetic sequence is n x its middle)."""
        return max(self.cost.step_time(w.ep_p, w.ep_dpos, w.ep_ctx0 + w.ep_grow * (n - 1) * 0.5) * w.ep_slow, 1e-9)

    def _busy_changed(self, w: SimWorker, now: float) -> None:
        """Keep the node's count of stepping workers; the others re-time their epochs after the
        iteration in flight (their step-time factor changed)."""
        if w.busy == w.slow_counted or w.group not in self._node_members:
            return
        w.slow_counted = w.busy
        self._node_busy[w.group] = self._node_busy.get(w.group, 0) + (1 if w.busy else -1)
        for o in self._node_members[w.group]:
            if o is not w and o.busy:
                self._poke(o, now)

    def _iters_done_by(self, w: SimWorker, t: float) -> int:
        """Iterations of the current epoch completed by time t, had the epoch been planned to
        end right after them (a shorter epoch has a shorter mid context, so re-time it)."""
        if w.slot is not None:
            return self._slot_iters_done_by(w, t)
        k = min(int((t - w.ep_start) / w.ep_dt + _EPS), w.ep_n)
        while k < w.ep_n and w.ep_start + (k + 1) * self._epoch_dt(w, k + 1) <= t + _EPS:
            k += 1
        return k

    # ------------------------------------------------------------------ time-division slots
    def _ep_end(self, w: SimWorker, k: int, dt: float) -> float:
        """When iteration k (1-based) of w's current epoch ends, its iterations taking dt each."""
        if w.slot is None or k <= 0:
            return w.ep_start + k * dt
        m0, s1, m, cycle = self._slot_layout(w, dt)
        if k <= m0:
            return w.ep_start + k * dt
        q, j = divmod(k - m0 - 1, m)
        return s1 + q * cycle + (j + 1) * dt

    def _iter_start(self, w: SimWorker, i: int, dt: float) -> float:
        """When iteration i (0-based) of w's current epoch starts."""
        if w.slot is None:
            return w.ep_start + i * dt
        m0, s1, m, cycle = self._slot_layout(w, dt)
        if i < m0:
            return w.ep_start + i * dt
        q, j = divmod(i - m0, m)
        return s1 + q * cycle + j * dt

    def _slot_layout(self, w: SimWorker, dt: float) -> tuple[int, float, int, float]:
        """Where an epoch of iterations of dt each, the first starting at ep_start, runs under w's slot
        schedule: m0 iterations back to back from ep_start, then m per own slot from s1 on, one cycle
        apart (each next start is the schedule's `start_at`). Cached per (ep_start, dt)."""
        c = w.sl
        if c is not None and c[0] == dt and c[1] == w.ep_start:
            return c[2]
        sched = w.slot
        assert sched is not None
        s0 = w.ep_start
        m0 = self._slot_fit(sched, s0, dt)
        s1 = sched.start_at(s0 + m0 * dt, dt)
        out = (m0, s1, self._slot_fit(sched, s1, dt), sched.cycle_s)
        w.sl = (dt, s0, out)
        return out

    @staticmethod
    def _slot_fit(sched: slots.SlotSchedule, s: float, dt: float) -> int:
        """How many iterations of dt run back to back from s (a start the schedule allows) before the
        schedule makes the next one wait: the first j with start_at(s + j*dt) != s + j*dt (>= 1)."""
        if dt >= sched.slot_s:
            return 1
        m = max(1, int((sched.window(s)[1] - s) / dt))   # a guess, settled by start_at itself
        while m > 1 and sched.start_at(s + (m - 1) * dt, dt) != s + (m - 1) * dt:
            m -= 1
        while sched.start_at(s + m * dt, dt) == s + m * dt:
            m += 1
        return m

    def _slot_iters_done_by(self, w: SimWorker, t: float) -> int:
        """`_iters_done_by` under slots: the closed-form inverse of `_ep_end`, then re-timed."""
        dt, n = w.ep_dt, w.ep_n
        m0, s1, m, cycle = self._slot_layout(w, dt)
        if t < s1:
            k = min(m0, max(0, int((t - w.ep_start) / dt + _EPS)))
        else:
            q = int((t - s1) / cycle)
            k = m0 + q * m + min(m, max(0, int((t - s1 - q * cycle) / dt + _EPS)))
        k = min(k, n)
        while k > 0 and self._ep_end(w, k, dt) > t + _EPS:
            k -= 1
        while k < n:
            dk = self._epoch_dt(w, k + 1)
            if self._ep_end(w, k + 1, dk) > t + _EPS:
                break
            k += 1
        return k

    @staticmethod
    def _slot_span(sched: slots.SlotSchedule | None, t: float, work_s: float) -> float:
        """When `work_s` seconds of device work started at t are done, taken in the schedule's own
        slots only (divisible work: the draft's catch-up, the warm-up); t + work_s without one."""
        if sched is None or work_s <= 0:
            return t + work_s
        while True:
            start, end = sched.window(t)
            start = max(start, t)
            if start + work_s <= end:
                return start + work_s
            work_s -= end - start
            t = end

    def _plan(self, w: SimWorker, now: float) -> None:
        cfg = self.cfg
        heap = w.heap
        D = len(heap)
        assisted = w.partner is not None and now + _EPS >= w.assist_from and D > 0
        ks = None
        if not assisted:
            extra = 0
        elif self.goodput:
            # the goodput rule, once per epoch: the partner's load is what this epoch runs with
            ks = self._spec_lengths(w, D)
            extra = sum(ks)
        else:
            extra = D * cfg.k
        budget = cfg.chunk_tokens - D - extra
        chunks: list[tuple[SimRequest, int]] = []
        Ptok = 0
        ctx_pf = 0
        for r in w.prefilling:
            if budget <= 0:
                break
            c = min(r.pf_total - r.pf_done, budget)
            chunks.append((r, c))
            budget -= c
            Ptok += c
            ctx_pf += r.pf_done + c
        wq = w.wq
        while wq and budget > 0 and w.running < cfg.max_batch:
            r = wq[0]
            need_kv = r.prompt + r.output
            if w.kv_used + need_kv > w.kv_cap:
                break    # FCFS: the head waits for KV to free up
            wq.popleft()
            w.waiting -= 1
            w.running += 1
            w.kv_used += need_kv
            r.kv_alloc = need_kv
            w.prefilling.append(r)
            c = min(r.pf_total - r.pf_done, budget)
            chunks.append((r, c))
            budget -= c
            Ptok += c
            ctx_pf += r.pf_done + c
        if Ptok == 0 and D == 0:
            w.busy = False
            w.q_wait_s = w.pending_pf * self.base_sec_per_pf * w.stretch
            self._sync_load(w)
            if self._node_members:
                self._busy_changed(w, now)
            return
        g = self._assist_tokens(w, D, ks) if extra else 1.0
        if Ptok:
            n = 1
            if len(chunks) == 1 and budget == 0 and not wq:
                r, c = chunks[0]
                rem = r.pf_total - r.pf_done
                n = max(1, (rem - 1) // c)
            if D and n > 1:
                n = min(n, max(1, math.ceil((heap[0][0] - w.G) / g - _EPS)))
        else:
            n = max(1, math.ceil((heap[0][0] - w.G) / g - _EPS))
        if n > cfg.max_epoch_iters:
            n = cfg.max_epoch_iters
        w.ep_p = Ptok
        w.ep_dpos = D + extra
        w.ep_ctx0 = w.S_dec + D * w.G + ctx_pf
        w.ep_grow = D * g + (Ptok if n > 1 else 0)    # context added per iteration
        if self._node_members:
            others = self._node_busy.get(w.group, 0) - (1 if w.slow_counted else 0)
            w.ep_slow = 1.0 + self.slowdown * others
        dt = self._epoch_dt(w, n)
        start = now
        sched = w.slot
        if sched is not None:
            if n > 1 and dt >= sched.slot_s:
                n = 1     # no slot holds two: each where start_at allows it, one epoch each
                w.ep_grow = D * g
                dt = self._epoch_dt(w, 1)
            start = sched.start_at(now, dt)
        w.busy = True
        w.ep_start = start
        w.ep_dt = dt
        w.ep_n = n
        w.ep_g = g
        w.ep_chunks = chunks
        w.ep_token += 1
        w.last_dt = dt * w.stretch      # wall time per iteration, for the checkpoint lag in tokens
        w.ep_extra = extra
        if not assisted:
            w.ep_khist = None
        elif ks is None:
            w.ep_khist = [(cfg.k, D)]
        else:
            hist: dict[int, int] = {}
            for k in ks:
                hist[k] = hist.get(k, 0) + 1
            w.ep_khist = list(hist.items())
        # q_w: queued prefill work at this batch's prefill rate (under slots: wall time, count x)
        free = cfg.chunk_tokens - D - extra
        w.sec_per_pf = (dt / free if free > 0 else dt) * w.stretch
        w.q_wait_s = w.pending_pf * w.sec_per_pf
        self._sync_load(w)
        self._push(now + n * dt if sched is None else self._ep_end(w, n, dt), _EV_STEP, w.id, w.ep_token)
        if self._node_members:
            self._busy_changed(w, now)

    def _load(self, w: SimWorker) -> P.PartnerLoad:
        """What w's next step holds besides verify positions (`policy.PartnerLoad`), as the live engine
        reports it (`Engine.load_summary`): its decoding requests and their context, the prompt tokens the
        step could prefill (the running prefills' remainder and the queued requests the batch has room
        for) and the requests still waiting for their first token (in transit too)."""
        D = len(w.heap)
        room = max(0, self.cfg.max_batch - w.running)
        prefill = (sum(r.pf_total - r.pf_done for r in w.prefilling)
                   + sum(r.pf_total - r.pf_done for r in itertools.islice(w.wq, room)))
        return P.PartnerLoad(D, w.S_dec + D * w.G, prefill, w.waiting + len(w.prefilling),
                             self.cfg.chunk_tokens)

    def _spec_lengths(self, w: SimWorker, D: int) -> list[int]:
        """K_r per decoding request of the assisted partner w for its next epoch: the policy's goodput
        rule (every decoding request is mirrored; one acceptance estimate, cfg.alpha, for all)."""
        return self._call("choose_spec_lengths")([self.cfg.alpha] * D, self._load(w), self.cost.step_time,
                                                 self.cfg.k)

    def _gain(self, w: SimWorker) -> float:
        """`policy.pairing_gain` of w's load now: expected extra tokens/s if it were assisted."""
        D = len(w.heap)
        if D == 0:
            return 0.0
        return self._call("pairing_gain")([self.cfg.alpha] * D, self._load(w), self.cost.step_time, self.cfg.k)

    def _assist_tokens(self, w: SimWorker, D: int, ks: list[int] | None = None) -> float:
        """Expected tokens per verify step for the partner's requests: E (the mean of
        `expected_tokens(alpha, K_r)` under the goodput rule) when the draft keeps up, fewer when a
        draft round (max K_r draft steps over the requests drafted for) outlasts the partner's step
        (late proposals are dropped, never waited on)."""
        ctx = w.S_dec + D * w.G
        if ks is None:   # the fixed rule: K for every request
            e = self.E
            dt_t = self.cost.step_time(0, D * self.k1, ctx)
            dt_d = self.cfg.k * self.draft_cost.step_time(0, D, ctx)
        else:
            a = self.cfg.alpha
            e = sum(P.expected_tokens(a, k) for k in ks) / D
            drafted = sum(1 for k in ks if k)
            dt_t = self.cost.step_time(0, D + sum(ks), ctx)
            dt_d = max(ks) * self.draft_cost.step_time(0, drafted, ctx * drafted / D)
        if self.slot_s is not None:   # each side runs only in its own slots: 1/count of the time
            dt_t *= w.stretch
            if w.partner is not None:
                dt_d *= self.workers[w.partner].stretch
        return 1.0 + (e - 1.0) * min(1.0, dt_t / dt_d if dt_d > 0 else 1.0)

    def _end_epoch(self, w: SimWorker, t: float) -> None:
        if w.ep_n:   # 0: ended while waiting for its slot, before its first iteration
            self._apply(w, w.ep_n, t)
        w.busy = False
        self._plan(w, t)

    def _apply(self, w: SimWorker, n: int, t: float) -> None:
        """Apply n completed iterations of the current epoch ending at time t."""
        st = self.stats
        st.steps += 1
        st.iterations += n
        if w.ep_khist is not None:
            if w.ep_extra:
                st.assisted_steps += n
                st.verify_positions += n * w.ep_extra
            else:
                st.spec_idle_steps += n
            hist = st.spec_k_hist
            for k, c in w.ep_khist:
                if k >= len(hist):
                    hist.extend([0] * (k + 1 - len(hist)))
                hist[k] += n * c
        g = w.ep_g
        D = len(w.heap)
        if D:
            w.G += n * g
            if w.n_prot_dec:
                b = n * g * w.n_prot_dec * self.kvb
                if self.prio:
                    w.link_all_free_at = max(w.link_all_free_at, w.ep_start) + b / self.net_bw
                    b1 = n * g * w.n_prim_dec * self.kvb
                    w.link_free_at = max(w.link_free_at, w.ep_start) + b1 / self.net_bw
                else:
                    w.link_free_at = max(w.link_free_at, w.ep_start) + b / self.net_bw
                st.stream_bytes += b
        completed = None
        for r, c in w.ep_chunks:
            done = c * n
            r.pf_done += done
            w.pending_pf -= done
            if r.pf_done >= r.pf_total:
                if completed is None:
                    completed = []
                completed.append(r)
        if completed:
            w.prefilling = [r for r in w.prefilling if r.pf_done < r.pf_total]
            for r in completed:
                r.gen += 1
                if r.first_token is None:
                    r.first_token = t
                # a (re)prefill's end is where a worker starts producing the request's tokens
                r.workers = with_worker(r.workers, w.id)
                if r.gen >= r.output:
                    self._finish(w, r, t)
                    continue
                r.decoding = True
                r.g0 = w.G
                r.kv_join = r.pf_total
                w.S_dec += r.kv_join - r.g0
                heapq.heappush(w.heap, (w.G + (r.output - r.gen), r.id, r))
                if self.feats.checkpointing is not None:
                    self._protect(w, r, t)
        heap = w.heap
        G = w.G + _EPS
        while heap and heap[0][0] <= G:
            _, _, r = heapq.heappop(heap)
            r.decoding = False
            w.S_dec -= r.kv_join - r.g0
            if r.copies:
                w.n_prot_dec -= len(r.copies)
                w.n_prim_dec -= 1
            r.gen = r.output
            self._finish(w, r, t)
        self._sync_load(w)

    def _finish(self, w: SimWorker, r: SimRequest, t: float) -> None:
        r.finish = t
        w.running -= 1
        w.kv_used -= r.kv_alloc
        self._release(r)
        self.done += 1

    # ------------------------------------------------------------------ checkpoints
    def _protect(self, w: SimWorker, r: SimRequest, t: float) -> None:
        """Place r's checkpoint copies (prefill just completed on w, or re-protection after a holder
        died: only the missing copies) and start streaming their pages."""
        s = self._call("checkpoint_reservation")(r.prompt, r.output, self.kvb, self.page)
        if not self.multi:
            h = self._call("place_checkpoint")(self.view, self.policy, w.id, s)
            holders = [] if h is None else [h]
        else:
            if not r.k_want:
                r.k_want = self._replicas_for(w, r, s)
                hist = self.stats.k_hist
                if r.k_want >= len(hist):
                    hist.extend([0] * (r.k_want + 1 - len(hist)))
                hist[r.k_want] += 1
            need = r.k_want - len(r.copies)
            holders = self._call("place_checkpoints")(self.view, self.policy, w.id, s, need,
                                                      [c.holder for c in r.copies]) if need > 0 else []
            self.stats.copies_missing += max(0, need - len(holders))
        if not holders:
            if not r.copies:
                self.stats.unprotected += 1
            return
        self.stats.placed += 1
        self.stats.copies_placed += len(holders)
        if r.decoding:
            w.n_prot_dec += len(holders)
            if not r.copies:
                w.n_prim_dec += 1
        kv = r.kv_join + (w.G - r.g0) if r.decoding else r.pf_done
        burst = int(kv) // self.page * self.page
        dur = burst * self.kvb / self.net_bw
        for h in holders:
            hw = self.workers[h]
            hw.ckpt_reserved_bytes += s
            self.table.reserved[h] = hw.ckpt_reserved_bytes
            hw.held[r.id] = r
            c = _Copy(h, hw.epoch, s)
            if self.prio and r.copies:
                # a later copy (primary-first): after every page queued so far, first copies' included
                t0 = max(w.link_all_free_at, t)
                t1 = t0 + dur
                w.link_all_free_at = t1
            else:
                # fifo: each copy's prompt pages queue on the executor's NIC behind everything sent
                # before; primary-first: a first copy waits only for first copies
                t0 = max(w.link_free_at, t)
                t1 = t0 + dur
                w.link_free_at = t1
                if self.prio:
                    w.link_all_free_at = max(w.link_all_free_at, t) + dur
            r.copies.append(c)
            c.t0, c.t1, c.burst = t0, t1, burst
            self.stats.stream_bytes += burst * self.kvb

    def _replicas_for(self, w: SimWorker, r: SimRequest, s: int) -> int:
        """K for r (`policy.ReplicaRule`, as the live controller asks it): under "auto" with the
        request's recompute cost (its maximum context at the idle prefill rate), its remaining lifetime
        (output tokens left x w's decode step now) and a copy of s bytes over the NIC."""
        if self.cfg.ckpt_replicas != "auto":
            return int(self.cfg.ckpt_replicas)
        D = max(1, len(w.heap))
        step = self.cost.step_time(0, D, w.S_dec + D * w.G) * w.stretch
        life = max(0, r.output - r.gen) * step
        recompute = (r.prompt + r.output) * self.base_sec_per_pf
        for name in ("domain_count", "choose_replicas"):  # the policy calls k_for makes under "auto"
            self.stats.policy_calls[name] = self.stats.policy_calls.get(name, 0) + 1
        return self.replica_rule.k_for(self.view, recompute, life, s, self.net_bw)

    def _release(self, r: SimRequest) -> None:
        """Release every copy of r (finished, interrupted and dispatched, or moved)."""
        for c in r.copies:
            hw = self.workers[c.holder]
            if hw.held.pop(r.id, None) is not None:
                hw.ckpt_reserved_bytes -= c.res
                self.table.reserved[hw.id] = hw.ckpt_reserved_bytes
        r.copies = []

    def _valid_prefix(self, w: SimWorker, c: _Copy, t: float, kv_now: int, later: bool = False) -> int:
        """Longest contiguous prefix of full pages copy c's holder received by time t (`later`: not
        the request's first copy, under primary-first streaming)."""
        if t <= c.t0:
            return 0
        page = self.page
        if t < c.t1:
            pages = int((t - c.t0) * self.net_bw / (page * self.kvb))
            return min(pages * page, c.burst)
        # decode pages: a page is valid once it is full, has waited for its export and has crossed
        # the link behind any backlog; in tokens, that lag is the time over the step time.
        backlog = (w.link_all_free_at if later else w.link_free_at) - t
        lag_s = self.export_wait_s + page * self.kvb / self.net_bw + max(0.0, backlog)
        lag_tok = math.ceil(lag_s / w.last_dt) if w.last_dt > 0 else 0
        valid = max(c.burst, (kv_now - lag_tok) // page * page)
        return max(0, min(valid, kv_now // page * page))

    # ------------------------------------------------------------------ failures
    def _crash(self, w: SimWorker, t: float) -> None:
        if w.crashed:
            return
        self.stats.failures += 1
        if w.busy:
            k = self._iters_done_by(w, t)
            if k > 0:
                if k < w.ep_n:
                    w.ep_dt = self._epoch_dt(w, k)
                self._apply(w, k, self._ep_end(w, k, w.ep_dt))
            w.busy = False
            w.ep_token += 1
            if self._node_members:
                self._busy_changed(w, t)
        w.crashed = True
        self.stats.crash_nic_backlog_s += max(0.0, (w.link_all_free_at if self.prio else w.link_free_at) - t)
        # freeze what the holders have: nothing more streams from a dead worker
        for _, _, r in w.heap:
            kv_now = int(r.kv_join + (w.G - r.g0))
            r.gen = r.gen + int(w.G - r.g0 + _EPS)
            for j, c in enumerate(r.copies):
                c.valid = self._valid_prefix(w, c, t, kv_now, self.prio and j > 0)
        for r in w.prefilling:   # first prefill or recovery prefill: not protected yet
            for c in r.copies:
                c.valid = 0
        w.detect_at = t + self.cfg.detect_s
        self._push(w.detect_at, _EV_DETECT, w.id)

    def _detect(self, t: float) -> None:
        batch = [w for w in self.workers if w.crashed and w.state is not S.DOWN
                 and w.detect_at <= t + _EPS]
        if not batch:
            return
        dead = {w.id for w in batch}
        interrupted: list[SimRequest] = []
        executor: dict[int, int] = {}
        for w in batch:
            self._transition(w, E.FAIL)
            w.alive = False
            running = [r for _, _, r in w.heap] + w.prefilling
            for r in running:
                r.interrupted = True     # it was in the running batch when its worker died
                r.decoding = False
            queued = list(w.wq) + [r for _, _, r in w.transit]
            for r in running + queued:
                executor[r.id] = w.id
                r.worker = -1
            interrupted += running + queued
            self.stats.interrupted += len(running)
            st = self.stats
            for r in running:
                live = [c for c in r.copies if not self.workers[c.holder].crashed]
                if r.copies:
                    st.protected_interrupted += 1
                    if not live:
                        st.holder_cofailed += 1
                    st.copies_lost += len(r.copies) - len(live)
                if not any(c.valid > 0 for c in live):
                    st.no_valid_copy += 1
            w.reset()
            self._unpair(w, t)
            self._sync(w)
            self._push(t + self.cfg.restart_s, _EV_RESTART, w.id, w.epoch)
        # dispatch first, so the policy sees each request's real holder (dead or alive)
        self._dispatch(interrupted, t, executor)
        # checkpoints held by the dead workers are gone: re-protect the live requests they held
        # (per copy: a request keeps its copies on live holders and gets the missing ones again)
        lost: dict[int, tuple[SimRequest, int]] = {}
        legacy: dict[int, int] = {}
        for w in batch:
            for r in list(w.held.values()):
                kept = [c for c in r.copies if c.holder != w.id]
                if len(kept) == len(r.copies):
                    continue
                if kept:
                    w.held.pop(r.id, None)
                    r.copies = kept
                else:
                    if not self.multi:
                        legacy[r.id] = r.copies[0].valid
                    self._release(r)
                if r.worker >= 0 and r.decoding and r.worker not in dead:
                    n = lost[r.id][1] if r.id in lost else 0
                    lost[r.id] = (r, n + 1)
            w.ckpt_reserved_bytes = 0
            w.held.clear()
            self._sync(w)
        for rid in sorted(lost):
            r, n = lost[rid]
            ex = self.workers[r.worker]
            ex.n_prot_dec -= n
            if not r.copies:
                ex.n_prim_dec -= 1
            self.stats.reprotected += 1
            self._protect(ex, r, t)
            if rid in legacy and r.copies:
                # K = 1 keeps the behaviour before issue 25 bit for bit: the valid prefix frozen when
                # the executor crashed (possible here only if it crashed before this holder's death
                # was detected) stays with the request and is credited to the new holder, which never
                # received those pages. Known inaccuracy (docs/replicas.md); K > 1 gives a new copy
                # nothing, as the live store would.
                r.copies[0].valid = legacy[rid]

    def _dispatch(self, interrupted: list[SimRequest], t: float,
                  executor: dict[int, int] | None = None) -> None:
        if not interrupted:
            return
        if not any(w.alive and w.state is S.SERVING for w in self.workers):
            self.orphans.extend(interrupted)
            for r in interrupted:
                self._release(r)
            return
        views = []
        for r in interrupted:
            total = r.prompt + r.gen
            c = r.copies[0] if r.copies else None
            if self.multi and len(r.copies) > 1:
                # several copies: restore from the live one with the longest valid prefix
                h = self._call("restore_source")(self.view, [(x.holder, min(x.valid, total), x.epoch)
                                                             for x in r.copies])
                if h is not None:
                    c = next(x for x in r.copies if x.holder == h)
            if c is None:
                views.append(P.RequestView(r.id, (executor or {}).get(r.id), None, 0, 0, total, None))
            else:
                views.append(P.RequestView(r.id, (executor or {}).get(r.id), c.holder, c.res,
                                           min(c.valid, total), total, c.epoch))
        plan = self._call("dispatch_interrupted")(self.view, self.policy, views)
        st = self.stats
        for a, v in zip(plan, sorted(views, key=lambda v: v.id), strict=True):
            r = self.by_id[a.request_id]
            tw = self.workers[a.target]
            r.pf_total = r.prompt + r.gen
            r.kv_alloc = 0
            if a.mode == "restore":
                st.restores += 1
                r.pf_done = v.valid_prefix_tokens
                st.restored_tokens += r.pf_done
                start = max(t, tw.h2d_free_at)
                r.ready_at = start + r.pf_done * self.kvb / tw.h2d_bytes_per_s
                tw.h2d_free_at = r.ready_at
            else:
                st.recomputes += 1
                if (v.holder is not None and self.workers[v.holder].alive
                        and self.workers[v.holder].state is S.SERVING):
                    st.shed += 1
                r.pf_done = 0
                r.ready_at = t
            st.recompute_tokens += r.pf_total - r.pf_done
            here = st.recovered_here.setdefault(tw.id, dict.fromkeys(COUNT_KEYS, 0))
            here["restored" if a.mode == "restore" else "recomputed"] += 1
            here["tokens"] += r.pf_total
            self._release(r)   # the checkpoints are consumed (restore) or abandoned (moved)
            self._enqueue(tw, r, t)

    # ------------------------------------------------------------------ reload and assist
    def _unpair(self, w: SimWorker, t: float) -> None:
        p = w.partner
        if p is None:
            return
        w.partner = None
        pw = self.workers[p]
        pw.partner = None
        self._sync(w)
        self._sync(pw)
        if pw.state is S.ASSISTING:          # w was the survivor: its helper loses its job
            self._transition(pw, E.UNPAIRED)
            self._try_pair(t)
        elif pw.state is S.SERVING:          # w was the helper: the survivor decodes alone again
            pw.assist_from = math.inf
            self._poke(pw, t)

    def _restart(self, w: SimWorker, epoch: int) -> None:
        if w.epoch != epoch or w.state is not S.DOWN:
            return
        w.crashed = False
        w.alive = True
        w.epoch += 1
        w.draft_ready = False
        t = self.now
        if (self.feats.speculation and (not self.shared_devices or self._may_assist(w))
                and self._draft_first(w)):
            self._transition(w, E.RESTART)
            self._push(t + self.t_draft_load, _EV_DRAFT, w.id, w.epoch)
            self._push(t + self.t_target_disk_after_draft, _EV_HOST, w.id, w.epoch)
        else:
            self._transition(w, E.RESTART_PLAIN)
            self._push(self._target_ready(w, t + self.t_plain_reload), _EV_READY, w.id, w.epoch)

    def _draft_first(self, w: SimWorker) -> bool:
        """Whether the restarting worker loads its draft. Resident in host memory (or the fixed rule):
        yes, as before. Cold under the goodput rule: `policy.draft_phase_pays`, with the best
        `pairing_gain` among the serving workers free to pair now against the tokens this worker would
        serve meanwhile (its decode rate at the serving workers' mean batch and context, from the cost
        model)."""
        if not self.goodput or self.cfg.draft_resident:
            return True
        serving = [o for o in self.workers if o.alive and o.state is S.SERVING]
        gain = max((self._gain(o) for o in serving if o.partner is None), default=0.0)
        d = sum(len(o.heap) for o in serving) / len(serving) if serving else 0.0
        ctx = sum(o.S_dec + len(o.heap) * o.G for o in serving) / max(1.0, sum(len(o.heap) for o in serving))
        b = max(1, round(d))
        step = self.cost.step_time(0, b, b * max(ctx, 1.0)) * w.stretch
        displaced = b / step if step > 0 else 0.0
        pays = bool(self._call("draft_phase_pays")(self.t_draft_disk, self.t_plain_reload, gain, displaced))
        if not pays:
            self.stats.draft_skipped += 1
        return pays

    def _may_assist(self, w: SimWorker) -> bool:
        """`policy.may_assist` on a snapshot with each worker's accelerator (its device, or its own slot
        of it), as the live controller asks before giving a restarting worker its draft."""
        ws = tuple(P.WorkerView(o.id, o.state, o.epoch, o.alive, o.waiting, o.running, o.q_wait_s,
                                o.ckpt_reserved_bytes, o.ckpt_budget_bytes, o.h2d_bytes_per_s, o.node,
                                o.partner, self.accelerators[o.id]) for o in self.workers)
        return bool(self._call("may_assist")(P.ClusterView(ws, self.cfg.lam), w.id))

    def _target_ready(self, w: SimWorker, t: float) -> float:
        """Target weights in host memory at t: copied host->device, then the warm-up; under slots both
        only in w's own slots (the live worker gates each tensor's copy and each warm-up step)."""
        if w.slot is None:
            return t + self.t_target_h2d
        return self._slot_span(w.slot, t, self.t_target_h2d)

    def _draft_loaded(self, w: SimWorker, epoch: int) -> None:
        if w.epoch != epoch or w.crashed or w.state is not S.LOADING_DRAFT:
            return
        w.draft_ready = True
        self._try_pair(self.now)

    def _try_pair(self, t: float) -> None:
        """Pair every recovering worker that has its draft and no partner (ascending id)."""
        if self.goodput:
            self._pair_by_gain(t, reassess=False)
            return
        for w in self.workers:
            if w.state is not S.LOADING_DRAFT or not w.draft_ready or w.crashed:
                continue
            p = self._call("pick_partner")(self.view, w.id)
            if p is None:
                return   # nobody free: the rest stay unpaired too
            self._pair(w, self.workers[p], t)

    def _pair(self, w: SimWorker, pw: SimWorker, t: float) -> None:
        """Record the pair; the partner's assisted steps start once the draft has prefilled the
        mirrored requests' contexts (catch-up)."""
        self._transition(w, E.PAIRED)
        w.partner, pw.partner = pw.id, w.id
        w.paired_at = t
        self._sync(w)
        self._sync(pw)
        ctx = int(pw.S_dec + len(pw.heap) * pw.G)
        chunk = self.cfg.chunk_tokens
        catch_up = 0.0
        while ctx > 0:
            c = min(chunk, ctx)
            catch_up += self.draft_cost.step_time(c, 0, c)
            ctx -= c
        pw.assist_from = t + catch_up if w.slot is None else self._slot_span(w.slot, t, catch_up)
        self._push(pw.assist_from, _EV_ASSIST, pw.id)

    def _pair_by_gain(self, t: float, reassess: bool) -> None:
        """The goodput rule's pairing (`policy.pick_partner_by_gain` on `policy.pairing_gain` of each
        SERVING worker free to pair, from its load now): every recovering worker with its draft and
        no partner, ascending id; with `reassess` (the periodic tick) also every ASSISTING one, which
        moves when the policy names another partner (the new one's assistance starts after the
        draft's catch-up). None (no positive gain): an unpaired worker stays unpaired and is asked
        again at the next tick; a paired one keeps its partner (whose steps then verify nothing:
        the per-step rule gives K = 0 wherever assisting does not pay)."""
        cache: dict[int, float] = {}
        for w in self.workers:
            if w.crashed:
                continue
            if w.state is S.LOADING_DRAFT and w.draft_ready and w.partner is None:
                cur = None
            elif reassess and w.state is S.ASSISTING and w.partner is not None:
                cur = w.partner
            else:
                continue
            gains: dict[int, float] = {}
            for o in self.workers:
                # the controller's knowledge: a crash not yet detected still looks SERVING
                if o.state is S.SERVING and o.alive and (o.partner is None or o.id == cur):
                    g = cache.get(o.id)
                    if g is None:
                        g = cache[o.id] = self._gain(o)
                    gains[o.id] = g
            p = self._call("pick_partner_by_gain")(self.view, w.id, gains, current=cur,
                                                   paired_for_s=t - w.paired_at if cur is not None else math.inf)
            if p is None or p == cur:
                continue
            if cur is not None:        # move: the old partner decodes alone again
                old = self.workers[cur]
                w.partner = old.partner = None
                old.assist_from = math.inf
                self._transition(w, E.UNPAIRED)
                self._sync(old)
                self._poke(old, t)
                self.stats.pair_moves += 1
            self._pair(w, self.workers[p], t)
        self._schedule_pair_tick(t)

    def _schedule_pair_tick(self, t: float) -> None:
        """Keep one re-evaluation pending every `pair_interval_s` while a draft waits or assists."""
        if self.pair_tick:
            return
        if any(not w.crashed and (w.state is S.ASSISTING or (w.state is S.LOADING_DRAFT and w.draft_ready))
               for w in self.workers):
            self.pair_tick = True
            self._push(t + self.cfg.pair_interval_s, _EV_PAIR, -1)

    def _host_loaded(self, w: SimWorker, epoch: int) -> None:
        if w.epoch != epoch or w.crashed or w.state not in (S.LOADING_DRAFT, S.ASSISTING):
            return
        if w.partner is not None:
            pw = self.workers[w.partner]
            w.partner = None
            pw.partner = None
            self._sync(w)
            self._sync(pw)
            pw.assist_from = math.inf
            self._poke(pw, self.now)
        self._transition(w, E.HOST_LOADED)
        w.draft_ready = False
        self._push(self._target_ready(w, self.now), _EV_READY, w.id, w.epoch)
        self._try_pair(self.now)

    def _ready(self, w: SimWorker, epoch: int) -> None:
        if w.epoch != epoch or w.crashed or w.state is not S.SWITCHING:
            return
        self._transition(w, E.READY)
        t = self.now
        if self.orphans:
            orphans, self.orphans = self.orphans, []
            self._dispatch(orphans, t)
        if self.parked:
            parked, self.parked = self.parked, []
            for r in parked:
                self._arrive(r)
        self._try_pair(t)


def simulate(cfg: SimConfig, workload: Sequence[RequestSpec], policy: str,
             failures: FailurePlan | None = None, seed: int = 0) -> SimResult:
    """Run one simulation; `failures=None` is the no-failure reference run."""
    return Simulator(cfg, workload, policy, failures, seed).run()
