"""KV page export on the engine thread: incremental detection (Engine.pages_due), batched export
(Engine.export_pages, one ModelRunner.read_blocks for all requests of a step) and the worker's
_stream_pages on top of them.

The reference is the previous scheme -- every protected request asked for its new pages after every
step -- which must yield exactly the same pages (requests, indices, tags, bytes), in deterministic
mode, whatever the holders' arrival times, preemptions, finishes and aborts.
"""

from __future__ import annotations

import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_util import peaked_tiny_model

from lumen.engine import Engine, EngineConfig, KVPage, SamplingParams
from lumen.engine.kv_pages import page_tags
from lumen.model import PRESETS

torch.set_num_threads(1)
CFG = PRESETS["tiny"]
HYP = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow],
               derandomize=True)


def model():
    return peaked_tiny_model()


def engine(**kw) -> Engine:
    kw.setdefault("num_blocks", 128)
    return Engine(model(), EngineConfig(deterministic=True, **kw))


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, CFG.vocab_size) for _ in range(n)]


def key(p: KVPage) -> tuple:
    return p.req_id, p.index, p.end_pos, p.tag, p.data.contiguous().view(torch.uint8).numpy().tobytes()


def test_read_blocks_cpu_gives_one_contiguous_page_per_block():
    eng = engine(block_size=4)
    pool = eng.runner.kv_pool
    pool.copy_(torch.randn(pool.shape, dtype=pool.dtype))
    pages, event = eng.runner.read_blocks([5, 2, 5])
    assert event is None and len(pages) == 3
    for page, b in zip(pages, [5, 2, 5], strict=True):
        assert page.is_contiguous() and page.shape == (CFG.num_layers, 2, 4, CFG.num_kv_heads, CFG.head_dim)
        assert torch.equal(page, pool[:, :, b])
    pool[:, :, 5] = 0  # copies, not views: a reused block does not change an exported page
    assert not torch.equal(pages[0], pool[:, :, 5])


def test_pages_due_reports_only_requests_that_filled_a_page():
    bs = 4
    eng = engine(block_size=bs, chunk_tokens=64)
    rng = random.Random(1)
    eng.add_request("a", prompt(rng, 9), SamplingParams(max_tokens=20, ignore_eos=True))  # 2 full pages
    eng.add_request("b", prompt(rng, 2), SamplingParams(max_tokens=20, ignore_eos=True))  # none yet
    assert eng.pages_due() == []
    eng.step()  # both prefills: a has 8 of 9 tokens... computed, b 2
    assert eng.pages_due() == ["a"]
    assert eng.pages_due() == []  # forgotten once reported
    seen: dict[str, int] = {}
    for _ in range(12):
        eng.step()
        for rid in eng.pages_due():
            seq = eng._seqs[rid]
            assert seq.num_computed_tokens // bs > seq.num_exported_pages  # due means a page to export
            seen[rid] = seen.get(rid, 0) + 1
    assert set(seen) == {"a", "b"}
    # nothing exported: a request stays due only until reported; rewinding reports it again
    eng.rewind_page_export("a", 0)
    eng.rewind_page_export("gone", 0)
    assert eng.pages_due() == ["a"]
    assert [p.index for p in eng.export_pages(["a"])] == list(range(eng._seqs["a"].num_computed_tokens // bs))
    eng.rewind_page_export("b", 0)
    eng.abort("b")
    assert eng.pages_due() == []  # an aborted request is never reported


def test_finished_requests_leave_nothing_due():
    eng = engine(block_size=4)
    rng = random.Random(2)
    for i in range(3):
        eng.add_request(f"r{i}", prompt(rng, 5 + i), SamplingParams(max_tokens=6, ignore_eos=True))
    while eng.has_work():
        eng.step()
    assert eng.pages_due() == [] and not eng._pages_due


def test_export_pages_batches_requests_into_one_read():
    bs = 4
    eng = engine(block_size=bs, chunk_tokens=64)
    rng = random.Random(3)
    prompts = {rid: prompt(rng, n) for rid, n in (("a", 13), ("b", 9), ("c", 3))}
    for rid, p in prompts.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=10, ignore_eos=True))
    eng.step()
    calls = []
    real = eng.runner.read_blocks
    eng.runner.read_blocks = lambda blocks: calls.append(list(blocks)) or real(blocks)
    pages = eng.export_pages(["c", "a", "b", "missing"])
    assert len(calls) == 1
    assert [(p.req_id, p.index) for p in pages] == [("a", i) for i in range(3)] + [("b", i) for i in range(2)]
    for p in pages:
        seq = eng._seqs[p.req_id]
        assert p.end_pos == (p.index + 1) * bs
        assert p.tag == page_tags(prompts[p.req_id], bs)[p.index]
        assert torch.equal(p.data, eng.runner.kv_pool[:, :, seq.block_table[p.index]])
    assert eng.export_pages(["a", "b"]) == [] and eng.stats()["exported_pages"] == 5


@HYP
@given(seed=st.integers(0, 2**16), bs=st.sampled_from([4, 8]), num_blocks=st.sampled_from([24, 128]),
       chunk=st.sampled_from([8, 64]))
def test_incremental_export_yields_exactly_the_pages_of_a_full_scan(seed, bs, num_blocks, chunk):
    """Two identical engines run the same requests; holders arrive at random steps (and some requests
    never get one). Engine A is asked for every protected request after every step (the old scan),
    engine B only for those pages_due reports (the worker's _stream_pages). Same pages, same order per
    request. A small pool forces preemptions; some requests are aborted."""
    rng = random.Random(seed)
    a = engine(block_size=bs, num_blocks=num_blocks, chunk_tokens=chunk)
    b = engine(block_size=bs, num_blocks=num_blocks, chunk_tokens=chunk)
    reqs = {f"r{i}": (prompt(rng, rng.randint(1, 40)), rng.randint(1, 30)) for i in range(6)}
    holder_at = {rid: rng.choice([None, 0, 1, 3, 8]) for rid in reqs}
    abort_at = {rid: rng.choice([None, None, None, 5, 12]) for rid in reqs}
    for e in (a, b):
        for rid, (p, n) in reqs.items():
            e.add_request(rid, p, SamplingParams(max_tokens=n, ignore_eos=True))
    got_a: list[tuple] = []
    got_b: list[tuple] = []
    holders: set[str] = set()
    step = 0
    while a.has_work() or b.has_work():
        for rid in reqs:
            if abort_at[rid] == step:
                a.abort(rid)
                b.abort(rid)
                holders.discard(rid)
            if holder_at[rid] == step and rid in a._seqs:
                holders.add(rid)
                a.rewind_page_export(rid, 0)
                b.rewind_page_export(rid, 0)
        for e in (a, b):
            for o in e.step():
                if o.finished:
                    holders.discard(o.req_id)
        for rid in sorted(holders):
            got_a.extend(key(p) for p in a.new_completed_pages(rid))
        got_b.extend(key(p) for p in b.export_pages([r for r in b.pages_due() if r in holders]))
        step += 1
        assert step < 2000
    assert a.stats()["preemptions"] == b.stats()["preemptions"]

    def per_request(got):
        out: dict[str, list[tuple]] = {}
        for k in got:
            out.setdefault(k[0], []).append(k)
        return out

    assert per_request(got_a) == per_request(got_b)
    assert a.stats()["exported_pages"] == b.stats()["exported_pages"] == len(got_b)
