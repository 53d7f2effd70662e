#!/usr/bin/env bash
# Set up (idempotent), lint, check formatting and types, and run the whole test suite on real components: the
# tests start their own redis-server, S3 server (moto), gateway and Celery worker processes on free ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash scripts/typecheck.sh
exec .venv/bin/python -m pytest -q "$@"
