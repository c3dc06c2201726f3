#!/usr/bin/env bash
# One GPU session: engine benchmark, then lumen vs stop-restart failure-free on a real CUDA cluster.
# Run from the repository root on the GPU machine; carried wheels (if any) in .whl/; results in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/lumen-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:src
else
  export PYTHONPATH=src
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout "${ENGINE_TIMEOUT:-240}" python3 benchmarks/engine.py --gpu --out "$OUT/engine_gpu.json" > "$OUT/engine.log" 2>&1
echo "engine benchmark exit $?"
timeout "${CKPT_TIMEOUT:-300}" python3 benchmarks/checkpoint_overhead.py --model preset:qwen3-1.7b --workers 2 \
  --devices cuda:0 --qps 4 --requests 100 --max-prompt 512 --max-output 256 --repeats 1 \
  --serve-args "--num-blocks 3000" --out "$OUT/ckpt_gpu.json" > "$OUT/ckpt.log" 2>&1
echo "checkpoint overhead exit $?"
tail -5 "$OUT/engine.log" "$OUT/ckpt.log"
