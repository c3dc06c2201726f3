"""The serving cluster with real processes: OpenAI API, failures, fencing, bad input, back-pressure."""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import pytest
import zmq
from cluster_util import make_tiny_model_dir, run_cluster, worker_pids_alive

from lumen.runtime.transport import secure_socket

pytestmark = pytest.mark.cluster

PROMPT = list(range(100, 140))
WORKERS = 3  # the shared cluster: three, so that killing every worker at once can share it too


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    """One cluster for the tests whose setup is the default one. A test that kills workers on it waits
    until all of them serve again before it ends, so the next test finds it healthy."""
    with run_cluster(tiny_dir, workers=WORKERS, extra=["--deterministic"]) as c:
        yield c


def test_openai_client_completions_and_chat(cluster):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="Hello there", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model="tiny", prompt="Hello there", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    chat = client.chat.completions.create(model="tiny", max_completion_tokens=6, temperature=0,
                                          messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", max_tokens=6, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "Hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content


def test_metrics_and_cluster_endpoints(cluster):
    cluster.complete(PROMPT, max_tokens=4)
    text = cluster.client.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:time_to_first_token_seconds", "vllm:generation_tokens",
                 "vllm:request_success", "lumen:worker_failures", "vllm:kv_cache_usage_perc",
                 'lumen:heartbeat_late_max_seconds{worker="1"}'):
        assert name in text
    state = cluster.state()
    assert {w["state"] for w in state["workers"]} == {"serving"} and state["policy"] == "stop-restart"
    # each worker's heartbeat reports its own lateness (the stall diagnostics)
    assert all(0 <= w["stats"]["hb_late_max_ms"] < 1000 * state["hb_deadline_s"] for w in state["workers"])
    # and where its busy loop turns went: the request's steps were counted, each part is time spent
    deadline = time.monotonic() + 5
    while sum(w["stats"].get("loop_turns", 0) for w in state["workers"]) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)
        state = cluster.state()
    parts = ("poll", "step", "outputs", "export", "stats")
    assert sum(w["stats"]["loop_turns"] for w in state["workers"]) >= 4  # a prefill and 3 decode steps at least
    for w in state["workers"]:
        st = w["stats"]
        assert all(st[f"loop_{p}_s"] >= 0 for p in parts) and st["cpu_loop_s"] > 0
        assert {"cpu_kv_tx_s", "cpu_kv_rx_s"} <= st.keys()
        if st["loop_turns"]:
            assert st["loop_step_s"] > 0


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (b"\xff\xfe invalid utf8", 400),
    (b"[1, 2]", 400),
    (b'{"model": "tiny"}', 400),
    (b'{"model": "nope", "prompt": "x"}', 404),
    (b'{"model": "tiny", "prompt": "x", "n": 2}', 400),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": -1}', 400),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": 100000000}', 400),
    (b'{"model": "tiny", "prompt": "x", "max_tokens": "ten"}', 400),
    (b'{"model": "tiny", "prompt": "x", "temperature": true}', 400),
    (b'{"model": "tiny", "prompt": "x", "top_p": 0}', 400),
    (b'{"model": "tiny", "prompt": ""}', 400),
    (b'{"model": "tiny", "prompt": [99999999]}', 400),
    (b'{"model": "tiny", "prompt": "x", "stop": [1]}', 400),
])
def test_bad_input_gets_openai_error(cluster, body, status):
    r = cluster.client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]


def test_bad_input_long_prompt_huge_body_and_chat(cluster):
    r = cluster.client.post("/v1/completions", json={"model": "tiny", "prompt": [5] * 5000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = cluster.client.post("/v1/completions", content=b'{"prompt": "' + b"a" * (10 << 20) + b'"}')
    assert r.status_code == 413
    r = cluster.client.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "wizard"}]})
    assert r.status_code == 400
    r = cluster.client.post("/v1/chat/completions", json={"model": "tiny", "messages": "hi"})
    assert r.status_code == 400
    # and the cluster keeps serving
    assert cluster.complete(PROMPT, max_tokens=3)["choices"][0]["finish_reason"] == "length"


