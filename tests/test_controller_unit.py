"""Controller decisions driven through its own methods, with the messages recorded instead of sent.

The executor learns its holder only once the holder has confirmed the reservation.

Sent together (RESERVE to the holder, HOLDER to the executor), a fast executor's first burst of pages
reached the holder before the RESERVE, which the holder's engine thread reads between two steps: on
an H200 (2026-12-03) the holders refused most pages as unreserved and restores found 50 of 1,208
pages.

A restarting worker gets its draft (mechanism 3) only where its GPU is its own.
"""

from __future__ import annotations

import pytest

from lumen.engine import SamplingParams
from lumen.policy.states import WorkerState
from lumen.runtime.config import ClusterConfig
from lumen.runtime.controller import Controller, RequestState
from lumen.runtime.launcher import Launcher


class _NoLauncher(Launcher):
    async def start(self, spec):  # never called: no worker is spawned here
        raise AssertionError

    async def kill(self, worker_id, epoch):
        raise AssertionError

    def handles(self):
        return []

    async def shutdown(self):
        pass


def _serving_controller(workers: int = 3, **cfg) -> Controller:
    """A lumen controller whose workers all serve, with every message it sends recorded in c.sent."""
    cfg = ClusterConfig(model="preset:tiny", served_model_name="t", num_workers=workers, policy="lumen",
                        kv_bytes_per_token=1024, ckpt_budget_bytes=1 << 30, **cfg)
    c = Controller(cfg, _NoLauncher(), bytes(32))
    for w in c.workers.values():
        w.state, w.alive, w.fenced, w.epoch, w.kv_addr = WorkerState.SERVING, True, False, 1, f"kv{w.id}"
    c.sent = []
    c._send = lambda w, t, body, frames=(): c.sent.append((w.id, t, dict(body))) or True
    return c


@pytest.fixture
def controller():
    c = _serving_controller()
    yield c
    c.ctx.term()


def _running(c: Controller, rid: str, executor: int) -> RequestState:
    r = RequestState(rid, list(range(40)), SamplingParams(max_tokens=24), arrival=0.0)
    r.executor, r.exec_epoch, r.started, r.first_token_at, r.needs_placement = executor, 1, True, 0.0, False
    c.requests[rid] = r
    return r


def test_the_executor_learns_its_holder_only_after_the_holder_confirms(controller):
    c = controller
    r = _running(c, "a", 0)
    c._place_checkpoint(r, c.workers[0])
    assert [(w, t) for w, t, _ in c.sent] == [(r.holder, "RESERVE")]  # no HOLDER yet
    gen = c.sent[0][2]["gen"]
    c._on_reserved(c.workers[r.holder], "a", gen, ok=True)
    assert c.sent[-1] == (0, "HOLDER", {"req": "a", "holders": [[r.holder, f"kv{r.holder}"]]})


def test_a_refused_reservation_leaves_the_request_unprotected_and_frees_the_bookkeeping(controller):
    c = controller
    r = _running(c, "a", 0)
    c._place_checkpoint(r, c.workers[0])
    h = r.holder
    assert c.workers[h].ckpt_reserved == r.copies[0].reservation > 0
    c._on_reserved(c.workers[h], "a", c.sent[0][2]["gen"], ok=False)
    assert r.holder is None and not r.copies and c.workers[h].ckpt_reserved == 0 and c.unprotected == 1
    assert all(t != "HOLDER" for _, t, _ in c.sent)


def test_an_answer_to_a_superseded_reservation_starts_no_stream(controller):
    c = controller
    r = _running(c, "a", 0)
    c._place_checkpoint(r, c.workers[0])
    first = c.sent[0][2]["gen"]
    c._place_checkpoint(r, c.workers[0])  # placed again (e.g. after a move): a new generation
    second = [b for _, t, b in c.sent if t == "RESERVE"][-1]["gen"]
    assert second != first
    c._on_reserved(c.workers[r.holder], "a", first, ok=True)
    assert all(t != "HOLDER" for _, t, _ in c.sent)
    # nor a confirmation from another incarnation of the holder, nor for a finished request
    c.workers[r.holder].epoch += 1
    c._on_reserved(c.workers[r.holder], "a", second, ok=True)
    c.workers[r.holder].epoch -= 1
    r.done = True
    c._on_reserved(c.workers[r.holder], "a", second, ok=True)
    assert all(t != "HOLDER" for _, t, _ in c.sent)


