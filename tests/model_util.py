"""Small models shared by the engine-level tests."""

from __future__ import annotations

import functools

import torch

from lumen.model import PRESETS
from lumen.model.loader import random_model


@functools.cache
def peaked_tiny_model():
    """The tiny preset in float64, std 0.3 (not the preset's 0.02): peaked, varied logits, so greedy
    paths are not one repeated token. Cached: callers must not modify it."""
    return random_model(PRESETS["tiny"], dtype=torch.float64, seed=7, std=0.3)
