"""Client-side abuse against a live cluster (issue: chaos and abuse, item 2).

A client that disconnects mid-stream, one that never reads its stream, and a crowd of idle
connections: each abandoned request's KV pages, checkpoint reservation and stored pages are freed
at once, and a well-behaved stream running alongside finishes with exactly its failure-free output.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from cluster_util import make_tiny_model_dir, run_cluster, wait_until

pytestmark = pytest.mark.cluster

PROMPT = list(range(300, 348))  # 3 full pages
LONG = 1500


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


def _held(c) -> dict:
    """Per worker: running + waiting sequences, KV usage, checkpoint reservations and pages held."""
    out = {}
    for w in c.state()["workers"]:
        st = w["stats"]
        out[w["id"]] = (st.get("num_running", 0) + st.get("num_waiting", 0), st.get("kv_usage", 0.0),
                        st.get("ckpt_reserved_bytes", 0), st.get("ckpt_pages", 0))
    return out


def _drained(c) -> bool:
    return not c.state()["requests"] and all(v == (0, 0.0, 0, 0) for v in _held(c).values())


def _raw_stream_request(url: str, body: dict) -> socket.socket:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def test_abandoned_requests_are_freed_while_others_keep_streaming(tiny_dir):
    with run_cluster(tiny_dir, workers=2, policy="lumen", extra=["--deterministic"]) as c:
        reference = c.complete(PROMPT, max_tokens=200, ignore_eos=True)["choices"][0]["token_ids"]
        wait_until(lambda: _drained(c), 10, "the reference request was not freed")

        # a well-behaved client streams all along
        box = {}
        good = threading.Thread(target=lambda: box.update(r=c.stream_tokens(PROMPT, max_tokens=200, ignore_eos=True)))

        # 1. a client that disconnects mid-stream, once its request is checkpointed on the other worker
        seen = []
        with httpx.Client(base_url=c.url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json={
                    "model": "tiny", "prompt": list(range(500, 548)), "max_tokens": LONG, "stream": True,
                    "ignore_eos": True, "temperature": 0}) as r:
                for line in r.iter_lines():
                    seen.append(line)
                    st = c.state()
                    if any(q["holder"] is not None and q["valid_ckpt_tokens"] >= 64 for q in st["requests"]):
                        break
            # the connection is closed here, mid-stream
        assert len(seen) < LONG
        # its KV pages, its checkpoint reservation and stored pages go at once, not at max_tokens
        wait_until(lambda: _drained(c), 5, "the disconnected request was not freed")
        good.start()

        # 2. a client that never reads: its request runs to the end (or is freed), others are not slowed
        lazy = _raw_stream_request(c.url, {"model": "tiny", "prompt": list(range(600, 648)), "max_tokens": LONG,
                                           "stream": True, "ignore_eos": True, "temperature": 0})
        # 3. many idle connections that send half a request line and then nothing
        host, port = c.url.split("//", 1)[1].rsplit(":", 1)
        idle = []
        for _ in range(64):
            s = socket.create_connection((host, int(port)))
            s.sendall(b"GET /health HTTP/1.1\r\nHo")
            idle.append(s)
        t0 = time.monotonic()
        assert c.client.get("/health").status_code == 200
        short = c.complete(list(range(700, 716)), max_tokens=8)
        assert short["choices"][0]["finish_reason"] == "length"
        assert time.monotonic() - t0 < 30

        good.join(120)
        ids, finish, errors = box["r"]
        assert not errors and finish == "length" and ids == reference

        lazy.close()
        for s in idle:
            s.close()
        wait_until(lambda: _drained(c), 60, f"resources left behind: {_held(c)}, requests {c.state()['requests']}")
        assert all(w["state"] == "serving" for w in c.state()["workers"])
