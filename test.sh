#!/usr/bin/env bash
# Install what the tests need and run them all: lint, then every test including the slow ones.
# Extra arguments go to pytest (e.g. ./test.sh -k tiled).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh requirements-dev.txt
# Debian packages some tests need: installed when missing (as root), otherwise those tests skip and say why.
need_deb() {  # need_deb <package> <what it is for> <command that succeeds when it is installed>
  local package=$1 purpose=$2
  shift 2
  if ! "$@" >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "Installing $package for $purpose …"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null) \
        || echo "$package could not be installed: $purpose will skip"
    else
      echo "$package is not installed (apt-get install $package): $purpose will skip"
    fi
  fi
}
# the store tests also run against a real PostgreSQL server, started by the tests on a loopback port
need_deb postgresql "the PostgreSQL store tests" compgen -G "/usr/lib/postgresql/*/bin/initdb"
# the browser tests drive Debian's Chromium with Playwright (Playwright's own browser download is not used)
need_deb chromium "the browser tests" command -v chromium
# the lab deployment test starts nginx (deploy/nginx/) in front of the app, with TLS and WebSockets
need_deb nginx-light "the reverse-proxy deployment test" command -v nginx
.venv/bin/ruff check .
# two test processes (pytest-xdist), a whole test file to each at a time (a file's tests share its servers);
# $NEUROSEG_TEST_WORKERS changes the count (0: one process, as plain pytest)
exec .venv/bin/python -m pytest --run-slow -n "${NEUROSEG_TEST_WORKERS:-2}" --dist loadfile "$@"
