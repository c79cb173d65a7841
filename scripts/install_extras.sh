#!/usr/bin/env bash
# Idempotent: installs the optional extras (requirements-extras.txt: timm, transformers, safetensors,
# pyarrow, and the scale-out engines) into .venv so that their tests run. ./run_tests.sh calls it;
# ./setup.sh does not need them.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.camserve-extras
if [ ! -f "$stamp" ] || ! cmp -s requirements-extras.txt "$stamp"; then
  # -c requirements.txt: the extras may not move a pinned package (torch, numpy, …)
  .venv/bin/python -m pip install --quiet -r requirements-extras.txt -c requirements.txt
  cp requirements-extras.txt "$stamp"
fi
