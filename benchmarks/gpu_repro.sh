#!/usr/bin/env bash
# Issue 9 in device-call-sized blocks: prepare (target + self-draft + bandwidths), optionally the
# engine benchmark (issue 2), the checkpoint overhead re-measure (issue 4) and a step-time profile
# of the target for the simulator (issue 7), then
# `lumen bench --resume` for as long as the block allows.
# Run from the repository root. Results go to $OUT (more than 8 files: packed into block.tgz); the bench's directory
# (.gpu-runs/, git-ignored) persists while the machine is warm and can be carried to a fresh one.
#
#   STEPS="prepare engine ckpt" RELOAD=1 BUDGET=560 bash benchmarks/gpu_repro.sh   # block 1
#   STEPS="prepare bench" BUDGET=560 bash benchmarks/gpu_repro.sh                   # blocks 2.. (--resume)
# (prepare is a no-op where the machine already holds the prepared target; on a fresh machine it draws
# the same seeded target again, and carrying .gpu-runs/ lets the bench resume)
#   MPS=1 STEPS="prepare bench" BUDGET=560 bash benchmarks/gpu_repro.sh   # workers sharing a GPU: fixed SM shares
#   PRESET=tiny DEVICES=cpu DURATION=20 STEPS="prepare bench" bash benchmarks/gpu_repro.sh   # CPU dry run
set -uo pipefail
start=$(date +%s)
OUT=${OUT:-/tmp/lumen-gpu}
mkdir -p "$OUT"
export LUMEN_HOME=${LUMEN_HOME:-$PWD/.gpu-home}
export PYTHONUNBUFFERED=1
# the device machine has torch but not lumen's other dependencies: install the carried wheels there
if ! PYTHONPATH=$PWD/src python3 -c "import lumen.runtime.server, lumen.runtime.worker, lumen.bench.cli" 2>/dev/null \
    && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
STEPS=${STEPS:-"prepare ckpt bench"}
BUDGET=${BUDGET:-560}          # seconds this call may take in all
PRESET=${PRESET:-qwen3-8b}
DEVICES=${DEVICES:-$(python3 -c "import torch; print(','.join(f'cuda:{i}' for i in range(torch.cuda.device_count())) or 'cpu')")}
WORKERS=${WORKERS:-4}
DURATION=${DURATION:-48}
FAIL_AT=${FAIL_AT:-10s}
REPEATS=${REPEATS:-3}
TARGET_LOAD=${TARGET_LOAD:-0.8}
# QPS=<req/s>: a fixed rate instead of calibrating (auto = TARGET_LOAD x the saturated rate). The simulator puts
# the slots testbed's latency knee at 2.5-3 req/s, above the 0.9-load rate of 2.1 (docs/simulation.md 4.10)
QPS=${QPS:-auto}
NUM_BLOCKS=${NUM_BLOCKS:-2000}
# each store is page-locked in full at worker start (no pinned allocation while serving): 6 GB holds
# ~32 full-length requests of the 8B shape (189 MB each), where run 1's holders held ~4-8 at a time
CKPT_GB=${CKPT_GB:-6}
# FAILURE_FREE=all: each policy's own run without the failure as well (its failure-free cost, issue 23 item 4)
POLICIES=${POLICIES:-"stop-restart fixed-ckpt lumen"}  # ablations: a later call with POLICIES="lumen-no-spec spec-only" REPEATS=1
# MPS=1: where workers share a GPU, the bench runs them under CUDA MPS with a fixed share of the SMs each
# (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE = 100 x GPUs / workers; MPS=N sets N percent). Without it, a killed
# worker's GPU time goes to the survivors: on one H200 (run 4, 2026-12-04) TTFT *fell* 9-24% below
# the no-failure run after the kill under every policy, so the failure cost no capacity to recover.
# HBM bandwidth stays shared under MPS: the partition is of compute, not complete. With the share
# fixed, `lumen serve` lets a restarting worker on a shared GPU draft (its share idles while it reloads).
MPS=${MPS:-0}
# the daemon and every client (the bench's workers inherit it) meet on this pipe directory
[ "$MPS" != 0 ] && export CUDA_MPS_PIPE_DIRECTORY=/tmp/lumen-mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/lumen-mps/log
# runs under MPS, or on more than one GPU, are another experiment (another capacity, another calibrated
# rate): each its own directory (one GPU time-shared keeps the name of runs 2-4)
NGPU=$(tr ',' '\n' <<< "$DEVICES" | grep cuda | sort -u | wc -l)
# SHARE: lumen serve --device-share for the bench (auto: time slots where workers share a GPU, so that a
# failure costs capacity as on GPUs of their own; shared: runs 2-7's testbed). Slot runs are another
# experiment: their own directory
SHARE=${SHARE:-auto}
SLOT_MS=${SLOT_MS:-auto}
SHARED_GPU=$([ "$(tr ',' '\n' <<< "$DEVICES" | grep -c .)" -lt "$WORKERS" ] && echo 1 || echo 0)
SLOTS=$([ "$SHARE" = slots ] || { [ "$SHARE" = auto ] && [ "$SHARED_GPU" = 1 ]; } && echo 1 || echo 0)
RUNS=${RUNS:-$PWD/.gpu-runs/repro-$PRESET$([ "$NGPU" -gt 1 ] && echo "-${NGPU}gpu")$([ "$MPS" != 0 ] && echo -mps)$([ "$SLOTS" = 1 ] && echo -slots)$([ "$QPS" != auto ] && echo "-q$QPS")}
left() { echo $(( BUDGET - ($(date +%s) - start) )); }

