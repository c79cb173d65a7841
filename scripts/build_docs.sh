#!/usr/bin/env bash
# Builds the documentation site (mkdocs.yml, docs/) into site/ (or $CAMSERVE_DOCS_SITE) with
# --strict: a broken link, a missing page or an unknown anchor fails the build. Idempotent: installs
# requirements-docs.txt (mkdocs, mkdocs-material) into .venv only when it changed. ./run_tests.sh
# calls it; ./setup.sh does not need it. Preview: .venv/bin/mkdocs serve
set -euo pipefail
export NO_MKDOCS_2_WARNING=1   # mkdocs-material 9.7+ prints an end-of-life banner on every build
cd "$(dirname "$0")/.."
stamp=.venv/.camserve-docs
if [ ! -f "$stamp" ] || ! cmp -s requirements-docs.txt "$stamp"; then
  # -c requirements.txt: the docs tools may not move a pinned package (pyyaml, requests, …)
  .venv/bin/python -m pip install --quiet -r requirements-docs.txt -c requirements.txt
  cp requirements-docs.txt "$stamp"
fi
# Not `--quiet`: in mkdocs 1.6 it drops the warnings before --strict counts them, so a broken link
# would pass. The build's log is shown only when it fails.
if ! log=$(.venv/bin/mkdocs build --strict --site-dir "${CAMSERVE_DOCS_SITE:-site}" 2>&1); then
  printf '%s\n' "$log" >&2
  echo "build_docs.sh: the docs site did not build (mkdocs --strict); see above" >&2
  exit 1
fi
