#!/bin/sh
# Runs `kiln build` inside the image build: docker/build-engine.sh BACKEND OUTPUT_DIR
#
# The checkpoint is $MODEL (a hub id, downloaded here) or, when $MODEL is empty, the directory bound at
# /model (docker build --build-context model=PATH); or, with TINY=1 and neither of those, Kiln's tiny
# random-weight model (`kiln build --tiny`, native only). The hub token is read from the build secret
# `hf_token` (docker build --secret id=hf_token,env=HF_TOKEN) and lives only in this process's
# environment: it is never written to a layer, an ENV or an ARG.
set -eu

backend="$1"
output="$2"

if [ -n "${MODEL:-}" ]; then
    checkpoint="$MODEL"
elif [ -f "${MODEL_DIR:-/model}/config.json" ]; then
    checkpoint="${MODEL_DIR:-/model}"
elif [ "${TINY:-}" = 1 ] && [ "$backend" = native ]; then
    checkpoint="--tiny"
else
    echo "build-engine: set --build-arg MODEL=<hub id>, pass --build-context model=<checkpoint dir>," \
        "or (native and cpu targets) --build-arg TINY=1 for the tiny random-weight model" >&2
    exit 2
fi
if [ "${TINY:-}" = 1 ] && [ "$checkpoint" != "--tiny" ]; then
    echo "build-engine: TINY=1 and a checkpoint ($checkpoint): give one of them" >&2
    exit 2
fi

token_file="${HF_TOKEN_FILE:-/run/secrets/hf_token}"
if [ -f "$token_file" ]; then
    HF_TOKEN="$(cat "$token_file")"
    export HF_TOKEN
fi

set -- kiln build "$checkpoint" -o "$output" --backend "$backend" \
    --dtype "${DTYPE:-float16}" \
    --max-batch-size "${MAX_BATCH_SIZE:-64}" \
    --max-num-tokens "${MAX_NUM_TOKENS:-8192}"
[ -n "${MAX_SEQ_LEN:-}" ] && set -- "$@" --max-seq-len "$MAX_SEQ_LEN"
[ -n "${SERVED_MODEL_NAME:-}" ] && set -- "$@" --served-model-name "$SERVED_MODEL_NAME"
if [ "$backend" = trtllm ]; then
    set -- "$@" --tp-size "${TP_SIZE:-1}"
    [ -n "${QUANTIZATION:-}" ] && set -- "$@" --quantization "$QUANTIZATION"
    [ -n "${CALIB_DATASET:-}" ] && set -- "$@" --calib-dataset "$CALIB_DATASET"
    [ -n "${CALIB_SIZE:-}" ] && set -- "$@" --calib-size "$CALIB_SIZE"
fi

echo "build-engine: $*" >&2
exec "$@"
