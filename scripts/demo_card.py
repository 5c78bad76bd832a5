"""Write ``assets/demo/MODEL_CARD.md``: data, steps, time, hardware and held-out quality vs bicubic.

    python scripts/demo_card.py --runs runs/demo [--weights assets/demo/weights --rtm assets/demo/rtm]

Reads each stage's ``training_state.json`` under ``--runs`` (ae, grm, cls, final) and measures the shipped
weights on ``assets/heldout`` with ``trainer.heldout.measure_heldout`` (the test suite repeats that
measurement and compares it with the JSON block this script writes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from patchscaler.weights import load_checkpoint, load_training_state
from trainer.heldout import measure_heldout

ROOT = Path(__file__).resolve().parent.parent
STAGES = (("ae", "train-autoencoder"), ("grm", "train-grm"), ("cls", "train-classifier"),
          ("final", "train-patchdit"))
MARK_BEGIN, MARK_END = "<!-- heldout-metrics:begin -->", "<!-- heldout-metrics:end -->"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _stage_rows(runs: Path) -> tuple[list[str], float]:
    rows, total = [], 0.0
    for folder, command in STAGES:
        _, state = load_training_state(str(runs / folder))
        cfg = state.get("config", {})
        hist = state["history"]
        total += state["seconds"]
        rows.append(
            f"| `{command}` | {state['step']} | {cfg.get('batch_size', '?')} × {cfg.get('crop', '?')} px | "
            f"{cfg.get('lr', '?')} ({cfg.get('lr_schedule', 'constant')}) | "
            f"{hist[0][1]:.4g} → {hist[-1][1]:.4g} | "
            f"{state['seconds'] / 60:.1f} min |"
        )
    return rows, total


def _pair(scores: dict[str, float]) -> str:
    return f"{scores['psnr']:.2f} / {scores['ssim']:.4f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="the RUN folder of scripts/train_demo.sh")
    p.add_argument("--weights", default=str(ROOT / "assets/demo/weights"))
    p.add_argument("--rtm", default=str(ROOT / "assets/demo/rtm"))
    p.add_argument("--out", default=str(ROOT / "assets/demo/MODEL_CARD.md"))
    p.add_argument("--wall-minutes", type=float, default=None, help="wall time of the whole script")
    args = p.parse_args()

    runs = Path(args.runs)
    model = load_checkpoint(args.weights)
    counts = model.parameter_counts()
    rtm_manifest = json.loads((Path(args.rtm) / "manifest.json").read_text())
    counts_rtm = rtm_manifest.get("counts", {})
    result = measure_heldout(args.weights, args.rtm, heldout=str(ROOT / "assets/heldout"),
                             samples=str(ROOT / "assets/samples"))
    rows, train_seconds = _stage_rows(runs)
    size_mb = sum(f.stat().st_size for d in (args.weights, args.rtm) for f in Path(d).iterdir()) / 1e6
    per_image = [f"| {name} | {_pair(r['bicubic'])} | {_pair(r['model'])} |"
                 for name, r in result["images"].items()]
    n_train = len(list((ROOT / "assets/train").iterdir()))
    breakdown = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
    mean = result["mean"]
    wall = f"{args.wall_minutes:.0f} min" if args.wall_minutes else "see the training table"
    text = f"""# PatchScaler `tiny` demo model

**This is a demonstration model, not the paper's quality.** It exists so that every part of the
method (autoencoder, GRM, texture classifier, RTM, Patch-DiT with PGS) runs with weights this project
trained and may ship. It was trained for minutes on a 2-core CPU on {n_train} photographs and a
few textures; the paper trains 875M parameters for 500K iterations on LSDIR with
8 V100s. Expect blurry, sometimes discoloured output that scores below plain bicubic interpolation.

## Model

- Preset `tiny` ({sum(counts.values()) / 1e6:.2f}M parameters: {breakdown}),
  ×{model.config.scale}, latent scaling factor {model.config.autoencoder.scaling_factor:.4f} (1 / std of the
  trained autoencoder's latents).
- Weights `assets/demo/weights` (version `{model.version}`), RTM `assets/demo/rtm` (version
  `{rtm_manifest.get('version')}`, {counts_rtm.get('entries', '?')} entries); {size_mb:.1f} MB in all.
- Everything was trained by `scripts/train_demo.sh` (a copy of each stage's `loss_curve.png` is in
  `assets/demo/curves/`).

## Data

- HR training images (autoencoder, GRM, Patch-DiT): `assets/train/` — astronaut, rocket, Hubble deep
  field, retina, text (scikit-image samples, public domain / CC0; `assets/LICENSES.md`). LR inputs are
  synthesised on the fly with the Real-ESRGAN degradation pipeline (×4).
- Textures (classifier, RTM): `assets/textures/`, a DTD-layout folder with 11 of DTD's 47 classes: brick,
  grass and gravel photographs (CC0) and eight procedural textures.
- Held out (never trained on): `assets/heldout/` — chelsea, coffee, camera. Their LR versions
  `assets/samples/` were made with the same degradation pipeline (seeds 1234–1236).

## Training

| stage | steps | batch × crop | lr (schedule) | loss first → last | time |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Training time {train_seconds / 60:.1f} min in all (optimizer steps only; plus Ray start-up, RTM build and
measurement: {wall}). RTM: `patchscaler build-rtm` over the textures ({counts_rtm.get('candidates', '?')}
candidates, farthest point sampling).

Hardware: {_cpu_name()}, {os.cpu_count()} cores, no GPU, shared with other jobs (wall times are
inflated by them); torch {torch.__version__}, fp32.

## Quality on the held-out images (×4, PSNR dB / SSIM on the Y channel, pyiqa)

| image | bicubic | demo model (seed 0) |
|---|---|---|
{chr(10).join(per_image)}
| **mean** | **{_pair(mean['bicubic'])}** | **{_pair(mean['model'])}** |

The model is {'below' if mean['model']['psnr'] < mean['bicubic']['psnr'] else 'above'} bicubic in PSNR by
{abs(mean['model']['psnr'] - mean['bicubic']['psnr']):.2f} dB. The autoencoder alone bounds the quality:
it has seen only a few thousand crops of five images. Measured by `trainer.heldout.measure_heldout`;
`tests/test_demo_weights.py` re-measures and checks these numbers:

{MARK_BEGIN}
```json
{json.dumps(result, indent=1)}
```
{MARK_END}

## Intended use and limitations

Smoke tests, the README's first command, CI, and a template for training real models
(`docs/training.md`). Not for any real upscaling: train the `small` or `paper` preset on LSDIR/DIV2K and
DTD for that.
"""
    Path(args.out).write_text(text)
    print(json.dumps({"card": args.out, "mean": mean}))


if __name__ == "__main__":
    main()
