"""KV page export through the fixed staging ring (lumen.engine.export_ring), the checkpoint store's
up-front allocation, and the restore path's hold on the store's slots.

On CPU the ring is ordinary memory but the bookkeeping is the GPU's: an export takes only the pages
that fit in free slots, the rest stay pending in order, and a slot is reused only once nothing --
no page, no frame handed to ZeroMQ -- references it.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from cluster_util import wait_until
from model_util import peaked_tiny_model

from lumen.engine import Engine, EngineConfig, KVPage, SamplingParams
from lumen.engine.kv_pages import page_tags
from lumen.model import PRESETS
from lumen.runtime import kv_stream
from lumen.runtime.ckpt_store import CheckpointStore
from lumen.runtime.kv_stream import PageSender
from lumen.runtime.transport import SECRET_ENV, as_buffer, secret_to_hex
from lumen.runtime.worker import Worker, parse_args

torch.set_num_threads(1)
CFG = PRESETS["tiny"]
BS = 4
SP = SamplingParams(max_tokens=40, ignore_eos=True)


def engine(**kw) -> Engine:
    kw.setdefault("num_blocks", 128)
    kw.setdefault("chunk_tokens", 64)
    return Engine(peaked_tiny_model(), EngineConfig(deterministic=True, block_size=BS, **kw))


def small_ring(**kw) -> Engine:
    return engine(export_slots=2, export_slot_pages=4, **kw)  # 8 pages at a time


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, CFG.vocab_size) for _ in range(n)]


def key(p: KVPage) -> tuple:
    return p.req_id, p.index, p.end_pos, p.tag, p.data.contiguous().view(torch.uint8).numpy().tobytes()


def ring_range(eng: Engine) -> tuple[int, int]:
    r = eng.runner.ring.pages
    return r.data_ptr(), r.data_ptr() + r.numel() * r.element_size()


def test_a_burst_larger_than_the_ring_goes_out_over_several_turns_in_order_complete_and_once():
    """A 61-token prefill fills 15 pages; a ring of 8 pages, whose pages stay in flight for one turn
    (as with the sender), exports them over several turns. Read when released (after later exports
    reused the ring), the pages equal those of an engine with a large ring: same requests, indices,
    tags, bytes, in order, none twice."""
    big, small = engine(), small_ring()
    prompts = {"a": prompt(1, 61), "b": prompt(2, 23)}
    for e in (big, small):
        for rid, p in prompts.items():
            e.add_request(rid, p, SP)
    want: list[tuple] = []
    got: list[tuple] = []
    inflight: list[KVPage] = []
    sizes = []

    def turn(step: bool):
        nonlocal inflight
        if step:
            big.step()
            small.step()
            want.extend(key(p) for p in big.export_pages(big.pages_due()))
        pages = small.export_pages(small.pages_due())
        sizes.append(len(pages))
        got.extend(key(p) for p in inflight)  # read only now: their slots must not have been reused
        inflight = pages

    for _ in range(3):
        turn(step=True)
    assert small._pages_due  # pages left over, reported again without any step filling a page
    while small._pages_due or inflight:  # drain what is pending, then compare
        turn(step=False)
    assert max(sizes) <= 8 and sum(sizes) == len(got) > 16
    assert small.stats()["export_deferred"] > 0 and big.stats()["export_deferred"] == 0
    assert len(set(got)) == len(got) == len(want)
    for rid in prompts:  # per request: the same pages in page order, tagged by the real tokens
        mine = [k for k in got if k[0] == rid]
        assert mine == [k for k in want if k[0] == rid]
        assert [k[1] for k in mine] == list(range(len(mine)))
        assert [k[3] for k in mine] == page_tags(small._seqs[rid].token_ids, BS)[:len(mine)]
    ring = small.runner.ring
    assert ring.slots_taken > ring.num_slots and ring.free_slots() == ring.num_slots  # reused, none leaked


def test_exports_allocate_nothing_and_live_in_the_ring(monkeypatch):
    eng = small_ring()
    eng.add_request("a", prompt(3, 61), SP)
    eng.step()
    lo, hi = ring_range(eng)
    calls = []
    for name in ("empty", "zeros", "tensor", "stack", "empty_like"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    exported = 0
    for _ in range(4):
        pages = eng.export_pages(["a"])
        exported += len(pages)
        assert all(lo <= p.data.data_ptr() < hi for p in pages)
        del pages  # sent: the slots come back
    monkeypatch.undo()
    assert calls == [] and exported == 15
    assert eng.runner.ring.pages.data_ptr() == lo  # the same memory throughout


@pytest.mark.parametrize("end", ["abort", "finish"])
def test_a_request_that_ends_with_pages_pending_leaks_no_slot(end):
    eng = small_ring(chunk_tokens=128)  # both prefills in one step
    eng.add_request("a", prompt(4, 61), SamplingParams(max_tokens=2 if end == "finish" else 40, ignore_eos=True))
    eng.add_request("b", prompt(5, 33), SP)
    eng.step()
    held = eng.export_pages(eng.pages_due())  # a's first 8 pages; the rest of a and all of b pending
    assert [(p.req_id, p.index) for p in held] == [("a", i) for i in range(8)]
    assert eng.runner.export_capacity() == 0
    if end == "abort":
        eng.abort("a")
    else:
        while "a" in eng._seqs:
            eng.step()
    assert "a" not in eng.pages_due() and eng.export_pages(["a"]) == []
    del held
    ring = eng.runner.ring
    assert ring.free_slots() == ring.num_slots and eng.runner.export_capacity() == 8
    b = eng.export_pages(["b"])
    assert [p.index for p in b] == list(range(8)) and all(p.req_id == "b" for p in b)


class _HoldingPool:
    """Stands in for the sender's PushPool: keeps every frame it is given, as ZeroMQ does with a
    zero-copy frame until the message has left."""

    def __init__(self, ctx, codec):
        self.frames: list = []
        self.num_peers = self.forgotten = 0
        _HoldingPool.last = self

    def wait_writable(self, addr, timeout_ms):
        return True

    def send(self, addr, type_, body, frames):
        self.frames.append((body["req"], body["index"], [as_buffer(f) for f in frames]))
        return True

    def forget(self, addr):
        pass

    def close(self):
        pass


def test_a_ring_slot_stays_taken_while_zeromq_holds_the_frame(monkeypatch):
    """The sender ties a page's ring lease to the buffer it gives ZeroMQ (copy=False): after the
    page objects are gone the slots stay taken until the frames are released, and what the frames
    hold is what was exported."""
    monkeypatch.setattr(kv_stream, "PushPool", _HoldingPool)
    eng = small_ring()
    eng.add_request("a", prompt(6, 61), SP)
    eng.step()
    tx = PageSender(None, bytes(32), 0, 1)
    tx.start()
    try:
        pages = eng.export_pages(["a"])
        want = {(p.req_id, p.index): key(p)[4] for p in pages}
        for p in pages:
            tx.submit("h", p)
        del pages, p
        # one more page, not from the ring: once it is sent, the sender has let go of the others
        tx.submit("h", KVPage("x", 0, 4, bytes(16), torch.zeros(4, dtype=torch.uint8)))
        wait_until(lambda: tx.sent == 9, 10, "pages sent")
        ring = eng.runner.ring
        assert ring.free_slots() == 0 and eng.export_pages(["a"]) == []  # nothing fits: pending
        pool = _HoldingPool.last
        assert {(r, i): bytes(f[0]) for r, i, f in pool.frames if r == "a"} == want
        pool.frames.clear()  # ZeroMQ done with them
        assert ring.free_slots() == ring.num_slots
        assert [p.index for p in eng.export_pages(["a"])] == list(range(8, 15))
    finally:
        tx.stop()
        tx.join(5)


# ------------------------------------------------------------------------------ checkpoint store

P = 64


def test_the_store_allocates_its_whole_budget_up_front_and_never_grows_after(monkeypatch):
    s = CheckpointStore(40 * P)
    s.CHUNK_BYTES = 16 * P
    assert s.allocate(P) == 41 * P  # budget // page + 1 spare
    assert [c.shape[0] for c in s._chunks] == [16, 16, 9]
    assert s.allocate() == 41 * P  # nothing more to add
    with pytest.raises(ValueError):
        s.allocate(2 * P)
    allocs = []
    real = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocs.append(a) or real(*a, **k))
    for r in range(4):
        assert s.reserve(f"r{r}", 10 * P, 1)
        for i in range(10):
            assert s.put_page(f"r{r}", i, i + 1, bytes([i, r]) * 8, bytes([i]) * P, P)
    assert s.put_page("r0", 3, 4, bytes([3, 0]) * 8, bytes([7]) * P, P)  # a re-sent page: the spare slot
    monkeypatch.undo()
    assert allocs == [] and s.stats()["allocated_bytes"] == 41 * P and s.stats()["pages"] == 40
    assert bytes(s.get_pages("r0", 4)[3][2].numpy()) == bytes([7]) * P


def test_pages_stored_while_the_store_allocates_are_kept():
    s = CheckpointStore(60 * P)
    s.CHUNK_BYTES = P  # one slot per chunk: many allocation steps to interleave with
    assert s.reserve("r", 60 * P, 1)
    t = threading.Thread(target=s.allocate, args=(P,))
    t.start()
    for i in range(60):
        assert s.put_page("r", i, i + 1, bytes([i]) * 16, bytes([i]) * P, P)
    t.join()
    assert len(s._chunks) == 61 and s.valid_prefix("r", [bytes([i]) * 16 for i in range(60)]) == 60
    assert all(bytes(d.numpy()) == bytes([i]) * P for i, _, d in s.get_pages("r", 60))


# ------------------------------------------------------------------------------ restore


def test_the_worker_releases_restored_pages_only_once_the_engine_has_copied_them(monkeypatch):
    """Restored pages are views of the store's slots; the engine copies them when it admits the
    request, a step later: until then the store must keep them (a freed slot takes the next page
    that arrives)."""
    monkeypatch.setenv(SECRET_ENV, secret_to_hex(bytes(range(32))))
    w = Worker(parse_args(["--worker-id", "0", "--epoch", "1", "--controller", "127.0.0.1:1", "--model", "unused",
                           "--block-size", str(BS), "--deterministic"]))
    try:
        src = engine()
        ctx = prompt(7, 30)
        src.add_request("r", ctx, SamplingParams(max_tokens=8, ignore_eos=True))
        gen = [t for o in src.step() for t in o.token_ids]
        pages = src.export_pages(["r"])
        while src.has_work():
            gen += [t for o in src.step() for t in o.token_ids]
        w.engine = engine()
        mc = w.engine.model_config
        w.page_shape = (mc.num_layers, 2, BS, mc.num_kv_heads, mc.head_dim)
        nbytes = pages[0].data.numel() * pages[0].data.element_size()
        assert w.store.reserve("r", len(pages) * nbytes, 1)
        for p in pages:
            assert w.store.put_page("r", p.index, p.end_pos, p.tag, p.data, nbytes)
        tags = page_tags(ctx + gen[:1], BS)
        body = {"req": "r", "n_prompt": len(ctx), "restore_pages": len(tags),
                "params": dict(max_tokens=8, temperature=0.0, top_p=1.0, top_k=-1, seed=None, ignore_eos=True)}
        w._add(body, ctx + gen[:1], tags)
        assert w.engine.restore_pending("r") and w.store.has("r") and w._restoring == {"r"}
        out = []
        while w.engine.has_work():
            out += [t for o in w.engine.step() for t in o.token_ids]
            w._release_restored()
            assert not w.store.has("r")  # released after the step that copied the pages
        assert w.engine.stats()["restored_pages"] == len(pages) == 7 and not w._restoring
        assert gen[:1] + out == gen  # same tokens as without the failure
    finally:
        w.close()
