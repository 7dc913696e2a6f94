#!/usr/bin/env bash
# What the GPU numbers in benchmarks/README.md came from, on the lent machine
# (see ../shared/gpu/README.md for setting up MLX's CUDA build there):
#   bash benchmarks/run_gpu.sh profile   # host/device split per step, node counts, prefill
#   bash benchmarks/run_gpu.sh sweep     # the same under several MLX_MAX_OPS_PER_BUFFER values
#   bash benchmarks/run_gpu.sh speed     # amlx against mlx-lm, JSON + markdown + PNG into $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/amlx-bench}
mkdir -p "$OUT"
case "${1:-speed}" in
  profile)
    for m in ${MODELS:-qwen3-0.6b gemma3-1b}; do
      python3 benchmarks/profile_step.py --model "$m" --steps 32 --repeats 3 --compare-kernel
    done ;;
  sweep)
    for n in ${OPS:-20 60 200 600}; do
      echo "== MLX_MAX_OPS_PER_BUFFER=$n"
      MLX_MAX_OPS_PER_BUFFER=$n python3 benchmarks/profile_step.py --model "${MODELS:-qwen3-0.6b}" \
        --steps 32 --batches 1 64 --prefill 0
    done ;;
  speed)
    python3 benchmarks/speed.py --models ${MODELS:-qwen3-0.6b gemma3-1b} --streams 16 64 128 --out "$OUT" ;;
esac
