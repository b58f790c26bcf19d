#!/usr/bin/env bash
# The headline figures of two source trees, measured in one call on one machine, side by side:
#   benchmarks/compare.sh BEFORE_TREE [AFTER_TREE]     (AFTER_TREE: this checkout)
# e.g. `mkdir .before && git archive <commit> | tar -x -C .before` for the commit before a change.
# Each figure runs on the before tree, then at once on the after tree, so drift on the machine falls on
# both alike: batch-1 decode (Llama-2-7B fp16), offline throughput (Llama-3.1-8B bf16, 1024 x 128/128,
# <= 512 running) and served over offline (256 streams, <= 256 running, engine in its own process).
# Writes before.json, after.json, compare.md and run.log to $OUT if set, else benchmarks/results/compare.
# About 8 minutes on an H200 with a cold Triton cache. Needs the fastapi stack for the served figure.
set -uo pipefail
BEFORE="$(cd "$1" && pwd)"
AFTER="$(cd "${2:-$(dirname "$0")/..}" && pwd)"
RESULTS="$(mkdir -p "${OUT:-$AFTER/benchmarks/results/compare}" && cd "${OUT:-$AFTER/benchmarks/results/compare}" && pwd)"
export PYTHONUNBUFFERED=1
status=0

served_module() {  # the harness folder was bench/ before it became benchmarks/
  if [ -f "$1/benchmarks/served.py" ]; then echo benchmarks.served; else echo bench.served; fi
}

run() {  # run TREE LABEL ARGS...: one figure on one tree, its rows appended to LABEL.json
  local tree="$1" label="$2"
  shift 2
  echo "=== $label: $* ($(date -u +%H:%M:%S))" | tee -a "$RESULTS/run.log"
  (cd "$tree" && PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" python3 "$@") 2>&1 | tee -a "$RESULTS/run.log" \
    | tail -n 5
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

echo "=== before: $BEFORE; after: $AFTER" | tee -a "$RESULTS/run.log"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$RESULTS/run.log"

for figure in decode offline served; do
  for label in before after; do
    tree=$([ $label = before ] && echo "$BEFORE" || echo "$AFTER")
    case $figure in
      decode) run "$tree" $label -m kiln.bench --random llama2-7b --latency-only --json "$RESULTS/$label.json" ;;
      offline) run "$tree" $label -m kiln.bench --random llama3.1-8b --throughput-only --max-num-seqs 512 \
        --json "$RESULTS/$label.json" ;;
      served) run "$tree" $label -m "$(served_module "$tree")" --random llama3.1-8b --num-requests 1024 \
        --input-len 128 --output-len 128 --concurrency 256 --max-num-seqs 256 --engine-process \
        --out "$RESULTS/$label.json" ;;
    esac
  done
done

(cd "$AFTER" && python3 -m benchmarks.compare "$RESULTS/before.json" "$RESULTS/after.json" --md "$RESULTS/compare.md") \
  || status=1
exit $status
