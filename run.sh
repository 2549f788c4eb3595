#!/usr/bin/env bash
# Start Neuroseg on its embedded defaults (SQLite and files in the local data directory), on
# http://localhost:8501. Extra arguments go to `streamlit run` (e.g. --server.port 8600).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh requirements.txt
# uvicorn believes X-Forwarded-For from loopback peers unless told otherwise: only behind the proxy may it
if [ "${NEUROSEG_BEHIND_PROXY:-}" != "1" ]; then export FORWARDED_ALLOW_IPS=""; fi
exec .venv/bin/streamlit run web/asgi.py "$@"
