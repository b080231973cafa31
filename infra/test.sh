#!/usr/bin/env bash
# The test command: set up (idempotent), then run the suite. Services the tests need (SeaweedFS S3,
# a Prefect server) are started by the test session itself on 127.0.0.1 and stopped at its end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash infra/setup.sh
export PYTHONUNBUFFERED=1
# the slowest tests are printed so that a suite creeping past its ~15 minutes shows where
exec .venv/bin/python -m pytest -q -ra --durations=25 "$@"
