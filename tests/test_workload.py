"""lumen.workload: arrivals, fitted length distributions, trace loading."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lumen.workload import (
    LENGTH_DISTRIBUTIONS,
    RequestSpec,
    TraceFormatError,
    gamma_arrivals,
    get_lengths,
    load_trace,
    make_workload,
    poisson_arrivals,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CONV = DATA / "azure_llm_inference_2023_conv.csv"
CODE = DATA / "azure_llm_inference_2023_code.csv"
needs_data = pytest.mark.skipif(not CONV.is_file() or not CODE.is_file(), reason=f"trace data not at {DATA}")


def _cv2(times: np.ndarray) -> float:
    gaps = np.diff(times)
    return float(gaps.var() / gaps.mean() ** 2)


def test_poisson_rate_and_cv():
    t = poisson_arrivals(4.0, 100_000, np.random.default_rng(1))
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert np.diff(t).mean() == pytest.approx(0.25, rel=0.02)
    assert _cv2(t) == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("cv2", [0.25, 1.0, 4.0])
def test_gamma_burstiness_is_cv2(cv2):
    t = gamma_arrivals(10.0, 100_000, np.random.default_rng(2), burstiness=cv2)
    assert np.diff(t).mean() == pytest.approx(0.1, rel=0.03)
    assert _cv2(t) == pytest.approx(cv2, rel=0.06)


def test_arrivals_reject_bad_args():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, 10, rng)
    with pytest.raises(ValueError):
        gamma_arrivals(1.0, 10, rng, burstiness=0.0)
    assert len(poisson_arrivals(1.0, 0, rng)) == 0
    assert list(poisson_arrivals(1.0, 1, rng)) == [0.0]


def test_sharegpt_means_match_vllm_paper():
    p, o = LENGTH_DISTRIBUTIONS["sharegpt"].sample(400_000, np.random.default_rng(3))
    assert p.mean() == pytest.approx(161.31, rel=0.02)
    assert o.mean() == pytest.approx(337.99, rel=0.02)
    assert p.min() >= 1 and o.min() >= 1


@pytest.mark.parametrize(
    "name, ctx_median, ctx_mean, gen_median, gen_mean",
    [
        # Reference statistics of the Azure LLM inference trace 2023 (data/README and a direct read).
        ("splitwise-conv", 1020, 1154.7, 129, 211.1),
        ("splitwise-code", 1469, 2047.8, 13, 27.9),
    ],
)
def test_splitwise_fits_match_trace_statistics(name, ctx_median, ctx_mean, gen_median, gen_mean):
    p, o = LENGTH_DISTRIBUTIONS[name].sample(300_000, np.random.default_rng(4))
    assert np.median(p) == pytest.approx(ctx_median, rel=0.02)
    assert np.median(o) == pytest.approx(gen_median, rel=0.08)  # 13 tokens: ±1 token
    assert p.mean() == pytest.approx(ctx_mean, rel=0.04)
    assert o.mean() == pytest.approx(gen_mean, rel=0.04)


@needs_data
@pytest.mark.parametrize("name, path", [("splitwise-conv", CONV), ("splitwise-code", CODE)])
def test_splitwise_fits_match_the_trace_files(name, path):
    trace = load_trace(path)
    ctx = np.array([r.prompt_tokens for r in trace])
    gen = np.array([r.output_tokens for r in trace])
    p, o = LENGTH_DISTRIBUTIONS[name].sample(300_000, np.random.default_rng(5))
    for fitted, real in ((p, ctx), (o, gen)):
        for q in (10, 50, 90):
            assert np.percentile(fitted, q) == pytest.approx(np.percentile(real, q), rel=0.08, abs=1.0)
        assert fitted.mean() == pytest.approx(real.mean(), rel=0.04)
        assert fitted.min() >= real.min() and fitted.max() <= real.max()


def test_get_lengths_names_and_fixed():
    f = get_lengths("fixed:12:7")
    p, o = f.sample(3, np.random.default_rng(0))
    assert list(p) == [12, 12, 12] and list(o) == [7, 7, 7]
    assert get_lengths("ShareGPT") is LENGTH_DISTRIBUTIONS["sharegpt"]
    for bad in ("nope", "fixed:0:3", "fixed:3", "fixed:a:b"):
        with pytest.raises(ValueError):
            get_lengths(bad)
    for d in LENGTH_DISTRIBUTIONS.values():
        assert d.source  # every distribution names its source


def test_make_workload_seeded_and_clipped():
    a = make_workload(500, 5.0, "splitwise-conv", seed=7, max_prompt=2048, max_output=256, min_output=4)
    b = make_workload(500, 5.0, "splitwise-conv", seed=7, max_prompt=2048, max_output=256, min_output=4)
    c = make_workload(500, 5.0, "splitwise-conv", seed=8, max_prompt=2048, max_output=256, min_output=4)
    assert a == b and a != c
    assert all(isinstance(r, RequestSpec) for r in a)
    assert [r.req_id for r in a] == list(range(500))
    assert max(r.prompt_tokens for r in a) == 2048  # the conv tail exceeds 2048, so the clip bites
    assert all(4 <= r.output_tokens <= 256 for r in a)
    assert all(x.arrival <= y.arrival for x, y in zip(a, a[1:], strict=False))


def test_make_workload_lengths_independent_of_rate_and_arrival_process():
    a = make_workload(200, 1.0, seed=3)
    b = make_workload(200, 9.0, seed=3, arrival="gamma", burstiness=3.0)
    assert [(r.prompt_tokens, r.output_tokens) for r in a] == [(r.prompt_tokens, r.output_tokens) for r in b]
    assert [r.arrival for r in a] != [r.arrival for r in b]


def test_make_workload_rejects_bad_args():
    with pytest.raises(ValueError):
        make_workload(10, 1.0, arrival="uniform")
    with pytest.raises(ValueError):
        make_workload(10, 1.0, burstiness=2.0)  # burstiness needs arrival="gamma"
    with pytest.raises(ValueError):
        make_workload(10, 1.0, max_prompt=0)


@needs_data
def test_load_azure_conv_trace():
    t = load_trace(CONV)
    assert len(t) == 19_366
    assert t[0].arrival == 0.0 and t[0].prompt_tokens == 374 and t[0].output_tokens == 44
    assert t[1].arrival == pytest.approx(50.9951690 - 46.6805900, abs=1e-5)
    assert t[-1].arrival == pytest.approx(58 * 60 + 21.7219370, abs=1e-3)  # 19:14:08.40 - 18:15:46.68
    assert np.median([r.prompt_tokens for r in t]) == 1020
    assert np.median([r.output_tokens for r in t]) == 129
    half = load_trace(CONV, time_scale=0.5, max_requests=100)
    assert len(half) == 100
    assert half[1].arrival == pytest.approx(t[1].arrival / 2)


def test_load_jsonl_and_numeric_csv(tmp_path):
    j = tmp_path / "t.jsonl"
    j.write_text(
        "\n".join(
            json.dumps(x)
            for x in (
                {"arrival": 5.0, "prompt_tokens": 10, "output_tokens": 3},
                {"timestamp": 3.0, "prompt_tokens": 7, "output_tokens": 2},
                {"arrival": 4.5, "prompt_tokens": 9, "output_tokens": 1},
            )
        )
        + "\n\n"
    )
    t = load_trace(j, time_scale=2.0)
    assert [(r.req_id, r.arrival, r.prompt_tokens) for r in t] == [(0, 0.0, 7), (1, 3.0, 9), (2, 4.0, 10)]
    c = tmp_path / "t.csv"
    with c.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
        w.writerows([[10.5, 3, 4], [11.0, 5, 6]])
    assert [(r.arrival, r.output_tokens) for r in load_trace(c)] == [(0.0, 4), (0.5, 6)]


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("empty.csv", "", "empty"),
        ("hdr.csv", "a,b,c\n1,2,3\n", "lacks columns"),
        ("int.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,2.5,3\n", r"bad\.csv:2|int\.csv:2"),
        ("neg.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,0,3\n", ">= 1"),
        ("time.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,2,3\n", "cannot parse time"),
        ("none.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", "no requests"),
        ("bad.jsonl", '{"arrival": 1, "prompt_tokens": 2, "output_tokens": 3}\n{oops\n', r"bad\.jsonl:2"),
        ("key.jsonl", '{"arrival": 1, "prompt_tokens": 2}\n', "output_tokens"),
        ("arr.jsonl", '{"prompt_tokens": 2, "output_tokens": 3}\n', "arrival"),
    ],
)
def test_load_trace_clear_errors(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(TraceFormatError, match=match):
        load_trace(p)


def test_load_trace_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "nope.csv")
