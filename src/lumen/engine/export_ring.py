"""Fixed host staging for KV page export (checkpoint streaming), allocated once.

Why: an export used to allocate its host buffer per call, pinned on CUDA and sized by the burst (a
1024-token prefill completes 64 pages of 2.36 MB, which torch's caching host allocator rounds up to
256 MB; a re-protection or a fresh worker's burst, ~1 GB), plus a pinned index tensor built from a
Python list with the GIL held. cudaHostAlloc runs at a few GB/s and serialises on driver and
allocator locks: on 2x H200 (2026-11-28) healthy workers missed 3 heartbeats (0.33-0.40 s) under
the checkpointing policies, never without them. The ring is allocated when the engine is built; an
export takes only the pages that fit in its free slots now, the rest wait for a later step.

Layout: `num_slots` slots of `slot_pages` pages, one tensor [num_slots, slot_pages, *page_shape]
(pinned on CUDA, ordinary memory on CPU: the same bookkeeping runs in CPU tests), and an int64
index row per slot (the CUDA gather's block ids, copied to the device from there). An export of n
pages fills ceil(n / slot_pages) slots, in order.

Reuse: each slot an export takes gets one `SlotLease`; every page exported from the slot holds it
(KVPage.lease), and so does whatever still reads the slot's bytes once the page object is gone
(the page sender ties it to the buffer ZeroMQ keeps until the message has left). The slot is free
when the last reference goes; it is handed out again only once the device -> host copy that filled
it has completed too (its event; a page can be dropped before its copy ran), so an earlier copy
never lands in a slot that a later export fills.
"""

from __future__ import annotations

import threading
from collections import deque

import torch


class SlotLease:
    """A hold on one slot: the slot returns to its ring when the last reference to this goes."""

    __slots__ = ("_ring", "slot")

    def __init__(self, ring: ExportRing, slot: int):
        self._ring, self.slot = ring, slot

    def __del__(self):
        try:
            self._ring._put_back(self.slot)
        except Exception:  # interpreter shutdown: nothing left to return it to
            pass


class ExportRing:
    def __init__(self, page_shape: tuple[int, ...], dtype: torch.dtype, num_slots: int, slot_pages: int,
                 pin: bool):
        if num_slots < 1 or slot_pages < 1:
            raise ValueError("an export ring needs at least one slot of one page")
        self.num_slots, self.slot_pages = num_slots, slot_pages
        self.pages = torch.empty((num_slots, slot_pages, *page_shape), dtype=dtype, pin_memory=pin)
        self.index = torch.empty((num_slots, slot_pages), dtype=torch.int64, pin_memory=pin)
        self.index_np = self.index.numpy()  # filled from Python lists without building a tensor
        self._events: list = [None] * num_slots  # the copy that last filled each slot (CUDA)
        self._free: deque[int] = deque(range(num_slots))  # oldest returned first: likeliest copied
        # re-entrant: a SlotLease may be collected by this very thread while it holds the lock
        self._lock = threading.RLock()
        self.slots_taken = 0

    def _ready(self, slot: int) -> bool:
        ev = self._events[slot]
        if ev is None:
            return True
        if ev.query():
            self._events[slot] = None
            return True
        return False

    def capacity(self) -> int:
        """Pages an export can take now: the free slots whose last copy has completed."""
        with self._lock:
            return sum(1 for s in list(self._free) if self._ready(s)) * self.slot_pages

    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    def take(self, n_pages: int) -> list[tuple[int, SlotLease]]:
        """ceil(n_pages / slot_pages) ready slots with their leases, in fill order; raises if they
        are not there (callers ask `capacity()` first, on the same thread: capacity only grows
        meanwhile)."""
        need = -(-n_pages // self.slot_pages)
        with self._lock:
            got = []
            for s in list(self._free):
                if len(got) == need:
                    break
                if self._ready(s):
                    got.append(s)
            if len(got) < need:
                raise RuntimeError(f"export ring: {n_pages} pages do not fit ({len(got)} slots ready)")
            for s in got:
                self._free.remove(s)
            self.slots_taken += need
        return [(s, SlotLease(self, s)) for s in got]

    def set_event(self, slots, event) -> None:
        """The copy that fills these slots (checked before they are handed out again)."""
        with self._lock:
            for s in slots:
                self._events[s] = event

    def _put_back(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)


def ring_size(page_bytes: int, slot_pages: int, max_slots: int, ring_bytes: int) -> int:
    """Slots for a ring of at most `ring_bytes`, at most `max_slots`, and at least 2 (where
    max_slots allows) even past `ring_bytes`: one slot filled while the previous one is sent."""
    return max(1, min(max_slots, max(2, ring_bytes // max(1, page_bytes * slot_pages))))


__all__ = ["ExportRing", "SlotLease", "ring_size"]
