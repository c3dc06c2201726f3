"""Load-time fp16-weight linears (lumen.model.quant) on tiny models: exact w.r.t. fp16-rounded
weights, applied by the loader only when config.json asks and only on CPU, and a no-op for outputs
when such a model is the engine's draft."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lumen.engine import Engine, EngineConfig, SamplingParams
from lumen.model import PRESETS, load_model, random_model, save_model
from lumen.model import loader as loader_mod
from lumen.model.draft import copy_layers
from lumen.model.quant import FP16_WEIGHTS, QUANT_KEY, Fp16Linear, fp16_linear_available, quantize_linears
from lumen.model.specmeasure import greedy_decode

torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(not fp16_linear_available(), reason="torch build without FBGEMM fp16 linears")


def test_fp16_linear_equals_linear_with_fp16_rounded_weights():
    w = torch.randn(96, 64) * 0.05
    x = torch.randn(5, 64)
    lin = Fp16Linear(w)
    want = F.linear(x, w.half().float())
    torch.testing.assert_close(lin(x), want, rtol=1e-5, atol=1e-6)
    y64 = lin(x.double())  # the engine's deterministic mode hands the draft float64
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, want.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny", "tiny-llama"])  # untied and tied heads
def test_quantize_linears_replaces_every_linear_and_keeps_greedy_path(preset):
    cfg = PRESETS[preset]
    m = random_model(cfg, seed=3, std=0.3)
    ref = greedy_decode(m, [3, 17, 250, 9], 24)
    emb = m.embed_tokens.weight.detach().clone()
    n = quantize_linears(m, FP16_WEIGHTS)
    assert n == 4 * cfg.num_layers + 1
    assert not any(isinstance(mod, nn.Linear) for mod in m.modules())
    assert torch.equal(m.embed_tokens.weight, emb) and m.dtype == torch.float32  # lookup table untouched
    assert greedy_decode(m, [3, 17, 250, 9], 24) == ref  # fp16 weights: same greedy path on these
    with pytest.raises(ValueError):
        quantize_linears(random_model(cfg), "int3")


def _quantized_dir(tmp_path, preset="tiny"):
    cfg = PRESETS[preset]
    src = save_model(random_model(cfg, seed=3, std=0.3), cfg, tmp_path / "t")
    (tmp_path / "d").mkdir()
    copy_layers(src, tmp_path / "d", list(range(cfg.num_layers)), dtype=torch.float16, quantization=FP16_WEIGHTS)
    return src, tmp_path / "d"


def test_loader_applies_quantization_from_config(tmp_path):
    src, d = _quantized_dir(tmp_path)
    assert json.loads((d / "config.json").read_text())[QUANT_KEY] == FP16_WEIGHTS
    assert QUANT_KEY not in json.loads((src / "config.json").read_text())
    q = load_model(d, progress=False).model
    assert isinstance(q.lm_head, Fp16Linear) and isinstance(q.layers[0].mlp.down_proj, Fp16Linear)
    assert isinstance(load_model(src, progress=False).model.lm_head, nn.Linear)  # no key: untouched
    with pytest.raises(ValueError):
        copy_layers(src, tmp_path / "d", [0], quantization="int3")


def test_loader_falls_back_to_unquantized_when_kernels_missing(tmp_path, monkeypatch, capfd):
    _, d = _quantized_dir(tmp_path)
    monkeypatch.setattr(loader_mod, "fp16_linear_available", lambda: False)
    m = load_model(d, progress=False).model
    assert isinstance(m.lm_head, nn.Linear)
    assert f"{QUANT_KEY}={FP16_WEIGHTS} not applied" in capfd.readouterr().err


def test_quantized_draft_in_engine_keeps_target_greedy_outputs(tmp_path):
    # deterministic mode: the target runs in float64, the draft's linears in fp32 with fp16 weights;
    # whatever it proposes, the verify path commits exactly the target's greedy tokens
    src, d = _quantized_dir(tmp_path)
    target = load_model(src, progress=False).model
    draft = load_model(d, progress=False)
    rng = random.Random(4)
    prompts = {f"r{i}": [rng.randrange(2, 512) for _ in range(rng.randint(3, 40))] for i in range(3)}
    eng = Engine(target, EngineConfig(deterministic=True, num_blocks=128, draft=draft, num_draft_tokens=4))
    for rid, p in prompts.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=20, ignore_eos=True))
    out = {rid: [] for rid in prompts}
    while eng.has_work():
        for o in eng.step():
            out[o.req_id] += o.token_ids
    for rid, p in prompts.items():
        assert out[rid] == greedy_decode(target, p, 20), rid
    s = eng.stats()
    assert s["spec_drafts"] > 0 and s["spec_acceptance"] > 0.9, s
