#!/usr/bin/env bash
# Install what the tests need and run them all: lint, then every test including the slow ones.
# Extra arguments go to pytest (e.g. ./test.sh -k tiled).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh requirements-dev.txt
.venv/bin/ruff check .
exec .venv/bin/python -m pytest --run-slow "$@"