def test_forged_internal_message_is_dropped_and_counted(cluster):
    """A peer without the cluster secret is refused at the CURVE handshake (nothing delivered, nothing
    counted); a peer with it but a forged MAC gets through the handshake and is dropped by the codec."""
    state = cluster.state()
    before = state["transport_drops"]["bad_mac"]
    with open(f"/proc/{state['workers'][0]['pid']}/environ", "rb") as f:
        env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    secret = bytes.fromhex(env[b"LUMEN_CLUSTER_SECRET"].decode())
    forged = [b"\x00" * 32, b"\x85\xa1t\xa5HELLO\xa3src\xa2w0\xa2ep\x01\xa3seq\x01\xa1n\x00"]
    ctx = zmq.Context()
    try:
        stranger, insider = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        secure_socket(insider, secret, server=False)
        for sock in (stranger, insider):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{state['control_addr']}")
        for _ in range(5):  # queued locally: the handshake fails on every reconnect, so it never leaves
            stranger.send_multipart(forged, flags=zmq.NOBLOCK)
        time.sleep(1.0)
        insider.send_multipart(forged)
        deadline = time.monotonic() + 5
        while cluster.state()["transport_drops"]["bad_mac"] == before and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert cluster.state()["transport_drops"]["bad_mac"] == before + 1  # the insider's message only
    finally:
        ctx.destroy(linger=0)
    assert cluster.complete(PROMPT, max_tokens=3)["usage"]["completion_tokens"] == 3


def _kill_mid_stream(cluster, sig, after_tokens=12, max_tokens=120):
    """Stream a greedy request, kill its executor after some tokens; return (ids, finish, victim)."""
    victim = {}

    def on_token(n):
        if n >= after_tokens and not victim:
            wid = cluster.executor_of()
            victim["id"] = wid
            victim["pid"] = cluster.kill(wid, sig)
            victim["t"] = time.monotonic()

    ids, finish, errors = cluster.stream_tokens(PROMPT, on_token=on_token, max_tokens=max_tokens, ignore_eos=True)
    assert not errors, errors
    return ids, finish, victim


def test_sigkill_mid_stream_gives_failure_free_tokens(cluster):
    reference = cluster.complete(PROMPT, max_tokens=120, ignore_eos=True)["choices"][0]["token_ids"]
    ids, finish, victim = _kill_mid_stream(cluster, signal.SIGKILL)
    assert victim, "the executor was never killed"
    assert ids == reference and finish == "length"
    cluster.wait_serving(WORKERS, timeout=60)  # the killed worker is restarted and rejoins
    w = cluster.worker(victim["id"])
    assert w["epoch"] >= 2 and w["pid"] != victim["pid"]


