"""QK-norm and RoPE of one layer's queries and keys in one Triton kernel (CUDA).

Why: the eager composite is about a dozen kernels per layer (two norms; per tensor a negate, a
concatenation, two multiplies and an add for rotate-half; the cos/sin gather and casts once per
step). In a decode step each is a few microseconds of launch latency for almost no work, so at
batch 1 on an H200 the step took 6.6 ms where reading the weights takes 3.9 ms. One program per
(token, head) reads the head straight from the fused QKV projection's output, normalises it in
fp32 (Qwen3's QK-norm, when the model has it), rotates it with the fp32 cos/sin of its position and
writes it once; values are not touched.

Numerics: fp32 inside, one rounding at the store, where the eager path rounds after the norm and
after every RoPE operation: equal in fp32, within a rounding step of the activation dtype otherwise.
The engine's deterministic mode (float64, CPU) never takes this path.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the eager path is used
    triton = None


def available(x: torch.Tensor, head_dim: int) -> bool:
    """Whether the fused kernel can run on `x` (the QKV projection's output)."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and head_dim % 2 == 0 and head_dim & (head_dim - 1) == 0)


if triton is not None:
    @triton.jit
    def _qk_norm_rope(QKV, POS, COS, SIN, QW, KW, QO, KO, row_stride, eps,
                      NH: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1)  # query heads, then key heads: adjacent in the QKV row
        d = tl.arange(0, HALF)
        src = QKV + t.to(tl.int64) * row_stride + h * (2 * HALF)
        x1 = tl.load(src + d).to(tl.float32)
        x2 = tl.load(src + HALF + d).to(tl.float32)
        if NORM:
            r = tl.rsqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
            if h < NH:
                w1 = tl.load(QW + d).to(tl.float32)
                w2 = tl.load(QW + HALF + d).to(tl.float32)
            else:
                w1 = tl.load(KW + d).to(tl.float32)
                w2 = tl.load(KW + HALF + d).to(tl.float32)
            x1 = x1 * r * w1
            x2 = x2 * r * w2
        pos = tl.load(POS + t).to(tl.int64)
        # the table is [positions, head_dim] in the rotate-half layout: both halves hold the same angles
        c = tl.load(COS + pos * (2 * HALF) + d)
        s = tl.load(SIN + pos * (2 * HALF) + d)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        if h < NH:
            dst = QO + (t.to(tl.int64) * NH + h) * (2 * HALF)
        else:
            dst = KO + (t.to(tl.int64) * NKV + (h - NH)) * (2 * HALF)
        tl.store(dst + d, o1.to(dst.dtype.element_ty))
        tl.store(dst + HALF + d, o2.to(dst.dtype.element_ty))


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 num_heads: int, num_kv_heads: int, head_dim: int,
                 q_weight: torch.Tensor | None, k_weight: torch.Tensor | None, eps: float,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [T, (nh + 2 nkv) hd] (rows may be strided, each row contiguous), positions [T] ->
    q [T, nh, hd], k [T, nkv, hd]: RMS-normed per head (when weights are given) and rotated.
    cos/sin: fp32 [max_position, hd] tables (`decoder.Rotary.table`)."""
    t = qkv.shape[0]
    assert qkv.stride(1) == 1 and cos.dtype == torch.float32 and cos.is_contiguous() and sin.is_contiguous()
    q = torch.empty((t, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((t, num_kv_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if t == 0:
        return q, k
    norm = q_weight is not None
    _qk_norm_rope[(t, num_heads + num_kv_heads)](
        qkv, positions, cos, sin, q_weight if norm else cos, k_weight if norm else cos, q, k,
        qkv.stride(0), eps, NH=num_heads, NKV=num_kv_heads, HALF=head_dim // 2, NORM=norm)
    return q, k
