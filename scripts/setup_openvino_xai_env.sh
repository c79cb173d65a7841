#!/usr/bin/env bash
# The peer environment of the camserve-vs-OpenVINO-XAI benchmark (benchmarks/peer/README.md):
# .venv-ovxai/ at the repository root with openvino-xai 1.1.0 and its pins (openvino 2024.4.0,
# numpy 1.26.4), from benchmarks/peer/requirements-ovxai.txt. Separate from the main .venv/ (which has
# numpy 2 and openvino 2026), which this script never touches. Idempotent: does nothing when the
# installed pins already match the requirements file (stamp .venv-ovxai/.requirements).
# PYTHON=python3.11 by default (openvino 2024.4 has wheels for 3.8-3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv-ovxai
REQ=benchmarks/peer/requirements-ovxai.txt
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.requirements"
if [ ! -f "$stamp" ] || ! cmp -s "$REQ" "$stamp"; then
  # registry wheels only; pip prints "Location ... is ignored" for the local mirrors it lacks: harmless
  "$VENV/bin/python" -m pip install --quiet -r "$REQ" 2> >(grep -v "is ignored: it is neither a file" >&2)
  "$VENV/bin/python" - <<'EOF'
import numpy, openvino, openvino_xai  # noqa: F401  - the three the worker needs
assert numpy.__version__.startswith("1."), numpy.__version__
assert openvino.__version__.startswith("2024.4"), openvino.__version__
EOF
  cp "$REQ" "$stamp"
fi
"$VENV/bin/python" -c "import importlib.metadata as m, openvino, numpy; print('.venv-ovxai: openvino-xai', m.version('openvino-xai'), '| openvino', openvino.__version__.split('-')[0], '| numpy', numpy.__version__)"
