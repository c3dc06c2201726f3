"""`lumen serve`: the gateway + controller process, and the worker processes it launches."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal

import torch
import uvicorn

from ..model.loader import read_config
from ..model.tokenizer import Tokenizer
from ..policy import POLICY_NAMES, parse_policy, parse_replicas
from ..policy.slots import DEVICE_SHARES, default_slot_s, resolve_device_share
from ..units import parse_mtbf
from .config import DRAFT_FIRST_CHOICES, ClusterConfig, mps_share_fixed
from .controller import Controller
from .gateway import Gateway, OpenAIErrorH11Protocol
from .launcher import LocalLauncher
from .model_dirs import resolve_model_dir
from .openai_api import MAX_BODY_BYTES
from .protocol import MAX_CKPT_COPIES
from .transport import new_cluster_secret

log = logging.getLogger("lumen.serve")


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="Hugging Face model directory, 'default' (embedded SmolLM2-135M-Instruct) or preset:NAME")
    p.add_argument("--served-model-name", help="name clients use in 'model' (default: the directory name)")
    p.add_argument("--workers", type=int, default=2, help="number of worker processes (model replicas)")
    p.add_argument("--devices", default=None,
                   help="comma-separated devices, assigned round-robin: cpu or cuda:0,cuda:1,... "
                        "(default: every visible GPU, else cpu)")
    p.add_argument("--policy", default="lumen", choices=POLICY_NAMES)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("LUMEN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (also LUMEN_API_KEY)")
    p.add_argument("--draft-model", default=None,
                   help="draft for assisted recovery (default: the embedded draft with the default model)")
    p.add_argument("--spec-k", type=int, default=4, help="draft tokens proposed per request per round")
    p.add_argument("--spec-acceptance", type=float, default=0.6,
                   help="prior per-token acceptance of the draft pair: where assisted recovery starts its "
                        "estimate, which each request's verify outcomes then update (goodput rule)")
    p.add_argument("--draft-first", choices=DRAFT_FIRST_CHOICES, default="auto",
                   help="a worker restarted under speculation whose draft is not resident in host memory: "
                        "'auto' reads the draft first only when its expected assistance outweighs the delay "
                        "it adds to the target's load (policy rule, issue 24); 'always': every such restart "
                        "drafts first (the paper's behaviour); 'never': load the target straight away (a "
                        "draft resident in host memory still loads beside it; default: %(default)s)")
    p.add_argument("--cold-restart", action="store_true",
                   help="drop the model's weight files from the OS page cache before restarting a worker, so "
                        "its reload reads the disk as after a node reboot (benchmarks of reload-bound recovery)")
    p.add_argument("--ckpt-budget-gb", type=float, default=2.0, help="host memory for checkpoints, per worker")
    p.add_argument("--ckpt-export-interval-ms", type=float, default=ClusterConfig.ckpt_export_interval_ms,
                   help="export completed KV pages at most this often (0: after every engine step); fewer "
                        "exports cost the engine thread less, the checkpoint lags by up to this")
    add_replica_arguments(p)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=None, help="KV pages per worker (default: sized by the engine)")
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--chunk-tokens", type=int, default=None, help="prefill token budget per step")
    p.add_argument("--max-pending", type=int, default=1024, help="requests in flight before 429")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                   help="largest accepted HTTP request body; larger ones get 413 (default: 4 MiB)")
    p.add_argument("--hb-interval", type=float, default=0.1, help="heartbeat interval, seconds")
    p.add_argument("--hb-misses", type=int, default=ClusterConfig.hb_misses,
                   help="missed heartbeats before a serving worker is declared dead (default 10: 1 s at 0.1 s; "
                        "a hang waits this long, a crash or kill is seen at once; 3 declared healthy GPU workers "
                        "dead under load, and CPU workers share a few cores with the gateway)")
    p.add_argument("--fence-grace", type=float, default=0.0,
                   help="seconds a hung (fenced) worker may linger before it is killed")
    p.add_argument("--deterministic", action="store_true", help="float64 on CPU: bit-stable greedy outputs")
    p.add_argument("--dtype", choices=["float32", "float64", "bfloat16", "float16"], default=None)
    add_device_share_arguments(p, default="shared")
    p.add_argument("--launcher", choices=["local", "ray"], default="local",
                   help="local: worker processes on this machine; ray: workers as Ray actors across the nodes "
                        "of a Ray cluster (pip install 'lumen-serve[ray]'; see docs/multinode.md)")
    p.add_argument("--ray-address", default=None,
                   help="with --launcher ray: 'auto' (the cluster `ray start` runs on this node) or HOST:PORT "
                        "of its head; default: a private single-node Ray started and stopped by lumen")
    p.add_argument("--placement-strategy", choices=["SPREAD", "PACK"], default="SPREAD",
                   help="with --launcher ray: spread workers over nodes (default) or pack them onto few")


def add_replica_arguments(p: argparse.ArgumentParser) -> None:
    """Checkpoint copies and failure domains (issue 25; also on bench, demo and chaos, passed to serve)."""
    p.add_argument("--ckpt-replicas", default="1", metavar="K|auto",
                   help="checkpoint copies per request: 1 (the paper), K >= 2 (K holders, in distinct failure "
                        "domains where possible; each streams every page and reserves host memory), or 'auto': "
                        "copies while the expected loss of a recompute outweighs a copy's cost "
                        "(docs/replicas.md; default: %(default)s)")
    p.add_argument("--ckpt-replicas-max", type=int, default=ClusterConfig.ckpt_replicas_max, metavar="K",
                   help="with --ckpt-replicas auto: at most this many copies (default: %(default)s)")
    p.add_argument("--ckpt-worker-mtbf", default="1h", metavar="DUR",
                   help="with --ckpt-replicas auto: the independent failures of one worker it plans for, as a "
                        "mean time between failures ('none': not planned for; default: %(default)s)")
    p.add_argument("--ckpt-domain-mtbf", default="none", metavar="DUR",
                   help="with --ckpt-replicas auto: failures of a whole failure domain at once, MTBF per domain "
                        "(default: %(default)s)")
    p.add_argument("--domains", default=None, metavar="N|LABELS",
                   help="failure domains of the workers: N (workers split into N equal contiguous groups, e.g. "
                        "hosts or racks) or one label per worker, comma-separated (e.g. r0,r0,r1,r1); placement "
                        "keeps a request's copies out of its executor's domain and apart (default: the node "
                        "under --launcher ray, else each worker its own)")


def _domains(arg: str | None, workers: int) -> list[str] | None:
    if arg is None or not str(arg).strip():
        return None
    text = str(arg).strip()
    if text.isdigit():
        n = int(text)
        if not 1 <= n <= workers:
            raise ValueError(f"--domains N must be between 1 and the number of workers ({workers}), not {n}")
        return [f"d{i * n // workers}" for i in range(workers)]
    labels = [x.strip() for x in text.split(",")]
    if len(labels) != workers or not all(labels) or any(len(x) > 64 for x in labels):
        raise ValueError(f"--domains takes a number or exactly one non-empty label per worker ({workers}), "
                         f"comma-separated; got {len(labels)}")
    return labels


def add_device_share_arguments(p: argparse.ArgumentParser, default: str) -> None:
    """--device-share and --slot-ms (also on bench, demo and chaos, which pass them to serve)."""
    p.add_argument("--device-share", choices=DEVICE_SHARES, default=default,
                   help="workers that map to one device (several per GPU, or the CPU): 'shared' lets each use "
                        "it freely (a dead worker's share goes to the survivors); 'slots' gives each a fixed "
                        "time slot of a cycle, with the whole device inside it, so a failure costs 1/N of the "
                        "capacity as on separate GPUs; 'auto': slots where a device is shared "
                        "(default: %(default)s)")
    p.add_argument("--slot-ms", default="auto",
                   help="slot length with --device-share slots, or 'auto': about 8 decode steps of the model, "
                        "estimated from its weight bytes and the device's measured decode bandwidth "
                        "(docs/configuration.md)")
    p.add_argument("--cpu-lanes", type=int, default=1,
                   help="CPU workers with --device-share slots: split the cores into this many lanes that run "
                        "side by side, each time-sliced among its workers (default 1: each worker has the whole "
                        "CPU in its slot; more lanes serve more but isolate less: docs/configuration.md)")


# Decode-step estimate for the default slot length: a decode step reads every weight once, at the
# bandwidth a measured decode step reached, plus a fixed cost. CPU: the 2-core box, SmolLM2-135M fp32
# (540 MB), batch 1-8: 61-85 ms a step on 2 threads, 73-112 on one (2026-12-06). CUDA: the 8B shape
# (16.4 GB) at batch 1 ran 128 steps/s on an H100 and 175 on an H200 (docs/benchmarks.md): 2.1 and 2.9
# TB/s; the H100's figure, so a slot holds at least STEPS_PER_SLOT steps on either.
DECODE_BYTES_PER_S = {"cpu": 9e9, "cuda": 2.1e12}
DECODE_STEP_FIXED_S = {"cpu": 0.01, "cuda": 0.001}


def estimated_decode_step_s(weight_bytes: int, device: str) -> float:
    kind = "cpu" if device == "cpu" else "cuda"
    return weight_bytes / DECODE_BYTES_PER_S[kind] + DECODE_STEP_FIXED_S[kind]


def _slot_ms(arg: str, weight_bytes: int, device: str) -> float:
    if str(arg).strip().lower() == "auto":
        return default_slot_s(estimated_decode_step_s(weight_bytes, device)) * 1e3
    try:
        ms = float(arg)
    except ValueError:
        raise ValueError(f"--slot-ms must be a number of milliseconds or 'auto', not {arg!r}") from None
    if not 1 <= ms <= 10_000:
        raise ValueError("--slot-ms must be between 1 and 10000")
    return ms


def _devices(arg: str | None) -> list[str]:
    if arg:
        devices = [d.strip() for d in arg.split(",") if d.strip()]
        for d in devices:
            if d != "cpu" and not d.startswith("cuda"):
                raise ValueError(f"unknown device {d!r}: use cpu or cuda:N")
        return devices
    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return ["cpu"]


def build_config(args: argparse.Namespace) -> tuple[ClusterConfig, Tokenizer | None, int]:
    if args.workers < 1:
        raise ValueError("--workers must be at least 1")
    if args.hb_misses < 1 or args.hb_interval <= 0:
        raise ValueError("--hb-misses must be at least 1 and --hb-interval positive")
    if not 0 <= args.ckpt_export_interval_ms <= 10_000:
        raise ValueError("--ckpt-export-interval-ms must be between 0 and 10000")
    if not 0.0 <= args.spec_acceptance <= 1.0:
        raise ValueError("--spec-acceptance must be a probability, between 0 and 1")
    if not 0 <= args.spec_k <= 16:
        raise ValueError("--spec-k must be between 0 and 16")
    parse_policy(args.policy)
    try:
        replicas = parse_replicas(getattr(args, "ckpt_replicas", 1))
    except ValueError as e:
        raise ValueError(f"--ckpt-replicas: {e}") from None
    replicas_max = getattr(args, "ckpt_replicas_max", ClusterConfig.ckpt_replicas_max)
    most = replicas_max if replicas == "auto" else replicas
    if not 1 <= replicas_max or most > MAX_CKPT_COPIES or most > max(1, args.workers - 1):
        raise ValueError(f"--ckpt-replicas (and --ckpt-replicas-max) must be between 1 and {MAX_CKPT_COPIES} and "
                         f"below the number of workers ({args.workers}): a copy needs a worker besides the executor")
    try:
        worker_mtbf = parse_mtbf(getattr(args, "ckpt_worker_mtbf", "1h"))
        domain_mtbf = parse_mtbf(getattr(args, "ckpt_domain_mtbf", None))
    except ValueError as e:
        raise ValueError(f"--ckpt-worker-mtbf / --ckpt-domain-mtbf: {e}") from None
    domains = _domains(getattr(args, "domains", None), args.workers)
    model_dir = resolve_model_dir(args.model)
    mcfg = read_config(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir, eos_token_ids=mcfg.eos_token_ids) \
        if (model_dir / "tokenizer.json").is_file() else None
    devices = _devices(args.devices)
    on_gpu = devices[0].startswith("cuda")
    dtype_name = args.dtype or ("float64" if args.deterministic else "bfloat16" if on_gpu else "float32")
    kv_dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}[dtype_name]
    draft = args.draft_model
    if draft is None and args.model == "default":
        draft = str(resolve_model_dir("default-draft"))
    elif draft is not None:
        draft = str(resolve_model_dir(draft))
    max_len = args.max_model_len or min(mcfg.max_position, 8192 if on_gpu else 2048)
    cfg = ClusterConfig(
        model=str(model_dir), served_model_name=args.served_model_name or (
            "default" if args.model == "default" else model_dir.name),
        num_workers=args.workers, devices=devices, policy=args.policy, host=args.host,
        hb_interval_s=args.hb_interval, hb_misses=args.hb_misses,
        fence_grace_s=args.fence_grace,
        block_size=args.block_size, num_blocks=args.num_blocks, max_batch=args.max_batch,
        chunk_tokens=args.chunk_tokens or (1024 if on_gpu else 256), deterministic=args.deterministic,
        dtype=dtype_name, max_model_len=max_len, ckpt_budget_bytes=int(args.ckpt_budget_gb * (1 << 30)),
        ckpt_export_interval_ms=args.ckpt_export_interval_ms,
        kv_bytes_per_token=mcfg.kv_bytes_per_token(kv_dtype), draft_model=draft, spec_k=args.spec_k,
        spec_acceptance=args.spec_acceptance, draft_first=args.draft_first,
        cold_restart=args.cold_restart,
        gpu_share_fixed=on_gpu and mps_share_fixed(os.environ, workers_per_gpu=math.ceil(args.workers / len(devices))),
        max_pending=args.max_pending, ckpt_replicas=replicas, ckpt_replicas_max=replicas_max,
        ckpt_worker_mtbf_s=worker_mtbf, ckpt_domain_mtbf_s=domain_mtbf, domains=domains)
    cfg.cpu_lanes_max = getattr(args, "cpu_lanes", 1)
    if cfg.cpu_lanes_max < 1:
        raise ValueError("--cpu-lanes must be at least 1")
    share = getattr(args, "device_share", "shared")
    on_ray = getattr(args, "launcher", "local") == "ray"
    if share == "auto" and (on_ray or cfg.gpu_share_fixed):
        share = "shared"  # Ray: a GPU per actor; fixed MPS shares: slots would halve them again
    cfg.device_share = resolve_device_share(share, max(n for _, n in cfg.share_groups()))
    if cfg.device_share == "slots":
        if on_ray:
            raise ValueError("--device-share slots needs the workers of a device on one host: use the local "
                             "launcher (Ray places workers on GPUs of their own)")
        if len({d == "cpu" for d in devices}) > 1:
            raise ValueError("--device-share slots takes CPU or GPU workers, not both (one slot length)")
        cfg.slot_ms = _slot_ms(getattr(args, "slot_ms", "auto"), mcfg.weight_bytes(kv_dtype), devices[0])
    return cfg, tokenizer, mcfg.vocab_size


class _DrainingServer(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM once its own shutdown is done, which would kill this process
    before the workers are stopped; lumen handles the signals itself: HTTP drains, then the cluster."""

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def _connect_ray(args: argparse.Namespace):
    from .launcher_ray import RayLauncher

    launcher = RayLauncher(address=args.ray_address, strategy=args.placement_strategy)
    launcher.connect()
    if args.devices is None:
        # the driver may have no GPU while the workers' nodes do: ask the cluster, not this machine
        args.devices = "cuda:0" if launcher.cluster_has_gpus() else "cpu"
    return launcher


