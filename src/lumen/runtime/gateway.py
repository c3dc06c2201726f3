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
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..engine.params import SamplingParams
from ..model.tokenizer import IncrementalDecoder
from . import metrics_prom as M
from .controller import ClusterBusy, ClusterUnavailable, Controller
from .openai_api import (
    MAX_BODY_BYTES,
    APIError,
    GenerationRequest,
    body_too_large,
    completion_response,
    openapi_components,
    openapi_operation,
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
                 api_key: str | None = None, eos_token_ids: tuple[int, ...] = (),
                 max_body_bytes: int = MAX_BODY_BYTES):
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        self.controller = controller
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.eos_token_ids = eos_token_ids
        self.model_name = controller.cfg.served_model_name
        self.max_body_bytes = max_body_bytes
        # a token never covers more characters than its longest vocabulary entry, so a text longer than
        # max_model_len * that is over the context before it is tokenized (which holds the GIL: a 4 MB
        # prompt would stall the whole gateway for seconds)
        self.max_prompt_chars = max_model_len * _longest_token(tokenizer)
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

        @app.exception_handler(Exception)
        async def _internal_error(_req: Request, exc: Exception):
            # a bug, not the client's fault: still an OpenAI-shaped body, never a bare text page
            log.exception("internal error: %s", exc)
            return JSONResponse(APIError(500, "internal server error").body(), status_code=500)

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

        unavailable = {"description": "No worker is serving",
                       "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}

        @app.get("/health", response_class=Response,
                 responses={200: {"description": "At least one worker is serving (empty body)"}, 503: unavailable})
        async def health():
            if self.controller.serving_workers():
                return Response(status_code=200)
            return JSONResponse(APIError(503, "no worker is serving").body(), status_code=503)

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                                "owned_by": "lumen", "max_model_len": self.max_model_len,
                                                "vocab_size": self.vocab_size}]}

        @app.get("/metrics", response_class=PlainTextResponse,
                 responses={200: {"description": "Prometheus text exposition format"}})
        async def metrics():
            return Response(generate_latest(M.REGISTRY), media_type=CONTENT_TYPE_LATEST)

        @app.get("/lumen/cluster")
        async def cluster():
            return self.controller.cluster_json()

        @app.post("/v1/completions", openapi_extra=openapi_operation("CompletionRequest"))
        async def completions(request: Request):
            body = parse_json_body(await self._read_body(request), self.max_body_bytes)
            req = parse_completion(body, self.model_name, self.vocab_size)
            if req.prompt_ids is None:
                if self.tokenizer is None:
                    raise APIError(400, "this model has no tokenizer; send the prompt as a list of token ids",
                                   param="prompt")
                self._check_text_length(len(req.prompt_text), "prompt")
                req.prompt_ids = self.tokenizer.encode(req.prompt_text)
            return await self._generate(request, req)

        @app.post("/v1/chat/completions", openapi_extra=openapi_operation("ChatCompletionRequest"))
        async def chat(request: Request):
            body = parse_json_body(await self._read_body(request), self.max_body_bytes)
            req, messages = parse_chat(body, self.model_name, self.vocab_size)
            if self.tokenizer is None:
                raise APIError(400, "this model has no tokenizer, so chat is unavailable; use /v1/completions "
                                    "with token ids")
            self._check_text_length(sum(len(m["content"]) for m in messages), "messages")
            try:
                req.prompt_ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                    tokenize=True)
            except Exception as exc:  # a template error is the request's fault (e.g. roles out of order)
                raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from None
            return await self._generate(request, req)

        components = openapi_components(self.vocab_size, self.max_model_len, self.model_name)
        api_key = self.api_key

        def openapi() -> dict:
            if app.openapi_schema is None:
                schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
                schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
                if api_key:
                    schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                    for path, ops in schema["paths"].items():
                        if path.startswith("/v1"):
                            for op in ops.values():
                                op["security"] = [{"bearer": []}]
                                op["responses"].setdefault("401", {
                                    "description": "Missing or wrong API key", "content": {"application/json": {
                                        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
                app.openapi_schema = schema
            return app.openapi_schema

        app.openapi = openapi
        return app

    async def _read_body(self, request: Request) -> bytes:
        """The request body, refused with 413 as soon as it is known to exceed the limit: a declared
        Content-Length is checked before anything is read, and a chunked body is never buffered past
        the limit (the rest is read and discarded, up to a bound, so the client gets to see the 413)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise body_too_large(int(declared), limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    if size > 4 * limit:
                        break
                    continue
                chunks.append(chunk)
        except ClientDisconnect:  # the client went away mid-body: nobody is left to answer
            raise APIError(400, "the client disconnected before sending the whole body") from None
        if size > limit:
            raise body_too_large(None, limit)
        return b"".join(chunks)

    def _check_text_length(self, n_chars: int, param: str) -> None:
        if n_chars > self.max_prompt_chars:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; a "
                                f"{n_chars}-character {param} cannot fit in it", param=param,
                           code="context_length_exceeded")

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
        workers: list[int] = []  # the workers that produced its tokens, in order (no repeats in a row)
        try:
            async for kind, text, ids, finish, worker in self._events(req, state):
                if kind == "error":
                    status, message = finish
                    raise APIError(status, message)
                text_parts.append(text)
                token_ids.extend(ids)
                if worker is not None and (not workers or workers[-1] != worker):
                    workers.append(worker)
                if finish:
                    body = completion_response(req, "".join(text_parts), token_ids, finish, len(req.prompt_ids))
                    ext: dict = {}
                    if state.interrupts:  # lumen extension: this request survived a worker failure
                        ext["interrupted"] = state.interrupts
                    if workers:  # ... and which worker(s) served it, the last one finished it
                        ext["worker"] = workers[-1]
                        if len(workers) > 1:
                            ext["workers"] = workers
                    if ext:
                        body["lumen"] = ext
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
        """Yields ("tokens", text, ids, finish_reason|None, worker|None) and ("error", "", [], (status, msg),
        None); worker is the one that produced ids (None where ids is empty)."""
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
                yield ("error", "", [], (event[1], event[2]), None)
                return
            if kind == "tokens":
                ids, worker = event[1], event[2]
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
                    yield ("tokens", text, ids, "stop", worker)
                    return
                yield ("tokens", text, ids, None, worker)
            elif kind == "finish":
                reason = event[1]
                tail = (stops.push(decoder.flush()) + stops.flush()) if decoder is not None else ""
                M.SUCCESS.labels(finished_reason=reason).inc()
                M.E2E.observe(now - start)
                yield ("tokens", tail, [], reason, None)
                return

    async def _stream(self, http_request: Request, req: GenerationRequest, state) -> AsyncIterator[bytes]:
        first = True
        n_tokens = 0
        last_worker = None
        try:
            async for kind, text, ids, finish, worker in self._events(req, state):
                if kind == "error":
                    status, message = finish
                    yield _sse(APIError(status, message).body())
                    break
                n_tokens += len(ids)
                if text or ids or finish:
                    chunk = stream_chunk(req, text, ids, finish, first=first)
                    ext: dict = {}
                    if state.interrupts:  # lumen extension: this request survived a worker failure
                        ext["interrupted"] = state.interrupts
                    if worker is not None and worker != last_worker:  # ... and the worker serving it now
                        ext["worker"] = last_worker = worker
                    if ext:
                        chunk["lumen"] = ext
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


def _longest_token(tokenizer) -> int:
    """Characters of the longest vocabulary entry (byte-level BPE entries are at least as long as the
    text they stand for); a generous constant when the tokenizer does not say."""
    try:
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
        return max(16, max(len(t) for t in vocab))
    except Exception:
        return 1024


class OpenAIErrorH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, but a request it cannot parse (malformed request line, headers over
    h11's 16 KiB limit, ...) gets an OpenAI-style JSON error instead of a plain-text one."""

    def send_400_response(self, msg: str) -> None:
        import h11

        body = json.dumps(APIError(400, f"{msg} (malformed HTTP, or headers larger than 16 KiB)").body()).encode()
        for event in (h11.Response(status_code=400, reason=b"Bad Request",
                                   headers=[(b"content-type", b"application/json"), (b"connection", b"close"),
                                            (b"content-length", str(len(body)).encode())]),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
