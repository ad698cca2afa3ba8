#!/bin/sh
# The daemon's entry point (deploy/docker-compose.yml and the ECS daemon service): sets the `gpu` pool's limit, the
# number of lens_classifier training jobs that may hold a GPU at once, then runs the daemon. A pool's own limit lives
# in the instance's database, not in dagster.yaml; setting it here makes the deployment's value the one in force
# after every deploy (a limit changed in the UI lasts until the daemon restarts).
set -eu
: "${DAGSTER_GPU_POOL_LIMIT:?DAGSTER_GPU_POOL_LIMIT is not set: how many training jobs (GPUs) may run at once}"
dagster instance concurrency set gpu "$DAGSTER_GPU_POOL_LIMIT"
exec dagster-daemon run "$@"
