"""A worker process: one model replica, its engine, and a store for other workers' checkpoints.

Run as `python -m lumen.runtime.worker ...` by a launcher. The cluster secret arrives in the
environment (LUMEN_CLUSTER_SECRET), never on the command line.

Threads: the main thread owns the engine and the control/data sockets (ZeroMQ sockets are not
thread-safe); a heartbeat thread has its own socket and its own sender name (`w<i>.hb`), so a long
engine step never delays the heartbeat and the replay guard sees one ordered stream per socket.
"""

from __future__ import annotations

import argparse
import collections
import faulthandler
import functools
import logging
import math
import os
import signal
import sys
import threading
import time

import torch
import zmq

from ..engine import Engine, EngineConfig, KVPage, SamplingParams
from ..engine.kv_pages import TAG_BYTES
from ..engine.model_runner import SHORT_MAX
from ..engine.profile import StepLog
from ..model.loader import SharedReads, build_model_from_host, read_config, read_weights_to_host
from ..policy import WorkerState, features
from ..policy.slots import SlotSchedule
from . import draft_cache
from .assist import Drafter, Verifier
from .ckpt_store import CheckpointStore
from .config import ClusterConfig
from .kv_stream import PageReceiver, PageSender
from .model_dirs import resolve_model_dir
from .protocol import HB_DECISION_KEYS, HB_MAX_STATS, MAX_CKPT_REPORT, SCHEMA
from .steptime import LiveStepTime
from .transport import Codec, DealerEndpoint, PullEndpoint, PushPool, frame_ints, ints_frame, secret_from_env

