"""A worker warms its engine up before it reports SERVING (first start and every restart), and the
warm-up leaves no trace: counters, EMAs, step logs and block placement are those of a fresh engine.

No timing assertions: on a loaded 2-core box a warm step can be slower than a cold one. What is
checked is that the warm-up ran (phase info, step count) and that it was wiped afterwards.
"""

from __future__ import annotations

import csv
import os
import signal
import time

import pytest
import torch
from cluster_util import make_tiny_model_dir, run_cluster, wait_until

from lumen.engine import Engine, EngineConfig, SamplingParams
from lumen.model import ModelConfig
from lumen.model.loader import random_model
from lumen.runtime.worker import (
    CPU_WARMUP_TOKENS,
    LONG_CONTINUED_WARMUP_TOKENS,
    SHORT_CONTINUED_WARMUP_TOKENS,
    WARMUP_DECODE_STEPS,
    WARMUP_ENV,
    warm_up,
    warmup_prompt_lengths,
)

CFG = ModelConfig(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5, max_position=512,
                  tie_embeddings=True, qk_norm=False, bos_token_id=1, eos_token_ids=(2,), name="warm-tiny")
COUNTERS = ("steps", "prefill_tokens", "decode_tokens", "finished", "aborted", "preemptions",
            "ema_prefill_step_s", "ema_decode_step_s", "num_waiting", "num_running")


def _engine(chunk=64, num_blocks=40):
    model = random_model(CFG, "cpu", torch.float32, seed=3, std=0.2)
    return Engine(model, EngineConfig(block_size=16, num_blocks=num_blocks, chunk_tokens=chunk, deterministic=True))


def _generate(eng, n=3):
    for i in range(n):
        eng.add_request(f"r{i}", [(11 * i + j) % CFG.vocab_size for j in range(20 + 7 * i)],
                        SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8 if i == 1 else 0.0))
    out: dict[str, list[int]] = {}
    tables: dict[str, list[int]] = {}
    while eng.has_work():
        for s in eng.scheduler.running:
            tables.setdefault(s.req_id, list(s.block_table))
        for o in eng.step():
            out.setdefault(o.req_id, []).extend(o.token_ids)
    return out, tables


def test_warm_up_runs_the_engine_then_leaves_no_trace():
    eng = _engine()
    info = warm_up(eng)
    # a small prefill on CPU (a GPU engine warms up with its full chunk budget), then the decode steps
    assert info["warmup_prefill_tokens"] == CPU_WARMUP_TOKENS < eng.chunk_tokens
    assert info["warmup_steps"] == 1 + WARMUP_DECODE_STEPS and info["warmup_s"] >= 0
    st = eng.stats()
    assert all(st[k] == 0 for k in COUNTERS), {k: st[k] for k in COUNTERS}
    assert st["free_blocks"] == st["num_blocks"] and eng.last_step == {}
    eng.check_invariants()
    # same tokens and same block placement as an engine that never warmed up (deterministic mode,
    # seeded and greedy requests; the engine's own seed stream is not consumed by the warm-up)
    assert _generate(eng) == _generate(_engine())


def test_warm_up_fits_small_pools_and_can_be_turned_off(monkeypatch):
    eng = _engine(chunk=256, num_blocks=4)  # 64 KV tokens: the prefill shrinks to fit
    info = warm_up(eng, prefill_tokens=256)
    assert info["warmup_prefill_tokens"] == 64 - WARMUP_DECODE_STEPS - 2
    assert eng.stats()["steps"] == 0 and eng.block_manager.num_free == 4
    monkeypatch.setenv(WARMUP_ENV, "0")
    assert warm_up(_engine()) == {}
    monkeypatch.setenv(WARMUP_ENV, "16")
    assert warm_up(_engine())["warmup_prefill_tokens"] == 16


