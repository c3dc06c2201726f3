"""LUMEN mechanism 3 on the live cluster: draft first, assist the most congested survivor, switch over.

Reloads are made slow with LUMEN_FAULT_SLOW_RELOAD_S (a bigger model or a slower disk would do the
same) so that a recovering worker spends seconds in ASSISTING.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from cluster_util import make_tiny_model_dir, run_cluster, wait_until

from lumen.runtime.protocol import HB_MAX_STATS

pytestmark = pytest.mark.cluster

PROMPT = list(range(300, 332))
SLOW = {"LUMEN_FAULT_SLOW_RELOAD_S": "6"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def noisy_draft_dir(tiny_dir, tmp_path_factory):
    """The target plus noise: a draft that is right often enough to be verified and wrong often
    enough that the partner rejects proposals (the live reject path)."""
    import torch

    from lumen.model.loader import load_model, save_model
    loaded = load_model(tiny_dir, progress=False)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.03)  # ~60% greedy agreement
    out = tmp_path_factory.mktemp("draft")
    save_model(loaded.model, loaded.config, out, tokenizer_dir=tiny_dir)
    return str(out)


@pytest.fixture(scope="module")
def deep_target_and_exact_draft(tmp_path_factory):
    """A draft that is exactly right AND cheaper than its target, as assistance needs: the target is
    the tiny model's 2 layers followed by 10 pass-through layers (o_proj and down_proj zero, so each
    adds exactly 0 to the residual stream), the draft those 2 layers alone (~1/3 of a target step on
    CPU). With the target as its own draft, drafter and partner ran at the same speed and on a busy
    2-core box the drafter never got ahead: every proposal arrived stale (CI, 2026-11-28)."""
    import torch

    from lumen.model import ModelConfig
    from lumen.model.draft import copy_layers
    from lumen.model.hub import default_paths, prepare_default
    from lumen.model.loader import random_model, save_model

    prepare_default()
    cfg = ModelConfig(arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=12,
                      num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                      max_position=4096, tie_embeddings=True, qk_norm=False, bos_token_id=1,
                      eos_token_ids=(2,), name="tiny-deep")
    model = random_model(cfg, "cpu", torch.float32, seed=7, std=0.2)
    with torch.no_grad():
        for layer in model.layers[2:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    target = tmp_path_factory.mktemp("deep")
    save_model(model, cfg, target, tokenizer_dir=default_paths()[0])
    draft = tmp_path_factory.mktemp("exact-draft")
    copy_layers(target, draft, [0, 1], share_with_target=True)  # read once by a restarted worker
    return str(target), str(draft)


@pytest.fixture(scope="module")
def tiny_reference():
    """The failure-free greedy output of PROMPT on the tiny model (1500 tokens, deterministic mode),
    computed by the first test that needs it on its own cluster before any fault, then reused: it
    depends only on the model and the prompt (deterministic mode: neither the cluster's size nor its
    draft settings change an output), and it takes ~8 s of a 2-core box each time."""
    box = {}

    def get(c):
        if "ids" not in box:
            box["ids"] = c.complete(PROMPT, max_tokens=1500, ignore_eos=True)["choices"][0]["token_ids"]
        return box["ids"]

    return get


def _worker(c, wid):
    return c.worker(wid)


def _wait_state(c, wid, state, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        w = _worker(c, wid)
        if w["state"] == state:
            return w
        time.sleep(0.02)
    raise TimeoutError(f"worker {wid} never reached {state}: {_worker(c, wid)}")


def _long_stream(c, max_tokens):
    box = {}
    t = threading.Thread(target=lambda: box.update(r=c.stream_tokens(PROMPT, max_tokens=max_tokens,
                                                                     ignore_eos=True)))
    t.start()
    return t, box


def test_assisted_requests_keep_their_output_and_gain_tokens_per_step(deep_target_and_exact_draft):
    # a draft that is always right: every verified token is accepted and assistance shows > 1 token
    # per verify step; the draft is cheaper than the target, so it gets ahead of its partner
    target, draft = deep_target_and_exact_draft
    with run_cluster(target, workers=2, policy="lumen", env={"LUMEN_FAULT_SLOW_RELOAD_S": "12"},
                     extra=["--deterministic", "--draft-model", draft]) as c:
        reference = c.complete(PROMPT, max_tokens=1500, ignore_eos=True)["choices"][0]["token_ids"]
        t, box = _long_stream(c, 1500)
        partner = c.executor_of()
        recovering = 1 - partner
        c.kill(recovering)
        w = _wait_state(c, recovering, "assisting")
        assert w["partner"] == partner and _worker(c, partner)["partner"] == recovering
        _wait_state(c, recovering, "serving", timeout=90)
        t.join(120)
        ids, finish, errors = box["r"]
        assert not errors and ids == reference
        stats = _worker(c, partner)["stats"]
        # an assisted partner publishes about the most stats a worker has: keep a margin to the bound
        assert len(stats) <= HB_MAX_STATS - 32, sorted(stats)
        assert stats["assist_proposals_received"] > 0
        assert stats["spec_accepted_tokens"] > 0
        # a draft identical to the target must have every verified token accepted
        assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"]
        tokens_per_verify_step = (stats["spec_drafts"] + stats["spec_accepted_tokens"]) / stats["spec_drafts"]
        assert tokens_per_verify_step > 1.0
        phases = _worker(c, recovering)["phases_s"]
        assert {"draft_load_s", "draft_disk_to_host_s", "draft_host_to_device_s", "assist_s", "disk_to_host_s",
                "host_to_device_s", "weights_to_device_s", "engine_init_s"} <= set(phases)
        assert phases["weights_to_device_s"] + phases["engine_init_s"] <= phases["host_to_device_s"]
        # the draft is resident in host memory (the node's shared memory, staged by the first start):
        # the target's disk read starts at once beside it, not after it (issue 24)
        assert phases["draft_resident"] == 1
        assert phases["target_read_start_s"] < 0.05 < phases["draft_load_s"]
        assert phases["disk_to_host_s"] < phases["draft_load_s"] + 12.0
        # the goodput rule chose every verified position (light load, a draft always right: full K)
        assert stats["assist_steps"] > 0 and stats["assist_verify_positions"] == stats["spec_draft_tokens"]
        metrics = c.client.get("/metrics").text
        assert "vllm:spec_decode_num_accepted_tokens_total" in metrics
        assert "lumen:recovery_phase_seconds_bucket" in metrics


def _partner_window(c, partner, recovering, timeout=90):
    """The partner's counters when the recovering worker starts assisting and when it stops, and the
    recovering worker's record then."""
    _wait_state(c, recovering, "assisting")
    before = _worker(c, partner)["stats"]
    w = wait_until(lambda: (lambda w: w if w["state"] != "assisting" else None)(_worker(c, recovering)),
                   timeout, f"worker {recovering} never left assisting")
    return before, _worker(c, partner)["stats"], w


