"""Which worker served each request (RequestRecord.workers) and each worker's latency by phase."""

from __future__ import annotations

import asyncio
import io
import json
import math

import httpx
import pytest

from lumen.metrics import RequestRecord, summarize_run
from lumen.metrics.per_worker import PHASES, per_worker_phases
from lumen.metrics.report import print_fitted, render_per_worker_table, report_console
from lumen.metrics.summary import _json_safe


def test_a_record_keeps_its_workers_through_json_and_old_records_still_load():
    r = RequestRecord(3, 1.0, 1.2, 2.0, 16, 8, interrupted=True, workers=[1, 2])
    d = json.loads(json.dumps(r.to_dict()))
    assert d["workers"] == [1, 2]
    assert RequestRecord.from_dict(d) == r
    plain = RequestRecord(4, 1.0, 1.2, 2.0, 16, 8)
    assert plain.workers is None and RequestRecord.from_dict(plain.to_dict()) == plain
    old = {k: v for k, v in plain.to_dict().items() if k != "workers"}  # results from before the field
    assert RequestRecord.from_dict(old) == plain


def _rec(i: int, arrival: float, ttft_s: float, tpot_s: float, workers, interrupted=False, out=11, error=None):
    first = arrival + ttft_s
    return RequestRecord(i, arrival, first, first + tpot_s * (out - 1), 16, out, interrupted=interrupted,
                         error=error, workers=workers)


def test_each_worker_by_phase_ttft_to_the_first_worker_tpot_to_the_last():
    """The kill at 10 s, the killed worker 1 back at 20 s. Worker 0 verified worker 1's drafts while it
    was back to loading: its own requests got slower between 10 and 20 s."""
    recs = [
        _rec(0, 1.0, 0.10, 0.020, [0]), _rec(1, 2.0, 0.20, 0.030, [1]),
        _rec(2, 9.0, 0.30, 0.040, [1, 0], interrupted=True),   # TTFT to 1 before; TPOT to nobody
        _rec(3, 9.5, 0.50, 0.050, [0], interrupted=True),      # interrupted before its first token
        _rec(4, 12.0, 0.40, 0.060, [0]), _rec(5, 14.0, 0.60, 0.080, [0]),
        _rec(6, 21.0, 0.10, 0.020, [1]), _rec(7, 22.0, 0.10, 0.025, [0]),
        _rec(8, 23.0, 0.70, 0.020, [0], error="stream: reset"),  # TTFT kept, no TPOT
        _rec(9, 24.0, 0.1, 0.02, None),                         # names no worker: left out
        RequestRecord(10, 25.0, None, None, 16, 0, error="http: 503"),
    ]
    pw = per_worker_phases(recs, 10.0, 20.0, failed=[1])
    assert pw["phases"] == list(PHASES) and pw["bounds_s"] == [10.0, 20.0]
    w0, w1 = pw["workers"]
    assert (w0["worker"], w0["failed"], w1["worker"], w1["failed"]) == (0, False, 1, True)
    assert w0["n"] == [2, 2, 2] and w1["n"] == [2, 0, 1]
    assert w0["ttft_mean"] == pytest.approx([0.3, 0.5, 0.4])
    assert w1["ttft_mean"][0] == pytest.approx(0.25) and math.isnan(w1["ttft_mean"][1])
    assert w0["n_tpot"] == [1, 2, 1] and w1["n_tpot"] == [1, 0, 1]
    assert w0["tpot_mean"] == pytest.approx([0.02, 0.07, 0.025])
    assert w1["tpot_mean"][2] == pytest.approx(0.02)
    # the killed worker never came back: everything from the kill on is "kill..back"
    pw = per_worker_phases(recs, 10.0, None)
    assert pw["bounds_s"] == [10.0, None] and pw["workers"][0]["n"] == [2, 4, 0]
    assert not any(w["failed"] for w in pw["workers"])
    # records that name no worker (another server, older results) give nothing
    assert per_worker_phases([RequestRecord(0, 1.0, 1.1, 2.0, 16, 8)], 10.0, 20.0) == {}


