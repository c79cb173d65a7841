#!/usr/bin/env bash
# Idempotent environment set-up: .venv/ at the repository root with the pinned stack and camserve
# itself (editable, which also installs the `camserve` command), then the model archives.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.camserve-requirements
if [ ! -f "$stamp" ] || ! cmp -s requirements.txt "$stamp"; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch==2.14.1 is pinned so pip takes the registry build, never a local 2.13.0+cpu wheel
  .venv/bin/python -m pip install --quiet -r requirements.txt
  cp requirements.txt "$stamp"
fi
.venv/bin/python -m pip install --quiet --no-deps -e .
if [ "${CAMSERVE_SKIP_ARCHIVES:-0}" != 1 ]; then
  ./archive.sh
fi
