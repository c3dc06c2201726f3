"""Sampling and speculative acceptance.

Reproducible randomness: every random draw for a request is a pure function of
(request seed, generated position i, stream, logits) -- a counter-based hash, not a stateful
generator. A request that is recovered on another engine and resumes at position i therefore
draws exactly what it would have drawn on the original one, whatever the batch around it, the
step it lands in, or the device (the hash is exact integer arithmetic on CPU and CUDA alike).

Sampling is Gumbel-max: argmax(logits' + g) with g = -log(-log u), u from the hash over the
vocabulary index -- an exact sample of softmax(logits'), vectorised over the batch.

Speculative verification with temperature > 0. The proposals reaching an engine (from a
recovering worker over the wire, or from `Engine.propose`) come without draft probabilities, so
we treat the draft as deterministic, q = delta_x (a point mass on the proposed token x). Standard
speculative rejection sampling with q = delta_x becomes:
    accept x with probability min(1, p(x)/q(x)) = p(x);
    on rejection sample from the residual (p - q)+ / Z = p with x removed, renormalised.
Then P(out = y) = p(x)[y = x] + (1 - p(x)) p(y)[y != x] / (1 - p(x)) = p(y): the target
distribution exactly, whoever proposed x. (A real draft distribution would only raise the
acceptance rate; it is not needed for correctness.) Greedy (temperature 0) acceptance is exact
match against the target's argmax, plus the target's own token at the first mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from .scheduler import ScheduledSeq

_M32 = 0xFFFFFFFF
_MUL = 0x045D9F3B  # < 2**27: products of 32-bit values stay inside int64 on every backend
_GOLD = 0x9E3779B1
STREAM_SAMPLE = 0
STREAM_ACCEPT = 1


def _mix_int(x: int) -> int:
    x &= _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    x = (((x >> 16) ^ x) * _MUL) & _M32
    return (x >> 16) ^ x


def _mix(x: torch.Tensor) -> torch.Tensor:
    """_mix_int on an int64 tensor of 32-bit values."""
    x = ((x >> 16) ^ x) * _MUL & _M32
    x = ((x >> 16) ^ x) * _MUL & _M32
    return (x >> 16) ^ x


def row_words(seed_key: tuple[int, int], position: int, stream: int) -> tuple[int, int]:
    """Two 32-bit words identifying the draw (seed, generated position, stream)."""
    a, b = seed_key
    w1 = _mix_int(a ^ _mix_int(position * 4 + stream))
    w2 = _mix_int(b ^ _mix_int(w1 + _GOLD))
    return w1, w2


def uniform_scalar(seed_key: tuple[int, int], position: int, stream: int) -> float:
    w1, w2 = row_words(seed_key, position, stream)
    x = _mix_int(_mix_int(w1) ^ w2)
    return ((x >> 8) + 0.5) / (1 << 24)


def uniform_rows(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """words [R, 2] int64 -> u [R, vocab] float32 in (0, 1), 24 bits each."""
    v = torch.arange(vocab, device=words.device, dtype=torch.int64) * _GOLD & _M32
    x = _mix(v.unsqueeze(0) ^ words[:, :1])
    x = _mix(x ^ words[:, 1:])
    return ((x >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p over what is left (the Hugging Face order); removed entries -> -inf.

    top_k [R] (vocab size = off), top_p [R] (1.0 = off). The most likely token always survives.
    """
    vocab = logits.shape[-1]
    if bool((top_k >= vocab).all()) and bool((top_p >= 1.0).all()):
        return logits
    srt, idx = logits.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=logits.device)
    srt = srt.masked_fill(ranks.unsqueeze(0) >= top_k.unsqueeze(1), float("-inf"))
    probs = srt.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly ahead of each token
    srt = srt.masked_fill(before >= top_p.unsqueeze(1), float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, srt)


