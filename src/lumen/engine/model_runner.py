"""Runs the decoder over one step's flattened batch against the paged KV pool.

CUDA: pure-decode steps (one new token per sequence) replay CUDA graphs captured lazily per
(batch bucket, context bucket); the gather of the block tables has static shapes there because the
tables are padded to the context bucket. Everything else (prefill chunks, verification, mixed
steps) runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import AttnMetadata, LongSeq, PagedAttention, ShortGroup
from .block_manager import cdiv
from .export_ring import ExportRing, ring_size

SHORT_MAX = 32  # sequences with at most this many new tokens join the batched ("short") attention
GATHER_TOKENS = 1 << 18  # max gathered context tokens (batch x padded length) per batched attention call
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_GRAPH_BLOCKS = 16
# KV page export staging (export_ring): slots of EXPORT_SLOT_PAGES pages, as many as fit in
# EXPORT_RING_BYTES (a power of two: torch's pinned allocator rounds every block up to one) but at
# most EXPORT_SLOTS. Qwen3-8B pages (2.36 MB): 7 slots, 112 pages, 252 MiB pinned.
EXPORT_SLOTS = 8
EXPORT_SLOT_PAGES = 16
EXPORT_RING_BYTES = 256 << 20


class StagedPages(list):
    """`read_blocks`' pages (tensors), with `leases[i]`: the export ring slot page i lives in."""

    def __init__(self):
        super().__init__()
        self.leases: list = []


@dataclass
class ForwardItem:
    """Run `tokens` at positions [start, start+len) of a sequence with this block table; return
    logits for its last `num_logits` tokens."""

    tokens: list[int]
    start: int
    block_table: list[int]
    num_logits: int


def compiled_norms(model) -> list[tuple[torch.nn.Module, object]]:
    """(module, compiled forward) for the decoder's RMSNorms, or [] where torch has the fused RMSNorm
    kernel (torch >= 2.8: RMSNorm.forward uses it on CUDA) or torch.compile is unavailable.

    Used only while capturing decode CUDA graphs: eagerly an RMSNorm is ~8 tiny kernels and a decode
    step runs 4 per layer, which at batch 1 costs as much as reading the weights. Outside graphs the
    compiled function's per-call overhead (guards, ~150 us of CPU) would make eager prefill steps
    CPU-bound, so eager steps keep the model's own forward.

    The compiled function runs the model's own RMSNorm.forward (same numerics) on a stand-in `self`,
    so it is one code path guarded on tensor shapes only, shared by every norm instance.
    """
    from types import SimpleNamespace

    from lumen.model.decoder import FUSED_RMS_NORM, RMSNorm

    if FUSED_RMS_NORM is not None:
        return []  # RMSNorm.forward is one fused kernel on CUDA: nothing to compile

    def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return RMSNorm.forward(SimpleNamespace(weight=weight, eps=eps), x)

    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    try:
        fn = torch.compile(norm, dynamic=None)
        with torch.inference_mode():
            w = norms[0].weight
            fn(torch.ones(2, w.shape[0], device=w.device, dtype=w.dtype), w, norms[0].eps)
    except Exception:  # no Triton / compiler: stay eager
        return []
    return [(m, (lambda mod: lambda x: fn(x, mod.weight, mod.eps))(m)) for m in norms]


def _triton_ok(block_size: int, head_dim: int, dtype: torch.dtype) -> bool:
    try:
        from .triton_attention import supported
    except ImportError:  # no Triton: the gather + SDPA path
        return False
    return supported(block_size, head_dim, dtype)


