# syntax=docker/dockerfile:1-labs
# Kiln serving images. Three targets:
#   trtllm (default)  TensorRT-LLM engine baked in, on NVIDIA's TensorRT-LLM release image
#   native            Kiln's own PyTorch engine baked in, on a plain PyTorch CUDA image
#   cpu               Kiln's own engine on the CPU, with PyTorch's CPU build, on a plain Python image
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
# Any Debian-family image with Python 3.11 and its venv module: CI builds one from the Debian mirror
# (tests/container/) and passes it here.
ARG CPU_IMAGE=python:3.11-slim-bookworm

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
ARG TINY=""
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

# ===================================================================================================
# The CPU image: no GPU to build or run it, and no CUDA libraries in it. Built and started in CI with the
# tiny random-weight model (tests/container/test_cpu_image.py):
#   docker build --target cpu --build-arg TINY=1 \
#       --secret id=pip_cert,src=/etc/ssl/certs/ca-certificates.crt -t kiln:cpu-tiny .
#   docker run --stop-timeout 40 -p 8000:8000 kiln:cpu-tiny
FROM ${CPU_IMAGE} AS cpu-base
# PATH spelled out: an image made by `docker import` has no PATH of its own to extend.
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Where pip looks: build arguments, never ENV, so they stay out of the image's environment (they do show
# in `docker history`: no credentials in them). By default torch's CPU build comes from PyTorch's index;
# a mirror or proxy goes in PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / PIP_FIND_LINKS.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST
WORKDIR /opt/kiln
COPY docker/requirements-cpu.lock docker/
# The CA bundle of a TLS-intercepting proxy reaches pip as the build secret `pip_cert`, mounted for this
# one step and never written to a layer. Everything is pinned (torch too): --no-deps, and `pip check`
# fails the build if a pin is missing.
RUN --mount=type=secret,id=pip_cert,required=false \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi \
    && python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-deps -r docker/requirements-cpu.lock \
    && pip check
COPY pyproject.toml README.md ./
COPY kiln ./kiln
COPY docker/build-engine.sh docker/healthcheck.py docker/check_requirements.py docker/
# setuptools is in the venv already (torch needs it): no build environment to download.
RUN pip install --no-deps --no-build-isolation . && python3 docker/check_requirements.py

FROM cpu-base AS cpu-build
ARG MODEL=""
# TINY=1: Kiln's tiny random-weight model (`kiln build --tiny`), for smoke tests; no checkpoint needed.
ARG TINY=""
ARG DTYPE=float32
ARG MAX_BATCH_SIZE=16
# hadolint ignore=DL3064
ARG MAX_NUM_TOKENS=2048
ARG MAX_SEQ_LEN=""
ARG SERVED_MODEL_NAME=""
RUN --mount=type=secret,id=hf_token,required=false \
    --mount=type=bind,from=model,target=/model \
    --mount=type=cache,target=/root/.cache/huggingface \
    docker/build-engine.sh native /engine

FROM cpu-base AS cpu
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/kiln --shell /usr/sbin/nologin kiln
COPY --from=cpu-build --chown=10001:10001 /engine /engine
ENV KILN_MODEL=/engine \
    KILN_HOST=0.0.0.0 \
    KILN_PORT=8000 \
    KILN_DEVICE=cpu \
    HF_HUB_OFFLINE=1
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "/opt/kiln/docker/healthcheck.py"]
# Exec form: kiln is PID 1 and gets `docker stop`'s SIGTERM. Give `docker stop` (default: 10 s) more time
# than the drain (KILN_DRAIN_TIMEOUT_SECONDS, 30 s): `docker run --stop-timeout 40` or `docker stop -t 40`.
ENTRYPOINT ["kiln", "serve"]

# `docker build .` without --target builds the TensorRT-LLM image.
FROM trtllm
