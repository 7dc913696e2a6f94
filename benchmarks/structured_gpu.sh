#!/usr/bin/env bash
# Issue 16 on the GPU: 64 streams constrained to one JSON schema against 64 free ones (target:
# constrained >= 0.85x free, aggregate tok/s), and where a decode step's host time goes.
# From the repo root, MLX's CUDA build on PYTHONPATH (source /tmp/amlx-gpu/env.sh), OUT set:
#
#   bash benchmarks/structured_gpu.sh          # about 2-3 minutes
#
# (MODEL, MAX_TOKENS and MASK_STEPS override the defaults: qwen3-0.6b, 128, 50.)
#
# Writes $OUT/structured.json (+ .log): free and constrained tok/s, "ratio" (the issue's
# measure), "ratio_matched" (free streams stopped at their constrained twins' lengths: what
# the constraints cost when a JSON closes early and the batch shrinks alike), and per side
# host_ms_per_step: milliseconds per decode step in each phase of the engine's rounds
# (AMLX_STEP_TIMING=1, amlx/engine/timing.py; "wait" is the host waiting for the device).
# $OUT/mask_cost.json (+ .log): one sampling step of 64 x 151,936 logits, free / masks
# applied inside the compiled step (now) / masks applied by separate ops before it (before):
# host ms to build and launch, synced ms per step.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/amlx-structured}
mkdir -p "$OUT"
# vendor/mlxc gained mlxc_array_is_ready: build the extension unless the one here has it
if ! python3 -c "import amlx._mlx as m; m.array(1).is_ready()" >/dev/null 2>&1; then
  echo "building amlx._mlxc"
  python3 build_ffi.py > "$OUT/build.log" 2>&1 || { echo "build_ffi.py failed"; tail -30 "$OUT/build.log"; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader || true
uptime
echo "== mask cost per sampling step"
timeout -k 5 120 python3 benchmarks/mask_cost.py --steps "${MASK_STEPS:-50}" --out "$OUT/mask_cost.json" 2>&1 \
  | tee "$OUT/mask_cost.log"
echo "== benchmarks/structured.py (64 streams, ${MODEL:-qwen3-0.6b} shape)"
AMLX_STEP_TIMING=1 timeout -k 5 240 python3 benchmarks/structured.py --model "${MODEL:-qwen3-0.6b}" --streams 64 \
  --max-tokens "${MAX_TOKENS:-128}" --repeats 2 --out "$OUT/structured.json" 2>&1 | tee "$OUT/structured.log"
echo "structured.py ended with status ${PIPESTATUS[0]}"
