"""The default draft: a layer-truncated copy of the default target (see scripts/make_draft.py)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

DRAFT_FORMAT_VERSION = 1
DRAFT_LAYERS = 8


def truncate_layers(target_dir: Path, out: Path, layers: list[int]) -> None:
    """Copy the target keeping only `layers` (renumbered 0..), plus embeddings, final norm and head."""
    cfg = json.loads((target_dir / "config.json").read_text())
    keep = {f"model.layers.{src}.": f"model.layers.{dst}." for dst, src in enumerate(layers)}
    state = {}
    with safe_open(str(target_dir / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if name.startswith("model.layers."):
                prefix = ".".join(name.split(".")[:3]) + "."
                if prefix not in keep:
                    continue
                state[keep[prefix] + name[len(prefix):]] = f.get_tensor(name)
            else:
                state[name] = f.get_tensor(name)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg["num_hidden_layers"] = len(layers)
    cfg["_name_or_path"] = out.name
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((target_dir / name).read_bytes())


def build_draft(target_dir: Path, out: Path) -> dict:
    layers = list(range(DRAFT_LAYERS))
    truncate_layers(target_dir, out, layers)
    return {"target": str(target_dir), "layers": layers}
