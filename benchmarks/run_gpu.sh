#!/usr/bin/env bash
# What the GPU numbers in benchmarks/README.md came from, on the lent machine
# (see ../shared/gpu/README.md for setting up MLX's CUDA build there, and benchmarks/gpu_extras.sh
# for the packages amlx needs that the image lacks: llguidance, hypothesis, ...):
#   bash benchmarks/run_gpu.sh profile   # host/device split per step, node counts, prefill
#   bash benchmarks/run_gpu.sh sweep     # the same under several MLX_MAX_OPS_PER_BUFFER values
#   bash benchmarks/run_gpu.sh speed     # amlx against mlx-lm, JSON + markdown + PNG into $OUT
#   BUDGET=470 bash benchmarks/run_gpu.sh bigspeed   # 4B-27B, bf16 and 4-bit, % of bandwidth (bigspeed.py),
#                                        # all within BUDGET seconds; MODELS="qwen3-8b qwen3-8b-4bit" picks
#   bash benchmarks/run_gpu.sh first     # first-request latency of a 4-bit model, with and without warm-up
#   bash benchmarks/run_gpu.sh kvbits    # the decode kernels' tests (quantized pool included) and kv_bits.py:
#                                        # kv_bits none/8/4 at 4 streams x 32k tokens (KVBITS_ARGS to change)
#   bash benchmarks/run_gpu.sh ttft      # TTFT behind a cached 2,000-token prefix (prefix_cache.py --ttft-only),
#                                        # MODELS="qwen3-0.6b qwen3-8b" by default
#   bash benchmarks/run_gpu.sh ttft-mem  # issue 15 in one call (~4 min): cached/uncached TTFT of qwen3-0.6b and
#                                        # qwen3-8b (best of 3, warm, AMLX_STEP_TIMING=1: host split) and
#                                        # speed.py's peak memory (1 and 64 streams) of qwen3-0.6b, gemma3-1b and mlx-lm
#   bash benchmarks/run_gpu.sh prefill-mem  # issue 15's 64-stream peak against the prefill pass's memory bound
#                                        # (~6-8 min): prefill_memory.py (64 prompts x 128 tokens at once, then
#                                        # again behind their cached prefix; peak per phase, passes) per model at
#                                        # AMLX_PREFILL_MEMORY in CAPS (default 0 256M 64M; 0 = no bound),
#                                        # then speed.py --streams 64 beside mlx-lm at SPEED_CAP (default 256M)
#   bash benchmarks/run_gpu.sh structured-ab  # issue 16's steady state under CONFIGS (base si ...), ROUNDS times,
#                                        # alternating, one process each (~80 s a configuration)
#   bash benchmarks/run_gpu.sh shape-check # MODEL's shapes with LAYERS layers: single then 64 streams in one process
#                                        # (benchmarks/batch_check.py), SANITIZE=1 under compute-sanitizer
#   bash benchmarks/run_gpu.sh kernel-profile # MODEL's (default qwen3-8b) single-stream decode, amlx beside mlx-lm:
#                                        # each CUDA kernel's device time per token, the device's idle time (CUPTI);
#                                        # KPROF_ARGS=--serial: CUDA graphs off, each kernel's own time
#   bash benchmarks/run_gpu.sh step-micro # the attention and residual-norm kernels alone (step_kernel_micro.py):
#                                        # cost per call against history length, warps a block, keys a round
#   bash benchmarks/run_gpu.sh step-check # the step kernels' GPU tests, then step-micro (~5 min)
#   bash benchmarks/run_gpu.sh long-context # the attention kernel alone at WARPS x LANE_BYTES beside MLX's sdpa,
#                                        # then Qwen3-8B bf16 at 1,024-16,384 positions beside mlx-lm (~6 min)
#   bash benchmarks/run_gpu.sh window    # KV memory of a long Gemma-3-1B row, windowed layers' own pool (window_pool.py)
#   bash benchmarks/run_gpu.sh qmm-rows    # MLX's quantized matmul at 8-128 rows vs dequantize + cuBLAS (qmm_rows.py)
#   bash benchmarks/run_gpu.sh qmm-chain   # a batched step's quantized products one after another (qmm_chain.py):
#                                        # MLX's as called, rows in groups, K split (batched layout, interleaved), bf16
#   bash benchmarks/run_gpu.sh qmm-split   # AMLX_QMM_SPLIT end to end (~6 min): tests/test_qmm_split.py, then
#                                        # MODEL's (qwen3-8b-4bit) 64-stream step profiled with SPLITS (off copy
#                                        # interleave), one process each, then qmm_chain.py
#   bash benchmarks/run_gpu.sh qgemv-launch # the kernel's launch shapes: balanced vs measured, serial calls (~4 min)
#   bash benchmarks/run_gpu.sh spec-cost    # speculative decoding: k draft steps + verify vs k+1 plain steps
#   bash benchmarks/run_gpu.sh spec-draft   # end to end: qwen3-8b with its 4-bit copy as draft, amlx vs mlx-lm
#   bash benchmarks/run_gpu.sh spec-lookup  # end to end: prompt lookup on a model fine-tuned to copy
#   (each spec-* part is one call of about 4 minutes; the checkpoints stay in /tmp/amlx-spec for the next)
#   bash benchmarks/run_gpu.sh spec-all     # the three in one call of about 6 minutes (4.5 with the checkpoints
#                                        # already in /tmp/amlx-spec): draft pairs first (they write and convert
#                                        # the checkpoints), then the cost table, then prompt lookup; each part
#                                        # bounded (DRAFT_BUDGET, COST_BUDGET, LOOKUP_BUDGET, ROUND_BUDGET seconds)
#   bash benchmarks/run_gpu.sh qgemv       # the few-row quantized matmul kernel (issue 20): its GPU tests,
#                                        # qwen3-8b-4bit single-stream with AMLX_QGEMV on and off beside mlx-lm
#                                        # (bigspeed.py --qgemv-off), then qgemv.py (kernel vs MLX per shape,
#                                        # GB/s, both kernel versions); 6-9 minutes (TEST_BUDGET, BUDGET, MICRO_BUDGET)
#   PART=1/4 bash benchmarks/run_gpu.sh tests  # the test suite on the GPU, a quarter of its files per call
#                                        # (FILES="tests/x.py ..." to pick; FILE_BUDGET seconds a file, 120)
#   bash benchmarks/run_gpu.sh before-after # issue 15's "must not drop": speed.py of .gpu/old (an earlier commit:
#                                        # `gpu_extras.sh before REV` here, carry .gpu/old) and of this checkout,
#                                        # alternating ROUNDS pairs (3, the order swapped each round) until STOP
#                                        # seconds (470); AMLX_STEP_TIMING=1
#                                        # adds this checkout's single-stream ms a step by phase (speed.json's step_ms_1)
#   TREES=".gpu/t/*" bash benchmarks/run_gpu.sh bisect # single-stream decode of MODEL (qwen3-0.6b) by earlier
#                                        # commits' trees (`gpu_extras.sh before REV .gpu/t/REV` here, carry .gpu/t) and
#                                        # this checkout (also with ENVS, e.g. "AMLX_KERNEL_WRITES=0"), one process each
#                                        # (benchmarks/single_stream.py, SINGLE_ARGS passed on: --same-prompt is
#                                        # speed.py's way), alternating ROUNDS (3) until STOP seconds (400)
#   bash benchmarks/run_gpu.sh pool-views # issue 15: pool_write.py, then speed.py --streams 64 with the decode kernel
#                                        # reading the KV pool through buffer views (AMLX_POOL_VIEWS=1) and not (0),
#                                        # alternating ROUNDS times (default 2), mlx-lm beside the first (~6-8 min)
# bigspeed, first and ttft-mem keep MLX's compiled kernels between calls: a carried .gpu/ptx.tgz is unpacked
# into MLX_PTX_CACHE_DIR first, and the cache goes back as $OUT/ptx.tgz (copy it to .gpu/ptx.tgz here).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/amlx-bench}
mkdir -p "$OUT"
PTX=${MLX_PTX_CACHE_DIR:-/tmp/amlx-gpu/ptx}
restore_ptx() { if [ -f .gpu/ptx.tgz ]; then mkdir -p "$PTX" && tar xzf .gpu/ptx.tgz -C "$PTX" && echo "kernel cache restored"; fi; }
save_ptx() { if [ -d "$PTX" ]; then tar czf "$OUT/ptx.tgz" -C "$PTX" . && ls -la "$OUT/ptx.tgz"; fi; }
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
  before-after)
    [ -f .gpu/old/REV ] || { echo "no .gpu/old: bash benchmarks/gpu_extras.sh before REV here, then carry .gpu/old"; exit 1; }
    echo "before: $(cat .gpu/old/REV); after: this checkout"
    T0=$(date +%s)
    for r in $(seq 1 "${ROUNDS:-3}"); do
      # the order swaps each round: in two calls of 2026-12-04 the side that ran first was the faster
      sides="old new"; [ $((r % 2)) = 0 ] && sides="new old"
      for side in $sides; do
        if [ $(( $(date +%s) - T0 )) -gt "${STOP:-470}" ]; then echo "stopped at ${STOP:-470} s"; break 2; fi
        dir=$PWD; path=${PYTHONPATH:-}
        [ $side = old ] && dir=$PWD/.gpu/old && path=$PWD/.gpu/old:${PYTHONPATH:-}
        (cd "$dir" && PYTHONPATH=$path timeout -k 5 200 python3 benchmarks/speed.py --models ${MODELS:-qwen3-0.6b gemma3-1b} \
          --streams 64 --repeats 2 --no-mlx-lm --checkpoints /tmp/ck-$side --out "$OUT/$side$r" > "$OUT/$side$r.log" 2>&1) \
          || echo "$side round $r ended with status $?"
        python3 - "$OUT/$side$r/speed.json" "$side" "$r" <<'PY'
