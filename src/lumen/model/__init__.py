"""lumen.model: Llama/Qwen3 decoder, HF loading, presets, the embedded default model and its draft.

Imports torch (and its file-format libraries) only, never other lumen packages.
"""

from .config import PRESETS, ModelConfig
from .decoder import AttentionBackend, Decoder
from .dense_kv import DenseKV
from .loader import (
    LoadedModel,
    build_model_from_host,
    load_model,
    random_model,
    read_config,
    read_weights_to_host,
    save_model,
)
from .tokenizer import IncrementalDecoder, Tokenizer

__all__ = [
    "PRESETS", "AttentionBackend", "Decoder", "DenseKV", "IncrementalDecoder", "LoadedModel", "ModelConfig",
    "Tokenizer", "build_model_from_host", "load_model", "random_model", "read_config", "read_weights_to_host",
    "save_model",
]
