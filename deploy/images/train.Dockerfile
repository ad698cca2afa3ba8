# syntax=docker/dockerfile:1
# The training task (ECS, GPU capacity provider): `python -m lens_assets.resources.train_remote` under Dagster
# Pipes, which pulls its inputs from the S3 store and pushes checkpoints back. CUDA comes with the locked torch build
# (torch's CUDA 13 wheels and the nvidia-* runtime libraries of deploy/requirements/lock.txt); the host's driver is
# mounted by the NVIDIA container runtime of the ECS GPU AMI, which NVIDIA_REQUIRE_CUDA checks before the task
# starts. No secret is baked in (the task role gives S3 access). Build from the repository root:
#   docker build -f deploy/images/train.Dockerfile -t lens-train .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/requirements/lock.txt /tmp/requirements/lock.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements/lock.txt
COPY pyproject.toml README.md /src/
COPY lens_assets /src/lens_assets
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /src

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LENS_CACHE_DIR=/opt/train/cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/train --shell /usr/sbin/nologin train \
    && mkdir -p /opt/train/cache \
    && chown -R train:train /opt/train
COPY --from=build /opt/venv /opt/venv
WORKDIR /opt/train
USER 10001:10001
CMD ["python", "-m", "lens_assets.resources.train_remote"]
