"""Speculation-assisted recovery (LUMEN mechanism 3), both sides of a pair.

The recovering worker (`Drafter`) holds only a small draft model while its target weights load in
the background. Its partner (`Verifier`), a serving worker, mirrors the token ids of its decoding
requests; the drafter keeps draft KV per mirrored request and proposes up to K tokens ahead; the
partner verifies, in its normal decode step, as many of them per request as the goodput rule
(`lumen.policy.choose_spec_lengths`) says pay this step, and stays the source of truth. Nothing here
ever blocks the partner: proposals that are stale when they arrive are dropped by the engine, and a
missing proposal (or K = 0) just means a normal decode step.

Both sides reach their worker only through what they are handed (a send function, a counters dict,
the step-time model): this module does not import the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from ..engine import SamplingParams
from ..engine.draft import DraftProposer
from ..engine.sequence import Sequence
from ..engine.step_ema import StepEma
from ..model.loader import SharedReads, load_model
from ..policy import AcceptanceEstimate, LinearStepTime, PartnerLoad, choose_spec_lengths
from .protocol import MAX_MIRRORED
from .transport import frame_ints, ints_frame

log = logging.getLogger("lumen.assist")

EXPLORE_STEPS = 16  # steps a verifier drafts at full K while its step-time model cannot price a position

# send(address, message type, body, frames) -> whether it was queued (the worker's PushPool.send)
Send = Callable[[str, str, dict, list], bool]


class Verifier:
    """Partner side: mirror decoding requests to the drafter, feed the proposals that pay to the engine.

    Acceptance is estimated per request (`AcceptanceEstimate`) from the request's own verify
    outcomes, starting from the pair's pooled estimate, which starts from `prior` (the draft pair's
    measured acceptance)."""

    def __init__(self, send: Send, counters: dict, peer: int, addr: str, k: int, prior: float,
                 step_model: Callable[[], LinearStepTime | None]):
        self.send, self.counters = send, counters
        self.peer, self.addr, self.k = peer, addr, k
        self.step_model = step_model
        self.sent_len: dict[str, int] = {}  # tokens of each request the drafter has
        self.proposals: dict[str, tuple[int, list[int]]] = {}
        self.pooled = AcceptanceEstimate(prior)
        self.acceptance: dict[str, AcceptanceEstimate] = {}
        self.verifying: dict[str, int] = {}  # request -> draft tokens handed to this step
        self.explored = 0
        self._last_step: dict | None = None
        # counted on the worker, so the figures outlive this pairing
        # assist_k<n>: mirrored requests given n draft tokens to verify in a step (the rule's choices)
        # assist_paired_steps / assist_paired_step_s: every step of this worker while paired, and their
        # seconds: the steps that could have been assisted (assist_steps + assist_skipped_steps of them
        # had a usable guess). Under time slots a partner steps only in its own slot, so these, not the
        # drafter's rounds, bound how many steps are assisted (CPU box 2026-12-07: 12 steps, 2.65 s of
        # stepping in 12.2 s of pairing, 7 of them assisted)
        # assist_proposals_finished: guesses dropped because their request left the batch (finished)
        for key in ("assist_proposals_received", "assist_proposals_stale", "assist_proposals_finished",
                    "assist_steps", "assist_verify_positions", "assist_skipped_steps", "assist_explore_steps",
                    "assist_paired_steps", *(f"assist_k{n}" for n in range(k + 1))):
            counters.setdefault(key, 0)
        counters.setdefault("assist_paired_step_s", 0.0)
        log.info("verifying proposals from worker %d", peer)

    def on_proposals(self, msg) -> None:
        if msg.src != f"w{self.peer}":
            return
        ids = frame_ints(msg.frames[0])
        pos = 0
        for rid, base_len, k in msg.body["items"]:
            if not (isinstance(rid, str) and isinstance(base_len, int) and isinstance(k, int)) or k < 0 \
                    or pos + k > len(ids):
                return
            self.proposals[rid] = (base_len, ids[pos:pos + k])
            pos += k
            self.counters["assist_proposals_received"] += 1

    def _estimate(self, rid: str) -> AcceptanceEstimate:
        est = self.acceptance.get(rid)
        if est is None:
            est = self.acceptance[rid] = AcceptanceEstimate(self.pooled.rate)
        return est

    def before_step(self, engine) -> None:
        self.counters["assist_paired_steps"] += 1
        if not self.proposals:
            return
        current = dict(engine.decoding_sequences())
        usable: dict[str, tuple[int, list[int]]] = {}
        for rid, (base_len, toks) in list(self.proposals.items()):
            tokens = current.get(rid)
            if tokens is None:
                self.counters["assist_proposals_finished"] += 1
                del self.proposals[rid]
                continue
            # The partner never waits, so it may have moved on since the draft was made. The proposal
            # is still good for the rest if the tokens committed meanwhile are exactly its first ones.
            advanced = len(tokens) - base_len
            if advanced >= len(toks) and tokens[base_len:base_len + len(toks)] == toks:
                del self.proposals[rid]  # used up: all of it committed
                continue
            if advanced < 0 or tokens[base_len:] != toks[:advanced]:
                self.counters["assist_proposals_stale"] += 1
                del self.proposals[rid]
                continue
            # A guess runs up to the drafter's max_ahead tokens, more than one step verifies: the rest stays
            # for the next steps. Under time slots the drafter sends only in its own slot, so a guess
            # dropped after one step left the partner's other steps of its slot unassisted.
            usable[rid] = (len(tokens), toks[advanced:advanced + self.k])
        if not usable:
            return
        model = self.step_model()
        rids = list(usable)
        decoding, context, queued_tokens, queued_requests, chunk = engine.load_summary()
        load = PartnerLoad(decoding, context, queued_tokens, queued_requests, chunk)
        if model is not None:
            ks = choose_spec_lengths([self._estimate(r).rate for r in rids], load, model.for_batch(decoding), self.k)
        elif self.explored < EXPLORE_STEPS:
            # the partner's steps have never varied in size (one request decoding alone, say), so its
            # fitted model cannot price a position yet: a few steps with drafts (within the budget the
            # queue leaves) make the positions vary, and the fit learns what one costs
            self.explored += 1
            budget = load.verify_budget()
            ks = []
            for _ in rids:
                ks.append(min(self.k, budget))
                budget -= ks[-1]
            self.counters["assist_explore_steps"] += 1
        else:
            ks = [0] * len(rids)
        for rid, k in zip(rids, ks, strict=True):
            self.counters[f"assist_k{k}"] += 1
            if k:
                base, toks = usable[rid]
                n = engine.propose(rid, base, toks[:k])
                if n:
                    self.verifying[rid] = n
                    self.counters["assist_verify_positions"] += n
        self.counters["assist_steps" if self.verifying else "assist_skipped_steps"] += 1

    def after_step(self, engine, outputs) -> None:
        last = engine.last_step
        if last and last is not self._last_step:  # a step that scheduled nothing leaves the last one's
            self._last_step = last
            self.counters["assist_paired_step_s"] += float(last.get("step_time_s", 0.0))
        if self.verifying:
            for out in outputs:
                k = self.verifying.get(out.req_id)
                if k and out.token_ids:
                    accepted = min(len(out.token_ids) - 1, k)
                    self._estimate(out.req_id).update(k, accepted)
                    self.pooled.update(k, accepted)
            self.verifying.clear()
        items, ids, drop = [], [], []
        live = engine.decoding_sequences()
        live_ids = {rid for rid, _ in live}
        for rid in list(self.sent_len):
            if rid not in live_ids:
                drop.append(rid)
                del self.sent_len[rid]
                self.acceptance.pop(rid, None)
        for rid, tokens in live[:MAX_MIRRORED]:
            have = self.sent_len.get(rid, 0)
            if have == len(tokens):
                continue
            tail = tokens[have:]
            items.append([rid, len(tokens), len(tail)])
            ids.extend(tail)
            self.sent_len[rid] = len(tokens)
        if not items and not drop:
            return
        if not self.send(self.addr, "MIRROR", {"items": items, "drop": drop}, [ints_frame(ids)]):
            # the drafter is slow or gone: start over with full contexts next time
            self.sent_len.clear()


class _DraftState:
    """One mirrored request on the drafter: the partner's committed tokens and the drafter's own guess
    of what comes next (`ahead`)."""

    def __init__(self) -> None:
        self.committed: list[int] = []
        self.ahead: list[int] = []
        self.sent: tuple[int, int] = (-1, -1)  # (committed length, proposal length) last sent
        self.synced = False  # the draft holds its KV: its next round decodes instead of prefilling it


class Drafter:
    """Recovering side: a draft model that keeps drafting ahead of its partner.

    Drafting is incremental and batched: each draft step runs ONE forward over every mirrored
    request (the engine's DraftProposer, with its own paged KV) and appends one token to each guess,
    and the proposals go out after every step, so none is older than a draft step. When the partner's
    committed tokens agree with a guess, the rest of the guess and its KV are kept; on the first
    disagreement the guess is cut there. A draft faster than the target runs ahead of it, and the
    partner verifies up to K of its tokens in each normal decode step.
    """

    def __init__(self, send: Send, draft_spec: str, k: int, *, device: str, dtype: torch.dtype,
                 block_size: int, num_blocks: int | None, shared_reads: SharedReads | None = None,
                 max_ahead: int = 12, pin: bool | None = None):
        self.send, self.k = send, k
        self.max_ahead = max(max_ahead, k)
        # the draft's files that are links to the target's (a self-draft's embedding and head): a
        # target read that follows takes them from here instead of reading them again
        self.shared_reads = shared_reads
        loaded = load_model(draft_spec, device=device, dtype=dtype, progress=False, shared_reads=shared_reads,
                            pin=pin)
        self.load_phases = {f"draft_{k}": v for k, v in loaded.phases.items()}
        self.load_phases["draft_shared_bytes"] = shared_reads.nbytes() if shared_reads is not None else 0
        self.config = loaded.config
        block = block_size
        num_blocks = self.pool_blocks(self.config.max_position, block, num_blocks)
        self.proposer = DraftProposer(loaded.model, 1, block, num_blocks, chunk_tokens=1 << 14,
                                      max_batch=MAX_MIRRORED)
        self._params = SamplingParams(max_tokens=self.config.max_position)
        self.peer: int | None = None
        self.addr = ""
        self.states: dict[str, _DraftState] = {}
        self.rounds = 0
        self.proposed = 0  # tokens sent, counting a guess again each time it is sent longer
        self.drafted = 0   # draft tokens made (each once)
        self.busy_s = 0.0
        self.paired_s = 0.0  # seconds paired, past pairings included
        self.paired_at: float | None = None
        self.first_proposal_s: float | None = None  # pairing -> first proposal sent
        # a round's wall time per kind, prefilling a request's context or only decoding, as the engine
        # times its steps: one EMA of both let a request's prefill hold the cheap decoding rounds to about
        # one per cycle of slots (2026-12-07: 0.53-0.60 s against 0.04-0.08 s on the CPU box)
        self.round_ema = StepEma()

    @staticmethod
    def pool_blocks(max_position: int, block_size: int, target_blocks: int | None) -> int:
        """KV blocks of the draft's own pool: half the target's, and room for at least 4 full-length requests."""
        return max(256, (target_blocks or 0) // 2, 4 * (max_position // block_size + 1))

    def pair(self, peer: int | None, addr: str) -> None:
        now = time.monotonic()
        if self.paired_at is not None:
            self.paired_s += now - self.paired_at
        self.paired_at = now if peer is not None else None
        self.peer, self.addr = peer, addr
        for rid in list(self.states):
            self.proposer.release(rid)
        self.states.clear()
        if peer is not None:
            log.info("assisting worker %d", peer)

    def on_mirror(self, msg) -> None:
        if self.peer is None or msg.src != f"w{self.peer}":
            return
        ids = frame_ints(msg.frames[0])
        pos = 0
        for rid in msg.body["drop"]:
            if self.states.pop(rid, None) is not None:
                self.proposer.release(rid)
        for rid, total, n in msg.body["items"]:
            if not (isinstance(rid, str) and isinstance(total, int) and isinstance(n, int)) or n < 0 \
                    or pos + n > len(ids):
                return
            tail = ids[pos:pos + n]
            pos += n
            st = self.states.get(rid)
            if st is None or len(st.committed) + n != total:
                if n != total or total + self.max_ahead + 1 > self.config.max_position:
                    self.states.pop(rid, None)  # a gap (wait for the full resend) or too long to draft
                    self.proposer.release(rid)
                    continue
                self.proposer.release(rid)
                st = self.states[rid] = _DraftState()
            self._commit(st, tail)

    @staticmethod
    def _commit(st: _DraftState, tail: list[int]) -> None:
        """The partner committed `tail`: keep what is left of the guess if it agrees."""
        st.committed.extend(tail)
        agree = 0
        while agree < min(len(tail), len(st.ahead)) and st.ahead[agree] == tail[agree]:
            agree += 1
        st.ahead = st.ahead[len(tail):] if agree == len(tail) else []

    def _todo(self) -> list[tuple[str, _DraftState]]:
        """The mirrored requests the next round drafts for: those whose guess is short."""
        return [(rid, st) for rid, st in list(self.states.items())[:MAX_MIRRORED] if len(st.ahead) < self.max_ahead]

    def expected_round_s(self) -> float:
        """Expected wall time of the next round: a prefilling round's if it takes in a request whose
        context the draft has not read yet, else a decoding round's (0 before any was measured)."""
        return self.round_ema.expected(prefill=any(not st.synced for _, st in self._todo()))

    @torch.inference_mode()
    def round(self) -> bool:
        """One batched draft step for every request whose guess is short, then send what changed.
        Returns whether it drafted anything (if not, the caller may wait for the partner's commits)."""
        if self.peer is None or not self.states:
            return False
        t0 = time.monotonic()
        todo = self._todo()
        prefilled = any(not st.synced for _, st in todo)
        if todo:
            seqs = {rid: Sequence(rid, st.committed + st.ahead, self._params, 0, 0) for rid, st in todo}
            proposals = self.proposer.propose(list(seqs.values()),
                                              known={rid: len(st.committed) for rid, st in todo})
            for rid, st in todo:
                new = proposals.get(seqs[rid], [])
                st.ahead.extend(new)
                self.drafted += len(new)
                st.synced = True
        items, ids = [], []
        for rid, st in self.states.items():
            key = (len(st.committed), len(st.ahead))
            if st.ahead and key != st.sent:
                st.sent = key
                items.append([rid, len(st.committed), len(st.ahead)])
                ids.extend(st.ahead)
        if items:
            self.send(self.addr, "PROPOSE", {"items": items}, [ints_frame(ids)])
            self.rounds += 1
            self.proposed += len(ids)
            if self.first_proposal_s is None and self.paired_at is not None:
                self.first_proposal_s = time.monotonic() - self.paired_at
        dt = time.monotonic() - t0
        self.busy_s += dt
        if todo:
            self.round_ema.observe(dt, prefill=prefilled)
        return bool(todo)

    def stats(self) -> dict:
        """assist_proposed_tokens counts a guess's tokens each time it is sent (a guess grows by one token a
        round and is sent whole: ~7x the draft tokens made on the CPU box); assist_drafted_tokens counts
        each draft token once. assist_paired_s: seconds paired with a partner; assist_first_proposal_s:
        from the pairing to the first proposal sent (-1: none sent)."""
        paired = self.paired_s + (time.monotonic() - self.paired_at if self.paired_at is not None else 0.0)
        return {"assist_rounds": self.rounds, "assist_proposed_tokens": self.proposed,
                "assist_drafted_tokens": self.drafted, "assist_paired_s": round(paired, 3),
                "assist_first_proposal_s": round(self.first_proposal_s, 3) if self.first_proposal_s is not None else -1.0,
                "assist_busy_s": round(self.busy_s, 3), "assist_prefill_round_s": round(self.round_ema.prefill_s, 4),
                "assist_decode_round_s": round(self.round_ema.decode_s, 4)}
