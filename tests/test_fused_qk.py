"""The fused QK-norm + RoPE kernel against the eager composite it replaces.

Runs on CUDA; without a GPU only under Triton's interpreter (`TRITON_INTERPRET=1` with triton
importable, as a developer can run it on a CPU box), otherwise skipped: CI has no Triton.
"""

from __future__ import annotations

import os

import pytest
import torch

from lumen.model import PRESETS, DenseKV, fused_qk
from lumen.model.decoder import RMSNorm, Rotary, apply_rope
from lumen.model.loader import random_model

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(fused_qk.triton is None or not (torch.cuda.is_available() or INTERPRET),
                                reason="needs Triton on CUDA, or its interpreter")


def _eager(qkv, positions, rotary, nh, nkv, hd, qn, kn):
    t = qkv.shape[0]
    q = qkv[:, :nh * hd].view(t, nh, hd)
    k = qkv[:, nh * hd:(nh + nkv) * hd].view(t, nkv, hd)
    if qn is not None:
        q, k = qn(q), kn(k)
    cos, sin = rotary(positions, qkv.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


@pytest.mark.parametrize("norm", [True, False])
def test_fused_equals_the_eager_composite_in_fp32(norm):
    torch.manual_seed(0)
    nh, nkv, hd, t = 4, 2, 64, 37
    rotary = Rotary(hd, 1e6, 4096)
    qkv_full = torch.randn(t, (nh + 2 * nkv) * hd + 8, device=DEVICE)  # strided rows, as after a split
    qkv = qkv_full[:, :(nh + 2 * nkv) * hd]
    positions = torch.randint(0, 4096, (t,), device=DEVICE)
    qn = kn = None
    if norm:
        qn, kn = RMSNorm(hd, 1e-6).to(DEVICE), RMSNorm(hd, 1e-6).to(DEVICE)
        with torch.no_grad():
            qn.weight.uniform_(0.5, 1.5)
            kn.weight.uniform_(0.5, 1.5)
    ref_q, ref_k = _eager(qkv, positions, rotary, nh, nkv, hd, qn, kn)
    cos, sin = rotary.table(qkv.device, qkv.dtype)
    with torch.no_grad():
        q, k = fused_qk.qk_norm_rope(qkv, positions, cos, sin, nh, nkv, hd, qn.weight if norm else None,
                                     kn.weight if norm else None, 1e-6)
    torch.testing.assert_close(q, ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, ref_k, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 through the interpreter is not what runs")
def test_fused_in_bf16_is_within_a_rounding_step_of_the_fp32_math():
    torch.manual_seed(1)
    nh, nkv, hd, t = 32, 8, 128, 300
    rotary = Rotary(hd, 1e6, 8192)
    qkv = torch.randn(t, (nh + 2 * nkv) * hd, device="cuda")
    positions = torch.randint(0, 8192, (t,), device="cuda")
    qn, kn = RMSNorm(hd, 1e-6).cuda(), RMSNorm(hd, 1e-6).cuda()
    ref_q, ref_k = _eager(qkv, positions, rotary, nh, nkv, hd, qn, kn)
    cos, sin = rotary.table(qkv.device, torch.bfloat16)
    with torch.no_grad():
        q, k = fused_qk.qk_norm_rope(qkv.bfloat16(), positions, cos, sin, nh, nkv, hd, qn.weight.bfloat16(),
                                     kn.weight.bfloat16(), 1e-6)
    torch.testing.assert_close(q.float(), ref_q, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(k.float(), ref_k, rtol=1.6e-2, atol=1e-2)


def test_a_model_with_the_fused_kernel_decodes_the_same_greedy_tokens(monkeypatch):
    cfg = PRESETS["tiny"]
    model = random_model(cfg, device=DEVICE, dtype=torch.float32, seed=7, std=0.3)
    prompt = torch.arange(5, 45, device=DEVICE)

    def greedy(fused: bool) -> list[int]:
        model.fused_qk = fused
        kv = DenseKV(cfg, device=DEVICE, dtype=torch.float32)
        ids, out = prompt, []
        with torch.inference_mode():
            for _ in range(8):
                start = kv.length
                h = model(ids, torch.arange(start, start + len(ids), device=DEVICE), kv)
                nxt = int(model.logits(h[-1:]).argmax(-1))
                out.append(nxt)
                ids = torch.tensor([nxt], device=DEVICE)
        return out

    monkeypatch.setattr(fused_qk, "available", lambda x, hd: True)  # on CPU: through the interpreter
    assert greedy(True) == greedy(False)