# slow: 33-40 s of the 15-minute CI budget on 2 cores (the suite reached 871-876 s on 2026-11-28);
# test_assisted_requests_keep_their_output_and_gain_tokens_per_step covers the same path on the tiny
# model in every run, and this one runs with `pytest -m slow`
@pytest.mark.slow
def test_default_model_assisted_by_its_draft_gains_tokens_per_step():
    # Issue 5 on the real model: SmolLM2-135M (fp32) and its default draft (an fp16-weight copy, ~0.4
    # of a target step on CPU; scripts/make_draft.py). One long greedy request on the partner; the
    # killed worker drafts for it while its reload is held 12 s longer. Over that window, from the
    # partner's own counters: its verify steps, and all its steps, commit more than one token each
    # on average. (Exact outputs under assistance: the deterministic tests above.) The stream is
    # dropped once the window is measured (the gateway aborts the request), to keep the test short.
    # --hb-misses 100 (10 s; default 1 s): on the 2-core box shared with other jobs (load
    # average 5-10) the assisting worker -- drafting, loading its target and heartbeating on three
    # threads -- was seen silent for 1.08 s (default budget) and for 3.02 s (a 3 s budget), declared
    # dead ~1.5 s into the window, which ended before any proposal. A false verdict on a starved box
    # is the failure detector's matter, not what this test measures; the kill itself is seen at once
    # (process exit), so the longer budget costs nothing here.
    t0 = time.monotonic()
    marks = {}
    with run_cluster("default", workers=2, policy="lumen", name="default", extra=["--hb-misses", "100"],
                     env={"LUMEN_FAULT_SLOW_RELOAD_S": "12"}) as c:
        marks["ready"] = time.monotonic() - t0
        done, box = threading.Event(), {}

        def on_token(n):
            if done.is_set():
                raise _Enough(n)

        def stream():
            try:
                box["r"] = c.stream_tokens("Write a long story about a lighthouse keeper who finds a message in a bottle.",
                                           on_token=on_token, model="default", max_tokens=2000, ignore_eos=True)
            except _Enough as e:
                box["n"] = e.args[0]

        t = threading.Thread(target=stream)
        t.start()
        partner = c.executor_of()
        recovering = 1 - partner
        c.kill(recovering)
        marks["kill"] = time.monotonic() - t0
        before, after, w = _partner_window(c, partner, recovering)
        marks["window_end"] = time.monotonic() - t0
        done.set()
        t.join(60)
        # streaming without an error when the window closed, or (a very fast machine) finished
        assert "n" in box or ("r" in box and not box["r"][2] and len(box["r"][0]) == 2000), box
        d = {k: after[k] - before[k] for k in ("steps", "spec_drafts", "spec_draft_tokens", "spec_accepted_tokens")}
        why = (d, marks, w["state"], w["phases_s"], os.getloadavg(), before, after)
        assert w["state"] in ("switching", "serving"), why  # left assisting by finishing its reload
        assert d["steps"] >= 20, why  # the request was decoding through the window
        assert d["spec_drafts"] > 0, why
        per_verify_step = (d["spec_drafts"] + d["spec_accepted_tokens"]) / d["spec_drafts"]
        per_step = (d["steps"] + d["spec_accepted_tokens"]) / d["steps"]  # one request: 1 + accepted per step
        assert per_verify_step > 1.0 and per_step > 1.0, (per_verify_step, per_step, why)
        assert d["spec_accepted_tokens"] >= 0.8 * d["spec_draft_tokens"], why
        print(f"assisted window: {d}, tokens per verify step {per_verify_step:.2f}, per partner step "
              f"{per_step:.2f}, recovering worker {w['phases_s']}, marks {marks}")


