"""Client abuse that runs beside the load: clients that disconnect mid-stream, a client that never
reads its stream, connections that send half a request line and then nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections import Counter

import httpx

__all__ = ["disconnectors", "never_reader", "idle_connections"]


async def disconnectors(url: str, model: str, stop: asyncio.Event, counts: Counter, rng: random.Random) -> None:
    """Streams that the client drops after a few chunks: the cluster must free them at once."""
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
        while not stop.is_set():
            body = {"model": model, "prompt": [rng.randrange(100, 1000) for _ in range(24)], "max_tokens": 48,
                    "stream": True, "ignore_eos": True, "temperature": 0.0}
            with contextlib.suppress(httpx.HTTPError):
                async with http.stream("POST", "/v1/completions", json=body) as resp:
                    seen = 0
                    async for line in resp.aiter_lines():
                        seen += line.startswith("data:")
                        if seen >= 3:
                            break
                counts["disconnected_mid_stream"] += 1
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.uniform(0.5, 2.0))


async def never_reader(url: str, model: str, stop: asyncio.Event, counts: Counter) -> None:
    """A streaming request whose client never reads a byte of the answer, then goes away."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    while not stop.is_set():
        body = json.dumps({"model": model, "prompt": list(range(300, 340)), "max_tokens": 256, "stream": True,
                           "ignore_eos": True}).encode()
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            await asyncio.sleep(1.0)
            continue
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        with contextlib.suppress(OSError):
            await writer.drain()
        counts["never_read_streams"] += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 8.0)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def idle_connections(url: str, n: int, stop: asyncio.Event, counts: Counter) -> None:
    """``n`` connections that send half a request line and nothing more."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    writers = []
    try:
        for _ in range(n):
            with contextlib.suppress(OSError):
                _, w = await asyncio.open_connection(host, int(port))
                w.write(b"GET /health HTTP/1.1\r\nHost")
                writers.append(w)
        counts["idle_connections"] = len(writers)
        await stop.wait()
    finally:
        for w in writers:
            w.close()
