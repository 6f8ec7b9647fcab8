#!/usr/bin/env bash
# One batched run on the lent H200 machine (see ../.library/device): correctness on CUDA, tier IO
# bandwidth, the TTFT sweep, the recompute speed and diagnostics, each step bounded, logs under
# $OUT. Steps are chosen with STEPS (default: all, in this order). Usage there:
#   STEPS="tests check tier_io ttft" bash scripts/device_run.sh   (with .whl carried: from
#   ../shared/tools/device-wheels fastapi uvicorn pyzmq openai xgrammar, less the nvidia_* and
#   cuda_* wheels xgrammar's torch requirement pulls in)
# T_<STEP> overrides a step's time limit in seconds; GPU_HIT=" " also times GPU hits in ttft.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-out}; mkdir -p "$OUT"
STEPS=${STEPS:-"tests tests1b tests2 check tier_io ttft engine diag server"}
# Also: decode (bench_engine's decode rows only), ab (decode without PDL, then without overlap scheduling), engine8b (bench_engine on
# Qwen3-8B), profile (where prefill / decode time goes), hitprof
# (a tier hit and a GPU hit at 1K and 64K tokens), moe, gmoe, attn, dattn, gemv (kernel sweeps),
# kbench (A/B of the decode fusions), ktests (kernel tests), turns (new turns after a cached
# prefix: extend kernels and TTFT), turnsweep (their tiles), io_ab (the 80K tier hit with each
# IO backend), pwturns (new turns with per-layer graphs to 256 and to 2048 tokens), varlen
# (cuDNN's ragged attention across lengths under one bucket).
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  echo "=== $name ($(date +%T))"
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1; echo "exit $?" >>"$OUT/$name.log"
  grep -v "it/s\]\|s/it\]" "$OUT/$name.log" | tail -n 25
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt"
cat "$OUT/gpu.txt"
# The GPU tests in three steps (together they take longer than one call may run): tests the
# engine (with the API features: logprobs, penalties, structured output), tests1b the cache paths, tests2 the
# kernels and models. --durations shows where time goes.
step tests "${T_TESTS:-240}" python3 -m pytest -q -p no:cacheprovider --durations=10 \
  tests/test_engine.py tests/test_overlap_schedule.py tests/test_sampler.py \
  tests/test_structured_output.py tests/test_tool_calls.py tests/test_reasoning.py
step tests1b "${T_TESTS1B:-300}" python3 -m pytest -q -p no:cacheprovider --durations=10 \
  tests/test_hicache_engine.py tests/test_kv_io.py tests/test_faults.py
step tests2 "${T_TESTS2:-300}" python3 -m pytest -q -p no:cacheprovider --durations=10 \
  tests/test_triton_attention.py tests/test_fused_kernels.py tests/test_models.py \
  tests/test_gemv.py tests/test_fused_moe.py tests/test_pdl.py
step check "${T_CHECK:-90}" python3 scripts/check_hicache_gpu.py
step tier_io "${T_TIER_IO:-80}" python3 benchmarks/bench_tier_io.py --tier "${TIERS:-all}" \
  --gbytes 4 --repeats 3 --io-backends kernel,direct --output-dir "$OUT/tier_io"
step ttft "${T_TTFT:-300}" env KVTIER_XMEM_STANDIN=1 KVTIER_XMEM_STANDIN_DEVICES=1 \
  python3 benchmarks/kvcache_benchmark.py --ttft --backend "${BACKENDS:-all}" \
  --lengths "${LENGTHS:-1K,10K,20K,30K,40K,50K,60K,70K,80K,90K}" --num-prompts 1 \
  --hicache-size 20 --mem-fraction-static 0.85 ${GPU_HIT:---no-gpu-hit} \
  --hicache-io-backend "${IO:-auto}" --output-dir "$OUT/ttft"
step engine "${T_ENGINE:-150}" python3 benchmarks/bench_engine.py --prefill 4K,16K,80K \
  --decode-batch 1,32,128 --output "$OUT/bench_engine.json"
step decode "${T_DECODE:-100}" python3 benchmarks/bench_engine.py --prefill '' \
  --decode-batch 1,32,128 --output "$OUT/bench_engine_decode.json"
# Decode with each of PDL and overlap scheduling off, for A/B against the engine step.
step ab "${T_AB:-200}" bash -c "KVTIER_PDL=0 python3 benchmarks/bench_engine.py --prefill '' \
  --decode-batch 1,32,128 --output $OUT/bench_engine_no_pdl.json && \
  python3 benchmarks/bench_engine.py --prefill '' --decode-batch 1,32,128 \
  --engine-arg disable_overlap_schedule=true --output $OUT/bench_engine_no_overlap.json"
# Qwen3-8B's context is 40,960 positions: the 80K row is timed past it (dummy weights; the
# positions' RoPE does not change the timing).
step engine8b "${T_ENGINE8B:-170}" python3 benchmarks/bench_engine.py --model Qwen/Qwen3-8B \
  --prefill 4K,16K,80K --decode-batch 1,32,128 --engine-arg context_length=81921 \
  --output "$OUT/bench_engine_8b.json"
step diag "${T_DIAG:-110}" python3 scripts/diag_tier_hit.py --tokens 81920 --tier dram \
  --io-backend "${IO:-auto}" --trace-dir /tmp/trace
step server "${T_SERVER:-150}" python3 scripts/server_check.py --log "$OUT/server_process.log"
step profile "${T_PROFILE:-240}" python3 scripts/profile_engine.py --prefill 16384 --batch 1 32 \
  --steps 8 ${PROFILE_ARGS:-}
step hitprof "${T_HITPROF:-150}" bash -c "python3 scripts/profile_step.py --tokens 1024 && \
  python3 scripts/profile_step.py --tokens 65536"
