"""lumen.model core: config, presets, decoder + DenseKV contract."""

import pytest
import torch

from lumen.model import PRESETS, Decoder, DenseKV, ModelConfig

torch.set_num_threads(1)


def test_presets_real_qwen3_shapes():
    # Parameter counts of the official Qwen3 checkpoints (model cards: 0.6B, 1.7B, 4B, 8.2B, 14.8B, 32.8B).
    expected = {"qwen3-0.6b": 0.596, "qwen3-1.7b": 1.72, "qwen3-4b": 4.02, "qwen3-8b": 8.19,
                "qwen3-14b": 14.77, "qwen3-32b": 32.76}
    for name, billions in expected.items():
        cfg = PRESETS[name]
        assert cfg.arch == "qwen3" and cfg.qk_norm and cfg.head_dim == 128 and cfg.vocab_size == 151936
        assert cfg.param_count() / 1e9 == pytest.approx(billions, rel=0.01), name
    assert PRESETS["qwen3-8b"].weight_bytes(torch.bfloat16) == 2 * PRESETS["qwen3-8b"].param_count()
    assert PRESETS["qwen3-8b"].kv_bytes_per_token(torch.bfloat16) == 2 * 36 * 8 * 128 * 2


def test_config_hf_roundtrip():
    for name in ("tiny", "tiny-llama", "qwen3-8b", "qwen3-0.6b"):
        cfg = PRESETS[name]
        assert ModelConfig.from_hf(cfg.to_hf(), name=cfg.name) == cfg
    with pytest.raises(ValueError, match="unsupported"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(ValueError):
        ModelConfig(num_heads=3, num_kv_heads=2)


def test_config_is_frozen_and_hashable():
    cfg = PRESETS["tiny"]
    with pytest.raises(AttributeError):
        cfg.num_layers = 3
    assert hash(cfg) == hash(cfg.replace())
    assert ModelConfig(eos_token_ids=[2, 3]).eos_token_ids == (2, 3)


@pytest.mark.parametrize("name", ["tiny", "tiny-llama"])
def test_incremental_decode_matches_full_prefill(name):
    cfg = PRESETS[name]
    torch.manual_seed(0)
    model = Decoder(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (12,))
    with torch.no_grad():
        full = model.logits(model(ids, torch.arange(12), DenseKV(cfg, dtype=torch.float64)))
        kv = DenseKV(cfg, dtype=torch.float64)
        parts = [model.logits(model(ids[:5], torch.arange(5), kv))]
        parts.append(model.logits(model(ids[5:8], torch.arange(5, 8), kv)))  # chunk over a cached past
        for i in range(8, 12):
            parts.append(model.logits(model(ids[i:i + 1], torch.tensor([i]), kv)))
    assert kv.length == 12
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-10, atol=1e-10)


def test_dense_kv_truncate_rolls_back():
    cfg = PRESETS["tiny"]
    torch.manual_seed(1)
    model = Decoder(cfg).double().eval()
    ids = torch.randint(0, cfg.vocab_size, (8,))
    kv = DenseKV(cfg, dtype=torch.float64)
    with torch.no_grad():
        model(ids[:6], torch.arange(6), kv)
        ref = model.logits(model(ids[6:7], torch.tensor([6]), kv))
        kv.truncate(4)  # reject two "speculated" tokens, then recompute them
        model(ids[4:6], torch.arange(4, 6), kv)
        again = model.logits(model(ids[6:7], torch.tensor([6]), kv))
    torch.testing.assert_close(again, ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        kv.truncate(100)


def test_tied_embeddings_share_storage():
    m = Decoder(PRESETS["tiny-llama"])
    assert m.lm_head.weight is m.embed_tokens.weight
    assert Decoder(PRESETS["tiny"]).lm_head.weight is not Decoder(PRESETS["tiny"]).embed_tokens.weight


def test_meta_decoder_skips_init_and_keeps_seeded_weights():
    # A worker builds its Decoder on the meta device at every (re)load; nn.Embedding's own init there
    # imported torch._dynamo (1-2 s of CPU on the recovery path). A fresh interpreter shows it does not.
    import subprocess
    import sys
    code = ("import sys, torch\nfrom lumen.model import PRESETS, Decoder\n"
            "with torch.device('meta'):\n    m = Decoder(PRESETS['qwen3-8b'])\n"
            "assert m.embed_tokens.weight.is_meta\nprint('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    # on a real device the embedding is drawn exactly as nn.Embedding draws it
    torch.manual_seed(3)
    drawn = Decoder(PRESETS["tiny"]).embed_tokens.weight
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.nn.Embedding(*drawn.shape).weight)
