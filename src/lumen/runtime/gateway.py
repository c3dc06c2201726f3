"""The HTTP gateway: OpenAI-compatible API, health, metrics and cluster introspection.

The gateway is the one place that decides which tokens a client has seen: it forwards a token
only after appending it to the request's history in the controller, so a recovered request
continues after the last token the client received, in the same stream (DESIGN.md invariant 2).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.params import SamplingParams
from ..model.tokenizer import IncrementalDecoder
from . import metrics_prom as M
from .controller import ClusterBusy, ClusterUnavailable, Controller
from .openai_api import (
    APIError,
    GenerationRequest,
    completion_response,
    parse_chat,
    parse_completion,
    parse_json_body,
    stream_chunk,
    usage_chunk,
)
from .stop_strings import StopMatcher

log = logging.getLogger("lumen.gateway")


class Gateway:
    def __init__(self, controller: Controller, tokenizer, vocab_size: int, max_model_len: int,
                 api_key: str | None = None, eos_token_ids: tuple[int, ...] = ()):
        self.controller = controller
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.eos_token_ids = eos_token_ids
        self.model_name = controller.cfg.served_model_name
        self.app = self._build_app()

    # ------------------------------------------------------------------ app
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="lumen", version="0.1.0")

        @app.exception_handler(APIError)
        async def _api_error(_req: Request, exc: APIError):
            return JSONResponse(exc.body(), status_code=exc.status)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(_req: Request, exc: StarletteHTTPException):
            err = APIError(exc.status_code, str(exc.detail))
            return JSONResponse(err.body(), status_code=exc.status_code)

        @app.exception_handler(RequestValidationError)
        async def _validation_error(_req: Request, exc: RequestValidationError):
            return JSONResponse(APIError(400, str(exc.errors()[:3])).body(), status_code=400)

        @app.middleware("http")
        async def _auth(request: Request, call_next):
            if self.api_key and request.url.path.startswith("/v1"):
                auth = request.headers.get("authorization", "")
                token = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                    err = APIError(401, "Incorrect API key provided", code="invalid_api_key")
                    return JSONResponse(err.body(), status_code=401)
            return await call_next(request)

        @app.get("/health")
        async def health():
            if self.controller.serving_workers():
                return Response(status_code=200)
            return JSONResponse(APIError(503, "no worker is serving").body(), status_code=503)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                "owned_by": "lumen", "max_model_len": self.max_model_len,
                                                "vocab_size": self.vocab_size}]}

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(M.REGISTRY), media_type=CONTENT_TYPE_LATEST)

        @app.get("/lumen/cluster")
        async def cluster():
            return self.controller.cluster_json()

        @app.post("/v1/completions")
        async def completions(request: Request):
            body = parse_json_body(await request.body())
            req = parse_completion(body, self.model_name, self.vocab_size)
            if req.prompt_ids is None:
                if self.tokenizer is None:
                    raise APIError(400, "this model has no tokenizer; send the prompt as a list of token ids",
                                   param="prompt")
                req.prompt_ids = self.tokenizer.encode(req.prompt_text)
            return await self._generate(request, req)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = parse_json_body(await request.body())
            req, messages = parse_chat(body, self.model_name, self.vocab_size)
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer, so chat is unavailable; use /v1/completions "
                                    "with token ids")
            try:
                req.prompt_ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                    tokenize=True)
            except Exception as exc:  # a template error is the request's fault (e.g. roles out of order)
                raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from None
            return await self._generate(request, req)

        return app

    # ------------------------------------------------------------------ generation
    def _sampling_params(self, req: GenerationRequest) -> SamplingParams:
        n_prompt = len(req.prompt_ids)
        if n_prompt == 0:
            raise APIError(400, "prompt must not be empty", param="prompt")
        room = self.max_model_len - n_prompt
        if room < 1:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                                f"prompt has {n_prompt} tokens", param="prompt", code="context_length_exceeded")
        max_tokens = req.max_tokens if req.max_tokens is not None else min(16 if req.kind == "completion"
                                                                           else room, room)
        if max_tokens > room:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; you "
                                f"requested {n_prompt} prompt tokens and max_tokens={max_tokens}",
                           param="max_tokens", code="context_length_exceeded")
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, seed=req.seed, stop_token_ids=tuple(req.stop_token_ids),
                                  ignore_eos=req.ignore_eos).validate()
        except ValueError as exc:
            raise APIError(400, str(exc)) from None

    async def _generate(self, http_request: Request, req: GenerationRequest):
        params = self._sampling_params(req)
        try:
            state = self.controller.submit(req.request_id, req.prompt_ids, params)
        except ClusterBusy as exc:
            raise APIError(429, str(exc)) from None
        except ClusterUnavailable as exc:
            raise APIError(503, str(exc)) from None
        M.PROMPT_TOKENS.inc(len(req.prompt_ids))
        if req.stream:
            return StreamingResponse(self._stream(http_request, req, state), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text_parts: list[str] = []
        token_ids: list[int] = []
        try:
            async for kind, text, ids, finish in self._events(req, state):
                if kind == "error":
                    status, message = finish
                    raise APIError(status, message)
                text_parts.append(text)
                token_ids.extend(ids)
                if finish:
                    body = completion_response(req, "".join(text_parts), token_ids, finish, len(req.prompt_ids))
                    if state.interrupts:
                        body["lumen"] = {"interrupted": state.interrupts}
                    return body
        finally:
            self._cleanup(state)
        raise APIError(500, "generation ended without a finish reason")

    def _cleanup(self, state) -> None:
        if not state.done:
            self.controller.abort(state.id)
        else:
            self.controller.finished(state.id)

    async def _events(self, req: GenerationRequest, state) -> AsyncIterator[tuple]:
        """Yields ("tokens", text, ids, finish_reason|None) and ("error", "", [], (status, msg))."""
        decoder = IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None
        stops = StopMatcher(req.stop)
        start = state.arrival
        last = None
        n_out = 0
        while True:
            event = await state.events.get()
            kind = event[0]
            now = time.monotonic()
            if kind == "error":
                yield ("error", "", [], (event[1], event[2]))
                return
            if kind == "tokens":
                ids = event[1]
                if n_out == 0:
                    M.TTFT.observe(now - start)
                elif last is not None:
                    M.ITL.observe((now - last) / max(1, len(ids)))
                last = now
                n_out += len(ids)
                M.GEN_TOKENS.inc(len(ids))
                text = stops.push(decoder.add(ids)) if decoder is not None else ""
                if stops.stopped:
                    self.controller.abort(state.id)
                    M.SUCCESS.labels(finished_reason="stop").inc()
                    M.E2E.observe(now - start)
                    yield ("tokens", text, ids, "stop")
                    return
                yield ("tokens", text, ids, None)
            elif kind == "finish":
                reason = event[1]
                tail = (stops.push(decoder.flush()) + stops.flush()) if decoder is not None else ""
                M.SUCCESS.labels(finished_reason=reason).inc()
                M.E2E.observe(now - start)
                yield ("tokens", tail, [], reason)
                return

    async def _stream(self, http_request: Request, req: GenerationRequest, state) -> AsyncIterator[bytes]:
        first = True
        n_tokens = 0
        try:
            async for kind, text, ids, finish in self._events(req, state):
                if kind == "error":
                    status, message = finish
                    yield _sse(APIError(status, message).body())
                    break
                n_tokens += len(ids)
                if text or ids or finish:
                    chunk = stream_chunk(req, text, ids, finish, first=first)
                    if state.interrupts:  # lumen extension: this request survived a worker failure
                        chunk["lumen"] = {"interrupted": state.interrupts}
                    yield _sse(chunk)
                    first = False
                if finish:
                    if req.include_usage:
                        yield _sse(usage_chunk(req, len(req.prompt_ids), n_tokens))
                    break
            yield b"data: [DONE]\n\n"
        except asyncio.CancelledError:
            # the client disconnected: free the request's pages and reservations at once
            log.info("client of %s disconnected", state.id)
            raise
        finally:
            self._cleanup(state)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
