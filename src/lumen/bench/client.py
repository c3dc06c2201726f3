"""Async open-loop load client for OpenAI-compatible ``/v1/completions`` with SSE streaming.

Replays RequestSpecs at their arrival times (open loop: a request is due at its arrival whatever
happened to earlier ones), with prompts of exactly ``prompt_tokens`` token ids and
``max_tokens = output_tokens`` with ``ignore_eos`` (as vLLM's benchmark does), and records the
arrival time of every streamed token into a RequestRecord.

Times are seconds on one monotonic clock whose zero is the start of the replay (``t0``); the
failure injector uses the same clock so failures and requests line up.

Token counting: with ``return_token_ids`` (lumen and recent vLLM) each chunk says how many tokens
it carries; otherwise one token per chunk with text is assumed, and the final usage chunk
(``stream_options.include_usage``) is authoritative for the total when present.

Interrupted requests: the server marks them; the client accepts ``"lumen": {"interrupted": true}``
on any chunk (lumen's gateway extension) and sets ``RequestRecord.interrupted``. The same extension
names the worker serving the request (``"lumen": {"worker": id}``, on the first chunk and on any chunk
after it changed): those go, in order, to ``RequestRecord.workers``.

Errors are recorded as ``"kind: detail"`` with kind one of ``http`` (non-200 status), ``stream``
(error event, malformed data, connection lost or stream ended without finishing), ``timeout``
(per-request deadline or the replay deadline), ``connect`` (transport failure before any token),
``cancelled`` (replay stopped), ``client`` (anything unexpected on our side).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np

from lumen.metrics import RequestRecord
from lumen.metrics.records import with_worker
from lumen.workload import RequestSpec

__all__ = ["ClientConfig", "LoadClient", "prompt_token_ids", "replay", "server_info", "server_model"]


@dataclass
class ClientConfig:
    url: str  # base URL, e.g. http://127.0.0.1:8000
    model: str | None = None  # the served model name; None: ask GET /v1/models (first entry)
    max_concurrency: int = 256  # requests in flight at once; later arrivals wait (and their TTFT counts it)
    request_timeout_s: float = 300.0  # whole request, first byte to last token
    connect_timeout_s: float = 10.0
    token_id_range: tuple[int, int] = (100, 1000)  # prompt ids drawn from [lo, hi): inside any real vocab
    return_token_ids: bool = True
    keep_token_times: bool = True
    api_key: str | None = None
    extra_body: dict = field(default_factory=dict)
    seed: int = 0
    keep_token_ids: bool = False  # fill LoadClient.token_ids (needs return_token_ids; lumen chaos compares them)


def prompt_token_ids(spec: RequestSpec, token_id_range: tuple[int, int] = (100, 1000), seed: int = 0) -> list[int]:
    """Exactly ``spec.prompt_tokens`` ids, random per request (seeded), so that no two prompts
    share a prefix (prefix caching must not flatter anyone) and the same workload always sends
    the same prompts."""
    lo, hi = token_id_range
    if not 0 <= lo < hi:
        raise ValueError(f"bad token_id_range {token_id_range}")
    # SeedSequence wants non-negative entropy words; warm-up requests use negative ids.
    rng = np.random.default_rng([abs(seed), int(seed < 0), abs(spec.req_id), int(spec.req_id < 0)])
    return rng.integers(lo, hi, size=spec.prompt_tokens).tolist()


class _Stop(Exception):
    pass


class LoadClient:
    """One replay against one server. ``await replay(specs)`` returns records in req_id order."""

    def __init__(self, config: ClientConfig) -> None:
        if config.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.config = config
        self.model = config.model
        self._t0: float | None = None
        self.token_ids: dict[int, list[int]] = {}  # req_id -> streamed ids, with keep_token_ids
        self.token_id_range = config.token_id_range  # narrowed to the served vocabulary when it is smaller

    def now(self) -> float:
        """Seconds since the replay started (the clock of every record)."""
        if self._t0 is None:
            raise RuntimeError("replay has not started")
        return time.monotonic() - self._t0

    def _body(self, spec: RequestSpec) -> dict:
        c = self.config
        body = {
            "model": self.model,
            "prompt": prompt_token_ids(spec, self.token_id_range, c.seed),
            "max_tokens": spec.output_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        if c.return_token_ids:
            body["return_token_ids"] = True
        body.update(c.extra_body)
        return body

    async def _one(self, http: httpx.AsyncClient, spec: RequestSpec, rec: RequestRecord) -> None:
        """Run one request, filling ``rec`` in place (so a cancelled request keeps what it got)."""
        times: list[float] = []
        ids: list[int] | None = self.token_ids.setdefault(spec.req_id, []) if self.config.keep_token_ids else None
        if ids:
            ids.clear()
        usage_tokens: int | None = None
        finished = False
        try:
            async with asyncio.timeout(self.config.request_timeout_s):
                async with http.stream("POST", "/v1/completions", json=self._body(spec)) as resp:
                    if resp.status_code != 200:
                        raw = await resp.aread()
                        rec.error = f"http: {resp.status_code} {_error_message(raw)}"
                        return
                    async for line in resp.aiter_lines():
                        if not line.startswith("data:"):
                            continue  # SSE comments, event names, blank separators
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        try:
                            obj = json.loads(data)
                        except json.JSONDecodeError:
                            raise _Stop(f"stream: malformed data {data[:80]!r}") from None
                        if not isinstance(obj, dict):
                            raise _Stop(f"stream: unexpected event {data[:80]!r}")
                        if obj.get("error"):
                            raise _Stop(f"stream: {_error_message(json.dumps(obj))}")
                        ext = obj.get("lumen")
                        if isinstance(ext, dict):
                            if ext.get("interrupted"):
                                rec.interrupted = True
                            wid = ext.get("worker")
                            if isinstance(wid, int) and not isinstance(wid, bool):
                                rec.workers = with_worker(rec.workers, wid)
                        usage = obj.get("usage")
                        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                            usage_tokens = usage["completion_tokens"]
                        for choice in obj.get("choices") or ():
                            k = _tokens_in(choice)
                            if ids is not None and isinstance(choice.get("token_ids"), list):
                                ids.extend(choice["token_ids"])
                            if k:
                                t = self.now()
                                if rec.first_token is None:
                                    rec.first_token = t
                                times.extend([t] * k)
                            if choice.get("finish_reason"):
                                finished = True
            rec.output_tokens = usage_tokens if usage_tokens is not None else len(times)
            if not finished:
                rec.error = "stream: ended without a finish_reason"
            rec.finish = times[-1] if times else self.now()
        except _Stop as e:
            rec.error = str(e)
        except (TimeoutError, httpx.TimeoutException):
            rec.error = f"timeout: no completion within {self.config.request_timeout_s:g}s"
        except httpx.TransportError as e:
            # RemoteProtocolError mid-stream = the connection broke after some tokens.
            kind = "stream" if times else "connect"
            rec.error = f"{kind}: {type(e).__name__}: {e}"
        except asyncio.CancelledError:
            rec.error = "cancelled: replay stopped before the request finished"
            raise
        except Exception as e:  # anything else is recorded, never allowed to stop the replay
            rec.error = f"client: {type(e).__name__}: {e}"
        finally:
            if rec.error is not None:
                rec.output_tokens = max(rec.output_tokens, len(times))
                rec.finish = times[-1] if times else None
            if self.config.keep_token_times:
                rec.token_times = times

    async def replay(
        self,
        specs: Sequence[RequestSpec],
        on_done: Callable[[RequestRecord], None] | None = None,
        on_start: Callable[[float], None] | None = None,
        deadline_s: float | None = None,
    ) -> list[RequestRecord]:
        """Send every spec at its arrival time; return one record per spec, in req_id order.

        ``on_start(t0_monotonic)`` is called once the clock starts (the failure injector uses
        it); ``on_done(record)`` after each request (progress bars). ``deadline_s`` (seconds on
        the replay clock; default last arrival + 2 × request timeout) bounds the whole replay:
        requests still queued or running then are cancelled and recorded as such, so a replay
        never hangs even when every request stalls behind the concurrency limit.
        """
        c = self.config
        sem = asyncio.Semaphore(c.max_concurrency)
        limits = httpx.Limits(max_connections=c.max_concurrency, max_keepalive_connections=c.max_concurrency)
        timeout = httpx.Timeout(c.request_timeout_s, connect=c.connect_timeout_s)
        headers = {"Authorization": f"Bearer {c.api_key}"} if c.api_key else {}
        order = sorted(specs, key=lambda s: (s.arrival, s.req_id))
        if deadline_s is None:
            deadline_s = (order[-1].arrival if order else 0.0) + 2 * c.request_timeout_s
        records = {
            s.req_id: RequestRecord(
                s.req_id, s.arrival, None, None, s.prompt_tokens, 0, error="cancelled: not sent before the deadline"
            )
            for s in order
        }
        if len(records) != len(order):
            raise ValueError("duplicate req_id in specs")

        async def run(spec: RequestSpec) -> None:
            rec = records[spec.req_id]
            try:
                async with sem:
                    rec.error = None
                    await self._one(http, spec, rec)
            except asyncio.CancelledError:
                if self.now() >= deadline_s - 0.01:  # cancelled by the deadline, not by our caller
                    rec.error = f"timeout: replay deadline ({deadline_s:.1f}s) reached"
                raise
            finally:
                if on_done:
                    on_done(rec)

        async def dispatch(tasks: list[asyncio.Task]) -> None:
            for spec in order:
                delay = spec.arrival - self.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(run(spec)))

        async with httpx.AsyncClient(base_url=c.url, limits=limits, timeout=timeout, headers=headers) as http:
            info = await server_info(http)
            if self.model is None:
                self.model = info.get("id") or "default"
            vocab = info.get("vocab_size")
            lo, hi = self.token_id_range
            if isinstance(vocab, int) and 0 < vocab < hi:  # e.g. a tiny test model: stay inside its vocabulary
                self.token_id_range = (min(lo, vocab // 4), vocab)
            self._t0 = time.monotonic()
            if on_start:
                on_start(self._t0)
            tasks: list[asyncio.Task] = []
            try:
                async with asyncio.timeout(max(deadline_s, 0.0)):
                    await dispatch(tasks)
                    await asyncio.gather(*tasks)
            except TimeoutError:
                pass  # the records of unfinished requests say what happened
            finally:
                for t in tasks:
                    t.cancel()
                with contextlib.suppress(BaseException):
                    await asyncio.gather(*tasks, return_exceptions=True)
        return [records[s.req_id] for s in sorted(specs, key=lambda s: s.req_id)]


async def server_info(http: httpx.AsyncClient) -> dict:
    """The first entry of ``GET /v1/models`` (id, max_model_len, lumen's vocab_size); {} if unavailable."""
    try:
        r = await http.get("/v1/models")
        data = r.json().get("data") if r.status_code == 200 else None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return data[0]
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return {}


async def server_model(http: httpx.AsyncClient) -> tuple[str | None, int | None]:
    """(model id, max_model_len) from ``GET /v1/models`` (first entry); (None, None) if unavailable."""
    info = await server_info(http)
    mml = info.get("max_model_len")
    return info.get("id"), mml if isinstance(mml, int) else None


def _tokens_in(choice: dict) -> int:
    ids = choice.get("token_ids")
    if isinstance(ids, list):
        return len(ids)
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    return 1 if text else 0


def _error_message(raw: bytes | str) -> str:
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        obj = json.loads(text)
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:200]
        if isinstance(err, str):
            return err[:200]
    except (json.JSONDecodeError, AttributeError):
        pass
    return text.strip()[:200]


async def replay(specs: Sequence[RequestSpec], config: ClientConfig, **kw) -> list[RequestRecord]:
    """Convenience: ``LoadClient(config).replay(specs, **kw)``."""
    return await LoadClient(config).replay(specs, **kw)
