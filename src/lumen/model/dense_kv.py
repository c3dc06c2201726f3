"""DenseKV: the contiguous single-sequence attention backend (tests, numerics oracle, draft measurement)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ModelConfig


class DenseKV:
    """KV cache of ONE sequence in preallocated contiguous tensors [capacity, nkv, hd] per layer.

    Each call to the backend appends the new tokens' k/v to its layer and attends: causal within the
    new tokens, full over everything cached before them. The tokens passed to one forward must be the
    sequence's next positions (positions == len .. len+T-1). `truncate(n)` rolls back (speculation).
    """

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, capacity: int | None = None) -> None:
        self.cfg = cfg
        # Default capped at 4096 tokens: a full 40k-token cache of an 8B shape would take GBs.
        self.capacity = capacity or min(cfg.max_position, 4096)
        shape = (self.capacity, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)]
        # Per-layer fill levels: layer i is written before layer i+1 within one forward pass.
        self._lens = [0] * cfg.num_layers
        self._gqa = cfg.num_heads // cfg.num_kv_heads

    @property
    def length(self) -> int:
        """Tokens stored (as of the last completed forward)."""
        return self._lens[-1]

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self._lens = [n] * len(self._lens)

    def reset(self) -> None:
        self.truncate(0)

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[0]
        past = self._lens[layer_idx]
        end = past + t
        if end > self.capacity:
            raise ValueError(f"DenseKV capacity {self.capacity} exceeded ({end} tokens)")
        self.k[layer_idx][past:end] = k
        self.v[layer_idx][past:end] = v
        self._lens[layer_idx] = end
        keys, vals = self.k[layer_idx][:end], self.v[layer_idx][:end]
        if self._gqa > 1:  # explicit repeat: works with every SDPA kernel and torch version
            keys = keys.repeat_interleave(self._gqa, dim=1)
            vals = vals.repeat_interleave(self._gqa, dim=1)
        mask = None
        if t > 1:  # query i (absolute position past+i) sees keys 0..past+i
            qpos = torch.arange(past, end, device=q.device).unsqueeze(1)
            mask = torch.arange(end, device=q.device).unsqueeze(0) <= qpos
        o = F.scaled_dot_product_attention(q.transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1),
                                           attn_mask=mask)
        return o.transpose(0, 1)
