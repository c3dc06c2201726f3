"""API fuzzing against a live cluster: schemathesis over the gateway's OpenAPI schema (valid and invalid
requests), plus hand-written abuse (huge prompts and bodies, deep JSON, invalid UTF-8, lone surrogates,
content types, header abuse, bad API keys, NaN/inf/huge numbers, wrong types, truncated requests).

Every answer must be a well-formed 2xx, or a 4xx with an OpenAI-style error body
`{"error": {"message", "type", "param", "code"}}` -- never a 5xx for a client's error, never a hang --
and the cluster must be healthy afterwards: the same worker processes, all serving, and a normal
completion still succeeds. LUMEN_FUZZ_API_EXAMPLES scales the number of generated requests per operation
and mode; LUMEN_FUZZ_SEED picks the seed.
"""

from __future__ import annotations

import json
import os
import socket
import time

import httpx
import pytest
import schemathesis
from cluster_util import make_tiny_model_dir, run_cluster, worker_pids_alive
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.cluster

EXAMPLES = int(os.environ.get("LUMEN_FUZZ_API_EXAMPLES", "40"))
SEED = int(os.environ.get("LUMEN_FUZZ_SEED", "20261128"))
API_KEY = "fuzz-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 64 * 1024
MAX_LEN = 256
MAX_GEN = 4  # generated requests never ask for more tokens than this: the run stays short
PROMPT = list(range(100, 130))


def assert_error_body(r: httpx.Response, status: int | None = None) -> dict:
    """A client error with an OpenAI-style body."""
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:300]}"
    if status is not None:
        assert r.status_code == status, f"{r.status_code}: {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)
    return err


def assert_ok_or_client_error(status: int, content_type: str, text: str, cut_short: bool = False) -> None:
    assert status < 500, f"server error {status} for a client's request: {text[:300]}"
    if status >= 400:
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    elif content_type.startswith("text/event-stream"):
        events = [ln for ln in text.splitlines() if ln.startswith("data: ")]
        assert events and (cut_short or events[-1] == "data: [DONE]"), text[-300:]
        for ev in events:
            if ev != "data: [DONE]":
                json.loads(ev[6:])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    with run_cluster(str(model), workers=2, extra=["--api-key", API_KEY, "--max-body-bytes", str(MAX_BODY),
                                                   "--max-model-len", str(MAX_LEN)]) as c:
        c.client.headers.update(AUTH)
        state = c.state()
        c.start_pids = [w["pid"] for w in state["workers"]]
        yield c


def assert_healthy(c) -> None:
    state = c.state()
    assert [w["pid"] for w in state["workers"]] == c.start_pids, "a worker was restarted"
    assert {w["state"] for w in state["workers"]} == {"serving"}, state["workers"]
    assert worker_pids_alive(c.start_pids) == c.start_pids
    assert c.proc.poll() is None
    out = c.complete(PROMPT, max_tokens=3)
    assert out["usage"]["completion_tokens"] == 3 and out["choices"][0]["finish_reason"] == "length"


def post(c, body: bytes | str, path: str = "/v1/completions", headers: dict | None = None, **kw) -> httpx.Response:
    h = {"content-type": "application/json", **AUTH, **(headers or {})}
    return c.client.post(path, content=body, headers=h, timeout=30, **kw)


# ----------------------------------------------------------------------------- schemathesis


def _bound(case) -> None:
    """Keep generated work small: at most MAX_GEN new tokens (a request that leaves max_tokens out gets
    it set; a valid but larger one is clamped; an invalid one is left invalid)."""
    body = case.body
    if not isinstance(body, dict):
        return
    keys = ["max_tokens", "max_completion_tokens"] if "messages" in body else ["max_tokens"]
    if all(body.get(k) is None for k in keys):
        body[keys[0]] = MAX_GEN
    for k in keys:
        v = body.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool) and MAX_GEN < v < MAX_LEN and v == int(v):
            body[k] = MAX_GEN  # (2.0 is an integer in JSON)


@schemathesis.check
def negative_data_refused(ctx, response, case):
    """schemathesis's negative_data_rejection, with 413 counted as a rejection too: an invalid body that
    is also over --max-body-bytes (e.g. thousands of generated messages) is refused for its size first."""
    if response.status_code == 413:
        return True
    return negative_data_rejection(ctx, response, case)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_refused]