def test_failure_runs_carry_per_worker_figures_and_the_report_prints_them(monkeypatch):
    recs = [_rec(i, i * 1.0, 0.1 + 0.1 * (10 <= i < 20), 0.02, [i % 2]) for i in range(30)]
    base = [_rec(i, i * 1.0, 0.1, 0.02, [i % 2]) for i in range(30)]
    s = summarize_run(recs, base, window=5, policy="lumen", seed=3, failure_times=[10.0], outage_end=20.0,
                      failed_workers=[1])
    assert [w["n"] for w in s.per_worker["workers"]] == [[5, 5, 5], [5, 5, 5]]
    assert s.per_worker["workers"][1]["ttft_mean"][1] == pytest.approx(0.2)
    assert summarize_run(base, base, window=5).per_worker == {}  # no failure, nothing by phase
    assert json.loads(json.dumps(s.to_dict()))["per_worker"]["workers"][1]["failed"] is True
    # an unknown return: one phase from the kill on, not a guess
    unknown = summarize_run(recs, base, window=5, failure_times=[10.0])
    assert unknown.per_worker["bounds_s"] == [10.0, None]
    assert render_per_worker_table([summarize_run(base, base, window=5)]) is None
    monkeypatch.delenv("COLUMNS", raising=False)
    con = report_console(file=io.StringIO())
    print_fitted(con, render_per_worker_table([s, unknown]))
    text = con.file.getvalue()
    assert "…" not in text
    lines = text.splitlines()
    row = next(line for line in lines if "lumen seed 3" in line)
    assert "10.0..20.0" in row and "0 " in row and "5/5/5" in row and "100" in row
    assert any("1 (failed)" in line and "200" in line for line in lines)
    assert any("10.0..never" in line for line in lines)
    assert _json_safe(s.per_worker)["workers"][0]["tpot_mean"] == pytest.approx([0.02] * 3)


def test_the_client_records_the_workers_in_order_once_each(monkeypatch):
    """lumen's gateway names the worker on a request's first chunk and again when it changes; the
    client keeps them in order, a repeat (another server may name it on every chunk) only once."""
    from lumen.bench.client import ClientConfig, LoadClient
    from lumen.workload import RequestSpec

    def sse(workers_per_chunk) -> bytes:
        out = []
        for i, ext in enumerate(workers_per_chunk):
            c = {"choices": [{"index": 0, "text": "a", "token_ids": [7],
                              "finish_reason": "length" if i == len(workers_per_chunk) - 1 else None}]}
            if ext is not None:
                c["lumen"] = ext
            out.append(f"data: {json.dumps(c)}\n\n")
        out.append("data: [DONE]\n\n")
        return "".join(out).encode()

    streams = {  # by max_tokens
        1: [{"worker": 2}, None, None],                                     # lumen, no failure
        2: [{"worker": 1}, None, {"interrupted": 1, "worker": 3}, {"interrupted": 1}],
        3: [{"worker": 0}, {"worker": 0}, {"worker": True}, {"worker": "1"}],  # repeats and junk
        4: [None, None],                                                    # a server without the extension
    }

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "vocab_size": 1000}]})
        body = json.loads(request.content)
        return httpx.Response(200, content=sse(streams[body["max_tokens"]]),
                              headers={"content-type": "text/event-stream"})

    transport = httpx.MockTransport(handler)
    real = httpx.AsyncClient

    def client(*a, **kw):
        return real(*a, **{**kw, "transport": transport})

    monkeypatch.setattr(httpx, "AsyncClient", client)
    specs = [RequestSpec(i, 0.0, 4, i) for i in streams]  # its max_tokens picks its stream
    recs = asyncio.run(LoadClient(ClientConfig(url="http://fake")).replay(specs))
    assert [r.workers for r in recs] == [[2], [1, 3], [0], None]
    assert [r.interrupted for r in recs] == [False, True, False, False]


