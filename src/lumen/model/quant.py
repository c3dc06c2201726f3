"""Load-time weight quantization of a Decoder's linear layers, for drafts on CPU.

A model directory asks for it in its config.json (`"lumen_quantization": "fp16-weights"`); the
loader applies it when loading onto a CPU and loads the directory unquantized elsewhere.

"fp16-weights": every nn.Linear (the LM head too, as its own copy when tied: the embedding lookup
keeps the fp32 table) becomes an FBGEMM fp16-packed linear: weights held in fp16, activations and
accumulation in fp32. Batch-1 decode on CPU is bound by reading the weights, so halving their bytes
cuts a step of the default model to ~0.4 of fp32 while staying within fp16 rounding of the fp32
model (a draft that almost always agrees). int8 dynamic quantization was measured too and rejected:
~0.32 of a step but only ~0.8 greedy agreement, activations quantized per tensor (see
scripts/make_draft.py compare).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

QUANT_KEY = "lumen_quantization"
FP16_WEIGHTS = "fp16-weights"
SCHEMES = (FP16_WEIGHTS,)


@functools.cache
def fp16_linear_available() -> bool:
    """True when this torch build has FBGEMM's fp16 linear ops (x86 builds do; not every platform)."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(1, 1), None)
        torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 1), packed)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


class Fp16Linear(nn.Module):
    """y = x @ W.T with W packed in fp16 (FBGEMM); x and y keep their dtype (computed in fp32)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._packed = torch.ops.quantized.linear_prepack_fp16(weight.detach().to("cpu", torch.float32), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the op takes fp32 only; the engine's deterministic mode runs the draft in float64
        y = torch.ops.quantized.linear_dynamic_fp16(x.float() if x.dtype != torch.float32 else x, self._packed)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=fp16 (packed)"


def quantize_linears(model: nn.Module, scheme: str) -> int:
    """Replace every nn.Linear of a CPU model in place; returns how many were replaced."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown {QUANT_KEY} {scheme!r}; known: {', '.join(SCHEMES)}")
    if not fp16_linear_available():
        raise RuntimeError(f"{QUANT_KEY}={scheme} needs torch.ops.quantized.linear_prepack_fp16 / "
                           "linear_dynamic_fp16 (FBGEMM), which this torch build lacks")
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if child.bias is not None:
                    raise ValueError(f"{name}: linear layers with a bias are not supported")
                if child.weight.device.type != "cpu":
                    raise ValueError(f"{QUANT_KEY}={scheme} is for CPU models; {name} is on {child.weight.device}")
                setattr(parent, name, Fp16Linear(child.weight))
                n += 1
    return n
