"""One request inside the engine."""

from __future__ import annotations

import enum
import hashlib

from .kv_pages import KVPage, chain_tag
from .params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, owns no KV blocks
    RUNNING = "running"  # admitted: owns KV blocks for its whole context
    FINISHED = "finished"


def seed_key(seed: int) -> tuple[int, int]:
    """Two 32-bit words from an arbitrary Python int seed (stable across processes and hosts)."""
    d = hashlib.blake2b(str(int(seed)).encode(), digest_size=8).digest()
    return int.from_bytes(d[:4], "little"), int.from_bytes(d[4:], "little")


class Sequence:
    """token_ids = prompt + generated. KV is valid for positions < num_computed_tokens.

    Between steps a sequence is either prefilling (num_computed < len - 1) or decoding
    (num_computed == len - 1: only the last sampled token still has to go through the model).
    A step runs token_ids[num_computed : num_computed + q] and samples only when it reaches the end.
    """

    def __init__(self, req_id: str, prompt_ids: list[int], params: SamplingParams, seed: int,
                 arrival: int, generated_ids: list[int] | tuple[int, ...] = (),
                 restored_pages: list[KVPage] | None = None):
        self.req_id = req_id
        self.token_ids: list[int] = list(prompt_ids) + list(generated_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.seed = seed
        self.seed_key = seed_key(seed)  # the per-request RNG state: sampling is a pure function of it
        self.arrival = arrival  # admission order key: larger = newer (preempted first)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.finish_reason: str | None = None
        # Pages to write into the first blocks at admission (host copies; dropped once used).
        self.restored_pages: list[KVPage] = list(restored_pages or [])
        # Draft proposals to verify in the next step (None = plain decode).
        self.proposal: list[int] | None = None
        # True once this engine sampled a token for it since its last (re)prefill: from then on
        # its steps count as decode work (a 1-token prefill tail does not).
        self.sampled = False
        # KV export bookkeeping: pages [0, num_exported_pages) were handed out (or restored).
        self.num_exported_pages = 0
        self._page_tags: list[bytes] = []

    # ---- lengths ----
    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_remaining(self) -> int:
        """Tokens still to run through the model before the next sample."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        return self.num_remaining == 1

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    # ---- page tags (incremental chain; see kv_pages) ----
    def page_tag(self, index: int, block_size: int) -> bytes:
        while len(self._page_tags) <= index:
            i = len(self._page_tags)
            prev = self._page_tags[-1] if i else b""
            self._page_tags.append(chain_tag(prev, self.token_ids[i * block_size:(i + 1) * block_size]))
        return self._page_tags[index]

    def __repr__(self) -> str:
        return (f"Sequence({self.req_id!r}, len={len(self)}, computed={self.num_computed_tokens}, "
                f"status={self.status.value}, blocks={len(self.block_table)})")
