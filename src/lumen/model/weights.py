"""Mapping between Hugging Face parameter names and the Decoder's (fused) parameters."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from .config import ModelConfig

# Decoder parameter suffix -> the HF projections concatenated (in order, along dim 0) to form it.
FUSED = {
    "self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_sources(cfg: ModelConfig) -> dict[str, list[str]]:
    """Decoder state-dict name -> HF tensor names it is assembled from (one unless fused)."""
    out: dict[str, list[str]] = {"embed_tokens.weight": ["model.embed_tokens.weight"],
                                 "norm.weight": ["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ["lm_head.weight"]
    per_layer = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
                 "mlp.down_proj.weight", *FUSED]
    if cfg.qk_norm:
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    for i in range(cfg.num_layers):
        for p in per_layer:
            srcs = FUSED.get(p, (p,))
            out[f"layers.{i}.{p}"] = [f"model.layers.{i}.{s}" for s in srcs]
    return out


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        from .decoder import Decoder
        m = Decoder(cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()
            if not (cfg.tie_embeddings and k == "lm_head.weight")}


def fill_rows(dst: torch.Tensor, parts, what: str) -> torch.Tensor:
    """Copy `parts` into consecutive row ranges of `dst` (a fused projection is its HF parts stacked),
    each straight into its rows; they must fill it exactly. Non-blocking where the copy allows."""
    row = 0
    for t in parts:
        if tuple(t.shape[1:]) != tuple(dst.shape[1:]) or row + t.shape[0] > dst.shape[0]:
            raise ValueError(f"{what}: a part of shape {tuple(t.shape)} does not fit {tuple(dst.shape)} at row {row}")
        dst[row:row + t.shape[0]].copy_(t, non_blocking=True)
        row += t.shape[0]
    if row != dst.shape[0]:
        raise ValueError(f"{what}: parts fill {row} of {dst.shape[0]} rows")
    return dst


def gather_parts(cfg: ModelConfig, get: Callable[[str], torch.Tensor]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Decoder name -> its HF source tensors, unfused, shapes checked now (before any copy is made)."""
    shapes = param_shapes(cfg)
    parts: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, srcs in hf_sources(cfg).items():
        got = tuple(get(s) for s in srcs)
        if sum(t.shape[0] for t in got) != shapes[name][0] or any(tuple(t.shape[1:]) != shapes[name][1:] for t in got):
            raise ValueError(f"{name}: {srcs} do not form a tensor of shape {shapes[name]}")
        parts[name] = got
    return parts


def assemble(cfg: ModelConfig, get: Callable[[str], torch.Tensor], dtype: torch.dtype,
             pin: bool = False, on_tensor: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """Build the Decoder's host state from HF tensors fetched one by one through `get(hf_name)`.

    Each destination is allocated once (optionally pinned, for fast async host->device copies) and
    the source slices are copied straight into it, so fused tensors cost no extra concatenation.
    """
    def fetch(srcs):
        for s in srcs:
            yield get(s)
            if on_tensor is not None:
                on_tensor(s)

    shapes = param_shapes(cfg)
    return {name: fill_rows(torch.empty(shapes[name], dtype=dtype, pin_memory=pin), fetch(srcs), f"{name} from {srcs}")
            for name, srcs in hf_sources(cfg).items()}


def to_hf_state(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Decoder state dict -> HF-named tensors (fused projections split back)."""
    out: dict[str, torch.Tensor] = {}
    sizes = {"self_attn.qkv_proj.weight": [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim,
                                           cfg.num_kv_heads * cfg.head_dim],
             "mlp.gate_up_proj.weight": [cfg.intermediate_size, cfg.intermediate_size]}
    for name, t in state.items():
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = t.contiguous()
            continue
        m = _LAYER.match(name)
        if m and m.group(2) in FUSED:
            for hf, part in zip(FUSED[m.group(2)], t.split(sizes[m.group(2)], dim=0), strict=True):
                out[f"model.layers.{m.group(1)}.{hf}"] = part.contiguous()
        else:
            out[f"model.{name}"] = t.contiguous()
    return out
