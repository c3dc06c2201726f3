"""lumen.model: Llama/Qwen3 decoder, HF loading, presets, the embedded default model and its draft.

Imports torch only (never other lumen packages).
"""

from .config import PRESETS, ModelConfig
from .decoder import AttentionBackend, Decoder
from .dense_kv import DenseKV

__all__ = ["PRESETS", "AttentionBackend", "Decoder", "DenseKV", "ModelConfig"]