class _ScriptedEvents:
    """A request's event queue as the controller fills it: ("tokens", ids, worker) from worker 1, then
    (its failure: the request is interrupted) from worker 0, then the finish."""

    def __init__(self, state, script):
        self.state, self.script = state, list(script)

    async def get(self):
        event, interrupts = self.script.pop(0)
        self.state.interrupts = interrupts
        return event


def _gateway(script):
    from types import SimpleNamespace

    from lumen.runtime.gateway import Gateway

    class Controller:
        cfg = SimpleNamespace(served_model_name="m")

        def submit(self, request_id, prompt_ids, params):
            s = SimpleNamespace(id=request_id, arrival=0.0, interrupts=0, done=False)
            s.events = _ScriptedEvents(s, script)
            return s

        def abort(self, request_id):
            pass

        def finished(self, request_id):
            pass

        def serving_workers(self):
            return [0]

    return Gateway(Controller(), None, vocab_size=1000, max_model_len=256)


SCRIPT = [(("tokens", [5], 1), 0), (("tokens", [6, 7], 1), 0), (("tokens", [8], 0), 1), (("tokens", [9], 0), 1),
          (("finish", "length"), 1)]


def _post(app, body: dict) -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            return await c.post("/v1/completions", json=body)

    return asyncio.run(go())


def test_the_gateway_names_the_worker_of_each_streamed_token_when_it_changes():
    """The worker rides with its tokens (the controller's "tokens" event): the first chunk names it, a
    chunk after a failover names the new one, the others name none; `interrupted` is as before."""
    gw = _gateway(SCRIPT)
    r = _post(gw.app, {"model": "m", "prompt": [1, 2, 3], "max_tokens": 5, "stream": True, "return_token_ids": True})
    chunks = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert [c["choices"][0]["token_ids"] for c in chunks] == [[5], [6, 7], [8], [9], []]
    assert [c.get("lumen") for c in chunks] == [{"worker": 1}, None, {"interrupted": 1, "worker": 0},
                                                {"interrupted": 1}, {"interrupted": 1}]


def test_the_gateways_whole_response_names_the_worker_that_finished_it_and_every_one_in_order():
    gw = _gateway(SCRIPT)
    body = _post(gw.app, {"model": "m", "prompt": [1, 2, 3], "max_tokens": 5}).json()
    assert body["lumen"] == {"interrupted": 1, "worker": 0, "workers": [1, 0]}
    calm = [(("tokens", [5], 2), 0), (("tokens", [6], 2), 0), (("finish", "length"), 0)]
    body = _post(_gateway(calm).app, {"model": "m", "prompt": [1, 2, 3], "max_tokens": 2}).json()
    assert body["lumen"] == {"worker": 2}


def test_the_simulator_names_the_workers_that_produced_each_requests_tokens():
    from lumen.sim import FailurePlan, FailureSpec, FittedCost, SimConfig, simulate
    from lumen.workload import make_workload

    cfg = SimConfig(workers=3, cost=FittedCost((0.01, 0.0, 0.0, 0.0, 0.0)), kv_tokens=10**6, restart_s=1.0,
                    detect_s=0.3)
    res = simulate(cfg, make_workload(200, 20.0, "fixed:64:40", seed=2), "lumen",
                   FailurePlan((FailureSpec(4.0, workers=(1,)),)), seed=0)
    assert all(r.workers and set(r.workers) <= {0, 1, 2} for r in res.records)
    moved = [r.workers for r in res.records if len(r.workers) > 1]
    assert moved and all(len(w) == 2 and w[0] == 1 and w[1] != 1 for w in moved)
    assert all(r.interrupted for r in res.records if len(r.workers) > 1)
    s = summarize_run(res.records, res.records, window=20, failure_times=res.failure_times, failed_workers=[1])
    assert [w["worker"] for w in s.per_worker["workers"]] == [0, 1, 2]
