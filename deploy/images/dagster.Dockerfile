# syntax=docker/dockerfile:1
# The webserver and the daemon (one image, two commands): Dagster, its PostgreSQL storage and dagster-aws, at the
# versions of deploy/requirements/lock.txt; no user code (the code image serves it over gRPC). No secret is baked in:
# the database password and AWS credentials come from the environment (compose) or the task role and Secrets
# Manager (ECS). Build from the repository root:
#   docker build -f deploy/images/dagster.Dockerfile -t lens-dagster .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
COPY deploy/requirements/lock.txt deploy/requirements/dagster.in /tmp/requirements/
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -c /tmp/requirements/lock.txt -r /tmp/requirements/dagster.in

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    PYTHONUNBUFFERED=1
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/dagster --shell /usr/sbin/nologin dagster \
    && mkdir -p /opt/dagster/dagster_home /opt/dagster/app \
    && chown dagster:dagster /opt/dagster/dagster_home
COPY --from=build /opt/venv /opt/venv
COPY deploy/dagster.yaml /opt/dagster/dagster_home/dagster.yaml
COPY deploy/workspace.yaml /opt/dagster/app/workspace.yaml
COPY --chmod=0755 deploy/images/start-daemon.sh /usr/local/bin/start-daemon
WORKDIR /opt/dagster/app
USER 10001:10001
EXPOSE 3000
# the daemon runs `start-daemon` instead (compose and the ECS task definition say so)
CMD ["dagster-webserver", "-h", "0.0.0.0", "-p", "3000", "-w", "/opt/dagster/app/workspace.yaml"]
