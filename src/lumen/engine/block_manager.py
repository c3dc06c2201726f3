"""Fixed-size KV pages ("blocks") and per-sequence block tables."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Free list of block ids [0, num_blocks). A sequence's block table maps its token position p
    to slot `block_table[p // block_size] * block_size + p % block_size` of the KV pool.

    Freed blocks go to the back of the free list and are taken from the front, so allocation is
    deterministic (and a just-freed block is the last to be reused).
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def extra_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still lacks to hold KV for positions [0, num_tokens)."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def ensure(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's table to cover [0, num_tokens). All or nothing: False (and no change) if short."""
        need = self.extra_blocks(seq, num_tokens)
        if need > len(self._free):
            return False
        for _ in range(need):
            seq.block_table.append(self._free.popleft())
        return True

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Free the blocks wholly past position num_tokens (speculative rollback)."""
        keep = self.blocks_for(num_tokens)
        while len(seq.block_table) > keep:
            self._free.append(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        # Reversed so the sequence's first block is the one reused last.
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []

    def check(self, seqs: Iterable[Sequence]) -> None:
        """Invariant check (tests, debugging): every block is free xor owned by exactly one sequence."""
        owned: dict[int, str] = {}
        for s in seqs:
            for b in s.block_table:
                if b in owned:
                    raise AssertionError(f"block {b} owned by {owned[b]!r} and {s.req_id!r}")
                if not 0 <= b < self.num_blocks:
                    raise AssertionError(f"block id {b} out of range")
                owned[b] = s.req_id
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block appears twice in the free list")
        if free & owned.keys():
            raise AssertionError(f"blocks both free and owned: {sorted(free & owned.keys())[:8]}")
        if len(free) + len(owned) != self.num_blocks:
            raise AssertionError(f"{self.num_blocks - len(free) - len(owned)} blocks leaked")
