"""``lumen bench`` and ``lumen demo`` argument parsing (wired into ``lumen.cli`` by the lead).

``lumen demo`` is ``lumen bench`` with defaults sized for the embedded default model on a small
CPU machine: 4 workers, the no-failure reference plus stop-restart, fixed-ckpt and lumen, one
SIGKILL, one repeat, short prompts/outputs, a calibrated rate and automatic windows (the paper's
200 would leave a few-hundred-request run with one or two windows; smaller windows are noisier,
which is why the bench ignores windows that finished before the failure, see --paper-start).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from lumen.policy.replicas import parse_replicas

from .runner import DEFAULT_POLICIES, BenchConfig, run_bench

__all__ = ["add_parser", "run", "config_from_args", "DEMO_DEFAULTS"]

# Sized to finish in well under 10 minutes on 2 CPU cores: 4 cluster starts and 4 replays.
# The rate is calibrated on the machine (a share of the measured saturated request rate) because a
# fixed QPS would overload a slow 2-core box and leave a fast one idle; duration fixes the size.
DEMO_DEFAULTS = dict(
    model="default",
    workers=4,
    devices=None,
    policies=list(DEFAULT_POLICIES),
    qps=None,
    # past 3/4 of the capacity, so that losing one of four workers (a quarter of it, under the time slots
    # that --device-share auto gives workers sharing the CPU) builds a backlog for recovery to clear
    target_load=0.85,
    # 4 per worker: with 2, time-sliced workers ran batches too small to show their capacity (0.34 req/s
    # calibrated against 0.65 with 4, 2026-12-06), and the demo made only 22 requests
    calibration_requests=16,
    # the embedded model reloads in ~7 s, an outage too short to see past the slots' own TTFT noise (one
    # request in a 4 x 500 ms cycle waits 0-1.5 s for its worker's turn): the failure cost no measurable
    # capacity in the 2026-12-06 22:39 demo (stop-restart's outage TTFT 0.44x). A reload 15 s longer is
    # what a model of a few GB takes from a local disk, the paper's premise
    reload_delay=15.0,
    # a batch cap: the calibration's 4 requests per worker then measure the capacity, and a survivor cannot
    # absorb a dead worker's load by growing its batch (the 22:59 demo, uncapped at 0.85 of a calibrated
    # rate that was half the real capacity, again lost none); capped, stop-restart's outage TTFT was 3.2x
    serve_args="--max-batch 4",
    duration=75.0,
    requests=None,
    lengths="sharegpt",
    max_prompt=128,
    max_output=32,
    # the busiest worker: at half load a fixed worker is often idle when killed (0 requests
    # interrupted in the 2026-11-28 09:34 demo run), and then no recovery mechanism runs at all
    fail=["t=25s:worker=busiest:SIGKILL"],
    repeats=1,
    window=None,
)


def _qps(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError("qps must be > 0 or 'auto'")
    return v


def _window(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("window must be >= 1 or 'auto'")
    return v


DEVICE_SHARES = ("auto", "shared", "slots")  # lumen serve --device-share


def _add_device_share(g, default: str) -> None:
    g.add_argument("--device-share", choices=DEVICE_SHARES, default=default,
                   help="passed to `lumen serve --device-share`: workers sharing a device (the CPU, or one GPU) "
                        "take turns in fixed time slots ('slots'), so a dead worker's share stays idle and the "
                        "failure costs capacity as on separate GPUs; 'shared' lets the survivors take it; "
                        "'auto' is slots where a device is shared (default: %(default)s)")
    g.add_argument("--slot-ms", default="auto", help="passed to `lumen serve --slot-ms` (default: %(default)s)")


def _replicas(text: str) -> int | str:
    try:
        return parse_replicas(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_replicas(g) -> None:
    g.add_argument("--ckpt-replicas", type=_replicas, default=1, metavar="K|auto",
                   help="passed to `lumen serve --ckpt-replicas`: checkpoint copies per request (1: the paper; "
                        "K >= 2: K holders in distinct failure domains where possible; auto: by expected loss)")
    g.add_argument("--domains", default=None, metavar="N|LABELS",
                   help="passed to `lumen serve --domains`: the workers' failure domains")


def _serve_args(args: argparse.Namespace) -> list[str]:
    """--device-share, --slot-ms, --ckpt-replicas and --domains for `lumen serve`, then --serve-args
    (which may override them)."""
    out = ["--device-share", args.device_share, "--slot-ms", str(args.slot_ms),
           "--ckpt-replicas", str(args.ckpt_replicas)]
    if args.domains:
        out += ["--domains", args.domains]
    return out + shlex.split(args.serve_args)


def _add_args(p: argparse.ArgumentParser, demo: bool) -> None:
    d = DEMO_DEFAULTS if demo else {}
    g = p.add_argument_group("cluster")
    g.add_argument("--model", default=d.get("model", "default"),
                   help="model for `lumen serve --model` (default: %(default)s, the embedded model)")
    g.add_argument("--workers", type=int, default=d.get("workers", 4), help="workers (default: %(default)s)")
    g.add_argument("--devices", default=d.get("devices"), help="passed to `lumen serve --devices`")
    g.add_argument("--policy", dest="policies", action="append", default=None, metavar="POLICY",
                   help=f"policy to measure, repeatable (default: {' '.join(DEFAULT_POLICIES)})")
    g.add_argument("--url", default=None,
                   help="attach to a running cluster instead of starting one (measures its policy only)")
    g.add_argument("--serve-args", default=d.get("serve_args", ""),
                   help="extra arguments for `lumen serve`, one shell-quoted string (default: %(default)r)")
    _add_device_share(g, default="auto")
    _add_replicas(g)
    g.add_argument("--port", type=int, default=None, help="cluster port (default: a free port per run)")
    g.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for a cluster to be ready")
    w = p.add_argument_group("workload")
    w.add_argument("--qps", type=_qps, default=d.get("qps", 4.0),
                   help="mean request rate, or 'auto': target-load × the saturated rate measured on the first "
                        "cluster (default: %s)" % ("auto" if demo else "%(default)s"))
    w.add_argument("--target-load", type=float, default=d.get("target_load", 0.5),
                   help="with --qps auto (default: %(default)s)")
    w.add_argument("--calibration-requests", type=int, default=d.get("calibration_requests"),
                   help="with --qps auto: requests sent at once to measure the saturated rate (default: %s; "
                        "more gives a closer estimate of capacity)" % (
                            "%(default)s" if demo else "2 per worker, at least 4"))
    w.add_argument("--requests", type=int, default=d.get("requests"),
                   help="number of requests (default: duration × qps, else 1000)")
    w.add_argument("--duration", type=float, default=d.get("duration"),
                   help="seconds of arrivals (sets --requests = qps × duration)")
    w.add_argument("--lengths", default=d.get("lengths", "sharegpt"),
                   help="sharegpt | splitwise-conv | splitwise-code | fixed:P:O (default: %(default)s)")
    w.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
    w.add_argument("--burstiness", type=float, default=1.0, help="CV² of gaps for --arrival gamma")
    w.add_argument("--trace", default=None, help="replay a trace file (Azure CSV or JSONL) instead")
    w.add_argument("--time-scale", type=float, default=1.0, help="multiply trace times (0.5 = twice as fast)")
    w.add_argument("--max-prompt", type=int, default=d.get("max_prompt"), help="clip prompt tokens")
    w.add_argument("--max-output", type=int, default=d.get("max_output"), help="clip output tokens")
    f = p.add_argument_group("failures and measurement")
    f.add_argument("--fail", action="append", default=None, metavar="PLAN",
                   help="failure, repeatable: t=30s:worker=1[:SIGKILL|:SIGSTOP[:cont_after=5s]]; worker=busiest "
                        "picks the serving worker with the most requests when it fires "
                        f"(default: {DEMO_DEFAULTS['fail'][0]})")
    f.add_argument("--failure-free", choices=("reference", "all"), default="reference",
                   help="runs without the failure: the reference only (stop-restart's, which every failure run is "
                        "measured against), or 'all': each policy's too, for what it costs where nothing fails "
                        "(a table of TTFT and TPOT over stop-restart's; default: %(default)s)")
    f.add_argument("--reload-delay", type=float, default=d.get("reload_delay", 0.0), metavar="S",
                   help="make every restarted worker's reload S seconds longer (LUMEN_FAULT_SLOW_RELOAD_S), as a "
                        "larger model or a slower disk would (default: %(default)s)")
    f.add_argument("--repeats", type=int, default=d.get("repeats", 5), help="seeds per policy (default: %(default)s)")
    f.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    f.add_argument("--window", type=_window, default=d.get("window", 200),
                   help="requests per recovery-time window, or 'auto' = requests/12 (default: %s; the paper "
                        "uses 200, short runs need fewer)" % ("auto" if demo else "%(default)s"))
    f.add_argument("--threshold", type=float, default=0.05, help="degradation threshold (default: 5%%)")
    f.add_argument("--settle", type=int, default=3, help="consecutive good windows that end recovery")
    f.add_argument("--paper-start", action="store_true",
                   help="let windows that got all first tokens before the failure start the affected period "
                        "(the paper's rule verbatim; noisier on short runs)")
    f.add_argument("--request-timeout", type=float, default=300.0, help="per-request timeout, seconds")
    f.add_argument("--concurrency", type=int, default=512, help="max requests in flight")
    f.add_argument("--out", default=None, help="output directory (default: runs/bench-<timestamp>/)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.add_argument("--resume", action="store_true",
                   help="with --out: reuse the runs already finished there (same config), run only the missing "
                        "ones, then report all of them (long experiments split over several sessions)")
    f.add_argument("--report-only", action="store_true",
                   help="with --out: write the table, CSV and plots for the runs finished there; start nothing")


_BENCH_DESC = """\
Start a cluster per policy (or attach with --url), replay a seeded workload over the OpenAI API,
kill workers on the --fail plan, and compare recovery time and failure-affected TTFT/TPOT with a
no-failure run of the same workload. Repeats use seeds seed..seed+repeats-1; the table shows
mean ± 95% Student-t CI. Writes results.json, runs.csv, summary.csv and PNG plots to --out.
"""
_DEMO_DESC = """\
lumen bench with defaults for the embedded default model on a CPU: {workers} workers time-sliced on
the CPU (--device-share auto: a failure costs a quarter of the capacity), the no-failure reference
plus {policies}, failure {fail} with the reload made {reload_delay:g} s longer (as a model of a few
GB would take), serve args {serve_args!r} (a batch cap: the calibration then measures the capacity),
{repeats} repeat(s), {duration:g} s of arrivals at {target_load:g}
of the cluster's measured capacity (--qps auto), prompts <= {max_prompt} and outputs
<= {max_output} tokens, windows of requests/12 (the paper's 200 needs far longer runs). Every bench
option can be overridden.
""".format(**{**DEMO_DEFAULTS, "policies": ", ".join(DEMO_DEFAULTS["policies"]), "fail": DEMO_DEFAULTS["fail"][0]})


def add_parser(subparsers) -> None:
    """Register ``bench`` and ``demo`` on an argparse subparsers object (``func=run``)."""
    b = subparsers.add_parser("bench", help="load + failure injection against a live cluster, all policies",
                              description=_BENCH_DESC, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(b, demo=False)
    b.set_defaults(func=run, bench_demo=False)
    d = subparsers.add_parser("demo", help="the default comparison on the embedded model (minutes on a CPU)",
                              description=_DEMO_DESC, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_args(d, demo=True)
    d.set_defaults(func=run, bench_demo=True)
    _add_chaos(subparsers)


def _add_chaos(subparsers) -> None:
    from .chaos import FAULT_KINDS, ChaosConfig

    d = ChaosConfig()
    c = subparsers.add_parser("chaos", help="random faults under steady load: nothing may be lost",
                              description=_CHAOS_DESC, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--model", default=d.model, help="model for `lumen serve --model` (default: %(default)s)")
    c.add_argument("--workers", type=int, default=d.workers, help="workers (default: %(default)s)")
    c.add_argument("--policy", default=d.policy, help="recovery policy (default: %(default)s)")
    c.add_argument("--devices", default=None, help="passed to `lumen serve --devices`")
    c.add_argument("--url", default=None, help="attach to a running local cluster instead of starting one")
    c.add_argument("--serve-args", default="", help="extra arguments for `lumen serve`, one shell-quoted string")
    _add_device_share(c, default="shared")
    _add_replicas(c)
    c.add_argument("--duration", type=float, default=d.duration, help="seconds of load and faults (default: %(default)s)")
    c.add_argument("--qps", type=float, default=d.qps, help="mean request rate (default: %(default)s)")
    c.add_argument("--lengths", default=d.lengths, help="length distribution (default: %(default)s)")
    c.add_argument("--max-prompt", type=int, default=d.max_prompt, help="clip prompt tokens (default: %(default)s)")
    c.add_argument("--max-output", type=int, default=d.max_output, help="clip output tokens (default: %(default)s)")
    c.add_argument("--fault-every", type=float, default=d.fault_every,
                   help="mean seconds between faults (default: %(default)s)")
    c.add_argument("--min-serving", type=int, default=None,
                   help="serving workers every fault leaves untouched (default: half of them, at least 1)")
    c.add_argument("--kinds", default=",".join(d.kinds),
                   help=f"comma-separated fault kinds (default: all: {','.join(FAULT_KINDS)})")
    c.add_argument("--no-abuse", action="store_true", help="no disconnecting, non-reading or idle clients")
    c.add_argument("--idle-connections", type=int, default=d.idle_connections, help="idle connections held open")
    c.add_argument("--replay-sample", type=int, default=None,
                   help="replay only this many requests (seeded sample) failure-free for the comparison (default: all)")
    c.add_argument("--no-deterministic", action="store_true",
                   help="serve in the fast mode (outputs are then not compared with the failure-free replay)")
    c.add_argument("--seed", type=int, default=d.seed, help="seed of the workload and the fault schedule")
    c.add_argument("--startup-timeout", type=float, default=d.startup_timeout_s, help="seconds to wait for the cluster")
    c.add_argument("--out", default=None, help="output directory (default: runs/chaos-<timestamp>/)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=run_chaos_cli)


_CHAOS_DESC = """\
Start a cluster (or attach with --url), drive a steady open-loop load over the OpenAI API, and
inject a seeded random schedule of faults meanwhile: SIGKILL of executors, holders, workers during
a restore, recovering workers and their partners, two at once, and SIGSTOP hangs; always leaving
serving workers untouched. Client abuse runs alongside. Afterwards the same requests are replayed
without failures: in deterministic mode every output must be identical. Exit status 0 when nothing
was lost, nothing differs and nothing was left behind (requests, reservations, pages); 1 otherwise.
"""


def run_chaos_cli(args: argparse.Namespace) -> int:
    from lumen.metrics.report import report_console

    from .chaos import ChaosConfig, run_chaos
    from .cluster import ClusterStartError

    console = report_console()  # tables whole when piped, too
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        cfg = ChaosConfig(
            model=args.model, workers=args.workers, policy=args.policy, devices=args.devices, url=args.url,
            serve_args=_serve_args(args), duration=args.duration, qps=args.qps, lengths=args.lengths,
            max_prompt=args.max_prompt, max_output=args.max_output, fault_every=args.fault_every, min_serving=args.min_serving,
            replay_sample=args.replay_sample,
            kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()), abuse=not args.no_abuse,
            idle_connections=args.idle_connections, deterministic=not args.no_deterministic, seed=args.seed,
            startup_timeout_s=args.startup_timeout, out=args.out, quiet=args.quiet)
        report = run_chaos(cfg, console)
    except (ValueError, FileNotFoundError, ClusterStartError) as e:
        console.print(f"[red]lumen chaos: {e}")
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted")
        return 130
    return 0 if report.passed else 1


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        model=args.model,
        workers=args.workers,
        devices=args.devices,
        policies=list(args.policies or DEFAULT_POLICIES),
        qps=args.qps,
        target_load=args.target_load,
        requests=args.requests,
        duration=args.duration,
        lengths=args.lengths,
        arrival=args.arrival,
        burstiness=args.burstiness,
        trace=args.trace,
        time_scale=args.time_scale,
        max_prompt=args.max_prompt,
        max_output=args.max_output,
        fail=list(args.fail or DEMO_DEFAULTS["fail"]),
        failure_free=args.failure_free,
        repeats=args.repeats,
        seed=args.seed,
        url=args.url,
        out=args.out,
        window=args.window,
        threshold=args.threshold,
        settle=args.settle,
        causal_start=not args.paper_start,
        port=args.port,
        serve_args=_serve_args(args),
        reload_delay_s=args.reload_delay,
        startup_timeout_s=args.startup_timeout,
        request_timeout_s=args.request_timeout,
        max_concurrency=args.concurrency,
        calibration_requests=args.calibration_requests,
        resume=args.resume,
        report_only=args.report_only,
        quiet=args.quiet,
    )


def run(args: argparse.Namespace) -> int:
    from lumen.metrics.report import report_console

    from .cluster import ClusterStartError
    from .faults import FaultInjectionError

    console = report_console()  # tables whole when piped, too
    # One INFO line per HTTP request (httpx's default under lumen's -v/INFO logging) would bury
    # the progress bars and the table.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.url and args.policies:
        console.print("[yellow]--url: measuring the attached cluster's own policy; --policy is ignored")
    try:
        cfg = config_from_args(args)
        res = run_bench(cfg, console)
    except (ValueError, FileNotFoundError, FaultInjectionError, ClusterStartError) as e:
        console.print(f"[red]lumen {'demo' if args.bench_demo else 'bench'}: {e}")
        return 2
    except KeyboardInterrupt:
        console.print("[red]interrupted")
        return 130
    if args.bench_demo:
        console.print(f"plots: {res.files['timeline_png']} and {res.files['bars_png']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m lumen.bench.cli bench ...``) until lumen.cli wires it in."""
    parser = argparse.ArgumentParser(prog="lumen")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
