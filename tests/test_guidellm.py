"""guidellm, the ecosystem's load client (pinned version, its own virtualenv), against a live `lumen serve`:
every request succeeds, streamed TTFT and ITL are reported, and no process outlives the server.

Drives benchmarks/guidellm_compat.py. Slow: the first run installs guidellm and its CPU torch into
$LUMEN_HOME/guidellm-venv (about 1.5 GB; skipped with the reason when it cannot be installed, e.g. no
network to the package index), then each test starts a 2-worker cluster of a tiny model. Select with
`-m slow` (or `-m "cluster and slow"`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cluster_util import make_tiny_model_dir, worker_pids_alive

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "guidellm_compat.py"
EXIT_NO_GUIDELLM = 3


@pytest.fixture(scope="module")
def guidellm_ready():
    r = subprocess.run([sys.executable, str(SCRIPT), "--setup-only"], capture_output=True, text=True,
                       timeout=1200, stdin=subprocess.DEVNULL)
    if r.returncode == EXIT_NO_GUIDELLM:
        pytest.skip(f"guidellm cannot be installed here: {r.stderr.strip()[-600:]}")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("guidellm") / "tiny")


def run_compat(tiny: Path, out: Path, *args: str) -> dict:
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny), "--requests", "8",
                        "--prompt-tokens", "64", "--output-tokens", "32", "--out", str(out), *args],
                       capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}\n{summary['problems']}"
    assert summary["passed"] and not summary["problems"]
    assert summary["worker_pids"] and not worker_pids_alive(summary["worker_pids"])
    for name in ("synchronous", "constant_4", "poisson_4"):
        report = out / f"guidellm_{name}.json"
        if report.exists():  # guidellm really streamed, through the route asked for
            backend = json.loads(report.read_text())["benchmarks"][0]["config"]["backend"]
            assert backend["stream"] is True and backend["request_format"] == summary["request_format"]
    return summary


def check_rows(summary: dict, profiles: list[str]) -> None:
    assert [b["profile"] for b in summary["benchmarks"]] == profiles
    for b in summary["benchmarks"]:
        assert (b["successful"], b["errored"], b["incomplete"]) == (8, 0, 0)
        assert b["ttft_ms_mean"] > 0 and b["itl_ms_mean"] > 0 and b["tpot_ms_mean"] > 0
        assert b["output_tokens_mean"] == 32  # guidellm's ignore_eos + max_completion_tokens honoured


def test_guidellm_chat_streaming(guidellm_ready, tiny, tmp_path):
    summary = run_compat(tiny, tmp_path / "chat", "--profile", "synchronous", "--profile", "constant@4")
    check_rows(summary, ["synchronous", "constant@4"])
    assert all(b["prompt_tokens_mean"] > 64 for b in summary["benchmarks"])  # the chat template's tokens too


def test_guidellm_completions_streaming(guidellm_ready, tiny, tmp_path):
    summary = run_compat(tiny, tmp_path / "cmpl", "--request-format", "/v1/completions", "--profile", "poisson@4")
    check_rows(summary, ["poisson@4"])
    assert summary["benchmarks"][0]["prompt_tokens_mean"] == 64  # guidellm's synthetic prompt, as lumen counts it
