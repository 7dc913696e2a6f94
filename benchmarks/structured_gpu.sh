#!/usr/bin/env bash
# Issue 16 on the GPU: 64 streams constrained to one JSON schema against 64 free ones (target:
# constrained >= 0.85x free, aggregate tok/s), and where a decode step's host time goes.
# From the repo root, MLX's CUDA build on PYTHONPATH (source /tmp/amlx-gpu/env.sh), OUT set:
#
#   bash benchmarks/structured_gpu.sh          # about 3-4 minutes
#
# (MODEL, MAX_TOKENS and STEADY override the defaults: qwen3-0.6b, 128, 4 requests per client;
# TIMEOUT the run's limit, 200 s; MASK_COST=1 adds mask_cost.py, MASK_STEPS its steps, 50.)
#
# $OUT/structured.json (+ .log), AMLX_STEP_TIMING=1, the scheduler choosing the constrained
# shards' order itself:
#   - the batch of 64 streams started at once (it shrinks as JSON streams close): free and
#     constrained tok/s, "ratio" (the issue's measure), "ratio_matched" (free streams stopped
#     at their constrained twins' lengths);
#   - "steady": 64 closed-loop clients, STEADY requests each (64 in flight until the first
#     client is done), constrained / free / free_matched (request k of client c stopped at the
#     length of the constrained side's request k of client c): tok/s over the whole run and
#     over the steady window, the ratios of both;
#   - per side host_ms_per_step: milliseconds per decode step in each phase of the engine's
#     rounds (amlx/engine/timing.py; "wait" is the host waiting for the device), and
#     background_mask_fill: llguidance's own time filling the masks, per step (on the mask
#     thread or the worker), against "masks", the worker's wait for them after its launch;
#     "cpu": the same phases' CPU time on the worker (its own work, without its waits).
#   - "steady_pinned": the steady measurement again (one repeat) on a model whose constrained
#     order is pinned (ORDERS, default "forward": AMLX_MASK_ORDER=forward, the forward launched
#     before step t's read, the masks then filled on the worker while the device runs it;
#     ORDERS=forward,read for both, ORDERS= for none).
# $OUT/mask_cost.json (+ .log), with MASK_COST=1: one sampling step of 64 x 151,936 logits,
# free / masks applied inside the compiled step / by separate ops: host and synced ms.
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
if [ "${MASK_COST:-0}" = 1 ]; then
  echo "== mask cost per sampling step"
  timeout -k 5 120 python3 benchmarks/mask_cost.py --steps "${MASK_STEPS:-50}" --out "$OUT/mask_cost.json" 2>&1 \
    | tee "$OUT/mask_cost.log"
fi
echo "== benchmarks/structured.py (64 streams, ${MODEL:-qwen3-0.6b} shape; the batch started at once, then steady)"
AMLX_STEP_TIMING=1 timeout -k 5 "${TIMEOUT:-200}" python3 benchmarks/structured.py --model "${MODEL:-qwen3-0.6b}" \
  --streams 64 --max-tokens "${MAX_TOKENS:-128}" --repeats 2 --steady "${STEADY:-4}" --orders "${ORDERS-forward}" \
  --out "$OUT/structured.json" 2>&1 | tee "$OUT/structured.log"
echo "structured.py ended with status ${PIPESTATUS[0]}"
