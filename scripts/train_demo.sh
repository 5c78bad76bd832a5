#!/usr/bin/env bash
# Train the `tiny` demo model end to end on CPU and write assets/demo/{weights,rtm,curves,MODEL_CARD.md}.
#
#   bash scripts/train_demo.sh            # RUN=runs/demo DATA=data/demo PYTHON=.venv/bin/python by default
#
# Data: the photographs of Debian's wallpaper packages, fetched once by scripts/fetch_demo_data.py
# (data/demo: photos/ to train on, val/ for the GRM's group calibration, illustrations/ for the RTM;
# the held-out test photographs are never trained on). Textures for the classifier: assets/textures.
#
# Stages: init-weights -> train-autoencoder -> train-grm (+ gamma calibration on val/) -> train-classifier
# -> build-rtm -> train-patchdit, each one a `patchscaler` subcommand on a local Ray (one Ray Train worker
# with CPUS CPUs). Every stage resumes if rerun (a finished stage is skipped). Sized for about 1.5-2 hours
# of wall time on 2 cores (docs/training.md has the measured times). Smoke test of the recipe:
#   RUN=/tmp/smoke SHIP=0 AE_STEPS=20 GRM_STEPS=10 CLS_STEPS=10 RTM_CANDIDATES=300 DIT_STEPS=10 bash scripts/train_demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
RUN=${RUN:-runs/demo}
DATA=${DATA:-data/demo}
CPUS=${CPUS:-2}
cli() { "$PY" -m jobs.cli "$@"; }
start=$(date +%s)
common=(--cpus-per-worker "$CPUS" --log-every 20 --lr-schedule cosine --warmup-steps 50)

[ -d "$DATA/photos" ] || "$PY" scripts/fetch_demo_data.py --out "$DATA"
[ -f "$RUN/init/config.json" ] || cli init-weights --preset tiny --out "$RUN/init" --seed 0

# Autoencoder: MSE (chosen over L1 and MSE + FFT by measurement, docs/training.md), photos + illustrations.
# AE_FROM=assets/demo/weights keeps an already trained autoencoder instead (it sees clean HR crops only, so
# a change of the degradation range does not touch it) and saves its 30 minutes.
if [ -n "${AE_FROM:-}" ]; then
  [ -f "$RUN/ae/reused.json" ] || "$PY" scripts/reuse_autoencoder.py --init "$RUN/init" --source "$AE_FROM" \
    --out "$RUN/ae"
else
cli train-autoencoder --init "$RUN/init" --out "$RUN/ae" --data "$DATA/photos" --data "$DATA/illustrations" \
  --recon-loss "${AE_LOSS:-mse}" --steps "${AE_STEPS:-2500}" --batch-size 16 --crop 64 \
  --crops-per-image 8 --lr 1e-3 --checkpoint-every 500 "${common[@]}"
fi

# GRM (Eq. 1/8) on Real-ESRGAN-degraded photos; gamma1/gamma2 calibrated on the validation photos.
cli train-grm --init "$RUN/ae" --out "$RUN/grm" --data "$DATA/photos" --val-data "$DATA/val" \
  --steps "${GRM_STEPS:-2000}" --batch-size 8 --crop 128 --crops-per-image 4 --lr 1e-3 \
  --checkpoint-every 500 "${common[@]}"

# Texture classifier on the DTD-layout textures: one latent patch (16 x f = 64 px) per crop.
cli train-classifier --init "$RUN/grm" --out "$RUN/cls" --data assets/textures \
  --steps "${CLS_STEPS:-300}" --batch-size 32 --crop 64 --crops-per-image 8 --lr 1e-3 --checkpoint-every 300 \
  "${common[@]}"

[ -f "$RUN/rtm/manifest.json" ] || cli build-rtm --source photos="$DATA/photos" \
  --source illustrations="$DATA/illustrations:0.5" --source textures=assets/textures:0.5 --out "$RUN/rtm" \
  --weights "$RUN/cls" --candidates "${RTM_CANDIDATES:-2000}" --entries 256 --seed 0 --device cpu --no-progress

# Patch-DiT + texture encoder (v-prediction), every 16x16 window of each crop, t on PGS's time grid.
cli train-patchdit --init "$RUN/cls" --out "$RUN/final" --data "$DATA/photos" --rtm "$RUN/rtm" \
  --t-sampling sampler --steps "${DIT_STEPS:-1500}" --batch-size 8 --crop 128 --crops-per-image 4 \
  --lr 1e-3 --checkpoint-every 250 "${common[@]}"

[ "${SHIP:-1}" = 1 ] || exit 0
# Ship: the checkpoint (no optimizer state), the RTM artifact, the loss curves and the model card.
rm -rf assets/demo/weights assets/demo/rtm
[ -n "${AE_FROM:-}" ] || rm -rf assets/demo/curves
mkdir -p assets/demo/weights assets/demo/rtm assets/demo/curves
cp "$RUN/final/config.json" "$RUN/final/model.safetensors" assets/demo/weights/
# the RTM without its candidate pool (candidates.parquet, 16 MB: only `build-rtm --add-source` reads it)
find "$RUN/rtm" -maxdepth 1 -type f ! -name candidates.parquet -exec cp {} assets/demo/rtm/ \;
for stage in ae grm cls final; do
  # a reused autoencoder keeps the curve of its own training (the one shipped with it)
  if [ -f "$RUN/$stage/loss_curve.png" ]; then cp "$RUN/$stage/loss_curve.png" "assets/demo/curves/$stage.png"; fi
done
minutes=$(( ($(date +%s) - start) / 60 ))
"$PY" scripts/demo_card.py --runs "$RUN" --data "$DATA" --wall-minutes "$minutes"
du -sh assets/demo
