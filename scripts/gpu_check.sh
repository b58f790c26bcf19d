#!/usr/bin/env bash
# The one command for the GPU machine: kernel tests against the references, then the benchmarks.
#   scripts/gpu_check.sh [STAGE...]    stages: env tests kernels gemv quant small-m quant-engines kv-fp8 tune kiln hf
#                                     served served-eager-mixed startup prefill structured grammar
#                                     smollm2 targets report
#                                     (default: all but tune, the tile-shape sweep)
# Results (results.json, results.md, plots, run.log) go to $OUT if set (the device tool's folder), else
# benchmarks/results; each stage appends to results.json and run.log. The device tool brings back at most
# eight files from $OUT, so with $OUT set the script ends by packing everything there but results.json,
# results.md and targets.done into $OUT/results.tgz.
# Run from the repository root; needs a CUDA GPU, torch, triton and transformers (matplotlib for plots).
# The whole default run takes about 12 minutes on an H100 (tests 4.5, kernels 1, kiln 2.5, hf 4; tests
# 1 + 6.5 at 3ce8b08 with the quantized kernels, the kernel tests under pytest-xdist); under
# the device tool's 10-minute limit run it as two calls, `env tests kernels kiln report` then `hf report`,
# and merge the two results.json files with `python -m benchmarks.report A.json B.json --md ... --png ...`.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
STAGES=("$@")
pack_out() {  # see the header: keep the three small summary files loose, the logs and profiles in one archive
  local files
  files=$(cd "$OUT" && find . -mindepth 1 -maxdepth 1 ! -name results.json ! -name results.md \
    ! -name targets.done ! -name results.tgz -printf '%P\n')
  [ -n "$files" ] || return 0
  (cd "$OUT" && tar -czf results.tgz $files && rm -rf $files)
}
[ -n "${OUT:-}" ] && trap pack_out EXIT
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env tests kernels kiln hf report)
status=0

for stage in "${STAGES[@]}"; do
  echo "=== $stage ($(date -u +%H:%M:%S))"
  case "$stage" in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || status=1
      python3 - <<'PY'
