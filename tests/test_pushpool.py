"""PUSH sockets to peers that are gone are closed at once, not kept until the pool's LRU evicts them.

The controller tells a worker that a peer is no longer its peer -- a holder died (HOLDER to a new
holder, or holder -1 when none is left) or an assist pairing ended (ASSIST role none) -- and the
worker closes the socket to it: the data socket on its own thread, the page socket on the sender's.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
import torch
from cluster_util import make_tiny_model_dir, run_cluster, wait_until

from lumen.engine import KVPage
from lumen.runtime.kv_stream import PageSender
from lumen.runtime.protocol import SCHEMA
from lumen.runtime.transport import SECRET_ENV, Codec, PullEndpoint, PushPool, secret_to_hex
from lumen.runtime.worker import Worker, parse_args

SECRET = bytes(range(32))


def test_forget_closes_and_drops_only_that_peer(ctx):
    rx = Codec(SECRET, "w1", 1, schema=SCHEMA)
    with PullEndpoint(ctx, rx) as a, PullEndpoint(ctx, Codec(SECRET, "w2", 1, schema=SCHEMA)) as b:
        pool = PushPool(ctx, Codec(SECRET, "w0", 1, schema=SCHEMA), fault=None)
        page = {"req": "r", "index": 0, "end": 16, "tag": b"t" * 16}
        assert pool.send(a.address, "PAGE", page, [b"x"]) and pool.send(b.address, "PAGE", page, [b"y"])
        assert pool.num_peers == 2
        assert pool.forget(a.address) and pool.forget(a.address) is False
        assert pool.peers == [f"tcp://{b.address}"] and pool.forgotten == 1
        assert b.recv(timeout_ms=3000) is not None
        # a forgotten peer that is in fact alive just gets a new socket on the next send
        assert pool.send(a.address, "PAGE", page, [b"z"])
        got = [a.recv(timeout_ms=3000) for _ in range(2)]
        assert got[-1] is not None and bytes(got[-1].frames[0]) in (b"x", b"z")
        pool.close()
        assert pool.num_peers == 0


def test_page_sender_forgets_on_its_own_thread_in_queue_order(ctx):
    with PullEndpoint(ctx, Codec(SECRET, "w1.kvrx", 1, schema=SCHEMA)) as holder:
        tx = PageSender(ctx, SECRET, 0, 1)
        tx.start()
        try:
            data = torch.zeros(64, dtype=torch.float32)
            tx.submit(holder.address, KVPage("r", 0, 16, b"t" * 16, data))
            tx.forget(holder.address)  # after the page: the page is handed over first
            msg = holder.recv(timeout_ms=5000)
            assert msg is not None and msg.type == "PAGE" and msg.body["req"] == "r"
            wait_until(lambda: tx.pool is not None and tx.pool.forgotten == 1, 5, "sender forgot the holder")
            assert tx.pool.num_peers == 0 and tx.sent == 1
        finally:
            tx.stop()
            tx.join(5)


@pytest.fixture
def worker(monkeypatch):
    monkeypatch.setenv(SECRET_ENV, secret_to_hex(SECRET))
    w = Worker(parse_args(["--worker-id", "0", "--epoch", "1", "--controller", "127.0.0.1:1", "--model", "unused"]))
    w.kv_tx.start()
    yield w
    w.close()


class _Signal:
    """A page's copy-done event that tells the test the sender reached it."""

    def __init__(self, done: threading.Event):
        self.done = done

    def synchronize(self):
        self.done.set()


def _drain(w: Worker, addr: str = "127.0.0.1:5003") -> None:
    # a page through the sender's queue (to a peer it already has): what was queued before is handled
    done = threading.Event()
    w.holders["m"] = [(3, addr, 0)]  # a request that streams there (the sender skips pages nobody wants)
    w.kv_tx.submit(addr, KVPage("m", 0, 16, b"t" * 16, torch.zeros(4), _Signal(done)))
    assert done.wait(5)
    time.sleep(0.05)  # the send right after wait() returned
    del w.holders["m"]


def test_worker_closes_the_page_socket_once_no_request_streams_to_a_dead_holder(worker):
    w = worker
    for rid in ("a", "b"):
        w._set_holders(rid, [[2, "127.0.0.1:5002"]])
        w.kv_tx.submit("127.0.0.1:5002", KVPage(rid, 0, 16, b"t" * 16, torch.zeros(4)))
    w._set_holders("c", [[3, "127.0.0.1:5003"]])
    w.kv_tx.submit("127.0.0.1:5003", KVPage("c", 0, 16, b"t" * 16, torch.zeros(4)))
    _drain(w)
    assert w.kv_tx.pool.num_peers == 2
    # holder 2 died: request a moves to holder 3, b loses its holder (no copies); only then is 2 unused
    w._set_holders("a", [[3, "127.0.0.1:5003"]])
    _drain(w)
    assert w.kv_tx.pool.forgotten == 0
    w._set_holders("b", [])
    _drain(w)
    assert w.kv_tx.pool.forgotten == 1 and w.kv_tx.pool.peers == ["tcp://127.0.0.1:5003"]
    assert w.holders == {"a": [(3, "127.0.0.1:5003", 0)], "c": [(3, "127.0.0.1:5003", 0)]}


def test_worker_closes_the_data_socket_when_its_assist_pairing_ends(worker):
    w = worker
    w._on_assist({"role": "verifier", "peer": 1, "addr": "127.0.0.1:6001", "k": 4})
    w.push.send("127.0.0.1:6001", "PROPOSE", {"items": []}, [b""])
    assert w.push.num_peers == 1
    w._on_assist({"role": "none", "peer": -1, "addr": "", "k": 4})  # the partner died (or switched)
    assert w.push.num_peers == 0 and w.push.forgotten == 1 and w.verifier is None


# ---------------------------------------------------------------------------------------- live cluster
PROMPT = list(range(200, 248))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


@pytest.mark.cluster
def test_executor_closes_its_socket_to_a_killed_holder(tiny_dir):
    with run_cluster(tiny_dir, workers=2, policy="lumen", extra=["--deterministic"]) as c:
        reference = c.complete(PROMPT, max_tokens=400, ignore_eos=True)["choices"][0]["token_ids"]
        box = {}
        t = threading.Thread(target=lambda: box.update(r=c.stream_tokens(PROMPT, max_tokens=400, ignore_eos=True)))
        t.start()

        def protected():
            reqs = c.state()["requests"]
            return reqs[0] if reqs and reqs[0]["holder"] is not None and reqs[0]["valid_ckpt_tokens"] >= 32 else None

        req = wait_until(protected, 30, "request checkpointed")
        executor = req["executor"]
        wait_until(lambda: c.worker(executor)["stats"].get("kv_peers") == 1, 10, "executor's page socket")
        c.kill(req["holder"], signal.SIGKILL)
        # only two workers: no new holder; the executor is told (holder -1) and closes the socket
        w = wait_until(lambda: (x := c.worker(executor))["stats"].get("kv_peers_forgotten") == 1 and x, 30,
                       "executor forgot the dead holder")
        assert w["stats"]["kv_peers"] == 0
        t.join(120)
        ids, finish, errors = box["r"]
        assert not errors and ids == reference and finish == "length"