mps_start() {  # prints the per-worker SM percentage once an MPS client has run under it; fails otherwise
  command -v nvidia-cuda-mps-control >/dev/null || { echo "no nvidia-cuda-mps-control" >&2; return 1; }
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  # stdout is the share this function returns: nothing else may reach it
  nvidia-cuda-mps-control -d >/dev/null 2>&1 || return 1
  local pct=$MPS
  if [ "$pct" = 1 ]; then
    pct=$(( 100 * $(tr ',' '\n' <<< "$DEVICES" | grep -c .) / WORKERS )); [ "$pct" -gt 100 ] && pct=100
  fi
  # a CUDA client under the share must work before any worker depends on it
  if ! CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$pct timeout 60 python3 -c \
      "import torch; assert torch.ones(1, device='cuda').sum().item() == 1" >&2; then
    mps_stop; return 1
  fi
  echo "$pct"
}
mps_stop() { echo quit | nvidia-cuda-mps-control >/dev/null 2>&1; sleep 1; }
# a daemon left by a block cut at its limit on this (warm) machine would make every step an MPS client
[ "$MPS" != 0 ] && command -v nvidia-cuda-mps-control >/dev/null && mps_stop

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
free -g >> "$OUT/gpu.txt"; nproc >> "$OUT/gpu.txt"
# CURVE throughput of the pyzmq in use: wheels before 27.3 encrypt at ~60 MB/s, which capped checkpoint
# streaming on the H200 (2026-12-04); a few seconds, so every block records it
timeout 60 python3 benchmarks/transport_curve.py --seconds 0.5 --rounds 1 > "$OUT/curve.txt" 2>&1
head -2 "$OUT/curve.txt"

