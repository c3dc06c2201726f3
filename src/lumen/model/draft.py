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
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open

from .quant import QUANT_KEY, SCHEMES
from .safetensors_io import DTYPE_NAMES
from .weight_files import (
    INDEX,
    LAYERS_SHARD,
    SHARED_SHARD,
    is_layer_tensor,
    read_weight_index,
    write_one_file,
    write_shards,
    write_split,
)

# 3: fp16 copy + "lumen_quantization" (was: bf16 copy without layer 5)
DRAFT_FORMAT_VERSION = 3
RECIPE_FILE = "default_draft.json"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_recipe() -> dict:
    return json.loads(resources.files("lumen.model").joinpath("data", RECIPE_FILE).read_text())


def _weight_map(model_dir: Path) -> dict[str, str]:
    """tensor name -> file name of an HF directory (one file or an index of shards)."""
    weight_map = read_weight_index(model_dir)
    if weight_map is not None:
        return weight_map
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def _by_file(weight_map: dict[str, str]) -> dict[str, list[str]]:
    """file name -> the tensor names it holds."""
    by_file: dict[str, list[str]] = {}
    for key, fname in weight_map.items():
        by_file.setdefault(fname, []).append(key)
    return by_file


def _is_split(model_dir: Path, weight_map: dict[str, str]) -> bool:
    """Whether the directory's index puts every tensor outside the layers, and only those, in
    SHARED_SHARD (raises for an index that does not: a sharded checkpoint of another layout)."""
    if not (model_dir / INDEX).is_file():
        return False
    shared = {k for k, f in weight_map.items() if f == SHARED_SHARD}
    if shared != {k for k in weight_map if not is_layer_tensor(k)}:
        raise ValueError(f"{model_dir}: sharded, but not as write_split does (every tensor outside the "
                         f"layers, and only those, in {SHARED_SHARD}): its draft cannot link them")
    return True


def split_shared_shard(model_dir: Path) -> None:
    """Rewrite a one-file HF directory as `write_split` shards with an index (each written aside and
    renamed in, the index last, the one file removed after): a self-draft can then link the shared
    shard. A directory split already is left as it is."""
    if _is_split(model_dir, _weight_map(model_dir)):
        (model_dir / "model.safetensors").unlink(missing_ok=True)  # left by a split cut short
        return
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        write_split(model_dir, {key: f.get_tensor(key) for key in f.keys()})


def copy_layers(target_dir: Path, out: Path, layers: list[int], dtype: torch.dtype = torch.float32,
                name: str | None = None, quantization: str | None = None, share_with_target: bool = False) -> None:
    """Write a copy of an HF Llama/Qwen3 dir keeping only `layers` (renumbered 0..) + embeddings,
    final norm and head, with tensors cast to `dtype`; tokenizer files are copied along.
    `quantization`: recorded in config.json for the loader to apply (lumen.model.quant).

    `share_with_target` (a self-draft: the target's first layers): the embedding, norm and head are
    not copied but linked, the draft's SHARED_SHARD being a relative symlink to the target's (the
    target, if it is one file, is split into `write_split` shards first: it must be writable). A
    worker that loads the draft and then the target, as a restarted one does (mechanism 3), reads
    those bytes once (`lumen.model.loader.read_weights_to_host`, `shared_reads`). They must be the
    target's own values: `dtype` must be the target's and there is no quantization."""
    if quantization is not None and quantization not in SCHEMES:
        raise ValueError(f"unknown quantization {quantization!r}; known: {', '.join(SCHEMES)}")
    cfg = json.loads((target_dir / "config.json").read_text())
    n = int(cfg["num_hidden_layers"])
    if not layers or sorted(set(layers)) != list(layers) or layers[-1] >= n or layers[0] < 0:
        raise ValueError(f"layers must be increasing indices below {n}, got {layers}")
    weight_map = _weight_map(target_dir)
    if share_with_target:  # everything checked before the target is touched
        if quantization is not None:
            raise ValueError("a draft that shares the target's tensors cannot be quantized")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"a shared draft is stored as float32, bfloat16 or float16, not {dtype}")
        want, found = DTYPE_NAMES[dtype], set()
        if not _is_split(target_dir, weight_map) and "model.safetensors" not in set(weight_map.values()):
            raise ValueError(f"{target_dir}: neither one file nor split by write_split")
        for fname, keys in _by_file(weight_map).items():
            with safe_open(str(target_dir / fname), framework="pt") as f:
                found |= {f.get_slice(k).get_dtype() for k in keys if not is_layer_tensor(k)}
        if found != {want}:
            raise ValueError(f"the target's shared tensors are {sorted(found)}, not {want}: "
                             "a linked shard would not hold the draft's dtype")
        split_shared_shard(target_dir)
        weight_map = _weight_map(target_dir)
    remap = {f"model.layers.{src}.": f"model.layers.{dst}." for dst, src in enumerate(layers)}
    state = {}
    by_file = _by_file(weight_map)
    for fname, keys in sorted(by_file.items()):
        with safe_open(str(target_dir / fname), framework="pt") as f:
            for key in keys:
                if is_layer_tensor(key):
                    prefix = ".".join(key.split(".")[:3]) + "."
                    if prefix in remap:
                        state[remap[prefix] + key[len(prefix):]] = f.get_tensor(key).to(dtype)
                elif not share_with_target:
                    state[key] = f.get_tensor(key).to(dtype)
    if share_with_target:
        link = out / SHARED_SHARD
        link.unlink(missing_ok=True)
        # relative, from the real locations: a path through a symlinked directory must not dangle
        link.symlink_to(os.path.relpath((target_dir / SHARED_SHARD).resolve(), out.resolve()))
        write_shards(out, {LAYERS_SHARD: state}, linked=dict.fromkeys(by_file[SHARED_SHARD], SHARED_SHARD))
    else:
        write_one_file(out, state)
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