def test_when_a_holder_dies_its_executors_stop_streaming_at_once_and_restart_after_the_new_confirmation(controller):
    c = controller
    r = _running(c, "a", 0)
    c._place_checkpoint(r, c.workers[0])
    c._on_reserved(c.workers[r.holder], "a", c.sent[0][2]["gen"], ok=True)
    dead = r.holder
    c.sent.clear()
    c._recover_from(c.workers[dead])
    assert c.sent[0] == (0, "HOLDER", {"req": "a", "holders": []})
    new = r.holder
    assert new not in (None, dead, 0) and [t for _, t, _ in c.sent[1:]] == ["RESERVE"]
    c._on_reserved(c.workers[new], "a", c.sent[1][2]["gen"], ok=True)
    assert c.sent[-1] == (0, "HOLDER", {"req": "a", "holders": [[new, f"kv{new}"]]})


def _k2(n: int = 4, domains=None) -> Controller:
    return _serving_controller(n, ckpt_replicas=2, domains=domains)


@pytest.fixture
def k2():
    c = _k2()
    yield c
    c.ctx.term()


def _protected(c: Controller, generated: int = 0) -> tuple[RequestState, int, int]:
    """Request "a" running on worker 0 with both copies confirmed: (request, first holder, second)."""
    r = _running(c, "a", 0)
    r.generated = list(range(generated))
    c._place_checkpoint(r, c.workers[0])
    _confirm_all(c, r)
    c.sent.clear()
    return r, r.copies[0].holder, r.copies[1].holder


def _confirm_all(c: Controller, r: RequestState) -> None:
    for w, t, body in list(c.sent):
        if t == "RESERVE" and body["req"] == r.id:
            c._on_reserved(c.workers[w], r.id, body["gen"], ok=True)


def test_two_replicas_reserve_on_two_holders_and_the_executor_streams_to_each_once_confirmed():
    c = _k2()
    try:
        r = _running(c, "a", 0)
        c._place_checkpoint(r, c.workers[0])
        reserves = [(w, b["bytes"]) for w, t, b in c.sent if t == "RESERVE"]
        assert len(reserves) == 2 and len({w for w, _ in reserves}) == 2 and 0 not in {w for w, _ in reserves}
        s = reserves[0][1]
        assert all(c.workers[w].ckpt_reserved == s for w, _ in reserves)  # each copy counts on its holder
        first, second = (w for w, _ in reserves)
        gens = {w: b["gen"] for w, t, b in c.sent if t == "RESERVE"}
        c._on_reserved(c.workers[second], "a", gens[second], ok=True)  # answers may come in any order
        assert c.sent[-1] == (0, "HOLDER", {"req": "a", "holders": [[second, f"kv{second}"]]})
        c._on_reserved(c.workers[first], "a", gens[first], ok=True)
        # the first copy stays first: the executor streams its pages ahead of the second's
        assert c.sent[-1] == (0, "HOLDER", {"req": "a", "holders": [[first, f"kv{first}"], [second, f"kv{second}"]]})
        c.sent.clear()
        c._on_output(c.workers[0], _out("a", finish="stop"))
        assert sorted(w for w, t, _ in c.sent if t == "RELEASE") == sorted([first, second])
        assert all(w.ckpt_reserved == 0 for w in c.workers.values())
    finally:
        c.ctx.term()


def test_a_dead_holder_loses_only_its_copy_and_the_request_gets_a_new_second_copy(k2):
    c = k2
    r, first, second = _protected(c)
    c.workers[first].state = WorkerState.DOWN
    c._recover_from(c.workers[first])
    assert c.sent[0] == (0, "HOLDER", {"req": "a", "holders": [[second, f"kv{second}"]]})
    new = [w for w, t, _ in c.sent if t == "RESERVE"]
    assert len(new) == 1 and new[0] not in (0, first, second)
    assert [k.holder for k in r.copies] == [second, new[0]]


