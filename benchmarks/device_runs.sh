#!/usr/bin/env bash
# The GPU checks and benchmarks still owed, batched for one device call each (10 minutes at most).
#
#   bash benchmarks/device_runs.sh 2gpu-tests   # nvidia-h200-x2: GPU tests of the services and transports
#   bash benchmarks/device_runs.sh 2gpu-bench   # nvidia-h200-x2: handoff (cuda_ipc, nccl) + fixed-KV sweep
#   bash benchmarks/device_runs.sh 1gpu-bench   # nvidia-h100-x1: handoff after the pool-order fix + long inputs
#   bash benchmarks/device_runs.sh 1gpu-handoff # nvidia-h100-x1: GPU tests, then early vs late reservation
#   bash benchmarks/device_runs.sh 1gpu-serving # nvidia-h100-x1: fixed-KV retention sweep (24 requests), compression overhead
#   bash benchmarks/device_runs.sh 1gpu-kernels # nvidia-h100-x1: engine GPU tests, compression overhead, handoff, prefill variants
#   bash benchmarks/device_runs.sh 1gpu-layers  # nvidia-h100-x1: GPU tests not yet run on a GPU, layer kernels vs eager, compression overhead
#   bash benchmarks/device_runs.sh 1gpu-wired   # nvidia-h100-x1: the engine on the layer kernels: GPU tests, launch cost, prefill, decode
#   bash benchmarks/device_runs.sh 1gpu-scoring # nvidia-h100-x1: scoring kernel variants (kernel tests, stage times, prefill share)
#   bash benchmarks/device_runs.sh 1gpu-confirm # nvidia-h100-x1: engine + serving GPU tests, compression overhead and its profile
#   bash benchmarks/device_runs.sh 1gpu-share   # nvidia-h100-x1: the compactor's prefill share with many repetitions (8K: 31)
#   bash benchmarks/device_runs.sh 1gpu-decode  # nvidia-h100-x1: work-balanced decode kernel: GPU tests, config sweep, full grid
#   bash benchmarks/device_runs.sh 1gpu-engine-decode # nvidia-h100-x1: the engine on the balanced kernel: GPU tests, attention_kernels.py
#   bash benchmarks/device_runs.sh 1gpu-layers-check  # nvidia-h100-x1: layer/engine/graph/serving GPU tests, fused projections, decode steps
#   bash benchmarks/device_runs.sh 1gpu-pages         # nvidia-h100-x1: decode over page sizes 16-128, split-count variants at B=1
#   bash benchmarks/device_runs.sh 1gpu-decode-check  # nvidia-h100-x1: decode + engine GPU tests, B1/B8 both kernels, 64-token pages
#   bash benchmarks/device_runs.sh 1gpu-calibration  # nvidia-h100-x1: retention=auto on CUDA (GPU test), the calibration signal's prefill share at 8K and 32K
#   bash benchmarks/device_runs.sh 1gpu-ctxcache      # nvidia-h100-x1: cached contexts: per-head prefill kernel + engine GPU tests,
#                                                     #   the per-head prefill vs dense, hit vs miss TTFT (8B shape, 32K context)
#   bash benchmarks/device_runs.sh 1gpu-quality       # nvidia-h100-x1: quality sweep on the tuning split, kvferry + kvpress
#   bash benchmarks/device_runs.sh 1gpu-cold          # nvidia-h100-x1: the kernels' GPU tests, then per-length cold costs
#                                                     #   (benchmarks/cold_lengths.py; ~4 min)
#   bash benchmarks/device_runs.sh 1gpu-owed          # nvidia-h100-x1: 1gpu-ctxcache's benchmarks and kernel test, then the
#                                                     #   calibration signal's prefill share (no GPU test suites; ~9 min)
#   bash benchmarks/device_runs.sh 1gpu-docqa         # nvidia-h100-x1: kvferry bench --workload docqa through the services
#                                                     #   (8B shape, 8 documents of 16K-32K x 16 questions, 16 in flight; ~6 min)
#
# 1gpu-quality needs SmolLM2's GGUF (98 MB), more than one call may carry (64 MiB), so it travels in
# two parts over two calls to the same warm machine (it stays warm 30 s after a call), and kvpress's
# own transformers in .whl/kvpress/ (installed apart, for the kvpress step only). Here, once:
#   mkdir -p .model .whl/kvpress
#   split -b 54M "$(python -P -c 'from kvferry.engine.loader.default_model import default_model_path as p; print(p())')" .model/smollm2.gguf.part-
#   cd .whl && python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform any gguf==0.19.0 && cd kvpress && python3 -m pip download --no-deps \
#     --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64 --platform any \
#     kvpress==0.5.5 transformers==5.2.0 tokenizers==0.22.2 cachetools==5.5.2 termcolor==3.3.0 datasets==5.2.0 \
#     dill==0.4.1 multiprocess==0.70.19 && python3 -m pip wheel --no-deps fire==0.6.0 && cd ../..
# then call 1: command "ls -l .model", carry [".model/smollm2.gguf.part-aa"] (59 MiB with the tree); at once call 2:
# command "bash benchmarks/device_runs.sh 1gpu-quality", carry [".model/smollm2.gguf.part-ab", ".whl"] (60 MiB).
# Expected: call 1 ~1-2 min (start + upload); call 2 ~9.5 min (set-up ~0.5, kvferry <= 250 s + one sample,
# kvpress <= 170 s + one sample, summary); both runs stop starting samples at their budgets, seed by seed.
#
# Needs the .whl folder carried (grpcio_health_checking, grpcio_reflection); results go to $OUT.
# Every step has its own timeout and writes as it goes, so a cut-off step loses only itself.
set -uo pipefail
case ${1:-} in
  2gpu-tests | 2gpu-bench | 1gpu-bench | 1gpu-handoff | 1gpu-serving | 1gpu-kernels | 1gpu-layers | 1gpu-wired | 1gpu-scoring | 1gpu-confirm | 1gpu-share | 1gpu-decode | 1gpu-engine-decode | 1gpu-decode-check | 1gpu-pages | 1gpu-layers-check | 1gpu-ctxcache | 1gpu-quality | 1gpu-calibration | 1gpu-docqa | 1gpu-owed | 1gpu-cold) ;;
  *)
    echo "usage: $0 {2gpu-tests|2gpu-bench|1gpu-bench|1gpu-handoff|1gpu-serving|1gpu-kernels|1gpu-layers|1gpu-wired|1gpu-scoring|1gpu-confirm|1gpu-share|1gpu-decode|1gpu-engine-decode|1gpu-decode-check|1gpu-pages|1gpu-layers-check|1gpu-ctxcache|1gpu-quality|1gpu-calibration|1gpu-docqa|1gpu-owed|1gpu-cold}" >&2
    exit 2
    ;;
