"""The default draft: a copy of the default target stored in fp16, whose config.json asks the loader
for fp16-weight linears on CPU (lumen.model.quant).

The committed recipe (data/default_draft.json) says what to copy: which layers to drop (none now),
the storage dtype and the load-time quantization. It was chosen by scripts/make_draft.py compare,
which measures candidate drafts (greedy acceptance and decode-step cost against the target) on
training prompts disjoint from the measurement set. Building the draft at prepare time is a cheap,
deterministic copy of the converted target. fp16 storage halves the bytes a restarted worker reads
and holds exactly the values the fp16 linears will use.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .quant import QUANT_KEY, SCHEMES

# 3: fp16 copy + "lumen_quantization" (was: bf16 copy without layer 5)
DRAFT_FORMAT_VERSION = 3
RECIPE_FILE = "default_draft.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_recipe() -> dict:
    return json.loads(resources.files("lumen.model").joinpath("data", RECIPE_FILE).read_text())


def copy_layers(target_dir: Path, out: Path, layers: list[int], dtype: torch.dtype = torch.float32,
                name: str | None = None, quantization: str | None = None) -> None:
    """Write a copy of an HF Llama/Qwen3 dir keeping only `layers` (renumbered 0..) + embeddings,
    final norm and head, with tensors cast to `dtype`; tokenizer files are copied along.
    `quantization`: recorded in config.json for the loader to apply (lumen.model.quant)."""
    if quantization is not None and quantization not in SCHEMES:
        raise ValueError(f"unknown quantization {quantization!r}; known: {', '.join(SCHEMES)}")
    cfg = json.loads((target_dir / "config.json").read_text())
    n = int(cfg["num_hidden_layers"])
    if not layers or sorted(set(layers)) != list(layers) or layers[-1] >= n or layers[0] < 0:
        raise ValueError(f"layers must be increasing indices below {n}, got {layers}")
    remap = {f"model.layers.{src}.": f"model.layers.{dst}." for dst, src in enumerate(layers)}
    state = {}
    with safe_open(str(target_dir / "model.safetensors"), framework="pt") as f:
        for key in f.keys():
            if key.startswith("model.layers."):
                prefix = ".".join(key.split(".")[:3]) + "."
                if prefix not in remap:
                    continue
                state[remap[prefix] + key[len(prefix):]] = f.get_tensor(key).to(dtype)
            else:
                state[key] = f.get_tensor(key).to(dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg["num_hidden_layers"] = len(layers)
    cfg["_name_or_path"] = name or out.name
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg.pop(QUANT_KEY, None)
    if quantization:
        cfg[QUANT_KEY] = quantization
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for fname in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (target_dir / fname).is_file():
            (out / fname).write_bytes((target_dir / fname).read_bytes())


def build_draft(target_dir: Path, out: Path, recipe: dict | None = None) -> dict:
    """Build the default draft from the converted target following the committed recipe."""
    recipe = recipe or load_recipe()
    n = json.loads((target_dir / "config.json").read_text())["num_hidden_layers"]
    drop = set(recipe["drop_layers"])
    layers = [i for i in range(n) if i not in drop]
    dtype, quant = recipe.get("dtype", "float32"), recipe.get("quantization")
    copy_layers(target_dir, out, layers, _DTYPES[dtype], name=out.name, quantization=quant)
    return {"target": str(target_dir), "layers": layers, "dtype": dtype, "quantization": quant}