def _fuzz_operation(op, mode, n: int, base_url: str, session) -> dict[int, int]:
    """n generated requests to one operation; returns how many got each status."""
    counts: dict[int, int] = {}

    @seed(SEED)
    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode))
    def run(case):
        _bound(case)
        started = time.monotonic()
        # valid data carries the valid key; invalid data keeps a generated (negated) Authorization header
        own = any(k.lower() == "authorization" for k in (case.headers or {}))
        headers = {} if own and mode == GenerationMode.NEGATIVE else dict(AUTH)
        resp = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        assert time.monotonic() - started < 30
        counts[resp.status_code] = counts.get(resp.status_code, 0) + 1
        content_type = (resp.headers.get("content-type") or [""])[0]  # schemathesis: header -> list of values
        try:
            # (schemathesis stops reading a stream after a number of events)
            assert_ok_or_client_error(resp.status_code, content_type, resp.text,
                                      getattr(resp, "stream_cut_short", False))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nrequest body: {json.dumps(case.body)[:2000]}") from None
        case.validate_response(resp, checks=CHECKS, headers=headers)

    run()
    return counts


def test_schemathesis_positive_and_negative(cluster):
    import copy

    import requests

    schema = schemathesis.openapi.from_url(cluster.url + "/openapi.json")
    doc = schema.raw_schema
    assert "ErrorResponse" in doc["components"]["schemas"]
    assert doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    # with the bearer scheme in the schema, negative data is mostly a mangled Authorization header; a
    # second negative pass without it mangles the bodies (bad keys have their own tests below)
    plain = copy.deepcopy(doc)
    for ops_ in plain["paths"].values():
        for op_ in ops_.values():
            op_.pop("security", None)
    plain["components"].pop("securitySchemes", None)
    passes = [("keyed", schema, GenerationMode.POSITIVE), ("keyed", schema, GenerationMode.NEGATIVE),
              ("body", schemathesis.openapi.from_dict(plain), GenerationMode.NEGATIVE)]
    seen: dict[tuple[str, str], dict[int, int]] = {}
    t0 = time.monotonic()
    with requests.Session() as session:
        for name, sch, mode in passes:
            ops = [r.ok() for r in sch.get_all_operations()]
            assert {op.label for op in ops} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                                "GET /v1/models", "GET /health", "GET /metrics", "GET /lumen/cluster"}
            for op in ops:
                post_op = op.method.upper() == "POST"
                if not post_op and mode == GenerationMode.NEGATIVE:
                    continue  # nothing to negate: they take no input
                seen[(op.label, f"{name}-{mode.value}")] = _fuzz_operation(op, mode, EXAMPLES if post_op else 2,
                                                                           cluster.url, session)
    elapsed = time.monotonic() - t0
    print(f"schemathesis: {sum(sum(v.values()) for v in seen.values())} requests in {elapsed:.1f}s: {seen}")
    # both kinds of data really reached the server: successes from valid data, 400s from invalid data
    for op in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert seen[(op, "keyed-positive")].get(200, 0) > 0, seen
        assert seen[(op, "keyed-negative")].get(401, 0) > 0, seen
        assert seen[(op, "body-negative")].get(400, 0) > EXAMPLES // 2, seen
    assert_healthy(cluster)


# ----------------------------------------------------------------------------- hand-written cases