class _Enough(Exception):
    pass


def test_wrong_drafts_never_change_output(tiny_dir, noisy_draft_dir):
    # Sampling (temperature > 0, fixed seed) through the assisted path too: the engine samples every
    # position from its own seeded stream and accepts a drafted token only where it equals that
    # sample, so a seeded request must come out token for token as without assistance; the engine's
    # chi-square test (tests/test_engine.py) shows those samples follow the target distribution.
    sampled_prompt, sampling = list(range(400, 432)), {"temperature": 0.9, "top_p": 0.95, "seed": 11}
    with run_cluster(tiny_dir, workers=2, policy="lumen", env={"LUMEN_FAULT_SLOW_RELOAD_S": "12"},
                     extra=["--deterministic", "--draft-model", noisy_draft_dir]) as c:
        # the three references at once (deterministic mode: batching changes no output), which saves
        # two long completions of the CI budget
        with ThreadPoolExecutor(3) as ex:
            reference, sampled_reference, greedy_head = (f.result()["choices"][0]["token_ids"] for f in [
                ex.submit(c.complete, PROMPT, max_tokens=800, ignore_eos=True),
                ex.submit(c.complete, sampled_prompt, max_tokens=800, ignore_eos=True, **sampling),
                ex.submit(c.complete, sampled_prompt, max_tokens=100, ignore_eos=True)])
        # sampling does change the output (else the sampled check below would prove nothing)
        assert sampled_reference[:100] != greedy_head
        t, box = _long_stream(c, 800)
        partner = c.executor_of()
        sampled_box = {}
        ts = threading.Thread(target=lambda: sampled_box.update(r=c.stream_tokens(
            sampled_prompt, max_tokens=800, ignore_eos=True, **sampling)))
        ts.start()
        c.kill(1 - partner)
        _wait_state(c, 1 - partner, "assisting")
        t.join(120)
        ts.join(120)
        ids, finish, errors = box["r"]
        assert not errors and ids == reference
        ids, finish, errors = sampled_box["r"]
        assert not errors and ids == sampled_reference
        stats = _worker(c, partner)["stats"]
        assert stats["assist_proposals_received"] > 0
        # wrong proposals were met: dropped on arrival (they contradict tokens the partner had already
        # committed) or rejected by the verify step itself; either way the output above is unchanged
        rejected_in_verify = stats["spec_draft_tokens"] - stats["spec_accepted_tokens"]
        assert stats["assist_proposals_stale"] + rejected_in_verify > 0