# New turns after a long cached prefix: the extend kernels for 512-2K new tokens (one pass
# against each split count, outputs checked), then the engine's TTFT of a turn from the GPU and
# from dram (run 14, IO auto = direct: 512 tokens after 80K, 111 / 163 ms).
step turns "${T_TURNS:-300}" bash -c "python3 benchmarks/bench_attention.py --mode short-extend \
  --short-extend-tokens ${TURN_TOKENS:-512 1024 2048} --extend-splits 2 4 8 --check; \
  python3 benchmarks/kvcache_benchmark.py --backend dram --lengths 32K,80K --num-prompts 1 \
  --repeats 3 --hicache-size 24 --turn-tokens ${TURN:-512} --no-plots --output-dir $OUT/turns"
# Tiles for new turns: the split kernel's tile sweep (each tile x 2-32 splits) for 512 new
# tokens, and the one-pass kernel's for 2048 (a turn's attention after 80K ran at ~430
# TFLOP/s in run 14; cuDNN's dense kernel reached ~600 on full chunks).
step turnsweep "${T_TURNSWEEP:-300}" bash -c "python3 benchmarks/bench_attention.py --mode \
  short-extend --short-extend-tokens 512 --sweep --rep 20; python3 benchmarks/bench_attention.py \
  --mode extend --extend-tokens 2048 --prefix-lens 32768 81920 --sweep --rep 20"
# The 80K dram tier hit under each IO backend, one process each (run 14: direct 154.3 ms,
# kernel 166.5).
step io_ab "${T_IO_AB:-200}" bash -c "for io in direct kernel; do python3 \
  benchmarks/kvcache_benchmark.py --backend dram --lengths ${IO_LENGTHS:-80K} --num-prompts 1 \
  --repeats 2 --hicache-size 12 --hicache-io-backend \$io --no-gpu-hit --no-plots \
  --output-dir $OUT/io_\$io; done"
# New turns with and without per-layer graphs up to 2048 tokens (run 15: a 32K turn took 53 ms
# in one process and 83-89 in others, likely host-bound there; graphs past 256 tokens gave
# nothing in the fast one), after the test of a MoE model's turns through such graphs.
step pwturns "${T_PWTURNS:-300}" bash -c "python3 -m pytest -q -p no:cacheprovider \
  tests/test_piecewise_moe.py; for pw in 256 2048; do python3 \
  scripts/profile_turn.py --prefix 32768 81920 --turn-tokens 512 2048 --no-profile --repeats 3 \
  --engine-arg piecewise_cuda_graph_max_tokens=\$pw; done"
# Whether cuDNN's ragged attention serves any lengths up to a bucket with one graph (run 16: it
# runs 10-15x slower than the dense kernel; scripts/probe_cudnn_varlen.py).
step varlen "${T_VARLEN:-120}" python3 scripts/probe_cudnn_varlen.py
step moe "${T_MOE:-90}" python3 benchmarks/bench_moe.py --check --sweep --tokens 1 4 16 32
# The expert-major MoE kernels (grouped_moe): CUDA tests, the layer against the other paths
# (with --check) and their tile sweep.
step gmoe "${T_GMOE:-300}" bash -c "python3 -m pytest -q -p no:cacheprovider \
  tests/test_grouped_moe.py; \
  python3 benchmarks/bench_moe.py --check --tokens ${GMOE_TOKENS:-4 8 16 32 64 128 256} \
  --output $OUT/moe_grouped.json; \
  python3 benchmarks/bench_moe.py --sweep-grouped --tokens ${GMOE_SWEEP:-32 128 256} --rep 100"
# Engine decode without and with the expert-major kernels (the torch grouped GEMMs past 64
# pairs, then the default).
step gmoe_e2e "${T_GMOE_E2E:-300}" bash -c "KVTIER_GROUPED_MOE=0 python3 \
  benchmarks/bench_engine.py --prefill '' --decode-batch ${GMOE_DBS:-16,32,64,128} \
  --output $OUT/bench_engine_no_gmoe.json; \
  python3 benchmarks/bench_engine.py --prefill '' --decode-batch ${GMOE_DBS:-16,32,64,128} \
  --output $OUT/bench_engine_gmoe.json"
step attn "${T_ATTN:-150}" bash -c "python3 benchmarks/bench_attention.py --mode extend \
  --extend-tokens 8192 --prefix-lens 0 8192 73728 ${ATTN_ARGS:---sweep} --check --rep 50 && \
  python3 benchmarks/bench_attention.py --mode short-extend ${ATTN_ARGS:---sweep} --check --rep 50"
step dattn "${T_DATTN:-120}" python3 benchmarks/bench_attention.py --mode decode \
  --batch-sizes ${DBS:-1 32} --page-sizes 64 --sweep --check --rep 30
step gemv "${T_GEMV:-200}" python3 benchmarks/bench_gemv.py --check ${GEMV_ARGS:---sweep}
# A/B of the decode fusions at kernel level: host cost of a step copy, the norm in the GEMV
# prologue, the MoE layer, decode attention with and without its prefetch.
step kbench "${T_KBENCH:-200}" bash -c "python3 scripts/probe_h2d.py && \
  python3 benchmarks/bench_gemv.py --norm && \
  python3 benchmarks/bench_moe.py ${MOE_ARGS:---check --tokens 1 4 16} && \
  python3 benchmarks/bench_attention.py --mode decode --batch-sizes ${DBS:-1 32 128} \
  --page-sizes 64 --decode-prefetch both --check --rep 30"
step ktests "${T_KTESTS:-100}" python3 -m pytest -q -p no:cacheprovider \
  ${KTESTS:-tests/test_fused_kernels.py tests/test_fused_moe.py tests/test_faults.py}
