# syntax=docker/dockerfile:1.7
# The base every driftlab stage image builds FROM: Python, PyTorch, the pinned core runtime
# dependencies (what shared/ imports; each stage image adds its own extra's pins) and
# driftlab's shared code, built once per variant (`make images`).
#
#   docker build -f deploy/docker/base.Dockerfile -t driftlab/driftlab-base:TAG-gpu .
#   docker build -f deploy/docker/base.Dockerfile --build-arg VARIANT=cpu -t driftlab/driftlab-base:TAG-cpu .
#
# VARIANT=gpu (default): PyTorch's official CUDA runtime image. VARIANT=cpu: slim Python with
# the CPU wheel of the same PyTorch, for kind clusters and machines without GPUs.
ARG VARIANT=gpu
ARG TORCH_VERSION=2.9.1

FROM pytorch/pytorch:${TORCH_VERSION}-cuda12.8-cudnn9-runtime AS torch-gpu

FROM python:3.11.13-slim-bookworm AS torch-cpu
ARG TORCH_VERSION
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}"

FROM torch-${VARIANT} AS base
# Read-only root filesystem on the cluster: everything that caches writes under /tmp (an
# emptyDir), and Python writes no bytecode next to the code.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    HF_HOME=/tmp/.cache/huggingface \
    MPLCONFIGDIR=/tmp/.cache/matplotlib \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    PYTHONPATH=/app
COPY deploy/docker/requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt
# The stage contract, store, telemetry and bookkeeping tasks every stage imports: shared/
# imports nothing above it, so no image needs workflows/ or the CLI.
WORKDIR /app
COPY shared/ /app/shared/
COPY services/__init__.py /app/services/__init__.py
# A fixed numeric uid, so the kubelet can check runAsNonRoot without reading /etc/passwd.
RUN groupadd --gid 10001 driftlab \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin driftlab
USER 10001:10001
