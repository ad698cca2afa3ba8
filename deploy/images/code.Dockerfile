# syntax=docker/dockerfile:1
# The code server of the lens_assets code location, and the run worker (ECS runs each run in a task of this image,
# with the command the EcsRunLauncher gives). Dependencies at the versions of deploy/requirements/lock.txt, the
# project itself without dependencies. No secret is baked in. Build from the repository root:
#   docker build -f deploy/images/code.Dockerfile -t lens-code .
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
    DAGSTER_HOME=/opt/dagster/dagster_home \
    PYTHONUNBUFFERED=1 \
    LENS_CACHE_DIR=/opt/dagster/app/.lens_cache
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/dagster --shell /usr/sbin/nologin dagster \
    && mkdir -p /opt/dagster/dagster_home /opt/dagster/app \
    && chown dagster:dagster /opt/dagster/dagster_home /opt/dagster/app
COPY --from=build /opt/venv /opt/venv
COPY deploy/dagster.yaml /opt/dagster/dagster_home/dagster.yaml
WORKDIR /opt/dagster/app
USER 10001:10001
EXPOSE 4000
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["dagster", "api", "grpc-health-check", "-p", "4000"]
CMD ["dagster", "code-server", "start", "-m", "lens_assets.definitions", "-h", "0.0.0.0", "-p", "4000", \
     "--location-name", "lens_assets"]
