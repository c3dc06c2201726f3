"""Continuous batching with Sarathi-style chunked prefill under a per-step token budget."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: run token_ids[start : start+len(tokens)] (the decode token
    followed by any draft proposals), and sample when `sample` (the chunk reaches the end)."""

    seq: Sequence
    start: int
    tokens: list[int]
    proposal: list[int]  # the K draft tokens at the end of `tokens` (empty for plain decode/prefill)
    sample: bool
    is_decode: bool = False  # decode work (vs prefill, including a 1-token prefill tail)

    @property
    def num_logits(self) -> int:
        return len(self.proposal) + 1 if self.sample else 0


class Scheduler:
    """Each step: (1) every running decode (oldest first; K+1 tokens when it has proposals), growing
    KV by a block when needed and preempting the newest running sequence when the pool is full;
    (2) chunks of running partial prefills; (3) admission of waiting sequences, FIFO -- together
    filling what the token budget `chunk_tokens` leaves after the decodes.

    Admission allocates blocks for a sequence's whole current context, so admitted prefills never
    stall for memory (no prefill-vs-prefill deadlock); only decode growth can need preemption.
    Preemption is by recompute: the victim's blocks are freed and it goes to the *front* of the
    waiting queue, keeping its tokens (prompt + generated so far).
    """

    def __init__(self, block_manager: BlockManager, max_batch: int, chunk_tokens: int,
                 on_admit: Callable[[Sequence], None] | None = None):
        self.bm = block_manager
        self.max_batch = max_batch
        self.chunk_tokens = chunk_tokens
        self.on_admit = on_admit  # engine hook: writes restored pages into the fresh blocks
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the newest
        self.num_preemptions = 0
        self.num_dropped_proposals = 0  # proposals dropped for lack of KV blocks

    # ---- queue management ----
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Abort or finish: drop from whichever queue holds it and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.bm.free(seq)
        seq.proposal = None
        seq.status = SequenceStatus.FINISHED

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_computed_tokens = 0
        seq.proposal = None
        seq.sampled = False
        seq.restored_pages = []  # their blocks are gone; recompute is the fallback
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----
    def schedule(self) -> tuple[list[ScheduledSeq], list[Sequence]]:
        """Returns (this step's work, sequences finished for lack of KV space)."""
        out: list[ScheduledSeq] = []
        starved: list[Sequence] = []
        budget = self.chunk_tokens

        # (1) decodes, oldest first. A victim is always newer than `seq`, hence not scheduled yet.
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if not seq.is_decoding:
                i += 1
                continue
            proposal = seq.proposal or []
            seq.proposal = None
            while not self.bm.ensure(seq, seq.num_computed_tokens + 1 + len(proposal)):
                if proposal:  # shed speculation before preempting anyone
                    proposal = []
                    self.num_dropped_proposals += 1
                elif self.running[-1] is not seq:
                    self.preempt(self.running[-1])
                else:
                    break
            if not self.bm.ensure(seq, seq.num_computed_tokens + 1):
                if len(self.running) == 1:
                    # Alone and still no room: the pool cannot hold this sequence at all.
                    self.running.remove(seq)
                    self.bm.free(seq)
                    seq.status = SequenceStatus.FINISHED
                    seq.finish_reason = "length"
                    starved.append(seq)
                else:
                    self.preempt(seq)
                continue
            start = seq.num_computed_tokens
            out.append(ScheduledSeq(seq, start, [seq.last_token] + proposal, proposal, True, seq.sampled))
            budget -= 1 + len(proposal)
            i += 1

        # (2) running partial prefills, oldest first, in the remaining budget.
        for seq in self.running:
            if budget <= 0:
                break
            if seq.is_decoding:
                continue
            out.append(self._chunk(seq, budget))
            budget -= len(out[-1].tokens)

        # (3) admission, FIFO; blocks for the whole context up front.
        while self.waiting and budget > 0 and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            if not self.bm.can_allocate(self.bm.blocks_for(len(seq))):
                break
            self.waiting.popleft()
            self.bm.ensure(seq, len(seq))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if self.on_admit is not None:
                self.on_admit(seq)  # may advance num_computed_tokens (restored pages)
            out.append(self._chunk(seq, budget))
            budget -= len(out[-1].tokens)
        return out, starved

    @staticmethod
    def _chunk(seq: Sequence, budget: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        n = min(seq.num_remaining, budget)
        return ScheduledSeq(seq, start, seq.token_ids[start:start + n], [], start + n == len(seq))