def _pow2_at_least(n: int, lo: int) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, *, max_batch: int = 512,
                 cuda_graphs: bool = True, compile_norms: bool = False, export_slots: int = EXPORT_SLOTS,
                 export_slot_pages: int = EXPORT_SLOT_PAGES, export_ring_bytes: int = EXPORT_RING_BYTES):
        self.model = model
        cfg = model.config
        self.cfg = cfg
        self.device = model.device
        self.dtype = model.dtype
        if self.device.type == "cuda":
            # Triton launches and CUDA graph capture use the current device, not the tensors':
            # a runner on cuda:1 in a process whose current device is cuda:0 fails to launch.
            torch.cuda.set_device(self.device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.null_block = num_blocks
        self.max_blocks_per_seq = cdiv(cfg.max_position, block_size)
        # Zeroed, not empty: masked keys get weight 0, but 0 * NaN garbage would still be NaN.
        self.kv_pool = torch.zeros(cfg.num_layers, 2, num_blocks + 1, block_size, cfg.num_kv_heads,
                                   cfg.head_dim, device=self.device, dtype=self.dtype)
        self.use_triton = self.device.type == "cuda" and _triton_ok(block_size, cfg.head_dim, self.dtype)
        self._num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                         if self.device.type == "cuda" else 1)
        self.attn = PagedAttention(self.kv_pool, cfg.num_heads, use_triton=self.use_triton)
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self._norms = compiled_norms(model) if compile_norms and self.use_graphs else []
        self.norms_compiled = bool(self._norms)
        self.graph_batches = [b for b in GRAPH_BATCHES if b <= max(1, max_batch)]
        if self.graph_batches[-1] < max_batch:
            self.graph_batches.append(max_batch)
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._graph_pool = None
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # The stream every step runs on: the device's current one now (its default stream; nothing
        # in lumen sets another around a step, and graph replays launch on it). Looked up once: on an
        # H200, torch.cuda.current_stream() and the `with torch.cuda.stream()` context were ~70 of an
        # export's ~256 us of engine-thread time (benchmarks/export_cost.py --profile, 2026-12-04).
        self._main_stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        self._pool_by_block = self.kv_pool.permute(2, 0, 1, 3, 4, 5)  # [blocks, L, 2, B, nkv, hd], a view
        # Page export staging, allocated here, once: no host allocation while serving (export_slots=0:
        # no export, no ring). Pinned on CUDA, so device -> host copies are asynchronous DMAs.
        self.ring: ExportRing | None = None
        self._ring_index_dev: torch.Tensor | None = None  # the ring's index rows, on the device
        if export_slots > 0:
            page_shape = self.kv_pool.shape[:2] + self.kv_pool.shape[3:]
            slots = ring_size(self.block_bytes, export_slot_pages, export_slots, export_ring_bytes)
            self.ring = ExportRing(page_shape, self.dtype, slots, export_slot_pages,
                                   pin=self.device.type == "cuda")
            if self.device.type == "cuda":
                self._ring_index_dev = torch.empty_like(self.ring.index, device=self.device)

    @property
    def block_bytes(self) -> int:
        return self.kv_pool[:, :, 0].numel() * self.kv_pool.element_size()

    # ------------------------------------------------------------------ forward
    @torch.inference_mode()
    def forward(self, items: list[ForwardItem]) -> torch.Tensor:
        """Logits [sum(num_logits), V] in item order (float32, or float64 in deterministic mode)."""
        if self.use_graphs and items and all(len(it.tokens) == 1 and it.num_logits == 1 for it in items):
            hidden = self._decode_graph(items)
            if hidden is not None:
                return self._logits(hidden)
        meta, ids, pos, logit_idx = self._prepare(items)
        self.attn.meta = meta
        hidden = self.model(ids, pos, self.attn)
        self.attn.meta = None
        return self._logits(hidden[logit_idx])

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.model.logits(hidden)
        return out if out.dtype == torch.float64 else out.float()

    def _prepare(self, items: list[ForwardItem]):
        bs, dev = self.block_size, self.device
        order = sorted(range(len(items)), key=lambda i: len(items[i].tokens) > SHORT_MAX)  # stable
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        tok_of: list[int] = [0] * len(items)  # first token index of each item in the step
        for i in order:
            it = items[i]
            tok_of[i] = len(ids)
            ids.extend(it.tokens)
            bt = it.block_table
            for p in range(it.start, it.start + len(it.tokens)):
                pos.append(p)
                slots.append(bt[p // bs] * bs + p % bs)
        shorts: list[ShortGroup] = []
        longs: list[LongSeq] = []
        short_items = [i for i in order if len(items[i].tokens) <= SHORT_MAX]
        # Batched groups, split so the padded gather stays bounded.
        group: list[int] = []
        for i in short_items + [None]:
            if i is not None:
                cand = group + [i]
                width = max(cdiv(items[j].start + len(items[j].tokens), bs) for j in cand)
                if not group or self.use_triton or len(cand) * width * bs <= GATHER_TOKENS:
                    group = cand
                    continue
            if group:
                shorts.append(self._short_group(items, group, tok_of))
            group = [i] if i is not None else []
        for i in order[len(short_items):]:
            it = items[i]
            n = len(it.tokens)
            if it.start == 0:
                longs.append(LongSeq(tok_of[i], tok_of[i] + n, 0, None))
                continue
            kv_len = it.start + n
            ctx = torch.arange(kv_len)
            blocks = torch.tensor(it.block_table[:cdiv(kv_len, bs)], dtype=torch.int64)
            sl = (blocks[ctx // bs] * bs + ctx % bs).to(dev)
            longs.append(LongSeq(tok_of[i], tok_of[i] + n, it.start, sl))
        logit_idx = [tok_of[i] + len(items[i].tokens) - items[i].num_logits + j
                     for i in range(len(items)) for j in range(items[i].num_logits)]
        meta = AttnMetadata(torch.tensor(slots, dtype=torch.int64, device=dev), shorts, longs)
        return (meta, torch.tensor(ids, dtype=torch.int64, device=dev),
                torch.tensor(pos, dtype=torch.int64, device=dev),
                torch.tensor(logit_idx, dtype=torch.int64, device=dev))

    def _short_group(self, items: list[ForwardItem], group: list[int], tok_of: list[int]) -> ShortGroup:
        bs = self.block_size
        qmax = max(len(items[i].tokens) for i in group)
        width = max(cdiv(items[i].start + len(items[i].tokens), bs) for i in group)
        tables = [items[i].block_table[:width] + [self.null_block] * (width - min(width, len(items[i].block_table)))
                  for i in group]
        base = tok_of[group[0]]
        q_pos, q_index, valid_rows = [], [], []
        for r, i in enumerate(group):
            it = items[i]
            n = len(it.tokens)
            q_pos.append([it.start + min(j, n - 1) for j in range(qmax)])
            q_index.append([tok_of[i] - base + min(j, n - 1) for j in range(qmax)])
            valid_rows.extend(range(r * qmax, r * qmax + n))
        end = tok_of[group[-1]] + len(items[group[-1]].tokens)
        dev = self.device
        sg = ShortGroup(base, end, torch.tensor(tables, dtype=torch.int64, device=dev),
                        torch.tensor(q_pos, dtype=torch.int64, device=dev))
        if self.use_triton:  # per token: its table row and context length; no padding
            row_seq = [r for r, i in enumerate(group) for _ in items[i].tokens]
            ctx = [items[i].start + j + 1 for i in group for j in range(len(items[i].tokens))]
            sg.row_seq = torch.tensor(row_seq, dtype=torch.int64, device=dev)
            sg.ctx = torch.tensor(ctx, dtype=torch.int64, device=dev)
            sg.num_splits = self._splits(len(ctx), width)
        elif qmax > 1:
            sg.q_index = torch.tensor(q_index, dtype=torch.int64, device=dev)
            sg.valid_rows = torch.tensor(valid_rows, dtype=torch.int64, device=dev)
        return sg

    def _splits(self, rows: int, width: int) -> int:
        from .triton_attention import num_splits_for
        return num_splits_for(rows, self.cfg.num_kv_heads, width, 2 * self._num_sms)

    # ------------------------------------------------------------------ CUDA graphs (decode)
    def _decode_graph(self, items: list[ForwardItem]) -> torch.Tensor | None:
        b = len(items)
        bb = next((x for x in self.graph_batches if x >= b), None)
        width = max(cdiv(it.start + 1, self.block_size) for it in items)
        nblk = min(_pow2_at_least(width, MIN_GRAPH_BLOCKS), _pow2_at_least(self.max_blocks_per_seq, 1))
        if bb is None or (not self.use_triton and bb * nblk * self.block_size > GATHER_TOKENS):
            return None
        graph, inputs, hidden, _ = self._graphs.get((bb, nblk)) or self._capture(bb, nblk)
        bs = self.block_size
        null_slot = self.null_block * bs
        pad = bb - b
        # One host->device copy of [ids | positions | slots | block tables] per step.
        flat = [it.tokens[0] for it in items] + [0] * pad
        flat += [it.start for it in items] + [0] * pad
        flat += [it.block_table[it.start // bs] * bs + it.start % bs for it in items] + [null_slot] * pad
        for it in items:
            flat += it.block_table[:nblk]
            flat += [self.null_block] * (nblk - min(nblk, len(it.block_table)))
        flat += [self.null_block] * (nblk * pad)
        inputs.copy_(torch.tensor(flat, dtype=torch.int64), non_blocking=True)
        graph.replay()
        return hidden[:b]

    def _capture(self, bb: int, nblk: int):
        dev = self.device
        inputs = torch.zeros(bb * (3 + nblk), dtype=torch.int64, device=dev)
        ids, pos, slots = inputs[:bb], inputs[bb:2 * bb], inputs[2 * bb:3 * bb]
        tables = inputs[3 * bb:].view(bb, nblk)
        slots.fill_(self.null_block * self.block_size)
        tables.fill_(self.null_block)

        row_seq = torch.arange(bb, device=dev)
        splits = self._splits(bb, nblk) if self.use_triton else 1

        def run() -> torch.Tensor:
            # Fresh metadata per call: mask / context lengths are derived from `pos` inside the graph.
            sg = ShortGroup(0, bb, tables, pos.view(bb, 1), row_seq=row_seq, num_splits=splits)
            self.attn.meta = AttnMetadata(slots, [sg], [])
            h = self.model(ids, pos, self.attn)
            self.attn.meta = None
            return h

        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        for m, fwd in self._norms:  # compiled norms inside the graph only (see compiled_norms)
            m.forward = fwd
        try:
            with torch.cuda.stream(side):  # warm-up outside capture (lazy tables, cuBLAS handles, compiles)
                run()
                run()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: graphs are captured lazily while serving, when the KV threads may be
            # allocating pinned host memory; in the default (global) mode that call from another
            # thread invalidates the capture and kills the worker (seen on H200, 2026-11-28).
            with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
                hidden = run()
        finally:
            for m, _ in self._norms:
                del m.forward  # back to the class's (eager) forward
        entry = (graph, inputs, hidden, row_seq)  # everything the graph reads must outlive it
        self._graphs[(bb, nblk)] = entry
        return entry

    # ------------------------------------------------------------------ page copies
    def export_capacity(self) -> int:
        """Pages `read_blocks` can take now: the free, copied-out part of the export ring."""
        return self.ring.capacity() if self.ring is not None else 0

    @torch.inference_mode()
    def read_blocks(self, blocks: list[int]):
        """Host copies of whole blocks: (pages, cuda event or None), where pages[i] is block
        blocks[i] as [L, 2, B, nkv, hd], a contiguous view of a slot of the export ring (pinned on
        CUDA) that stays reserved while `pages.leases[i]` is referenced. At most `export_capacity()`
        blocks per call (more raises): nothing is allocated on the host here.

        CPU: one copy per block into the ring (about 5x cheaper than an index gather followed by a
        permuted copy for 1.8 MB pages: 49 vs 268 us for one page, 7 vs 66 ms for 32 on the 2-core box).
        CUDA, per ring slot: the block ids go from the slot's pinned index row into the slot's row of
        a device index (not a tensor built from the list: that allocates pinned memory with the GIL
        held), and one kernel gathers the blocks on the steps' stream into a device staging buffer:
        ordered before any later step that could rewrite them (a finished request's blocks are
        reused), so no step ever waits for the export. The device -> pinned host copies run on a side
        stream that waits only for the gathers; the returned event marks their end (the page sender
        waits for it, on its own thread) and guards the slots' reuse, index rows included. Nothing
        here blocks the host. Returns with the steps' stream current.
        """
        pages = StagedPages()
        if not blocks:
            return pages, None
        ring = self.ring
        if ring is None:
            raise RuntimeError("page export is off for this engine (export_slots=0)")
        per = ring.slot_pages
        taken = ring.take(len(blocks))
        parts = [(slot, lease, blocks[j * per:(j + 1) * per]) for j, (slot, lease) in enumerate(taken)]
        done = None
        if self._copy_stream is None:
            pool = self.kv_pool
            for slot, _, part in parts:
                for k, b in enumerate(part):
                    ring.pages[slot, k].copy_(pool[:, :, b])
        else:
            main, side, index_dev = self._main_stream, self._copy_stream, self._ring_index_dev
            torch.cuda.set_stream(main)  # the gathers and their event on the steps' stream, whoever calls
            staged = []
            for slot, _, part in parts:
                ring.index_np[slot, :len(part)] = part
                idx = index_dev[slot, :len(part)]
                idx.copy_(ring.index[slot, :len(part)], non_blocking=True)
                staged.append(torch.index_select(self._pool_by_block, 0, idx))  # [n, L, 2, B, nkv, hd]
            gathered = torch.cuda.Event()
            gathered.record(main)
            side.wait_event(gathered)
            torch.cuda.set_stream(side)  # the copies below are enqueued on the side stream
            try:
                for (slot, _, part), st in zip(parts, staged, strict=True):
                    ring.pages[slot, :len(part)].copy_(st, non_blocking=True)
                done = torch.cuda.Event()
                done.record(side)
            finally:
                torch.cuda.set_stream(main)
            for st in staged:
                st.record_stream(side)  # allocated on `main`, read on `side`: not reused before the copy ran
            ring.set_event([slot for slot, _, _ in parts], done)
        for slot, lease, part in parts:
            for k in range(len(part)):
                pages.append(ring.pages[slot, k])
                pages.leases.append(lease)
        return pages, done

    @torch.inference_mode()
    def write_blocks(self, blocks: list[int], pages) -> torch.cuda.Event | None:
        """pages[k] (host, [L, 2, B, nkv, hd]) -> block blocks[k]. Returns the CUDA event that marks the
        end of the copies (None on CPU, where they are done on return); the caller must leave the
        sources untouched until then.

        Each page is copied straight out of its own memory (on a GPU host: the checkpoint store's
        pinned slot), with no staging tensor on the host and no index tensor: from pinned memory the
        copy is an asynchronous DMA (into a device temporary, then one copy kernel into the strided
        block), so the host never waits for the stream. A pageable source is copied synchronously.
        """
        pool = self.kv_pool
        for b, page in zip(blocks, pages, strict=True):
            pool[:, :, b].copy_(page, non_blocking=page.is_pinned())
        if self.device.type != "cuda" or not blocks:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event
