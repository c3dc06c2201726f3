"""LUMEN mechanisms 1 and 2 in the real cluster: checkpoint streaming, restore, shedding, re-protection.

Deterministic mode (float64 on CPU): every recovered greedy request must return exactly the tokens of
its failure-free run (DESIGN.md invariant 3), whatever path it took.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
from cluster_util import make_tiny_model_dir, run_cluster

pytestmark = pytest.mark.cluster

PROMPT = list(range(200, 248))  # 48 tokens = 3 full pages before the first decode
BLOCK = 16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def _restored_pages(cluster) -> dict[int, int]:
    return {w["id"]: int(w["stats"].get("restored_pages", 0)) for w in cluster.state()["workers"]}


def _recovered_here(cluster) -> dict[int, dict]:
    """The controller's count of the interrupted requests each worker took over (the bench's
    "where the interrupted requests went")."""
    return {w["id"]: w["recovered_here"] for w in cluster.state()["workers"]}


def _wait_protected(cluster, min_tokens: int, timeout: float = 30) -> dict:
    """Wait until the (single) in-flight request has at least min_tokens of valid checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reqs = cluster.state()["requests"]
        if reqs and reqs[0]["holder"] is not None and reqs[0]["valid_ckpt_tokens"] >= min_tokens:
            return reqs[0]
        time.sleep(0.01)
    raise TimeoutError(f"request never reached {min_tokens} checkpointed tokens: {cluster.state()['requests']}")


def _stream_in_thread(cluster, max_tokens=400):
    box = {}
    t = threading.Thread(target=lambda: box.update(r=cluster.stream_tokens(PROMPT, max_tokens=max_tokens,
                                                                           ignore_eos=True)))
    t.start()
    return t, box


@pytest.mark.parametrize("policy", ["lumen", "fixed-ckpt"])
def test_kill_executor_restores_from_checkpoint(tiny_dir, policy):
    with run_cluster(tiny_dir, workers=3, policy=policy, extra=["--deterministic"]) as c:
        reference = c.complete(PROMPT, max_tokens=400, ignore_eos=True)["choices"][0]["token_ids"]
        before = _restored_pages(c)
        t, box = _stream_in_thread(c)
        req = _wait_protected(c, min_tokens=6 * BLOCK)
        executor, holder = req["executor"], req["holder"]
        assert holder != executor
        if policy == "fixed-ckpt":
            assert holder == (executor + 1) % 3  # the ring neighbour
        expected_pages = req["valid_ckpt_tokens"] // BLOCK
        c.kill(executor)
        t.join(120)
        ids, finish, errors = box["r"]
        assert not errors and finish == "length"
        assert ids == reference
        after = _restored_pages(c)
        # the holder restored at least the pages it had reported valid before the kill (worker counters)
        assert after[holder] - before.get(holder, 0) >= expected_pages
        # the controller counts the dispatch on the holder: one restored request, its whole context
        recovered = _recovered_here(c)
        assert recovered[holder]["restored"] == 1 and recovered[holder]["recomputed"] == 0
        assert recovered[holder]["tokens"] >= req["valid_ckpt_tokens"]
        assert sum(r["restored"] + r["recomputed"] for r in recovered.values()) == 1
        metrics = c.client.get("/metrics").text
        assert "lumen:checkpoint_restores_total 1.0" in metrics


def test_stop_restart_recomputes(tiny_dir):
    with run_cluster(tiny_dir, workers=2, policy="stop-restart", extra=["--deterministic"]) as c:
        reference = c.complete(PROMPT, max_tokens=200, ignore_eos=True)["choices"][0]["token_ids"]
        t, box = _stream_in_thread(c, max_tokens=200)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            reqs = c.state()["requests"]
            if reqs and reqs[0]["generated_tokens"] >= 40:
                break
            time.sleep(0.01)
        assert reqs[0]["holder"] is None  # stop-restart never checkpoints
        c.kill(reqs[0]["executor"])
        t.join(120)
        ids, finish, errors = box["r"]
        assert not errors and ids == reference
        assert sum(_restored_pages(c).values()) == 0
        # the controller counts the dispatch on the survivor: one recomputed request, its whole context
        here = _recovered_here(c)[1 - reqs[0]["executor"]]
        assert (here["restored"], here["recomputed"]) == (0, 1) and here["tokens"] >= len(PROMPT) + 40


