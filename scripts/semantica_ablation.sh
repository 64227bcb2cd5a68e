#!/usr/bin/env bash
# The Semantica ablation of README ("Same-page pairs against self-pairing"): one pair dataset from
# the real-photo test web, two models with the same preset, steps, seed and schedule (one trained on
# same-page pairs, one on reconstruction), one paired evaluation and the sample sheets of both.
# About 1.5 hours on 2 CPU cores; on a GPU pass TRAIN_FLAGS="--use-gpu" and larger STEPS/PRESET.
#   bash scripts/semantica_ablation.sh [OUT]   (default runs/ablation)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ablation}
PHOTOS=${PHOTOS:-../shared/data/photos-imagenet-sample}
STEPS=${STEPS:-1200}
PRESET=${PRESET:-small}
W=.venv/bin/webpairs
mkdir -p "$OUT"
cat > "$OUT/train.yaml" <<YAML
train:
  preset: $PRESET
  steps: $STEPS
  lr: 5.0e-4
  warmup: 20
  batch_size: 8
  seed: 0
  checkpoint_every: 200
  sample_every: 400
YAML
[ -f "$OUT/data/shards/_SUCCESS" ] || $W demo --out "$OUT/data" --photos "$PHOTOS" --pages 60 --topics 10 --no-train
for pairing in same-page self; do
  $W train "$OUT/data/shards" --out "$OUT/$pairing" --config "$OUT/train.yaml" --pairing "$pairing" ${TRAIN_FLAGS:-}
done
$W eval --compare "$OUT/same-page" "$OUT/self" --images "$PHOTOS" --topics 10 --samples-per-class 12 --steps 25 --guidance 3 0 --out "$OUT/compare.json"
# the same 4 condition images (files 1, 96, 186, 276 of the sorted folder: topics 0, 3, 6, 9), same seeds, both models
for pairing in same-page self; do
  for img in n01440764_tench.JPEG n01843065_jacamar.JPEG n02094114_Norfolk_terrier.JPEG n02116738_African_hunting_dog.JPEG; do
    $W sample variations "$OUT/$pairing" --image "$PHOTOS/$img" --n 6 --steps 25 --guidance 3 --out "$OUT/variations/$pairing/${img%.JPEG}"
  done
done
