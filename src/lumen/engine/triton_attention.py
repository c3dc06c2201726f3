"""Paged attention for few-token queries (decode, K+1-token verification) as a Triton kernel (CUDA).

Why: the portable path gathers every sequence's blocks into a padded contiguous copy and runs SDPA
with a mask -- three passes over the KV (gather read + write, attention read) plus padding. At batch
32-128 that traffic, not the weights, sets the step time. This kernel reads each sequence's K/V
once, straight from the pool through the block table, and stops at the sequence's own length
(no mask, no padding), so a padded CUDA-graph batch costs almost nothing extra.

Layout: one program per (query row, kv head, split of the context). A row is one new token with
its own context length (a verify step has K+1 rows per sequence, each seeing one more key). The g
query heads sharing a kv head are processed together (GQA) as the rows of a tl.dot. Splits
(flash-decoding) keep the GPU busy when rows x kv heads is small (batch 1); a second kernel merges
the per-split partial softmax results.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_partial(Q, K, V, BT, ROW_SEQ, CTX, ACC, ML,
                   stride_qr, stride_qh, stride_kb, stride_ks, stride_kh, stride_bt,
                   num_splits, blocks_per_split, scale,
                   G: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr, BS: tl.constexpr,
                   NB: tl.constexpr, IEEE: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(CTX + r)
    seq = tl.load(ROW_SEQ + r)
    n_blocks = (ctx + BS - 1) // BS
    b0 = s * blocks_per_split
    b1 = tl.minimum(b0 + blocks_per_split, n_blocks)
    gi = tl.arange(0, G_PAD)
    d = tl.arange(0, HD)
    t = tl.arange(0, BS * NB)  # NB blocks per iteration: more bytes in flight per program
    qmask = gi < G
    q = tl.load(Q + r * stride_qr + (h * G + gi)[:, None] * stride_qh + d[None, :], mask=qmask[:, None], other=0.0)
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    lsum = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HD], tl.float32)
    for blk0 in range(b0, b1, NB):
        blk = blk0 + t // BS
        inb = blk < b1  # this split's blocks only (the next split starts at b1)
        bid = tl.load(BT + seq * stride_bt + blk, mask=inb, other=0).to(tl.int64)
        keep = inb & (blk * BS + t % BS < ctx)
        off = bid[:, None] * stride_kb + (t % BS)[:, None] * stride_ks + h * stride_kh + d[None, :]
        k = tl.load(K + off, mask=keep[:, None], other=0.0)
        v = tl.load(V + off, mask=keep[:, None], other=0.0)
        if IEEE:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            sc = tl.dot(q, tl.trans(k)) * scale
        sc = tl.where(keep[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    heads = h * G + gi
    base = (r * tl.num_programs(1) * G + heads) * num_splits + s  # [R, nh, S] flattened
    tl.store(ACC + base[:, None] * HD + d[None, :], acc, mask=qmask[:, None])
    tl.store(ML + base * 2, m, mask=qmask)
    tl.store(ML + base * 2 + 1, lsum, mask=qmask)


@triton.jit
def _merge(ACC, ML, OUT, stride_or, stride_oh, num_splits,
           HD: tl.constexpr, S_PAD: tl.constexpr):
    r = tl.program_id(0)
    h = tl.program_id(1)
    nh = tl.num_programs(1)
    sp = tl.arange(0, S_PAD)
    d = tl.arange(0, HD)
    smask = sp < num_splits
    base = (r * nh + h) * num_splits + sp
    m = tl.load(ML + base * 2, mask=smask, other=float("-inf"))
    lsum = tl.load(ML + base * 2 + 1, mask=smask, other=0.0)
    mx = tl.max(m, 0)
    w = tl.where(smask & (m > float("-inf")), tl.exp(m - mx), 0.0)
    acc = tl.load(ACC + base[:, None] * HD + d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(lsum * w, 0)
    tl.store(OUT + r * stride_or + h * stride_oh + d, out.to(OUT.dtype.element_ty))


def _pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def supported(block_size: int, head_dim: int, dtype: torch.dtype) -> bool:
    """tl.dot needs >= 16 along every dimension; head_dim a power of two for the vector loads."""
    return (block_size >= 16 and _pow2(block_size) == block_size and head_dim >= 16
            and _pow2(head_dim) == head_dim and dtype in (torch.float16, torch.bfloat16, torch.float32))


def num_splits_for(rows: int, num_kv_heads: int, table_width: int, target_programs: int) -> int:
    return max(1, min(table_width, 64, -(-target_programs // max(1, rows * num_kv_heads))))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    row_seq: torch.Tensor, ctx_lens: torch.Tensor, num_splits: int,
                    scale: float | None = None) -> torch.Tensor:
    """q [R, nh, hd]; k/v_cache [num_blocks, B, nkv, hd]; block_tables [S, W]; row_seq [R] (row -> table
    row); ctx_lens [R] (keys visible to the row: its position + 1). Returns [R, nh, hd]."""
    r, nh, hd = q.shape
    _, bs, nkv, _ = k_cache.shape
    g = nh // nkv
    q = q.contiguous()
    width = block_tables.shape[1]
    num_splits = max(1, min(num_splits, width))
    bps = -(-width // num_splits)
    num_splits = -(-width // bps)
    acc = torch.empty(r, nh, num_splits, hd, device=q.device, dtype=torch.float32)
    ml = torch.empty(r, nh, num_splits, 2, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    _paged_partial[(r, nkv, num_splits)](
        q, k_cache, v_cache, block_tables, row_seq, ctx_lens, acc, ml,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        num_splits, bps, scale if scale is not None else hd ** -0.5,
        G=g, G_PAD=max(16, _pow2(g)), HD=hd, BS=bs, NB=max(1, 64 // bs), IEEE=q.dtype == torch.float32)
    _merge[(r, nh)](acc, ml, out, out.stride(0), out.stride(1), num_splits, HD=hd, S_PAD=_pow2(num_splits))
    return out
