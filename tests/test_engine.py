"""lumen.engine property tests: deterministic mode (float64, CPU) on tiny random models.

The oracle is a plain greedy loop over the same model with the dense single-sequence KV backend.
A greedy request must yield exactly its tokens alone, batched, across preemption, across KV export /
import into a second engine, and with any proposals in the fused verify path (DESIGN.md invariant 3).
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_util import peaked_tiny_model

from lumen.engine import Engine, EngineConfig, KVPage, SamplingParams
from lumen.model import PRESETS, DenseKV
from lumen.model.loader import random_model

torch.set_num_threads(1)
CFG = PRESETS["tiny"]
HYP = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow],
               derandomize=True)


def target():
    return peaked_tiny_model()


@functools.cache
def draft():
    return random_model(CFG, dtype=torch.float64, seed=8, std=0.3)


@functools.cache
def reference(prompt: tuple[int, ...], n: int) -> tuple[int, ...]:
    """Greedy tokens (eos ignored) of the dense oracle loop."""
    m = target()
    kv = DenseKV(CFG, dtype=torch.float64)
    out: list[int] = []
    with torch.inference_mode():
        h = m(torch.tensor(prompt), torch.arange(len(prompt)), kv)
        for i in range(n):
            t = int(m.logits(h[-1:]).argmax(-1))
            out.append(t)
            if i + 1 < n:
                h = m(torch.tensor([t]), torch.tensor([len(prompt) + i]), kv)
    return tuple(out)


def engine(**kw) -> Engine:
    kw.setdefault("num_blocks", 128)
    return Engine(target(), EngineConfig(deterministic=True, **kw))


def prompt_of(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(2, CFG.vocab_size) for _ in range(n)]


def run(eng: Engine, hook=None, max_steps: int = 2000) -> dict[str, list[int]]:
    """Step to completion; `hook(eng, step_index)` runs before each step. Checks invariants."""
    out: dict[str, list[int]] = {}
    i = 0
    while eng.has_work():
        if hook is not None:
            hook(eng, i)
        for o in eng.step():
            out.setdefault(o.req_id, []).extend(o.token_ids)
        eng.check_invariants()
        i += 1
        assert i < max_steps, "engine did not finish"
    eng.check_invariants()
    assert eng.block_manager.num_free == eng.block_manager.num_blocks, "blocks leaked"
    return out


GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)


# ---------------------------------------------------------------- greedy == oracle


@HYP
@given(n=st.integers(1, 90), max_tokens=st.integers(1, 12), chunk=st.sampled_from([7, 40, 256]),
       bs=st.sampled_from([4, 16]), seed=st.integers(0, 2**16))
def test_alone_matches_oracle(n, max_tokens, chunk, bs, seed):
    p = prompt_of(random.Random(seed), n)
    eng = engine(chunk_tokens=chunk, block_size=bs)
    eng.add_request("a", p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    assert run(eng)["a"] == list(reference(tuple(p), max_tokens))


@HYP
@given(data=st.data())
def test_batched_with_random_others(data):
    rng = random.Random(data.draw(st.integers(0, 2**16)))
    chunk = data.draw(st.sampled_from([16, 50, 256]))
    eng = engine(chunk_tokens=chunk, max_batch=data.draw(st.integers(2, 8)))
    mine = prompt_of(rng, data.draw(st.integers(1, 70)))
    arrivals = {}
    for j in range(data.draw(st.integers(1, 6))):
        sp = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.8]),
                            top_k=rng.choice([-1, 5]), seed=rng.randrange(1000), ignore_eos=rng.random() < .5)
        arrivals.setdefault(rng.randint(0, 8), []).append((f"o{j}", prompt_of(rng, rng.randint(1, 60)), sp))
    arrivals.setdefault(data.draw(st.integers(0, 8)), []).append(("me", mine, GREEDY))

    def hook(eng, i):
        for rid, p, sp in arrivals.pop(i, []):
            eng.add_request(rid, p, sp)

    out = {}
    step = 0
    while arrivals or eng.has_work():
        hook(eng, step)
        for o in eng.step():
            out.setdefault(o.req_id, []).extend(o.token_ids)
        eng.check_invariants()
        step += 1
    assert out["me"] == list(reference(tuple(mine), GREEDY.max_tokens))
    assert eng.block_manager.num_free == eng.block_manager.num_blocks


@HYP
@given(seed=st.integers(0, 2**16), num_blocks=st.integers(6, 12), bs=st.sampled_from([4, 8]))
def test_preemption_keeps_greedy_outputs(seed, num_blocks, bs):
    rng = random.Random(seed)
    eng = engine(num_blocks=num_blocks, block_size=bs, chunk_tokens=64)
    prompts = {f"r{i}": prompt_of(rng, rng.randint(1, 2 * bs)) for i in range(5)}
    sp = SamplingParams(max_tokens=3 * bs, ignore_eos=True)
    for rid, p in prompts.items():
        eng.add_request(rid, p, sp)
    out = run(eng)
    for rid, p in prompts.items():
        assert out[rid] == list(reference(tuple(p), sp.max_tokens)), rid


def test_preemption_happens_and_newest_is_the_victim():
    rng = random.Random(3)
    eng = engine(num_blocks=6, block_size=4, chunk_tokens=64)
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    prompts = {f"r{i}": prompt_of(rng, 5) for i in range(3)}
    for rid, p in prompts.items():
        eng.add_request(rid, p, sp)
    first_done = []

    def hook(eng, i):
        if eng.scheduler.num_preemptions and not first_done:
            first_done.append([s.req_id for s in eng.scheduler.waiting])

    out = run(eng, hook)
    assert eng.stats()["preemptions"] > 0
    assert first_done[0][0] == "r2"  # the newest running sequence went back to the queue
    for rid, p in prompts.items():
        assert out[rid] == list(reference(tuple(p), 12))


# ---------------------------------------------------------------- KV export / import


def _run_collecting_pages(eng: Engine, rid: str, stop_after: int):
    pages: list[KVPage] = []
    toks: list[int] = []
    for _ in range(stop_after):
        for o in eng.step():
            if o.req_id == rid:
                toks.extend(o.token_ids)
        pages.extend(eng.new_completed_pages(rid))
    return toks, pages


@HYP
@given(n=st.integers(1, 70), steps=st.integers(1, 30), bs=st.sampled_from([4, 16]), data=st.data())
def test_export_import_into_second_engine(n, steps, bs, data):
    rng = random.Random(data.draw(st.integers(0, 2**16)))
    p = prompt_of(rng, n)
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    a = engine(block_size=bs, chunk_tokens=data.draw(st.sampled_from([8, 64])))
    a.add_request("r", p, sp)
    if rng.random() < 0.5:  # some company in the first engine
        a.add_request("x", prompt_of(rng, 9), SamplingParams(max_tokens=5))
    gen, pages = _run_collecting_pages(a, "r", steps)
    if len(gen) >= sp.max_tokens:
        return
    ctx = p + gen
    assert [pg.index for pg in pages] == list(range(len(pages)))
    assert len(pages) <= (len(ctx) - 1) // bs
    keep = data.draw(st.integers(0, len(pages)))
    b = engine(block_size=bs, num_blocks=96, chunk_tokens=data.draw(st.sampled_from([5, 256])))
    b.add_request("r", p, sp, generated_ids=gen, restored_pages=pages[:keep])
    rest = run(b)["r"]
    assert gen + rest == list(reference(tuple(p), sp.max_tokens))
    s = b.stats()
    assert s["restored_pages"] == keep and s["rejected_pages"] == 0
    assert s["prefill_tokens"] == len(ctx) - min(keep * bs, len(ctx) - 1)


def test_page_aligned_fully_restored_context_reruns_last_token():
    bs = 4
    p = prompt_of(random.Random(5), 7)
    a = engine(block_size=bs)
    a.add_request("r", p, SamplingParams(max_tokens=20, ignore_eos=True))
    gen, pages = _run_collecting_pages(a, "r", 30)
    gen, pages = gen[:1], pages[:2]  # context 8 tokens = exactly 2 pages
    b = engine(block_size=bs)
    b.add_request("r", p, SamplingParams(max_tokens=20, ignore_eos=True), generated_ids=gen, restored_pages=pages)
    assert gen + run(b)["r"] == list(reference(tuple(p), 20))
    assert b.stats()["restored_tokens"] == 7 and b.stats()["prefill_tokens"] == 1


def test_corrupt_or_mismatched_pages_fall_back_to_recompute():
    bs = 4
    p = prompt_of(random.Random(6), 13)
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    a = engine(block_size=bs)
    a.add_request("r", p, sp)
    gen, pages = _run_collecting_pages(a, "r", 4)
    assert len(pages) >= 3
    bad = list(pages)
    bad[1] = KVPage("r", 1, bad[1].end_pos, b"\0" * 16, bad[1].data)  # wrong tag
    b = engine(block_size=bs)
    b.add_request("r", p, sp, generated_ids=gen, restored_pages=bad)
    assert gen + run(b)["r"] == list(reference(tuple(p), 12))
    assert b.stats()["restored_pages"] == 1 and b.stats()["rejected_pages"] == len(pages) - 1
    # Pages as raw bytes (what arrives off the wire) are accepted too.
    raw = [KVPage(pg.req_id, pg.index, pg.end_pos, pg.tag, pg.data.contiguous().view(torch.uint8)) for pg in pages]
    c = engine(block_size=bs)
    c.add_request("r", p, sp, generated_ids=gen, restored_pages=raw)
    assert gen + run(c)["r"] == list(reference(tuple(p), 12))
    assert c.stats()["restored_pages"] == len(pages)


def test_page_tags_match_gateway_chain():
    from lumen.engine import page_tag, page_tags
    bs = 4
    p = prompt_of(random.Random(9), 10)
    a = engine(block_size=bs)
    a.add_request("r", p, SamplingParams(max_tokens=12, ignore_eos=True))
    gen, pages = _run_collecting_pages(a, "r", 20)
    ctx = p + gen
    assert [pg.tag for pg in pages] == page_tags(ctx, bs)[:len(pages)]
    for pg in pages:
        assert pg.end_pos == (pg.index + 1) * bs and pg.tag == page_tag(ctx[:pg.end_pos], bs)
        assert pg.data.shape == (CFG.num_layers, 2, bs, CFG.num_kv_heads, CFG.head_dim)


# ---------------------------------------------------------------- speculative verify


@HYP
@given(data=st.data())
def test_any_proposals_keep_greedy_outputs(data):
    rng = random.Random(data.draw(st.integers(0, 2**16)))
    p = prompt_of(rng, data.draw(st.integers(1, 40)))
    sp = SamplingParams(max_tokens=data.draw(st.integers(1, 20)), ignore_eos=True)
    ref = list(reference(tuple(p), sp.max_tokens))
    eng = engine(block_size=data.draw(st.sampled_from([4, 16])), chunk_tokens=32)
    eng.add_request("r", p, sp)
    eng.add_request("other", prompt_of(rng, 12), SamplingParams(max_tokens=8, temperature=0.7, seed=1))
    p_correct = data.draw(st.sampled_from([0.0, 0.5, 0.9]))

    def hook(eng, i):
        seq = eng._seqs.get("r")
        if seq is None or not seq.is_decoding:
            return
        g = seq.num_generated
        k = rng.randint(1, 6)
        props = [ref[g + j] if g + j < len(ref) and rng.random() < p_correct else rng.randrange(CFG.vocab_size)
                 for j in range(k)]
        if rng.random() < 0.1:
            assert not eng.propose("r", len(seq) - 1, props)  # stale: dropped
        else:
            eng.propose("r", len(seq), props)

    assert run(eng, hook)["r"] == ref
    s = eng.stats()
    assert s["spec_accepted_tokens"] <= s["spec_draft_tokens"]


def test_correct_proposals_are_all_accepted():
    p = prompt_of(random.Random(11), 9)
    ref = list(reference(tuple(p), 16))
    eng = engine()
    eng.add_request("r", p, SamplingParams(max_tokens=16, ignore_eos=True))
    outs = []

    def hook(eng, i):
        seq = eng._seqs.get("r")
        if seq is not None and seq.is_decoding:
            eng.propose("r", len(seq), ref[seq.num_generated:seq.num_generated + 4])

    eng_out = run(eng, lambda e, i: (hook(e, i), outs.append(e.stats()["steps"])))
    assert eng_out["r"] == ref
    s = eng.stats()
    assert s["spec_accepted_tokens"] == s["spec_draft_tokens"] > 0
    assert s["steps"] == 1 + 3  # prefill, then 5 tokens per step: 1 + 5 + 5 + 5 = 16


@pytest.mark.parametrize("which", ["random", "same"])
def test_colocated_draft_keeps_greedy_outputs(which):
    rng = random.Random(12)
    dm = draft() if which == "random" else random_model(CFG, dtype=torch.float64, seed=7, std=0.3)
    eng = Engine(target(), EngineConfig(deterministic=True, num_blocks=128, draft=dm, num_draft_tokens=3,
                                        chunk_tokens=48))
    prompts = {f"r{i}": prompt_of(rng, rng.randint(1, 60)) for i in range(4)}
    for rid, p in prompts.items():
        eng.add_request(rid, p, SamplingParams(max_tokens=14, ignore_eos=True))
    out = run(eng)
    for rid, p in prompts.items():
        assert out[rid] == list(reference(tuple(p), 14)), rid
    s = eng.stats()
    assert s["spec_drafts"] > 0
    if which == "same":  # a draft identical to the target is always right
        assert s["spec_acceptance"] == 1.0
    assert eng.draft.bm.num_free == eng.draft.bm.num_blocks  # draft KV released


# ---------------------------------------------------------------- sampling


def _oracle_probs(prefix: list[int], temperature: float, top_k: int) -> torch.Tensor:
    m = target()
    with torch.inference_mode():
        h = m(torch.tensor(prefix), torch.arange(len(prefix)), DenseKV(CFG, dtype=torch.float64))
        lg = m.logits(h[-1]).float() / temperature
    kth = lg.topk(top_k).values[-1]
    return lg.masked_fill(lg < kth, float("-inf")).softmax(-1)


@pytest.mark.parametrize("spec", [False, True])
def test_verify_preserves_target_distribution(spec):
    """Chi-square of the first token committed by a verify step (or a plain decode step) against the
    exact target distribution, pooled over the contexts created by the first sampled token."""
    from scipy.stats import chi2

    n_req, top_k, temp = 1500, 4, 1.0
    p = prompt_of(random.Random(13), 8)
    eng = engine(num_blocks=n_req + 8, chunk_tokens=n_req * 8, max_batch=n_req)
    for s in range(n_req):
        eng.add_request(f"{s}", p, SamplingParams(max_tokens=3, temperature=temp, top_k=top_k, seed=s,
                                                  ignore_eos=True))
    t0 = {o.req_id: o.token_ids[0] for o in eng.step()}
    probs = {t: _oracle_probs(p + [t], temp, top_k) for t in set(t0.values())}
    rng = random.Random(14)
    group = dict(t0)  # requests are pooled by context, and by proposal when there is one
    if spec:  # propose the first or second most likely token (then anything): exact-match rates differ
        for rid, t in t0.items():
            x = probs[t].topk(2).indices.tolist()[rng.randrange(2)]
            group[rid] = (t, x)
            assert eng.propose(rid, len(p) + 1, [x, rng.randrange(CFG.vocab_size)])
    t1 = {o.req_id: o.token_ids[0] for o in eng.step()}
    stat, df = 0.0, 0
    for key in set(group.values()):
        pr = probs[key[0] if spec else key]
        rids = [r for r, g in group.items() if g == key]
        if len(rids) < 50:
            continue
        counts = torch.zeros(CFG.vocab_size)
        for r in rids:
            counts[t1[r]] += 1
        support = pr > 0
        assert counts[~support].sum() == 0, "sampled a token outside top-k"
        exp = pr[support] * len(rids)
        stat += float(((counts[support] - exp) ** 2 / exp).sum())
        df += int(support.sum()) - 1
    assert df >= 6
    assert chi2.sf(stat, df) > 1e-3, (stat, df)
    if spec:
        s = eng.stats()
        assert 0.1 < s["spec_acceptance"] < 0.9  # both branches of the rejection rule were taken


def test_seeded_sampling_is_a_function_of_seed_and_position():
    """A temperature > 0 request draws the same tokens alone, batched, and resumed elsewhere."""
    p = prompt_of(random.Random(15), 11)
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    alone = engine()
    alone.add_request("r", p, sp)
    ref = run(alone)["r"]
    busy = engine(chunk_tokens=9)
    rng = random.Random(16)
    for j in range(4):
        busy.add_request(f"o{j}", prompt_of(rng, 20), SamplingParams(max_tokens=6, temperature=1.0, seed=j))
    busy.add_request("r", p, sp)
    assert run(busy)["r"] == ref
    resumed = engine()
    resumed.add_request("r", p, sp, generated_ids=ref[:5])
    assert ref[:5] + run(resumed)["r"] == ref
    other_seed = engine()
    other_seed.add_request("r", p, SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=99,
                                                  ignore_eos=True))
    assert run(other_seed)["r"] != ref


# ---------------------------------------------------------------- API edges


def test_stop_tokens_eos_and_max_tokens():
    p = prompt_of(random.Random(17), 6)
    ref = reference(tuple(p), 10)
    eng = engine()
    eng.add_request("stop", p, SamplingParams(max_tokens=10, stop_token_ids=(ref[3],), ignore_eos=True))
    eng.add_request("len", p, SamplingParams(max_tokens=4, ignore_eos=True))
    outs = {}
    while eng.has_work():
        for o in eng.step():
            outs.setdefault(o.req_id, []).append(o)
    k = ref.index(ref[3]) + 1
    assert [t for o in outs["stop"] for t in o.token_ids] == list(ref[:k])
    assert outs["stop"][-1].finished and outs["stop"][-1].finish_reason == "stop"
    assert outs["len"][-1].finish_reason == "length" and sum(len(o.token_ids) for o in outs["len"]) == 4
    assert all(not o.finished for o in outs["len"][:-1])
    # a resumed request that already has max_tokens finishes without emitting anything
    eng.add_request("done", p, SamplingParams(max_tokens=2), generated_ids=list(ref[:2]))
    (o,) = eng.step()
    assert o.req_id == "done" and o.finished and o.token_ids == [] and o.finish_reason == "length"


def test_abort_frees_everything():
    eng = engine(chunk_tokens=8)
    eng.add_request("a", prompt_of(random.Random(1), 30), GREEDY)
    eng.add_request("b", prompt_of(random.Random(2), 30), GREEDY)
    eng.step()
    assert eng.abort("a") and not eng.abort("a") and eng.abort("b")
    assert not eng.has_work() and eng.block_manager.num_free == eng.block_manager.num_blocks
    assert eng.stats()["aborted"] == 2


def test_add_request_rejects_bad_input():
    eng = engine(num_blocks=8, block_size=4)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add_request("a", [], GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        eng.add_request("a", [CFG.vocab_size], GREEDY)
    with pytest.raises(ValueError, match="context length"):
        eng.add_request("a", [3] * CFG.max_position, GREEDY)
    with pytest.raises(ValueError, match="KV blocks"):
        eng.add_request("a", [3] * 40, GREEDY)
    with pytest.raises(ValueError, match="top_p"):
        eng.add_request("a", [3], SamplingParams(top_p=0.0))
    for bad in ([3, 1.5], ["x"], [None], [True]):
        with pytest.raises(ValueError, match="integers"):
            eng.add_request("a", bad, GREEDY)
    # garbage in place of pages is ignored (counted), never trusted
    eng.add_request("g", [3] * 9, GREEDY, restored_pages=[None, "page", KVPage("g", 0, 4, b"", torch.zeros(3))])
    assert eng.stats()["rejected_pages"] == 3 and eng.stats()["restored_pages"] == 0
    assert not eng.propose("g", 9, [10**9])
    eng.add_request("a", [3], GREEDY)
    with pytest.raises(ValueError, match="duplicate"):
        eng.add_request("a", [3], GREEDY)


def test_stats_and_q_wait():
    eng = engine(chunk_tokens=16)
    s = eng.stats()
    for key in ("num_waiting", "num_running", "kv_usage", "free_blocks", "prefill_tokens", "decode_tokens",
                "preemptions", "restored_pages", "spec_drafts", "spec_draft_tokens", "spec_accepted_tokens",
                "q_wait_s"):
        assert key in s
    assert s["q_wait_s"] == 0.0
    rng = random.Random(3)
    eng.add_request("a", prompt_of(rng, 40), GREEDY)
    eng.step()
    q1 = eng.stats()["q_wait_s"]
    assert q1 > 0  # 24 prompt tokens still queued, a prefill step was measured
    for j in range(3):
        eng.add_request(f"b{j}", prompt_of(rng, 40), GREEDY)
    assert eng.stats()["q_wait_s"] > q1
    assert eng.stats()["num_waiting"] == 3 and 0 < eng.stats()["kv_usage"] < 1


def test_profile_engine_writes_the_fit_csv(tmp_path):
    import csv

    from lumen.engine.profile import COLUMNS, profile_engine
    eng = engine(num_blocks=64, chunk_tokens=64)
    grid = [(16, 0, 8), (0, 3, 20), (40, 2, 9), (0, 1000, 16)]  # the last does not fit: skipped
    rows = profile_engine(eng, grid, tmp_path / "p.csv", repeats=1)
    assert [(r["num_prefill_tokens"], r["num_decode_seqs"], r["total_context_tokens"]) for r in rows] == \
        [(16, 0, 16), (0, 3, 60), (40, 2, 58)]
    assert all(r["step_time_s"] > 0 for r in rows)
    with open(tmp_path / "p.csv") as f:
        got = list(csv.DictReader(f))
    assert tuple(got[0].keys()) == COLUMNS == ("num_prefill_tokens", "num_decode_seqs", "total_context_tokens",
                                               "step_time_s")
    assert len(got) == 3 and eng.block_manager.num_free == 64


def test_rewind_page_export_and_decoding_sequences():
    bs = 4
    p = prompt_of(random.Random(21), 10)
    eng = engine(block_size=bs)
    eng.add_request("r", p, SamplingParams(max_tokens=12, ignore_eos=True))
    eng.add_request("w", prompt_of(random.Random(22), 5), SamplingParams(max_tokens=12, ignore_eos=True))
    _, first = _run_collecting_pages(eng, "r", 6)
    assert len(first) >= 3 and eng.new_completed_pages("r") == []
    eng.rewind_page_export("r", 1)  # a new holder: pages from index 1 on again
    again = eng.new_completed_pages("r")
    assert [pg.index for pg in again] == [pg.index for pg in first[1:]]
    assert all(torch.equal(a.data, b.data) and a.tag == b.tag for a, b in zip(again, first[1:], strict=True))
    eng.rewind_page_export("missing", 0)  # unknown ids are ignored
    dec = dict(eng.decoding_sequences())
    assert set(dec) == {"r", "w"} and dec["r"][:len(p)] == p
