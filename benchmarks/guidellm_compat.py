"""guidellm (the ecosystem's LLM load client) against a live `lumen serve`: install, run, check.

    python benchmarks/guidellm_compat.py --out runs/guidellm                      # default model, 2 CPU workers
    python benchmarks/guidellm_compat.py --model DIR --requests 12 --profile synchronous --profile constant@2

1. Makes sure guidellm (pinned, GUIDELLM_VERSION) is installed in its own virtualenv
   ($LUMEN_GUIDELLM_VENV, default $LUMEN_HOME/guidellm-venv = ~/.cache/lumen/guidellm-venv), never in
   the environment that runs lumen: guidellm brings its own torch, transformers and datasets. torch is
   pinned beside it (TORCH_SPEC) so pip takes the CPU wheel the project uses rather than a CUDA build.
2. Starts `lumen serve` (real worker processes on 127.0.0.1) and waits until every worker serves.
3. Runs `guidellm run` once per profile (synthetic prompts of --prompt-tokens, --output-tokens each,
   streaming over the OpenAI API, --requests requests per profile), with the served model's own
   tokenizer directory (guidellm needs one to build prompts; nothing is fetched from a model hub).
4. Checks each guidellm JSON report: every request succeeded (none errored or incomplete), TTFT and
   ITL are present and positive for every request, every request got exactly --output-tokens tokens
   (guidellm sends ignore_eos), and the gateway holds no request afterwards.
5. Stops the server and checks that no worker process outlived it.

Writes OUT/guidellm_<profile>.json (guidellm's report), OUT/guidellm_<profile>.log (its console
output), OUT/serve.log and OUT/summary.json. Exit status: 0 all checks passed, 1 a check failed,
3 guidellm could not be installed (e.g. no network to the package index).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

GUIDELLM_VERSION = "0.8.1"
TORCH_SPEC = "torch==2.13.0"  # the project's CPU wheel; guidellm 0.8.1 accepts it
EXIT_CHECK_FAILED = 1
EXIT_NO_GUIDELLM = 3


class NoGuidellm(RuntimeError):
    """guidellm could not be installed or does not run."""


def default_venv() -> Path:
    env = os.environ.get("LUMEN_GUIDELLM_VENV")
    if env:
        return Path(env).expanduser()
    home = Path(os.environ.get("LUMEN_HOME", Path.home() / ".cache" / "lumen")).expanduser()
    return home / "guidellm-venv"


def ensure_guidellm(venv: Path, version: str = GUIDELLM_VERSION, log=print) -> Path:
    """Path of the guidellm executable in `venv`, creating the venv and installing into it if needed."""
    exe = venv / "bin" / "guidellm"
    stamp = venv / "lumen-guidellm.txt"
    want = f"guidellm=={version} {TORCH_SPEC}"
    if exe.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return exe
    py = venv / "bin" / "python"
    if not py.exists():
        log(f"creating virtualenv {venv}")
        r = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if r.returncode != 0:
            raise NoGuidellm(f"python -m venv {venv} failed: {r.stderr.strip()[-2000:]}")
    log(f"installing {want} into {venv} (about 1.5 GB, a minute or two)")
    r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--retries", "1", "--timeout", "60",
                        TORCH_SPEC, f"guidellm=={version}"], capture_output=True, text=True)
    if r.returncode != 0:
        raise NoGuidellm(f"pip install guidellm=={version} failed:\n{(r.stdout + r.stderr).strip()[-3000:]}")
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    if r.returncode != 0 or version not in r.stdout:
        raise NoGuidellm(f"guidellm --version: {r.stdout.strip()} {r.stderr.strip()[-2000:]}")
    stamp.write_text(want + "\n")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_model_dir(model: str) -> Path:
    """The directory whose tokenizer guidellm loads (the served model's own)."""
    if model == "default":
        from lumen.model.hub import prepare_default
        return prepare_default()
    path = Path(model).expanduser()
    if not (path / "tokenizer.json").exists():
        raise SystemExit(f"{model}: guidellm needs the model's tokenizer; pass a model directory with "
                         "tokenizer.json, 'default', or --tokenizer DIR")
    return path.resolve()


def parse_profile(spec: str) -> tuple[str, float | None]:
    """'synchronous', 'poisson@0.5', 'constant@2' (requests/s), 'concurrent@4' (streams) -> (kind, value)."""
    kind, _, value = spec.partition("@")
    if kind == "synchronous":
        if value:
            raise SystemExit("synchronous takes no rate")
        return kind, None
    if kind not in ("poisson", "constant", "concurrent"):
        raise SystemExit(f"unsupported profile {spec!r}: synchronous, poisson@RATE, constant@RATE or "
                         "concurrent@STREAMS")
    if not value or float(value) <= 0 or (kind == "concurrent" and not float(value).is_integer()):
        raise SystemExit(f"{kind} needs a positive {'integer stream count' if kind == 'concurrent' else 'rate'}: "
                         f"{kind}@N")
    return kind, float(value)


class Server:
    """`lumen serve` in its own process group; stop() leaves no process behind."""

    def __init__(self, model: str, workers: int, devices: str, policy: str, extra: list[str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lumen", "serve", "--model", model, "--workers", str(workers),
               "--devices", devices, "--policy", policy, "--port", str(self.port), *extra]
        self.cmd = cmd
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=30)
        self.worker_pids: set[int] = set()

    def state(self) -> dict:
        data = self.client.get("/lumen/cluster").json()
        self.worker_pids.update(w["pid"] for w in data["workers"] if w.get("pid"))
        return data

    def wait_serving(self, workers: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lumen serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if sum(w["state"] == "serving" for w in self.state()["workers"]) >= workers:
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"fewer than {workers} workers serving after {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> list[int]:
        """SIGTERM, then SIGKILL of the group after 30 s; returns worker pids that outlived it."""
        try:
            self.state()
        except Exception:
            pass
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        deadline = time.monotonic() + 10
        while alive(self.worker_pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = alive(self.worker_pids)
        for pid in left:  # report them, but do not leave them running
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()
        return left


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def guidellm_command(exe: Path, url: str, kind: str, rate: float | None, args, tokenizer: Path,
                     report: Path) -> list[str]:
    if rate is None:
        profile = f"kind={kind}"
    elif kind == "concurrent":
        profile = f"kind={kind},streams={int(rate)}"
    else:
        profile = f"kind={kind},rate={rate:g}"
    return [str(exe), "run",
            "--backend", f"kind=openai_http,target={url},request_format={args.request_format}",
            "--profile", profile,
            "--constraint", f"kind=max_requests,count={args.requests}",
            "--data", f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},output_tokens={args.output_tokens}",
            "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
            "--output", f"kind=json,path={report}",
            "--disable-progress"]


def guidellm_env(out: Path, processes: int) -> dict:
    env = dict(os.environ)
    for var in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):  # guidellm's venv, not lumen's environment
        env.pop(var, None)
    env.update({
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",  # local tokenizer only
        "GUIDELLM__MAX_WORKER_PROCESSES": str(processes),  # its default (10) crowds a small CPU box
        "GUIDELLM__LOGGING__LOG_FILE": str(out / "guidellm-debug.log"),
        "GUIDELLM__DEFAULT_RESULTS_DIR": str(out),
        "COLUMNS": "200",
    })
    return env


def run_guidellm(cmd: list[str], env: dict, log_path: Path, timeout: float) -> tuple[int, float]:
    """guidellm's exit status and the CPU seconds it and its worker processes used (the client shares
    the machine with the server it measures)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                stdin=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = 124
        finally:  # guidellm spawns worker processes; none may outlive it
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return rc, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _stat(stats: dict | None, key: str = "mean") -> float | None:
    if not stats or not stats.get("count"):
        return None
    if key.startswith("p"):
        return stats["percentiles"][key]
    return stats[key]


def check_report(path: Path, requests: int, output_tokens: int) -> tuple[list[dict], list[str]]:
    """Summaries of each benchmark in a guidellm JSON report, and the problems found in it."""
    problems: list[str] = []
    if not path.exists():
        return [], [f"{path.name}: guidellm wrote no report"]
    report = json.loads(path.read_text())
    benches = report.get("benchmarks") or []
    if not benches:
        problems.append(f"{path.name}: no benchmark in the report")
    rows = []
    for b in benches:
        m = b["metrics"]
        name = b["config"]["strategy"]["type_"]
        strategy = b["config"]["strategy"]
        value = strategy.get("rate") or strategy.get("streams")
        label = name if value is None else f"{name}@{value:g}"
        totals = m["request_totals"]
        ok = m["request_totals"]["successful"]
        if ok != requests or totals["errored"] or totals["incomplete"]:
            problems.append(f"{label}: {ok} of {requests} requests succeeded, {totals['errored']} errored, "
                            f"{totals['incomplete']} incomplete")
        ttft = m["time_to_first_token_ms"]["successful"]
        itl = m["inter_token_latency_ms"]["successful"]
        if not ttft or ttft.get("count") != ok or not ttft["min"] > 0:
            problems.append(f"{label}: TTFT missing or not positive for some request: {ttft and ttft.get('count')}")
        if output_tokens > 1 and (not itl or not itl.get("count") or not itl["min"] > 0):
            problems.append(f"{label}: ITL missing or not positive")
        out = m["output_token_count"]["successful"]
        if out and out.get("count") and not out["min"] == out["max"] == output_tokens:
            problems.append(f"{label}: output tokens per request {out['min']}..{out['max']}, "
                            f"expected exactly {output_tokens}")
        rows.append({
            "profile": label, "successful": ok, "errored": totals["errored"], "incomplete": totals["incomplete"],
            "duration_s": b["duration"],
            "requests_per_s": _stat(m["requests_per_second"]["total"]),
            "output_tokens_per_s": _stat(m["output_tokens_per_second"]["total"]),
            "prompt_tokens_mean": _stat(m["prompt_token_count"]["successful"]),
            "output_tokens_mean": _stat(out),
            "concurrency_mean": _stat(m["request_concurrency"]["total"]),
            "latency_s_mean": _stat(m["request_latency"]["successful"]),
            "ttft_ms_mean": _stat(ttft), "ttft_ms_median": _stat(ttft, "median"), "ttft_ms_p95": _stat(ttft, "p95"),
            "itl_ms_mean": _stat(itl), "itl_ms_median": _stat(itl, "median"), "itl_ms_p95": _stat(itl, "p95"),
            "tpot_ms_mean": _stat(m["time_per_output_token_ms"]["successful"]),
            "guidellm_warnings": [w.get("code", str(w)) if isinstance(w, dict) else str(w)
                                  for w in b.get("warnings") or []],
        })
    return rows, problems


def _fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def print_table(rows: list[dict]) -> None:
    head = ["profile", "ok/err/inc", "req/s", "out tok/s", "TTFT mean", "TTFT p50", "TTFT p95", "ITL mean",
            "ITL p50", "ITL p95", "latency s"]
    lines = [head]
    for r in rows:
        lines.append([r["profile"], f"{r['successful']}/{r['errored']}/{r['incomplete']}",
                      _fmt(r["requests_per_s"], 3), _fmt(r["output_tokens_per_s"]), _fmt(r["ttft_ms_mean"]),
                      _fmt(r["ttft_ms_median"]), _fmt(r["ttft_ms_p95"]), _fmt(r["itl_ms_mean"]),
                      _fmt(r["itl_ms_median"]), _fmt(r["itl_ms_p95"]), _fmt(r["latency_s_mean"], 2)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    for row in lines:
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    print("(TTFT and ITL in ms)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", help="'default' or a model directory (with tokenizer.json)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory for guidellm (default: the model's)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--devices", default="cpu", help="`lumen serve --devices`")
    ap.add_argument("--policy", default="lumen")
    ap.add_argument("--serve-args", default="", help="more `lumen serve` arguments, one string")
    ap.add_argument("--profile", action="append", dest="profiles",
                    help="synchronous | poisson@RATE | constant@RATE | concurrent@STREAMS (repeatable; "
                         "default: synchronous, poisson@0.25)")
    ap.add_argument("--requests", type=int, default=24, help="requests per profile")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=32)
    ap.add_argument("--request-format", default="/v1/chat/completions",
                    choices=["/v1/chat/completions", "/v1/completions"])
    ap.add_argument("--guidellm-processes", type=int, default=2, help="guidellm worker processes")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed for each guidellm run")
    ap.add_argument("--ready-timeout", type=float, default=300)
    ap.add_argument("--venv", type=Path, default=None, help="guidellm's virtualenv (created if missing)")
    ap.add_argument("--setup-only", action="store_true", help="install guidellm if needed, then exit")
    ap.add_argument("--out", type=Path, default=Path("runs/guidellm"))
    args = ap.parse_args(argv)
    profiles = [parse_profile(p) for p in (args.profiles or ["synchronous", "poisson@0.25"])]

    venv = args.venv or default_venv()
    try:
        exe = ensure_guidellm(venv)
    except NoGuidellm as exc:
        print(f"guidellm unavailable: {exc}", file=sys.stderr)
        return EXIT_NO_GUIDELLM
    print(f"guidellm {GUIDELLM_VERSION}: {exe}")
    if args.setup_only:
        return 0

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(args.tokenizer).resolve() if args.tokenizer else resolve_model_dir(args.model)
    env = guidellm_env(out, args.guidellm_processes)
    started = datetime.datetime.now(datetime.UTC)
    server = Server(args.model, args.workers, args.devices, args.policy, args.serve_args.split(), out / "serve.log")
    rows: list[dict] = []
    problems: list[str] = []
    commands: list[str] = []
    left: list[int] = []
    try:
        server.wait_serving(args.workers, args.ready_timeout)
        print(f"lumen serve: {args.workers} workers serving at {server.url} ({' '.join(server.cmd[1:])})")
        for kind, rate in profiles:
            name = kind if rate is None else f"{kind}@{rate:g}"
            report = out / f"guidellm_{name.replace('@', '_')}.json"
            report.unlink(missing_ok=True)
            cmd = guidellm_command(exe, server.url, kind, rate, args, tokenizer, report)
            commands.append(" ".join(cmd))
            print(f"guidellm {name}: {args.requests} requests ...", flush=True)
            t0 = time.monotonic()
            rc, cpu_s = run_guidellm(cmd, env, report.with_suffix(".log"), args.timeout)
            wall_s = time.monotonic() - t0
            print(f"  exit {rc} after {wall_s:.0f} s (guidellm used {cpu_s:.0f} CPU s); "
                  f"console output: {report.with_suffix('.log')}")
            if rc != 0:
                problems.append(f"{name}: guidellm exited with {rc} (see {report.with_suffix('.log')})")
            r, p = check_report(report, args.requests, args.output_tokens)
            for row in r:
                row.update(guidellm_wall_s=round(wall_s, 1), guidellm_cpu_s=round(cpu_s, 1))
            rows += r
            problems += p
            held = server.state()["requests"]
            if held:
                problems.append(f"{name}: the gateway still holds {len(held)} request(s) after the run")
    except Exception as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        left = server.stop()
    if left:
        problems.append(f"worker processes outlived the server: {left}")

    summary = {
        "guidellm_version": GUIDELLM_VERSION, "started_utc": started.isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_1_5_15_at_end": os.getloadavg()},
        "serve": server.cmd[1:], "model": args.model, "tokenizer": str(tokenizer),
        "request_format": args.request_format, "prompt_tokens": args.prompt_tokens,
        "output_tokens": args.output_tokens, "requests_per_profile": args.requests,
        "guidellm_commands": commands, "worker_pids": sorted(server.worker_pids), "benchmarks": rows, "problems": problems, "passed": not problems,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if rows:
        print_table(rows)
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    print(("PASS" if not problems else "FAIL") + f": summary in {out / 'summary.json'}")
    return 0 if not problems else EXIT_CHECK_FAILED


if __name__ == "__main__":
    sys.exit(main())