async def serve(args: argparse.Namespace) -> int:
    ray_launcher = _connect_ray(args) if getattr(args, "launcher", "local") == "ray" else None
    try:
        cfg, tokenizer, vocab = build_config(args)
        if ray_launcher is not None:
            from .launcher_ray import internal_host

            # workers on other nodes must reach the controller's ROUTER: a loopback --host keeps only the
            # HTTP gateway private, the internal sockets bind the driver's node IP (HMAC-authenticated)
            cfg.host = internal_host(args.host, ray_launcher.node_ip())
            await ray_launcher.prepare(cfg.num_workers, on_gpu=cfg.devices[0].startswith("cuda"))
    except BaseException:
        if ray_launcher is not None:
            await ray_launcher.shutdown()
        raise
    launcher = ray_launcher or LocalLauncher()
    controller = Controller(cfg, launcher, new_cluster_secret())
    gateway = Gateway(controller, tokenizer, vocab, cfg.max_model_len, api_key=args.api_key,
                      max_body_bytes=getattr(args, "max_body_bytes", MAX_BODY_BYTES))
    server = _DrainingServer(uvicorn.Config(gateway.app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=30, lifespan="off",
                                           http=OpenAIErrorH11Protocol))
    log.info("lumen: %d workers of %s on %s, policy %s", cfg.num_workers, cfg.model, ",".join(cfg.devices),
             cfg.policy)
    await controller.start()
    try:
        serving = asyncio.create_task(server.serve())
        ready = await controller.wait_ready(timeout=1800)
        if ready:
            log.info("serving %s on http://%s:%d/v1", cfg.served_model_name, args.host, args.port)
        await serving  # returns on SIGINT/SIGTERM after in-flight HTTP requests drain
    finally:
        await controller.stop(drain_s=5.0)
    return 0
