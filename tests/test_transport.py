"""Transport: authentication, bounds, replay, schema, sockets (real zmq sockets on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import stat
import struct
import time

import msgpack
import numpy as np
import pytest
import torch
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lumen.runtime import transport as tp
from lumen.runtime.transport import (
    AsyncRouterEndpoint,
    Codec,
    DealerEndpoint,
    FaultHook,
    Limits,
    PullEndpoint,
    PushPool,
    ReplayGuard,
    RouterEndpoint,
    Schema,
    curve_keys,
    secure_socket,
)

SECRET = bytes(range(32))


def schema() -> Schema:
    s = Schema()
    s.register("hello", {"worker": (int, (0, 1023)), "data": (str, 64)})
    s.register(
        "page",
        {"req": (str, 64), "index": (int, (0, 1 << 20)), "tag": (bytes, (16, 16)),
         "shape": (list, 8, (int, (0, 1 << 20))), "note": str},
        optional={"note", "shape"},
        frames=1,
    )
    s.register("any", {"x": int, "y": float, "z": (list, 100)}, optional={"x", "y", "z"}, frames=(0, 64))
    return s


def codec(name="w0", epoch=1, secret=SECRET, limits=None) -> Codec:
    return Codec(secret, name, epoch, limits, schema())


def sign(header: bytes, frames=(), secret=SECRET) -> list[bytes]:
    """A correctly authenticated message with an arbitrary header (to get past the MAC)."""
    h = hmac.new(secret, b"lumen/1", hashlib.sha256)
    for part in (header, *frames):
        h.update(struct.pack(">Q", len(part)))
        h.update(part)
    return [h.digest(), header, *frames]


def header(**kw) -> bytes:
    base = {"t": "any", "src": "evil", "ep": 1, "seq": 1, "n": 0}
    base.update(kw)
    return msgpack.packb(base, use_bin_type=True)


def dropped(c: Codec) -> dict[str, int]:
    return {k: v for k, v in c.stats.items() if v}


# ----------------------------------------------------------------------------- codec


def test_round_trip_with_tensor_frames():
    tx, rx = codec("w0"), codec("ctl")
    kv = torch.randn(2, 16, 4, 8, dtype=torch.float32)
    bf = torch.randn(3, 5).to(torch.bfloat16)
    tag = b"\x01" * 16
    msg = tx.encode("page", {"req": "r1", "index": 3, "tag": tag, "shape": [2, 16, 4, 8]}, [kv])
    got = rx.decode(msg)
    assert got is not None and got.type == "page" and got.src == "w0" and got.epoch == 1
    assert got.body == {"req": "r1", "index": 3, "tag": tag, "shape": [2, 16, 4, 8]}
    out = tp.frame_to_tensor(got.frames[0], torch.float32, got.body["shape"])
    assert torch.equal(out, kv)
    frames = [bf, np.arange(7, dtype=np.int64), b"", tp.ints_frame([1, 2, 3])]
    got2 = rx.decode(tx.encode("any", {"x": 5}, frames))
    assert torch.equal(tp.frame_to_tensor(got2.frames[0], torch.bfloat16, (3, 5)), bf)
    assert tp.frame_to_numpy(got2.frames[1], np.int64).tolist() == list(range(7))
    assert got2.frames[2].nbytes == 0 and tp.frame_ints(got2.frames[3]) == [1, 2, 3]
    assert rx.accepted == 2 and dropped(rx) == {}


def test_encode_is_zero_copy_for_contiguous_tensors():
    t = torch.arange(1024, dtype=torch.int32)
    frames = codec().encode("any", {}, [t])
    assert np.frombuffer(frames[2], dtype=np.int32).ctypes.data == t.data_ptr()


def test_encode_refuses_what_receivers_would_drop():
    c = codec(limits=Limits(max_frame_bytes=100, max_frames=2, max_header_bytes=200))
    with pytest.raises(ValueError):
        c.encode("any", {}, [b"x" * 101])
    with pytest.raises(ValueError):
        c.encode("any", {}, [b"", b"", b""])
    with pytest.raises(ValueError):
        c.encode("any", {"z": ["a" * 300]})
    with pytest.raises(ValueError):
        c.encode("any", {"seq": 5})  # reserved key


def test_wrong_secret_dropped_and_counted():
    tx = codec("w0", secret=b"\xff" * 32)
    rx = codec("ctl")
    assert rx.decode(tx.encode("hello", {"worker": 1, "data": "x"})) is None
    assert dropped(rx) == {"bad_mac": 1}


def test_tampered_payload_or_header_dropped():
    tx, rx = codec("w0"), codec("ctl")
    m = tx.encode("any", {"x": 1}, [b"abcdef"])
    assert rx.decode([m[0], m[1], b"abcdeF"]) is None
    assert rx.decode([m[0], m[1], b"abcde"]) is None
    # moving bytes between frames must not keep the MAC valid (length-prefixed)
    assert rx.decode([m[0], m[1], b"abc", b"def"]) is None
    forged = msgpack.unpackb(m[1])
    forged["x"] = 2
    assert rx.decode([m[0], msgpack.packb(forged), m[2]]) is None
    assert rx.stats["bad_mac"] == 4
    assert rx.decode(m) is not None  # the original is still fresh


def test_replay_and_stale_seq_dropped():
    tx, rx = codec("w0"), codec("ctl")
    m1 = tx.encode("hello", {"worker": 1, "data": "a"})
    m2 = tx.encode("hello", {"worker": 1, "data": "b"})
    assert rx.decode(m1) is not None
    assert rx.decode(m1) is None  # exact replay
    assert rx.decode(m2).body["data"] == "b"
    assert rx.decode(m1) is None  # stale seq
    assert dropped(rx) == {"replay": 2}


def test_new_epoch_starts_fresh_and_old_epoch_is_fenced():
    rx = codec("ctl")
    old = codec("w0", epoch=1)
    for _ in range(5):
        old_msg = old.encode("any", {})
    assert rx.decode(old_msg) is not None
    new = codec("w0", epoch=2)
    assert rx.decode(new.encode("any", {})) is not None  # seq 1 < 5 but a new epoch
    assert rx.decode(old.encode("any", {})) is None  # the previous incarnation is fenced
    assert dropped(rx) == {"stale_epoch": 1}


def test_replay_guard_is_bounded_lru():
    g = ReplayGuard(capacity=3)
    for i in range(10):
        g.record(f"s{i}", 1, 5)
    assert len(g._seq) == 3 and len(g._epoch) == 3
    assert g.check("s9", 1, 5) == "replay" and g.check("s0", 1, 5) is None


def test_oversize_frame_header_and_frame_count():
    lim = Limits(max_frame_bytes=1000, max_message_bytes=1500, max_frames=3, max_header_bytes=256)
    rx = codec("ctl", limits=lim)
    big = codec("w0", limits=Limits())  # a sender that does not respect rx's limits
    assert rx.decode(big.encode("any", {}, [b"x" * 1001])) is None
    assert rx.decode(big.encode("any", {}, [b"x" * 800, b"y" * 800])) is None  # message total
    assert rx.decode(big.encode("any", {}, [b""] * 4)) is None
    assert rx.decode(big.encode("any", {"z": ["q" * 50] * 6})) is None  # header > 256 B
    assert dropped(rx) == {"oversize": 4}
    assert rx.decode(big.encode("any", {}, [b"x" * 1000])) is not None


def test_msgpack_limits_inside_header():
    lim = Limits(max_array_len=10, max_str_len=20, max_map_len=8, max_bin_len=8)
    rx = codec("ctl", limits=lim)
    cases = [
        header(z=list(range(11))),
        header(data="x" * 21),
        header(**{f"k{i}": i for i in range(8)}),
        header(tag=b"x" * 9),
    ]
    for i, h in enumerate(cases):
        assert rx.decode(sign(h)) is None, i
    assert dropped(rx) == {"malformed": 4}


@pytest.mark.parametrize(
    "hdr",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x92\x01\x02",  # an array, not a map
        b"\x81",  # truncated map
        header() + b"\x00",  # trailing bytes
        msgpack.packb({"t": "any", "src": "x", "ep": 1, "seq": 1}),  # missing n
        header(seq="1"),
        header(seq=-1),
        header(ep=True),
        header(t=5),
        header(src=b"bytes"),
        header(n=1),  # claims a frame that is not there
        msgpack.packb({1: 2}),  # non-str map key
        msgpack.packb({"t": "any", "src": "x", "ep": 1, "seq": 1, "n": 0, "x": msgpack.ExtType(1, b"a")}),
        b"\xff" * 10,
        "é".encode("latin-1"),  # invalid utf-8 in a str slot
    ],
)
def test_malformed_headers_dropped(hdr):
    rx = codec("ctl")
    assert rx.decode(sign(hdr)) is None
    assert dropped(rx) == {"malformed": 1}


def test_bad_frame_shapes_dropped():
    rx = codec("ctl")
    assert rx.decode([]) is None
    assert rx.decode([b"x" * 32]) is None
    assert rx.decode([b"short", header()]) is None
    assert rx.decode("not a list") is None
    assert rx.decode([b"x" * 32, 12345]) is None
    assert rx.stats["malformed"] == 5


@pytest.mark.parametrize(
    "t,body,nframes",
    [
        ("hello", {"worker": 1024, "data": "x"}, 0),  # out of range
        ("hello", {"worker": -1, "data": "x"}, 0),
        ("hello", {"worker": 1.0, "data": "x"}, 0),  # float for int
        ("hello", {"worker": True, "data": "x"}, 0),  # bool is not an int here
        ("hello", {"worker": 1, "data": "x" * 65}, 0),  # too long
        ("hello", {"worker": 1}, 0),  # missing field
        ("hello", {"worker": 1, "data": "x", "extra": 1}, 0),  # unknown field
        ("page", {"req": "r", "index": 0, "tag": b"x" * 15}, 1),  # exact length
        ("page", {"req": "r", "index": 0, "tag": b"x" * 16}, 0),  # frame count
        ("page", {"req": "r", "index": 0, "tag": b"x" * 16}, 2),
        ("page", {"req": "r", "index": 0, "tag": b"x" * 16, "shape": [1, -1]}, 1),  # element
        ("page", {"req": "r", "index": 0, "tag": b"x" * 16, "shape": "1,2"}, 1),
        ("any", {"y": "1.0"}, 0),
    ],
)
def test_schema_violations_dropped(t, body, nframes):
    tx, rx = codec("w0"), codec("ctl")
    assert rx.decode(tx.encode(t, body, [b"f"] * nframes)) is None
    assert dropped(rx) == {"schema": 1}


def test_schema_accepts_valid_and_unknown_type_dropped():
    tx, rx = codec("w0"), codec("ctl")
    assert rx.decode(tx.encode("page", {"req": "r", "index": 0, "tag": b"x" * 16, "note": "n"}, [b"p"]))
    assert rx.decode(tx.encode("any", {"y": 3})) is not None  # an int is a valid float
    assert rx.decode(tx.encode("nope", {})) is None
    assert dropped(rx) == {"unknown_type": 1}


def test_schema_register_rejects_bad_specs():
    s = Schema()
    for spec in [set, (int, 5), (str, (1,)), (int, None, int), "int", (float, "x")]:
        with pytest.raises(ValueError):
            s.register("x", {"f": spec})
    with pytest.raises(ValueError):
        s.register("x", {"seq": int})
    with pytest.raises(ValueError):
        s.register("x", {"a": int}, optional={"b"})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=6))
def test_fuzz_random_frames_never_raise_and_are_counted(frames):
    rx = codec("ctl", limits=Limits(max_frames=3))
    assert rx.decode(frames) is None
    assert sum(rx.stats.values()) == 1


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64) | st.floats()
    | st.text(max_size=30) | st.binary(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["t", "src", "ep", "seq", "n", "x", "y", "z", "worker", "data"]) | st.text(max_size=4),
        msgpack_values,
        max_size=8,
    ),
    st.lists(st.binary(max_size=16), max_size=3),
)
def test_fuzz_authenticated_headers_never_raise(hdr, frames):
    """Authenticated but arbitrary headers exercise everything past the MAC."""
    rx = codec("ctl")
    try:
        packed = msgpack.packb(hdr, use_bin_type=True)
    except (OverflowError, ValueError):
        return
    out = rx.decode(sign(packed, frames))
    assert (out is not None) + sum(rx.stats.values()) == 1
    if out is not None:
        assert isinstance(out.type, str) and out.type in ("hello", "page", "any")


# ----------------------------------------------------------------------------- secrets


def test_secret_file_mode_and_round_trip(tmp_path, monkeypatch):
    p = tmp_path / "secret"
    s = tp.write_secret_file(p)
    assert len(s) == 32 and stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert tp.read_secret_file(p) == s
    os.chmod(p, 0o644)
    with pytest.raises(PermissionError):
        tp.read_secret_file(p)
    tp.write_secret_file(p, s)  # rewriting tightens the mode again
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    link = tmp_path / "link"
    link.symlink_to(p)
    with pytest.raises(OSError):
        tp.write_secret_file(link)
    monkeypatch.setenv("LUMEN_CLUSTER_SECRET", tp.secret_to_hex(s))
    assert tp.secret_from_env() == s
    monkeypatch.setenv("LUMEN_CLUSTER_SECRET", "zz")
    with pytest.raises(ValueError):
        tp.secret_from_env()
    monkeypatch.setenv("LUMEN_CLUSTER_SECRET", "ab" * 16)
    assert len(tp.secret_from_env()) == 16
    assert tp.new_cluster_secret() != tp.new_cluster_secret()
    with pytest.raises(ValueError):
        Codec(b"short", "x", 1)


# ----------------------------------------------------------------------------- fault hook


def test_fault_hook_from_env_and_modes(monkeypatch):
    monkeypatch.delenv(tp.FAULT_ENV, raising=False)
    assert FaultHook.from_env() is None
    monkeypatch.setenv(tp.FAULT_ENV, "1.0:7:truncate")
    h = FaultHook.from_env()
    assert (h.prob, h.mode, h.types) == (1.0, "truncate", {"PAGE"})
    monkeypatch.setenv(tp.FAULT_ENV, "0.5:7::PAGE,MIRROR")
    h = FaultHook.from_env()
    assert (h.prob, h.mode, h.types) == (0.5, "flip", {"PAGE", "MIRROR"})
    monkeypatch.setenv(tp.FAULT_ENV, "bad")
    with pytest.raises(ValueError):
        FaultHook.from_env()

    tx, rx = codec("w0"), codec("ctl")
    page = torch.arange(64, dtype=torch.uint8)
    before = page.clone()
    for mode in ("flip", "truncate"):
        m = FaultHook(1.0, 3, mode)(tx.encode("any", {}, [page]))
        assert rx.decode(m) is None
    assert FaultHook(1.0, 3, "drop")(tx.encode("any", {}, [page])) is None
    assert torch.equal(page, before)  # the sender's own buffer is never touched
    assert dropped(rx) == {"bad_mac": 2}
    assert FaultHook(0.0, 3)(m := tx.encode("any", {}, [page])) is m
    assert FaultHook(1.0, 3)(m2 := tx.encode("any", {})) is m2  # no payload: untouched
    only_pages = FaultHook(1.0, 3, types=["PAGE"])
    assert only_pages(m3 := tx.encode("any", {}, [page]), "any") is m3  # other types: untouched
    assert only_pages(tx.encode("any", {}, [page]), "PAGE") is not None and only_pages.injected == 1


# ----------------------------------------------------------------------------- sockets


def test_dealer_router_round_trip(ctx):
    ctl = codec("ctl", epoch=0)
    w = codec("w0", epoch=3)
    with RouterEndpoint(ctx, ctl) as router, DealerEndpoint(ctx, w, router.address, identity=b"w0") as dealer:
        assert router.address.startswith("127.0.0.1:")
        kv = torch.randn(4, 8)
        assert dealer.send("any", {"x": 1}, [kv])
        got = router.recv(timeout_ms=2000)
        assert got is not None
        ident, msg = got
        assert ident == b"w0" and msg.src == "w0" and msg.epoch == 3 and msg.body == {"x": 1}
        assert torch.equal(tp.frame_to_tensor(msg.frames[0], torch.float32, (4, 8)), kv)
        assert router.send(ident, "hello", {"worker": 0, "data": "ok"})
        reply = dealer.recv(timeout_ms=2000)
        assert reply is not None and reply.body["data"] == "ok" and reply.src == "ctl"
        assert not router.send(b"nobody", "hello", {"worker": 0, "data": "x"})  # ROUTER_MANDATORY
        assert router.recv(timeout_ms=0) is None


def raw_socket(ctx, kind, address: str, secret: bytes | None = SECRET) -> zmq.Socket:
    """A plain zmq socket connected to a lumen endpoint: a CURVE client keyed from ``secret``
    (as lumen's own), or with ZeroMQ's default NULL security when ``secret`` is None."""
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if secret is not None:
        secure_socket(s, secret, server=False)
    s.connect(f"tcp://{address}")
    return s


def test_curve_keys_are_derived_from_the_secret():
    (spub, ssec), (cpub, csec) = curve_keys(SECRET)
    assert len({spub, ssec, cpub, csec}) == 4 and all(len(k) == 40 for k in (spub, ssec, cpub, csec))
    assert ssec == zmq.utils.z85.encode(hmac.new(SECRET, b"lumen zmq curve server v1", hashlib.sha256).digest())
    assert zmq.curve_public(ssec) == spub and zmq.curve_public(csec) == cpub
    assert curve_keys(SECRET) == ((spub, ssec), (cpub, csec))  # deterministic: every process agrees
    assert curve_keys(b"\x00" * 32)[0][0] != spub


@pytest.mark.parametrize("endpoint", ["pull", "router"])
def test_peer_without_the_secret_is_refused_at_the_handshake(ctx, endpoint):
    """CURVE keyed from the cluster secret: a NULL-security peer, or a CURVE client that guesses a server
    key (or derives it from another secret), never gets a frame delivered -- not even one with a valid
    MAC -- and nothing reaches the codec; a client with the secret on the same port gets through."""
    rx = codec("ctl")
    ep = PullEndpoint(ctx, rx) if endpoint == "pull" else RouterEndpoint(ctx, rx)
    kind = zmq.PUSH if endpoint == "pull" else zmq.DEALER
    with ep:
        assert ep.socket.getsockopt(zmq.CURVE_SERVER) == 1
        good = codec("w0")
        strangers = [raw_socket(ctx, kind, ep.address, secret=None),
                     raw_socket(ctx, kind, ep.address, secret=b"\x00" * 32)]
        wrong_key = ctx.socket(kind)
        wrong_key.setsockopt(zmq.LINGER, 0)
        wrong_key.curve_serverkey = zmq.curve_keypair()[0]
        wrong_key.curve_publickey, wrong_key.curve_secretkey = curve_keys(SECRET)[1]
        wrong_key.connect(f"tcp://{ep.address}")
        strangers.append(wrong_key)
        for s in strangers:
            for _ in range(3):
                try:  # a refused peer is never connected: its queue fills, or it is not even routable
                    s.send_multipart(good.encode("any", {"x": 666}), flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
        assert ep.recv(timeout_ms=1500) is None
        assert sum(rx.stats.values()) == 0 and rx.accepted == 0
        friend = raw_socket(ctx, kind, ep.address)
        friend.send_multipart(good.encode("any", {"x": 1}))
        got = ep.recv(timeout_ms=3000)
        assert got is not None and (got[1] if endpoint == "router" else got).body == {"x": 1}
        for s in [*strangers, friend]:
            s.close(linger=0)


def test_forged_message_over_socket_is_dropped_and_next_one_arrives(ctx):
    rx = codec("w1")
    with PullEndpoint(ctx, rx) as pull:
        raw = raw_socket(ctx, zmq.PUSH, pull.address)
        evil = codec("w0", secret=b"\x00" * 32)
        good = codec("w0")
        m = good.encode("any", {"x": 1})
        raw.send_multipart(evil.encode("any", {"x": 666}))
        raw.send_multipart(m)
        raw.send_multipart(m)  # replayed copy
        raw.send_multipart(good.encode("any", {"x": 2}))
        first = pull.recv(timeout_ms=2000)
        second = pull.recv(timeout_ms=2000)
        assert (first.body["x"], second.body["x"]) == (1, 2)
        assert dropped(rx) == {"bad_mac": 1, "replay": 1}
        raw.close(linger=0)


def test_maxmsgsize_drops_huge_frame_before_delivery(ctx):
    lim = Limits(max_frame_bytes=1 << 20, max_message_bytes=1 << 20)
    rx = Codec(SECRET, "w1", 1, lim, schema())
    with PullEndpoint(ctx, rx) as pull:
        # a frame travels encrypted (CURVE): libzmq checks its size with the MESSAGE command's overhead
        assert pull.socket.getsockopt(zmq.MAXMSGSIZE) == (1 << 20) + tp.CURVE_FRAME_OVERHEAD
        tx = Codec(SECRET, "w0", 1, Limits(), schema())  # sender with larger limits
        raw = raw_socket(ctx, zmq.PUSH, pull.address)
        # the largest frame the limits allow does arrive
        raw.send_multipart(tx.encode("any", {"x": 0}, [np.zeros(1 << 20, np.uint8)]), copy=False)
        got = pull.recv(timeout_ms=3000)
        assert got is not None and got.body["x"] == 0 and len(got.frames[0]) == 1 << 20
        raw.send_multipart(tx.encode("any", {"x": 1}, [np.zeros(10 * (1 << 20), np.uint8)]), copy=False)
        assert pull.recv(timeout_ms=700) is None
        # libzmq refused it in its decoder: the codec never saw it (nothing counted)
        assert sum(rx.stats.values()) == 0 and rx.accepted == 1
        # the receiver is alive: a fresh sender gets through, as does the old one after reconnect
        raw2 = raw_socket(ctx, zmq.PUSH, pull.address)
        raw2.send_multipart(tx.encode("any", {"x": 2}, [b"small"]))
        got = pull.recv(timeout_ms=3000)
        assert got is not None and got.body["x"] == 2
        raw.send_multipart(tx.encode("any", {"x": 3}))
        got = pull.recv(timeout_ms=3000)
        assert got is not None and got.body["x"] == 3
        raw.close(linger=0)
        raw2.close(linger=0)


def test_push_pull_pool_round_trip_and_address(ctx):
    rx = codec("w1")
    with PullEndpoint(ctx, rx, host="127.0.0.1", port=0) as pull:
        host, port = pull.address.rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        pool = PushPool(ctx, codec("w0"), fault=None)
        for i in range(5):
            assert pool.send(pull.address, "any", {"x": i}, [torch.full((10,), i, dtype=torch.int16)])
        for i in range(5):
            m = pull.recv(timeout_ms=2000)
            assert m.body["x"] == i and tp.frame_to_tensor(m.frames[0], torch.int16).tolist() == [i] * 10
        assert len(pool._socks) == 1
        pool.close()


def test_push_to_dead_peer_never_blocks(ctx):
    probe = ctx.socket(zmq.PULL)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)  # nobody listens on this port now
    pool = PushPool(ctx, codec("w0"), sndhwm=8, fault=None)
    page = np.zeros(1 << 16, np.uint8)
    t0 = time.monotonic()
    results = [pool.send(f"127.0.0.1:{port}", "any", {"x": i}, [page]) for i in range(100)]
    assert time.monotonic() - t0 < 2.0
    assert not all(results) and pool.refused > 0
    pool.forget(f"127.0.0.1:{port}")
    pool.close()


def test_push_pool_is_bounded(ctx):
    pool = PushPool(ctx, codec("w0"), max_peers=2, fault=None)
    for port in (1, 2, 3):
        pool.send(f"127.0.0.1:{port}", "any", {})
    assert list(pool._socks) == ["tcp://127.0.0.1:2", "tcp://127.0.0.1:3"]
    pool.close()


def test_push_pool_fault_hook_from_env_is_caught_by_receiver(ctx, monkeypatch):
    monkeypatch.setenv(tp.FAULT_ENV, "1.0:1:flip:any")
    rx = codec("w1")
    with PullEndpoint(ctx, rx) as pull:
        pool = PushPool(ctx, codec("w0"))
        assert pool.fault is not None
        assert pool.send(pull.address, "any", {"x": 1}, [b"page-bytes"])
        assert pool.send(pull.address, "any", {"x": 2})  # no payload: not a page, untouched
        assert pool.send(pull.address, "hello", {"worker": 3, "data": "d"})  # type not selected
        m = pull.recv(timeout_ms=2000)
        m2 = pull.recv(timeout_ms=2000)
        assert m is not None and m.body["x"] == 2 and m2.body["worker"] == 3
        assert dropped(rx) == {"bad_mac": 1}
        pool.close()


def test_async_router_with_sync_dealers():
    async def main():
        actx = zmq.asyncio.Context()
        sctx = zmq.Context()
        try:
            router = AsyncRouterEndpoint(actx, codec("ctl", epoch=0))
            dealers = [DealerEndpoint(sctx, codec(f"w{i}", epoch=1), router.address, identity=f"w{i}".encode())
                       for i in range(3)]
            for i, d in enumerate(dealers):
                assert d.send("hello", {"worker": i, "data": "hi"})
            seen = {}
            for _ in range(3):
                ident, msg = await router.recv(timeout=3)
                seen[ident] = msg.body["worker"]
            assert seen == {b"w0": 0, b"w1": 1, b"w2": 2}
            forged = codec("w0", secret=b"\x01" * 32)
            dealers[0].socket.send_multipart(forged.encode("hello", {"worker": 9, "data": "x"}))
            assert await router.recv(timeout=0.3) is None
            assert router.codec.stats["bad_mac"] == 1
            assert router.send(b"w1", "hello", {"worker": 1, "data": "back"})
            assert not router.send(b"ghost", "hello", {"worker": 1, "data": "x"})
            reply = await asyncio.get_running_loop().run_in_executor(None, dealers[1].recv, 3000)
            assert reply.body["data"] == "back"
            for d in dealers:
                d.close()
            router.close()
        finally:
            actx.destroy(linger=0)
            sctx.destroy(linger=0)

    asyncio.run(main())
