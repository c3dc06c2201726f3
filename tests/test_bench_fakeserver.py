"""TEST DOUBLE, not lumen: a tiny OpenAI-compatible SSE server for testing lumen.bench's client,
fault injector and runner before/without the real cluster. Run as a script:

    python tests/test_bench_fakeserver.py --port N [--workers 4] [--policy P] [--token-delay S]

It spawns ``--workers`` real child processes (sleepers) as stand-in workers and reports them on
``GET /lumen/cluster`` so the injector can really SIGKILL/SIGSTOP them. When one dies, requests
"assigned" to it are marked interrupted and every request is slowed for a policy-dependent
period (``stop-restart`` longest, ``lumen`` shortest) before a replacement worker (epoch + 1) is
started, which gives the runner a degradation to measure. Every chunk names the worker serving the
request (``"lumen": {"worker": id}``; lumen's gateway names it only when it changes): the request's
own, then after an interruption the killed worker's ring neighbour. Behaviour switches via "model":
``error-503`` (HTTP 503), ``stream-error`` (error event after 2 tokens), ``hang`` (first token,
then nothing), ``drop`` (2 tokens, then the connection closes). pytest collects no tests here.
"""


import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

RECOVERY_S = {"stop-restart": 1.0, "fixed-ckpt": 0.7, "lumen": 0.4}


def build_app(n_workers: int, policy: str, token_delay: float, prefill_per_token: float, max_model_len: int):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    # recovered: the controller's per-worker counters of interrupted requests taken over (recovered_here)
    state = {"workers": [], "degraded_until": 0.0, "next": 0,
             "recovered": [{"restored": 0, "recomputed": 0, "tokens": 0} for _ in range(n_workers)]}

    @asynccontextmanager
    async def lifespan(app):
        state["workers"] = [spawn(i, 0) for i in range(n_workers)]
        task = asyncio.create_task(monitor())
        try:
            yield
        finally:
            task.cancel()
            for w in state["workers"]:
                w["proc"].kill()
                w["proc"].wait()

    app = FastAPI(lifespan=lifespan)

    def spawn(wid: int, epoch: int) -> dict:
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10**6)  # lumen fake worker"])
        return {"id": wid, "state": "serving", "epoch": epoch, "pid": p.pid, "host": "127.0.0.1", "proc": p}

    def died(w: dict) -> bool:
        if w["proc"].poll() is not None:
            return True
        try:  # a SIGSTOPped worker counts as failed while stopped (a hang)
            with open(f"/proc/{w['pid']}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "T"
        except OSError:
            return True

    async def monitor() -> None:
        while True:
            for i, w in enumerate(state["workers"]):
                if w["state"] == "serving" and died(w):
                    w["state"] = "down"
                    state["degraded_until"] = time.monotonic() + RECOVERY_S.get(policy, 1.0)
                    asyncio.get_running_loop().call_later(RECOVERY_S.get(policy, 1.0), restart, i)
            await asyncio.sleep(0.02)

    def restart(i: int) -> None:
        old = state["workers"][i]
        if old["proc"].poll() is None:
            old["proc"].kill()
        old["proc"].wait()
        state["workers"][i] = spawn(old["id"], old["epoch"] + 1)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model", "max_model_len": max_model_len}]}

    @app.get("/lumen/cluster")
    async def cluster():
        ws = [{**{k: v for k, v in w.items() if k != "proc"}, "recovered_here": dict(state["recovered"][w["id"]])}
              for w in state["workers"]]
        return {"workers": ws, "policy": policy}

    def err(status: int, msg: str):
        return JSONResponse({"error": {"message": msg, "type": "x", "param": None, "code": None}}, status)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt, n, model = body.get("prompt"), body.get("max_tokens"), body.get("model")
        if not (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
            return err(400, "prompt must be a non-empty token id list")
        if not isinstance(n, int) or n < 1 or body.get("stream") is not True or body.get("ignore_eos") is not True:
            return err(400, "max_tokens >= 1, stream and ignore_eos required by this double")
        if model not in ("fake-model", "error-503", "stream-error", "hang", "drop"):
            return err(404, f"model {model!r} does not exist")
        if len(prompt) + n > max_model_len:
            return err(400, "context length exceeded")
        if model == "error-503":
            return err(503, "no worker available")
        wid = state["next"] % n_workers
        state["next"] += 1
        epoch = state["workers"][wid]["epoch"]

        def chunk(ids, finish=None, extra=None):
            c = {"id": "x", "object": "text_completion", "choices": [
                {"index": 0, "text": "a" * len(ids), "token_ids": ids, "finish_reason": finish}]}
            if extra:
                c.update(extra)
            return f"data: {json.dumps(c)}\n\n"

        async def slow(dt: float) -> None:
            # while degraded every step takes 4x: the bench must see TTFT rise and settle
            await asyncio.sleep(dt * (4.0 if time.monotonic() < state["degraded_until"] else 1.0))

        async def gen():
            await slow(0.01 + prefill_per_token * len(prompt))
            interrupted = False
            for i in range(n):
                if model == "hang" and i == 1:
                    await asyncio.sleep(3600)
                if model == "drop" and i == 2:
                    raise RuntimeError("fake connection drop")
                if model == "stream-error" and i == 2:
                    yield 'data: {"error": {"message": "worker lost", "type": "server_error"}}\n\n'
                    return
                w = state["workers"][wid]
                if not interrupted and (w["state"] != "serving" or w["epoch"] != epoch):
                    interrupted = True
                    # the double "moves" it to the ring neighbour: restored there unless stop-restart
                    here = state["recovered"][(wid + 1) % n_workers]
                    here["recomputed" if policy == "stop-restart" else "restored"] += 1
                    here["tokens"] += len(prompt) + i
                ext = {"worker": (wid + 1) % n_workers if interrupted else wid}
                if interrupted:
                    ext["interrupted"] = True
                yield chunk([7], "length" if i == n - 1 else None, {"lumen": ext})
                if i < n - 1:
                    await slow(token_delay)
            yield f'data: {json.dumps({"choices": [], "usage": {"prompt_tokens": len(prompt), "completion_tokens": n}})}\n\n'
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--policy", default="stop-restart")
    ap.add_argument("--token-delay", type=float, default=0.005)
    ap.add_argument("--prefill-per-token", type=float, default=0.0001)
    ap.add_argument("--max-model-len", type=int, default=4096)
    a = ap.parse_args()
    import uvicorn

    app = build_app(a.workers, a.policy, a.token_delay, a.prefill_per_token, a.max_model_len)
    try:
        uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning")
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
