#!/usr/bin/env bash
# The whole test suite: sets up .venv and the archives if needed, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")"
./scripts/setup_env.sh
./scripts/install_extras.sh    # optional extras (timm, transformers, pyarrow, …): their tests run too
./scripts/install_chromium.sh   # headless Chromium renders the batch HTML report in a test
./scripts/build_docs.sh          # the docs site, --strict: a broken link fails
exec .venv/bin/python -m pytest -q -rs "$@"
