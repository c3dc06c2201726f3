"""A model directory's weight files on disk: one `model.safetensors`, or shards named by an index.

The layout shared by the loader (which reads it) and the draft builder (which writes a draft beside its
target and links the target's shard of embedding, norm and head), below both of them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

# a model written as two shards (write_split), so that a self-draft can link the first
SHARED_SHARD = "model-shared.safetensors"  # the tensors outside the layers (embedding, norm, head)
LAYERS_SHARD = "model-layers.safetensors"
INDEX = "model.safetensors.index.json"


def is_layer_tensor(hf_name: str) -> bool:
    return hf_name.startswith("model.layers.")


def read_weight_index(path: Path) -> dict[str, str] | None:
    """tensor name -> shard file name from a sharded directory's index; None without an index."""
    index = path / INDEX
    return json.loads(index.read_text())["weight_map"] if index.is_file() else None


def replace_atomically(path: Path, write) -> None:
    """write(tmp) then rename over path: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.chmod(0o644)  # save_file creates 0600; a model directory is read by other users too
    tmp.replace(path)


def write_shards(directory: Path, shards: dict[str, dict[str, torch.Tensor]],
                 linked: dict[str, str] | None = None) -> None:
    """file name -> its tensors (HF names), then the index mapping them (and `linked`: names held
    by files written otherwise, a symlink). Each file is written aside and renamed into place, the
    index last, and a one-file model.safetensors goes after: at every moment the directory loads
    as the old model or the new one."""
    for fname, state in shards.items():
        replace_atomically(directory / fname, lambda tmp, state=state: save_file(state, str(tmp), metadata={"format": "pt"}))
    weight_map = {key: fname for fname, state in shards.items() for key in state} | (linked or {})
    replace_atomically(directory / INDEX, lambda tmp: tmp.write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1) + "\n"))
    (directory / "model.safetensors").unlink(missing_ok=True)


def write_one_file(directory: Path, hf_state: dict[str, torch.Tensor]) -> None:
    """hf_state as model.safetensors; a `write_shards` layout there before is removed first (its
    index would win over the new file)."""
    for stale in (INDEX, SHARED_SHARD, LAYERS_SHARD):
        (directory / stale).unlink(missing_ok=True)
    save_file(hf_state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def write_split(directory: Path, hf_state: dict[str, torch.Tensor]) -> None:
    """hf_state as two shards, SHARED_SHARD and LAYERS_SHARD: a self-draft can link the first
    (lumen.model.draft.copy_layers(share_with_target=True))."""
    write_shards(directory, {SHARED_SHARD: {k: v for k, v in hf_state.items() if not is_layer_tensor(k)},
                             LAYERS_SHARD: {k: v for k, v in hf_state.items() if is_layer_tensor(k)}})
