"""Internal-protocol fuzzing against the ZeroMQ ports of a live cluster (DESIGN.md invariants 1 and 6).

Frames are thrown at the controller's ROUTER (control plane) and at both PULL sockets of every worker
(data plane: assisted-recovery traffic; KV plane: checkpoint pages): unauthenticated garbage, valid-looking
messages with a wrong MAC, correctly signed messages with hypothesis-generated headers and payloads,
headers that declare huge lengths, too many frames, stale epochs, replays. These are sent over CURVE
connections keyed from the cluster secret (as lumen's own sockets are), so they reach the codec: every
message must be dropped and counted under the reason the codec's own rules give it (a local Codec with
the cluster secret is the oracle). Peers without the secret -- raw ZMTP with NULL security, or claiming
CURVE without the key, declaring frames far past the limit or streaming a multipart message that never
ends -- must be refused at the handshake: nothing delivered, nothing counted, RSS flat. No process may
die or grow, and the cluster must still serve a request correctly afterwards.

The codec itself is unit-fuzzed in test_transport.py; this file is about live ports and processes.
LUMEN_FUZZ_PROTOCOL_EXAMPLES scales the number of generated messages; LUMEN_FUZZ_SEED picks the seed.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import os
import socket
import struct
import time

import msgpack
import pytest
import zmq
from cluster_util import make_tiny_model_dir, run_cluster, worker_pids_alive
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from lumen.runtime.protocol import SCHEMA
from lumen.runtime.transport import DROP_REASONS, Codec, Limits, ReplayGuard, secure_socket

pytestmark = pytest.mark.cluster

EXAMPLES = int(os.environ.get("LUMEN_FUZZ_PROTOCOL_EXAMPLES", "400"))
SEED = int(os.environ.get("LUMEN_FUZZ_SEED", "20261128"))
PROMPT = list(range(100, 130))
TYPES = ["HELLO", "HB", "STATE", "OUT", "CKPT", "RESERVED", "ADD", "ABORT", "HOLDER", "RESERVE", "RELEASE", "ASSIST",
         "SHUTDOWN", "PAGE", "MIRROR", "PROPOSE"]
LIMITS = Limits()
_unique = itertools.count()


# ----------------------------------------------------------------------------- helpers


def cluster_secret(pid: int) -> bytes:
    """The cluster secret, read the way an operator on the same account could: from a worker's
    environment (it is never on a command line or in a file)."""
    with open(f"/proc/{pid}/environ", "rb") as f:
        env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    return bytes.fromhex(env[b"LUMEN_CLUSTER_SECRET"].decode())


def sign(secret: bytes, header: bytes, frames=()) -> list[bytes]:
    """[mac, header, *frames] with a correct MAC over arbitrary header bytes (transport.py's wire format)."""
    h = hmac.new(secret, b"lumen/1", hashlib.sha256)
    for part in (header, *frames):
        h.update(struct.pack(">Q", len(part)))
        h.update(part)
    return [h.digest(), header, *frames]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def snapshot(cluster) -> dict:
    """Drop counters per process: the controller's codec, and each worker's (data + KV sockets), as
    /lumen/cluster reports them (worker figures arrive with its next heartbeat)."""
    state = cluster.state()
    out = {"controller": dict(state["transport_drops"]), "stale_messages": state["stale_messages"]}
    for w in state["workers"]:
        out[f"w{w['id']}"] = {r: int(w["stats"].get(f"drop_{r}", 0)) for r in DROP_REASONS}
    return out


def delta(after: dict, before: dict, proc: str) -> dict[str, int]:
    return {r: after[proc][r] - before[proc][r] for r in DROP_REASONS if after[proc][r] != before[proc][r]}


def wait_for(cluster, before: dict, expected: dict[str, dict[str, int]], timeout: float = 20) -> dict:
    """Poll until every process's drop counters moved by exactly `expected`; return the last snapshot."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot(cluster)
        got = {p: delta(now, before, p) for p in expected}
        if got == expected or time.monotonic() > deadline:
            assert got == expected, f"drop counters moved by {got}, expected {expected}"
            return now
        time.sleep(0.1)


class Oracle:
    """What the live receiver must do with a message: the same Codec rules, secret, limits and schema,
    with one replay guard per receiving socket (as every live endpoint has)."""

    def __init__(self, secret: bytes):
        self.codec = Codec(secret, "oracle", 0, limits=LIMITS, schema=SCHEMA)
        self.guards: dict[str, ReplayGuard] = {}

    def outcome(self, socket_name: str, frames: list[bytes]) -> str:
        before = dict(self.codec.stats)
        guard = self.guards.setdefault(socket_name, ReplayGuard(LIMITS.replay_senders))
        msg = self.codec.decode(frames, guard)
        if msg is not None:
            return "accepted"
        (reason,) = [r for r in DROP_REASONS if self.codec.stats[r] != before[r]]
        return reason


class Ports:
    """zmq sockets connected to the cluster's listening ports by someone who holds the cluster secret (it
    keys the CURVE handshake); what they send is then up to the codec."""

    def __init__(self, state: dict, secret: bytes):
        self.secret = secret
        self.ctx = zmq.Context()
        self.socks: dict[str, zmq.Socket] = {}
        self.owner: dict[str, str] = {}
        self._open("controller", zmq.DEALER, state["control_addr"], "controller")
        for w in state["workers"]:
            self._open(f"w{w['id']}.data", zmq.PUSH, w["data_addr"], f"w{w['id']}")
            self._open(f"w{w['id']}.kv", zmq.PUSH, w["kv_addr"], f"w{w['id']}")

    def _open(self, name: str, kind: int, addr: str, owner: str) -> None:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, 100_000)
        secure_socket(s, self.secret, server=False)
        s.connect(f"tcp://{addr}")
        self.socks[name] = s
        self.owner[name] = owner

    def send(self, name: str, frames: list[bytes]) -> None:
        self.socks[name].send_multipart(frames)

    def close(self) -> None:
        for s in self.socks.values():
            s.close(linger=0)
        self.ctx.term()


def assert_cluster_intact(cluster, pids: list[int], epochs: list[int]) -> None:
    state = cluster.state()
    assert [w["pid"] for w in state["workers"]] == pids, "a worker was restarted"
    assert [w["epoch"] for w in state["workers"]] == epochs
    assert {w["state"] for w in state["workers"]} == {"serving"}, state["workers"]
    assert worker_pids_alive(pids) == pids
    assert cluster.proc.poll() is None, "the gateway/controller process died"
    out = cluster.complete(PROMPT, max_tokens=4)
    assert out["usage"]["completion_tokens"] == 4 and out["choices"][0]["finish_reason"] == "length"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    with run_cluster(str(model), workers=2, policy="lumen", extra=["--deterministic"]) as c:
        yield c


@pytest.fixture(scope="module")
def live(cluster):
    state = cluster.state()
    pids = [w["pid"] for w in state["workers"]]
    epochs = [w["epoch"] for w in state["workers"]]
    secret = cluster_secret(pids[0])
    # the reference answer, before anything was thrown at the ports
    reference = cluster.complete(PROMPT, max_tokens=4)["choices"][0]["token_ids"]
    ports = Ports(state, secret)
    yield {"state": state, "pids": pids, "epochs": epochs, "secret": secret, "ports": ports,
           "reference": reference, "rss": {p: rss_mb(p) for p in pids + [cluster.proc.pid]}}
    ports.close()


# ----------------------------------------------------------------------------- strategies

_ints = st.one_of(st.integers(-(2**63), 2**64 - 1), st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**64 - 1]))
_leaf = st.one_of(st.none(), st.booleans(), _ints, st.floats(allow_nan=True, allow_infinity=True),
                  st.text(max_size=12), st.binary(max_size=12))
_value = st.recursive(_leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                 st.dictionaries(st.text(max_size=6), c, max_size=4)),
                      max_leaves=8)

# body fields drawn from the real schema's field names (so type and bound checks are reached), plus strays
_FIELDS = sorted({"worker", "pid", "data_addr", "kv_addr", "device", "host", "stats", "state", "info", "items",
                  "valid", "to_ep", "req", "n_prompt", "params", "restore_pages", "holder", "addr", "since",
                  "bytes", "owner", "role", "peer", "k", "index", "end", "tag", "drop"})


def _from_spec(spec):
    """Values that satisfy one field spec of protocol.SCHEMA (see transport.Schema)."""
    typ, bound, elem = (spec, None, None) if isinstance(spec, type) else (spec + (None,))[:3]
    lo, hi = bound if isinstance(bound, tuple) else (0, bound if bound is not None else 8)
    if typ is int:
        return st.integers(*(bound if isinstance(bound, tuple) else (-(2**63), 2**63 - 1)))
    if typ is float:
        return st.floats(*(bound if isinstance(bound, tuple) else (-1e9, 1e9)), allow_nan=False)
    if typ is bool:
        return st.booleans()
    if typ is type(None):
        return st.none()
    size = {"min_size": lo, "max_size": max(lo, min(hi, 12))}
    if typ is str:
        return st.text(**size)
    if typ is bytes:
        return st.binary(**size)
    if typ is list:
        return st.lists(_from_spec(elem) if elem is not None else _leaf, **{**size, "max_size": max(lo, min(hi, 3))})
    return st.dictionaries(st.text(max_size=6), _leaf, max_size=min(hi, 3))


@st.composite
def signed_message(draw):
    """(header fields, payload frames) to be signed with the real secret: a message of a real type that
    satisfies its schema, then (most of the time) one mutation -- a field of the wrong type or out of
    bounds, a missing or stray field, a wrong frame count or `n`, an unknown type, a bad reserved field.
    The src is filled in at send time (a fresh name per message, so the replay guard sees each as new)."""
    t = draw(st.sampled_from(TYPES))
    fields_spec, optional, nframes = SCHEMA._types[t]
    fields = {"t": t, "ep": draw(st.integers(0, 2**31)), "seq": draw(st.integers(1, 2**40))}
    for name, spec in fields_spec.items():
        if name not in optional or draw(st.booleans()):
            fields[name] = draw(_from_spec(spec))
    lo, hi = nframes if nframes is not None else (0, 3)
    frames = draw(st.lists(st.binary(max_size=40), min_size=lo, max_size=min(hi, 3)))
    fields["n"] = len(frames)
    mutation = draw(st.sampled_from(["none", "value", "drop", "stray", "frames", "n", "type", "reserved"]))
    if mutation == "value" and fields_spec:
        fields[draw(st.sampled_from(sorted(fields_spec)))] = draw(_value)
    elif mutation == "drop" and fields_spec:
        fields.pop(draw(st.sampled_from(sorted(fields_spec))), None)
    elif mutation == "stray":
        fields[draw(st.sampled_from(_FIELDS + ["zz"]))] = draw(_value)
    elif mutation == "frames":
        frames = draw(st.lists(st.binary(max_size=40), max_size=5))
        fields["n"] = len(frames)
    elif mutation == "n":
        fields["n"] = draw(_value)
    elif mutation == "type":
        fields["t"] = draw(st.text(max_size=8).filter(lambda x: x not in TYPES))
    elif mutation == "reserved":
        fields[draw(st.sampled_from(["ep", "seq", "t"]))] = draw(_value)
    return fields, frames


# ----------------------------------------------------------------------------- tests


def test_garbage_bad_mac_and_signed_junk_are_dropped_and_counted(cluster, live):
    """Hypothesis-generated frames to every port; each one's fate is predicted by the codec rules and the
    live counters must match the prediction exactly (so nothing is silently swallowed or half-parsed)."""
    ports: Ports = live["ports"]
    secret = live["secret"]
    oracle = Oracle(secret)
    expected: dict[str, dict[str, int]] = {p: {} for p in set(ports.owner.values())}
    accepted = []
    targets = sorted(ports.socks)
    before = snapshot(cluster)

    def send(target: str, frames: list[bytes]) -> None:
        outcome = oracle.outcome(target, frames)
        if outcome == "accepted":
            accepted.append(target)  # a correctly signed, schema-valid message from a stranger: ignored
        else:
            owner = expected[ports.owner[target]]
            owner[outcome] = owner.get(outcome, 0) + 1
        ports.send(target, frames)

    @seed(SEED)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(target=st.sampled_from(targets),
           kind=st.sampled_from(["raw", "bad_mac", "signed"]),
           raw=st.lists(st.binary(max_size=64), min_size=1, max_size=5),
           msg=signed_message())
    def run(target, kind, raw, msg):
        if kind == "raw":
            send(target, raw)
            return
        fields, frames = msg
        fields = dict(fields, src=f"fz-{next(_unique)}")
        header = msgpack.packb(fields, use_bin_type=True)
        signed = sign(secret, header, frames)
        if kind == "bad_mac":
            signed[0] = hmac.new(b"not-the-cluster-secret", header, hashlib.sha256).digest()
        send(target, signed)

    run()
    n_sent = sum(sum(v.values()) for v in expected.values()) + len(accepted)
    print(f"protocol fuzz: {n_sent} messages, {len(accepted)} accepted (and ignored), drops by process: {expected}")
    assert n_sent >= EXAMPLES
    wait_for(cluster, before, {p: v for p, v in expected.items()})
    # the generator reaches every stage of the receiver's checks, not just the MAC
    reasons = {r for v in expected.values() for r in v}
    assert {"bad_mac", "malformed", "schema", "unknown_type"} <= reasons, reasons
    assert accepted, "no generated message passed every check: the deeper code paths were never reached"
    assert_cluster_intact(cluster, live["pids"], live["epochs"])


def test_declared_huge_lengths_too_many_frames_and_oversize_headers(cluster, live):
    """Signed messages whose msgpack header declares gigantic strings/arrays/maps, a header past its
    64 KiB bound, and messages with more payload frames than allowed: all dropped before allocation."""
    ports: Ports = live["ports"]
    secret = live["secret"]
    before = snapshot(cluster)
    # fixmap(5) {"t": <declared 4 GiB str32 / array32 / map32 / bin32 / ext32>, ...}: the bytes are not there
    declared = [b"\x85\xa1t\xdb\xff\xff\xff\xff", b"\x85\xa1t\xdd\xff\xff\xff\xff", b"\x85\xa1t\xdf\xff\xff\xff\xff",
                b"\x85\xa1t\xc6\xff\xff\xff\xff", b"\x85\xa1t\xc9\xff\xff\xff\xff\x01",
                b"\xdf\xff\xff\xff\xff", b"\xdd\x7f\xff\xff\xff" + b"\xc0" * 100]
    deep = b"\x81\xa1t" + b"\x91" * 5000 + b"\x01"  # {"t": [[[[...5000 deep...]]]]}
    big_header = msgpack.packb({"t": "HB", "src": "fz-big", "ep": 1, "seq": 1, "n": 0,
                                "stats": {"x": "y" * 4000, **{f"k{i}": i for i in range(60)}},
                                "pad": [b"z" * 16000] * 5}, use_bin_type=True)
    assert len(big_header) > LIMITS.max_header_bytes
    many = [b""] * (LIMITS.max_frames + 1)
    many_header = msgpack.packb({"t": "OUT", "src": "fz-many", "ep": 1, "seq": 1, "n": len(many), "items": []},
                                use_bin_type=True)
    oracle = Oracle(secret)
    expected: dict[str, dict[str, int]] = {p: {} for p in set(ports.owner.values())}
    for target in sorted(ports.socks):
        for frames in ([*(sign(secret, h) for h in declared)] + [sign(secret, deep), sign(secret, big_header),
                                                                 sign(secret, many_header, many),
                                                                 [b"\x00" * 32, b"h", *([b""] * 1000)]]):
            outcome = oracle.outcome(target, frames)
            assert outcome != "accepted"
            owner = expected[ports.owner[target]]
            owner[outcome] = owner.get(outcome, 0) + 1
            ports.send(target, frames)
    assert {"malformed", "oversize"} <= {r for v in expected.values() for r in v}
    wait_for(cluster, before, expected)
    assert_cluster_intact(cluster, live["pids"], live["epochs"])


def test_stale_epochs_and_replays_are_dropped(cluster, live):
    ports: Ports = live["ports"]
    secret = live["secret"]
    state = cluster.state()
    w0 = state["workers"][0]
    before = snapshot(cluster)

    def hb(src, ep, seq, stats=None):
        h = msgpack.packb({"t": "HB", "src": src, "ep": ep, "seq": seq, "n": 0, "stats": stats or {}},
                          use_bin_type=True)
        return sign(secret, h)

    # the controller has seen w0 (and w0.hb) at its current epoch: an older epoch is fenced by the guard
    for src in ("w0", "w0.hb"):
        ports.send("controller", hb(src, w0["epoch"] - 1, 10**12))
    # a replay of a message the controller accepted, and an older seq from the same sender
    first = hb("fz-replay", 7, 100)
    ports.send("controller", first)
    ports.send("controller", first)
    ports.send("controller", hb("fz-replay", 7, 99))
    # a sender the guard has not seen, claiming worker 1 at an old epoch: passes the guard, fenced by the
    # controller itself (counted as a stale message)
    ports.send("controller", hb("w1.fz", state["workers"][1]["epoch"] - 1, 1))
    # the same on a worker's data socket: a PROPOSE (ignored when not paired) accepted once, then replayed,
    # then from an older epoch of the same sender
    ok = sign(secret, msgpack.packb({"t": "PROPOSE", "src": "fz-w", "ep": 5, "seq": 1, "n": 1, "items": []},
                                    use_bin_type=True), [b""])
    ports.send("w0.data", ok)
    ports.send("w0.data", ok)
    ports.send("w0.data", sign(secret, msgpack.packb({"t": "PROPOSE", "src": "fz-w", "ep": 4, "seq": 9, "n": 1,
                                                      "items": []}, use_bin_type=True), [b""]))
    after = wait_for(cluster, before, {"controller": {"stale_epoch": 2, "replay": 2},
                                       "w0": {"replay": 1, "stale_epoch": 1}})
    deadline = time.monotonic() + 5
    while after["stale_messages"] == before["stale_messages"] and time.monotonic() < deadline:
        time.sleep(0.1)
        after = snapshot(cluster)
    assert after["stale_messages"] == before["stale_messages"] + 1
    assert_cluster_intact(cluster, live["pids"], live["epochs"])


def test_signed_schema_valid_garbage_from_a_worker_name_breaks_nothing(cluster, live):
    """Messages that pass every transport check (signed, right epoch, schema-valid) but carry values no
    worker would send: NaN/inf/strings/nested maps in heartbeat stats and state info, unknown states,
    nonsense outputs and checkpoint reports. The controller must keep routing, detecting failures and
    answering /lumen/cluster (found: a NaN or a string here used to break /lumen/cluster with a 500 and
    kill the failure detector's loop)."""
    ports: Ports = live["ports"]
    secret = live["secret"]
    state = cluster.state()
    garbage = [float("nan"), float("inf"), -float("inf"), "12", b"\xff", [1, 2], {"a": {"b": None}}, None, True,
               -(2**63), 2**64 - 1]
    keys = ["q_wait_s", "loop_age_s", "kv_usage", "ckpt_stored_bytes", "spec_drafts", "spec_acceptance",
            "spec_draft_tokens", "num_running"]
    seqs = itertools.count(1)
    sent = 0
    want = state["transport_drops"]["bad_mac"] + 1
    for w in state["workers"]:
        src, ep = f"w{w['id']}.fz{next(_unique)}", w["epoch"]

        def msg(t, frames=(), src=src, ep=ep, **body):
            h = msgpack.packb({"t": t, "src": src, "ep": ep, "seq": next(seqs), "n": len(frames), **body},
                              use_bin_type=True)
            return sign(secret, h, list(frames))

        for i, g in enumerate(garbage):
            # (a finite loop age past the stall limit is a legitimate verdict of death: not garbage)
            ports.send("controller", msg("HB", stats={k: g for k in keys
                                                      if not (k == "loop_age_s" and isinstance(g, int) and g > 0)}))
            ports.send("controller", msg("HB", stats={b"bytes-key": g, "x" * 100: g, "k": g}))
            ports.send("controller", msg("STATE", state=f"zombie{i}", info={k: g for k in keys + ["draft_ready"]}))
            ports.send("controller", msg("STATE", state="serving\x00", info={b"\xff\xfe": g, "disk_to_host_s": g}))
            ports.send("controller", msg("OUT", [struct.pack("<3i", 1, 2, 3)],
                                         items=[[g, 2, "stop"], ["nope", g, g], ["x", 10**6, ""]]))
            ports.send("controller", msg("OUT", [b"\x01\x02\x03"], items=[["nope", 1, "error:boom"]]))
            ports.send("controller", msg("CKPT", valid={"nope": g, "x": -5}))
            sent += 7
    # every one of those is accepted by the transport (nothing to count as a drop); a bad-MAC marker sent
    # after them on the same connection is counted once they have all been handled
    ports.send("controller", [b"\x00" * 32, b"\x80"])
    deadline = time.monotonic() + 20
    while True:
        r = cluster.client.get("/lumen/cluster")
        assert r.status_code == 200, f"/lumen/cluster broke: {r.status_code} {r.text[:300]}"
        if r.json()["transport_drops"]["bad_mac"] >= want:
            break
        assert time.monotonic() < deadline, "the controller never got to the marker"
        time.sleep(0.05)
    # ... and the failure detector's loop still runs: its per-round gauge refresh shows the marker's drop
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = cluster.client.get("/metrics").text
        line = [ln for ln in text.splitlines()
                if ln.startswith('lumen:transport_dropped_messages{process="controller",reason="bad_mac"}')]
        if line and float(line[0].split()[-1]) >= want:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the controller's monitor loop stopped refreshing its gauges")
    # real heartbeats replace the garbage within a heartbeat; the JSON is clean and workers still serve
    time.sleep(0.5)
    data = cluster.state()
    for w in data["workers"]:
        for v in list(w["stats"].values()) + list(w["phases_s"].values()):
            assert isinstance(v, str) or (isinstance(v, int | float) and math.isfinite(v)), (w["id"], v)
    assert sent == 7 * len(garbage) * len(state["workers"])
    assert_cluster_intact(cluster, live["pids"], live["epochs"])


def _zmtp_greeting(socket_type: bytes, mechanism: bytes = b"NULL") -> bytes:
    """What a peer without the cluster secret can send on connect: a ZMTP 3.0 greeting, then for NULL
    security the READY command (as any default zmq socket does), for CURVE a HELLO command (200 bytes)
    whose box is not sealed to the server's key -- that key is derived from the secret."""
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + mechanism.ljust(20, b"\x00") + b"\x00" * 32
    if mechanism == b"CURVE":
        hello = bytes([5]) + b"HELLO" + bytes([1, 0]) + b"\x00" * 72 + os.urandom(32) + os.urandom(8) + os.urandom(80)
        return greeting + bytes([0x04, len(hello)]) + hello
    name = b"Socket-Type"
    ready = bytes([5]) + b"READY" + bytes([len(name)]) + name + struct.pack(">I", len(socket_type)) + socket_type
    return greeting + bytes([0x04, len(ready)]) + ready


def _peer_closes(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(0.2)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def _listening_ports(cluster) -> list[tuple[str, bytes, int, str]]:
    """(address, the zmq socket type a sender would have, pid, process) of every internal port."""
    state = cluster.state()
    out = [(state["control_addr"], b"DEALER", cluster.proc.pid, "controller")]
    for w in state["workers"]:
        out += [(w["data_addr"], b"PUSH", w["pid"], f"w{w['id']}"), (w["kv_addr"], b"PUSH", w["pid"], f"w{w['id']}")]
    return out


def _nothing_reached_the_codecs(cluster, live, before: dict) -> None:
    """A bad-MAC marker from a secret holder to every port, then the drop counters must have moved by the
    markers alone: whatever the stranger sent before never reached a codec."""
    ports: Ports = live["ports"]
    expected: dict[str, dict[str, int]] = {}
    for name in sorted(ports.socks):
        ports.send(name, [b"\x00" * 32, b"\x80"])
        owner = expected.setdefault(ports.owner[name], {})
        owner["bad_mac"] = owner.get("bad_mac", 0) + 1
    wait_for(cluster, before, expected)


@pytest.mark.parametrize("mechanism", [b"NULL", b"CURVE"])
@pytest.mark.parametrize("declared", [LIMITS.zmq_maxmsgsize + 1, 2**40, 2**63 - 1])
def test_frame_declaring_a_size_past_the_limit_is_refused_before_allocation(cluster, live, declared, mechanism):
    """A peer without the secret sends a raw ZMTP frame header declaring more bytes than MAXMSGSIZE: it
    fails the CURVE handshake first, so the receiver disconnects it before reading any frame, nothing is
    allocated (RSS flat), nothing is counted, and the process keeps serving. (An authenticated peer's
    oversize frame is refused by MAXMSGSIZE: test_transport.py.)"""
    before = snapshot(cluster)
    for addr, kind, pid, _ in _listening_ports(cluster):
        host, port = addr.rsplit(":", 1)
        rss0 = rss_mb(pid)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(_zmtp_greeting(kind, mechanism))
                s.sendall(bytes([0x02]) + struct.pack(">Q", declared) + b"\x00" * 4096)
            except OSError:
                pass  # already hung up on
            assert _peer_closes(s, timeout=5), f"{addr} kept a peer that declared a {declared}-byte frame"
        assert rss_mb(pid) - rss0 < 16, f"{addr}: RSS grew after a declared {declared}-byte frame"
    _nothing_reached_the_codecs(cluster, live, before)
    assert_cluster_intact(cluster, live["pids"], live["epochs"])


@pytest.mark.parametrize("mechanism", [b"NULL", b"CURVE"])
def test_unfinished_multipart_message_memory_is_bounded(cluster, live, mechanism):
    """Found by this fuzzer (docs/reliability.md#fuzzing): libzmq buffers a multipart message until its
    last frame, so a peer that streamed frames with MORE and never ended the message grew the receiver
    without bound (190 MB for 190 MB sent), no secret needed. Now such a peer fails the CURVE handshake
    keyed from the cluster secret: every port hangs up before taking a frame, RSS stays flat and nothing
    reaches the codec."""
    chunk = bytes([0x03]) + struct.pack(">Q", 1 << 20) + b"x" * (1 << 20)  # MORE | LONG, 1 MiB
    before = snapshot(cluster)
    for addr, kind, pid, _ in _listening_ports(cluster):
        host, port = addr.rsplit(":", 1)
        rss0 = rss_mb(pid)
        sent = 0
        with socket.create_connection((host, int(port)), timeout=5) as s:
            try:
                s.sendall(_zmtp_greeting(kind, mechanism))
                for _ in range(160):
                    s.sendall(chunk)
                    sent += 1
            except OSError:
                pass  # the receiver hung up
            assert _peer_closes(s, timeout=5), f"{addr} kept a peer that never completed the handshake"
            grown = rss_mb(pid) - rss0
        assert sent < 160, f"{addr} read a whole 160 MiB unfinished message from a peer without the secret"
        assert grown < 16, f"{addr}: RSS grew by {grown:.0f} MB for an unfinished message"
    _nothing_reached_the_codecs(cluster, live, before)
    assert_cluster_intact(cluster, live["pids"], live["epochs"])


def test_no_process_grew_and_answers_are_unchanged(cluster, live):
    """After all of the above: same processes, bounded memory, the same greedy answer as before."""
    after = {p: rss_mb(p) for p in live["rss"]}
    grown = {p: round(after[p] - live["rss"][p], 1) for p in after if after[p] - live["rss"][p] > 64}
    assert not grown, f"RSS grew by more than 64 MB: {grown}"
    assert cluster.complete(PROMPT, max_tokens=4)["choices"][0]["token_ids"] == live["reference"]
    assert_cluster_intact(cluster, live["pids"], live["epochs"])
    # the drops are visible to an operator too, not only in the JSON
    text = cluster.client.get("/metrics").text
    assert 'lumen:transport_dropped_messages{process="controller",reason="bad_mac"}' in text
    assert 'lumen:transport_dropped_messages{process="worker0",reason="malformed"}' in text