def test_an_executor_that_dies_with_its_first_holder_is_restored_from_the_second_copy(k2):
    c = k2
    r, first, second = _protected(c)
    r.copies[0].valid_pages, r.copies[1].valid_pages = 2, 2
    for dead in (first, 0):  # the first holder is seen dead, then the executor
        c.workers[dead].state, c.workers[dead].alive = WorkerState.DOWN, False
    c._recover_from(c.workers[first])
    c._recover_from(c.workers[0])
    adds = [(w, b) for w, t, b in c.sent if t == "ADD"]
    assert adds == [(second, adds[0][1])] and adds[0][1]["restore_pages"] > 0
    assert r.executor == second and not any(k.holder == second for k in r.copies)


def test_the_restore_comes_from_the_copy_with_the_longest_valid_prefix_and_falls_back_on_the_next(k2):
    c = k2
    r, first, second = _protected(c, generated=30)
    r.copies[0].valid_pages, r.copies[1].valid_pages = 1, 3
    c.workers[0].state, c.workers[0].alive = WorkerState.DOWN, False
    c._recover_from(c.workers[0])
    assert [w for w, t, _ in c.sent if t == "ADD"] == [second]
    # the restoring holder dies before the request ran there: the other copy is still kept
    assert [k.holder for k in r.copies] == [first]
    c.workers[second].state, c.workers[second].alive = WorkerState.DOWN, False
    c.sent.clear()
    c._recover_from(c.workers[second])
    adds = [(w, b["restore_pages"]) for w, t, b in c.sent if t == "ADD"]
    assert adds and adds[0][0] == first and adds[0][1] > 0


def test_copies_avoid_the_executors_failure_domain_and_each_other():
    c = _k2(n=6, domains=["a", "a", "b", "b", "c", "c"])
    try:
        r = _running(c, "x", 0)
        c._place_checkpoint(r, c.workers[0])
        holders = [k.holder for k in r.copies]
        doms = [c.cfg.domains[h] for h in holders]
        assert len(holders) == 2 and "a" not in doms and len(set(doms)) == 2
        assert {w["domain"] for w in c.cluster_json()["workers"]} == {"a", "b", "c"}
        req = c.cluster_json()["requests"][0]
        assert [h["worker"] for h in req["holders"]] == holders and c.cluster_json()["ckpt_replicas"] == 2
    finally:
        c.ctx.term()


def _out(rid: str, n: int = 0, finish: str = ""):
    from lumen.runtime.transport import Message, ints_frame

    return Message("OUT", "w0", 1, 0, {"items": [[rid, n, finish]]}, [memoryview(ints_frame(list(range(n))))])


class _Router:
    address = "tcp://127.0.0.1:1"


@pytest.mark.parametrize("devices, fixed_share, draft", [
    (["cuda:0", "cuda:1", "cuda:2"], False, True), (["cuda:0"], False, False), (["cuda"], False, False),
    (["cpu"], False, True),
    (["cuda:0"], True, True),  # one GPU, but each worker owns a fixed share of its SMs (MPS)
])
def test_a_restarting_worker_gets_its_draft_only_on_a_gpu_of_its_own(devices, fixed_share, draft):
    cfg = ClusterConfig(model="preset:tiny", served_model_name="t", num_workers=3, policy="lumen",
                        devices=devices, draft_model="d", gpu_share_fixed=fixed_share)
    c = Controller(cfg, _NoLauncher(), bytes(32))
    try:
        c.router = _Router()
        for w in c.workers.values():
            w.state, w.alive, w.fenced, w.epoch = WorkerState.SERVING, True, False, 1
        w = c.workers[1]
        w.state, w.epoch = WorkerState.DOWN, 2  # as _spawn leaves it for a restart
        assert ("--draft-model" in c._worker_argv(w)) == draft
        w.epoch = 1  # a first start never drafts; its argv carries the draft either way
        assert "--draft-model" in c._worker_argv(w)
    finally:
        c.ctx.term()


