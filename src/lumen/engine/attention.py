"""Paged attention over the engine's KV pool (an `AttentionBackend` for lumen.model.Decoder).

Pool layout: [num_layers, 2 (k, v), num_blocks + 1, block_size, num_kv_heads, head_dim]. The
extra last block is a scratch "null" block: padded batch rows (CUDA graphs) write there and padded
block-table entries point there. Token position p of a sequence lives in slot
block_table[p // B] * B + p % B.

A step's tokens are laid out as: the "short" group first -- sequences with few new tokens
(decodes, K+1-token verifications, tiny tail prefills), attended together in ONE batched SDPA over
block-table gathers padded to a common length -- then "long" prefill chunks, each attended on its
own over its gathered context. Padding is masked by position (key l is visible to a query at
absolute position p iff l <= p), which is also the causal rule, so padded or stale slots never leak
in: they are either the zeroed null block or an own block's positions past the query.

GQA without repeating K/V in the short group: the g = nh/nkv query heads of a KV head are folded
into the query length ([nkv, g*Tq, hd] against [nkv, L, hd]), which every SDPA backend supports.
On CUDA (Triton available, block_size >= 16) the short group instead runs `triton_attention`, which
reads K/V through the block tables without gathering or padding. Long chunks use SDPA with a
bottom-right-aligned causal bias (on CUDA not materialised, so the fused kernels apply).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class LongSeq:
    """A prefill chunk: tokens [tok_start, tok_end) of the step, context positions [0, kv_len)."""

    tok_start: int
    tok_end: int
    start: int  # position of its first new token (= KV already in the cache)
    slots: torch.Tensor | None  # [kv_len] slots of its whole context; None when start == 0


@dataclass
class ShortGroup:
    """Sequences with few new tokens each, attended in one batched call (tokens [tok_start, tok_end))."""

    tok_start: int
    tok_end: int
    block_tables: torch.Tensor  # [B, nblk] int64 (padded with the null block)
    q_pos: torch.Tensor  # [B, Qmax] absolute position of each query (padded rows repeat the last)
    q_index: torch.Tensor | None = None  # [B, Qmax] token index within the group; None when Qmax == 1
    # rows of the flattened [B * Qmax] output that are real tokens, in order; None when Qmax == 1. An
    # index, not a boolean mask: o[mask] asks the device for its count (a sync, and on CUDA a pinned
    # host buffer, allocated the first time: the restore's one cudaHostAlloc on the H200, 2026-12-04)
    valid_rows: torch.Tensor | None = None
    # Triton path: per token of the group, its row of block_tables and its context length (pos + 1).
    row_seq: torch.Tensor | None = None
    ctx: torch.Tensor | None = None
    num_splits: int = 1
    _mask: torch.Tensor | None = field(default=None, repr=False)

    def ctx_lens(self) -> torch.Tensor:
        if self.ctx is None:  # one query per sequence: derived from the positions (inside CUDA graphs)
            self.ctx = self.q_pos[:, 0] + 1
        return self.ctx

    def mask(self, kv_len: int, group: int) -> torch.Tensor:
        """[B, 1, g*Qmax, L] (or [B, 1, 1, L] when Qmax == 1): key l visible iff l <= q_pos."""
        if self._mask is None:
            b, qmax = self.q_pos.shape
            ar = torch.arange(kv_len, device=self.q_pos.device)
            allowed = ar.view(1, 1, kv_len) <= self.q_pos.unsqueeze(-1)  # [B, Qmax, L]
            if qmax == 1:
                self._mask = allowed.view(b, 1, 1, kv_len)
            else:
                self._mask = allowed.unsqueeze(1).expand(b, group, qmax, kv_len).reshape(b, 1, group * qmax, kv_len)
        return self._mask


@dataclass
class AttnMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's k/v goes
    shorts: list[ShortGroup]
    longs: list[LongSeq]


class PagedAttention:
    def __init__(self, kv_pool: torch.Tensor, num_heads: int, use_triton: bool = False):
        self.pool = kv_pool
        _, _, nb, bs, nkv, hd = kv_pool.shape
        self.block_size, self.nkv, self.hd = bs, nkv, hd
        self.nh = num_heads
        self.group = num_heads // nkv
        # Flat per-layer views [slots, nkv, hd] for writes and slot gathers.
        self.k_flat = [kv_pool[i, 0].view(nb * bs, nkv, hd) for i in range(kv_pool.shape[0])]
        self.v_flat = [kv_pool[i, 1].view(nb * bs, nkv, hd) for i in range(kv_pool.shape[0])]
        self.meta: AttnMetadata | None = None
        self.use_triton = use_triton
        if use_triton:
            from . import triton_attention
            self._triton = triton_attention.paged_attention

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        kf, vf = self.k_flat[layer_idx], self.v_flat[layer_idx]
        kf.index_copy_(0, meta.slot_mapping, k)
        vf.index_copy_(0, meta.slot_mapping, v)
        if len(meta.shorts) == 1 and not meta.longs and (self.use_triton or meta.shorts[0].q_index is None):
            return self._short(layer_idx, q, meta.shorts[0])  # short group only: no copy of the output
        out = torch.empty_like(q)
        for sg in meta.shorts:
            out[sg.tok_start:sg.tok_end] = self._short(layer_idx, q[sg.tok_start:sg.tok_end], sg)
        for ls in meta.longs:
            out[ls.tok_start:ls.tok_end] = self._long(kf, vf, q, k, v, ls)
        return out

    def _short(self, layer_idx: int, q: torch.Tensor, sg: ShortGroup) -> torch.Tensor:
        if self.use_triton:
            return self._triton(q, self.pool[layer_idx, 0], self.pool[layer_idx, 1], sg.block_tables,
                                sg.row_seq, sg.ctx_lens(), sg.num_splits)
        b, qmax = sg.q_pos.shape
        nkv, g, hd = self.nkv, self.group, self.hd
        bt = sg.block_tables
        kv_len = bt.shape[1] * self.block_size
        keys = self.pool[layer_idx, 0][bt].view(b, kv_len, nkv, hd).transpose(1, 2)  # [B, nkv, L, hd]
        vals = self.pool[layer_idx, 1][bt].view(b, kv_len, nkv, hd).transpose(1, 2)
        if sg.q_index is None:  # one query per sequence
            qg = q.view(b, nkv, g, hd)
        else:
            qg = q[sg.q_index].view(b, qmax, nkv, g, hd).permute(0, 2, 3, 1, 4).reshape(b, nkv, g * qmax, hd)
        o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=sg.mask(kv_len, g))
        if sg.q_index is None:
            return o.reshape(b, self.nh, hd)
        o = o.view(b, nkv, g, qmax, hd).permute(0, 3, 1, 2, 4).reshape(b * qmax, self.nh, hd)
        return o.index_select(0, sg.valid_rows)

    def _long(self, kf, vf, q, k, v, ls: LongSeq) -> torch.Tensor:
        n = ls.tok_end - ls.tok_start
        g = self.group
        qs = q[ls.tok_start:ls.tok_end].transpose(0, 1).unsqueeze(0)  # [1, nh, n, hd]
        if ls.slots is None:  # first chunk: its own k/v are the whole context
            ks, vs = k[ls.tok_start:ls.tok_end], v[ls.tok_start:ls.tok_end]
        else:
            ks, vs = kf.index_select(0, ls.slots), vf.index_select(0, ls.slots)  # [kv_len, nkv, hd]
        if g > 1:  # explicit repeat: every SDPA kernel (and the causal bias) accepts equal head counts
            ks, vs = ks.repeat_interleave(g, dim=1), vs.repeat_interleave(g, dim=1)
        ks, vs = ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0)
        if ls.slots is None:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
        else:  # query i sits at position start + i: causal aligned to the bottom-right corner
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=_lower_right_causal(n, ks.shape[2], qs.device))
        return o[0].transpose(0, 1)


def _lower_right_causal(n: int, kv_len: int, device: torch.device):
    """Mask for n queries at the last n of kv_len positions. On CUDA torch's unmaterialised bias, so
    the fused kernels apply (its module imports torch._dynamo, which CUDA workers load anyway for
    torch.compile); on CPU a boolean matrix, which is what SDPA's CPU kernels use, without that
    1.5 s import in every worker nor in the first continued prefill (often a restore's tail)."""
    if device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right
        return causal_lower_right(n, kv_len)
    return torch.ones(n, kv_len, dtype=torch.bool, device=device).tril(kv_len - n)
