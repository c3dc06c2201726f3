"""KV checkpoint pages between workers, off the engine's thread.

Authenticating a page means an HMAC over its bytes (hundreds of KB to MB), and storing it means a
copy: done on the engine's thread, both would be paid by every decode step. Each side therefore has
its own thread, ZeroMQ socket and sender name (`w<i>.kv`), so the replay guard sees one ordered
stream per socket. hashlib and the copies release the GIL on large buffers, so this work overlaps
with the engine for real.

- `PageSender` (executor): the engine thread queues pages; the thread waits for each page's device ->
  host copy to land, MACs it and pushes it to the holder. A full queue drops the page (it stays
  invalid at the holder, which degrades a later restore to a shorter prefix, never to wrong output).
- `PageReceiver` (holder): binds the worker's KV socket; verifies and stores pages in the
  CheckpointStore (which has its own lock).
"""

from __future__ import annotations

import logging
import queue
import threading

import torch
import zmq

from ..engine import KVPage
from .ckpt_store import CheckpointStore
from .protocol import SCHEMA
from .transport import Codec, PullEndpoint, PushPool

log = logging.getLogger("lumen.kv_stream")


class PageSender(threading.Thread):
    def __init__(self, ctx: zmq.Context, secret: bytes, worker_id: int, epoch: int, max_queued: int = 4096):
        super().__init__(daemon=True, name="kv-sender")
        self.codec = Codec(secret, f"w{worker_id}.kv", epoch, schema=SCHEMA)
        self.ctx = ctx
        self.queue: queue.Queue[tuple[str, KVPage | None] | None] = queue.Queue(max_queued)  # page None: forget
        self.pool: PushPool | None = None
        self.sent = 0
        self.refused = 0

    def submit(self, addr: str, page: KVPage) -> None:
        try:
            self.queue.put_nowait((addr, page))
        except queue.Full:
            self.refused += 1

    def forget(self, addr: str) -> None:
        """Close the socket to a holder that is gone (in queue order, on the sender's thread, which
        owns the socket); if the queue is full the pool's LRU bound still applies."""
        try:
            self.queue.put_nowait((addr, None))
        except queue.Full:
            pass

    def run(self) -> None:
        push = PushPool(self.ctx, self.codec)  # created here: a socket belongs to one thread
        self.pool = push  # tests read its peers
        try:
            while (item := self.queue.get()) is not None:
                addr, page = item
                if page is None:
                    push.forget(addr)
                    continue
                page.wait()
                body = {"req": page.req_id, "index": page.index, "end": page.end_pos, "tag": page.tag}
                if push.send(addr, "PAGE", body, [page.data.contiguous().view(torch.uint8).numpy()]):
                    self.sent += 1
                else:
                    self.refused += 1  # holder slow or gone: that page stays invalid
        finally:
            push.close()

    def stop(self) -> None:
        self.queue.put(None)


class PageReceiver(threading.Thread):
    def __init__(self, ctx: zmq.Context, secret: bytes, worker_id: int, epoch: int, host: str,
                 store: CheckpointStore, page_nbytes):
        super().__init__(daemon=True, name="kv-receiver")
        self.codec = Codec(secret, f"w{worker_id}.kvrx", epoch, schema=SCHEMA)
        self.endpoint = PullEndpoint(ctx, self.codec, host=host)
        self.address = self.endpoint.address
        self.store = store
        self.page_nbytes = page_nbytes  # callable: the size a page of this model must have
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                msg = self.endpoint.recv(timeout_ms=100)
                if msg is None or msg.type != "PAGE":
                    continue
                b = msg.body
                self.store.put_page(b["req"], b["index"], b["end"], b["tag"], msg.frames[0],
                                    expected_nbytes=self.page_nbytes())
        finally:
            self.endpoint.close()

    def stop(self) -> None:
        self._halt.set()
