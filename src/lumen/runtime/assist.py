"""Speculation-assisted recovery (LUMEN mechanism 3), both sides of a pair.

The recovering worker (`Drafter`) holds only a small draft model while its target weights load in
the background. Its partner (`Verifier`), a serving worker, mirrors the token ids of its decoding
requests; the drafter keeps draft KV per mirrored request and proposes K tokens; the partner
verifies them inside its normal decode step (the engine's fused verify) and stays the source of
truth. Nothing here ever blocks the partner: proposals that are stale when they arrive are dropped
by the engine, and a missing proposal just means a normal decode step.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from ..model import DenseKV
from ..model.loader import load_model
from .transport import frame_ints, ints_frame

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("lumen.assist")

MAX_MIRRORED = 64  # requests mirrored at once; the drafter is one small model on one device


class Verifier:
    """Partner side: mirror decoding requests to the drafter, feed its proposals to the engine."""

    def __init__(self, worker: Worker, peer: int, addr: str, k: int):
        self.worker, self.peer, self.addr, self.k = worker, peer, addr, k
        self.sent_len: dict[str, int] = {}  # tokens of each request the drafter has
        self.proposals: dict[str, tuple[int, list[int]]] = {}
        self.received = 0
        self.stale = 0
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
            self.received += 1

    def before_step(self, engine) -> None:
        if not self.proposals:
            return
        current = dict(engine.decoding_sequences())
        for rid, (base_len, toks) in self.proposals.items():
            tokens = current.get(rid)
            if tokens is None:
                continue
            # The partner never waits, so it may have moved on since the draft was made. The proposal
            # is still good for the rest if the tokens committed meanwhile are exactly its first ones.
            advanced = len(tokens) - base_len
            if advanced < 0 or tokens[base_len:] != toks[:advanced]:
                self.stale += 1
                continue
            toks = toks[advanced:advanced + self.k]
            if toks:
                engine.propose(rid, len(tokens), toks)
        self.proposals.clear()

    def after_step(self, engine, outputs) -> None:
        items, ids, drop = [], [], []
        live = engine.decoding_sequences()
        live_ids = {rid for rid, _ in live}
        for rid in list(self.sent_len):
            if rid not in live_ids:
                drop.append(rid)
                del self.sent_len[rid]
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
        if not self.worker.push.send(self.addr, "MIRROR", {"items": items, "drop": drop}, [ints_frame(ids)]):
            # the drafter is slow or gone: start over with full contexts next time
            self.sent_len.clear()

    def stats(self) -> dict:
        return {"assist_proposals_received": self.received, "assist_proposals_stale": self.stale}


class Drafter:
    """Recovering side: a draft model with one contiguous KV cache per mirrored request."""

    def __init__(self, worker: Worker, draft_spec: str, k: int, lookahead: int = 2):
        # draft a few tokens past K: the partner keeps decoding while proposals travel, and the extra
        # tokens keep a proposal useful after the partner has committed its first ones itself
        self.worker, self.k = worker, k + lookahead
        loaded = load_model(draft_spec, device=worker.device, dtype=worker.dtype, progress=False)
        self.model, self.config = loaded.model, loaded.config
        self.peer: int | None = None
        self.addr = ""
        self.contexts: dict[str, list[int]] = {}
        self.caches: dict[str, tuple[DenseKV, list[int]]] = {}  # request -> (cache, tokens in it)
        self.dirty: set[str] = set()
        self.rounds = 0
        self.proposed = 0
        self.busy_s = 0.0

    def pair(self, peer: int | None, addr: str) -> None:
        self.peer, self.addr = peer, addr
        self.contexts.clear()
        self.caches.clear()
        self.dirty.clear()
        if peer is not None:
            log.info("assisting worker %d", peer)

    def on_mirror(self, msg) -> None:
        if self.peer is None or msg.src != f"w{self.peer}":
            return
        ids = frame_ints(msg.frames[0])
        pos = 0
        for rid in msg.body["drop"]:
            self.contexts.pop(rid, None)
            self.caches.pop(rid, None)
        for rid, total, n in msg.body["items"]:
            if not (isinstance(rid, str) and isinstance(total, int) and isinstance(n, int)) or n < 0 \
                    or pos + n > len(ids):
                return
            tail = ids[pos:pos + n]
            pos += n
            ctx = self.contexts.get(rid, [])
            if len(ctx) + n != total:
                if n != total:  # a gap: wait for a full resend
                    self.contexts.pop(rid, None)
                    continue
                ctx = []
            ctx = ctx + tail
            if len(ctx) > self.config.max_position - self.k - 1:
                self.contexts.pop(rid, None)
                continue
            self.contexts[rid] = ctx
            self.dirty.add(rid)

    @torch.inference_mode()
    def round(self) -> None:
        """Propose K tokens for every request whose context moved since its last proposal."""
        if self.peer is None or not self.dirty:
            return
        t0 = time.monotonic()
        items, ids = [], []
        for rid in list(self.dirty)[:MAX_MIRRORED]:
            self.dirty.discard(rid)
            ctx = self.contexts.get(rid)
            if ctx is None:
                continue
            proposal = self._propose(rid, ctx)
            items.append([rid, len(ctx), len(proposal)])
            ids.extend(proposal)
        if items:
            self.worker.push.send(self.addr, "PROPOSE", {"items": items}, [ints_frame(ids)])
            self.rounds += 1
            self.proposed += len(ids)
        self.busy_s += time.monotonic() - t0

    def _propose(self, rid: str, ctx: list[int]) -> list[int]:
        cache, cached = self.caches.get(rid, (None, []))
        if cache is None:
            cache = DenseKV(self.config, device=self.worker.device, dtype=self.worker.dtype,
                            capacity=min(self.config.max_position, len(ctx) + 4 * self.k + 256))
        if cache.capacity < len(ctx) + self.k + 1:
            cache, cached = DenseKV(self.config, device=self.worker.device, dtype=self.worker.dtype,
                                    capacity=min(self.config.max_position, 2 * len(ctx) + self.k + 1)), []
        # keep the cached prefix that still agrees with the partner's committed tokens
        common = 0
        limit = min(len(cached), len(ctx) - 1)
        while common < limit and cached[common] == ctx[common]:
            common += 1
        cache.truncate(common)
        feed = ctx[common:]
        device = self.worker.device
        proposal: list[int] = []
        tokens = list(ctx[:common])
        while len(proposal) < self.k:
            inp = torch.tensor(feed, dtype=torch.long, device=device)
            pos = torch.arange(len(tokens), len(tokens) + len(feed), dtype=torch.long, device=device)
            hidden = self.model(inp, pos, cache)
            tokens.extend(feed)
            proposal.append(int(self.model.logits(hidden[-1:]).argmax(-1).item()))
            feed = proposal[-1:]
        # the cache holds ctx + proposal[:-1]; the last proposal was never fed
        self.caches[rid] = (cache, tokens)
        return proposal

    def stats(self) -> dict:
        return {"assist_rounds": self.rounds, "assist_proposed_tokens": self.proposed,
                "assist_busy_s": round(self.busy_s, 3)}