class Sampler:
    """Turns a step's logits into committed tokens per sampling sequence (1 .. K+1 each)."""

    def __init__(self) -> None:
        self.last_num_accepted: list[int] = []

    def __call__(self, logits: torch.Tensor, items: Seq[ScheduledSeq]) -> list[list[int]]:
        """logits [R, V]: the rows of the sampling items in order (item.num_logits rows each).

        Row j of an item is the distribution of the token at generated position
        seq.num_generated + j; proposal[j] (if any) is checked against it.
        Returns the tokens to commit per item; `last_num_accepted` holds accepted proposals per item.
        """
        vocab = logits.shape[-1]
        if all(it.seq.params.greedy and not it.proposal for it in items):  # plain greedy decode: one argmax
            self.last_num_accepted = [0] * len(items)
            return [[t] for t in logits.argmax(-1).tolist()]
        greedy_rows: list[int] = []
        rand_rows: list[int] = []
        row_prop: list[int] = []  # proposed token checked at each row, -1 if none
        row_item: list[int] = []
        offset = 0
        for n, it in enumerate(items):
            rows = range(offset, offset + it.num_logits)
            (greedy_rows if it.seq.params.greedy else rand_rows).extend(rows)
            row_prop.extend(list(it.proposal) + [-1])
            row_item.extend([n] * it.num_logits)
            offset += it.num_logits
        if offset != logits.shape[0]:
            raise ValueError(f"sampler got {logits.shape[0]} logit rows for {offset} expected")

        choice: dict[int, int] = {}  # row -> token sampled from the full distribution
        resid: dict[int, int] = {}  # row -> token sampled with the proposal removed
        p_prop: dict[int, float] = {}  # row -> target probability of the proposal
        if greedy_rows:
            am = logits[greedy_rows].argmax(-1).tolist()
            choice.update(zip(greedy_rows, am, strict=True))
        if rand_rows:
            self._sample_random(logits, rand_rows, row_prop, row_item, items, vocab, choice, resid, p_prop)

        out: list[list[int]] = []
        self.last_num_accepted = []
        offset = 0
        for it in items:
            seq, toks = it.seq, []
            pos0 = seq.num_generated
            for j in range(it.num_logits):
                r = offset + j
                x = row_prop[r]
                if x < 0:  # no proposal left to check: the target's own token
                    toks.append(choice[r])
                    break
                if seq.params.greedy:
                    accept = choice[r] == x
                else:
                    accept = uniform_scalar(seq.seed_key, pos0 + j, STREAM_ACCEPT) < p_prop[r]
                if accept:
                    toks.append(x)
                else:
                    toks.append(choice[r] if seq.params.greedy else resid[r])
                    break
            self.last_num_accepted.append(len(toks) - 1)
            out.append(toks)
            offset += it.num_logits
        return out

    @staticmethod
    def _sample_random(logits, rows, row_prop, row_item, items, vocab, choice, resid, p_prop) -> None:
        dev = logits.device
        params = [items[row_item[r]].seq.params for r in rows]
        temp = torch.tensor([p.temperature for p in params], device=dev, dtype=torch.float32)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
        top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32)
        lg = logits[rows].float() / temp.unsqueeze(1)
        lg = filter_logits(lg, top_k, top_p)
        words = []
        first_row = {}
        for r in rows:  # generated position of row r = seq.num_generated + (r - item's first row)
            first_row.setdefault(row_item[r], r)
        for r in rows:
            seq = items[row_item[r]].seq
            words.append(row_words(seq.seed_key, seq.num_generated + r - first_row[row_item[r]], STREAM_SAMPLE))
        w = torch.tensor(words, device=dev, dtype=torch.int64)
        g = -torch.log(-torch.log(uniform_rows(w, vocab)))
        scores = lg + g
        choice.update(zip(rows, scores.argmax(-1).tolist(), strict=True))
        local = [i for i, r in enumerate(rows) if row_prop[r] >= 0]
        if local:
            li = torch.tensor(local, device=dev)
            x = torch.tensor([row_prop[rows[i]] for i in local], device=dev)
            probs = lg[li].softmax(-1).gather(1, x.unsqueeze(1)).squeeze(1)
            masked = scores[li].scatter(1, x.unsqueeze(1), float("-inf"))
            for i, p, y in zip(local, probs.tolist(), masked.argmax(-1).tolist(), strict=True):
                p_prop[rows[i]] = p
                resid[rows[i]] = y
