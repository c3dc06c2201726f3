"""KV pages as they leave and re-enter an engine, and their tags.

Tag scheme (the gateway must compute the same thing from its token history):

    tag_0 = blake2b-128( ids[0:B] )                    # int32 little-endian token ids
    tag_i = blake2b-128( tag_{i-1} || ids[i*B:(i+1)*B] )

i.e. a hash chain over pages of B = block_size tokens. tag_i commits to *all* token ids
[0, (i+1)*B) -- exactly what "hash of the token ids up to end_pos" needs -- but tagging page i
costs O(B) instead of O(end_pos), so a long request does not rehash its whole history per page.
Page 0's tag is literally blake2b-128 of its int32-LE ids. `page_tag(ids)` computes the chain for
any prefix; `page_tags(ids)` returns the tag of every full page in one pass.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

TAG_BYTES = 16


def chain_tag(prev: bytes, page_ids: Sequence[int]) -> bytes:
    """One link of the chain: the tag of a page given the previous page's tag (b"" for page 0)."""
    h = hashlib.blake2b(prev, digest_size=TAG_BYTES)
    h.update(np.asarray(page_ids, dtype="<i4").tobytes())
    return h.digest()


def page_tags(token_ids: Sequence[int], block_size: int = 16) -> list[bytes]:
    """Tags of every *full* page of `token_ids` (page i covers ids [i*B, (i+1)*B))."""
    tags: list[bytes] = []
    prev = b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        prev = chain_tag(prev, token_ids[start:start + block_size])
        tags.append(prev)
    return tags


def page_tag(token_ids: Sequence[int], block_size: int = 16) -> bytes:
    """Tag of the page that ends at len(token_ids): the chain over all of `token_ids`.

    For a page-aligned length (the only case pages are exported for) this equals
    `page_tags(token_ids, block_size)[-1]`.
    """
    if not len(token_ids):
        raise ValueError("page_tag of an empty token sequence")
    prev = b""
    for start in range(0, len(token_ids), block_size):
        prev = chain_tag(prev, token_ids[start:start + block_size])
    return prev


@dataclass
class KVPage:
    """One full page of one request's KV cache, on the host.

    data: [num_layers, 2 (k, v), block_size, num_kv_heads, head_dim] in the engine's KV dtype
    (or the same bytes as uint8). On CUDA it is a pinned buffer filled by an asynchronous copy:
    call `wait()` (or check `ready()`) before reading it.

    lease: for an exported page, the hold on its slot of the engine's staging ring (`data` is a
    view of that slot). The slot is reused only once no page and no buffer handed to ZeroMQ
    references the lease any more: a consumer that keeps the bytes beyond the page object (a
    zero-copy send) keeps `lease` referenced as long (see PageSender); one that keeps only
    `data` must copy it first.
    """

    req_id: str
    index: int  # page index within the request: token positions [index*B, (index+1)*B)
    end_pos: int  # (index + 1) * block_size
    tag: bytes  # chain tag over token ids [0, end_pos)
    data: torch.Tensor
    event: Any = field(default=None, repr=False, compare=False)  # torch.cuda.Event or None
    lease: Any = field(default=None, repr=False, compare=False)  # export_ring.SlotLease or None

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> KVPage:
        if self.event is not None:
            self.event.synchronize()
        return self