BAD_BODIES = [
    # not JSON / not text
    b"", b"{", b"\xff\xfe\x00{", b'{"prompt": "\xc0\xaf"}', b'{"prompt": "\xed\xa0\x80"}', b"\x00" * 64,
    # JSON, but a lone surrogate: valid JSON text, not valid Unicode
    b'{"prompt": "\\ud800", "max_tokens": 2}', b'{"model": "\\udfff", "prompt": "x"}',
    b'{"prompt": "ok", "stop": ["\\ud83d"], "max_tokens": 2}',
    # deep nesting: past the parser's recursion limit, and deep but parseable in every field
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"prompt": ' + b"[" * 500 + b"1" + b"]" * 500 + b"}",
    b'{"prompt": "x", "stream_options": ' + b'{"a":' * 400 + b"1" + b"}" * 400 + b"}",
    # numbers: NaN, infinities, past a double, past Python's 4300-digit int parsing limit, huge ints
    b'{"prompt": "x", "temperature": NaN}', b'{"prompt": "x", "top_p": Infinity}',
    b'{"prompt": "x", "temperature": -Infinity}', b'{"prompt": "x", "max_tokens": 1e400}',
    b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}",
    b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
    b'{"prompt": "x", "top_k": 1' + b"0" * 30 + b"}", b'{"prompt": "x", "seed": 18446744073709551616}',
    b'{"prompt": "x", "max_tokens": -1}', b'{"prompt": "x", "max_tokens": 0}', b'{"prompt": "x", "max_tokens": 2.5}',
    b'{"prompt": [-1]}', b'{"prompt": [1.5]}', b'{"prompt": [1e400]}', b'{"prompt": [49152]}', b'{"prompt": "x", "stop_token_ids": [-5]}', (b'{"prompt": "x", "stop_token_ids": [' + b",".join(b"%d" % i for i in range(1, 18)) + b']}'),
    # wrong types everywhere
    b"[]", b"null", b"42", b'"prompt"', b'{"prompt": {}}', b'{"prompt": true}', b'{"prompt": null}',
    b'{"prompt": 5}', b'{"prompt": [[1], [2]]}', b'{"prompt": ["a", "b"]}', b'{"prompt": [[]]}',
    b'{"prompt": "x", "stream": "yes"}', b'{"prompt": "x", "stop": {}}', b'{"prompt": "x", "model": 5}',
    b'{"prompt": "x", "stream": true, "stream_options": {"include_usage": "yes"}}',
    b'{"prompt": "x", "stream_options": {"include_usage": true}}', b'{"prompt": "x", "logprobs": 5}',
    b'{"prompt": "x", "n": 3}', b'{"prompt": "x", "stop": ' + json.dumps(["s"] * 40).encode() + b"}",
]
BAD_CHAT = [
    b'{"messages": "hi"}', b'{"messages": []}', b'{"messages": [1]}', b'{"messages": [{"role": "user"}]}',
    b'{"messages": [{"role": "wizard", "content": "x"}]}', b'{"messages": [{"role": "user", "content": 5}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}',
    b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
    b'{"messages": ' + json.dumps([{"role": "user", "content": "x"}] * 2000).encode() + b"}",
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=lambda b: repr(b[:40]))
def test_bad_completion_bodies_get_openai_errors(cluster, body):
    assert_error_body(post(cluster, body))


@pytest.mark.parametrize("body", BAD_CHAT, ids=lambda b: repr(b[:40]))
def test_bad_chat_bodies_get_openai_errors(cluster, body):
    assert_error_body(post(cluster, body, "/v1/chat/completions"))


