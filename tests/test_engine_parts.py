"""lumen.engine parts that need no model: sampling params, block manager, tags, sampler math."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lumen.engine import SamplingParams, page_tag, page_tags
from lumen.engine.block_manager import BlockManager
from lumen.engine.sampler import filter_logits, uniform_rows, uniform_scalar
from lumen.engine.sequence import Sequence


@pytest.mark.parametrize("kw, msg", [
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=1.5), "max_tokens"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(seed="x"), "seed"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
])
def test_sampling_params_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kw).validate()


def test_sampling_params_defaults_valid():
    sp = SamplingParams(stop_token_ids=[3, 4]).validate()
    assert sp.greedy and sp.stop_token_ids == (3, 4) and hash(sp)
    SamplingParams(max_tokens=1, temperature=2.0, top_p=1.0, top_k=1, seed=-5).validate()


def _seq(rid: str, n: int = 1) -> Sequence:
    return Sequence(rid, [1] * n, SamplingParams(), seed=0, arrival=0)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["ensure", "truncate", "free"]), st.integers(0, 5),
                              st.integers(0, 40)), max_size=60),
       num_blocks=st.integers(1, 12), bs=st.sampled_from([1, 4, 16]))
def test_block_manager_invariants(ops, num_blocks, bs):
    bm = BlockManager(num_blocks, bs)
    seqs = [_seq(f"s{i}") for i in range(6)]
    for op, i, n in ops:
        s = seqs[i]
        if op == "ensure":
            before, free = list(s.block_table), bm.num_free
            ok = bm.ensure(s, n)
            if ok:
                assert len(s.block_table) >= bm.blocks_for(n) and s.block_table[:len(before)] == before
            else:
                assert s.block_table == before and bm.num_free == free
                assert bm.extra_blocks(s, n) > free
        elif op == "truncate":
            had = len(s.block_table)
            bm.truncate(s, n)
            assert len(s.block_table) == min(had, bm.blocks_for(n))
        else:
            bm.free(s)
            assert s.block_table == []
        bm.check(seqs)
    for s in seqs:
        bm.free(s)
    assert bm.num_free == num_blocks and bm.usage == 0.0
    bm.check(seqs)


def test_block_manager_check_catches_double_ownership():
    bm = BlockManager(4, 4)
    a, b = _seq("a"), _seq("b")
    bm.ensure(a, 8)
    b.block_table = [a.block_table[0]]
    with pytest.raises(AssertionError, match="owned by"):
        bm.check([a, b])


def test_page_tags_are_a_chain_and_page0_is_plain_blake2b():
    ids = list(range(100, 140))
    tags = page_tags(ids, 16)
    assert len(tags) == 2
    h0 = hashlib.blake2b(b"".join(i.to_bytes(4, "little") for i in ids[:16]), digest_size=16).digest()
    assert tags[0] == h0 == page_tag(ids[:16], 16)
    assert tags[1] == page_tag(ids[:32], 16)
    assert page_tag(ids[:32], 16) != page_tag(ids[:31] + [7], 16)
    seq = Sequence("r", ids, SamplingParams(), seed=0, arrival=0)
    assert [seq.page_tag(i, 16) for i in range(2)] == tags
    with pytest.raises(ValueError):
        page_tag([])


def test_uniforms_depend_only_on_seed_position_stream():
    key = (123, 456)
    assert uniform_scalar(key, 5, 1) == uniform_scalar(key, 5, 1)
    assert uniform_scalar(key, 5, 1) != uniform_scalar(key, 6, 1)
    w = torch.tensor([[1, 2], [1, 2], [3, 4]])
    u = uniform_rows(w, 1000)
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert 0 < float(u.min()) and float(u.max()) < 1
    # roughly uniform: mean 1/2, variance 1/12 over many draws
    big = uniform_rows(torch.tensor([[random.Random(i).getrandbits(32), i] for i in range(50)]), 4000)
    assert abs(float(big.mean()) - 0.5) < 0.01 and abs(float(big.var()) - 1 / 12) < 0.005


def test_filter_logits_top_k_top_p():
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 3))
    out = filter_logits(lg, torch.tensor([4, 2, 4]), torch.tensor([1.0, 1.0, 0.7]))
    assert torch.isfinite(out[0]).all()
    assert torch.isfinite(out[1]).tolist() == [True, True, False, False]
    assert torch.isfinite(out[2]).tolist() == [True, True, False, False]  # 0.5 + 0.3 >= 0.7
    tiny = filter_logits(lg[:1], torch.tensor([4]), torch.tensor([0.01]))
    assert torch.isfinite(tiny).tolist() == [[True, False, False, False]]  # the top token always survives
