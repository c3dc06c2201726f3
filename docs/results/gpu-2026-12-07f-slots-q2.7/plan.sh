#!/usr/bin/env bash
# bash .whl/plan.sh 1|2 : issue 24/23 one-GPU block; the H100 or H200 plan by nvidia-smi
set -u
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "gpu: $gpu"; nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu_name.txt"
if [[ $gpu == *H200* ]]; then
  export RUNS=$PWD/.gpu-runs/repro-qwen3-8b-slots-q3.4-h200 QPS=3.4 REQUEST_TIMEOUT=90
else
  export RUNS=$PWD/.gpu-runs/repro-qwen3-8b-slots-q2.7 NUM_BLOCKS=500 QPS=2.7 REQUEST_TIMEOUT=90
fi
export REPEATS=3
T0=$(date +%s); TOTAL=${TOTAL:-570}
steps="prepare bench"; [ "$1" = 1 ] && steps="prepare reload bench"
OUT0=$OUT
mkdir -p /tmp/o-core; rm -rf /tmp/o-core/*
OUT=/tmp/o-core POLICIES="stop-restart lumen-no-spec lumen" STEPS="$steps" RELOAD_REPEATS=1 BUDGET=$TOTAL bash benchmarks/gpu_repro.sh
tar czf "$OUT0/core.tgz" -C /tmp/o-core .
left=$(( TOTAL - ($(date +%s) - T0) ))
echo "== left after the core policies: $left s"
if [ $left -gt 150 ]; then
  OUT=$OUT0 POLICIES="stop-restart lumen-no-spec lumen fixed-ckpt spec-only" STEPS=bench BUDGET=$left bash benchmarks/gpu_repro.sh
fi