import importlib
for name in ("torch", "triton", "transformers", "matplotlib", "flash_attn", "fastapi", "uvicorn", "uvloop", "httptools", "aiohttp"):
    try:
        print(f"{name:14s}", getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError:
        print(f"{name:14s} missing")
PY
      ;;
    tests)  # kernel tests in parallel where pytest-xdist is installed, engine-building ones one at a time
      parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
      python3 -m pytest -q -p no:cacheprovider -m "not whole_gpu" $parallel tests/gpu 2>&1 | tee -a "$RESULTS/run.log" \
        || status=1
      python3 -m pytest -q -p no:cacheprovider -rs -m whole_gpu tests/gpu 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    kernels)
      python3 -m benchmarks.kernels --out "$RESULTS/results.json" --suites decode prefill elementwise 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    hf)
      python3 -m benchmarks.hf_baselines --out "$RESULTS/results.json" 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    gemv)  # batch-1 GEMVs: cuBLAS against the Triton GEMV over a sweep of tiles (7B shapes)
      python3 -m benchmarks.gemv --out "$RESULTS/results.json" 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    quant)  # the quantized kernels beside the 16-bit ones: GEMVs (7B and 8B shapes), GEMMs at 256-4096 tokens
      python3 -m benchmarks.quant_gemv --out "$RESULTS/results.json" 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    small-m)  # decode batches of 1 and 16 tokens over 8-bit weights: the GEMV / today's dispatch against quant_gemm's tiles
      python3 -m benchmarks.quant_small_m --tokens 1 16 --out "$RESULTS/results.json" 2>&1 | tee -a "$RESULTS/run.log" \
        || status=1 ;;
    prefill)  # TTFT of one prompt of 1k-32k tokens (Llama-3.1-8B bf16) against the bf16 matmul ceiling, with op profiles
      python3 -m benchmarks.prefill --random llama3.1-8b --json "$RESULTS/results.json" \
        --profile "$RESULTS/prefill-profiles" 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    quant-engines)  # each scheme beside the 16-bit engine: batch-1 decode (7B), offline 128/128 (8B; FP8 also with
                    # the fp8 KV cache), FP8 1000/1000
      for scheme in none int8-wo fp8 int8-sq; do
        q=$([ $scheme = none ] || echo "--quantization $scheme")
        python3 -m kiln.bench --random llama2-7b --latency-only $q --json "$RESULTS/results.json" 2>&1 \
          | tee -a "$RESULTS/run.log" || status=1
        python3 -m kiln.bench --random llama3.1-8b --throughput-only --max-num-seqs 512 $q \
          --json "$RESULTS/results.json" 2>&1 | tee -a "$RESULTS/run.log" || status=1
      done
      python3 -m kiln.bench --random llama3.1-8b --throughput-only --max-num-seqs 512 --quantization fp8 \
        --kv-cache-dtype fp8 --json "$RESULTS/results.json" 2>&1 | tee -a "$RESULTS/run.log" || status=1
      python3 -m kiln.bench --random llama3.1-8b --throughput-only --max-num-seqs 512 --input-len 1000 \
        --output-len 1000 --quantization fp8 --json "$RESULTS/results.json" 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    kv-fp8)  # the fp8 KV cache (every scale 1.0 on random weights) beside the bf16 one: offline 8B 1000/1000 at <= 512
      for kv in "" "--kv-cache-dtype fp8" "--kv-cache-dtype fp8 --quantization fp8"; do
        python3 -m kiln.bench --random llama3.1-8b --throughput-only --max-num-seqs 512 --num-requests 1024 \
          --input-len 1000 --output-len 1000 $kv --json "$RESULTS/results.json" 2>&1 | tee -a "$RESULTS/run.log" \
          || status=1
      done ;;
    structured)  # a JSON schema at 256 streams and at batch 1; SmolLM2's tokenizer files in $KILN_TOKENIZER_DIR (.tok)
      python3 -m benchmarks.structured "${KILN_TOKENIZER_DIR:-.tok}" --repeats 2 --json "$RESULTS/structured.json" \
        2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    grammar)  # llguidance / xgrammar per mask and at 256 rows, Kiln's fill by families, masks applied on the device
      python3 -m benchmarks.grammar_backends "${KILN_TOKENIZER_DIR:-.tok}" --batch 256 \
        --json "$RESULTS/grammar_backends.json" 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    tune)
      python3 -m benchmarks.kernels --out "$RESULTS/results.json" --suites tune 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    kiln)
      python3 -m benchmarks.engine --out "$RESULTS/results.json" 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    served)  # needs fastapi/uvicorn/pydantic: carry .whl (see ../shared/device/README.md)
      python3 -m benchmarks.served --random llama3.1-8b --num-requests 1024 --input-len 128 --output-len 128 \
        --concurrency 256 --max-num-seqs 256 --engine-process --out "$RESULTS/results.json" 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    served-eager-mixed)  # the same with mixed steps run eagerly (no piecewise graphs)
      python3 -m benchmarks.served --random llama3.1-8b --num-requests 1024 --input-len 128 --output-len 128 \
        --concurrency 256 --max-num-seqs 256 --engine-process --no-piecewise-graphs \
        --out "$RESULTS/results.json" 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    startup)
      python3 -m benchmarks.startup --random llama2-7b --dir /tmp/kiln-llama2-7b --repeats 2 \
        --import-profile "$RESULTS/imports" --out "$RESULTS/results.json" 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    smollm2)  # the default model in fp16/bf16: needs its GGUF in $KILN_CACHE_DIR/gguf (see benchmarks/README.md)
      python3 -m pytest -q -p no:cacheprovider -rs tests/gpu/test_default_model_gpu.py 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    targets)  # issue 16's figures in priority order within $TARGETS_BUDGET seconds; later calls skip the steps
              # listed in $TARGETS_DONE (default $RESULTS/targets.done; where $OUT starts empty each call, a file
              # brought along from the last call's $OUT)
      python3 -m benchmarks.targets --budget "${TARGETS_BUDGET:-540}" --out "$RESULTS/results.json" \
        --done "${TARGETS_DONE:-$RESULTS/targets.done}" 2>&1 | tee -a "$RESULTS/run.log" || status=1 ;;
    report)
      python3 -m benchmarks.report "$RESULTS/results.json" --md "$RESULTS/results.md" --png "$RESULTS" || status=1 ;;
    *)
      echo "unknown stage $stage"; status=2 ;;
  esac
done
exit $status
