"""KV checkpoint pages between workers, off the engine's thread.

Authenticating a page means an HMAC over its bytes (hundreds of KB to MB), and storing it means a
copy: done on the engine's thread, both would be paid by every decode step. Each side therefore has
its own thread, ZeroMQ socket and sender name (`w<i>.kv`), so the replay guard sees one ordered
stream per socket. hashlib and the copies release the GIL on large buffers, so this work overlaps
with the engine for real.

- `PageSender` (executor): the engine thread queues pages; the thread waits for each page's device ->
  host copy to land, MACs it and pushes it to the holder. When the holder's socket is at its high-water
  mark (a burst: a prefill that completes 32 pages, several at once), the thread waits for room (up to
  `wait_ms`) instead of dropping the page: a dropped page ends the holder's valid prefix there, so it
  costs every later page of that request. (Dropping at once, a burst of 200 pages of 1.8 MB lost 72
  of them on the 2-core box.) Waiting is cheap: the pages sit in the engine's export ring, and while
  they do the engine defers further exports, so the engine never blocks and no memory grows. Pages are
  dropped -- and stay invalid at the holder, which degrades a later restore to a shorter prefix, never
  to wrong output -- only when the queue is over its page or byte bound, when the holder is forgotten
  (the controller declared it dead or moved its requests: the wait ends at once), or when it does not
  drain for `wait_ms` (2 s, longer than a worker takes to be declared dead; the sender then stops
  waiting for it for a second, so other holders go on). A shorter wait (250 ms) dropped half the
  pages on an H200, where a holder busy with a CUDA graph capture or a long prefill pauses its
  receiver for a few hundred ms. A page whose request no longer streams to that holder when its
  turn comes (finished, moved) is skipped, not sent: the holder would refuse it.
  With several copies per request (`--ckpt-replicas`), each page is submitted once per holder: the
  request's first copy in the primary lane, its later copies in a second lane that the thread serves
  only while the primary lane is empty, and whose wait for a holder's room gives way as soon as a
  primary page is queued. A slow second holder thus never delays the first copy (in the simulator a
  single queue for all copies made recovery 39% worse near NIC saturation; docs/replicas.md §4).
  A page's bytes live in a slot of the engine's export ring (KVPage.lease), and ZeroMQ sends them
  without copying (copy=False: it keeps a reference to the buffer until the message has left, or
  was dropped); the lease is tied to that buffer, so the slot is reused only after ZeroMQ let go.
- `PageReceiver` (holder): binds the worker's KV socket; verifies and stores pages in the
  CheckpointStore (which has its own lock). The controller sends RESERVE to the holder and HOLDER to
  the executor at the same time, and the executor exports a request's first pages as soon as HOLDER
  arrives, while the holder's engine thread reads RESERVE only between two of its steps: the first
  pages often arrive before their reservation (2-4 requests in 100 on the 2-core box), and a page
  refused there ends the request's valid prefix at 0. So a page for a request with no reservation
  yet is held (at most `early_pages` of them, for `early_s`) and stored once the reservation lands;
  one still unreserved then (a request that finished, or whose reservation was refused) is refused
  as before. Held pages are not checkpoint memory: like the socket's receive queue, they are bounded
  apart from the budget.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

import torch
import zmq

from ..engine import KVPage
from .ckpt_store import CheckpointStore
from .protocol import SCHEMA
from .transport import Codec, PullEndpoint, PushPool

log = logging.getLogger("lumen.kv_stream")


def thread_cpu_clock() -> int | None:
    """The calling thread's CPU-time clock id (None where the platform has none). A page thread stores
    its own at start, so that the worker reading it later never touches the id of an ended thread."""
    try:
        return time.pthread_getcpuclockid(threading.get_ident())
    except (AttributeError, OSError):
        return None


def _keep(*_refs) -> None:
    """weakref.finalize callback: its arguments (a page's ring lease) live as long as the referent."""


class PageSender(threading.Thread):
    STALL_S = 1.0  # after a holder did not drain within wait_ms, do not wait for it again this long

    def __init__(self, ctx: zmq.Context, secret: bytes, worker_id: int, epoch: int, max_queued: int = 4096,
                 max_queued_bytes: int = 512 << 20, wait_ms: int = 2000,
                 wanted: Callable[[str, str], bool] | None = None):
        super().__init__(daemon=True, name="kv-sender")
        self.codec = Codec(secret, f"w{worker_id}.kv", epoch, schema=SCHEMA)
        self.ctx = ctx
        # items: (address, page or None to forget the address, page bytes, time queued), in two lanes:
        # [0] the requests' first copies (and forgets), [1] their later copies, served while [0] is empty
        self._lanes: tuple[deque, deque] = (deque(), deque())
        self._cv = threading.Condition()
        self._stopping = False
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.wait_ms = wait_ms
        # wanted(req, addr): whether that request still streams to that holder, asked just before a
        # page leaves. A page that waited behind a burst while its request finished (the holder
        # has released it) or moved to another holder would only be refused there: skip it.
        self.wanted = wanted
        self.pool: PushPool | None = None
        self._queued_bytes = 0
        # counters, each written by one thread only (the engine's: dropped; the sender's: the rest)
        self.sent = 0
        self.sent_later_copies = 0  # of which to a request's second or later holder
        self.deferred = 0  # later-copy pages put back because a first copy's page came
        self.dropped = 0  # queue over its bounds at submit
        self.stalled = 0  # the holder did not drain in time
        self.failed = 0  # the send itself failed (fault injection)
        self.waited_s = 0.0  # time spent waiting for a holder to drain
        self.forgotten = 0  # pages to a holder that was forgotten before they left
        self.obsolete = 0  # pages whose request finished or moved before they left (not wanted)
        # where a page's time goes on this side (seconds, summed over pages; the max of the first):
        # queued behind others, waiting for its device -> host copy, MAC + hand-off to ZeroMQ
        self.queued_s = self.queued_max_s = self.copy_wait_s = self.send_s = 0.0
        # holders forgotten whose forget item the sender has not reached yet (engine thread adds,
        # sender thread removes; set operations are atomic under the GIL): waits on them end at once
        self._gone: set[str] = set()

    @property
    def refused(self) -> int:
        """Pages that were not sent (each one stays invalid at its holder)."""
        return self.dropped + self.stalled + self.failed + self.forgotten

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def queued(self) -> int:
        """Items waiting in both lanes."""
        return len(self._lanes[0]) + len(self._lanes[1])

    def submit(self, addr: str, page: KVPage, later_copy: bool = False) -> None:
        """Queue a page for one holder (engine thread; never blocks). `later_copy`: the holder keeps a
        second or later copy of the request (the lane served after the first copies)."""
        n = page.data.numel() * page.data.element_size()
        with self._cv:
            if self._queued_bytes + n > self.max_queued_bytes or self.queued() >= self.max_queued:
                self.dropped += 1
                return
            self._queued_bytes += n
            self._lanes[1 if later_copy else 0].append((addr, page, n, time.monotonic()))
            self._cv.notify()

    def forget(self, addr: str) -> None:
        """Close the socket to a holder that is gone (in the first lane's order, on the sender's thread,
        which owns the socket; pages of the later lane still queued for it are no longer wanted); if the
        queue is full the pool's LRU bound still applies."""
        with self._cv:
            if self.queued() >= self.max_queued:
                return
            self._gone.add(addr)
            self._lanes[0].append((addr, None, 0, 0.0))
            self._cv.notify()

    def _next(self) -> tuple[tuple | None, bool]:
        """The next item (None: stop) and whether it is a later copy's page."""
        with self._cv:
            while not self._stopping and not self._lanes[0] and not self._lanes[1]:
                self._cv.wait()
            if self._stopping:
                return None, False
            if self._lanes[0]:
                return self._lanes[0].popleft(), False
            return self._lanes[1].popleft(), True

    def _room(self, push: PushPool, addr: str, stalled_until: dict[str, float], yield_to_first: bool) -> bool | None:
        """Whether a page can be queued on the holder's socket now, waiting for room up to wait_ms
        (not at all for a holder that recently did not drain). None: a later copy's page gave way
        to a first copy's page queued meanwhile (`yield_to_first`)."""
        now = time.monotonic()
        deadline = now + (0 if stalled_until.get(addr, 0.0) > now else self.wait_ms / 1e3)
        while True:  # in slices: a holder forgotten meanwhile ends the wait (a page it can still take goes)
            gone = addr in self._gone
            left_ms = int(max(0.0, deadline - time.monotonic()) * 1e3)
            if push.wait_writable(addr, 0 if gone else min(left_ms, 50)):
                stalled_until.pop(addr, None)
                self.waited_s += time.monotonic() - now
                return True
            if yield_to_first and self._lanes[0]:
                self.waited_s += time.monotonic() - now
                return None
            if gone or left_ms <= 50 or self._stopping:
                break
        self.waited_s += time.monotonic() - now
        if addr not in self._gone:
            stalled_until[addr] = time.monotonic() + self.STALL_S
        return False

    def _release(self, n: int) -> None:
        with self._cv:
            self._queued_bytes -= n

    def run(self) -> None:
        self.cpu_clock = thread_cpu_clock()  # the worker's stats read this thread's CPU time
        push = PushPool(self.ctx, self.codec)  # created here: a socket belongs to one thread
        self.pool = push  # tests read its peers
        stalled_until: dict[str, float] = {}
        try:
            while True:
                item, later = self._next()
                if item is None:
                    break
                addr, page, n, queued_at = item
                if page is None:
                    push.forget(addr)
                    stalled_until.pop(addr, None)
                    self._gone.discard(addr)
                    continue
                done = True
                try:
                    if self.wanted is not None and not self.wanted(page.req_id, addr):
                        self.obsolete += 1
                        continue
                    t0 = time.monotonic()
                    page.wait()
                    t1 = time.monotonic()
                    self.copy_wait_s += t1 - t0
                    room = self._room(push, addr, stalled_until, yield_to_first=later)
                    if room is None:  # back to the head of its lane, after the first copies' pages
                        with self._cv:
                            self._lanes[1].appendleft(item)
                        self.deferred += 1
                        done = False
                        continue
                    queued = t0 - queued_at
                    self.queued_s += queued
                    self.queued_max_s = max(self.queued_max_s, queued)
                    if not room:
                        if addr in self._gone:
                            self.forgotten += 1
                        else:
                            self.stalled += 1  # holder slow or gone: that page stays invalid
                        continue
                    body = {"req": page.req_id, "index": page.index, "end": page.end_pos, "tag": page.tag}
                    frame = page.data.contiguous().view(torch.uint8).numpy()
                    if page.lease is not None:  # the ring slot stays taken while ZeroMQ holds the frame
                        weakref.finalize(frame, _keep, page.lease)
                    t2 = time.monotonic()
                    if push.send(addr, "PAGE", body, [frame]):
                        self.sent += 1
                        self.sent_later_copies += later
                    else:
                        self.failed += 1
                    self.send_s += time.monotonic() - t2
                finally:
                    if done:
                        self._release(n)
                    # drop this page's references now, not when the next item comes (its ring slot)
                    item = page = frame = None
        finally:
            push.close()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()


class PageReceiver(threading.Thread):
    def __init__(self, ctx: zmq.Context, secret: bytes, worker_id: int, epoch: int, host: str,
                 store: CheckpointStore, page_nbytes, early_pages: int = 64, early_s: float = 2.0):
        super().__init__(daemon=True, name="kv-receiver")
        self.codec = Codec(secret, f"w{worker_id}.kvrx", epoch, schema=SCHEMA)
        self.endpoint = PullEndpoint(ctx, self.codec, host=host)
        self.address = self.endpoint.address
        self.store = store
        self.page_nbytes = page_nbytes  # callable: the size a page of this model must have
        self.early_pages, self.early_s = early_pages, early_s
        # pages that came before their reservation: (deadline, req, index, end, tag, frame), arrival order
        self._early: deque[tuple] = deque()
        self.early_held = 0  # pages stored only because they were held until their reservation came
        self.pages_in = 0
        self.busy_s = 0.0  # from a page's arrival to its store (MAC check, decode, copy): this side's share
        self._halt = threading.Event()

    def _put(self, req, index, end, tag, frame) -> bool:
        return self.store.put_page(req, index, end, tag, frame, expected_nbytes=self.page_nbytes())

    def _on_page(self, body: dict, frame) -> None:
        req = body["req"]
        if self.store.has(req) or len(self._early) >= self.early_pages:
            self._put(req, body["index"], body["end"], body["tag"], frame)
        else:
            self._early.append((time.monotonic() + self.early_s, req, body["index"], body["end"], body["tag"], frame))

    def _flush_early(self) -> None:
        """Store the held pages whose reservation has come; refuse (count) those past their time."""
        now = time.monotonic()
        keep: deque[tuple] = deque()
        for item in self._early:
            deadline, req, index, end, tag, frame = item
            if self.store.has(req):
                self.early_held += self._put(req, index, end, tag, frame)
            elif now >= deadline:
                self._put(req, index, end, tag, frame)  # refused and counted as unreserved
            else:
                keep.append(item)
        self._early = keep

    def run(self) -> None:
        self.cpu_clock = thread_cpu_clock()
        try:
            while not self._halt.is_set():
                if self.endpoint.socket.poll(5 if self._early else 100, zmq.POLLIN):
                    t0 = time.monotonic()
                    msg = self.endpoint.recv(timeout_ms=0)
                    if msg is not None and msg.type == "PAGE":
                        self._on_page(msg.body, msg.frames[0])
                        self.pages_in += 1
                    self.busy_s += time.monotonic() - t0
                if self._early:
                    self._flush_early()
        finally:
            self.endpoint.close()

    def stop(self) -> None:
        self._halt.set()