def _metric(cluster, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", cluster.client.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def _wait_copies(cluster, n: int, min_tokens: int, timeout: float = 30) -> dict:
    """Wait until the (single) in-flight request has n copies, each with min_tokens checkpointed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reqs = cluster.state()["requests"]
        if reqs and len(reqs[0]["holders"]) == n and all(h["valid_ckpt_tokens"] >= min_tokens
                                                          for h in reqs[0]["holders"]):
            return reqs[0]
        time.sleep(0.01)
    raise TimeoutError(f"request never had {n} copies of {min_tokens} tokens: {cluster.state()['requests']}")


def test_two_replicas_survive_executor_and_first_holder_and_recompute_when_every_copy_dies(tiny_dir):
    """--ckpt-replicas 2 (issue 25), one cluster of 4 real workers in deterministic mode:
    1. the executor and the first holder are SIGKILLed together: the request is restored from the
       second copy (that holder restores at least the pages it had reported);
    2. the executor and both holders are SIGKILLed together: no copy is left, the request is recomputed.
    Either way its greedy output equals its failure-free run (DESIGN.md invariant 3)."""
    with run_cluster(tiny_dir, workers=4, policy="lumen", extra=["--deterministic", "--ckpt-replicas", "2"]) as c:
        assert c.state()["ckpt_replicas"] == 2
        reference = c.complete(PROMPT, max_tokens=300, ignore_eos=True)["choices"][0]["token_ids"]
        before = _restored_pages(c)
        t, box = _stream_in_thread(c, max_tokens=300)
        req = _wait_copies(c, 2, 4 * BLOCK)
        executor, (first, second) = req["executor"], (h["worker"] for h in req["holders"])
        assert len({executor, first, second}) == 3
        expected = req["holders"][1]["valid_ckpt_tokens"] // BLOCK
        c.kill(executor)
        c.kill(first)
        t.join(120)
        ids, finish, errors = box["r"]
        assert not errors and finish == "length" and ids == reference
        assert _restored_pages(c)[second] - before.get(second, 0) >= expected

        c.wait_serving(4)
        assert _metric(c, "lumen:checkpoint_restores_total") >= 1
        recomputed = _metric(c, "lumen:recompute_tokens_total")
        t, box = _stream_in_thread(c, max_tokens=300)
        req = _wait_copies(c, 2, 4 * BLOCK)
        for w in [req["executor"]] + [h["worker"] for h in req["holders"]]:
            c.kill(w)
        t.join(120)
        ids, finish, errors = box["r"]
        assert not errors and finish == "length" and ids == reference
        # nothing was left to restore from: recomputed in the end (on the way the controller may send it to a
        # holder whose death it has not seen yet; that incarnation never answers and its death moves it on)
        assert _metric(c, "lumen:recompute_tokens_total") >= recomputed + len(PROMPT)


def test_holder_death_reprotects_then_executor_death_restores(tiny_dir):
    with run_cluster(tiny_dir, workers=3, policy="lumen", extra=["--deterministic"]) as c:
        reference = c.complete(PROMPT, max_tokens=500, ignore_eos=True)["choices"][0]["token_ids"]
        t, box = _stream_in_thread(c, max_tokens=500)
        req = _wait_protected(c, min_tokens=4 * BLOCK)
        old_holder, executor = req["holder"], req["executor"]
        c.kill(old_holder)
        # a new holder is chosen and the executor streams every page to it again
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = c.state()["requests"][0]
            if r["holder"] not in (None, old_holder) and r["valid_ckpt_tokens"] >= 4 * BLOCK:
                break
            time.sleep(0.01)
        assert r["holder"] not in (None, old_holder) and r["executor"] == executor
        new_holder = r["holder"]
        expected = r["valid_ckpt_tokens"] // BLOCK
        before = _restored_pages(c)
        c.kill(executor)
        t.join(120)
        ids, finish, errors = box["r"]
        assert not errors and ids == reference
        assert _restored_pages(c)[new_holder] - before.get(new_holder, 0) >= expected
        assert "lumen:reprotected_requests_total 1.0" in c.client.get("/metrics").text


def test_corrupted_pages_are_never_used(tiny_dir):
    # every other page is corrupted in transit after its MAC was computed: the holder's MAC check
    # drops it, so the valid prefix stops before it and the rest is recomputed
    env = {"LUMEN_FAULT_CORRUPT_PAGES": "0.5:3:flip"}
    with run_cluster(tiny_dir, workers=3, policy="lumen", extra=["--deterministic"], env=env) as c:
        reference = c.complete(PROMPT, max_tokens=300, ignore_eos=True)["choices"][0]["token_ids"]
        t, box = _stream_in_thread(c, max_tokens=300)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            reqs = c.state()["requests"]
            if reqs and reqs[0]["generated_tokens"] >= 120 and reqs[0]["holder"] is not None:
                break
            time.sleep(0.01)
        req = reqs[0]
        c.kill(req["executor"])
        t.join(120)
        ids, finish, errors = box["r"]
        assert not errors and ids == reference
        drops = sum(int(w["stats"].get("drop_bad_mac", 0)) for w in c.state()["workers"])
        assert drops > 0


def test_budget_exhaustion_runs_unprotected(tiny_dir):
    with run_cluster(tiny_dir, workers=2, policy="lumen", extra=["--deterministic", "--ckpt-budget-gb", "1e-6"]) as c:
        reference = c.complete(PROMPT, max_tokens=120, ignore_eos=True)["choices"][0]["token_ids"]
        state = c.state()
        assert state["unprotected_requests"] >= 1
        t, box = _stream_in_thread(c, max_tokens=120)
        c.executor_of()
        time.sleep(0.3)
        reqs = c.state()["requests"]
        if reqs:
            c.kill(reqs[0]["executor"])
        t.join(120)
        ids, finish, errors = box["r"]
        assert not errors and ids == reference
        for w in c.state()["workers"]:
            assert int(w["stats"].get("ckpt_reserved_bytes", 0)) <= int(w["stats"].get("ckpt_budget_bytes", 1))


@pytest.mark.parametrize("policy,expect_busy_holder", [("lumen", False), ("fixed-ckpt", True)])
def test_load_aware_placement_avoids_a_busy_worker(tiny_dir, policy, expect_busy_holder):
    # small prefill chunks make worker 0's long prompt take a while, so its estimated wait is high
    with run_cluster(tiny_dir, workers=3, policy=policy, extra=["--deterministic", "--chunk-tokens", "16"]) as c:
        for _ in range(5):  # every worker measures its step times once (a loaded box may route two to one)
            warm = [threading.Thread(target=c.complete, args=(PROMPT,), kwargs={"max_tokens": 4}) for _ in range(3)]
            for t in warm:
                t.start()
            for t in warm:
                t.join(60)
            time.sleep(0.5)  # stats travel with the heartbeats
            if all(float(w["stats"].get("ema_prefill_step_s", 0)) > 0 for w in c.state()["workers"]):
                break
        busy = threading.Thread(target=c.complete, args=(list(range(100, 2000)),), kwargs={"max_tokens": 8})
        busy.start()  # routed to worker 0 (all idle, lowest id); a 1,900-token prefill in 16-token chunks
        deadline = time.monotonic() + 20
        while c.worker(0)["load"]["q_wait_s"] in (None, 0, 0.0) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.worker(0)["load"]["q_wait_s"] > 0
        streams = [_stream_in_thread(c, max_tokens=200)[0] for _ in range(2)]  # -> workers 1, then 2
        deadline = time.monotonic() + 20
        holder_of_2 = None
        while time.monotonic() < deadline and holder_of_2 is None:
            for r in c.state()["requests"]:
                if r["executor"] == 2 and r["holder"] is not None:
                    holder_of_2 = r["holder"]
            time.sleep(0.01)
        # fixed-ckpt: worker 2's ring neighbour is the busy worker 0; lumen: the idle worker 1
        assert holder_of_2 == (0 if expect_busy_holder else 1)
        for t in streams + [busy]:
            t.join(120)
