"""Model specs as directories on disk, so that every (re)load of a worker is a real read."""

from __future__ import annotations

import fcntl
from pathlib import Path

import torch

from ..model import PRESETS
from ..model.hub import default_paths, lumen_home, prepare_default
from ..model.loader import random_model, save_model


def resolve_model_dir(spec: str) -> Path:
    """"default" / "default-draft" / "preset:NAME" / a directory -> a Hugging Face model directory.

    Presets are written once (random weights, seeded) under $LUMEN_HOME/models/preset-NAME, so a
    worker that restarts reads its weights back from disk like it would a real checkpoint.
    """
    if spec in ("default", "default-draft"):
        prepare_default()
        return default_paths()[0 if spec == "default" else 1]
    if spec.startswith("preset:"):
        name = spec.split(":", 1)[1]
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
        out = lumen_home() / "models" / f"preset-{name}"
        if not (out / "config.json").is_file():
            out.mkdir(parents=True, exist_ok=True)
            with open(out / ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (out / "config.json").is_file():
                    cfg = PRESETS[name]
                    dtype = torch.bfloat16 if cfg.param_count() > 1e9 else torch.float32
                    save_model(random_model(cfg, "cpu", dtype), cfg, out)
        return out
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a model directory (no config.json): {path}; expected a Hugging Face "
                                "directory, preset:NAME, default or default-draft")
    return path