log = logging.getLogger("lumen.worker")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lumen-worker")
    p.add_argument("--worker-id", type=int, required=True)
    p.add_argument("--epoch", type=int, required=True)
    p.add_argument("--controller", required=True, help="host:port of the controller's ROUTER")
    p.add_argument("--model", required=True)
    p.add_argument("--draft-model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype")
    p.add_argument("--policy", default="stop-restart")
    p.add_argument("--host", default="127.0.0.1", help="interface for this worker's data socket")
    p.add_argument("--hb-interval", type=float, default=0.1)
    p.add_argument("--hb-misses", type=int, default=ClusterConfig.hb_misses, help="the controller's deadline in beats (sets the watchdog)")
    p.add_argument("--ckpt-budget-bytes", type=int, default=2 << 30)
    p.add_argument("--ckpt-export-interval-ms", type=float, default=ClusterConfig.ckpt_export_interval_ms,
                   help="export completed pages at most this often (0: after every step)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int)
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--spec-k", type=int, default=4)
    p.add_argument("--spec-acceptance", type=float, default=ClusterConfig.spec_acceptance,
                   help="prior per-token acceptance of the draft pair (the goodput rule's starting estimate)")
    p.add_argument("--draft-first", type=int, choices=(0, 1), default=1,
                   help="a restart whose draft is not resident in host memory reads it before the target "
                        "(the controller's `lumen serve --draft-first`: under auto, policy.draft_phase_pays); "
                        "0: load the target only")
    p.add_argument("--deterministic", action="store_true")
    # a time slot on a shared device (lumen.policy.slots): this worker's index among the workers on its
    # device, how many they are, and the slot length
    p.add_argument("--slot-index", type=int, default=0)
    p.add_argument("--slot-count", type=int, default=1)
    p.add_argument("--slot-ms", type=float, default=0.0)
    p.add_argument("--cpu-cores", default="", help="CPU worker under slots: the cores of its lane (comma-separated)")
    return p.parse_args(argv)


STARVED_LOG_S = 5.0  # a slot-gated worker with work and no step this long logs a warning
UNKNOWN_STEP_SLOT_SHARE = 0.5  # a step not yet measured is expected to take this share of a slot
WARMUP_ENV = "LUMEN_WORKER_WARMUP_TOKENS"  # prefill tokens of the warm-up (0: none)
CPU_WARMUP_TOKENS = 32  # CPU default: the path runs, cheaply (a full chunk measured no benefit there)
WARMUP_DECODE_STEPS = 4
# CUDA: two prompts of a chunk plus a tail, so the warm-up runs each attention path a prefill can take:
# a first chunk, a long continued chunk (its first call imports torch._dynamo for the causal bias,
# ~1.5 s on the CPU box) and a short continued one (the batched path of a restore's tail)
SHORT_CONTINUED_WARMUP_TOKENS = 8
LONG_CONTINUED_WARMUP_TOKENS = SHORT_MAX + 8
WARMUP_REQ = "\x00warmup"  # not a gateway request id (those are printable)


def warmup_prompt_lengths(engine: Engine) -> list[int]:
    """The warm-up's prompts: LUMEN_WORKER_WARMUP_TOKENS if set (one prompt; 0: none), else on CUDA
    a chunk plus a long tail and a chunk plus a short tail, on CPU one of CPU_WARMUP_TOKENS."""
    env = os.environ.get(WARMUP_ENV, "").strip()
    if env:
        return [int(env)]
    if engine.device.type == "cuda":
        return [engine.chunk_tokens + LONG_CONTINUED_WARMUP_TOKENS, engine.chunk_tokens + SHORT_CONTINUED_WARMUP_TOKENS]
    return [CPU_WARMUP_TOKENS]


def warm_up(engine: Engine, prefill_tokens: int | list[int] | None = None,
            decode_steps: int = WARMUP_DECODE_STEPS, before_step=None) -> dict:
    """Run dummy requests, one after another, through the engine's real step path -- prefills of
    `prefill_tokens` (default: `warmup_prompt_lengths`), each followed by `decode_steps` decode
    steps -- then reset the engine's stats, so that nothing of it shows in counters, step-time EMAs,
    step logs or block placement.

    Why: one-time costs of a fresh engine (CUDA graphs captured and kernels compiled lazily, allocator
    growth for the largest activations, first calls of each prefill path, a restored request's tail
    among them) are paid before the worker reports SERVING, not by its first requests. (On the 2-core
    CPU box they measured small: a fresh engine's first 32- and 256-token prefills took the same CPU
    time as later ones, within ~10%; the warm-up costs 1.3-2.7 s per restart there at a full chunk,
    hence the small CPU default.) Prompts are cut to what the KV pool and max_model_len leave; where
    that is less than a chunk plus a tail, the continued paths do not run here (the first restore
    pays them). `before_step()`, if given, runs before each step (a time-sliced worker waits for its
    slot there). Returns the phase info to report (warmup_s) and what ran."""
    if prefill_tokens is None:
        prefill_tokens = warmup_prompt_lengths(engine)
    lengths = [prefill_tokens] if isinstance(prefill_tokens, int) else list(prefill_tokens)
    bm = engine.block_manager
    # fit the context (and the KV pool) with room for the decode steps
    room = min(engine.max_model_len, bm.num_blocks * bm.block_size) - decode_steps - 2
    lengths = [min(n, room) for n in lengths if n > 0 and room > 0]
    if not lengths:
        return {}
    t0 = time.monotonic()
    vocab = engine.model_config.vocab_size
    steps = 0
    for n in lengths:
        # a fixed seed: the engine's own seed stream (for requests without one) stays untouched
        engine.add_request(WARMUP_REQ, [(7 + 31 * i) % vocab for i in range(n)],
                           SamplingParams(max_tokens=1 + decode_steps, ignore_eos=True, seed=0))
        bound = steps + 4 * (decode_steps + n)  # it cannot loop for ever
        while engine.has_work() and steps < bound:
            if before_step is not None:
                before_step()
            engine.step()
            steps += 1
        engine.abort(WARMUP_REQ)  # no-op once finished
    engine.reset_stats()
    return {"warmup_s": time.monotonic() - t0, "warmup_steps": steps, "warmup_prefill_tokens": sum(lengths)}


def _injected_slow_disk() -> None:
    """Fault injection for tests and demos: LUMEN_FAULT_SLOW_RELOAD_S makes a *re*load take that many
    seconds longer, as a larger model or a slower disk would (the first start is unaffected)."""
    delay = float(os.environ.get("LUMEN_FAULT_SLOW_RELOAD_S", "0") or 0)
    if delay > 0:
        time.sleep(delay)


@functools.cache
def _warn_trimmed(count: int, limit: int) -> None:
    log.warning("%d stats exceed the heartbeat's %d; the rest are not published", count, limit)


def trim_stats(stats: dict, limit: int) -> dict:
    """At most `limit` stats, the controller's decision inputs first. A heartbeat over the schema's
    bound would be dropped and this healthy worker declared dead: publish fewer stats, not none."""
    if len(stats) <= limit:
        return stats
    _warn_trimmed(len(stats), limit)
    keys = [k for k in HB_DECISION_KEYS if k in stats] + sorted(k for k in stats if k not in HB_DECISION_KEYS)
    return {k: stats[k] for k in keys[:limit]}


HB_WATCHDOG_ENV = "LUMEN_HB_WATCHDOG"  # "0": no stack dump when the heartbeat thread stalls
HB_LATE_WINDOW_S = 30.0  # hb_late_max_ms is the max over this window (outlives a 15 s Prometheus scrape)
HB_DUMP_EVERY_S = 10.0  # at most one watchdog stack dump per this many seconds
STATS_EVERY_S = 0.01  # stats are rebuilt at the end of a loop turn at most this often (heartbeats: 0.1 s)
# Worker.loop_s after its turn count: poll (commands, when the turn began busy), step (with the
# verifier's hook), outputs (step log, OUT, verifier), export (_stream_pages), stats (with restores released)
LOOP_PARTS = ("poll", "step", "outputs", "export", "stats")


def _thread_cpu_s(thread: threading.Thread) -> float:
    """CPU seconds a thread of this process has used, from the clock id it stored (0 without one, or
    once it ended; the kernel refuses a stale id that slips past the check)."""
    clock_id = getattr(thread, "cpu_clock", None)
    if clock_id is None or not thread.is_alive():
        return 0.0
    try:
        return round(time.clock_gettime(clock_id), 3)
    except OSError:
        return 0.0


HB_OWN_STATS = ("loop_age_s", "hb_late_max_ms")  # what the heartbeat thread adds to the published stats


def _thread_names() -> str:
    # as faulthandler names threads ("Thread 0x00007f..."), which it cannot label itself
    return ", ".join(f"0x{t.ident:016x} {t.name}" for t in threading.enumerate() if t.ident)


class Heartbeat(threading.Thread):
    """Beats every `interval` on its own socket; the controller declares a serving worker dead after
    `deadline` (interval x misses) without a beat. Two always-on diagnostics of a stall of this
    thread (another thread holding the GIL, a lock, a blocked send):

    - `hb_late_max_ms` in the stats: the largest lateness (gap between beats minus the interval)
      over the last HB_LATE_WINDOW_S. A sliding max, not the max since the previous beat: the
      controller keeps only the latest heartbeat, which /lumen/cluster readers and Prometheus scrapes
      (seconds apart) would almost never see.
    - a watchdog: faulthandler.dump_traceback_later, re-armed at every beat (~50 us), writes every
      thread's Python stack to stderr (the cluster log) once this thread has not beaten for
      deadline/2. Its timer is a C thread that needs no GIL, so it fires while Python is stuck and
      shows which thread sat in which call. Armed only while the engine loop runs (only serving
      workers are held to the deadline), at most one dump per HB_DUMP_EVERY_S, cancelled by stop()
      so that an exit dumps nothing. faulthandler has one such timer per process: nothing else in
      the worker may use it.
    """

    def __init__(self, ctx: zmq.Context, secret: bytes, worker_id: int, epoch: int, controller: str,
                 interval: float, deadline: float | None = None, watchdog: bool | None = None,
                 dump_file=None):
        super().__init__(daemon=True, name="heartbeat")
        self.codec = Codec(secret, f"w{worker_id}.hb", epoch, schema=SCHEMA)
        self.sock = DealerEndpoint(ctx, self.codec, controller)
        self.interval = interval
        self.deadline = deadline or ClusterConfig.hb_misses * interval
        if watchdog is None:
            watchdog = os.environ.get(HB_WATCHDOG_ENV, "1").strip() != "0"
        self.watchdog_s = self.deadline / 2 if watchdog else None
        self.stats: dict = {}
        self.loop_at: float | None = None  # last turn of the worker's main loop (None while loading)
        self._halt = threading.Event()
        self._late: collections.deque[tuple[float, float]] = collections.deque()  # (at, late), late decreasing
        self._dump_file = dump_file or sys.stderr
        self._wd_lock = threading.Lock()  # no timer may be armed after stop()
        self._armed_at: float | None = None
        self._dumped_at = -math.inf
        self._announced = False

    def run(self) -> None:
        parent = os.getppid()
        last = time.monotonic()
        try:
            while not self._halt.wait(self.interval):
                now = time.monotonic()
                late, last = now - last - self.interval, now
                if os.getppid() != parent:  # the gateway is gone: do not linger as an orphan
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.watchdog_s is not None:
                    self._rearm(now, late)
                stats = dict(self.stats, hb_late_max_ms=round(self._late_max(now, late) * 1000, 1))
                if self.loop_at is not None:
                    stats["loop_age_s"] = round(now - self.loop_at, 3)
                self.sock.send("HB", {"stats": stats})
        finally:
            with self._wd_lock:
                self._disarm()

    def _late_max(self, now: float, late: float) -> float:
        q = self._late  # monotonic queue: O(1) amortized per beat
        while q and q[-1][1] <= late:
            q.pop()
        q.append((now, late))
        while q[0][0] < now - HB_LATE_WINDOW_S:
            q.popleft()
        return max(0.0, q[0][1])

    def _rearm(self, now: float, late: float) -> None:
        with self._wd_lock:
            if self._halt.is_set():
                return
            if self._armed_at is not None and now - self._armed_at >= self.watchdog_s:
                # the timer ran out before this beat: its dump is in the log (without a worker id)
                self._dumped_at = self._armed_at + self.watchdog_s
                log.warning("heartbeat %.0f ms late (deadline %.2f s): the watchdog dumped every thread's "
                            "stack to stderr (no other dump for %.0f s); threads of pid %d: %s", late * 1000,
                            self.deadline, HB_DUMP_EVERY_S, os.getpid(), _thread_names())
            if self.loop_at is None or now - self._dumped_at < HB_DUMP_EVERY_S:
                self._disarm()
                return
            if not self._announced:
                self._announced = True
                log.info("heartbeat watchdog: no beat for %.2f s dumps every thread's stack to stderr (%s=0 "
                         "turns it off); threads of pid %d: %s", self.watchdog_s, HB_WATCHDOG_ENV,
                         os.getpid(), _thread_names())
            faulthandler.dump_traceback_later(self.watchdog_s, file=self._dump_file)
            self._armed_at = time.monotonic()

    def _disarm(self) -> None:  # under _wd_lock
        if self._armed_at is not None:
            faulthandler.cancel_dump_traceback_later()
            self._armed_at = None

    def stop(self) -> None:
        with self._wd_lock:
            self._halt.set()
            self._disarm()


class Worker:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.id, self.epoch = args.worker_id, args.epoch
        secret = secret_from_env()
        self.ctx = zmq.Context()
        self._page_nbytes_cache: int | None = None
        self.codec = Codec(secret, f"w{self.id}", self.epoch, schema=SCHEMA)
        self.ctrl = DealerEndpoint(self.ctx, self.codec, args.controller)
        self.data = PullEndpoint(self.ctx, self.codec, host=args.host)
        self.push = PushPool(self.ctx, self.codec)
        self.hb = Heartbeat(self.ctx, secret, self.id, self.epoch, args.controller, args.hb_interval,
                            deadline=args.hb_interval * args.hb_misses)
        self.features = features(args.policy)
        self.store = CheckpointStore(args.ckpt_budget_bytes)
        self.kv_tx = PageSender(self.ctx, secret, self.id, self.epoch, wanted=self._page_wanted)
        self.kv_rx = PageReceiver(self.ctx, secret, self.id, self.epoch, args.host, self.store, self._page_nbytes)
        self.engine: Engine | None = None
        self.step_log = StepLog.from_env(self.id, self.epoch)  # LUMEN_STEP_LOG: per-step profile rows
        # req -> its checkpoint copies, first copy first: (holder id, KV address, first page it needs)
        self.holders: dict[str, list[tuple[int, str, int]]] = {}
        self.drafter: Drafter | None = None
        self.verifier: Verifier | None = None
        self.device = args.device
        self.page_shape: tuple = ()
        self._poller: zmq.Poller | None = None
        self.dtype = DTYPES[args.dtype] if args.dtype else (
            torch.float64 if args.deterministic else torch.bfloat16 if args.device.startswith("cuda")
            else torch.float32)
        self.state = WorkerState.DOWN
        self.running = True
        self.counters = {"restored_requests": 0, "restored_pages": 0, "bad_commands": 0, "ckpt_export_s": 0.0}
        self._last_ckpt_report = 0.0
        self._stats_at = -STATS_EVERY_S
        # --ckpt-export-interval-ms: the earliest time the next export may run
        self._next_export_at = 0.0
        self._export_interval_s = max(0.0, args.ckpt_export_interval_ms) / 1e3
        self._clock = time.monotonic  # the interval's clock (tests replace it)
        self._restoring: set[str] = set()  # restored requests whose store pages the engine may still read
        # busy turns of the engine loop and their seconds by part: commands polled, the step, its
        # outputs sent, pages exported, stats published (what the time between steps is made of)
        self.loop_s = [0, 0.0, 0.0, 0.0, 0.0, 0.0]
        self._store_alloc: threading.Thread | None = None
        self._store_alloc_out: dict = {}
        # --device-share slots: device work only inside this worker's slot (None: the device is its own,
        # or shared freely)
        self.slots = (SlotSchedule(args.slot_index, args.slot_count, args.slot_ms / 1e3)
                      if args.slot_count > 1 else None)
        self.step_times = LiveStepTime()  # this worker's step-time model, from its own steps (goodput rule)
        self._slot_used = -1.0  # start of the last slot a step ran in (slots_used counts distinct ones)
        self._slot_waiting_since: float | None = None  # with work, no step since (a starved slot is logged)
        if self.slots is not None:
            self.counters.update(slot_steps=0, slots_used=0, slot_overruns=0, slot_overrun_s=0.0,
                                 slot_wait_s=0.0, slot_late_starts=0)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.hb.start()
        self.kv_tx.start()
        self.kv_rx.start()
        self.ctrl.send("HELLO", {"worker": self.id, "pid": os.getpid(), "data_addr": self.data.address,
                                 "kv_addr": self.kv_rx.address, "device": self.device, "host": self.args.host})
        if self.features.checkpointing is not None:
            self._allocate_store()
        draft_dir = self._draft_dir()
        if self.epoch <= 1 and self.features.speculation and draft_dir is not None:
            draft_cache.stage_in_background(draft_dir)  # resident for a later restart of any worker of this node
        resident = draft_cache.resident_copy(draft_dir) if draft_dir is not None else None
        speculative_restart = (self.features.speculation and self.epoch > 1 and self.args.draft_model
                               and (resident is not None or self.args.draft_first))
        if speculative_restart:
            self._load_progressively(resident)
        else:
            self._load_plain()

    def _draft_dir(self):
        if not self.args.draft_model:
            return None
        try:
            return resolve_model_dir(self.args.draft_model)
        except (OSError, ValueError):
            return None

    def _allocate_store(self) -> None:
        """All of the checkpoint store's memory, now, in the background: it overlaps the weight load,
        and storing a page never allocates (pinned) memory while serving (see ckpt_store)."""
        page, out = self._page_nbytes(), self._store_alloc_out

        def allocate():
            t0 = time.monotonic()
            try:
                self.store.allocate(page)
                out["ckpt_alloc_s"] = time.monotonic() - t0
            except BaseException as e:  # raised again on the main thread, before SERVING
                out["error"] = e

        self._store_alloc = threading.Thread(target=allocate, daemon=True, name="ckpt-alloc")
        self._store_alloc.start()

    def _store_ready(self) -> dict:
        """Wait for the store allocation; its seconds and how long SERVING waited for it."""
        if self._store_alloc is None:
            return {}
        t0 = time.monotonic()
        self._store_alloc.join()
        self._store_alloc = None
        if "error" in self._store_alloc_out:
            raise RuntimeError("allocating the checkpoint store failed") from self._store_alloc_out["error"]
        return {"ckpt_alloc_s": self._store_alloc_out["ckpt_alloc_s"], "ckpt_alloc_wait_s": time.monotonic() - t0}

    def _set_state(self, state: WorkerState, **info) -> None:
        if state is WorkerState.SERVING:  # a holder must have all of its store memory (placement: SERVING only)
            info = {**self._store_ready(), **info}
        self.state = state
        self.ctrl.send("STATE", {"state": state.value, "info": info})

    def _load_plain(self) -> None:
        self._set_state(WorkerState.SWITCHING)
        t0 = time.monotonic()
        host = self._read_target()
        self._serve(host, disk_to_host_s=time.monotonic() - t0)

    def _load_progressively(self, resident) -> None:
        """LUMEN mechanism 3: a draft assists a partner while the target's weights load in the background.

        With the draft resident in host memory (`draft_cache`), the target's disk read starts at once
        and the draft costs only its host -> device copy beside it. Without, the draft is read from
        disk first (the controller found that it pays), and the target read then reuses the files they
        share (a self-draft's embedding and head)."""
        self._set_state(WorkerState.LOADING_DRAFT)
        t0 = time.monotonic()
        loaded: dict = {}
        shared_reads = None if resident is not None else SharedReads()

        def load_target():
            loaded["target_read_start_s"] = time.monotonic() - t0
            try:
                loaded["state"] = self._read_target(shared_reads)
                loaded["disk_to_host_s"] = time.monotonic() - t0
            except BaseException as e:  # raised again on the main thread below
                loaded["error"] = e

        loader = threading.Thread(target=load_target, daemon=True, name="target-loader")
        if resident is not None:
            loader.start()
        self.drafter = Drafter(self.push.send, str(resident or self.args.draft_model), self.args.spec_k,
                               device=self.device, dtype=self.dtype, block_size=self.args.block_size,
                               num_blocks=self.args.num_blocks, shared_reads=shared_reads,
                               pin=draft_cache.pin_resident() if resident is not None else None)
        t_draft = time.monotonic() - t0
        if resident is None:
            loader.start()
        self._set_state(WorkerState.LOADING_DRAFT, draft_load_s=t_draft, draft_ready=1,
                        draft_resident=int(resident is not None), **self.drafter.load_phases)
        drafted = False
        while loader.is_alive() and self.running:
            # wait (woken at once by a message) unless the last round drafted: with every guess K
            # tokens ahead there is nothing to do until the partner commits, and spinning would take
            # the CPU from the partner on a small machine
            # (with a time slot, a draft step waits for it: until then only messages)
            wait = self._slot_wait_s(self.drafter.expected_round_s()) if self.drafter is not None else 0.0
            self._poll(timeout_ms=5 if not drafted else min(5, math.ceil(wait * 1e3)))
            if self.drafter is None or self._slot_wait_s(self.drafter.expected_round_s()) > 0:
                continue
            drafted = self.drafter.round()
        if not self.running:
            # told to stop while assisting (the cluster is shutting down): nothing to switch to. Let
            # a read in progress end rather than exit under it (a native abort at interpreter exit)
            loader.join(timeout=2.0)
            return
        if "error" in loaded:
            raise RuntimeError("loading the target weights failed") from loaded["error"]
        t1 = time.monotonic()
        stats = self.drafter.stats() if self.drafter else {}
        self.drafter = None  # release the draft before the target lands on the device
        self._set_state(WorkerState.SWITCHING, draft_load_s=t_draft, assist_s=t1 - t0,
                        disk_to_host_s=loaded.get("disk_to_host_s", 0.0),
                        target_read_start_s=loaded.get("target_read_start_s", 0.0),
                        target_reused_bytes=shared_reads.reused_bytes if shared_reads is not None else 0, **stats)
        self._serve(loaded["state"])

    def _read_target(self, shared_reads: SharedReads | None = None) -> dict:
        """The target's weights on the host (pinned for a GPU: host -> device copies at full
        bandwidth); files the draft just read for this same load (`shared_reads`) are not read twice."""
        if self.epoch > 1:
            _injected_slow_disk()  # before the read: as on a slow disk, the weights exist only once read
        return read_weights_to_host(self.model_dir, dtype=self.dtype, pin=self.device.startswith("cuda"),
                                    shared_reads=shared_reads)

    def _serve(self, host_state: dict, **phases) -> None:
        """Both load paths end here, still SWITCHING: host -> device, warm-up, then SERVING."""
        t = time.monotonic()
        phases.update(self._build_engine(host_state))
        phases["host_to_device_s"] = time.monotonic() - t  # both parts below: the weights, then the engine
        gate = self._warmup_gate if self.slots is not None else None
        self._set_state(WorkerState.SERVING, **phases, **warm_up(self.engine, before_step=gate))

    @property
    def model_dir(self):
        return resolve_model_dir(self.args.model)

    def _build_engine(self, host_state: dict) -> dict[str, float]:
        """The engine on the device from host weights; returns the seconds of its two parts."""
        self._next_export_at = 0.0  # a new engine's first pages leave at once
        t = time.monotonic()
        config = read_config(self.model_dir) if host_state else None
        model = build_model_from_host(config, host_state, self.device, self.dtype,
                                      before_copy=self._copy_gate if self.slots is not None else None)
        t_weights = time.monotonic() - t
        cfg = EngineConfig(block_size=self.args.block_size, num_blocks=self.args.num_blocks,
                           max_batch=self.args.max_batch, chunk_tokens=self.args.chunk_tokens,
                           deterministic=self.args.deterministic, device=self.device, dtype=self.dtype,
                           # no checkpointing, no page export: no staging ring (256 MiB pinned on a GPU)
                           export_slots=EngineConfig.export_slots if self.features.checkpointing else 0)
        self.engine = Engine(model, cfg)
        mc = self.engine.model_config
        self.page_shape = (mc.num_layers, 2, self.args.block_size, mc.num_kv_heads, mc.head_dim)
        return {"weights_to_device_s": t_weights, "engine_init_s": time.monotonic() - t - t_weights}

    # ------------------------------------------------------------------ time slots
    def _slot_wait_s(self, step_s: float) -> float:
        """0 if a device step of `step_s` may start now, else how long until this worker's slot. A step
        of unknown length (0: nothing measured yet, e.g. the first after the warm-up or a cold CUDA
        graph) counts as half a slot. (As a whole slot it could start only in the first tenth of one,
        and a busy loop missed that window for ever.)"""
        if self.slots is None:
            return 0.0
        return self.slots.wait_s(time.monotonic(), step_s or UNKNOWN_STEP_SLOT_SHARE * self.slots.slot_s)

    def _wait_for_slot(self, step_s: float) -> None:
        """Block until a device step of `step_s` may start (load-time work: weight copies, warm-up)."""
        while (wait := self._slot_wait_s(step_s)) > 0:
            time.sleep(wait)

    def _slot_step_began(self, started: float) -> bool:
        """Whether a step the loop decided to run may really start at `started` (it may have been
        descheduled past its slot's end meanwhile: then it waits for the next slot)."""
        if self.slots is None:
            return True
        if self.slots.owner(started) != self.slots.index:
            self.counters["slot_late_starts"] += 1
            return False
        return True

    def _slot_step_ended(self, started: float, ended: float) -> None:
        c = self.counters
        c["slot_steps"] += 1
        start = self.slots.window(started)[0]
        if start != self._slot_used:
            self._slot_used = start
            c["slots_used"] += 1
        over = self.slots.overrun_s(started, ended)
        if over > 0:  # the estimate was short: the step ran into the next worker's slot
            c["slot_overruns"] += 1
            c["slot_overrun_s"] += over

    def _copy_gate(self, nbytes: int) -> None:
        # host -> device at ~25 GB/s pinned (55 measured on an H200), a dtype conversion at ~5 GB/s on a CPU
        self._wait_for_slot(nbytes / (25e9 if self.device.startswith("cuda") else 5e9))

    def _warmup_gate(self) -> None:
        self._wait_for_slot(self.engine.expected_step_s())

    # ------------------------------------------------------------------ main loop
    def run(self) -> None:
        poller_timeout = 20
        clock, spent = time.perf_counter, self.loop_s
        while self.running:
            t0 = clock()
            self.hb.loop_at = time.monotonic()
            busy = self.engine is not None and self.engine.has_work()
            self._poll(timeout_ms=0 if busy else poller_timeout)
            t1 = t2 = t3 = clock()
            if not busy:
                t0 = t1  # an idle wait for work is not loop cost
            stepped = self.engine is not None and self.engine.has_work()
            started = time.monotonic()
            if stepped and self.slots is not None:
                # not this worker's turn on the device: it waits for its slot, polling, and the turn goes
                # on below without a step (pages due, restores released, stats)
                stepped = self._slot_turn() and self._slot_step_began(started := time.monotonic())
            if stepped:
                if self.verifier is not None:
                    self.verifier.before_step(self.engine)
                outputs = self.engine.step()
                ended = time.monotonic()
                t2 = clock()
                if self.slots is not None:
                    self._slot_step_ended(started, ended)
                if self.step_log is not None:
                    self.step_log.record(self.engine, started, ended)
                self.step_times.record(self.engine.last_step)
                self._send_outputs(outputs)
                if self.verifier is not None:
                    self.verifier.after_step(self.engine, outputs)
                t3 = clock()
            self._stream_pages()
            t4 = clock()
            if self._restoring:
                self._release_restored()
            self._publish_stats()
            if stepped:  # where a busy turn's time goes (stats: loop_<part>_s); a few clock reads
                t5 = clock()
                spent[0] += 1
                spent[1] += t1 - t0
                spent[2] += t2 - t1
                spent[3] += t3 - t2
                spent[4] += t4 - t3
                spent[5] += t5 - t4

    def _slot_turn(self) -> bool:
        """Whether the next step fits in this worker's slot now; if not, wait for it (at most the
        poller's 20 ms at a time, taking commands and data meanwhile) and say no."""
        wait = self._slot_wait_s(self.engine.expected_step_s())
        if wait <= 0:
            self._slot_waiting_since = None
            return True
        t = time.monotonic()
        self._poll(timeout_ms=max(1, min(20, math.ceil(wait * 1e3))))
        self.counters["slot_wait_s"] += time.monotonic() - t
        # woken at the slot's start: step now, before the rest of the loop's turn (a long step may only
        # start near its slot's start, and a busy turn could carry it past that, cycle after cycle: a
        # time-sliced H100 worker starved so, 2026-12-07)
        if self._slot_wait_s(self.engine.expected_step_s()) <= 0:
            self._slot_waiting_since = None
            return True
        self._note_slot_starvation(t)
        return False

    def _note_slot_starvation(self, now: float) -> None:
        """A worker with work that has not stepped for many cycles says so (once per STARVED_LOG_S): a
        slot it never manages to use shows no other sign but requests that never finish."""
        since = self._slot_waiting_since
        if since is None:
            self._slot_waiting_since = now
        elif now - since > STARVED_LOG_S:
            self._slot_waiting_since = now
            log.warning("worker %d has had work without a step for %.0f s: its next step is expected to take "
                        "%.1f ms, its slot is %.1f ms (%d slots used, %d late starts)", self.id, now - since,
                        self.engine.expected_step_s() * 1e3, self.slots.slot_s * 1e3,
                        self.counters["slots_used"], self.counters["slot_late_starts"])

    def _poll(self, timeout_ms: int) -> None:
        if self._poller is None:  # built once: this runs on every turn of the engine loop
            self._poller = zmq.Poller()
            self._poller.register(self.ctrl.socket, zmq.POLLIN)
            self._poller.register(self.data.socket, zmq.POLLIN)
        ready = dict(self._poller.poll(timeout_ms))
        if self.ctrl.socket in ready:
            while (msg := self.ctrl.recv(0)) is not None:
                self._on_command(msg)
        if self.data.socket in ready:
            while (msg := self.data.recv(0)) is not None:
                self._on_data(msg)

    # ------------------------------------------------------------------ control plane
    def _on_command(self, msg) -> None:
        body = msg.body
        if msg.src != "controller" or body.get("to_ep") != self.epoch:
            self.counters["bad_commands"] += 1
            return
        t = msg.type
        try:
            if t == "ADD":
                tags = bytes(msg.frames[1])
                self._add(body, frame_ints(msg.frames[0]),
                          [tags[i:i + TAG_BYTES] for i in range(0, len(tags) - TAG_BYTES + 1, TAG_BYTES)])
            elif t == "ABORT":
                if self.engine is not None:
                    self.engine.abort(body["req"])
                self.holders.pop(body["req"], None)
            elif t == "HOLDER":
                self._set_holders(body["req"], body["holders"])
            elif t == "RESERVE":
                ok = self.store.reserve(body["req"], body["bytes"], body["owner"])
                if not ok:
                    log.warning("checkpoint budget exhausted: request %s unprotected here", body["req"])
                self.ctrl.send("RESERVED", {"req": body["req"], "gen": body["gen"], "ok": int(ok)})
            elif t == "RELEASE":
                self.store.release(body["req"])
            elif t == "ASSIST":
                self._on_assist(body)
            elif t == "SHUTDOWN":
                self.running = False
        except (ValueError, KeyError, TypeError) as exc:
            # a command we cannot carry out must not take the worker down
            self.counters["bad_commands"] += 1
            log.warning("rejected %s: %s", t, exc)

    def _add(self, body: dict, context: list[int], tags: list[bytes]) -> None:
        rid = body["req"]
        n_prompt = body["n_prompt"]
        if self.engine is None or not 0 < n_prompt <= len(context):
            self._finish_error(rid, "worker is not ready" if self.engine is None else "bad context length")
            return
        p = body["params"]
        try:
            params = SamplingParams(max_tokens=p["max_tokens"], temperature=p["temperature"], top_p=p["top_p"],
                                    top_k=p["top_k"], seed=p["seed"], ignore_eos=p["ignore_eos"],
                                    stop_token_ids=tuple(p.get("stop_token_ids", ()))).validate()
        except (KeyError, TypeError, ValueError) as exc:
            self._finish_error(rid, f"bad sampling parameters: {exc}")
            return
        pages: list[KVPage] = []
        if body["restore_pages"] > 0:
            pages = self._restorable_pages(rid, tags[: body["restore_pages"]])
            self.counters["restored_requests"] += 1
            self.counters["restored_pages"] += len(pages)
        try:
            self.engine.add_request(rid, context[:n_prompt], params, generated_ids=context[n_prompt:],
                                    restored_pages=pages)
        except ValueError as exc:
            self._finish_error(rid, str(exc))
        finally:
            # the engine copies the pages into its blocks when it admits the request (on CUDA
            # asynchronously, straight from the store's slots): only then may the slots be reused
            if pages and self.engine.restore_pending(rid):
                self._restoring.add(rid)
            else:
                self.store.release(rid)

    def _release_restored(self) -> None:
        """Free the store's copy of restored requests that the engine has finished reading."""
        for rid in [r for r in self._restoring if not self.engine.restore_pending(r)]:
            self._restoring.discard(rid)
            self.store.release(rid)

    def _restorable_pages(self, rid: str, tags: list[bytes]) -> list[KVPage]:
        """The longest contiguous prefix of stored pages whose tags match the gateway's history."""
        n_valid = self.store.valid_prefix(rid, tags)
        shape, dtype = self.page_shape, self.engine.model.dtype
        pages = []
        for index, end_pos, data in self.store.get_pages(rid, n_valid):
            tensor = data.view(dtype).view(shape)
            pages.append(KVPage(rid, index, end_pos, tags[index], tensor))
        log.info("request %s: restoring %d of %d pages", rid, len(pages), len(tags))
        return pages

    def _finish_error(self, rid: str, message: str) -> None:
        log.warning("request %s failed here: %s", rid, message)
        self.ctrl.send("OUT", {"items": [[rid, 0, "error:" + message[:200]]]}, [ints_frame([])])

    def _send_outputs(self, outputs) -> None:
        if not outputs:
            return
        items, ids = [], []
        for out in outputs:
            items.append([out.req_id, len(out.token_ids), out.finish_reason or "" if out.finished else ""])
            ids.extend(out.token_ids)
            if out.finished:
                self.holders.pop(out.req_id, None)
        self.ctrl.send("OUT", {"items": items}, [ints_frame(ids)])

    # ------------------------------------------------------------------ checkpoint streaming
    def _set_holders(self, rid: str, holders) -> None:
        """The controller's list of rid's confirmed checkpoint copies, first copy first ([holder id, KV
        address] each; empty: none). A holder new to the request needs every page from the first, so the
        export rewinds; holders that already had its pages get only those from where the export stood."""
        old = self.holders.get(rid, [])
        new = [(int(h), a) for h, a in holders if isinstance(h, int) and h >= 0 and isinstance(a, str) and a]
        known = {(h, a): first for h, a, first in old}
        fresh = [c for c in new if c not in known]
        stood = self.engine.exported_pages(rid) if fresh and self.engine is not None else 0
        copies = [(h, a, max(known[(h, a)], stood) if (h, a) in known else 0) for h, a in new]
        if copies:
            self.holders[rid] = copies
        else:
            self.holders.pop(rid, None)
        if fresh and self.engine is not None:
            self.engine.rewind_page_export(rid, 0)
        # Copies change only when a holder died, the request moved or it was re-protected; once no
        # request streams to an address any more, close the page socket to it.
        gone = {a for _, a, _ in old} - {a for _, a, _ in copies}
        if gone:
            live = {a for cs in self.holders.values() for _, a, _ in cs}
            for addr in gone - live:
                self.kv_tx.forget(addr)

    def _page_wanted(self, rid: str, addr: str) -> bool:
        """Whether rid still streams to the holder at addr (the sender thread asks; one dict read)."""
        return any(a == addr for _, a, _ in self.holders.get(rid, ()))

    def _stream_pages(self) -> None:
        """Hand newly completed pages of protected requests to the sender thread.

        Only requests that filled a page since the last export are looked at (`Engine.pages_due`), and
        their pages leave in one export, as many as the engine's export ring has free slots for (the
        rest stay pending in the engine, in order, and go on a later turn); the engine copies them
        device -> host asynchronously and the sender waits for the copy, MACs and sends each page on
        its own thread, so the engine step never waits on the copy, the MAC or the network, and no
        host memory is allocated for it. (Scanning every protected request instead cost 0.35 us per
        request per step on the 2-core box.)

        --ckpt-export-interval-ms (default 100) spaces the exports at least that far apart: pages
        due sooner after the last export wait and leave together, so a request's first page leaves at
        once and a steady stream costs at most one export per interval. An export costs the engine
        thread ~0.1-0.2 ms per call plus ~0.015 ms per page on an H200 (benchmarks/export_cost.py):
        after every step (0) that was 1.2-2.3% of TPOT between steps at Qwen3-1.7B, at most 100 ms
        apart 0.4-1.0% (docs/benchmarks.md, 2026-12-04), at the price of a checkpoint up to one interval
        behind (at most a page or two of recompute after a failure). Pages that did not fit in the
        export ring keep their place: they go on the next turn, not an interval later.
        """
        if self.engine is None:
            return
        if self._export_interval_s:  # the engine keeps the due requests meanwhile, in order
            now = self._clock()
            if now < self._next_export_at:
                return
        due = self.engine.pages_due()
        if not due:
            return
        holders = self.holders
        protected = [rid for rid in due if rid in holders]  # the others come back with their holder
        if protected:
            t0 = time.perf_counter()
            for page in self.engine.export_pages(protected):
                for rank, (_, addr, first) in enumerate(holders[page.req_id]):
                    if page.index >= first:
                        self.kv_tx.submit(addr, page, later_copy=rank > 0)
            # engine-thread time of checkpointing (stats: ckpt_export_s), to compare with step time
            self.counters["ckpt_export_s"] += time.perf_counter() - t0
            if self._export_interval_s:
                # pages that did not all fit in the ring (no step ran since) go on the next turn, as
                # the per-step path retries them; otherwise the next export waits the interval
                self._next_export_at = now if self.engine.has_pages_due() else now + self._export_interval_s

    # ------------------------------------------------------------------ data plane
    def _on_data(self, msg) -> None:
        t = msg.type
        if t == "MIRROR" and self.drafter is not None:
            self.drafter.on_mirror(msg)
        elif t == "PROPOSE" and self.verifier is not None:
            self.verifier.on_proposals(msg)

    def _page_nbytes(self) -> int:
        if self._page_nbytes_cache is None:
            cfg = read_config(self.model_dir)
            self._page_nbytes_cache = cfg.kv_bytes_per_token(self.dtype) * self.args.block_size
        return self._page_nbytes_cache

    def _on_assist(self, body: dict) -> None:
        role = body["role"]
        # MIRROR / PROPOSE go only to the current partner: a pairing that ends (the partner died or
        # switched to its target) or is replaced leaves its data socket unused, so close it
        before = {x.addr for x in (self.verifier, self.drafter) if x is not None and x.addr}
        if role == "verifier":
            self.verifier = Verifier(self.push.send, self.counters, body["peer"], body["addr"], body["k"],
                                     prior=self.args.spec_acceptance, step_model=self.step_times.model)
        elif role == "drafter" and self.drafter is not None:
            self.drafter.pair(body["peer"], body["addr"])
            self._set_state(WorkerState.ASSISTING)
        elif role == "none":
            self.verifier = None
            if self.drafter is not None and self.drafter.peer is not None:
                self.drafter.pair(None, "")
                self._set_state(WorkerState.LOADING_DRAFT)
        after = {x.addr for x in (self.verifier, self.drafter) if x is not None and x.addr}
        for addr in before - after:
            self.push.forget(addr)

    # ------------------------------------------------------------------ stats
    def _publish_stats(self) -> None:
        """The stats the heartbeat carries (every hb interval, 100 ms by default): rebuilt at most
        every STATS_EVERY_S, not on every turn of the loop (~30 us a time on the 2-core box)."""
        now = time.monotonic()
        if now - self._stats_at < STATS_EVERY_S:
            return
        self._stats_at = now
        tx = self.kv_tx
        stats = dict(self.counters, pages_sent=tx.sent, pages_sent_later_copies=tx.sent_later_copies,
                     pages_refused=tx.refused, pages_stalled=tx.stalled,
                     kv_wait_s=round(tx.waited_s, 3), data_peers=self.push.num_peers,
                     data_peers_forgotten=self.push.forgotten)
        if self.kv_tx.pool is not None:  # PUSH sockets to holders (owned by the sender thread; read only)
            stats.update(kv_peers=self.kv_tx.pool.num_peers, kv_peers_forgotten=self.kv_tx.pool.forgotten)
        stats.update({f"drop_{k}": v + self.kv_rx.codec.stats.get(k, 0) for k, v in self.codec.stats.items()})
        if self.engine is not None:
            stats.update(self.engine.stats())
            # what the controller prices assistance with (policy.pairing_gain): the next step's load and
            # this worker's fitted step-time model
            decoding, context, queued_tokens, queued_requests, chunk = self.engine.load_summary()
            stats.update(load_decoding=decoding, load_context_tokens=context, load_queued_tokens=queued_tokens,
                         load_queued_requests=queued_requests, chunk_tokens=chunk)
            coef = self.step_times.coef()
            if coef is not None:
                stats.update({f"step_c{i}": c for i, c in enumerate(coef)})
            if self.slots is not None:  # its steps run in one slot of each cycle: a new request waits that much longer
                stats["q_wait_s"] *= self.slots.count
        store = self.store.stats()
        stats.update({f"ckpt_{k}": v for k, v in store.items() if isinstance(v, (int, float))})
        # why a holder refused pages, only the reasons seen (a restore shorter than the stream says why)
        stats.update({f"ckpt_rejected_{k}": v for k, v in store["rejected"].items() if v})
        stats.update(pages_forgotten=tx.forgotten, pages_obsolete=tx.obsolete, kv_early_held=self.kv_rx.early_held)
        # where a page's time goes (seconds summed over pages): which side of the stream is the bottleneck
        stats.update(kv_tx_queued_s=round(tx.queued_s, 3), kv_tx_queued_max_s=round(tx.queued_max_s, 3),
                     kv_tx_copy_wait_s=round(tx.copy_wait_s, 3), kv_tx_send_s=round(tx.send_s, 3),
                     kv_rx_pages=self.kv_rx.pages_in, kv_rx_busy_s=round(self.kv_rx.busy_s, 3))
        turns, *seconds = self.loop_s
        stats.update(loop_turns=turns, **{f"loop_{part}_s": round(t, 4) for part, t in zip(LOOP_PARTS, seconds, strict=True)})
        # CPU time of the engine loop and of the page threads: theirs bounds what they can take from
        # the loop through the GIL (their MACs and copies run without it)
        stats.update(cpu_loop_s=round(time.thread_time(), 3), cpu_kv_tx_s=_thread_cpu_s(tx),
                     cpu_kv_rx_s=_thread_cpu_s(self.kv_rx))
        stats = {k: v for k, v in stats.items() if isinstance(v, (int, float, str))}
        self.hb.stats = trim_stats(stats, HB_MAX_STATS - len(HB_OWN_STATS))  # the heartbeat thread adds these
        if now - self._last_ckpt_report > 0.2:
            self._last_ckpt_report = now
            valid = {rid: self.store.contiguous_pages(rid) for rid in self.store.requests()[:MAX_CKPT_REPORT]}
            if valid:
                self.ctrl.send("CKPT", {"valid": valid})

    def close(self) -> None:
        self.hb.stop()
        self.kv_tx.stop()
        self.kv_rx.stop()
        for thread in (self.kv_tx, self.kv_rx):  # their sockets must close before the context goes
            if thread.is_alive():
                thread.join(timeout=1.0)
        self.ctx.destroy(linger=0)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=os.environ.get("LUMEN_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s [worker {args.worker_id}.{args.epoch}] %(levelname)s %(message)s")
    if args.device == "cpu":
        # several workers share a few cores: one thread each keeps them from thrashing. Under slots a
        # worker runs on its lane's cores (ClusterConfig.cpu_cores_of), a thread per core
        cores = [int(c) for c in args.cpu_cores.split(",") if c.strip()]
        if cores:
            os.sched_setaffinity(0, cores)
        torch.set_num_threads(int(os.environ.get("LUMEN_WORKER_THREADS") or len(cores) or 1))
    worker = Worker(args)
    signal.signal(signal.SIGTERM, lambda *_: setattr(worker, "running", False))
    profile_dir = os.environ.get("LUMEN_WORKER_PROFILE")  # developer aid: cProfile of the whole worker
    profiler = None
    if profile_dir:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    try:
        worker.start()
        worker.run()
    finally:
        worker.close()
        if worker.step_log is not None:
            worker.step_log.close()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"worker{args.worker_id}.{args.epoch}.prof"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
