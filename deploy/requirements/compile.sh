#!/usr/bin/env bash
# Regenerates deploy/requirements/lock.txt: the exact versions the images install (Python 3.11, Linux x86_64),
# resolved from pyproject.toml's dependencies plus deploy.in (dagster-postgres), held to the versions installed in
# .venv (the ones the test suite ran with). Run from the repository root after `make setup`:
#   deploy/requirements/compile.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
.venv/bin/uv pip freeze --python .venv/bin/python --exclude-editable | grep '==' > "$constraints"
.venv/bin/uv pip compile pyproject.toml deploy/requirements/deploy.in -c "$constraints" \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-annotate \
    --custom-compile-command "deploy/requirements/compile.sh" -o deploy/requirements/lock.txt