esac
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
# kvferry itself, editable (the repository root is never an import root: python -P everywhere)
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>&1 | tail -1
export PYTHONPATH=/tmp/site NCCL_NVLS_ENABLE=0
MODEL=benchmarks/configs/llama-3.1-8b
nvidia-smi --query-gpu=name --format=csv,noheader
date -u

handoff() {  # $1: tag, then extra flags
  local tag=$1
  shift
  timeout ${HANDOFF_TIMEOUT:-200} python benchmarks/handoff.py --model $MODEL --context 32768 --retention 0.5 --requests 4 \
    --prefill-kv-gib 5 --decode-kv-gib 3 --out "$OUT/bench" --tag "$tag" --log-dir "$OUT/logs-$tag" "$@" \
    2>&1 | grep -v "^  \[" | tail -8
  grep -hE "handoff over|ReserveKV answered|committed" "$OUT"/logs-"$tag"/*/*.log | cut -c1-220 | tail -12
}

cached_context_ttft() {  # $1: timeout. Hit vs miss TTFT, 8B shape, 32K context (issue 21's acceptance)
  timeout "$1" python benchmarks/context_cache.py --gpu-8b --retentions 0.5 1 --out "$OUT/bench" \
    > "$OUT/context_cache.log" 2>&1; grep -vE "^  r=" "$OUT/context_cache.log" | tail -8
}

cached_context_kernels() {  # $1: timeout. The per-head-prefix prefill kernel against a uniform prefix and the dense path
  timeout "$1" python benchmarks/attention_kernels.py --cached-context --retentions 0.5 0.25 --out "$OUT/bench" \
    > "$OUT/cached_context_kernels.log" 2>&1
  grep -E "cached context|wrote|Error|error" "$OUT/cached_context_kernels.log" | cut -c1-250
}

case ${1:-} in
  2gpu-tests)
    timeout 280 python -P -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_serving_gpu.py 2>&1 | tail -12
    timeout 280 python -P -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_transfer_gpu.py 2>&1 | tail -14
    ;;
  2gpu-bench)
    handoff 2xh200 --decode-device cuda:1 --transports cuda_ipc,nccl,cuda_ipc:noverify
    timeout 330 python -P -m kvferry.clients.cli bench --model $MODEL --load-format dummy --max-model-len 9000 \
      --prefill-device cuda:0 --decode-device cuda:1 --prefill-kv-cache-gib 6 --decode-kv-cache-gib 2.5 \
      --prefill-args "--reserve-wait-seconds 300" --num-requests 16 --input-len 8192 --output-len 512 \
      --concurrency 16 --retention 1,0.5,0.25,0.1 --warmup 1 --quiet --out "$OUT/bench/serving_2xh200_fixed_kv" \
      2>&1 | tail -6
    ;;
  1gpu-handoff)
    timeout 200 python -P -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_serving_gpu.py 2>&1 | tail -8
    HANDOFF_TIMEOUT=330 handoff h100_early --transports cuda_ipc,cuda_ipc:late,cuda_ipc:noverify
    ;;
  1gpu-serving)
    timeout 340 python -P -m kvferry.clients.cli bench --model $MODEL --load-format dummy --max-model-len 9000 \
      --device cuda:0 --prefill-kv-cache-gib 6 --decode-kv-cache-gib 2.5 \
      --prefill-args "--reserve-wait-seconds 600" --num-requests 24 --input-len 8192 --output-len 512 \
      --concurrency 24 --retention 1,0.5,0.25,0.1 --warmup 1 --quiet --out "$OUT/bench/serving_h100_fixed_kv24" \
      2>&1 | tail -6
    timeout 200 python benchmarks/compression_overhead.py --out "$OUT/bench" --reps 2 2>&1 | tail -16
    ;;
  1gpu-kernels)
    timeout 90 python -P -m pytest -q -m gpu -p no:cacheprovider tests/test_engine_gpu.py tests/test_cuda_graphs_gpu.py 2>&1 | tail -4
    timeout 170 python benchmarks/compression_overhead.py --out "$OUT/bench" --reps 2 > "$OUT/co.log" 2>&1; tail -2 "$OUT/co.log"
    HANDOFF_TIMEOUT=140 handoff h100_sorted --transports cuda_ipc,cuda_ipc:noverify
    timeout 170 python benchmarks/prefill_variants.py --out "$OUT/bench/prefill_variants.json" 2>&1 | tail -45
    ;;
  1gpu-layers)
    timeout 150 python -P -m pytest -q -m gpu -p no:cacheprovider tests/test_uploads.py tests/test_layer_kernels.py \
      tests/test_engine_gpu.py tests/test_serving_gpu.py 2>&1 | tail -4
    timeout 200 python benchmarks/layer_kernels.py --out "$OUT/bench" --reps 7 2>&1 | tail -8
    timeout 200 python benchmarks/compression_overhead.py --out "$OUT/bench" --reps 9 2>&1 | grep "ctx "
    ;;
  1gpu-wired)
    timeout 170 python -P -m pytest -q -m gpu -p no:cacheprovider tests/test_layer_kernels.py tests/test_engine_gpu.py \
      tests/test_cuda_graphs_gpu.py tests/test_serving_gpu.py 2>&1 | tail -4
    timeout 40 python benchmarks/launch_overhead.py --out "$OUT/bench" 2>&1 | tail -9
    timeout 150 python benchmarks/layer_kernels.py --out "$OUT/bench" --reps 7 2>&1 | tail -4
    timeout 150 python benchmarks/compression_overhead.py --out "$OUT/bench" --reps 9 2>&1 | grep "ctx "
    for lk in layer-kernels no-layer-kernels; do
      timeout 70 python benchmarks/decode_step.py --batch-sizes 1,32 --steps 32 --$lk --out "$OUT/bench/decode_$lk" \
        2>&1 | grep -E "^batch|tpot" | cut -c1-160
    done
    ;;
  1gpu-scoring)
    timeout 150 python -P -m pytest -q -m gpu -p no:cacheprovider tests/test_compression_kernels.py 2>&1 | tail -4
    timeout 200 python benchmarks/scoring_kernels.py --out "$OUT/bench/scoring_kernels_group.json" --lev-heads 64 \
      --no-32k --eager-calls 10 --variants "${SCORING_VARIANTS:-sketch3_ws,fused_w8_s2,fused_w4_s2,fused_w8_s1,fused_w8_s3,fused_w16_s2,mass_w8,mass_w4,mass_w8_s1,mass_w8_s2,mass_q2_w8,mass_q2_w4}" \
      > "$OUT/scoring.log" 2>&1; grep -A40 "^what" "$OUT/scoring.log" || tail -20 "$OUT/scoring.log"
    timeout 220 python benchmarks/compression_overhead.py --out "$OUT/bench" --reps ${CO_REPS:-7} --no-reference \
      --contexts ${CO_CONTEXTS:-8192 32768} --variants ${CO_VARIANTS:-fused:1 :2 fused:2 fused:2:1 fused:1:1} 2>&1 | grep "ctx "
    ;;
  1gpu-confirm)
    timeout 200 python -P -m pytest -q -m gpu -p no:cacheprovider tests/test_engine_gpu.py tests/test_cuda_graphs_gpu.py tests/test_compression_kernels.py \
      tests/test_serving_gpu.py 2>&1 | tail -4
    timeout 100 python benchmarks/scoring_kernels.py --out "$OUT/bench/scoring_kernels_group_fused.json" --lev-heads 64 \
      --no-32k --no-mass --eager-calls 10 --variants fused_w4_s2,fused_w4_s1,fused_w4_s3,fused_w2_s2 \
      > "$OUT/scoring.log" 2>&1; grep -A12 "^what" "$OUT/scoring.log" || tail -20 "$OUT/scoring.log"
    timeout 240 python benchmarks/compression_overhead.py --out "$OUT/bench" --reps 9 --variants sketch3:1 2>&1 | grep "ctx "
    timeout 120 python benchmarks/compression_overhead.py --out /tmp/prof --profile --contexts 8192 2>&1 | grep "ctx "
    cp /tmp/prof/profile.json "$OUT/"
    python3 -c "import json; r = json.load(open('/tmp/prof/profile.json'))['profiles']['8192']['compactor']
for k, v in r['top_kernels_ms'].items(): print(f'{v:8.2f} ms  {k}')"
    ;;
  1gpu-share)
    timeout 150 python benchmarks/compression_overhead.py --out "$OUT/bench8k" --contexts 8192 --reps 31 --no-reference \
      --variants sketch3:1 2>&1 | grep "ctx "
    timeout 300 python benchmarks/compression_overhead.py --out "$OUT/bench32k" --contexts 32768 --reps 7 --no-reference \
      2>&1 | grep "ctx "
    ;;
  1gpu-decode)
    timeout 150 python -P -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py -k "balanced or decode_gpu_llama8b" 2>&1 | tail -4
    timeout 400 python benchmarks/attention_kernels.py --out "$OUT/k" --decode-only --balanced-sweep ${DECODE_ARGS:-} > "$OUT/k.log" 2>&1
    grep -E "balanced sweep|chosen|B=|target|Error|error" "$OUT/k.log" | cut -c1-250
    ;;
  1gpu-engine-decode)
    timeout 260 python -P -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py -k "balanced or dispatch or decode_gpu_llama8b" \
      tests/test_engine_gpu.py tests/test_cuda_graphs_gpu.py tests/test_serving_gpu.py 2>&1 | tail -4
    timeout 320 python benchmarks/attention_kernels.py --out "$OUT/k" --decode-variants split > "$OUT/k.log" 2>&1
    grep -E "B=|target|Error|error|ctx|case" "$OUT/k.log" | cut -c1-250
    ;;
  1gpu-decode-check)
    timeout 130 python -P -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py -k "balanced_gpu or decode_gpu_llama8b or dispatch or forward_batches_run_triton" 2>&1 | tail -1
    timeout 100 python -P -m pytest -q -m gpu -p no:cacheprovider tests/test_engine_gpu.py tests/test_cuda_graphs_gpu.py 2>&1 | tail -1
    timeout 120 python benchmarks/attention_kernels.py --out "$OUT/k" --batches 1 8 --decode-only --decode-variants split balanced \
      > "$OUT/k.log" 2>&1; grep -E "B=|Error|error" "$OUT/k.log" | cut -c1-250
    timeout 60 python benchmarks/attention_kernels.py --out "$OUT/k64" --page-size 64 --batches 8 --contexts 8192 32768 --decode-only \
      --decode-variants split balanced > "$OUT/k64.log" 2>&1; grep -E "B=|Error|error" "$OUT/k64.log" | cut -c1-250
    ;;
  1gpu-layers-check)
    timeout 240 python -P -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_layer_kernels.py tests/test_engine_gpu.py \
      tests/test_cuda_graphs_gpu.py tests/test_prefill_dense.py tests/test_serving_gpu.py 2>&1 | tail -4
    timeout 200 python benchmarks/fused_projections.py --out "$OUT/fp" --reps 2 > "$OUT/fp.log" 2>&1; grep -v "^{" "$OUT/fp.log" | tail -8
    timeout 150 python benchmarks/decode_step.py --batch-sizes 1,32 --steps 32 --out "$OUT/ds" > "$OUT/ds.log" 2>&1
    grep -E "graphs|Error" "$OUT/ds.log" | tail -4
    ;;
  1gpu-pages)
    for ps in 16 32 64 128; do
      timeout 100 python benchmarks/attention_kernels.py --out "$OUT/p$ps" --page-size $ps --batches 1 --decode-only \
        --decode-variants split balanced split:programs_per_sm=2 split:programs_per_sm=3 split:programs_per_sm=8 \
        split:block_n=64 > "$OUT/p$ps.log" 2>&1; grep -E "B=|Error|error" "$OUT/p$ps.log" | cut -c1-330
      [ $ps = 32 ] && continue
      timeout 60 python benchmarks/attention_kernels.py --out "$OUT/q$ps" --page-size $ps --batches 8 32 --contexts 8192 \
        --decode-only --decode-variants split balanced > "$OUT/q$ps.log" 2>&1; grep -E "B=|Error|error" "$OUT/q$ps.log" | cut -c1-250
    done
    timeout 60 python benchmarks/attention_kernels.py --out "$OUT/small" --batches 1 8 --contexts 1024 2048 --retentions 1.0 \
      --decode-only --decode-variants split balanced > "$OUT/small.log" 2>&1; grep -E "B=|Error|error" "$OUT/small.log" | cut -c1-250
    ;;
  1gpu-ctxcache)
    # the acceptance number first (hit vs miss TTFT, 8B shape, 32K), then the kernel checks at real shapes
    cached_context_ttft 220
    timeout 150 python -P -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_kernels.py \
      -k "per_head_prefixes or prefill_gpu_llama8b or forward_batches_run_triton" 2>&1 | tail -3
    cached_context_kernels 90
    timeout 100 python -P -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_engine_gpu.py tests/test_cuda_graphs_gpu.py 2>&1 | tail -3
    ;;
  1gpu-cold)
    # per-length cold costs (benchmarks/cold_lengths.py) and the kernels' GPU tests at real shapes
    timeout 200 python -P -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_compression_kernels.py 2>&1 | tail -4
    timeout 120 python -P -m pytest -q -m gpu -p no:cacheprovider tests/test_engine_gpu.py -k cached_context 2>&1 | tail -4
    TRITON_CACHE_DIR=/tmp/triton-cold timeout 240 python -P benchmarks/cold_lengths.py --out "$OUT/bench" 2>&1 | grep -v Warning | tail -20
    ;;
  1gpu-owed)
    cached_context_ttft 200
    timeout 120 python -P -m pytest -q -m gpu -p no:cacheprovider -rfE tests/test_kernels.py -k per_head_prefixes 2>&1 | tail -3
    cached_context_kernels 70
    timeout 180 python benchmarks/compression_overhead.py --out "$OUT/bench" --reps 5 --no-reference --no-kernel-components \
      > "$OUT/calibration.log" 2>&1
    grep -E "calibration signal|fused_side_stream: share|auto: share|Error|error" "$OUT/calibration.log" | tail -8
    ;;
  1gpu-docqa)
    # Prefill and decode share the GPU: 2 x 16 GB of weights, KV pools of 16 + 12 GiB with context
    # caches of 12 + 8 GiB (a 32K document is 4 GiB uncompressed: r=1 cannot hold all 8, r=0.5 nearly).
    # The settings run cached first, `off` (128 uncached 16K-32K prefills) last; the JSON is rewritten
    # after each, so a step cut short keeps the settings that finished.
    if [ -n "${DOCQA_TESTS_FIRST:-}" ]; then  # the GPU tests of what the run depends on, short
      timeout 150 python -P -m pytest -q -m gpu -p no:cacheprovider tests/test_engine_gpu.py tests/test_kernels.py \
        tests/test_compression_kernels.py -k "cached_context or per_head or llama8b" 2>&1 | tail -3
    fi
    timeout ${DOCQA_TIMEOUT:-470} python -P -m kvferry.clients.cli bench --workload docqa --model $MODEL --load-format dummy \
      --max-model-len 33024 --device cuda:0 --prefill-kv-cache-gib 16 --decode-kv-cache-gib 12 \
      --prefill-args "--context-cache-gib 12 --reserve-wait-seconds 300" --decode-args "--context-cache-gib 8" \
      --documents 8 --questions-per-document 16 --input-len 16k-32k --question-len 32-64 --output-len 32 \
      --concurrency ${DOCQA_CONCURRENCY:-16} --zipf 1.0 --context-caches ${DOCQA_CACHES:-0.5,auto,1,off} --warmup 1 --quiet \
      --log-dir "$OUT/logs-docqa" --out "$OUT/bench/docqa_h100_8b_c${DOCQA_CONCURRENCY:-16}" 2>&1 | tail -8
    grep -hE "Error|error|Traceback" "$OUT"/logs-docqa/*.log 2>/dev/null | cut -c1-220 | tail -6
    grep -h "prefilled" "$OUT"/logs-docqa/prefill.log | grep -vE " in 0\.[0-9]+ s \(kept" | cut -c1-200 | head -12
    if [ -n "${DOCQA_THEN_KERNELS:-}" ]; then cached_context_kernels 60; fi
    ;;
  1gpu-quality)
    GGUF=.model/SmolLM2-135M-Instruct.Q4_1.gguf
    cat .model/smollm2.gguf.part-* > $GGUF 2>/dev/null
    if ! echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c --quiet -; then
      echo "SmolLM2's GGUF is incomplete: carry .model/smollm2.gguf.part-aa in one call and part-ab in the next (see the top)"
      ls -l .model; exit 1
    fi
    python3 -m pip install -q --no-index --no-deps --target /tmp/kvp_site .whl/kvpress/*.whl 2>&1 | tail -1
    # kvferry: every variant x retentions {0.5, 0.25, 0.1} x both settings + the full cache, seed by seed
    # (QUALITY_DEVICE=cpu and the *_ARGS / KVPRESS_PYTHON variables: a CPU rehearsal of this mode)
    # QUALITY_SPLIT=test reports the test split; KVPRESS_BUDGET=0 skips kvpress
    SPLIT=${QUALITY_SPLIT:-tuning}
    timeout $((${QUALITY_BUDGET:-250} + 60)) python benchmarks/quality.py --model $GGUF --device ${QUALITY_DEVICE:-cuda} \
      --dtype float32 --kv-gib 30 --prefill-chunk 2048 --split $SPLIT --per-cell ${QUALITY_PER_CELL:-4} \
      --time-budget ${QUALITY_BUDGET:-250} --tokens-out "$OUT/quality_tokens.jsonl" --out "$OUT/quality_$SPLIT.json" \
      ${QUALITY_ARGS:-} > "$OUT/quality.log" 2>&1
    grep -E "budget|Error|error|full cache" "$OUT/quality.log" | tail -5
    # kvpress 0.5.5 on the same token ids (context setting), with its own transformers 5.2
    [ "${KVPRESS_BUDGET:-170}" = 0 ] || PYTHONPATH=/tmp/kvp_site:/tmp/site HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error \
      timeout $((${KVPRESS_BUDGET:-170} + 50)) ${KVPRESS_PYTHON:-python} benchmarks/quality_kvpress.py --tokens "$OUT/quality_tokens.jsonl" --model $GGUF \
      --device ${QUALITY_DEVICE:-cuda} --time-budget ${KVPRESS_BUDGET:-170} --out "$OUT/quality_kvpress.json" \
      ${KVPRESS_ARGS:-} > "$OUT/kvpress.log" 2>&1
    grep -E "budget|Error|error" "$OUT/kvpress.log" | tail -5
    KVP="$OUT/quality_kvpress.json"
    python benchmarks/quality.py --summarize "$OUT/quality_$SPLIT.json" ${KVP:+$([ -f "$KVP" ] && echo --merge-kvpress "$KVP")} \
      2>&1 | head -80
    ;;
  1gpu-bench)
    handoff h100_ipc --transports cuda_ipc,cuda_ipc:noverify
    timeout 300 python -P -m kvferry.clients.cli bench --model $MODEL --load-format dummy --max-model-len 33280 \
      --device cuda:0 --prefill-kv-cache-gib 10 --decode-kv-cache-gib 12 \
      --prefill-args "--reserve-wait-seconds 300" --num-requests 6 --input-len 16k-32k --output-len 256 \
      --concurrency 6 --retention 1,0.25 --warmup 1 --quiet --out "$OUT/bench/serving_h100_long" 2>&1 | tail -4
    ;;
  1gpu-calibration)
    timeout 150 python -P -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_engine_gpu.py -k auto 2>&1 | tail -4
    # the auto mode pins the calibration to --retention, so auto - fused_side_stream is the signal alone
    timeout 400 python benchmarks/compression_overhead.py --out "$OUT/bench" --reps 7 --no-reference \
      > "$OUT/calibration.log" 2>&1
    grep -E "calibration signal|fused_side_stream: share|auto: share" "$OUT/calibration.log" | tail -8
    ;;
esac
