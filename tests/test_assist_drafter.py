"""The drafter's round estimate, which a time slot admits rounds by: a round that prefills a request's
context and a round that only decodes are timed apart, as the engine times its steps. With one estimate
for both, one prefill made every cheap decoding round look too long for what was left of a slot, and the
drafter ran about one round per cycle of slots (2026-12-07). No cluster: a Drafter on the tiny preset,
fed the partner's mirror messages in-process."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lumen.runtime.assist import Drafter
from lumen.runtime.transport import ints_frame


def _mirror(items: list[tuple[str, list[int], int]]):
    """A MIRROR from worker 1: for each request its id, the committed tokens sent and their total."""
    ids = [t for _, toks, _ in items for t in toks]
    return SimpleNamespace(src="w1", frames=[ints_frame(ids)],
                           body={"drop": [], "items": [[rid, total, len(toks)] for rid, toks, total in items]})


def test_prefilling_and_decoding_rounds_are_estimated_apart():
    sent = []
    d = Drafter(lambda addr, typ, body, frames: sent.append(body) or True, "preset:tiny", 4, device="cpu",
                dtype=torch.float32, block_size=16, num_blocks=64, max_ahead=6)
    d.pair(1, "w1")
    first = list(range(10, 40))
    d.on_mirror(_mirror([("a", first, len(first))]))
    assert d.expected_round_s() == 0.0  # nothing measured yet: the slot gate treats it as unknown

    assert d.round()  # reads request a's 30 tokens: a prefilling round
    pre = d.round_ema.prefill_s
    assert pre > 0 and d.round_ema.decode_s == 0.0
    # a's context is in the draft now: its next round decodes; with no decoding round measured yet the
    # prefill's time stands in for it
    assert d.expected_round_s() == pre

    assert d.round()  # one more token for a: a decoding round
    dec = d.round_ema.decode_s
    assert dec > 0 and d.round_ema.prefill_s == pre
    assert d.expected_round_s() == dec  # the decode estimate, not one dragged up by the prefill

    # a second request arrives: the next round prefills it, and is estimated as such
    d.on_mirror(_mirror([("b", list(range(50, 70)), 20)]))
    assert d.expected_round_s() == pre
    assert d.round()
    assert d.round_ema.decode_s == dec and d.round_ema.prefill_s != pre  # the prefill estimate moved, not the decode one
    assert d.expected_round_s() == d.round_ema.decode_s

    # guesses run ahead until max_ahead, then rounds stop: nothing to estimate for an idle drafter
    while d.round():
        pass
    assert all(len(st.ahead) == 6 for st in d.states.values())
    stats = d.stats()
    assert stats["assist_rounds"] >= 3 and stats["assist_decode_round_s"] > 0 and stats["assist_prefill_round_s"] > 0
    assert sent and all("items" in body for body in sent)
    # each draft token made counts once; a guess is sent whole each time it grows, so sent tokens count more
    assert stats["assist_drafted_tokens"] == 12  # two requests, 6 ahead each, no commits meanwhile
    assert stats["assist_proposed_tokens"] == sum(body["items"][i][2] for body in sent for i in range(len(body["items"])))
    assert stats["assist_proposed_tokens"] > stats["assist_drafted_tokens"]
    assert 0 <= stats["assist_first_proposal_s"] <= stats["assist_paired_s"]
    d.pair(None, "")
    paired = d.stats()["assist_paired_s"]
    assert paired >= stats["assist_paired_s"] and d.stats()["assist_paired_s"] == paired  # unpaired: the clock stops