@pytest.mark.parametrize("draft_first, pays, flag", [
    ("always", False, "1"), ("never", True, "0"), ("auto", True, "1"), ("auto", False, "0"),
])
def test_draft_first_is_forced_by_always_and_never_and_priced_under_auto(draft_first, pays, flag):
    cfg = ClusterConfig(model="preset:tiny", served_model_name="t", num_workers=2, policy="lumen",
                        devices=["cpu"], draft_model="d", draft_first=draft_first)
    c = Controller(cfg, _NoLauncher(), bytes(32))
    try:
        c.router = _Router()
        priced = []
        c._draft_first_pays = lambda w: priced.append(w.id) or pays
        for w in c.workers.values():
            w.state, w.alive, w.fenced, w.epoch = WorkerState.SERVING, True, False, 1
        w = c.workers[1]
        w.state, w.epoch = WorkerState.DOWN, 2
        argv = c._worker_argv(w)
        assert argv[argv.index("--draft-first") + 1] == flag
        assert priced == ([1] if draft_first == "auto" else [])  # the pricing is asked only under auto
    finally:
        c.ctx.term()


def test_a_controller_refuses_an_unknown_draft_first():
    cfg = ClusterConfig(model="preset:tiny", served_model_name="t", policy="lumen", draft_first="sometimes")
    with pytest.raises(ValueError, match="draft_first must be one of auto, always, never"):
        Controller(cfg, _NoLauncher(), bytes(32))


def test_an_old_incarnation_is_fenced_even_when_the_transport_drops_its_messages():
    """Once worker 1's new incarnation (epoch 2) has spoken, the transport's replay guard drops the old
    one's (epoch 1) messages before the controller sees them; the controller must still tell that
    old incarnation to exit (a SIGSTOPped worker that resumes after its replacement started)."""
    import asyncio

    from lumen.runtime.transport import Codec

    killed = []

    class _Killer(_NoLauncher):
        async def kill(self, worker_id, epoch=None, sig=None):
            killed.append((worker_id, epoch))

    secret = bytes(range(32))
    cfg = ClusterConfig(model="preset:tiny", served_model_name="t", num_workers=2, policy="stop-restart")

    async def scenario():
        c = Controller(cfg, _Killer(), secret)
        try:
            c.workers[1].epoch = 2
            new, old = Codec(secret, "w1.hb", 2), Codec(secret, "w1.hb", 1)
            assert c.codec.decode(new.encode("HB", {"stats": {}})) is not None
            assert c.codec.decode(old.encode("HB", {"stats": {}})) is None  # dropped: older epoch
            await asyncio.sleep(0)  # the kill task runs
            assert killed == [(1, 1)] and c.codec.stats["stale_epoch"] == 1  # counted once, as a drop
        finally:
            c.ctx.term()

    asyncio.run(scenario())


def test_an_mps_active_thread_percentage_below_100_is_a_fixed_share():
    from lumen.runtime.config import mps_share_fixed

    assert mps_share_fixed({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"})
    assert not mps_share_fixed({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100"})
    assert not mps_share_fixed({})
    assert not mps_share_fixed({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "lots"})
    # shares that add up to more than the GPU are no partition
    assert mps_share_fixed({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25"}, workers_per_gpu=4)
    assert not mps_share_fixed({"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}, workers_per_gpu=4)


def test_serve_checks_the_copy_and_domain_flags():
    import argparse

    from lumen.runtime.server import _domains, add_serve_arguments, build_config

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    for argv, msg in ((["--ckpt-replicas", "0"], "--ckpt-replicas"),
                      (["--ckpt-replicas", "x"], "--ckpt-replicas"),
                      (["--workers", "2", "--ckpt-replicas", "2"], "below the number of workers"),
                      (["--workers", "12", "--ckpt-replicas", "auto", "--ckpt-replicas-max", "9"], "between 1 and 8"),
                      (["--ckpt-worker-mtbf", "soon"], "--ckpt-worker-mtbf"),
                      (["--ckpt-domain-mtbf", "0s"], "MTBF must be > 0"),
                      (["--workers", "4", "--domains", "5"], "--domains N"),
                      (["--workers", "4", "--domains", "a,b"], "one non-empty label per worker")):
        with pytest.raises(ValueError, match=msg):
            build_config(p.parse_args(argv))
    assert _domains("2", 4) == ["d0", "d0", "d1", "d1"] and _domains("3", 4) == ["d0", "d0", "d1", "d2"]
    assert _domains("r0,r0,r1,r1", 4) == ["r0", "r0", "r1", "r1"] and _domains(None, 4) is None