import json, sys
try:
    results = json.load(open(sys.argv[1]))["results"]
except (OSError, ValueError, KeyError) as e:
    sys.exit(f"{sys.argv[2]} round {sys.argv[3]}: no results ({e})")
for name, r in results.items():
    a = r["amlx"]
    print(f"{sys.argv[2]} round {sys.argv[3]} {name}: 1 stream {a['decode_tps']:.0f} tok/s, 64 streams "
          f"{a['batch']['64']['tps']:.0f}, peak {a['peak_memory'] / 1e6:.0f} MB", a.get("step_ms_1", ""))
PY
      done
    done ;;
  bisect)
    MODEL=${MODEL:-qwen3-0.6b}
    [ -d /tmp/amlx-ck/$MODEL ] || python3 -c "import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path; from checkpoints import write_benchmark_checkpoint as w; w(Path('/tmp/amlx-ck/$MODEL'), '$MODEL')"
    # a side: a tree's directory (it holds its REV; the glob may match other files), "new" (this
    # checkout) or "new:VAR=VALUE" (this checkout with that setting)
    sides=($(for t in ${TREES:-}; do [ -f "$t/REV" ] && echo "$t"; done) new $(for e in ${ENVS:-}; do echo "new:$e"; done))
    T0=$(date +%s)
    for r in $(seq 1 "${ROUNDS:-3}"); do
      for i in $(seq 0 $((${#sides[@]} - 1))); do
        side=${sides[$(( (i + r - 1) % ${#sides[@]} ))]}  # (each round starts one side later: no side always first)
        if [ $(( $(date +%s) - T0 )) -gt "${STOP:-400}" ]; then echo "stopped at ${STOP:-400} s"; break 2; fi
        path=${PYTHONPATH:-}; setting=AMLX_BISECT=1; label=$side
        case $side in
          new) ;;
          new:*) setting=${side#new:} ;;
          *) path=$PWD/$side:${PYTHONPATH:-}; label=$(cut -c1-7 "$side/REV") ;;
        esac
        (cd /tmp && env PYTHONPATH="$path" "$setting" timeout -k 5 150 python3 "$OLDPWD/benchmarks/single_stream.py" \
          "/tmp/amlx-ck/$MODEL" --label "$label r$r" ${SINGLE_ARGS:-} 2>&1 | grep -E "^RESULT|Error" | tail -2) \
          || echo "$label round $r: status $?"
      done
    done ;;
  bigspeed)
    BUDGET=${BUDGET:-470}
    restore_ptx
    # the python side stops itself within BUDGET; timeout is the backstop that keeps the call from hanging
    timeout -k 10 $((BUDGET + 45)) python3 benchmarks/bigspeed.py --budget "$BUDGET" --out "$OUT" --root /tmp \
      ${MODELS:+--models $MODELS} ${BIGSPEED_ARGS:-} || echo "bigspeed.py ended with status $?"
    save_ptx
    cat "$OUT/bigspeed.md" 2>/dev/null || echo "no bigspeed.md was written" ;;
  pool-views)
    timeout -k 10 90 python3 benchmarks/pool_write.py --out "$OUT/pool_write.json" || echo "pool_write.py ended with status $?"
    mkdir -p /tmp/amlx-ck
    for r in $(seq "${ROUNDS:-2}"); do
      for v in 1 0; do
        peer=$([ "$r$v" = 11 ] && echo "" || echo --no-mlx-lm)
        AMLX_POOL_VIEWS=$v AMLX_STEP_TIMING=1 timeout -k 10 ${SPEED_BUDGET:-240} python3 benchmarks/speed.py \
          --models ${MODELS:-qwen3-0.6b gemma3-1b} --streams 64 --repeats 2 --checkpoints /tmp/amlx-ck \
          --out "$OUT/views$v-$r" $peer | grep -v '^{' || echo "speed.py ended with status $?"
      done
    done ;;
  kvbits)
    # the quantized kernel's tests first, then kv_bits.py, then the other decode-kernel tests (regressions)
    timeout -k 10 ${TEST_BUDGET:-90} python3 -m pytest -q -p no:cacheprovider -k "quantized or kv_bits or numpy" \
      tests/test_decode_kernels.py tests/test_kv_bits.py 2>&1 | tee "$OUT/kv_bits_tests.txt" | tail -60 \
      || echo "tests ended with status $?"
    timeout -k 10 ${BUDGET:-150} python3 benchmarks/kv_bits.py --gather --out "$OUT" ${KVBITS_ARGS:-} 2>&1 \
      | tee "$OUT/kv_bits_log.txt" || echo "kv_bits.py ended with status $?"
    timeout -k 10 ${REST_BUDGET:-60} python3 -m pytest -q -p no:cacheprovider -k "not quantized" \
      tests/test_decode_kernels.py 2>&1 | tee "$OUT/decode_kernels_tests.txt" | tail -30 \
      || echo "tests ended with status $?"
    cat "$OUT/kv_bits.md" 2>/dev/null || echo "no kv_bits.md was written" ;;
  ttft)
    for m in ${MODELS:-qwen3-0.6b qwen3-8b}; do
      timeout -k 10 ${BUDGET:-270} python3 benchmarks/prefix_cache.py --preset "$m" --prefix 2000 --repeats 3 \
        --ttft-only --out "$OUT/prefix_ttft_$m.json" || echo "prefix_cache.py $m ended with status $?"
    done ;;
  ttft-mem)
    restore_ptx
    for m in ${TTFT_MODELS:-qwen3-0.6b qwen3-8b}; do
      budget=${TTFT_BUDGET:-$([ "$m" = qwen3-8b ] && echo 130 || echo 80)}
      AMLX_STEP_TIMING=1 timeout -k 10 "$budget" python3 benchmarks/prefix_cache.py --preset "$m" \
        --prefix 2000 --repeats 3 --ttft-only --out "$OUT/prefix_ttft_$m.json" 2>&1 | grep -v "it/s" \
        | tee -a "$OUT/ttft.txt" || echo "prefix_cache.py $m ended with status $?"
    done
    for m in ${MEM_MODELS-qwen3-0.6b gemma3-1b}; do  # (MEM_MODELS= for none)
      mkdir -p "$OUT/speed_$m"
      budget=${MEM_BUDGET:-$([ "$m" = gemma3-1b ] && echo 100 || echo 70)}
      AMLX_STEP_TIMING=1 timeout -k 10 "$budget" python3 benchmarks/speed.py --models "$m" --streams 64 --repeats 1 \
        --out "$OUT/speed_$m" 2>&1 | grep -v "it/s" | tee -a "$OUT/memory.txt" || echo "speed.py $m ended with status $?"
    done
    save_ptx ;;
  prefill-mem)
    restore_ptx
    mkdir -p "$OUT/prefill_mem" /tmp/amlx-prefmem
    for m in ${MEM_MODELS:-qwen3-0.6b gemma3-1b}; do
      for cap in ${CAPS:-0 256M 64M}; do
        echo "== $m AMLX_PREFILL_MEMORY=$cap" | tee -a "$OUT/prefill_mem.txt"
        AMLX_PREFILL_MEMORY=$cap AMLX_STEP_TIMING=1 timeout -k 10 ${CAP_BUDGET:-75} python3 benchmarks/prefill_memory.py \
          --preset "$m" --root /tmp/amlx-prefmem --tokens 128 --out "$OUT/prefill_mem/${m}_$cap.json" 2>&1 \
          | grep -v "it/s" | tee -a "$OUT/prefill_mem.txt" || echo "prefill_memory.py $m $cap ended with status $?"
      done
      mkdir -p "$OUT/speed_$m"
      AMLX_PREFILL_MEMORY=${SPEED_CAP:-256M} AMLX_STEP_TIMING=1 timeout -k 10 ${MEM_BUDGET:-100} python3 benchmarks/speed.py \
        --models "$m" --streams 64 --repeats 1 --checkpoints /tmp/amlx-prefmem --out "$OUT/speed_$m" 2>&1 \
        | grep -v "it/s" | tee -a "$OUT/memory.txt" || echo "speed.py $m ended with status $?"
    done
    save_ptx ;;
  structured-ab)
    # issue 16's steady state (64 closed-loop clients, JSON schema vs free, AMLX_STEP_TIMING=1) under several
    # configurations, one process each, alternating: base; si: sys.setswitchinterval(0.0005) (the mask
    # thread gets the GIL back sooner after llguidance's fill); off: every batch change drains the step in
    # flight, joins not coalesced (AMLX_CHAIN_CHANGES=0 AMLX_JOIN_WAIT=0); fresh: AMLX_EXTEND_FRESH=1;
    # upload: AMLX_MASK_UPLOAD=thread (the masks' device arrays made on the mask thread, off the worker's path;
    # the default since 2026-12-03); worker: AMLX_MASK_UPLOAD=worker (the worker makes them); tN: llguidance's
    # mask pool at N threads (AMLX_MASK_THREADS=N); after: AMLX_MASK_BUILD=after (constrained forwards stepping
    # after step t's read are built after it too, as before 2026-12-05; the default builds them before it);
    # BATCH=1 adds the batch-of-64 measurement before the steady one
    for round in $(seq ${ROUNDS:-1}); do
      for cfg in ${CONFIGS:-base si}; do
        case "$cfg" in
          base) envs=(); args=() ;;
          si) envs=(); args=(--switch-interval 0.0005) ;;
          off) envs=(AMLX_CHAIN_CHANGES=0 AMLX_JOIN_WAIT=0); args=() ;;  # batch changes drain (as before)
          fresh) envs=(AMLX_EXTEND_FRESH=1); args=() ;;
          upload) envs=(AMLX_MASK_UPLOAD=thread); args=() ;;  # the mask thread uploads the masks too (the default)
          worker) envs=(AMLX_MASK_UPLOAD=worker); args=() ;;  # the worker uploads them as it builds the sampling step
          t[0-9]*) envs=(AMLX_MASK_THREADS=${cfg#t}); args=() ;;  # llguidance's pool at that many threads
          after) envs=(AMLX_MASK_BUILD=after); args=() ;;  # read-first forwards built after the read (before 12-05)
          *) echo "unknown configuration $cfg"; continue ;;
        esac
        echo "== structured.py steady, $cfg (round $round)" | tee -a "$OUT/structured_ab.txt"
        env "${envs[@]}" AMLX_STEP_TIMING=1 timeout -k 5 ${AB_BUDGET:-110} python3 benchmarks/structured.py \
          --model "${MODEL:-qwen3-0.6b}" --streams 64 --max-tokens 128 --repeats 1 --steady "${STEADY:-4}" \
          $([ "${BATCH:-0}" = 1 ] || echo --steady-only) "${args[@]}" --out "$OUT/structured_${cfg}_$round.json" 2>&1 | grep -v "it/s" \
          | tail -3 | tee -a "$OUT/structured_ab.txt" || echo "structured.py $cfg ended with status $?"
      done
    done ;;
  shape-check)
    # a large model's shapes with few layers (MODEL, default gemma3-27b-4bit; LAYERS, default 4): batch_check.py's
    # single-stream then STREAMS-stream sequence, which bigspeed's 27B 4-bit run failed in (2026-12-03);
    # SANITIZE=1 runs it under compute-sanitizer (memcheck names the kernel that read out of bounds)
    m=${MODEL:-gemma3-27b-4bit}; ck=/tmp/amlx-shape
    restore_ptx
    [ -f "$ck/$m/config.json" ] || python3 benchmarks/checkpoints.py "$ck" --models "$m" --layers "${LAYERS:-4}"
    run=(python3 benchmarks/batch_check.py "$ck/$m" --streams "${STREAMS:-64}" --tokens "${TOKENS:-32}")
    if [ "${SANITIZE:-0}" = 1 ]; then
      san=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
      [ -n "$san" ] || { echo "compute-sanitizer not found"; exit 1; }
      run=("$san" --tool memcheck --print-limit 10 "${run[@]}")
    fi
    timeout -k 10 ${BUDGET:-300} "${run[@]}" 2>&1 | tee "$OUT/shape_check.txt" | tail -40 \
      || echo "batch_check ended with status $?"
    save_ptx ;;
  kernel-profile)
    # single-stream decode, amlx beside mlx-lm, every CUDA kernel's device time per token (kernel_profile.py):
    # MODEL (default qwen3-8b), LAYERS (default: all the release's layers); tells kernels from host time;
    # KPROF_ARGS="--sides amlx --streams 64 --prompt 16": amlx's batched step instead
    m=${MODEL:-qwen3-8b}; ck=/tmp/amlx-kprof
    restore_ptx
    [ -f "$ck/$m/config.json" ] || python3 benchmarks/checkpoints.py "$ck" --models "$m" ${LAYERS:+--layers $LAYERS}
    timeout -k 10 ${BUDGET:-300} python3 benchmarks/kernel_profile.py "$ck/$m" --tokens "${TOKENS:-72}" ${KPROF_ARGS:-} \
      --json "$OUT/kernel_profile_$m.json" 2>&1 | tee "$OUT/kernel_profile_$m.md" || echo "kernel_profile ended with status $?"
    save_ptx ;;
  step-check)
    # the step kernels' GPU tests (attention with 1/2/4 keys a round, residual norm, whole models with and
    # without them; TEST_BUDGET seconds, compiles included), then step-micro below in the same call
    timeout -k 5 ${TEST_BUDGET:-200} python3 -m pytest -q -p no:cacheprovider --tb=short -rfE \
      tests/test_decode_kernels.py -k "attention or residual or keys or models_decode" 2>&1 \
      | grep -v "^\s*$" | tail -25 | tee "$OUT/step_check_tests.txt" || echo "tests ended with status $?"
    bash "$0" step-micro ;;
  step-micro)
    # the attention and residual-norm kernels alone, calls one after another (no CUDA graphs), CUPTI device
    # times: history lengths x batch x warps a block x keys a round (step_kernel_micro.py; ~2-3 min)
    timeout -k 10 ${BUDGET:-240} env MLX_USE_CUDA_GRAPHS=0 python3 benchmarks/step_kernel_micro.py --out "$OUT" \
      --reps 100 --trials 2 --cupti --warps ${WARPS:-8 16} --keys ${KEYS:-1 2 4} ${MICRO_ARGS:-} 2>&1 \
      | grep -v '^{' | tail -60 || echo "step_kernel_micro.py ended with status $?" ;;
  long-context)
    # issue 20 at long contexts (~7 min): the lane-group attention kernel alone at Qwen3-8B's heads, one row
    # and 64, for warps a block x lane dims x bytes loaded ahead (WARPS, DIMS, LANE_BYTES; one group of 32
    # lanes where the dims give one key a round), MLX's sdpa beside it; the same at Gemma-3-4B's heads (dim
    # 256: the one-key loop against one and two groups); then Qwen3-8B bf16 single-stream decode at
    # 1,024-16,384 positions, amlx beside mlx-lm (and SIDES, e.g. amlx:AMLX_ATTENTION_LANE_BYTES=32), ROUNDS rounds
    micro() { timeout -k 10 "$1" env MLX_USE_CUDA_GRAPHS=0 python3 benchmarks/step_kernel_micro.py --trials 2 --cupti \
      --no-norm --lane-one "${@:2}" 2>&1 | grep '^|' || echo "step_kernel_micro.py ended with status $?"; }
    micro ${MICRO_BUDGET:-150} --out "$OUT/micro" --reps 100 --sdpa --batch 1 --lengths 1024 4096 16384 \
      --warps ${WARPS:-4 8} --lane-dims ${DIMS:-4 8} --lane-bytes ${LANE_BYTES:-32 48 64}
    micro 80 --out "$OUT/micro64" --reps 50 --batch 64 --lengths 256 --warps ${WARPS:-4 8} --lane-dims ${DIMS:-4 8} \
      --lane-bytes ${LANE_BYTES:-32 48 64}
    micro 80 --out "$OUT/micro-gemma" --reps 100 --sdpa --shape gemma3-4b --batch 1 --lengths 1024 16384 --warps 8 \
      --lane-dims 0 8 16 --lane-bytes 32 64
    [ -d /tmp/amlx-ck/qwen3-8b ] || python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path