def test_huge_prompts_are_refused_fast(cluster):
    # beyond the context, but inside the body limit: refused before any tokenizer work that could stall
    # the gateway (a 4 MB prompt took seconds of GIL-holding tokenization)
    words = "lorem ipsum " * 5000
    for path, body in [("/v1/completions", {"prompt": words}),
                       ("/v1/completions", {"prompt": list(range(1, MAX_LEN + 1))}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": words}]})]:
        t0 = time.monotonic()
        err = assert_error_body(post(cluster, json.dumps(body)), 400) if path == "/v1/completions" else \
            assert_error_body(post(cluster, json.dumps(body), path), 400)
        assert err["code"] == "context_length_exceeded", err
        assert time.monotonic() - t0 < 5
    # one token short of the context with max_tokens=1 fits; one more does not
    ok = post(cluster, json.dumps({"prompt": list(range(1, MAX_LEN)), "max_tokens": 1}))
    assert ok.status_code == 200, ok.text
    assert_error_body(post(cluster, json.dumps({"prompt": list(range(1, MAX_LEN)), "max_tokens": 2})), 400)


def test_body_size_limit(cluster):
    big = json.dumps({"prompt": "a" * (MAX_BODY + 10)}).encode()
    err = assert_error_body(post(cluster, big), 413)
    assert err["code"] == "request_too_large"
    # chunked upload (no Content-Length): refused once it passes the limit, not buffered whole

    def chunks():
        yield b'{"prompt": "'
        for _ in range(48):  # 192 KiB: past the limit, short of the point where the gateway stops reading
            yield b"b" * 4096
        yield b'"}'

    r = cluster.client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert_error_body(r, 413)
    # just under the limit is still parsed (and refused for its length in tokens, not bytes)
    near = json.dumps({"prompt": "c " * ((MAX_BODY - 100) // 2)}).encode()
    assert len(near) <= MAX_BODY
    assert assert_error_body(post(cluster, near), 400)["code"] == "context_length_exceeded"


def _raw(cluster, data: bytes, read_timeout: float = 10) -> bytes:
    host, port = cluster.url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def test_declared_huge_body_refused_without_reading_it(cluster):
    # Content-Length of a terabyte and no body: the 413 comes at once, nothing is read or allocated
    t0 = time.monotonic()
    out = _raw(cluster, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + API_KEY.encode() +
               b"\r\nContent-Type: application/json\r\nContent-Length: 1000000000000\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    assert b'"request_too_large"' in out
    assert time.monotonic() - t0 < 5


def test_truncated_and_malformed_http(cluster):
    # a body shorter than its Content-Length, then the client goes away: nothing hangs or leaks
    _raw(cluster, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{\"prompt\":", 1)
    # a request line h11 cannot parse, and headers past its 16 KiB limit: OpenAI-style 400
    for data in [b"GARBAGE\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                 b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (32 << 10)]:
        out = _raw(cluster, data)
        head, _, body = out.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), out[:200]
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                          "application/xml", "", "*/*"])
def test_content_types(cluster, content_type):
    """lumen reads any body as JSON (like OpenAI's clients send it); a body that is not JSON gets a 400
    whatever the content type says, a JSON body works whatever it says."""
    headers = dict(AUTH)
    if content_type is not None:
        headers["content-type"] = content_type
    good = cluster.client.post("/v1/completions", content=json.dumps({"prompt": PROMPT, "max_tokens": 2}),
                               headers=headers)
    assert good.status_code == 200, good.text
    assert_error_body(cluster.client.post("/v1/completions", content=b"prompt=hello&max_tokens=2",
                                          headers=headers), 400)
    assert_error_body(cluster.client.post("/v1/completions", content=b"<prompt>hi</prompt>", headers=headers), 400)


@pytest.mark.parametrize("auth", [None, "", "Bearer", "Bearer wrong", "Basic Zm9vOmJhcg==",
                                  f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}", f"Token {API_KEY}",
                                  "Bearer " + "k" * 8000, b"Bearer \xff\xfe", f"Bearer  {API_KEY}",
                                  b"Bearer " + API_KEY.encode() + b"\xff"])
def test_bad_authorization(cluster, auth):
    headers = {"content-type": "application/json"}
    if auth is not None:
        headers["authorization"] = auth
    with httpx.Client(base_url=cluster.url, timeout=30) as cl:
        for path, body in [("/v1/completions", {"prompt": "x", "max_tokens": 1}), ("/v1/models", None)]:
            r = cl.post(path, json=body, headers=headers) if body else cl.get(path, headers=headers)
            err = assert_error_body(r, 401)
            assert err["code"] == "invalid_api_key"


def test_header_abuse(cluster):
    with httpx.Client(base_url=cluster.url, timeout=30) as cl:
        # many headers, duplicated Authorization (a wrong one first), odd bytes in values: still 2xx/4xx
        many = [(f"x-h{i}", "v" * 20) for i in range(300)]
        r = cl.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1}, headers=[*many, *AUTH.items()])
        assert r.status_code in (200, 400), r.text
        if r.status_code == 400:
            assert_error_body(r)
        r = cl.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1},
                    headers=[("authorization", "Bearer wrong"), *AUTH.items()])
        assert_error_body(r, 401)
        r = cl.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1},
                    headers={**AUTH, "x-odd": b"\xff\x80 x", "content-length-x": "-1"})
        assert r.status_code == 200, r.text
    # a negative, a non-numeric and a duplicated Content-Length are refused by the HTTP parser
    for cl_value in (b"-1", b"abc", b"5\r\nContent-Length: 6"):
        out = _raw(cluster, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                   API_KEY.encode() + b"\r\nContent-Length: " + cl_value + b"\r\n\r\n{}")
        assert out.startswith(b"HTTP/1.1 400"), out[:200]


def test_methods_and_paths(cluster):
    assert_error_body(cluster.client.put("/v1/completions", json={"prompt": "x"}), 405)
    assert_error_body(cluster.client.delete("/v1/chat/completions"), 405)
    assert_error_body(cluster.client.get("/v1/completions"), 405)
    assert_error_body(cluster.client.get("/v1/nope"), 404)
    assert_error_body(cluster.client.get("/" + "a" * 4000), 404)
    assert_error_body(cluster.client.post("/v1/completions/%00%ff", json={}), 404)


def test_streaming_with_bad_and_good_input(cluster):
    r = post(cluster, json.dumps({"prompt": PROMPT, "max_tokens": 3, "stream": True,
                                  "stream_options": {"include_usage": True}}))
    assert_ok_or_client_error(r.status_code, r.headers["content-type"], r.text)
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert_error_body(post(cluster, json.dumps({"prompt": [10**9], "stream": True})), 400)


def test_cluster_healthy_after_all_of_it(cluster):
    assert_healthy(cluster)
    text = cluster.client.get("/metrics").text
    failures = [ln for ln in text.splitlines() if ln.startswith("lumen:worker_failures_total{")]
    assert all(float(ln.split()[-1]) == 0 for ln in failures), failures
