"""Model shape description shared by the decoder, the loader and the engine's KV sizing."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

_ARCHS = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "llama"  # "llama" | "qwen3"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position: int = 2048
    tie_embeddings: bool = True
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.arch not in _ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; expected one of {sorted(_ARCHS)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not a multiple of num_kv_heads {self.num_kv_heads}")
        # Accept lists (e.g. from JSON) but store a tuple so the dataclass stays hashable.
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf(cls, d: dict[str, Any], name: str | None = None) -> ModelConfig:
        archs = d.get("architectures") or []
        mtype = d.get("model_type", "")
        if "Qwen3ForCausalLM" in archs or mtype == "qwen3":
            arch = "qwen3"
        elif "LlamaForCausalLM" in archs or mtype == "llama":
            arch = "llama"
        else:
            raise ValueError(f"unsupported model: architectures={archs} model_type={mtype!r} "
                             "(supported: LlamaForCausalLM, Qwen3ForCausalLM)")
        nh = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        eos = d.get("eos_token_id")
        eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, list | tuple) else (eos,))
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported")
        # Only plain RoPE is implemented; refuse scaled variants rather than silently mis-rotate.
        scaling = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
            raise ValueError(f"rope_scaling {scaling} is not supported")
        return cls(
            arch=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=nh,
            num_kv_heads=int(d.get("num_key_value_heads") or nh),
            head_dim=int(d.get("head_dim") or hidden // nh),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            max_position=int(d.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            qk_norm=arch == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name or d.get("_name_or_path") or arch,
        )

    def to_hf(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": [_ARCHS[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) != 1
                             else self.eos_token_ids[0]) if self.eos_token_ids else None,
            "torch_dtype": "float32",
            "_name_or_path": self.name,
        }
        return d

    # ---- sizing ----
    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def param_count(self) -> int:
        h, hd = self.hidden_size, self.head_dim
        attn = h * self.num_heads * hd * 2 + h * self.num_kv_heads * hd * 2
        mlp = 3 * h * self.intermediate_size
        norms = 2 * h + (2 * hd if self.qk_norm else 0)
        per_layer = attn + mlp + norms
        emb = self.vocab_size * h * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def weight_bytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        return self.param_count() * torch.empty((), dtype=dtype).element_size()

    def replace(self, **kw: Any) -> ModelConfig:
        return dataclasses.replace(self, **kw)


def _qwen3(name: str, layers: int, hidden: int, inter: int, heads: int, kv: int, tied: bool) -> ModelConfig:
    return ModelConfig(
        arch="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128, rope_theta=1e6,
        rms_norm_eps=1e-6, max_position=40960, tie_embeddings=tied, qk_norm=True,
        bos_token_id=None, eos_token_ids=(151645, 151643), name=name,
    )


# Shapes copied from the official Qwen/Qwen3-* config.json files.
PRESETS: dict[str, ModelConfig] = {
    "qwen3-0.6b": _qwen3("qwen3-0.6b", 28, 1024, 3072, 16, 8, True),
    "qwen3-1.7b": _qwen3("qwen3-1.7b", 28, 2048, 6144, 16, 8, True),
    "qwen3-4b": _qwen3("qwen3-4b", 36, 2560, 9728, 32, 8, True),
    "qwen3-8b": _qwen3("qwen3-8b", 36, 4096, 12288, 32, 8, False),
    "qwen3-14b": _qwen3("qwen3-14b", 40, 5120, 17408, 40, 8, False),
    "qwen3-32b": _qwen3("qwen3-32b", 64, 5120, 25600, 64, 8, False),
    # Tiny shapes for tests: GQA (4 query heads over 2 KV heads), cheap on CPU.
    "tiny": ModelConfig(
        arch="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-6,
        max_position=2048, tie_embeddings=False, qk_norm=True, bos_token_id=None,
        eos_token_ids=(1,), name="tiny",
    ),
    "tiny-llama": ModelConfig(
        arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=3,
        num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
        max_position=2048, tie_embeddings=True, qk_norm=False, bos_token_id=0,
        eos_token_ids=(1,), name="tiny-llama",
    ),
}
