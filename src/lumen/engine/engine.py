"""The engine: one worker's model replica behind add_request / step / abort.

Not thread-safe: one caller drives it (the worker's loop), calling `step()` repeatedly.
"""

from __future__ import annotations

import itertools
import operator
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

from .block_manager import BlockManager, cdiv
from .kv_pages import KVPage, chain_tag
from .model_runner import EXPORT_RING_BYTES, EXPORT_SLOT_PAGES, EXPORT_SLOTS, ForwardItem, ModelRunner
from .params import SamplingParams
from .sampler import Sampler
from .scheduler import ScheduledSeq, Scheduler
from .sequence import Sequence, SequenceStatus
from .step_ema import StepEma


@dataclass
class EngineConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: from gpu_memory_utilization on CUDA, cpu_kv_bytes on CPU
    max_batch: int = 512
    chunk_tokens: int | None = None  # per-step token budget; None: 1024 on CUDA, 256 on CPU
    deterministic: bool = False  # CPU float64 test mode (converts the model in place)
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: keep the model's dtype (float64 when deterministic)
    cuda_graphs: bool = True
    compile: bool = True  # CUDA: torch.compile the RMSNorms (fewer tiny kernels per decode step)
    gpu_memory_utilization: float = 0.9
    cpu_kv_bytes: int = 256 << 20
    seed: int = 0  # draws the per-request seed of requests that give none
    draft: Any = None  # a LoadedModel (or Decoder) used as co-located draft: proposes for every decode
    num_draft_tokens: int = 4
    draft_num_blocks: int | None = None  # None: as many blocks as the target pool
    # KV page export staging ring (model_runner.EXPORT_*), allocated with the engine: up to export_slots
    # slots of export_slot_pages pages, within export_ring_bytes. 0 slots: this engine never exports.
    export_slots: int = EXPORT_SLOTS
    export_slot_pages: int = EXPORT_SLOT_PAGES
    export_ring_bytes: int = EXPORT_RING_BYTES


@dataclass
class StepOutput:
    req_id: str
    token_ids: list[int]  # committed this step (1 .. K+1; empty only when finished without a token)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | None


def _token(t) -> int:
    """An integer token id (ints, numpy / 0-d torch integers); floats, strings and bools are errors."""
    if isinstance(t, bool):
        raise TypeError(f"{t!r}")
    return operator.index(t)


def _unwrap(model_or_loaded):
    """Accept a LoadedModel (has .model) or a bare Decoder."""
    return getattr(model_or_loaded, "model", model_or_loaded)


