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

SHORT_MAX = 32  # sequences with at most this many new tokens join the batched ("short") attention
GATHER_TOKENS = 1 << 18  # max gathered context tokens (batch x padded length) per batched attention call
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MIN_GRAPH_BLOCKS = 16


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
                 cuda_graphs: bool = True, compile_norms: bool = False):
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
        q_pos, q_index, valid = [], [], []
        for i in group:
            it = items[i]
            n = len(it.tokens)
            q_pos.append([it.start + min(j, n - 1) for j in range(qmax)])
            q_index.append([tok_of[i] - base + min(j, n - 1) for j in range(qmax)])
            valid.append([j < n for j in range(qmax)])
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
            sg.valid = torch.tensor(valid, dtype=torch.bool, device=dev)
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
    @torch.inference_mode()
    def read_blocks(self, blocks: list[int]):
        """Host copies of whole blocks: (pages, cuda event or None), where pages[i] is block
        blocks[i] as [L, 2, B, nkv, hd] (contiguous; pinned on CUDA).

        CPU: one copy per block (about 5x cheaper than an index gather followed by a permuted copy
        for 1.8 MB pages: 49 vs 268 us for one page, 7 vs 66 ms for 32 on the 2-core box).
        CUDA: the blocks are gathered on the *current* stream, into a device staging buffer, by one
        kernel: ordered before any later step that could rewrite them (a finished request's blocks
        are reused), so no step ever waits for the export. The device -> pinned host copy runs on a
        side stream that waits only for the gather; the returned event marks its end (the page
        sender waits for it, on its own thread). Nothing here blocks the host.
        """
        if self._copy_stream is None:
            pool = self.kv_pool
            out = []
            for b in blocks:
                page = torch.empty(pool.shape[:2] + pool.shape[3:], dtype=pool.dtype)
                page.copy_(pool[:, :, b])
                out.append(page)
            return out, None
        cur = torch.cuda.current_stream(self.device)
        # a pinned index: from pageable memory the copy would block the host until the GPU has
        # drained the step queued so far
        idx = torch.tensor(blocks, dtype=torch.int64, pin_memory=True).to(self.device, non_blocking=True)
        staged = torch.index_select(self.kv_pool.permute(2, 0, 1, 3, 4, 5), 0, idx)  # [n, L, 2, B, nkv, hd]
        gathered = torch.cuda.Event()
        gathered.record(cur)
        s = self._copy_stream
        s.wait_event(gathered)
        with torch.cuda.stream(s):
            host = torch.empty(staged.shape, dtype=staged.dtype, pin_memory=True)
            host.copy_(staged, non_blocking=True)
            done = torch.cuda.Event()
            done.record(s)
        staged.record_stream(s)  # allocated on `cur`, read on `s`: not reused before the copy ran
        return host, done

    @torch.inference_mode()
    def write_blocks(self, blocks: list[int], data: torch.Tensor) -> None:
        """data [n, L, 2, B, nkv, hd] (host) -> the given blocks."""
        idx = torch.tensor(blocks, dtype=torch.int64, device=self.device)
        src = data.to(self.device, non_blocking=data.is_pinned()).permute(1, 2, 0, 3, 4, 5)
        self.kv_pool[:, :, idx] = src
