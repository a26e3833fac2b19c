#!/usr/bin/env bash
# The test command: install into .venv if needed, lint, then run every test (unit and end-to-end against a real
# MLflow server that the tests start on localhost).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup-venv.sh
export MLFLOW_DISABLE_TELEMETRY=true
.venv/bin/ruff check trainer tests
.venv/bin/python -m pytest "$@"