class Engine:
    def __init__(self, model, config: EngineConfig | None = None):
        cfg = self.config = config or EngineConfig()
        dev = torch.device(cfg.device)
        if cfg.deterministic and dev.type != "cpu":
            raise ValueError("deterministic mode runs on CPU (float64)")
        dtype = torch.float64 if cfg.deterministic else cfg.dtype
        self.model = _unwrap(model)
        if dtype is not None:
            self.model.to(device=dev, dtype=dtype)
        else:
            self.model.to(device=dev)
        self.model.eval()
        self.model_config = self.model.config
        self.device = dev
        self.block_size = cfg.block_size
        self.max_model_len = self.model_config.max_position
        self.chunk_tokens = cfg.chunk_tokens or (1024 if dev.type == "cuda" else 256)
        if self.chunk_tokens < 1 or cfg.max_batch < 1:
            raise ValueError("chunk_tokens and max_batch must be >= 1")

        draft_model = None
        if cfg.draft is not None:
            draft_model = _unwrap(cfg.draft)
            draft_model.to(device=dev, dtype=self.model.dtype)
            draft_model.eval()
            if draft_model.config.vocab_size > self.model_config.vocab_size:
                raise ValueError("draft vocabulary is larger than the target's")
        num_blocks = cfg.num_blocks or self._auto_num_blocks(draft_model)
        self.block_manager = BlockManager(num_blocks, cfg.block_size)
        self.runner = ModelRunner(self.model, num_blocks, cfg.block_size, max_batch=cfg.max_batch,
                                  cuda_graphs=cfg.cuda_graphs and not cfg.deterministic,
                                  compile_norms=cfg.compile and not cfg.deterministic,
                                  export_slots=cfg.export_slots, export_slot_pages=cfg.export_slot_pages,
                                  export_ring_bytes=cfg.export_ring_bytes)
        self.scheduler = Scheduler(self.block_manager, cfg.max_batch, self.chunk_tokens, on_admit=self._on_admit)
        self.sampler = Sampler()
        self.draft = None
        if draft_model is not None:
            from .draft import DraftProposer
            self.draft = DraftProposer(draft_model, cfg.num_draft_tokens, cfg.block_size,
                                       cfg.draft_num_blocks or num_blocks, self.chunk_tokens,
                                       max_batch=cfg.max_batch, cuda_graphs=cfg.cuda_graphs and not cfg.deterministic)
        self._seqs: dict[str, Sequence] = {}
        # Requests that may have full pages not exported yet (KV export; see pages_due). Kept in step
        # with the sequences, so a caller that never exports (no checkpointing) costs a set add per
        # page boundary and nothing grows.
        self._pages_due: dict[str, None] = {}
        # restores whose host -> device copies may still run: req -> (event, source pages kept referenced)
        self._restores: dict[str, tuple[Any, list[KVPage]]] = {}
        self._rng = random.Random(cfg.seed)
        self._arrivals = 0
        self._eos = frozenset(self.model_config.eos_token_ids)
        self.last_step: dict[str, float] = {}
        self.step_ema = StepEma()  # wall time of prefilling and of decode-only steps
        self._counters = dict(steps=0, prefill_tokens=0, decode_tokens=0, restored_pages=0, restored_tokens=0,
                              rejected_pages=0, exported_pages=0, finished=0, aborted=0, spec_drafts=0,
                              spec_draft_tokens=0, spec_accepted_tokens=0, spec_stale=0,
                              export_deferred=0)  # exports that left pages of a request for a later step

    # ------------------------------------------------------------------ sizing
    def _auto_num_blocks(self, draft_model) -> int:
        mc, bs = self.model_config, self.block_size
        dtype = self.model.dtype
        per_block = bs * mc.kv_bytes_per_token(dtype)
        if draft_model is not None:
            per_block += bs * draft_model.config.kv_bytes_per_token(dtype)
        if self.device.type != "cuda":
            return max(cdiv(mc.max_position, bs) + 1, self.config.cpu_kv_bytes // per_block)
        from lumen.model import DenseKV
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        with torch.inference_mode():  # peak activations of the largest step
            n = min(self.chunk_tokens, mc.max_position)
            kv = DenseKV(mc, device=dev, dtype=dtype, capacity=n)
            h = self.model(torch.zeros(n, dtype=torch.int64, device=dev), torch.arange(n, device=dev), kv)
            self.model.logits(h[: min(n, self.config.max_batch)]).float()
            del kv, h
        torch.cuda.synchronize(dev)
        act_peak = torch.cuda.max_memory_allocated(dev) - before
        free, total = torch.cuda.mem_get_info(dev)
        used = total - free  # everything resident now: weights, other processes, the caching pool
        # Headroom: sampling temporaries ([batch, vocab] x a few fp32/int64 tensors) and decode gathers.
        sampling = self.config.max_batch * mc.vocab_size * 4 * 6
        from .model_runner import GATHER_TOKENS
        gather = GATHER_TOKENS * mc.kv_bytes_per_token(dtype) // mc.num_layers * 2
        budget = total * self.config.gpu_memory_utilization - used - act_peak - sampling - gather
        torch.cuda.empty_cache()
        n_blocks = int(budget // per_block)
        if n_blocks < 1:
            raise RuntimeError(f"no GPU memory left for the KV cache (budget {budget / 2**30:.2f} GiB)")
        return n_blocks

    # ------------------------------------------------------------------ requests
    def add_request(self, req_id: str, prompt_ids, params: SamplingParams | None = None,
                    generated_ids=(), restored_pages=()) -> None:
        """Queue a request. A resumed request passes the tokens it already generated (they count
        against max_tokens and are not emitted again) and optionally the leading KV pages of its
        context (index 0, 1, ...): the longest prefix of pages whose tags match the context is
        restored into fresh blocks and only the rest is prefilled (at least the last token, which
        must run to produce logits)."""
        params = (params or SamplingParams()).validate()
        if req_id in self._seqs:
            raise ValueError(f"duplicate request id {req_id!r}")
        try:
            prompt = [_token(t) for t in prompt_ids]
            generated = [_token(t) for t in generated_ids]
        except (TypeError, ValueError) as e:
            raise ValueError(f"token ids must be integers: {e}") from None
        if not prompt:
            raise ValueError("empty prompt")
        n = len(prompt) + len(generated)
        if n >= self.max_model_len:
            raise ValueError(f"prompt of {n} tokens does not fit the context length {self.max_model_len}")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt + generated):
            raise ValueError(f"token id out of range [0, {vocab})")
        if self.block_manager.blocks_for(n + 1) > self.block_manager.num_blocks:
            raise ValueError(f"prompt of {n} tokens needs more KV blocks than the pool has "
                             f"({self.block_manager.num_blocks} x {self.block_size} tokens)")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        self._arrivals += 1
        seq = Sequence(req_id, prompt, params, seed, self._arrivals, generated)
        seq.restored_pages = self._valid_pages(seq, list(restored_pages))
        self._seqs[req_id] = seq
        if len(generated) >= params.max_tokens:
            seq.finish_reason = "length"  # nothing left to generate; reported by the next step
        self.scheduler.add(seq)

    def _valid_pages(self, seq: Sequence, pages: list[KVPage]) -> list[KVPage]:
        """Longest prefix of complete pages that match seq's tokens (a bad page ends the prefix:
        everything after it is recomputed, never trusted)."""
        bs, mc = self.block_size, self.model_config
        shape = (mc.num_layers, 2, bs, mc.num_kv_heads, mc.head_dim)
        kv_dtype = self.runner.kv_pool.dtype
        good: list[KVPage] = []
        prev = b""
        n_given = len(pages)
        pages = [p for p in pages if isinstance(p, KVPage) and isinstance(p.index, int)
                 and isinstance(p.data, torch.Tensor)]
        for i, p in enumerate(sorted(pages, key=lambda p: p.index)):
            end = (i + 1) * bs
            if p.index != i or p.end_pos != end or end > len(seq):
                break
            p.wait()
            data = p.data
            if data.dtype == torch.uint8 and kv_dtype != torch.uint8 and data.is_contiguous():
                if data.numel() != torch.Size(shape).numel() * self.runner.kv_pool.element_size():
                    break
                data = data.view(-1).view(kv_dtype)
            if data.dtype != kv_dtype or data.numel() != torch.Size(shape).numel():
                break
            prev = chain_tag(prev, seq.token_ids[i * bs:end])
            if p.tag != prev:
                break
            good.append(KVPage(p.req_id, i, end, p.tag, data.reshape(shape), lease=p.lease))  # a view: same slot
        self._counters["rejected_pages"] += n_given - len(good)
        return good

    def _on_admit(self, seq: Sequence) -> None:
        if not seq.restored_pages:
            return
        pages, seq.restored_pages = seq.restored_pages, []
        n = len(pages)
        event = self.runner.write_blocks(seq.block_table[:n], [p.data for p in pages])
        if event is not None:  # CUDA: asynchronous copies straight from the pages' (pinned) memory
            for rid in [r for r, (ev, _) in self._restores.items() if ev.query()]:
                del self._restores[rid]
            self._restores[seq.req_id] = (event, pages)
        # Keep >= 1 token to run: its logits produce the next token (a fully restored, page-aligned
        # context rewrites its last slot with the same values).
        seq.num_computed_tokens = min(n * self.block_size, len(seq) - 1)
        seq.num_exported_pages = max(seq.num_exported_pages, n)  # the caller already holds these
        self._counters["restored_pages"] += n
        self._counters["restored_tokens"] += seq.num_computed_tokens

    def restore_pending(self, req_id: str) -> bool:
        """Whether the engine may still read the pages `req_id` was added with: not admitted yet, or
        their host -> device copies not finished. Their memory (the checkpoint store's slots) must not
        be reused until this is False."""
        seq = self._seqs.get(req_id)
        if seq is not None and seq.restored_pages:
            return True
        entry = self._restores.get(req_id)
        if entry is None:
            return False
        if entry[0].query():
            del self._restores[req_id]
            return False
        return True

    def abort(self, req_id: str) -> bool:
        seq = self._seqs.pop(req_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        self._pages_due.pop(req_id, None)
        seq.finish_reason = "abort"
        if self.draft is not None:
            self.draft.release(req_id)
        self._counters["aborted"] += 1
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def exported_pages(self, req_id: str) -> int:
        """Pages of a running request handed out so far (0 for an unknown request)."""
        seq = self._seqs.get(req_id)
        return seq.num_exported_pages if seq is not None else 0

    def rewind_page_export(self, req_id: str, page_index: int) -> None:
        """Export pages from `page_index` on again (a new holder needs every page from the start)."""
        seq = self._seqs.get(req_id)
        if seq is not None:
            seq.num_exported_pages = min(seq.num_exported_pages, max(0, page_index))
            self._pages_due[req_id] = None  # pages_due reports it again, even if no page filled since

    def decoding_sequences(self) -> list[tuple[str, list[int]]]:
        """(request id, token ids) of every running sequence that is decoding (assisted recovery
        mirrors these to a drafter). The lists are the engine's own: callers must not mutate them."""
        return [(s.req_id, s.token_ids) for s in self.scheduler.running if s.is_decoding]

    def propose(self, req_id: str, base_len: int, tokens) -> int:
        """Register draft tokens to verify in the next step, for a decoding sequence of current length
        base_len; returns how many were registered (0: none). Stale (length moved on) or unusable
        proposals are dropped and counted."""
        seq = self._seqs.get(req_id)
        toks = [int(t) for t in tokens]
        if (seq is None or seq.status is not SequenceStatus.RUNNING or not seq.is_decoding
                or len(seq) != base_len or not toks):
            self._counters["spec_stale"] += 1
            return 0
        toks = self._cap_proposal(seq, toks)
        if not toks:
            return 0
        seq.proposal = toks
        return len(toks)

    def _cap_proposal(self, seq: Sequence, toks: list[int]) -> list[int]:
        vocab = self.model_config.vocab_size
        k = min(len(toks), seq.params.max_tokens - seq.num_generated - 1, self.max_model_len - len(seq))
        toks = toks[:max(0, k)]
        for j, t in enumerate(toks):  # never feed the model an out-of-range id from the wire
            if not 0 <= t < vocab:
                return toks[:j]
        return toks

    # ------------------------------------------------------------------ step
    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        for seq in [s for s in self.scheduler.waiting if s.finish_reason == "length"]:
            self._finish(seq)  # resumed with max_tokens already reached
            outputs.append(StepOutput(seq.req_id, [], True, "length"))
        if self.draft is not None:
            self._draft_proposals()
        t0 = time.perf_counter()
        scheduled, starved = self.scheduler.schedule()
        for seq in starved:
            self._seqs.pop(seq.req_id, None)
            outputs.append(StepOutput(seq.req_id, [], True, seq.finish_reason))
        if not scheduled:
            return outputs
        outputs.extend(self._execute(scheduled))
        self._account(scheduled, time.perf_counter() - t0)
        return outputs

    def _execute(self, scheduled: list[ScheduledSeq]) -> list[StepOutput]:
        items = [ForwardItem(s.tokens, s.start, s.seq.block_table, s.num_logits) for s in scheduled]
        logits = self.runner.forward(items)
        sampling = [s for s in scheduled if s.sample]
        commits = self.sampler(logits, sampling) if sampling else []
        accepted = self.sampler.last_num_accepted if sampling else []
        outputs: list[StepOutput] = []
        c = self._counters
        for s, toks, acc in zip(sampling, commits, accepted, strict=True):
            if s.proposal:
                c["spec_drafts"] += 1
                c["spec_draft_tokens"] += len(s.proposal)
                c["spec_accepted_tokens"] += acc
            outputs.append(self._commit(s.seq, toks))
        bs, due = self.block_size, self._pages_due
        for s in scheduled:
            seq = s.seq
            if not s.sample:  # partial prefill chunk
                seq.num_computed_tokens += len(s.tokens)
            if seq.num_computed_tokens // bs > seq.num_exported_pages and seq.req_id in self._seqs:
                due[seq.req_id] = None  # a page became full (a finished request is no longer in _seqs)
        return outputs

    def _commit(self, seq: Sequence, toks: list[int]) -> StepOutput:
        p = seq.params
        seq.sampled = True
        new: list[int] = []
        reason = None
        for t in toks:
            seq.token_ids.append(t)
            new.append(t)
            if (t in self._eos and not p.ignore_eos) or t in p.stop_token_ids:
                reason = "stop"
            elif seq.num_generated >= p.max_tokens or len(seq) >= self.max_model_len:
                reason = "length"
            if reason:
                break
        # KV is valid for everything but the newest token (rejected proposals' slots are garbage
        # past that point and are simply overwritten later); keep blocks up to the next write.
        seq.num_computed_tokens = len(seq) - 1
        if reason:
            seq.finish_reason = reason
            self._finish(seq)
        else:
            self.block_manager.truncate(seq, len(seq))
        return StepOutput(seq.req_id, new, reason is not None, reason)

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self._seqs.pop(seq.req_id, None)
        self._pages_due.pop(seq.req_id, None)
        if self.draft is not None:
            self.draft.release(seq.req_id)
        self._counters["finished"] += 1

    def _account(self, scheduled: list[ScheduledSeq], dt: float) -> None:
        c = self._counters
        c["steps"] += 1
        prefill = sum(len(s.tokens) for s in scheduled if not s.is_decode)
        decodes = sum(1 for s in scheduled if s.is_decode)
        c["prefill_tokens"] += prefill
        c["decode_tokens"] += sum(len(s.tokens) for s in scheduled if s.is_decode)
        self.step_ema.observe(dt, prefill=bool(prefill))
        self.last_step = dict(num_prefill_tokens=prefill, num_decode_seqs=decodes,
                              total_context_tokens=sum(s.start + len(s.tokens) for s in scheduled),
                              step_time_s=dt,
                              num_decode_tokens=sum(len(s.tokens) for s in scheduled if s.is_decode))

    # ------------------------------------------------------------------ draft (co-located)
    def _draft_proposals(self) -> None:
        cands = [s for s in self.scheduler.running if s.is_decoding and s.proposal is None]
        if not cands:
            return
        for seq, toks in self.draft.propose(cands).items():
            toks = self._cap_proposal(seq, toks)
            if toks:
                seq.proposal = toks

    # ------------------------------------------------------------------ KV pages
    def pages_due(self) -> list[str]:
        """Requests that filled a page (or were rewound) since the last call, and forgets them: the
        candidates for `export_pages`. O(requests that filled a page), not O(running requests): the
        per-step cost of checkpointing on the engine thread. A request left out of the export (no
        holder yet) is reported again by `rewind_page_export` (which the worker calls when a holder
        is set) or when it fills its next page; one whose pages did not all fit in the export ring
        is reported again at once."""
        if not self._pages_due:
            return []
        due = list(self._pages_due)
        self._pages_due.clear()
        return due

    def has_pages_due(self) -> bool:
        """Whether `pages_due` would name any request (without forgetting them)."""
        return bool(self._pages_due)

    def export_pages(self, req_ids) -> list[KVPage]:
        """Pages of the given requests that became full (all their tokens committed and computed)
        since they were last exported, as host copies: one `read_blocks` for all of them (on CUDA one
        gather per ring slot and asynchronous copies; `page.wait()` before reading). Requests that
        are not running are skipped.

        At most the export ring's free capacity goes out per call, in the order of `req_ids` and of
        page index: a request whose pages do not all fit keeps the rest pending (from the first one
        not exported, so nothing is skipped or sent twice) and `pages_due` reports it again. A
        request that ends meanwhile drops its pending pages, as it drops those it never filled.
        Each page holds its ring slot (KVPage.lease) until it and every view of it are gone."""
        bs = self.block_size
        room = self.runner.export_capacity()
        todo: list[tuple[Sequence, int, int]] = []
        blocks: list[int] = []
        for rid in req_ids:
            seq = self._seqs.get(rid)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue
            full, first = seq.num_computed_tokens // bs, seq.num_exported_pages
            if full <= first:
                continue
            last = first + min(full - first, room - len(blocks))
            if last < full:
                self._pages_due[rid] = None  # the rest waits for ring slots
                self._counters["export_deferred"] += 1
            if last <= first:
                continue
            todo.append((seq, first, last))
            blocks.extend(seq.block_table[first:last])
            seq.num_exported_pages = last
        if not todo:
            return []
        data, event = self.runner.read_blocks(blocks)
        leases = data.leases
        pages: list[KVPage] = []
        k = 0
        for seq, first, last in todo:
            for i in range(first, last):
                pages.append(KVPage(seq.req_id, i, (i + 1) * bs, seq.page_tag(i, bs), data[k], event, leases[k]))
                k += 1
        self._counters["exported_pages"] += len(pages)
        return pages

    def new_completed_pages(self, req_id: str) -> list[KVPage]:
        """Pages of req_id that became full since the last call (`export_pages` of one request: those
        that do not fit in the export ring now come on a later call)."""
        return self.export_pages((req_id,))

    # ------------------------------------------------------------------ stats
    def q_wait_s(self) -> float:
        """Estimated queueing delay of a request arriving now, in seconds.

        With chunked prefill every step admits at most (chunk budget - running decodes) prefill
        tokens, so the tokens queued ahead (waiting contexts + the unfinished part of running
        prefills) drain in ceil(queued / that) steps, each costing about one recent prefill step
        (EMA of measured wall time; before any was measured, the decode-step EMA; 0 if neither).
        A full KV pool delays admission further; that part is not modelled.
        """
        sched = self.scheduler
        queued = self._queued_prefill_tokens()
        if not queued:
            return 0.0
        decodes = sum(1 for s in sched.running if s.is_decoding)
        per_step = max(1, self.chunk_tokens - decodes)
        step_s = self.step_ema.expected(prefill=True)
        return -(-queued // per_step) * step_s

    def load_summary(self) -> tuple[int, int, int, int, int]:
        """What the next step holds besides speculation: (decoding sequences, their context tokens,
        prompt tokens the next step could prefill, requests waiting for their first token, the step's
        token budget). The goodput rule of assisted recovery reads it.

        The prompt tokens are the running prefills' remainder and the waiting requests the batch has room
        to admit (the scheduler admits none past max_batch): prefill that cannot run this step takes no
        budget from verify positions. Counting the whole queue gave K = 0 to a partner at its batch cap
        step after step, its queue unmoved (CPU box, max_batch 4, 2026-12-07). The waiting requests still
        count as requests (they wait on this worker's steps)."""
        sched = self.scheduler
        decoding = [s for s in sched.running if s.is_decoding]
        prefilling = len(sched.running) - len(decoding)
        room = max(0, sched.max_batch - len(sched.running))
        return (len(decoding), sum(len(s) for s in decoding), self._queued_prefill_tokens(room),
                len(sched.waiting) + prefilling, self.chunk_tokens)

    def _queued_prefill_tokens(self, waiting: int | None = None) -> int:
        """Prompt tokens not yet computed: the unfinished part of running prefills and the contexts of
        the waiting requests (only the first `waiting` of them, if given)."""
        sched = self.scheduler
        return (sum(len(s) - s.num_computed_tokens for s in itertools.islice(sched.waiting, waiting))
                + sum(s.num_remaining for s in sched.running if not s.is_decoding))

    def expected_step_s(self) -> float:
        """Expected wall time of the next step, from the EMAs of measured steps: a prefill step's if it
        will run prompt work (a prefill under way, or a waiting request it can admit), else a
        decode step's (0 before any was measured). A worker
        with a time slot (lumen.policy.slots) starts the step only where this fits."""
        sched = self.scheduler
        bm = self.block_manager
        admits = (bool(sched.waiting) and len(sched.running) < sched.max_batch
                  and bm.can_allocate(bm.blocks_for(len(sched.waiting[0]))))  # as the scheduler admits
        prefill = admits or any(not s.is_decoding for s in sched.running)
        return self.step_ema.expected(prefill)

    def stats(self) -> dict[str, float]:
        bm = self.block_manager
        out: dict[str, float] = dict(self._counters)
        out.update(num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
                   kv_usage=bm.usage, free_blocks=bm.num_free, num_blocks=bm.num_blocks,
                   block_size=self.block_size, preemptions=self.scheduler.num_preemptions,
                   spec_dropped=self.scheduler.num_dropped_proposals,
                   ema_prefill_step_s=self.step_ema.prefill_s, ema_decode_step_s=self.step_ema.decode_s,
                   q_wait_s=self.q_wait_s())
        out["spec_acceptance"] = (out["spec_accepted_tokens"] / out["spec_draft_tokens"]
                                  if out["spec_draft_tokens"] else 0.0)
        return out

    def reset_stats(self) -> None:
        """Back to a fresh engine's counters and allocation order; the engine must be idle.

        The worker warms the engine up before it serves (lumen.runtime.worker.warm_up); this keeps that
        work out of its stats, step-time EMAs (q_wait_s routing), arrival order and block placement, so a
        warmed engine counts, routes and allocates exactly as a fresh one would."""
        if self._seqs or self.scheduler.has_work():
            raise RuntimeError("reset_stats on an engine with requests")
        for k in self._counters:
            self._counters[k] = 0
        self.step_ema = StepEma()
        self.last_step = {}
        self._arrivals = 0
        self.scheduler.num_preemptions = self.scheduler.num_dropped_proposals = 0
        bm = self.block_manager
        if bm.num_free != bm.num_blocks:
            raise RuntimeError("reset_stats with KV blocks in use")
        bm._free.clear()  # the free list in its initial order: block placement as in a fresh engine
        bm._free.extend(range(bm.num_blocks))

    def check_invariants(self) -> None:
        """Block ownership invariants (tests)."""
        self.block_manager.check(self.scheduler.running + list(self.scheduler.waiting))
        for s in self.scheduler.waiting:
            assert not s.block_table, f"waiting sequence {s.req_id} owns blocks"