for step in $STEPS; do
  echo "== $step ($(left) s left)"
  case $step in
  prepare)
    timeout -k 20 "${PREPARE_TIMEOUT:-300}" python3 benchmarks/gpu_repro.py prepare --preset "$PRESET" ${RELOAD:+--reload} \
      --out "$OUT/prepare.json" > "$OUT/prepare.log" 2>&1
    echo "prepare exit $?"; tail -3 "$OUT/prepare.log" ;;
  engine)
    # issue 2: engine figures (decode steps/s vs transformers, prefill vs the matmul roofline)
    timeout -k 20 "${ENGINE_TIMEOUT:-240}" python3 benchmarks/engine.py --gpu --out "$OUT/engine_gpu.json" \
      > "$OUT/engine.log" 2>&1
    echo "engine benchmark exit $?"; tail -12 "$OUT/engine.log" ;;
  ckpt)
    # issue 4: checkpoint streaming overhead, failure-free, two workers on the first GPU
    # a priming cluster, then two per repeat (three with CKPT_EXPORT_MS: lumen with that export interval
    # as well; 0: after every step), ~50-60 s each on the H200 with the 1.7B shape
    # CKPT_REPLICAS=K: one more arm, lumen with K checkpoint copies per request (issue 25), on K+1 workers
    arms=2; [ -n "${CKPT_EXPORT_MS:-}" ] && arms=$(( arms + 1 )); [ -n "${CKPT_REPLICAS:-}" ] && arms=$(( arms + 1 ))
    ckpt_workers=$(( ${CKPT_REPLICAS:-1} + 1 > 2 ? ${CKPT_REPLICAS:-1} + 1 : 2 ))
    timeout -k 20 "${CKPT_TIMEOUT:-$(( 70 + 65 * arms * ${CKPT_REPEATS:-1} ))}" python3 benchmarks/checkpoint_overhead.py --model preset:qwen3-1.7b \
      --workers "$ckpt_workers" --devices "${DEVICES%%,*}" --qps 4 --requests 100 --max-prompt 512 --max-output 256 \
      --repeats "${CKPT_REPEATS:-1}" --serve-args "--num-blocks 3000" ${CKPT_EXPORT_MS:+--export-interval-ms "$CKPT_EXPORT_MS"} \
      ${CKPT_REPLICAS:+--replicas "$CKPT_REPLICAS"} --out "$OUT/ckpt_gpu.json" > "$OUT/ckpt.log" 2>&1
    echo "checkpoint overhead exit $?"; tail -4 "$OUT/ckpt.log" ;;
  share)
    # issue 23: does a failure cost capacity? 4 workers saturated on one GPU, one SIGKILLed: survivors'
    # tokens/s before and after, shared freely and time-sliced (~3 min per mode with the 8B shape)
    target=$LUMEN_HOME/models/repro-$PRESET
    timeout -k 20 "${SHARE_TIMEOUT:-$(( $(left) - 30 ))}" python3 benchmarks/device_share.py --model "$target" \
      --workers "$WORKERS" --devices "$DEVICES" --modes "${SHARE_MODES:-shared,slots}" --slot-ms "$SLOT_MS" \
      --max-batch "${SHARE_BATCH:-32}" --max-tokens 256 --warmup-s 15 --before-s "${SHARE_S:-25}" --settle-s 5 --after-s "${SHARE_S:-25}" \
      --serve-args "--num-blocks $NUM_BLOCKS --max-model-len 2048" --out "$OUT/share" > "$OUT/share.log" 2>&1
    echo "device share benchmark exit $?"; tail -16 "$OUT/share.log"
    (cd "$OUT/share" && for f in *; do mv "$f" "../share_$f"; done) && rmdir "$OUT/share" ;;
  reload)
    # the target's cold read on each policy's reload path, each trial a fresh process (benchmarks/reload_paths.py): why
    # lumen's restarted worker read its target 3-4 s faster than every other policy's (gpu-results.md)
    # at most 240 s, and never past the block's end (the JSON is rewritten after each trial: a cut keeps what ran)
    lim=$(( $(left) - 20 )); [ "$lim" -gt 240 ] && lim=240; [ "$lim" -lt 30 ] && lim=30
    timeout -k 20 "$lim" python3 benchmarks/reload_paths.py --model "$LUMEN_HOME/models/repro-$PRESET" \
      --draft "$LUMEN_HOME/models/repro-$PRESET-selfdraft" --device "${DEVICES%%,*}" --store-gb "$CKPT_GB" --repeats "${RELOAD_REPEATS:-2}" \
      --out "$OUT/reload_paths.json" > "$OUT/reload.log" 2>&1
    echo "reload paths exit $?"; tail -4 "$OUT/reload.log"
    # the resident draft's one copy to the device: page-locked (the loader's default) unless the draft arms
    # found the pageable load faster; kept beside the runs so that every later lumen run of them loads alike
    mkdir -p "$RUNS"
    python3 - "$OUT/reload_paths.json" > "$RUNS/draft_pin.txt" <<'PY' || rm -f "$RUNS/draft_pin.txt"
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
pinned, pageable = (s.get(a, {}).get("draft", {}).get("mean_s") for a in ("draft", "draft-pageable"))
assert pinned and pageable, "a draft arm did not finish"
print(0 if pageable < pinned else 1)
PY
    [ -f "$RUNS/draft_pin.txt" ] && echo "resident draft page-locked: $(cat "$RUNS/draft_pin.txt") (LUMEN_DRAFT_PIN for the bench)" ;;
  profile)
    # issue 7 on GPU: the engine's step times over a grid of batch shapes, for `lumen simulate --profile`
    timeout -k 20 "${PROFILE_TIMEOUT:-180}" python3 -m lumen profile --model "$LUMEN_HOME/models/repro-$PRESET" \
      --device "${DEVICES%%,*}" --quick --out "$OUT/profile_gpu.csv" > "$OUT/profile.log" 2>&1
    echo "profile exit $?"; tail -3 "$OUT/profile.log" ;;
  bench)
    target=$LUMEN_HOME/models/repro-$PRESET
    if [ ! -f "$target/lumen_repro.json" ]; then echo "no prepared target: run the prepare step first"; continue; fi
    pol=(); for p in $POLICIES; do pol+=(--policy "$p"); done
    share=""
    if [ "$MPS" != 0 ]; then
      share=$(mps_start) || share=""
      [[ $share =~ ^[0-9]+$ ]] || share=""
      echo "mps: ${share:+on, $share% of the SMs per worker}${share:-unavailable}" | tee -a "$OUT/gpu.txt"
      # never mix time-shared runs into an MPS run directory
      [ -z "$share" ] && { echo "MPS was asked for and is unavailable: no bench"; continue; }
    fi
    if [ -z "${LUMEN_DRAFT_PIN:-}" ] && [ -f "$RUNS/draft_pin.txt" ]; then export LUMEN_DRAFT_PIN=$(cat "$RUNS/draft_pin.txt"); fi
    echo "LUMEN_DRAFT_PIN=${LUMEN_DRAFT_PIN:-default}" | tee -a "$OUT/gpu.txt"
    t=$(( $(left) - 45 ))
    if [ "$t" -lt 60 ]; then echo "no time left for the bench"; continue; fi
    ${share:+env CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=$share} timeout -k 30 "$t" python3 -m lumen bench --model "$target" --workers "$WORKERS" --devices "$DEVICES" "${pol[@]}" \
      --serve-args "--draft-model $target-selfdraft --num-blocks $NUM_BLOCKS --cold-restart --ckpt-budget-gb $CKPT_GB --max-model-len 2048" \
      --qps "$QPS" --target-load "$TARGET_LOAD" --calibration-requests 64 --duration "$DURATION" \
      --lengths splitwise-conv --max-prompt 1024 --max-output 256 --fail "t=$FAIL_AT:worker=1:SIGKILL" \
      --repeats "$REPEATS" --window auto --startup-timeout 300 --device-share "$SHARE" --slot-ms "$SLOT_MS" \
      --request-timeout "${REQUEST_TIMEOUT:-150}" \
      --failure-free "${FAILURE_FREE:-reference}" \
      --resume --out "$RUNS" --quiet > "$OUT/bench.log" 2>&1
    echo "bench exit $? (124: stopped at the block's end; --resume goes on next call)"
    [ -n "$share" ] && mps_stop
    tail -25 "$OUT/bench.log"
    # before any latency figure: did the holders accept the pages, and what did the restores find
    python3 benchmarks/runs_pages.py "$RUNS" --out "$OUT/pages.txt"
    # (a request unanswered for REQUEST_TIMEOUT s ends as an error, so a run that hangs is recorded with its
    # cluster's end state: on one H100 on 2026-12-07 two stop-restart runs under slots never finished and
    # the 300 s default outlasted the block)
    # did the failure cost capacity at all: latency before the kill, until the worker is back, after
    python3 benchmarks/phase_latency.py "$RUNS" --out "$OUT/phases.txt"
    # how each killed worker came back (target read, draft load, copy, warm-up) and what its draft did
    python3 benchmarks/restart_phases.py "$RUNS" --out "$OUT/restarts.txt"
    tar czf "$OUT/bench-runs.tgz" -C "$(dirname "$RUNS")" "$(basename "$RUNS")" ;;
  esac
done
# the device tool returns at most 8 files: beyond that, everything but the key ones goes into one archive
if [ "$(ls "$OUT" | wc -l)" -gt 8 ]; then
  (cd "$OUT" && tar czf block.tgz --remove-files $(ls | grep -v -x -e bench-runs.tgz -e pages.txt -e phases.txt -e restarts.txt -e curve.txt -e share_results.json -e share_device_share.png))
fi
echo "== done in $(( $(date +%s) - start )) s"
