# Sourced by run.sh and test.sh: make sure .venv exists (Python 3.11) and holds the packages of the
# requirements file given as $1. Re-installs only when that file (or one it includes) changed.
set -euo pipefail
req="$1"
PYTHON="${PYTHON:-python3.11}"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "Neuroseg needs Python 3.11 ($PYTHON not found). On Debian: apt-get install python3.11 python3.11-venv" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -m venv .venv; then
    rm -rf .venv
    echo "Could not create .venv. On Debian: apt-get install python3.11-venv" >&2
    exit 1
  fi
fi
stamp=".venv/.installed-$(basename "$req")"
want=$(cat requirements*.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "Installing $req into .venv (first run takes a few minutes) …"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$req"
  echo "$want" > "$stamp"
fi
