"""Checkpoint store: host memory, in every worker, for OTHER workers' KV pages.

Accounting (DESIGN.md §3, §4.5): the controller reserves ``s_r`` bytes on the holder when a
request's checkpoint is placed; pages of that request are accepted only while the request's
stored bytes stay within its reservation, and reservations together never exceed the budget.
So ``stored <= reserved <= budget`` holds at all times, per request and in total.

Validity (§4.4): a page is installed only after it was completely received (a zmq multipart
message is all-or-nothing, and its size is checked here again) and copied; until then the
previous state is untouched. At recovery the gateway recomputes the tags from its own token
history and :meth:`CheckpointStore.valid_prefix` counts the leading pages whose stored tag
equals the expected one; everything after the first gap or mismatch is recomputed.

Memory: pages live in fixed-size slots of a few large uint8 tensors ("chunks", pinned when CUDA
is available) instead of one allocation per page: pinned allocation is slow and torch's pinned
allocator rounds each block up to a power of two, so per-page pinned tensors could overshoot the
budget by up to 2x. Chunks hold whole pages within a power of two bytes, so physical memory stays
within the budget plus one spare page (so a re-sent page is copied in completely before the old
copy is freed) plus under a page of rounding per chunk. A restore is one host->device copy per page
straight out of its slot (pinned: an asynchronous DMA; the worker releases the request only once
the engine's copies have completed).

Allocation up front: :meth:`CheckpointStore.allocate` creates every slot the budget can need
(budget // page + 1) before the worker serves -- the worker runs it in a background thread from its
start, overlapping the weight load, and reports SERVING only when it is done -- so storing a page
never allocates while serving. Growing the pinned memory while serving (the receiver thread pinned
a 64 MiB chunk whenever the store ran out, tens of ms each, serialised with every other pinned
allocation and CUDA call of the process) was one of the causes of heartbeat stalls of 0.3-0.4 s on
2x H200 (2026-11-28). Startup cost: cudaHostAlloc pins a few GB/s, so the GPU experiment's 16 GB
per worker takes several seconds (~250 chunks of 64 MiB), hidden behind the weight read when that is
as long (a restart reads the weights again, so it pays this again too); the default 2 GB, well
under a second. Unpinned (CPU hosts, tests) the same chunks are ordinary memory, which the kernel
backs only when first written. A page that arrives before the allocation is done (a holder is only
chosen among serving workers, so rarely) takes a slot that exists or grows the store by one chunk
itself, as a store without :meth:`allocate` always does (tests).

Locking: the engine thread reads stats and makes reservations every loop turn while the receiver
thread stores pages, so the store lock is never held across anything slow. A page is checked and
given a slot under the lock, copied into the slot without it (numpy's copy releases the GIL too),
and installed under the lock after checking again that its request still holds the reservation;
growing the slot memory also happens outside it. Copies are serialised among themselves (one page
in flight), which keeps the physical bound above: budget plus one spare slot.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

MAX_TAG_BYTES = 64
REJECT_REASONS = ("unreserved", "stale_owner", "size", "out_of_range", "bad_tag", "bad_end", "over_reservation")


@dataclass
class _Page:
    end_pos: int
    tag: bytes
    slot: int


@dataclass
class _Request:
    reserved: int
    owner: int
    pages: dict[int, _Page] = field(default_factory=dict)


def _as_uint8(data: Any) -> np.ndarray:
    """A flat uint8 numpy view of bytes / memoryview / numpy / torch / zmq.Frame (no copy for
    contiguous CPU data; read-only views are fine: they are only read from)."""
    if isinstance(data, torch.Tensor):
        t = data.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        return t.contiguous().reshape(-1).view(torch.uint8).numpy()
    if hasattr(data, "buffer") and not isinstance(data, memoryview | bytes | bytearray | np.ndarray):
        data = data.buffer  # zmq.Frame
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    mv = memoryview(data)
    if not mv.c_contiguous:
        mv = memoryview(mv.tobytes())
    if mv.nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv, dtype=np.uint8)


class CheckpointStore:
    """Reservations and KV pages of other workers' requests, within ``budget_bytes``.

    ``page_nbytes``: the cluster's page size (KV bytes per token x block size); if None it is
    fixed by the first accepted page and every later page must have the same size.
    ``pin_memory``: None = pinned iff CUDA is available. Thread-safe (one lock): the data
    plane receiver and the engine loop may use it from different threads.
    """

    CHUNK_BYTES = 64 << 20  # upper bound of one chunk; rounded down to whole pages

    def __init__(self, budget_bytes: int, page_nbytes: int | None = None, pin_memory: bool | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        if page_nbytes is not None and page_nbytes <= 0:
            raise ValueError("page_nbytes must be > 0")
        self.budget = int(budget_bytes)
        self.page_nbytes = page_nbytes
        # pinned host memory makes the restore copy a direct DMA; it needs CUDA
        self.pin = torch.cuda.is_available() and (pin_memory is None or bool(pin_memory))
        self._reqs: dict[str, _Request] = {}
        self._reserved = 0
        self._stored = 0
        self._chunks: list[torch.Tensor] = []
        self._chunks_np: list[np.ndarray] = []  # the same memory, for GIL-free copies
        self._slots_per_chunk = 0
        self._free: list[int] = []
        self._lock = threading.Lock()  # all state; never held across a copy or an allocation
        self._put_lock = threading.Lock()  # one page copy in flight (the spare slot)
        self._n_pages = 0
        self.rejected: Counter[str] = Counter()
        self.reserve_refused = 0
        self.pages_accepted = 0

    # ------------------------------------------------------------------ reservations
    def reserve(self, req_id: str, nbytes: int, owner_epoch: int) -> bool:
        """Reserve ``nbytes`` for ``req_id`` whose pages come from ``owner_epoch``.

        False (nothing changes) if the budget would be exceeded: the request then runs
        unprotected. Re-reserving for the same owner resizes (never below what is stored);
        a different owner (the request moved) starts from an empty checkpoint.
        """
        nbytes = int(nbytes)
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        with self._lock:
            cur = self._reqs.get(req_id)
            if cur is not None and cur.owner == owner_epoch:
                stored = len(cur.pages) * (self.page_nbytes or 0)
                if nbytes < stored or self._reserved - cur.reserved + nbytes > self.budget:
                    self.reserve_refused += 1
                    return False
                self._reserved += nbytes - cur.reserved
                cur.reserved = nbytes
                return True
            freed = cur.reserved if cur is not None else 0
            if self._reserved - freed + nbytes > self.budget:
                self.reserve_refused += 1
                return False
            if cur is not None:
                self._drop(req_id)
            self._reqs[req_id] = _Request(nbytes, owner_epoch)
            self._reserved += nbytes
            return True

    def release(self, req_id: str) -> int:
        """Free the reservation and pages of ``req_id`` (finished or moved); bytes released.
        Views from :meth:`get_pages` are invalid afterwards (their slots get reused)."""
        with self._lock:
            return self._drop(req_id) if req_id in self._reqs else 0

    def _drop(self, req_id: str) -> int:
        r = self._reqs.pop(req_id)
        for p in r.pages.values():
            self._free.append(p.slot)
        self._n_pages -= len(r.pages)
        self._stored -= len(r.pages) * (self.page_nbytes or 0)
        self._reserved -= r.reserved
        return r.reserved

    # ------------------------------------------------------------------ pages
    def put_page(
        self,
        req_id: str,
        index: int,
        end_pos: int,
        tag: bytes,
        data: Any,
        expected_nbytes: int,
        owner_epoch: int | None = None,
    ) -> bool:
        """Store page ``index`` of ``req_id``; False (and counted by reason) if refused.

        Checks, before anything is changed: the request is reserved (and, if given, by this
        ``owner_epoch``); the data is exactly ``expected_nbytes`` = the page size; the page
        fits in the reservation (index < reserved // page size, so a request can never hold
        more than it reserved); tag and end position are sane. A page re-sent for an index
        replaces the old one only once the new copy is complete.
        """
        try:
            buf = _as_uint8(data)
        except (TypeError, ValueError, RuntimeError):
            return self._reject("size")
        with self._put_lock:
            with self._lock:
                r = self._reqs.get(req_id)
                reason = self._check(r, index, end_pos, tag, buf, expected_nbytes, owner_epoch)
                if reason is not None:
                    return self._reject(reason)
                if self.page_nbytes is None:
                    self.page_nbytes = expected_nbytes  # first page fixes the slot size
                page = self.page_nbytes
                slot = self._free.pop() if self._free else None
            if slot is None:
                slot = self._grow_and_take()
            try:
                np.copyto(self._slot_np(slot), buf)  # no store lock held; numpy releases the GIL
            except BaseException:
                with self._lock:
                    self._free.append(slot)
                raise
            with self._lock:
                # the request may have been released, moved or resized while the page was copied
                reason = "unreserved" if self._reqs.get(req_id) is not r else None
                if reason is None and (index + 1) * page > r.reserved:
                    reason = "out_of_range"
                old = r.pages.get(index) if reason is None else None
                if reason is None and old is None and (len(r.pages) + 1) * page > r.reserved:
                    reason = "over_reservation"
                if reason is not None:
                    self._free.append(slot)
                    return self._reject(reason)
                r.pages[index] = _Page(end_pos, bytes(tag), slot)
                if old is not None:
                    self._free.append(old.slot)
                else:
                    self._stored += page
                    self._n_pages += 1
                self.pages_accepted += 1
                return True

    def _check(self, r: _Request | None, index, end_pos, tag, buf: np.ndarray, expected_nbytes: int,
               owner_epoch: int | None) -> str | None:
        """Why a page cannot be stored (None: it can); called with the lock held."""
        if r is None:
            return "unreserved"
        if owner_epoch is not None and owner_epoch != r.owner:
            return "stale_owner"
        page = self.page_nbytes if self.page_nbytes is not None else expected_nbytes
        if expected_nbytes <= 0 or expected_nbytes != page or buf.size != page:
            return "size"
        if not isinstance(tag, bytes) or not 0 < len(tag) <= MAX_TAG_BYTES:
            return "bad_tag"
        if not isinstance(end_pos, int) or end_pos <= 0:
            return "bad_end"
        if not isinstance(index, int) or index < 0 or (index + 1) * page > r.reserved:
            return "out_of_range"
        if index not in r.pages and (len(r.pages) + 1) * page > r.reserved:
            return "over_reservation"  # implied by the range check; kept as a guard
        return None

    def _reject(self, reason: str) -> bool:
        self.rejected[reason] += 1
        return False

    def valid_prefix(self, req_id: str, expected_tags: list[bytes]) -> int:
        """Number of leading pages (from page 0, contiguous) whose stored tag equals the
        expected tag; stops at the first missing or mismatched page."""
        with self._lock:
            r = self._reqs.get(req_id)
            if r is None:
                return 0
            n, last_end = 0, 0
            for i, want in enumerate(expected_tags):
                p = r.pages.get(i)
                if p is None or p.tag != want or p.end_pos <= last_end:
                    break
                n, last_end = i + 1, p.end_pos
            return n

    def contiguous_pages(self, req_id: str) -> int:
        """Leading pages present (tags unchecked): what a holder can report to the controller."""
        with self._lock:
            r = self._reqs.get(req_id)
            n = 0
            while r is not None and n in r.pages:
                n += 1
            return n

    def get_pages(self, req_id: str, n: int) -> list[tuple[int, int, torch.Tensor]]:
        """``(index, end_pos, data)`` of pages 0..n-1 (stops at a gap). ``data`` is a uint8
        view of the page's slot: copy it to the device before :meth:`release`."""
        with self._lock:
            r = self._reqs.get(req_id)
            out = []
            for i in range(max(0, n)):
                p = r.pages.get(i) if r is not None else None
                if p is None:
                    break
                out.append((i, p.end_pos, self._slot(p.slot)))
            return out

    # ------------------------------------------------------------------ slots
    def _slot(self, slot: int) -> torch.Tensor:
        return self._chunks[slot // self._slots_per_chunk][slot % self._slots_per_chunk]

    def _slot_np(self, slot: int) -> np.ndarray:
        return self._chunks_np[slot // self._slots_per_chunk][slot % self._slots_per_chunk]

    def allocate(self, page_nbytes: int | None = None) -> int:
        """Create every slot the budget can need (budget // page + 1), so that storing a page never
        allocates afterwards; returns the bytes allocated in total. ``page_nbytes`` fixes the page
        size (it must match one already fixed). Chunk by chunk, each under the put lock only: pages
        may be stored meanwhile, into the slots that exist already."""
        with self._lock:
            if page_nbytes is not None:
                if page_nbytes <= 0 or (self.page_nbytes is not None and self.page_nbytes != page_nbytes):
                    raise ValueError(f"page size {page_nbytes} (store: {self.page_nbytes})")
                self.page_nbytes = page_nbytes
            if self.page_nbytes is None:
                raise ValueError("allocate needs the page size")
        while True:
            with self._put_lock:
                if not self._grow():
                    break
        with self._lock:
            return sum(c.numel() for c in self._chunks)

    def _grow_and_take(self) -> int:
        """A slot from a new chunk (a store that was not allocated up front). Called with the put lock
        held and the store lock not held: pinning a chunk is slow, and the engine thread must not wait."""
        with self._lock:
            if self._free:  # a release freed one meanwhile
                return self._free.pop()
        if not self._grow():
            raise RuntimeError("checkpoint store out of slots despite accounting")  # invariant broken
        with self._lock:
            return self._free.pop()

    def _grow(self) -> bool:
        """Add one chunk of slots; False once every slot the budget allows exists. Put lock held (only
        one thread adds chunks), store lock not held across the allocation."""
        page = self.page_nbytes
        assert page is not None
        with self._lock:
            if not self._slots_per_chunk:
                # whole pages within the largest power of two <= max(CHUNK_BYTES, page): a pinned
                # allocator that rounds up to a power of two then wastes less than one page
                pow2 = 1 << (max(self.CHUNK_BYTES, page).bit_length() - 1)
                self._slots_per_chunk = max(1, pow2 // page)
            # stored <= reserved <= budget bounds the slots in use by budget // page; one spare
            # lets a re-sent page be copied in completely before the old copy is freed
            total_slots = self.budget // page + 1
            have = sum(c.shape[0] for c in self._chunks)
            n = min(self._slots_per_chunk, total_slots - have)
            if n <= 0:
                return False
            if self._chunks and self._chunks[-1].shape[0] < self._slots_per_chunk:
                raise RuntimeError("checkpoint store: a chunk after a partial one")  # invariant broken
        # the last chunk may be partial; no chunk follows it, so slot // slots_per_chunk holds
        chunk = torch.empty((n, page), dtype=torch.uint8, pin_memory=self.pin)
        with self._lock:
            self._chunks.append(chunk)
            self._chunks_np.append(chunk.numpy())
            self._free.extend(range(have + n - 1, have - 1, -1))  # lowest slot handed out first
        return True

    # ------------------------------------------------------------------ introspection
    @property
    def reserved_bytes(self) -> int:
        return self._reserved

    @property
    def stored_bytes(self) -> int:
        return self._stored

    def has(self, req_id: str) -> bool:
        return req_id in self._reqs

    def requests(self) -> list[str]:
        with self._lock:
            return list(self._reqs)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "budget_bytes": self.budget,
                "reserved_bytes": self._reserved,
                "stored_bytes": self._stored,
                "allocated_bytes": sum(c.numel() for c in self._chunks),
                "pages": self._n_pages,
                "requests": len(self._reqs),
                "page_nbytes": self.page_nbytes or 0,
                "pages_accepted": self.pages_accepted,
                "reserve_refused": self.reserve_refused,
                "rejected": {k: self.rejected[k] for k in REJECT_REASONS},
                "rejected_pages": sum(self.rejected.values()),
                "pinned": self.pin,
            }


__all__ = ["CheckpointStore", "REJECT_REASONS"]