def test_kill_recovering_worker_while_assisting(tiny_dir, tiny_reference):
    # no shared memory for drafts: the draft comes from disk, before the target. Forced (--draft-first
    # always): under auto the controller prices it (policy.draft_phase_pays), and on a loaded 2-core box
    # it once priced the survivor's gain below the reload it delays and the worker went down -> switching
    # without drafting. Pairing is still by gain, asked again every second while the target loads
    with run_cluster(tiny_dir, workers=2, policy="lumen", env={**SLOW, "LUMEN_DRAFT_SHM": "off"},
                     extra=["--deterministic", "--draft-model", tiny_dir, "--draft-first", "always"]) as c:
        reference = tiny_reference(c)
        t, box = _long_stream(c, 1500)
        partner = c.executor_of()
        recovering = 1 - partner
        c.kill(recovering)
        w = _wait_state(c, recovering, "assisting")
        c.kill(recovering)  # dies while assisting: the partner carries on alone
        t.join(120)
        ids, finish, errors = box["r"]
        assert not errors and ids == reference
        w2 = _wait_state(c, recovering, "serving", timeout=120)
        assert w2["epoch"] > w["epoch"]
        assert w["phases_s"]["draft_resident"] == 0


def test_cluster_stopped_while_a_worker_assists_shuts_down_cleanly(tiny_dir, tmp_path):
    # The cluster is stopped while a restarted worker is still ASSISTING (its target load held 30 s).
    # Seen in a CPU bench on 2026-11-28: the worker then went on to switch to a target it had not
    # loaded (KeyError) and died with SIGABRT; it must just exit.
    log = tmp_path / "cluster.log"
    with run_cluster(tiny_dir, workers=2, policy="lumen", env={"LUMEN_FAULT_SLOW_RELOAD_S": "30"},
                     extra=["--deterministic", "--draft-model", tiny_dir], log_path=log) as c:
        t, box = _long_stream(c, 1500)
        recovering = 1 - c.executor_of()
        c.kill(recovering)
        _wait_state(c, recovering, "assisting")
    t.join(60)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    exits = [line for line in text.splitlines() if f"worker {recovering} (epoch 2" in line and "exited with" in line]
    assert exits and exits[-1].endswith("exited with 0"), exits


def test_kill_partner_while_assisting_and_no_shared_partner(tiny_dir, tiny_reference):
    # the draft (resident) loads beside the target read: ASSISTING lasts the reload minus the draft's
    # load, which took 6.2 s on a busy 2-core box, the whole of a 6 s reload (2026-12-07)
    with run_cluster(tiny_dir, workers=3, policy="lumen", env={"LUMEN_FAULT_SLOW_RELOAD_S": "10"},
                     extra=["--deterministic", "--draft-model", tiny_dir]) as c:
        reference = tiny_reference(c)
        t, box = _long_stream(c, 1500)
        executor = c.executor_of()
        others = [w for w in range(3) if w != executor]
        c.kill(others[0])
        c.kill(others[1])  # two recovering workers, one survivor: at most one may pair with it
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ws = c.state()["workers"]
            if any(w["state"] == "assisting" for w in ws):
                break
            time.sleep(0.02)
        ws = {w["id"]: w for w in c.state()["workers"]}
        partners = [ws[i]["partner"] for i in others if ws[i]["partner"] is not None]
        assert partners == [executor]  # exactly one drafter paired, with the only survivor
        drafter = next(i for i in others if ws[i]["partner"] == executor)
        c.kill(executor)  # the partner dies while assisted: its request recovers by the normal path
        t.join(180)
        ids, finish, errors = box["r"]
        assert not errors and ids == reference
        c.wait_serving(3, timeout=120)
        assert _worker(c, drafter)["state"] == "serving"