from checkpoints import write_benchmark_checkpoint as w; w(Path('/tmp/amlx-ck/qwen3-8b'), 'qwen3-8b')"
    timeout -k 10 ${BUDGET:-300} python3 benchmarks/long_context.py /tmp/amlx-ck/qwen3-8b --rounds ${ROUNDS:-2} \
      --sides amlx mlx-lm ${SIDES:-} 2>&1 | tail -8 || echo "long_context.py ended with status $?" ;;
  window)
    timeout -k 10 ${BUDGET:-270} python3 benchmarks/window_pool.py --preset "${MODEL:-gemma3-1b}" --prompt 8000 \
      --tokens 256 --out "$OUT/window_pool.json" || echo "window_pool.py ended with status $?" ;;
  first)
    timeout -k 10 ${BUDGET:-540} python3 benchmarks/first_request.py --out "$OUT" --model "${MODEL:-gemma3-4b-4bit}" \
      --timeout $(( ${BUDGET:-540} - 30 )) || echo "first_request.py ended with status $?"
    cat "$OUT/first_request.md" 2>/dev/null || echo "no first_request.md was written" ;;
  qgemv)
    restore_ptx
    timeout -k 10 ${TEST_BUDGET:-180} python3 -m pytest -q -p no:cacheprovider tests/test_quantized_gemv.py 2>&1 \
      | tee "$OUT/qgemv_tests.txt" | tail -40 || echo "tests ended with status $?"
    BUDGET=${BUDGET:-160}
    timeout -k 10 $((BUDGET + 45)) python3 benchmarks/bigspeed.py --budget "$BUDGET" --out "$OUT" --root /tmp \
      --models qwen3-8b-4bit --qgemv-off --single-only ${BIGSPEED_ARGS:-} || echo "bigspeed.py ended with status $?"
    timeout -k 10 ${MICRO_BUDGET:-150} python3 benchmarks/qgemv.py --out "$OUT" --cupti --v2 ${QGEMV_ARGS:-} 2>&1 \
      | tee "$OUT/qgemv_log.txt" || echo "qgemv.py ended with status $?"
    save_ptx
    cat "$OUT/bigspeed.md" 2>/dev/null || echo "no bigspeed.md was written"
    cat "$OUT/qgemv.md" 2>/dev/null || echo "no qgemv.md was written" ;;
  qmm-rows)
    # why Qwen3-8B 4-bit decodes 64 streams at a third of bf16's tok/s: MLX's quantized matmul at
    # 8-128 rows against dequantize + cuBLAS and the dense bf16 matmul (benchmarks/qmm_rows.py; its
    # first use of each tile size compiles for 20-50 s: carry .gpu/ptx.tgz from an earlier call)
    restore_ptx
    timeout -k 10 ${BUDGET:-300} python3 benchmarks/qmm_rows.py --out "$OUT" ${QMM_ARGS:-} 2>&1 \
      | tee "$OUT/qmm_rows.txt" || echo "qmm_rows.py ended with status $?"
    save_ptx ;;
  qmm-chain)
    # a 4-bit batched step's products as the step runs them (each fed by the one before), MLX's sm80 kernel
    # against K split ways that give it more blocks (benchmarks/qmm_chain.py; carry .gpu/ptx.tgz)
    restore_ptx
    timeout -k 10 ${BUDGET:-300} python3 benchmarks/qmm_chain.py --out "$OUT" --check ${CHAIN_ARGS:-} 2>&1 \
      | tee "$OUT/qmm_chain.txt" || echo "qmm_chain.py ended with status $?"
    save_ptx ;;
  qmm-split)
    # issue 20's 4-bit batched step with K split over more blocks (amlx/models/qmm_split.py): its GPU tests,
    # then the 64-stream step of MODEL under each AMLX_QMM_SPLIT mode (kernel_profile.py: tok/s, device time,
    # the quantized matmul's share), then the products alone (qmm_chain.py)
    m=${MODEL:-qwen3-8b-4bit}; ck=/tmp/amlx-kprof
    restore_ptx
    timeout -k 5 ${TEST_BUDGET:-120} python3 -m pytest -q -p no:cacheprovider tests/test_qmm_split.py 2>&1 \
      | tee "$OUT/qmm_split_tests.txt" | tail -15 || echo "tests ended with status $?"
    [ -f "$ck/$m/config.json" ] || python3 benchmarks/checkpoints.py "$ck" --models "$m"
    for mode in ${SPLITS:-off copy interleave}; do
      echo "== AMLX_QMM_SPLIT=$mode" | tee -a "$OUT/qmm_split.md"
      AMLX_QMM_SPLIT=$mode timeout -k 10 ${KPROF_BUDGET:-100} python3 benchmarks/kernel_profile.py "$ck/$m" \
        --tokens "${TOKENS:-72}" --sides amlx --streams 64 --prompt 16 --json "$OUT/kernel_profile_${m}_$mode.json" \
        2>&1 | head -12 | tee -a "$OUT/qmm_split.md" || echo "kernel_profile ($mode) ended with status $?"
    done
    timeout -k 10 ${CHAIN_BUDGET:-150} python3 benchmarks/qmm_chain.py --out "$OUT" --check ${CHAIN_ARGS:-} 2>&1 \
      | tee "$OUT/qmm_chain.txt" || echo "qmm_chain.py ended with status $?"
    save_ptx ;;
  qgemv-launch)
    # the kernel's block shapes (AMLX_QGEMV_LAUNCH=balanced against the measured launch), its GPU tests for
    # them, then qgemv.py with each call serial (no CUDA graph overlap), CUPTI device times and a sweep of
    # every block shape for q/k/v, o and down (~4 min)
    restore_ptx
    timeout -k 5 ${TEST_BUDGET:-90} python3 -m pytest -q -p no:cacheprovider tests/test_quantized_gemv.py \
      -k "block_shape or launch or balanced" 2>&1 | tee "$OUT/qgemv_launch_tests.txt" | tail -15 \
      || echo "tests ended with status $?"
    timeout -k 5 ${MICRO_BUDGET:-130} python3 benchmarks/qgemv.py --out "$OUT" --rows 1 2 4 --v2 --balanced --cupti \
      --serial --sweep qkv o down 2>&1 | tee "$OUT/qgemv_log.txt" | tail -70 || echo "qgemv.py ended with status $?"
    save_ptx ;;
  spec-cost)
    timeout -k 10 ${BUDGET:-290} python3 benchmarks/speculative_cost.py --root /tmp/amlx-spec \
      --out "$OUT/speculative_cost.json" | tee "$OUT/speculative_cost.txt" || echo "speculative_cost.py ended with status $?" ;;
  spec-draft)
    restore_ptx
    timeout -k 10 $(( ${BUDGET:-240} + 50 )) python3 benchmarks/speculative.py draft --out "$OUT" --root /tmp/amlx-spec \
      --budget ${BUDGET:-240} ${SPEC_ARGS:-} || echo "speculative.py ended with status $?"
    save_ptx ;;
  spec-all)
    restore_ptx
    # 8B target with a 0.6B-shaped random draft (k=4 every round) and with its own 4-bit copy (k=4 every
    # round as mlx-lm drafts, and the adaptive length), amlx beside mlx-lm, 128 tokens, agreement and
    # divergence checks; a side's call stopped after 40 s (the other goes on; the quantized draft last,
    # whose first mlx-lm run may compile kernels past that)
    timeout -k 10 $(( ${DRAFT_BUDGET:-200} + 40 )) python3 benchmarks/speculative.py draft --out "$OUT" \
      --root /tmp/amlx-spec --budget ${DRAFT_BUDGET:-200} --modes qwen3-0.6b-k4-every,q4-k4-every,q4-k4 \
      --tokens 128 --repeats 2 --call-timeout 40 ${SPEC_ARGS:-} 2>&1 | tee "$OUT/speculative_draft_log.txt" \
      || echo "speculative.py draft ended with status $?"
    save_ptx
    timeout -k 10 ${COST_BUDGET:-90} python3 benchmarks/speculative_cost.py --root /tmp/amlx-spec --batch 1,8 \
      --max-k 4 --steps 8 --out "$OUT/speculative_cost.json" | tee "$OUT/speculative_cost.txt" \
      || echo "speculative_cost.py ended with status $?"
    timeout -k 10 $(( ${LOOKUP_BUDGET:-120} + 60 )) python3 benchmarks/speculative.py lookup --out "$OUT" \
      --root /tmp/amlx-spec --budget ${LOOKUP_BUDGET:-120} --repeats 2 2>&1 | tee "$OUT/speculative_lookup_log.txt" \
      || echo "speculative.py lookup ended with status $?"
    # a lookup round's wall and host time against a plain step, on the copy model just trained
    timeout -k 10 ${ROUND_BUDGET:-45} python3 benchmarks/spec_round.py --model /tmp/amlx-spec/copy-model --device gpu \
      --repeats 5 --json "$OUT/spec_round.json" || echo "spec_round.py ended with status $?" ;;
  spec-lookup)
    timeout -k 10 ${BUDGET:-290} python3 benchmarks/speculative.py lookup --out "$OUT" --root /tmp/amlx-spec \
      ${SPEC_ARGS:-} || echo "speculative.py ended with status $?" ;;
  tests)
    # PART=k/N: every N-th test file from the k-th (1-based; by name), so that N calls cover the suite;
    # FILES="tests/a.py ..." instead names them. Each file gets FILE_BUDGET seconds; its failures' short
    # tracebacks and the summary go to $OUT/tests.txt, which comes back even when the call is cut short;
    # each failure's traceback also goes to $OUT/failures.txt as it happens (benchmarks/live_failures.py),
    # so that a file cut at its budget still says why its tests failed.
    part=${PART:-1/1}; k=${part%/*}; n=${part#*/}
    files=${FILES:-$(ls tests/test_*.py | LC_ALL=C sort | awk -v k="$k" -v n="$n" '(NR - k) % n == 0')}
    restore_ptx  # (the kernel tests compile for minutes without the cache)
    for f in $files; do
      echo "== $f $(date +%T)" | tee -a "$OUT/tests.txt"
      LIVE_FAILURES="$OUT/failures.txt" PYTHONPATH="$PWD/benchmarks:${PYTHONPATH:-}" timeout -k 5 ${FILE_BUDGET:-120} \
        python3 -m pytest -q -p no:cacheprovider -p live_failures --tb=short -rfE "$f" 2>&1 \
        | grep -v "^\s*$" | tail -${TAIL:-40} >> "$OUT/tests.txt" || true
      tail -1 "$OUT/tests.txt"
    done
    save_ptx ;;  # (the kernels compiled here, for the next call's restore_ptx)
esac
