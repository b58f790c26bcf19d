# syntax=docker/dockerfile:1-labs
# Kiln serving images. Two targets:
#   trtllm (default)  TensorRT-LLM engine baked in, on NVIDIA's TensorRT-LLM release image
#   native            Kiln's own PyTorch engine baked in, on a plain PyTorch CUDA image
#
#   docker buildx build --allow device --target trtllm \
#       --build-arg MODEL=meta-llama/Llama-2-7b-chat-hf --secret id=hf_token,env=HF_TOKEN -t kiln:llama2-trt .
#   docker run --gpus all -p 8000:8000 kiln:llama2-trt
#
# The checkpoint is --build-arg MODEL=<hub id> or a local directory: --build-context model=<dir>.
# A TensorRT engine must be built on the GPU model it will serve on, so the trtllm build stage needs a
# GPU: `RUN --device` (Dockerfile labs syntax, BuildKit >= 0.20 with the NVIDIA CDI spec) plus
# `buildx build --allow device`. Without that, build the engine with `docker run --gpus all` and pass it
# in: --build-context engine=<engine dir>, which replaces the build stage. See docs/deploy.md.

ARG TRTLLM_IMAGE=nvcr.io/nvidia/tensorrt-llm/release:1.2.0
ARG TORCH_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime

# An empty default for the `model` build context; --build-context model=<dir> replaces it.
FROM scratch AS model

# ---------------------------------------------------------------------------------------------------
FROM ${TRTLLM_IMAGE} AS trtllm-base
# The release image adds TensorRT's libraries to the path in /etc/bash.bashrc, which RUN and an
# exec-form ENTRYPOINT never read.
ENV LD_LIBRARY_PATH=/usr/local/tensorrt/lib:${LD_LIBRARY_PATH} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/kiln
COPY docker/requirements-trtllm.lock docker/
RUN pip install -r docker/requirements-trtllm.lock
COPY pyproject.toml README.md ./
COPY kiln ./kiln
COPY docker/build-engine.sh docker/healthcheck.py docker/check_requirements.py docker/
# tensorrt_llm pins torch/transformers; Kiln takes them as they are, and the check fails the build if
# they do not satisfy Kiln's ranges.
RUN pip install --no-deps . && python3 docker/check_requirements.py

# ---------------------------------------------------------------------------------------------------
FROM trtllm-base AS engine-build
ARG MODEL=""
ARG DTYPE=float16
ARG MAX_BATCH_SIZE=64
# hadolint ignore=DL3064
ARG MAX_NUM_TOKENS=8192
ARG MAX_SEQ_LEN=""
ARG QUANTIZATION=""
ARG CALIB_DATASET=""
ARG CALIB_SIZE=""
ARG TP_SIZE=1
ARG SERVED_MODEL_NAME=""
# hadolint ignore=SC2215
RUN --device=nvidia.com/gpu=all \
    --mount=type=secret,id=hf_token,required=false \
    --mount=type=bind,from=model,target=/model \
    --mount=type=cache,target=/root/.cache/huggingface \
    docker/build-engine.sh trtllm /engine

# The engine directory alone; --build-context engine=<dir> replaces this stage with a prebuilt engine.
FROM scratch AS engine
COPY --from=engine-build /engine /

# ---------------------------------------------------------------------------------------------------
FROM trtllm-base AS trtllm
# A home directory: tensorrt_llm, triton and torch write caches under $HOME.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/kiln --shell /usr/sbin/nologin kiln
COPY --from=engine --chown=10001:10001 / /engine
ENV KILN_MODEL=/engine \
    KILN_HOST=0.0.0.0 \
    KILN_PORT=8000 \
    HF_HUB_OFFLINE=1
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "/opt/kiln/docker/healthcheck.py"]
# Exec form: kiln is PID 1, so `docker stop`'s SIGTERM reaches it directly and starts the drain.
ENTRYPOINT ["kiln", "serve"]

# ===================================================================================================
FROM ${TORCH_IMAGE} AS native-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /opt/kiln
COPY docker/requirements.lock docker/
RUN pip install -r docker/requirements.lock
COPY pyproject.toml README.md ./
COPY kiln ./kiln
COPY docker/build-engine.sh docker/healthcheck.py docker/check_requirements.py docker/
RUN pip install --no-deps . && python3 docker/check_requirements.py

FROM native-base AS native-build
ARG MODEL=""
ARG DTYPE=bfloat16
ARG MAX_BATCH_SIZE=64
# hadolint ignore=DL3064
ARG MAX_NUM_TOKENS=8192
ARG MAX_SEQ_LEN=""
ARG SERVED_MODEL_NAME=""
# The native build packs weights on the CPU: no GPU needed here.
RUN --mount=type=secret,id=hf_token,required=false \
    --mount=type=bind,from=model,target=/model \
    --mount=type=cache,target=/root/.cache/huggingface \
    docker/build-engine.sh native /engine

FROM native-base AS native
# A home directory: tensorrt_llm, triton and torch write caches under $HOME.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/kiln --shell /usr/sbin/nologin kiln
COPY --from=native-build --chown=10001:10001 /engine /engine
ENV KILN_MODEL=/engine \
    KILN_HOST=0.0.0.0 \
    KILN_PORT=8000 \
    HF_HUB_OFFLINE=1
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "/opt/kiln/docker/healthcheck.py"]
ENTRYPOINT ["kiln", "serve"]

# `docker build .` without --target builds the TensorRT-LLM image.
FROM trtllm
