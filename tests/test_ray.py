"""`lumen serve --launcher ray` on a local two-node Ray cluster (two raylets on this machine).

Real processes throughout: a Ray head and a second Ray node, `lumen serve` as a subprocess that joins
them as a driver, workers as Ray actors. In deterministic mode (float64 on CPU) every greedy stream
interrupted by a failure must return exactly the tokens of its failure-free run:
  * SIGKILL of one worker actor's process mid-stream (Ray reports the actor's death; its worker
    process dies with it), and SIGKILL of a worker's pid as `lumen bench --fail` does it;
  * a whole node killed (its raylet, its actors and their workers at once): two executors and the
    holders they hosted are lost together; the workers restart as new actors on the surviving node.
No process of ours survives: every actor and worker pid is gone after `lumen serve` exits, and no
process of the Ray cluster is left after it is shut down.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
from cluster_util import make_tiny_model_dir, run_cluster, wait_until, worker_pids_alive

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = pytest.mark.cluster

PROMPT = list(range(200, 248))  # 48 tokens = 3 full pages
BLOCK = 16
MAX_TOKENS = 600  # long enough (seconds) that a loaded CI box polls the state while all four still run
TAG_ENV = "LUMEN_RAY_TEST_TAG"  # every process this module's Ray cluster starts inherits it


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def _tagged_processes(tag: str) -> list[int]:
    """Live processes (not zombies) whose environment carries this module's tag, other than us."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and needle in _read(f"/proc/{entry}/environ"):
            found.extend(worker_pids_alive([int(entry)]))
    return found


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model_dir(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def ray_cluster():
    """A head and one more node, 4 CPU slots each: SPREAD puts 2 workers on each, and after a node
    dies the survivor has room for all 4. Fast node health checks, so that Ray moves a dead node's
    placement-group bundles within seconds (lumen's heartbeats notice the failure first anyway)."""
    tag = uuid.uuid4().hex
    old = os.environ.get(TAG_ENV)
    os.environ[TAG_ENV] = tag
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 4, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 3}})
    try:
        node_b = cluster.add_node(num_cpus=4)
        cluster.wait_for_nodes()
        yield cluster, node_b
    finally:
        cluster.shutdown()
        if old is None:
            os.environ.pop(TAG_ENV, None)
        else:
            os.environ[TAG_ENV] = old
        deadline = time.monotonic() + 20
        while _tagged_processes(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {p: _read(f"/proc/{p}/cmdline").replace(b"\0", b" ")[:80] for p in _tagged_processes(tag)}
        assert not left, f"processes of the Ray cluster left behind: {left}"


@pytest.fixture(scope="module")
def serve(tiny_dir, ray_cluster):
    cluster, node_b = ray_cluster
    actor_pids: set[int] = set()
    with run_cluster(tiny_dir, workers=4, policy="lumen",
                     extra=["--deterministic", "--launcher", "ray", "--ray-address", cluster.address]) as c:
        c.actor_pids = actor_pids
        c.head_id, c.node_b_id = cluster.head_node.node_id, node_b.node_id
        yield c
        for w in c.state()["workers"]:
            if w["pid"] and worker_pids_alive([w["pid"]]):
                actor_pids.add(_ppid(w["pid"]))
    # `lumen serve` has exited and run_cluster has checked its worker pids: the actors must be gone too
    deadline = time.monotonic() + 10
    while worker_pids_alive(actor_pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not worker_pids_alive(actor_pids), "worker actors outlived lumen serve"


def _actor_pid(c, wid: int) -> int:
    pid = _ppid(c.worker(wid)["pid"])
    assert _read(f"/proc/{pid}/cmdline").startswith(b"ray::"), "a worker's parent is its Ray actor"
    c.actor_pids.add(pid)
    return pid


def _stream(c, box: dict, key) -> threading.Thread:
    t = threading.Thread(target=lambda: box.update({key: c.stream_tokens(PROMPT, max_tokens=MAX_TOKENS,
                                                                          ignore_eos=True)}))
    t.start()
    return t


def _metric(c, name: str) -> float:
    for line in c.client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


@pytest.fixture(scope="module")
def reference(serve):
    return serve.complete(PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True)["choices"][0]["token_ids"]


def test_workers_spread_over_nodes_and_secret_stays_private(serve, ray_cluster, reference):
    workers = serve.state()["workers"]
    nodes = [w["node"] for w in workers]
    assert sorted(nodes.count(n) for n in set(nodes)) == [2, 2], nodes  # SPREAD: 2 per node
    assert set(nodes) == {serve.head_id, serve.node_b_id}
    for w in workers:
        # the data socket is bound on the node's IP, which is where the worker says it lives
        assert w["data_addr"].rsplit(":", 1)[0] == w["host"] and not w["host"].startswith("127.")
    # the secret reaches the worker process only: not the actor's environment or command line
    # (so not runtime_env), not any log or event file of the Ray session
    environ = _read(f"/proc/{workers[0]['pid']}/environ").split(b"\0")
    secret = next(v.split(b"=", 1)[1] for v in environ if v.startswith(b"LUMEN_CLUSTER_SECRET="))
    assert len(secret) >= 32
    actor = _actor_pid(serve, 0)
    assert secret not in _read(f"/proc/{actor}/environ") and secret not in _read(f"/proc/{actor}/cmdline")
    session = Path(ray_cluster[0].head_node.get_session_dir_path())
    leaks = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink() and secret in _read(str(p))]
    assert not leaks, f"the cluster secret appears in {leaks}"
    assert len(reference) == MAX_TOKENS


def test_actor_killed_mid_stream_recovers_unchanged(serve, reference):
    box: dict = {}
    t = _stream(serve, box, 0)
    req = wait_until(lambda: next((r for r in serve.state()["requests"]
                              if r["holder"] is not None and r["valid_ckpt_tokens"] >= 4 * BLOCK), None),
                60, "the request was never checkpointed")
    nodes = {w["id"]: w["node"] for w in serve.state()["workers"]}
    executor = req["executor"]
    assert nodes[req["holder"]] != nodes[executor]  # LUMEN places the checkpoint on another node
    old = serve.worker(executor)
    os.kill(_actor_pid(serve, executor), signal.SIGKILL)
    t.join(180)
    ids, finish, errors = box[0]
    assert not errors and finish == "length"
    assert ids == reference
    assert _metric(serve, "lumen:checkpoint_restores_total") >= 1
    # the worker process died with its actor, and a new actor (new epoch, new pid) serves again
    wait_until(lambda: not worker_pids_alive([old["pid"]]), 10, "the worker outlived its actor")
    serve.wait_serving(4, timeout=120)
    new = serve.worker(executor)
    assert new["epoch"] > old["epoch"] and new["pid"] != old["pid"]

    # `lumen bench --fail` kills the reported pid: the actor sees its worker exit and is replaced
    victim = next(w for w in serve.state()["workers"] if w["id"] != executor)
    actor = _actor_pid(serve, victim["id"])
    os.kill(victim["pid"], signal.SIGKILL)
    wait_until(lambda: serve.worker(victim["id"])["epoch"] > victim["epoch"], 30, "no restart after the kill")
    wait_until(lambda: not worker_pids_alive([actor]), 10, "the old actor was not released")
    serve.wait_serving(4, timeout=120)


def test_node_failure_recovers_unchanged(serve, ray_cluster, reference):
    cluster, node_b = ray_cluster
    box: dict = {}
    threads = [_stream(serve, box, i) for i in range(4)]

    def node_b_protected():
        # every live request that executes on node B has at least 4 pages checkpointed elsewhere
        # (requests elsewhere, or already finished, need nothing: they must come out unchanged anyway)
        state = serve.state()
        nodes = {w["id"]: w["node"] for w in state["workers"]}
        on_b = [r for r in state["requests"] if nodes.get(r["executor"]) == serve.node_b_id]
        ok = on_b and all(r["holder"] is not None and r["valid_ckpt_tokens"] >= 4 * BLOCK for r in on_b)
        return (state, nodes, on_b) if ok else None

    try:
        state, nodes, on_b = wait_until(node_b_protected, 90, "")
    except TimeoutError:
        raise TimeoutError(f"no request on node B was ever checkpointed: {serve.state()}") from None
    assert all(nodes[r["holder"]] != serve.node_b_id for r in on_b)  # their checkpoints survive the node
    victims = [w for w in state["workers"] if w["node"] == serve.node_b_id]
    pids = [w["pid"] for w in victims] + [_actor_pid(serve, w["id"]) for w in victims]
    interrupted_before = _metric(serve, "lumen:interrupted_requests_total")
    # the machine dies at once: its raylet and object store, its actors and their workers
    cluster.remove_node(node_b, allow_graceful=False)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for t in threads:
        t.join(180)
    for i in range(4):
        ids, finish, errors = box[i]
        assert not errors and finish == "length", (i, errors)
        assert ids == reference, i
    assert _metric(serve, "lumen:interrupted_requests_total") - interrupted_before >= len(on_b)
    # the node's workers come back as new actors on the surviving node, where Ray moved their slots
    serve.wait_serving(4, timeout=150)
    after = serve.state()["workers"]
    assert {w["node"] for w in after} == {serve.head_id}
    for w in victims:
        assert next(a for a in after if a["id"] == w["id"])["epoch"] > w["epoch"]
    serve.complete(PROMPT, max_tokens=8)  # and they serve
