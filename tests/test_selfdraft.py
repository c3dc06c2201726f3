"""Self-drafts for random-weight targets (lumen.model.selfdraft) and the GPU reproduction's prepare
step, run on CPU with small shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lumen.model import PRESETS, ModelConfig
from lumen.model.dense_kv import DenseKV
from lumen.model.loader import load_model, random_model
from lumen.model.selfdraft import DepthDecay, acceptance, first_layers, pick_decay, residual_outputs

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(arch="qwen3", vocab_size=2048, hidden_size=64, intermediate_size=128, num_layers=8,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
                  max_position=512, tie_embeddings=False, qk_norm=True, bos_token_id=1,
                  eos_token_ids=(2,), name="selfdraft-test")
PROMPTS = [list(range(100 + 7 * i, 140 + 7 * i)) for i in range(4)]


def _hidden_after_layers(model, ids):
    kv = DenseKV(model.config, model.device, model.dtype, capacity=len(ids) + 1)
    with torch.inference_mode():
        return model.logits(model(torch.tensor(ids), torch.arange(len(ids)), kv))


def test_depth_decay_scales_residual_outputs_without_compounding():
    model = random_model(CFG, "cpu", torch.float32, seed=3)
    before = [w.clone() for _, w in residual_outputs(model)]
    decay = DepthDecay(model)
    decay.set(0.5)
    for (layer, w), b in zip(residual_outputs(model), before, strict=True):
        assert torch.equal(w, b * 0.5 ** layer)
    decay.set(0.9)
    decay.set(1.0)  # from the undecayed copy, not from the previous setting
    for (_, w), b in zip(residual_outputs(model), before, strict=True):
        assert torch.equal(w, b)
    with pytest.raises(ValueError):
        decay.set(0.0)


def test_first_layers_shares_weights_and_the_full_depth_is_the_target():
    model = random_model(CFG, "cpu", torch.float32, seed=3)
    full = first_layers(model, CFG.num_layers)
    assert torch.equal(_hidden_after_layers(full, PROMPTS[0]), _hidden_after_layers(model, PROMPTS[0]))
    # same storage: a depth decay set on the target is what the draft computes with
    assert (first_layers(model, 2).layers[1].mlp.down_proj.weight.data_ptr()
            == model.layers[1].mlp.down_proj.weight.data_ptr())
    for bad in (0, CFG.num_layers + 1):
        with pytest.raises(ValueError):
            first_layers(model, bad)


def test_pick_decay_brings_a_shallow_draft_to_the_goal_acceptance():
    model = random_model(CFG, "cpu", torch.float32, seed=3)
    plain = acceptance(model, 1, PROMPTS, 24, 4).acceptance
    decay, tried = pick_decay(model, 1, 0.6, PROMPTS, 24, 4, tolerance=0.05, log=lambda *_: None)
    assert plain < 0.45  # plain random layers: one layer of eight is a poor draft
    assert 0.0 < decay < 1.0 and abs(next(t for t in tried if t["decay"] == decay)["acceptance"] - 0.6) <= 0.05
    # the model is left at the chosen decay: measuring again gives the same figure
    assert acceptance(model, 1, PROMPTS, 24, 4).acceptance == pytest.approx(
        next(t["acceptance"] for t in tried if t["decay"] == decay))


def test_gpu_repro_prepare_writes_a_decayed_target_and_its_draft_on_cpu(tmp_path):
    env = {**os.environ, "LUMEN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT / "src")}
    out = tmp_path / "prepare.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_repro.py"), "prepare", "--preset", "tiny",
           "--device", "cpu", "--prompts", "2", "--max-new", "16", "--tolerance", "0.1", "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    target, draft = Path(result["target"]["dir"]), Path(result["draft"]["dir"])
    assert result["draft"]["k"] == 1 and result["target"]["depth_decay"] < 1.0
    assert abs(result["draft"]["acceptance"] - 0.6) <= 0.1
    # the written target carries the decay: reloaded, its deepest layer's residual outputs are scaled
    reloaded = load_model(target, progress=False).model
    base = random_model(PRESETS["tiny"], "cpu", torch.float32)  # what prepare drew (seeded)
    decay = result["target"]["depth_decay"]
    for w, b in ((reloaded.layers[1].mlp.down_proj.weight, base.layers[1].mlp.down_proj.weight),
                 (reloaded.layers[1].self_attn.o_proj.weight, base.layers[1].self_attn.o_proj.weight)):
        assert torch.allclose(w, b * decay)
    assert torch.equal(reloaded.layers[0].mlp.down_proj.weight, base.layers[0].mlp.down_proj.weight)
    # the draft is the target's first layer, as written
    drafted = load_model(draft, progress=False).model
    assert drafted.config.num_layers == 1
    assert torch.equal(drafted.layers[0].self_attn.qkv_proj.weight, reloaded.layers[0].self_attn.qkv_proj.weight)
    # its embedding, norm and head are the target's shard, linked: a restarted worker reads them once
    assert (draft / "model-shared.safetensors").resolve() == (target / "model-shared.safetensors").resolve()
    assert 0 < result["draft"]["own_bytes"] < result["draft"]["bytes"]
    # prepared once: a second prepare with the same settings reuses both, other settings redo both
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    assert json.loads(out.read_text())["target"] == result["target"]
    subprocess.run([*cmd, "--max-new", "12"], env=env, check=True, capture_output=True, timeout=300)
    again = json.loads(out.read_text())
    assert again["settings"]["max_new"] == 12 and again["target"]["draw_s"] != result["target"]["draw_s"]