def test_the_cuda_warm_up_runs_every_prefill_path_a_restore_can_take(monkeypatch):
    """The CUDA default is two prompts: a chunk plus a long tail, then a chunk plus a short tail. They
    run a first chunk, a long continued chunk (causal bias over a longer context) and a short
    continued one (the batched path a restored request's tail takes), each with one-time costs on
    CUDA. Checked on CPU through the same paths, with the CUDA lengths."""
    import lumen.engine.attention as attention
    from lumen.engine.model_runner import SHORT_MAX, ModelRunner

    biases, short_rows = [], []
    real_bias, real_short = attention._lower_right_causal, ModelRunner._short_group
    monkeypatch.setattr(attention, "_lower_right_causal",
                        lambda n, kv, dev: biases.append((n, kv)) or real_bias(n, kv, dev))
    monkeypatch.setattr(ModelRunner, "_short_group", lambda self, items, group, tok_of: short_rows.append(
        max(len(items[i].tokens) for i in group)) or real_short(self, items, group, tok_of))
    eng = _engine(chunk=64, num_blocks=80)
    cuda_lengths = [64 + LONG_CONTINUED_WARMUP_TOKENS, 64 + SHORT_CONTINUED_WARMUP_TOKENS]
    eng.device = torch.device("cuda")  # only what warmup_prompt_lengths reads
    assert warmup_prompt_lengths(eng) == cuda_lengths
    eng.device = torch.device("cpu")
    assert warmup_prompt_lengths(eng) == [CPU_WARMUP_TOKENS]
    info = warm_up(eng, prefill_tokens=cuda_lengths)
    assert info["warmup_prefill_tokens"] == sum(cuda_lengths)
    assert info["warmup_steps"] == 2 * (2 + WARMUP_DECODE_STEPS)
    assert LONG_CONTINUED_WARMUP_TOKENS > SHORT_MAX >= SHORT_CONTINUED_WARMUP_TOKENS > 1
    assert biases == [(LONG_CONTINUED_WARMUP_TOKENS, 64 + LONG_CONTINUED_WARMUP_TOKENS)] * CFG.num_layers
    assert SHORT_CONTINUED_WARMUP_TOKENS in short_rows  # the short continued chunk; the rest are decodes
    assert set(short_rows) == {1, SHORT_CONTINUED_WARMUP_TOKENS}
    st = eng.stats()
    assert all(st[k] == 0 for k in COUNTERS) and st["free_blocks"] == st["num_blocks"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def _rows(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.cluster
def test_started_and_restarted_workers_warm_up_before_serving(tiny_dir, tmp_path):
    steps = tmp_path / "steps"
    with run_cluster(tiny_dir, workers=2, env={"LUMEN_STEP_LOG": str(steps)}) as c:
        for w in c.state()["workers"]:  # first start: warmed, nothing counted, nothing logged
            assert w["phases_s"]["warmup_steps"] == 1 + WARMUP_DECODE_STEPS
            assert w["phases_s"]["warmup_prefill_tokens"] == CPU_WARMUP_TOKENS
            assert "warmup_s" in w["phases_s"] and "host_to_device_s" in w["phases_s"]
        wait_until(lambda: all("steps" in w["stats"] for w in c.state()["workers"]), 10, "worker stats")
        assert all(w["stats"]["steps"] == 0 for w in c.state()["workers"])
        old = c.worker(1)
        c.kill(1, signal.SIGKILL)
        wait_until(lambda: (w := c.worker(1))["epoch"] > old["epoch"] and w["state"] == "serving", 60,
                   "worker 1 restarted")
        wait_until(lambda: "steps" in c.worker(1)["stats"], 10, "restarted worker's stats")
        w = c.worker(1)
        assert w["phases_s"]["warmup_steps"] == 1 + WARMUP_DECODE_STEPS and "warmup_s" in w["phases_s"]
        assert w["stats"]["steps"] == 0 and w["stats"]["prefill_tokens"] == 0 and w["stats"]["finished"] == 0
        assert w["stats"]["free_blocks"] == w["stats"]["num_blocks"]
        epoch = w["epoch"]
        time.sleep(1.5)  # the step log flushes about every second: nothing may have been written
        assert _rows(steps / f"worker1-epoch{epoch}.csv") == []
        # real requests are counted and logged from zero
        for _ in range(4):
            assert c.complete(list(range(100, 120)), max_tokens=3, ignore_eos=True)["usage"]["completion_tokens"] == 3
        counted = wait_until(lambda: sum(int(x["stats"].get("finished", 0)) for x in c.state()["workers"]) == 4
                             and c.state()["workers"], 10, "finished counters")
        assert sum(int(x["stats"]["prefill_tokens"]) for x in counted) == 4 * 20
    rows = [r for p in steps.glob("worker*-epoch*.csv") for r in _rows(p)]
    assert sum(int(r["num_prefill_tokens"]) for r in rows) == 4 * 20  # no warm-up chunk among them
