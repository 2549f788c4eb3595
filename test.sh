#!/usr/bin/env bash
# Install what the tests need and run them all: lint, then every test including the slow ones.
# Extra arguments go to pytest (e.g. ./test.sh -k tiled).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh requirements-dev.txt
# The store tests also run against a real PostgreSQL server, which the tests start on a loopback port.
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing PostgreSQL for the store tests …"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
      || echo "PostgreSQL could not be installed: its tests will skip"
  else
    echo "PostgreSQL is not installed (apt-get install postgresql): its tests will skip"
  fi
fi
# The browser tests drive Debian's Chromium with Playwright (Playwright's own browser download is not used).
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing Chromium for the browser tests …"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "Chromium could not be installed: the browser tests will skip"
  else
    echo "Chromium is not installed (apt-get install chromium): the browser tests will skip"
  fi
fi
.venv/bin/ruff check .
exec .venv/bin/python -m pytest --run-slow "$@"
