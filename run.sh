#!/usr/bin/env bash
# Start Neuroseg on its embedded defaults (SQLite and files in the local data directory), on
# http://localhost:8501. Extra arguments go to `streamlit run` (e.g. --server.port 8600).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh requirements.txt
exec .venv/bin/streamlit run web/asgi.py "$@"
