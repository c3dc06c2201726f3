"""Checkpoint page throughput against the GIL switch interval (why workers set 1 ms).

A GPU worker's engine thread runs Python between kernel launches and holds the GIL most of a step;
the page sender and receiver threads give the GIL up around every MAC, copy and socket call and
must wait for it back. This runs the real PageSender -> PageReceiver -> CheckpointStore path in one
process beside a thread that spins in pure Python (the engine's stand-in), and reports pages/s and
how much of its progress the spinning thread kept, per switch interval.

    python benchmarks/gil_switch.py [--pages 300] [--page-bytes 1835008] [--intervals-ms 5,1,0.5]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import torch
import zmq

from lumen.engine import KVPage
from lumen.runtime.ckpt_store import CheckpointStore
from lumen.runtime.kv_stream import PageReceiver, PageSender


class Spinner(threading.Thread):
    """Pure-Python work holding the GIL; `rate()` is its progress per second."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.rounds, self.halt = 0, False

    def run(self) -> None:
        x = 0
        while not self.halt:
            for i in range(1000):
                x += i * i
            self.rounds += 1


def one(interval_s: float, busy: bool, pages: int, page_bytes: int) -> dict:
    sys.setswitchinterval(interval_s)
    ctx = zmq.Context()
    store = CheckpointStore(page_bytes * (pages + 8), page_nbytes=page_bytes)
    rx = PageReceiver(ctx, b"k" * 32, 1, 1, "127.0.0.1", store, lambda: page_bytes)
    tx = PageSender(ctx, b"k" * 32, 0, 1)
    rx.start()
    tx.start()
    store.reserve("r", page_bytes * (pages + 4), 0)
    spin = Spinner()
    if busy:
        spin.start()
    data = torch.randint(0, 255, (page_bytes,), dtype=torch.uint8)
    t0 = time.perf_counter()
    for i in range(pages):
        tx.submit(rx.address, KVPage("r", i, 16 * (i + 1), b"t" * 16, data))
        time.sleep(0.0005)  # as from engine steps, not all at once
    while store.pages_accepted < pages and time.perf_counter() - t0 < 60:
        time.sleep(0.005)
    dt = time.perf_counter() - t0
    spin.halt = True
    tx.stop()
    rx.stop()
    tx.join(5)
    rx.join(5)
    ctx.term()
    return dict(switch_ms=interval_s * 1e3, busy=busy, pages=store.pages_accepted, seconds=dt,
                pages_per_s=store.pages_accepted / dt, spin_per_s=spin.rounds / dt if busy else None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=300)
    ap.add_argument("--page-bytes", type=int, default=1_835_008, help="default: a Qwen3-1.7B bf16 page of 16 tokens")
    ap.add_argument("--intervals-ms", default="5,1,0.5")
    a = ap.parse_args()
    rows = [one(5e-3, False, a.pages, a.page_bytes)]
    rows += [one(float(ms) / 1e3, True, a.pages, a.page_bytes) for ms in a.intervals_ms.split(",")]
    print(f"{'switch':>8} {'engine thread':>14} {'pages/s':>8} {'spinner progress/s':>19}")
    for r in rows:
        spin = f"{r['spin_per_s']:.0f}" if r["spin_per_s"] is not None else "-"
        print(f"{r['switch_ms']:>6.1f}ms {'busy' if r['busy'] else 'idle':>14} {r['pages_per_s']:>8.0f} {spin:>19}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
