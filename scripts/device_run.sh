#!/usr/bin/env bash
# One batched run on the lent H200 machine (see ../.library/device): correctness on CUDA, tier IO
# bandwidth, the TTFT sweep and the recompute speed, each step bounded, logs under $OUT.
# Usage there: bash scripts/device_run.sh   (with .whl carried; see shared/tools/device-wheels)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-out}; mkdir -p "$OUT"
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1; echo "exit $?" >>"$OUT/$name.log"
  tail -n 25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt"
cat "$OUT/gpu.txt"
step tests "${T_TESTS:-100}" python3 -m pytest -q -p no:cacheprovider tests/test_engine.py \
  tests/test_hicache_engine.py tests/test_kv_io.py
step tier_io "${T_TIER_IO:-40}" python3 benchmarks/bench_tier_io.py --tier "${TIERS:-all}" \
  --gbytes 4 --repeats 3 --io-backends kernel --output-dir "$OUT/tier_io"
step ttft "${T_TTFT:-90}" python3 benchmarks/kvcache_benchmark.py --ttft --backend all \
  --lengths "${LENGTHS:-80K}" --num-prompts 1 --hicache-size 20 --mem-fraction-static 0.85 \
  --no-gpu-hit --no-plots --output-dir "$OUT/ttft"
step engine "${T_ENGINE:-60}" python3 benchmarks/bench_engine.py --prefill 16K \
  --decode-batch 1,32 --output "$OUT/bench_engine.json"
step profile "${T_PROFILE:-60}" python3 scripts/profile_step.py --tokens 32768
