"""Checkpoint store: reservations, atomic page validity, tag prefixes, budget invariant."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from lumen.runtime.ckpt_store import REJECT_REASONS, CheckpointStore
from lumen.runtime.transport import Codec, FaultHook, PullEndpoint, PushPool, Schema

P = 64  # page bytes in these tests


def page(i: int, n: int = P) -> bytes:
    return bytes((i * 7 + k) % 256 for k in range(n))


def tag(i: int, salt: int = 0) -> bytes:
    return bytes([i % 256, salt % 256]) * 8


def rejected(s: CheckpointStore) -> dict[str, int]:
    return {k: v for k, v in s.stats()["rejected"].items() if v}


def test_reserve_budget_and_release():
    s = CheckpointStore(10 * P)
    assert s.reserve("a", 6 * P, owner_epoch=1)
    assert not s.reserve("b", 5 * P, owner_epoch=1)  # 11 pages > budget
    assert s.stats()["reserve_refused"] == 1 and not s.has("b")
    assert s.reserve("b", 4 * P, owner_epoch=1)
    assert s.reserved_bytes == 10 * P
    assert s.release("a") == 6 * P and s.release("a") == 0
    assert s.reserved_bytes == 4 * P and s.requests() == ["b"]
    with pytest.raises(ValueError):
        s.reserve("c", -1, 1)


def test_put_get_round_trip_from_every_buffer_kind():
    s = CheckpointStore(100 * P)
    assert s.reserve("r", 8 * P, owner_epoch=2)
    kinds = [
        page(0),
        memoryview(page(1)),
        np.frombuffer(page(2), dtype=np.uint8),
        torch.frombuffer(bytearray(page(3)), dtype=torch.uint8),
        torch.frombuffer(bytearray(page(4)), dtype=torch.float32),  # any dtype: bytes count
        bytearray(page(5)),
    ]
    for i, data in enumerate(kinds):
        assert s.put_page("r", i, (i + 1) * 16, tag(i), data, P), i
    got = s.get_pages("r", 10)
    assert [g[0] for g in got] == list(range(6)) and [g[1] for g in got] == [16 * (i + 1) for i in range(6)]
    for i, (_, _, data) in enumerate(got):
        assert data.dtype == torch.uint8 and bytes(data.numpy()) == page(i)
    st_ = s.stats()
    assert (st_["pages"], st_["stored_bytes"], st_["requests"], st_["page_nbytes"]) == (6, 6 * P, 1, P)
    assert [g[0] for g in s.get_pages("r", 2)] == [0, 1]
    assert s.get_pages("missing", 3) == []


def test_zmq_frame_is_accepted_directly():
    ctx = zmq.Context()
    try:
        a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        b.send(page(9))
        frame = a.recv(copy=False)
        s = CheckpointStore(4 * P)
        s.reserve("r", P, 0)
        assert s.put_page("r", 0, 16, tag(0), frame, P)
        assert bytes(s.get_pages("r", 1)[0][2].numpy()) == page(9)
        a.close(0)
        b.close(0)
    finally:
        ctx.destroy(0)


def test_rejections_are_counted_and_change_nothing():
    s = CheckpointStore(100 * P)
    assert s.reserve("r", 4 * P, owner_epoch=3)
    assert s.put_page("r", 0, 16, tag(0), page(0), P)
    before = s.stats()
    cases = [
        (("nope", 0, 16, tag(0), page(0), P), {}, "unreserved"),
        (("r", 1, 32, tag(1), page(1)[:-1], P), {}, "size"),  # truncated in transit
        (("r", 1, 32, tag(1), page(1) + b"x", P), {}, "size"),
        (("r", 1, 32, tag(1), page(1, 32), 32), {}, "size"),  # page size is fixed
        (("r", 4, 80, tag(4), page(4), P), {}, "out_of_range"),  # beyond the reservation
        (("r", -1, 16, tag(0), page(0), P), {}, "out_of_range"),
        (("r", 1, 32, b"", page(1), P), {}, "bad_tag"),
        (("r", 1, 32, b"x" * 65, page(1), P), {}, "bad_tag"),
        (("r", 1, 32, "str-tag", page(1), P), {}, "bad_tag"),
        (("r", 1, 0, tag(1), page(1), P), {}, "bad_end"),
        (("r", 1, 32, tag(1), page(1), P), {"owner_epoch": 2}, "stale_owner"),
        (("r", 1, 32, tag(1), object(), P), {}, "size"),
    ]
    for args, kw, reason in cases:
        n = s.stats()["rejected"][reason]
        assert not s.put_page(*args, **kw), reason
        assert s.stats()["rejected"][reason] == n + 1, reason
    after = s.stats()
    for k in ("stored_bytes", "pages", "reserved_bytes", "requests"):
        assert after[k] == before[k]
    assert bytes(s.get_pages("r", 1)[0][2].numpy()) == page(0)
    assert set(after["rejected"]) == set(REJECT_REASONS)


def test_failed_replacement_keeps_old_page_and_good_replacement_swaps():
    s = CheckpointStore(2 * P)  # every slot the budget allows is in use
    s.reserve("r", 2 * P, 1)
    assert s.put_page("r", 0, 16, tag(0), page(0), P)
    assert s.put_page("r", 1, 32, tag(1), page(1), P)
    assert not s.put_page("r", 1, 32, tag(1, 9), page(7)[:10], P)
    assert s.valid_prefix("r", [tag(0), tag(1)]) == 2
    assert bytes(s.get_pages("r", 2)[1][2].numpy()) == page(1)
    assert s.put_page("r", 1, 32, tag(1, 9), page(7), P)  # complete re-send replaces it
    assert s.valid_prefix("r", [tag(0), tag(1)]) == 1
    assert s.valid_prefix("r", [tag(0), tag(1, 9)]) == 2
    assert bytes(s.get_pages("r", 2)[1][2].numpy()) == page(7)
    assert s.stored_bytes == 2 * P and s.stats()["allocated_bytes"] <= 3 * P


def test_valid_prefix_is_contiguous_from_zero():
    s = CheckpointStore(100 * P)
    s.reserve("r", 10 * P, 1)
    for i in (0, 1, 2, 4, 5):
        s.put_page("r", i, 16 * (i + 1), tag(i), page(i), P)
    tags = [tag(i) for i in range(6)]
    assert s.valid_prefix("r", tags) == 3  # page 3 missing
    assert s.valid_prefix("r", tags[:2]) == 2  # the caller asks only for what it has history for
    assert s.valid_prefix("r", []) == 0
    assert s.valid_prefix("r", [tag(0), tag(1, 5), tag(2)]) == 1  # mismatch stops it
    assert s.valid_prefix("r", [tag(0, 1)] + tags[1:]) == 0
    assert s.valid_prefix("other", tags) == 0
    assert s.contiguous_pages("r") == 3 and s.contiguous_pages("other") == 0
    s.put_page("r", 3, 64, tag(3), page(3), P)
    assert s.valid_prefix("r", tags) == 6
    # end positions must increase along the prefix
    s.put_page("r", 2, 16, tag(2), page(2), P)
    assert s.valid_prefix("r", tags) == 2


def test_reserve_again_resizes_or_resets_for_a_new_owner():
    s = CheckpointStore(10 * P)
    s.reserve("r", 4 * P, owner_epoch=1)
    for i in range(3):
        s.put_page("r", i, 16 * (i + 1), tag(i), page(i), P)
    assert not s.reserve("r", 2 * P, owner_epoch=1)  # below what is stored
    assert not s.reserve("r", 11 * P, owner_epoch=1)
    assert s.reserve("r", 6 * P, owner_epoch=1) and s.reserved_bytes == 6 * P
    assert s.valid_prefix("r", [tag(0), tag(1), tag(2)]) == 3
    # the request moved to another executor: a fresh, empty checkpoint from the new owner
    assert s.reserve("r", 5 * P, owner_epoch=2)
    assert s.stored_bytes == 0 and s.reserved_bytes == 5 * P and s.valid_prefix("r", [tag(0)]) == 0
    assert not s.put_page("r", 0, 16, tag(0), page(0), P, owner_epoch=1)
    assert s.put_page("r", 0, 16, tag(0), page(0), P, owner_epoch=2)
    # a new owner is refused if its reservation does not fit; the old state stays
    s.reserve("x", 5 * P, owner_epoch=1)
    assert not s.reserve("r", 6 * P, owner_epoch=3)
    assert s.valid_prefix("r", [tag(0)]) == 1


def test_slot_memory_is_bounded_and_reused():
    s = CheckpointStore(16 * P)
    for round_ in range(5):
        s.reserve(f"r{round_}", 16 * P, 1)
        for i in range(16):
            assert s.put_page(f"r{round_}", i, 16 * (i + 1), tag(i), page(i + round_), P)
        assert not s.reserve("extra", P, 1)
        assert s.release(f"r{round_}") == 16 * P
    assert s.stats()["allocated_bytes"] <= 17 * P
    assert s.stored_bytes == 0 and s.reserved_bytes == 0


def test_chunks_hold_whole_pages_within_a_power_of_two():
    s = CheckpointStore(1 << 30)
    s.CHUNK_BYTES = 1 << 12
    s.reserve("r", 100 * 3000, 1)
    for i in range(5):
        s.put_page("r", i, i + 1, tag(i), bytes(3000), 3000)
    # 4096 // 3000 = 1 page per chunk (a 2-page chunk would round up to 8 KiB if pinned)
    assert all(c.shape == (1, 3000) for c in s._chunks) and len(s._chunks) == 5
    s2 = CheckpointStore(1 << 30)
    s2.reserve("r", 100 * P, 1)
    s2.put_page("r", 0, 1, tag(0), page(0), P)
    assert s2._chunks[0].numel() <= CheckpointStore.CHUNK_BYTES
    assert (s2._chunks[0].numel() & (s2._chunks[0].numel() - 1)) == 0  # 64 divides 64 MiB exactly


def test_concurrent_put_and_release_keep_invariants():
    s = CheckpointStore(40 * P)
    stop = threading.Event()
    errors = []

    def writer(k):
        i = 0
        while not stop.is_set():
            rid = f"w{k}-{i % 5}"
            if s.reserve(rid, 8 * P, k):
                for j in range(8):
                    s.put_page(rid, j, j + 1, tag(j), page(j), P)
            s.release(f"w{k}-{(i + 2) % 5}")
            i += 1

    def checker():
        while not stop.is_set():
            st_ = s.stats()
            if not (st_["stored_bytes"] <= st_["reserved_bytes"] <= st_["budget_bytes"]):
                errors.append(st_)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)] + [threading.Thread(target=checker)]
    for t in threads:
        t.start()
    threading.Event().wait(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert s.stats()["allocated_bytes"] <= 41 * P


def test_corrupted_page_in_transit_never_becomes_valid():
    """Fault hook on the sender (as a worker with LUMEN_FAULT_CORRUPT_PAGES would run it): a
    corrupted page is dropped by the MAC, so the valid prefix stops right before it."""
    secret = b"k" * 32
    schema = Schema().register("PAGE", {"req": (str, 64), "index": int, "end": int, "tag": (bytes, 64)}, frames=1)
    ctx = zmq.Context()
    try:
        rx = Codec(secret, "w1", 1, schema=schema)
        pull = PullEndpoint(ctx, rx)
        pool = PushPool(ctx, Codec(secret, "w0", 1, schema=schema), fault=None)
        store = CheckpointStore(100 * P)
        store.reserve("r", 8 * P, 1)
        for i in range(6):
            pool.fault = FaultHook(1.0, i, "flip") if i == 3 else None
            assert pool.send(pull.address, "PAGE", {"req": "r", "index": i, "end": 16 * (i + 1), "tag": tag(i)},
                             [torch.frombuffer(bytearray(page(i)), dtype=torch.uint8)])
        while (m := pull.recv(timeout_ms=1000)) is not None:
            b = m.body
            store.put_page(b["req"], b["index"], b["end"], b["tag"], m.frames[0], P)
        assert rx.stats["bad_mac"] == 1 and store.stats()["pages"] == 5
        assert store.valid_prefix("r", [tag(i) for i in range(6)]) == 3
        pull.close()
        pool.close()
    finally:
        ctx.destroy(0)


# ----------------------------------------------------------------------------- locking


class _BlockingSlots:
    """Makes the store's copy into a slot wait until the test lets it go, recording whether the store
    lock was free at that moment (the engine thread takes that lock every loop turn)."""

    def __init__(self, store: CheckpointStore):
        self.store, self.real = store, store._slot_np
        self.entered, self.go = threading.Event(), threading.Event()
        self.lock_free: list[bool] = []
        store._slot_np = self

    def __call__(self, slot):
        free = self.store._lock.acquire(blocking=False)
        if free:
            self.store._lock.release()
        self.lock_free.append(free)
        self.entered.set()
        assert self.go.wait(10)
        return self.real(slot)


def _put_in_thread(s: CheckpointStore, *args) -> tuple[threading.Thread, list]:
    result: list = []
    t = threading.Thread(target=lambda: result.append(s.put_page(*args)))
    t.start()
    return t, result


def test_page_copy_does_not_hold_the_store_lock():
    s = CheckpointStore(100 * P)
    s.reserve("r", 4 * P, 1)
    assert s.put_page("r", 0, 16, tag(0), page(0), P)
    gate = _BlockingSlots(s)
    t, result = _put_in_thread(s, "r", 1, 32, tag(1), page(1), P)
    assert gate.entered.wait(10)
    # while the page is being copied, the engine thread's calls go through
    assert s.stats()["pages"] == 1 and s.valid_prefix("r", [tag(0), tag(1)]) == 1
    assert s.reserve("other", P, 1) and s.release("other") == P
    gate.go.set()
    t.join(10)
    assert result == [True] and gate.lock_free == [True]
    assert s.valid_prefix("r", [tag(0), tag(1)]) == 2 and bytes(s.get_pages("r", 2)[1][2].numpy()) == page(1)


def test_release_or_shrink_during_a_copy_rejects_the_page_and_frees_its_slot():
    s = CheckpointStore(8 * P)
    s.reserve("r", 4 * P, 1)
    gate = _BlockingSlots(s)
    t, result = _put_in_thread(s, "r", 0, 16, tag(0), page(0), P)
    assert gate.entered.wait(10)
    assert s.release("r") == 4 * P  # the request finished (or moved) meanwhile
    gate.go.set()
    t.join(10)
    assert result == [False] and rejected(s) == {"unreserved": 1}
    assert s.stats()["pages"] == 0 and s.stored_bytes == 0 and len(s._free) == s._chunks[0].shape[0]

    s.reserve("q", 4 * P, 1)
    gate.entered.clear()
    gate.go.clear()
    t, result = _put_in_thread(s, "q", 3, 64, tag(3), page(3), P)
    assert gate.entered.wait(10)
    assert s.reserve("q", 2 * P, 1)  # same owner, smaller: page 3 no longer fits
    gate.go.set()
    t.join(10)
    assert result == [False] and rejected(s)["out_of_range"] == 1
    assert s.stats()["pages"] == 0 and s.stored_bytes == 0 <= s.reserved_bytes == 2 * P


def test_slot_memory_grows_outside_the_store_lock(monkeypatch):
    s = CheckpointStore(100 * P)
    s.reserve("r", 4 * P, 1)
    real_empty = torch.empty
    lock_free = []

    def empty(*args, **kw):
        free = s._lock.acquire(blocking=False)
        if free:
            s._lock.release()
        lock_free.append(free)
        return real_empty(*args, **kw)

    monkeypatch.setattr(torch, "empty", empty)
    assert s.put_page("r", 0, 16, tag(0), page(0), P)
    monkeypatch.undo()
    assert lock_free == [True] and len(s._chunks) == 1


# ----------------------------------------------------------------------------- property test


class StoreMachine(RuleBasedStateMachine):
    """Random reserve / put / release sequences against a simple model."""

    @initialize(budget_pages=st.integers(0, 12))
    def setup(self, budget_pages):
        self.budget = budget_pages * P + 17  # not a page multiple on purpose
        self.s = CheckpointStore(self.budget)
        self.res: dict[str, tuple[int, int]] = {}  # req -> (reserved, owner)
        self.pages: dict[str, dict[int, tuple[int, bytes, bytes]]] = {}

    reqs = st.sampled_from(["a", "b", "c", "d"])

    @rule(req=reqs, nbytes=st.integers(0, 8 * P), owner=st.integers(0, 2))
    def reserve(self, req, nbytes, owner):
        ok = self.s.reserve(req, nbytes, owner)
        cur = self.res.get(req)
        others = sum(r for k, (r, _) in self.res.items() if k != req)
        if cur is not None and cur[1] == owner:
            expect = others + nbytes <= self.budget and nbytes >= len(self.pages[req]) * P
        else:
            expect = others + nbytes <= self.budget
        assert ok == expect
        if ok:
            if cur is None or cur[1] != owner:
                self.pages[req] = {}
            self.res[req] = (nbytes, owner)

    @rule(req=reqs)
    def release(self, req):
        freed = self.s.release(req)
        assert freed == (self.res[req][0] if req in self.res else 0)
        self.res.pop(req, None)
        self.pages.pop(req, None)

    @rule(req=reqs, index=st.integers(-1, 9), size=st.sampled_from([P, P, P, P - 1, P + 1, 0]),
          salt=st.integers(0, 3), owner=st.none() | st.integers(0, 2))
    def put(self, req, index, size, salt, owner):
        data = page(index * 5 + salt, size)
        t = tag(index, salt)
        ok = self.s.put_page(req, index, index + 1 if index >= 0 else 1, t, data, P, owner_epoch=owner)
        expect = (
            req in self.res
            and (owner is None or owner == self.res[req][1])
            and size == P
            and 0 <= index
            and (index + 1) * P <= self.res[req][0]
        )
        assert ok == expect
        if ok:
            self.pages[req][index] = (index + 1, t, data)

    @precondition(lambda self: self.res)
    @rule(data=st.data())
    def check_prefix(self, data):
        req = data.draw(st.sampled_from(sorted(self.res)))
        salts = data.draw(st.lists(st.integers(0, 3), max_size=9))
        tags = [tag(i, s) for i, s in enumerate(salts)]
        n = 0
        while n < len(tags) and n in self.pages[req] and self.pages[req][n][1] == tags[n]:
            n += 1
        assert self.s.valid_prefix(req, tags) == n
        got = self.s.get_pages(req, n)
        assert [(i, e, bytes(d.numpy())) for i, e, d in got] == [
            (i, self.pages[req][i][0], self.pages[req][i][2]) for i in range(n)
        ]

    @invariant()
    def budget_holds(self):
        st_ = self.s.stats()
        assert st_["stored_bytes"] <= st_["reserved_bytes"] <= self.budget
        assert st_["reserved_bytes"] == sum(r for r, _ in self.res.values())
        assert st_["stored_bytes"] == P * sum(len(p) for p in self.pages.values())
        assert st_["pages"] == sum(len(p) for p in self.pages.values())
        assert st_["requests"] == len(self.res)
        for req, (r, _) in self.res.items():
            assert len(self.pages[req]) * P <= r
        # physical memory: the budget's whole pages plus one spare slot
        assert st_["allocated_bytes"] <= (self.budget // P + 1) * P


StoreMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
TestStoreProperties = StoreMachine.TestCase
