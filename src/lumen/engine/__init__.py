"""lumen.engine: one worker's inference engine (paged KV, chunked prefill, continuous batching,
fused speculative verification, KV page export/import). Imports lumen.model only."""

from .engine import Engine, EngineConfig, StepOutput
from .kv_pages import KVPage, page_tag, page_tags
from .params import SamplingParams

__all__ = ["Engine", "EngineConfig", "KVPage", "SamplingParams", "StepOutput", "page_tag", "page_tags"]