def test_sigstop_is_detected_fenced_and_restarted(tiny_dir, tmp_path):
    log_path = tmp_path / "cluster.log"
    with run_cluster(tiny_dir, workers=2, extra=["--deterministic", "--fence-grace", "30"], log_path=log_path) as c:
        reference = c.complete(PROMPT, max_tokens=120, ignore_eos=True)["choices"][0]["token_ids"]
        ids, finish, victim = _kill_mid_stream(c, signal.SIGSTOP)
        assert ids == reference and finish == "length"
        # detected within the heartbeat deadline (10 x 100 ms by default), plus scheduling slack on a
        # loaded 2-core box
        deadline = time.monotonic() + c.state()["hb_deadline_s"] + 4
        while c.worker(victim["id"])["pid"] == victim["pid"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.worker(victim["id"])["epoch"] >= 2
        def ignored(state):  # reached the controller from an old epoch, or dropped by its transport as such
            return state["stale_messages"] + state["transport_drops"].get("stale_epoch", 0)

        ignored_before = ignored(c.state())
        os.kill(victim["pid"], signal.SIGCONT)  # the hung incarnation comes back ...
        deadline = time.monotonic() + 10
        while worker_pids_alive([victim["pid"]]) and time.monotonic() < deadline:
            time.sleep(0.05)
        # ... its messages are ignored (stale epoch; which of the two depends on whether its replacement
        # has spoken yet) and it is made to exit well before the 30 s fence grace
        assert ignored(c.state()) > ignored_before
        assert not worker_pids_alive([victim["pid"]])
        c.wait_serving(2, timeout=60)
    # both first incarnations served, so armed their heartbeat watchdogs: the worker's stderr (where a
    # stack dump would go) is in the cluster log
    armed = re.findall(r"\[worker (\d+)\.1\] INFO heartbeat watchdog: no beat for 0.50 s", log_path.read_text())
    assert sorted(armed) == ["0", "1"], armed


def test_every_worker_killed_gives_503_then_the_cluster_comes_back(cluster):
    # (several workers killed at once, with requests recovered unchanged: test_recovery's double and
    # triple kill under --ckpt-replicas 2, and lumen chaos's kill-many and kill-executor-and-holder)
    c = cluster
    reference = c.complete(PROMPT, max_tokens=80, ignore_eos=True)["choices"][0]["token_ids"]
    # every worker dies: in-flight requests get a clear 503 (or, where a worker is back in time, finish
    # there), then the cluster comes back
    box = {}
    t = threading.Thread(target=lambda: box.update(r=c.stream_tokens(PROMPT, max_tokens=600, ignore_eos=True)))
    t.start()
    c.executor_of()
    for wid in range(WORKERS):
        c.kill(wid)
    t.join(60)
    ids, finish, errors = box["r"]
    assert errors and errors[0]["type"] == "service_unavailable" or finish is not None
    c.wait_serving(WORKERS, timeout=120)
    assert c.complete(PROMPT, max_tokens=80, ignore_eos=True)["choices"][0]["token_ids"] == reference


def test_worker_killed_during_its_own_reload(cluster):
    c = cluster
    first = c.worker(1)["epoch"]  # the shared cluster: earlier tests may have restarted worker 1 already
    c.kill(1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        w = c.worker(1)
        if w["epoch"] >= first + 1 and w["pid"] and w["state"] != "serving":
            try:
                os.kill(w["pid"], signal.SIGKILL)  # killed while loading
                break
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    c.wait_serving(WORKERS, timeout=90)
    assert c.worker(1)["epoch"] >= first + 2
    assert c.complete(PROMPT, max_tokens=4)["usage"]["completion_tokens"] == 4


def test_api_key_and_backpressure(tiny_dir):
    with run_cluster(tiny_dir, workers=1, extra=["--api-key", "sekret", "--max-pending", "2"]) as c:
        r = c.client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        headers = {"Authorization": "Bearer sekret"}
        ok = c.client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                           headers=headers)
        assert ok.status_code == 200
        statuses = []

        def hit():
            with httpx.Client(base_url=c.url, timeout=120) as cl:
                statuses.append(cl.post("/v1/completions", headers=headers, json={
                    "model": "tiny", "prompt": PROMPT, "max_tokens": 600, "ignore_eos": True}).status_code)

        threads = [threading.Thread(target=hit) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert 429 in statuses and 200 in statuses


def test_sigterm_drains_in_flight_requests(cluster):
    # the shared cluster's last test: it stops the cluster (no test after it in this file may use it)
    c = cluster
    box = {}
    t = threading.Thread(target=lambda: box.update(r=c.stream_tokens(PROMPT, max_tokens=300, ignore_eos=True)))
    t.start()
    c.executor_of()
    c.proc.send_signal(signal.SIGTERM)  # drain: the stream in flight still completes
    t.join(120)
    ids, finish, errors = box["r"]
    assert not errors and finish == "length" and len(ids) == 300
    assert c.proc.wait(timeout=60) == 0
    # no worker process is left: every incarnation the shared cluster had (run_cluster's exit checks
    # the same again at the end of the module)
    deadline = time.monotonic() + 5
    while worker_pids_alive(c.seen_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c.seen_pids and not worker_pids_alive(c.seen_pids)


def test_default_model_answers_the_openai_client():
    openai = pytest.importorskip("openai")
    with run_cluster("default", workers=2, name="default") as c:
        client = openai.OpenAI(base_url=c.url + "/v1", api_key="unused")
        out = client.chat.completions.create(model="default", max_tokens=24, temperature=0,
                                             messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in out.choices[0].message.content
