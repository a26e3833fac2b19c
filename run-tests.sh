#!/usr/bin/env bash
# The test command: install into .venv if needed, lint, then run every test (unit and end-to-end against a real
# MLflow server that the tests start on localhost). Extra arguments go to pytest, e.g. -m "not e2e".
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh
export MLFLOW_DISABLE_TELEMETRY=true
.venv/bin/ruff check trainer tests
# Two workers (pytest-xdist), one per core of the 2-core machines this runs on; the slowest tests start first
# (tests/conftest.py). PYTEST_WORKERS=0 runs everything in this process.
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" "$@"
