"""Llama / Qwen3 decoder over a flattened batch of tokens, with attention delegated to a backend.

The decoder never sees sequences: it maps tokens [T] (+ their positions) to hidden states [T, H].
Everything that depends on which sequence a token belongs to (KV storage, causal masking) lives in
the attention backend passed to `forward`, so the same module serves the dense oracle here and the
engine's paged KV cache.

Projections are fused (qkv_proj, gate_up_proj) to halve the matmul launches per layer; the
loader maps Hugging Face names (q_proj/k_proj/v_proj, gate_proj/up_proj) onto them.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from . import fused_qk
from .config import ModelConfig

# On by default where Triton runs (CUDA): on an H200 (2026-12-04, benchmarks/engine.py --gpu, Qwen3-8B
# shape) it took decode at batch 1 from 155 to 175 steps/s and chunked prefill from 28.0k to 30.6k
# tokens/s, and the CUDA tests passed with it. LUMEN_FUSED_QK=0 keeps the eager composite.
FUSED_QK_DEFAULT = os.environ.get("LUMEN_FUSED_QK", "1") == "1"


class AttentionBackend(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T,nh,hd], k/v [T,nkv,hd] (normed, rotated) -> [T,nh,hd]; stores k/v, attends causally,
        softmax scale head_dim**-0.5."""
        ...


# One CUDA kernel for RMSNorm (torch >= 2.8; fp32 statistics inside the kernel). The composite below
# is ~8 kernels per norm, 4 norms per layer: on CUDA the fused op replaces both the eager launches
# of a prefill step and the torch.compile'd norms of the decode graphs, whose compilation cost
# seconds of every worker (re)start.
FUSED_RMS_NORM = getattr(torch.ops.aten, "_fused_rms_norm", None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and FUSED_RMS_NORM is not None and x.dtype == self.weight.dtype:
            # x * rstd * weight rounded once, where the composite rounds x * rstd before the weight:
            # within one bf16 step of it
            return FUSED_RMS_NORM(x, [x.shape[-1]], self.weight, self.eps)[0]
        # Same op order as transformers (fp32 statistics, cast back before the weight) so fp32
        # and bf16 results match the oracle.
        dtype = x.dtype
        xf = x.float() if dtype != torch.float64 else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary:
    """cos/sin tables indexed by position (HF rotate-half convention).

    Kept outside the module's buffers so `model.to(bfloat16)` cannot degrade the frequencies; a
    table per (device, precision) is built once, which also keeps the lookup a single gather
    (safe inside CUDA graphs after warm-up).
    """

    def __init__(self, head_dim: int, theta: float, max_position: int) -> None:
        self.head_dim, self.theta, self.max_position = head_dim, theta, max_position
        self._tables: dict[tuple[str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 like transformers, except float64 (the engine's deterministic mode) stays float64.
        prec = torch.float64 if dtype == torch.float64 else torch.float32
        key = (str(device), prec)
        if key not in self._tables:
            inv = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64).to(prec) / self.head_dim))
            pos = torch.arange(self.max_position, dtype=prec)
            freqs = torch.outer(pos, inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            self._tables[key] = (emb.cos().to(device), emb.sin().to(device))
        return self._tables[key]

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.table(positions.device, dtype)
        # [T, 1, hd] so it broadcasts over heads; cast like transformers (to the activation dtype).
        return cos[positions].unsqueeze(1).to(dtype), sin[positions].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Rope:
    """One forward's rotary embedding: the positions and, for the eager path, their cos/sin rows
    (gathered once per forward); on CUDA with Triton, the fp32 tables for the fused kernel instead."""

    def __init__(self, rotary: Rotary, positions: torch.Tensor, dtype: torch.dtype, fused: bool) -> None:
        self.fused = fused
        self.positions = positions
        if fused:
            self.cos, self.sin = rotary.table(positions.device, dtype)
        else:
            self.cos, self.sin = rotary(positions, dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.nh * self.hd, self.nkv * self.hd
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, rope: Rope, attn: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.nkv, self.hd)
        if rope.fused:
            norm = self.q_norm is not None
            q, k = fused_qk.qk_norm_rope(qkv, rope.positions, rope.cos, rope.sin, self.nh, self.nkv, self.hd,
                                         self.q_norm.weight if norm else None,
                                         self.k_norm.weight if norm else None, self.q_norm.eps if norm else 0.0)
        else:
            q = qkv[:, :self.q_size].view(t, self.nh, self.hd)
            k = qkv[:, self.q_size:self.q_size + self.kv_size].view(t, self.nkv, self.hd)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, rope.cos, rope.sin), apply_rope(k, rope.cos, rope.sin)
        o = attn(self.layer_idx, q, k, v)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split([self.inter, self.inter], dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: Rope, attn: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """forward(input_ids [T], positions [T], attn) -> final-normed hidden [T, H]; logits(hidden) -> [T, V]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # nn.Embedding's own init draws normal_ through torch._refs on the meta device, which imports
        # torch._dynamo (1-2 s of CPU per worker start, on the recovery path): give it the tensor and
        # draw only where there is memory (the same draw, so seeded weights are unchanged)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        if not self.embed_tokens.weight.is_meta:
            nn.init.normal_(self.embed_tokens.weight)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position)
        self.fused_qk = FUSED_QK_DEFAULT  # QK-norm + RoPE as one Triton kernel where it can run

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = Rope(self.rotary, positions, x.dtype, self.fused_qk and fused_qk.available(x, self.config.head_dim))
        for layer in self.layers:
            x = layer(x, rope, attn)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype
