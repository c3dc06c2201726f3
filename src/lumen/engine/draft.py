"""Co-located draft model: proposes K tokens for every decoding sequence, verified by the target in
its normal (fused) step. Greedy proposals: the verifier treats them as a point-mass draft, which is
exact for any temperature (see sampler.py)."""

from __future__ import annotations

import torch

from .block_manager import BlockManager
from .model_runner import ForwardItem, ModelRunner
from .sequence import Sequence


class _DraftSeq:
    """The draft's view of one target sequence: its own KV blocks and how far they are valid."""

    def __init__(self, req_id: str):
        self.req_id = req_id
        self.token_ids: list[int] = []
        self.num_synced = 0  # token_ids[:num_synced] are known target tokens
        self.num_computed = 0  # draft KV valid for positions < num_computed
        self.block_table: list[int] = []


class DraftProposer:
    def __init__(self, model, num_tokens: int, block_size: int, num_blocks: int, chunk_tokens: int,
                 *, max_batch: int = 512, cuda_graphs: bool = False):
        if num_tokens < 1:
            raise ValueError("num_draft_tokens must be >= 1")
        self.k = num_tokens
        self.chunk_tokens = chunk_tokens
        self.max_len = model.config.max_position
        self.bm = BlockManager(num_blocks, block_size)
        self.runner = ModelRunner(model, num_blocks, block_size, max_batch=max_batch, cuda_graphs=cuda_graphs,
                                  export_slots=0)  # a draft never exports pages: no staging ring
        self.states: dict[str, _DraftSeq] = {}

    def release(self, req_id: str) -> None:
        st = self.states.pop(req_id, None)
        if st is not None:
            self.bm.free(st)

    def _sync(self, st: _DraftSeq, seq: Sequence, known: int) -> None:
        """Adopt the target's tokens; keep draft KV only for the prefix both agree on. The first
        `known` tokens of seq are the target's own (later ones may be a caller's guesses)."""
        common = st.num_synced
        limit = min(len(st.token_ids), len(seq))
        while common < limit and st.token_ids[common] == seq.token_ids[common]:
            common += 1
        # >= 1 token must run: its logits give the first proposal.
        st.num_computed = min(st.num_computed, common, len(seq) - 1)
        st.token_ids = list(seq.token_ids)
        st.num_synced = min(known, len(seq))
        self.bm.truncate(st, st.num_computed)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], known: dict[str, int] | None = None) -> dict[Sequence, list[int]]:
        """K greedy draft tokens for each sequence (batched). `known[req_id]`: how many leading tokens
        are committed target tokens (default: all); tokens past it are re-checked at every call."""
        work: list[tuple[Sequence, _DraftSeq, int]] = []
        budget = self.chunk_tokens
        for seq in seqs:
            k = min(self.k, seq.params.max_tokens - seq.num_generated - 1, self.max_len - len(seq))
            if k < 1:
                continue
            st = self.states.get(seq.req_id)
            if st is None:
                st = self.states[seq.req_id] = _DraftSeq(seq.req_id)
            self._sync(st, seq, len(seq) if known is None else known.get(seq.req_id, len(seq)))
            catch_up = len(seq) - st.num_computed
            # The last proposal is never run through the draft: KV up to len + k - 1.
            if catch_up > budget or not self.bm.ensure(st, len(seq) + k - 1):
                continue  # no proposal this round (too far behind, or draft pool full)
            budget -= catch_up
            work.append((seq, st, k))
        props: dict[Sequence, list[int]] = {seq: [] for seq, _, _ in work}
        active = work
        first = True
        while active:
            items = []
            for _, st, _ in active:
                start = st.num_computed if first else len(st.token_ids) - 1
                items.append(ForwardItem(st.token_ids[start:], start, st.block_table, 1))
            nxt = self.runner.forward(items).argmax(-1).tolist()
            for (seq, st, _), t in zip(active, nxt, strict=True):
                st.num_computed = len(st.token_ids)
                st.token_ids.append(t)
                props[seq].append(t)
            first = False
            active = [w for w in active if len(props[w[0]]) < w[2]]
        return props
