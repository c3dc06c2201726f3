"""The heartbeat's stall diagnostics in a real process: a thread holding the GIL stalls the heartbeat
thread; the watchdog (faulthandler, a C timer) dumps every thread's stack to stderr, and the heartbeat
stats report the lateness (`hb_late_max_ms`). Nothing is dumped without a stall, twice within the
rate limit, after stop(), or with LUMEN_HB_WATCHDOG=0."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import zmq

from lumen.runtime.protocol import SCHEMA
from lumen.runtime.transport import Codec, RouterEndpoint

SECRET = bytes(range(32))
INTERVAL, DEADLINE = 0.05, 0.4  # watchdog after DEADLINE / 2 = 0.2 s
HOLD_S = 0.45  # each GIL hold: > the watchdog's 0.2 s, < its 10 s rate limit in total

CHILD = r"""
import json, logging, os, sys, threading, time
import zmq
from lumen.runtime.worker import Heartbeat

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
addr, secret = sys.argv[1], bytes.fromhex(sys.argv[2])
interval, deadline, hold = (float(x) for x in sys.argv[3:6])
def timed_sum(n):
    t = time.monotonic()
    sum(range(n))  # one C call: holds the GIL throughout (time.sleep would release it)
    return time.monotonic() - t

# the fastest of 5: a hold of at least `hold` even if this box was busy while calibrating
n = int(1_000_000 * hold / min(timed_sum(1_000_000) for _ in range(5)))
held = []

def hog():
    held.append(timed_sum(n))

def stall():
    th = threading.Thread(target=hog, name="hog")
    th.start()
    th.join()
    return held[-1]

def mark(phase):
    print(f"PHASE {phase}", file=sys.stderr, flush=True)

ctx = zmq.Context()
out = {}

def heartbeat(worker_id, phase):
    hb = Heartbeat(ctx, secret, worker_id, 1, addr, interval, deadline=deadline)
    hb.loop_at = time.monotonic()  # as once the engine loop runs: the watchdog is armed
    hb.stats = {"phase": phase}
    hb.start()
    return hb

hb = heartbeat(0, "quiet")
time.sleep(0.3)
hb.stop()  # the watchdog was armed at the last beat
hb.join()
time.sleep(0.75 * deadline)  # past the watchdog's deadline / 2: a timer left armed would dump now
mark("stall")
hb = heartbeat(1, "stall")
time.sleep(0.1)
out["stall_s"] = stall()
time.sleep(0.15)
hb.stats = {"phase": "again"}  # a second stall within the rate limit: no second dump
out["again_s"] = stall()
time.sleep(0.15)
hb.stop()
hb.join()
mark("off")
os.environ["LUMEN_HB_WATCHDOG"] = "0"
hb = heartbeat(2, "off")
time.sleep(0.1)
out["off_s"] = stall()
time.sleep(0.15)
hb.stop()
hb.join()
print(json.dumps(out), flush=True)
"""


def _between(text: str, start: str, end: str | None = None) -> str:
    a = text.index(start)
    return text[a:text.index(end, a)] if end else text[a:]


def test_gil_stall_is_dumped_and_reported(tmp_path):
    ctx = zmq.Context()
    router = RouterEndpoint(ctx, Codec(SECRET, "ctl", 0, schema=SCHEMA))
    beats: list[tuple[str, dict]] = []  # (sender, stats)
    err_path = tmp_path / "stderr"
    try:
        with open(err_path, "w") as err:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, router.address, SECRET.hex(), str(INTERVAL), str(DEADLINE),
                 str(HOLD_S)], stdout=subprocess.PIPE, stderr=err, text=True)
            deadline = time.monotonic() + 30
            while child.poll() is None and time.monotonic() < deadline:
                got = router.recv(timeout_ms=50)
                if got is not None and got[1].type == "HB":
                    beats.append((got[1].src, got[1].body["stats"]))
            child.kill()
            out, _ = child.communicate()
            while (got := router.recv(timeout_ms=200)) is not None:  # what is still queued
                if got[1].type == "HB":
                    beats.append((got[1].src, got[1].body["stats"]))
    finally:
        router.close()
        ctx.term()
    assert child.returncode == 0, err_path.read_text()
    held = json.loads(out)
    err = err_path.read_text()
    timeout = f"Timeout (0:00:00.{int(DEADLINE / 2 * 1e6):06d})!"

    # no dump without a stall, nor at stop()
    assert "Timeout (" not in err[:err.index("PHASE stall")], err
    # one dump for the two stalls (rate limit); none with LUMEN_HB_WATCHDOG=0
    stalled = _between(err, "PHASE stall", "PHASE off")
    assert stalled.count("Timeout (") == 1 and timeout in stalled, err
    assert "Timeout (" not in _between(err, "PHASE off"), err
    # the dump names the GIL holder's call and shows the heartbeat thread waiting in its loop
    dump = stalled[stalled.index(timeout):]
    assert re.search(r'File "<string>", line \d+ in hog', dump), dump
    assert re.search(r'lumen/runtime/worker\.py", line \d+ in run', dump), dump
    # the worker logs which process and threads the dump belongs to, once per stall it dumped
    assert stalled.count("the watchdog dumped every thread's stack") == 1, err
    # (threads named as in the dump; the hog may have ended by then, the heartbeat thread has not)
    ident = re.search(r"threads of pid \d+: .*(0x[0-9a-f]{16}) heartbeat", stalled)
    assert ident and f"Thread {ident[1]} (most recent call first):" in dump, err
    assert err.count("heartbeat watchdog: no beat for 0.20 s") == 2, err  # once per armed heartbeat

    # the stats report the stall, and keep reporting it (sliding max)
    def late(phase: str, sender: str = "w1.hb") -> list[float]:
        return [s["hb_late_max_ms"] for src, s in beats if src == sender and s.get("phase") == phase]

    assert late("quiet", "w0.hb") and max(late("quiet", "w0.hb")) < DEADLINE / 2 * 1000
    # a GIL held for h seconds delays the next beat by at least h - interval
    stall_ms = max(late("stall"))
    assert stall_ms >= (held["stall_s"] - INTERVAL) * 1000 - 5, (stall_ms, held)
    assert late("again")[-1] >= stall_ms  # still the window's max after the stall
    # watchdog off: no dump (checked above), the lateness is still measured
    assert max(late("off", "w2.hb")) >= (held["off_s"] - INTERVAL) * 1000 - 5, (late("off", "w2.hb"), held)
    assert all("loop_age_s" in s for _, s in beats)
