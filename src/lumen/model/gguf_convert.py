"""Convert a llama-architecture GGUF (gpt2 BPE tokenizer) into an HF Llama directory.

Weights: every tensor is dequantized with `gguf.quants.dequantize` (Q4_1 / Q8_0 / F32 ...), renamed
to HF Llama names, and the q/k rows get llama.cpp's RoPE permutation undone (llama.cpp interleaves
the two rotate-half halves of each head; HF keeps them as two contiguous halves).
Tokenizer: a byte-level BPE tokenizer.json built from the GGUF vocab + merges, with the
pre-tokenizer llama.cpp uses for the declared `tokenizer.ggml.pre`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from .config import ModelConfig

_GGUF_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOKEN_TYPE_CONTROL = 3


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    parts = gguf_name.split(".")  # blk.N.kind.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_TO_HF:
        return f"model.layers.{parts[1]}.{_GGUF_TO_HF[parts[2]]}.{parts[3]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert-time permute: rows (head, pair, 2) -> (head, 2, pair)."""
    out_dim = w.shape[0]
    return w.reshape(n_head, out_dim // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_config(reader: Any, name: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")
    n_head = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    eps = float(_field(reader, "llama.attention.layer_norm_rms_epsilon"))
    return ModelConfig(
        arch="llama",
        vocab_size=int(_field(reader, "llama.vocab_size", len(tokens))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_layers=int(_field(reader, "llama.block_count")),
        num_heads=n_head,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_head)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // n_head)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(f"{eps:.7g}"),  # GGUF stores it as float32 (1e-5 -> 9.99999975e-06)
        max_position=int(_field(reader, "llama.context_length", 2048)),
        tie_embeddings=not has_output,
        qk_norm=False,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=(),  # set by the caller: GGUF metadata often names the wrong one for chat
        name=name,
    )


def gguf_state_dict(reader: Any, cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        # dequantize returns numpy in row-major HF layout [out, in] (GGUF lists dims innermost-first).
        arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = torch.from_numpy(arr.copy()).reshape(tuple(reversed([int(d) for d in t.shape])))
        if ".self_attn.q_proj." in name:
            w = unpermute_rope_rows(w, cfg.num_heads)
        elif ".self_attn.k_proj." in name:
            w = unpermute_rope_rows(w, cfg.num_kv_heads)
        state[name] = w.to(dtype).contiguous()
    return state


# llama.cpp pre-tokenizer names -> the equivalent `tokenizers` pre-tokenizer (only what we need).
def _pre_tokenizer(pre: str) -> Any:
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre == "smollm":  # llama.cpp: "\p{N}" then the GPT-2 regex == HF Digits(individual) + ByteLevel
        return pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    if pre in ("gpt-2", "default"):
        return byte_level
    raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}")


def gguf_tokenizer(reader: Any) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE (tokenizer.ggml.model = gpt2) GGUF tokenizers are supported")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(_field(reader, "tokenizer.ggml.pre", "gpt-2"))
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens (<|im_start|> ...) must match whole, never be split by BPE.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types, strict=True) if ty == _TOKEN_TYPE_CONTROL])
    return tok


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, name: str, eos_tokens: tuple[str, ...],
                 bos_token: str | None, dtype: torch.dtype = torch.float32) -> ModelConfig:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json into out_dir."""
    from gguf import GGUFReader

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))
    tok = gguf_tokenizer(reader)
    eos_ids = tuple(tok.token_to_id(t) for t in eos_tokens)
    if None in eos_ids:
        raise ValueError(f"eos tokens {eos_tokens} not all in the vocabulary")
    cfg = gguf_config(reader, name).replace(eos_token_ids=eos_ids)
    state = gguf_state_dict(reader, cfg, dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf()
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_tokens[0],
        "pad_token": eos_tokens[0],
        "add_bos_token": False,  # chat templates start with their own control token
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position,
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    return cfg
