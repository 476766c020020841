# syntax=docker/dockerfile:1
# One image runs every ScratchLLM process: `db upgrade`, `api`, `worker` (see docs/DEPLOY.md).
#
#   docker build --target cuda -t scratchllm:cuda .   # NVIDIA GPUs, Linux x86_64 (the CUDA libraries
#                                                     # come inside torch's wheels; the host needs only
#                                                     # the driver and the NVIDIA Container Toolkit)
#   docker build --target cpu -t scratchllm:cpu .     # no GPU, a much smaller image
#
# torch is installed first and pinned, as `make install` does: the project's own `torch>=2.4,<3` is then
# already satisfied, so pip never swaps the chosen build for another one.

ARG TORCH_VERSION=2.13.0
# The CUDA build: PyPI's torch wheels for Linux x86_64 are CUDA builds. For a CUDA version matching an
# older driver pass e.g. --build-arg TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG TORCH_CUDA_INDEX_URL=https://pypi.org/simple
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM python:3.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# The project as a wheel: only what pyproject.toml packages.
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY core ./core
COPY serving ./serving
COPY app ./app
COPY worker ./worker
COPY scratchllm ./scratchllm
COPY migrations ./migrations
RUN python -m pip wheel --no-deps --wheel-dir /wheels .

# Virtual environments at /opt/venv, the path they keep in the runtime stages.
FROM base AS venv
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

FROM venv AS venv-cpu
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX_URL
RUN pip install --index-url "${TORCH_CPU_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels

FROM venv AS venv-cuda
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX_URL
RUN pip install --index-url "${TORCH_CUDA_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels

# What both targets share: an unprivileged user owning the data dir. A fresh named volume mounted on /data
# takes this ownership; a bind mount must be writable by uid 10001.
FROM base AS runtime
RUN groupadd --system --gid 10001 scratchllm \
    && useradd --system --uid 10001 --gid scratchllm --create-home --home-dir /home/scratchllm \
        --shell /usr/sbin/nologin scratchllm \
    && mkdir -p /data \
    && chown scratchllm:scratchllm /data
ENV PATH=/opt/venv/bin:$PATH \
    SCRATCHLLM_DATA_DIR=/data \
    TIKTOKEN_CACHE_DIR=/data/cache/tiktoken
WORKDIR /home/scratchllm
USER scratchllm
EXPOSE 8000
# Liveness of the API. Containers running `worker` or `db upgrade` should disable it (compose does).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=4).status != 200)"]
ENTRYPOINT ["scratchllm"]
CMD ["api", "--host", "0.0.0.0", "--port", "8000"]

FROM runtime AS cuda
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=venv-cuda /opt/venv /opt/venv

# The default target (last stage) is the small CPU image.
FROM runtime AS cpu
COPY --from=venv-cpu /opt/venv /opt/venv
