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


@pytest.fixture
def controller():
    cfg = ClusterConfig(model="preset:tiny", served_model_name="t", num_workers=3, policy="lumen",
                        kv_bytes_per_token=1024, ckpt_budget_bytes=1 << 30)
    c = Controller(cfg, _NoLauncher(), bytes(32))
    for w in c.workers.values():
        w.state, w.alive, w.fenced, w.epoch, w.kv_addr = WorkerState.SERVING, True, False, 1, f"kv{w.id}"
    c.sent = []
    c._send = lambda w, t, body, frames=(): c.sent.append((w.id, t, dict(body))) or True
    yield c
    c.ctx.term()


def _running(c: Controller, rid: str, executor: int) -> RequestState:
    r = RequestState(rid, list(range(40)), SamplingParams(max_tokens=24), arrival=0.0)
    r.executor, r.exec_epoch, r.started, r.first_token_at = executor, 1, True, 0.0
    c.requests[rid] = r
    return r


def test_the_executor_learns_its_holder_only_after_the_holder_confirms(controller):
    c = controller
    r = _running(c, "a", 0)
    c._place_checkpoint(r, c.workers[0])
    assert [(w, t) for w, t, _ in c.sent] == [(r.holder, "RESERVE")]  # no HOLDER yet
    gen = c.sent[0][2]["gen"]
    c._on_reserved(c.workers[r.holder], "a", gen, ok=True)
    assert c.sent[-1] == (0, "HOLDER", {"req": "a", "holder": r.holder, "addr": f"kv{r.holder}", "since": 0})


def test_a_refused_reservation_leaves_the_request_unprotected_and_frees_the_bookkeeping(controller):
    c = controller
    r = _running(c, "a", 0)
    c._place_checkpoint(r, c.workers[0])
    h = r.holder
    assert c.workers[h].ckpt_reserved == r.reservation > 0
    c._on_reserved(c.workers[h], "a", c.sent[0][2]["gen"], ok=False)
    assert r.holder is None and c.workers[h].ckpt_reserved == 0 and c.unprotected == 1
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
    assert c.sent[0] == (0, "HOLDER", {"req": "a", "holder": -1, "addr": "", "since": 0})
    new = r.holder
    assert new not in (None, dead, 0) and [t for _, t, _ in c.sent[1:]] == ["RESERVE"]
    c._on_reserved(c.workers[new], "a", c.sent[1][2]["gen"], ok=True)
    assert c.sent[-1][:2] == (0, "HOLDER") and c.sent[-1][2]["holder"] == new


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
