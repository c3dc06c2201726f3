"""Cost of CURVE on lumen's data plane: PUSH -> PULL throughput over TCP loopback, with and without
CURVE (keys from the cluster secret, as transport.secure_socket sets them), same run, side by side.

Messages look like lumen's: [32-byte MAC, ~80-byte msgpack header, payload] with a 1 MiB payload
(a KV checkpoint page of a mid-size model) and a 16 KiB one (a small page / control message).
Sender and receiver have their own zmq contexts (own I/O threads), as two processes would; rounds
alternate plain / CURVE so load from other jobs hits both alike. The per-message HMAC-SHA256 that
lumen computes on both sides anyway is timed too, for scale, and so is the whole path through
lumen's own PushPool -> PullEndpoint (MAC on send, MAC check on receive, plus or minus CURVE).

    python benchmarks/transport_curve.py [--seconds 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import platform
import statistics
import threading
import time

import zmq

from lumen.runtime import transport as tp
from lumen.runtime.transport import Codec, PullEndpoint, PushPool, Schema, new_cluster_secret, secure_socket

SIZES = {"1MiB": 1 << 20, "16KiB": 16 << 10}


def one_round(payload: bytes, seconds: float, curve: bool, secret: bytes) -> float:
    """Messages per second received within ``seconds`` (after a short warm-up)."""
    rctx, sctx = zmq.Context(), zmq.Context()
    pull, push = rctx.socket(zmq.PULL), sctx.socket(zmq.PUSH)
    for s in (pull, push):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 64)
        s.setsockopt(zmq.RCVHWM, 64)
    if curve:
        secure_socket(pull, secret, server=True)
        secure_socket(push, secret, server=False)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    msg = [os.urandom(32), os.urandom(80), payload]
    stop = threading.Event()

    def sender() -> None:
        while not stop.is_set():
            try:
                push.send_multipart(msg, copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                push.poll(50, zmq.POLLOUT)

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    try:
        warm = time.monotonic() + 0.3
        while time.monotonic() < warm:
            pull.recv_multipart(copy=False)
        n, t0 = 0, time.monotonic()
        while (dt := time.monotonic() - t0) < seconds:
            pull.recv_multipart(copy=False)
            n += 1
        return n / dt
    finally:
        stop.set()
        t.join()
        push.close(linger=0)
        pull.close(linger=0)
        sctx.term()
        rctx.term()


def codec_round(payload: bytes, seconds: float, curve: bool, secret: bytes) -> float:
    """Like one_round, through lumen's endpoints (the codec's HMAC on both sides)."""
    schema = Schema().register("PAGE", {"i": int}, frames=1)
    real = tp.secure_socket
    if not curve:
        tp.secure_socket = lambda *a, **k: None  # the endpoints as they were before CURVE
    try:
        rctx, sctx = zmq.Context(), zmq.Context()
        pull = PullEndpoint(rctx, Codec(secret, "rx", 1, schema=schema), hwm=64)
        pool = PushPool(sctx, Codec(secret, "tx", 1, schema=schema), sndhwm=64, fault=None)
        pool._socket(pull.address)
    finally:
        tp.secure_socket = real
    stop = threading.Event()

    def sender() -> None:
        i = 0
        while not stop.is_set():
            if pool.send(pull.address, "PAGE", {"i": i}, [payload]):
                i += 1
            else:
                time.sleep(0.0005)

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    try:
        warm = time.monotonic() + 0.3
        while time.monotonic() < warm:
            pull.recv(timeout_ms=1000)
        n, t0 = 0, time.monotonic()
        while (dt := time.monotonic() - t0) < seconds:
            if pull.recv(timeout_ms=1000) is not None:
                n += 1
        assert sum(pull.codec.stats.values()) == 0
        return n / dt
    finally:
        stop.set()
        t.join()
        pool.close()
        pull.close()
        sctx.term()
        rctx.term()


def hmac_rate(payload: bytes, secret: bytes, seconds: float = 0.5) -> float:
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        hmac.new(secret, payload, hashlib.sha256).digest()
        n += 1
    return n / (time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="measured seconds per round")
    ap.add_argument("--rounds", type=int, default=5, help="alternating plain/CURVE rounds per size")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    secret = new_cluster_secret()
    results = {}
    print(f"zmq {zmq.zmq_version()} pyzmq {zmq.pyzmq_version()} curve={zmq.has('curve')} "
          f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f} {platform.machine()}")
    for name, size in SIZES.items():
        payload = os.urandom(size)
        plain, curve = [], []
        for _ in range(args.rounds):
            plain.append(one_round(payload, args.seconds, False, secret))
            curve.append(one_round(payload, args.seconds, True, secret))
        lplain, lcurve = [], []
        for _ in range(args.rounds):
            lplain.append(codec_round(payload, args.seconds, False, secret))
            lcurve.append(codec_round(payload, args.seconds, True, secret))
        p, c = statistics.median(plain), statistics.median(curve)
        lp, lc = statistics.median(lplain), statistics.median(lcurve)
        mac = hmac_rate(payload, secret)
        mib = size / 2**20
        results[name] = {"zmq": {"plain_msg_s": p, "curve_msg_s": c, "curve_over_plain": c / p,
                                 "plain_rounds": plain, "curve_rounds": curve},
                         "lumen": {"plain_msg_s": lp, "curve_msg_s": lc, "curve_over_plain": lc / lp,
                                   "plain_rounds": lplain, "curve_rounds": lcurve},
                         "hmac_MiB_s": mac * mib}
        for label, a, b in (("zmq", p, c), ("lumen", lp, lc)):
            print(f"{name:>6} {label:>5}: plain {a:8.0f} msg/s {a * mib:6.0f} MiB/s | CURVE {b:8.0f} msg/s "
                  f"{b * mib:6.0f} MiB/s | CURVE/plain {b / a:.2f}")
        print(f"{name:>6} HMAC-SHA256 alone (one side): {mac * mib:.0f} MiB/s")
    results["load_after"] = os.getloadavg()[0]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
