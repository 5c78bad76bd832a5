#!/usr/bin/env bash
# Train the `tiny` demo model end to end on CPU and write assets/demo/{weights,rtm,curves,MODEL_CARD.md}.
#
#   bash scripts/train_demo.sh            # RUN=runs/demo PYTHON=.venv/bin/python by default
#
# Stages: init-weights -> train-autoencoder -> train-grm -> train-classifier -> build-rtm -> train-patchdit,
# each one a `patchscaler` subcommand on a local Ray (one Ray Train worker with 2 CPUs). Every stage
# resumes if rerun. The images are the bundled public-domain / CC0 ones (assets/LICENSES.md); re-create
# them with scripts/prepare_demo_assets.py. Steps are sized for about an hour on a busy 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/demo}
CPUS=${CPUS:-2}
cli() { "$PY" -m jobs.cli "$@"; }
start=$(date +%s)
common=(--cpus-per-worker "$CPUS" --log-every 10 --lr-schedule cosine --warmup-steps 50)

[ -f "$RUN/init/config.json" ] || cli init-weights --preset tiny --out "$RUN/init" --seed 0

# The autoencoder learns from photos only, with random colours (five photos hold few of them).
cli train-autoencoder --init "$RUN/init" --out "$RUN/ae" --data assets/train --color-augment \
  --steps 1000 --batch-size 8 --crop 64 --crops-per-image 4 --lr 2e-3 --checkpoint-every 250 "${common[@]}"

cli train-grm --init "$RUN/ae" --out "$RUN/grm" --data assets/train --color-augment \
  --steps 500 --batch-size 8 --crop 128 --crops-per-image 4 --lr 1e-3 --checkpoint-every 100 "${common[@]}"

cli train-classifier --init "$RUN/grm" --out "$RUN/cls" --data assets/textures \
  --steps 200 --batch-size 32 --crop 128 --crops-per-image 8 --lr 1e-3 --checkpoint-every 100 "${common[@]}"

[ -f "$RUN/rtm/manifest.json" ] || cli build-rtm --source textures=assets/textures --out "$RUN/rtm" \
  --weights "$RUN/cls" --candidates 1000 --entries 256 --seed 0 --device cpu --no-progress

cli train-patchdit --init "$RUN/cls" --out "$RUN/final" --data assets/train --rtm "$RUN/rtm" --color-augment \
  --steps 800 --batch-size 8 --crop 128 --crops-per-image 4 --lr 5e-4 --checkpoint-every 100 "${common[@]}"

# Ship: the checkpoint (no optimizer state), the RTM artifact, the loss curves and the model card.
rm -rf assets/demo/weights assets/demo/rtm assets/demo/curves
mkdir -p assets/demo/weights assets/demo/rtm assets/demo/curves
cp "$RUN/final/config.json" "$RUN/final/model.safetensors" assets/demo/weights/
find "$RUN/rtm" -maxdepth 1 -type f -exec cp {} assets/demo/rtm/ \;
for stage in ae grm cls final; do cp "$RUN/$stage/loss_curve.png" "assets/demo/curves/$stage.png"; done
minutes=$(( ($(date +%s) - start) / 60 ))
"$PY" scripts/demo_card.py --runs "$RUN" --wall-minutes "$minutes"
du -sh assets/demo
