"""Write ``assets/demo/MODEL_CARD.md`` and its figures: data, steps, time, hardware, held-out quality on
both held-out sets (heavy, mild) and the gates of issues #10 and #16.

    python scripts/demo_card.py --runs runs/demo --data data/demo [--weights ... --rtm ...]
    python scripts/demo_card.py --note "$(cat notes.md)"   # same weights: keep the card's training facts

Reads each stage's ``training_log.json`` under ``--runs`` (ae, grm, cls, final) — without ``--runs``
the training section and figures of the existing card are kept (re-measuring the same weights) —,
measures the shipped weights on both held-out sets with ``trainer.heldout.measure_heldout`` (the test
suite repeats that measurement and compares it with the JSON block this script writes) and draws
``assets/demo/heldout.png`` and ``heldout_mild.png`` (LR | bicubic | GRM only | PatchScaler without and
with the colour fix | HR | group map).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
from pathlib import Path

import torch

from patchscaler.weights import load_checkpoint
from trainer.checkpoints import read_training_log
from trainer.heldout import figure_path, measure_heldout

ROOT = Path(__file__).resolve().parent.parent
STAGES = (("ae", "train-autoencoder"), ("grm", "train-grm"), ("cls", "train-classifier"),
          ("final", "train-patchdit"))
MARK_BEGIN, MARK_END = "<!-- heldout-metrics:begin -->", "<!-- heldout-metrics:end -->"
FIGURE = "heldout.png"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _reused_row(runs: Path, folder: str, command: str, card: str) -> str | None:
    """The existing card's row of a stage that this run reused (``scripts/reuse_autoencoder.py`` wrote
    ``reused.json``), marked as such; None when the stage was trained in this run."""
    reused = runs / folder / "reused.json"
    if not reused.exists():
        return None
    source = json.loads(reused.read_text())
    row = re.search(rf"^\| `{command}` \|.*\|$", card, re.M)
    if row is None:
        raise SystemExit(f"{runs / folder} was reused, but the existing card has no `{command}` row to keep")
    if "reused:" in row.group(0):  # a card re-rendered from the same runs: already marked
        return row.group(0)
    cells = row.group(0).rstrip("|").split("|")
    cells[-1] = (f" reused: trained in {cells[-1].strip()} for {source['source']} (version "
                 f"{source['source_version']}), 0 min in this run ")
    return "|".join(cells) + "|"


def _stage_rows(runs: Path, card: str = "") -> tuple[list[str], float, dict]:
    rows, total, calibration = [], 0.0, {}
    for folder, command in STAGES:
        kept = _reused_row(runs, folder, command, card)
        if kept is not None:  # its training time still counts in the model's total
            rows.append(kept)
            total += float(re.search(r"trained in ([\d.]+) min", kept).group(1)) * 60
            continue
        state = read_training_log(str(runs / folder))
        cfg = state.get("config", {})
        hist = state["history"]
        total += state["seconds"]
        calibration = state.get("calibration", calibration)
        extra = f", {cfg['recon_loss']}" if folder == "ae" else ""
        extra += f", t {cfg['t_sampling']}" if folder == "final" else ""
        rows.append(
            f"| `{command}` | {state['step']} | {cfg.get('batch_size', '?')} × {cfg.get('crop', '?')} px"
            f"{extra} | "
            f"{cfg.get('lr', '?')} ({cfg.get('lr_schedule', 'constant')}) | "
            f"{hist[0][1]:.4g} → {hist[-1][1]:.4g} | {state['seconds'] / 60:.1f} min |"
        )
    return rows, total, calibration


GATE_NAMES = {
    "model_psnr_y_vs_bicubic": "PatchScaler (adaptive PGS, seed 0, colour fix), PSNR-Y − bicubic (dB)",
    "grm_psnr_y_vs_bicubic": "GRM alone (decoded y_HR, no colour fix), PSNR-Y − bicubic (dB)",
    "model_color_shift_every_image": "PatchScaler, largest mean channel shift of any image (1/255)",
    "model_seam_ratio": "patch grid: mean luma step across patch borders / inside patches",
    "autoencoder_rgb_psnr": "autoencoder round trip, RGB PSNR (dB)",
    "grm_psnr_y_over_bicubic": "GRM alone, PSNR-Y − bicubic (dB)",
    "model_sharper_than_bicubic": "sharpness = gradient magnitude / HR's: [PatchScaler, bicubic]",
    "group_shares": "share of the held-out patches per group",
}


def _gate_rows(gates: dict, kind: str) -> list[str]:
    rows = []
    for k, g in gates.items():
        margin = f"{g['margin']:+.3g}" if "margin" in g else ""
        rows.append(f"| {kind} | {GATE_NAMES[k]} | {g['bar']} | {json.dumps(g['value'])} | {margin} | "
                    f"{'pass' if g['pass'] else '**FAIL**'} |")
    return rows


COLUMNS = (("bicubic", "bicubic"), ("grm", "GRM only"), ("fast", "refine none"),
           ("model_raw", "PatchScaler raw"), ("model", "PatchScaler"))
IMAGE_HEADER = ("| image | " + " | ".join(t for _, t in COLUMNS)
                + " | autoencoder RGB PSNR | sharpness bicubic / PatchScaler | colour shift raw → fixed"
                " | seam ratio |\n|---" + "|---" * (len(COLUMNS) + 4) + "|")


def _row(name: str, r: dict, bold: bool = False) -> str:
    b = "**" if bold else ""
    cells = [f"{b}{r[m]['psnr']:.2f} / {r[m]['ssim']:.3f}{b}" for m, _ in COLUMNS]
    return (f"| {b}{name}{b} | {' | '.join(cells)} | {r['autoencoder']['rgb_psnr']:.2f} | "
            f"{r['bicubic']['sharpness']:.2f} / {r['model']['sharpness']:.2f} | "
            f"{max(r['model_raw']['color_shift']):.1f} → {max(r['model']['color_shift']):.1f} | "
            f"{r['model']['seam_ratio']:.3f} |")


def _kept_training(card: str) -> tuple[str, float, int, str]:
    """(the training section, optimizer minutes, photographs, calibration JSON) of an existing card."""
    section = re.search(r"## Training\n(.*?)\n## Gates", card, re.S)
    minutes = re.search(r"trained in (\d+) minutes", card)
    photos = re.search(r"on (\d+) photographs;", card)
    calibration = re.search(r"about a third of the patches each: (\{.*?\})\.\n", card, re.S)
    if not (section and minutes and photos and calibration):
        raise SystemExit("the existing card has no training facts to keep; give --runs")
    return section.group(1).strip(), float(minutes.group(1)), int(photos.group(1)), calibration.group(1)


def _set_summary(kind: str, r: dict) -> str:
    m = r["mean"]
    return (f"{kind}: PatchScaler {m['model']['psnr'] - m['bicubic']['psnr']:+.2f} dB PSNR-Y against bicubic "
            f"(raw {m['model_raw']['psnr'] - m['bicubic']['psnr']:+.2f}), GRM alone "
            f"{m['grm']['psnr'] - m['bicubic']['psnr']:+.2f} dB, `--refine none` "
            f"{m['fast']['psnr'] - m['bicubic']['psnr']:+.2f} dB; largest channel shift of an image "
            f"{_largest_shift(r, 'model_raw'):.1f}/255 raw, {_largest_shift(r, 'model'):.1f}/255 with the "
            "colour fix")


def _largest_shift(r: dict, method: str) -> float:
    return max(max(x[method]["color_shift"]) for x in r["images"].values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=None,
                   help="the RUN folder of scripts/train_demo.sh (default: keep the card's training facts)")
    p.add_argument("--data", default=str(ROOT / "data" / "demo"), help="the DATA folder of train_demo.sh")
    p.add_argument("--weights", default=str(ROOT / "assets/demo/weights"))
    p.add_argument("--rtm", default=str(ROOT / "assets/demo/rtm"))
    p.add_argument("--out", default=str(ROOT / "assets/demo/MODEL_CARD.md"))
    p.add_argument("--wall-minutes", type=float, default=None, help="wall time of the whole script")
    p.add_argument("--cache", default=None,
                   help="cached PatchScaler outputs of the bench scripts (trainer.heldout.upscale_cached)")
    p.add_argument("--note", action="append", default=[],
                   help="a paragraph for the card's notes (e.g. what a failed gate would take); repeatable")
    p.add_argument("--notes", default=None, help="a Markdown file of notes, after the --note paragraphs")
    p.add_argument("--reuse-measurement", action="store_true",
                   help="re-render the text only: take the held-out figures from the existing card's JSON "
                        "block (same weights; the figures' PNGs are kept)")
    args = p.parse_args()

    model = load_checkpoint(args.weights)
    cfg = model.config
    counts = model.parameter_counts()
    rtm_manifest = json.loads((Path(args.rtm) / "manifest.json").read_text())
    counts_rtm = rtm_manifest.get("counts", {})
    figure = Path(args.out).parent / FIGURE
    if args.runs:
        old_card = Path(args.out).read_text() if Path(args.out).exists() else ""
        rows, train_seconds, calibration = _stage_rows(Path(args.runs), old_card)
        n_photos = len(list((Path(args.data) / "photos").glob("*.png"))) // 2
        wall = f"{args.wall_minutes:.0f} min" if args.wall_minutes else "see the training table"
        training = f"""| stage | steps | batch × crop | lr (schedule) | loss first → last | time |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Optimizer time {train_seconds / 60:.1f} min in all (a reused stage counted with its own training time); wall
time of this run of `scripts/train_demo.sh` (Ray start-ups, RTM build and this card included): {wall}.

Hardware: {_cpu_name()}, {os.cpu_count()} cores, no GPU, shared with other jobs; torch {torch.__version__},
fp32."""
        train_minutes, calibration_json = train_seconds / 60, json.dumps(calibration)
    else:
        training, train_minutes, n_photos, calibration_json = _kept_training(Path(args.out).read_text())
    if args.reuse_measurement:
        block = re.search(MARK_BEGIN + r"\s*```json\n(.*?)```", Path(args.out).read_text(), re.S)
        if block is None:
            raise SystemExit(f"{args.out} has no measurement to reuse")
        result = json.loads(block.group(1))
        if result["model_version"] != model.version:
            raise SystemExit(f"{args.out} measured weights {result['model_version']}, not {model.version}")
    else:
        result = measure_heldout(args.weights, args.rtm, heldout=str(ROOT / "assets/heldout"),
                                 samples=str(ROOT / "assets/samples"), figure=str(figure), cache=args.cache)
    size_mb = sum(f.stat().st_size for d in (args.weights, args.rtm) for f in Path(d).iterdir()) / 1e6
    breakdown = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items())
    sets = result["sets"]
    failed = [(kind, k, g) for kind, r in sets.items() for k, g in r["gates"].items() if not g["pass"]]
    notes = "".join(f"\n{n}\n" for n in args.note)
    if args.notes:
        notes += "\n" + Path(args.notes).read_text().strip() + "\n"
    s = cfg.sampler
    verdict = ("every gate passes" if not failed else
               "gates that fail: " + "; ".join(
                   f"{kind} `{k}` ({json.dumps(g['value'])} against {g['bar']})" for kind, k, g in failed))
    gate_rows = [row for kind, r in sets.items() for row in _gate_rows(r["gates"], kind)]
    per_image = ""
    for kind, r in sets.items():
        per_image += (f"\n### {kind} set\n\n{IMAGE_HEADER}\n"
                      + "\n".join(_row(name, x) for name, x in r["images"].items())
                      + "\n" + _row("mean", r["mean"], bold=True) + "\n")
    text = f"""# PatchScaler `tiny` demo model

**This is a demonstration model, not the paper's quality.** It is the `tiny` preset
({sum(counts.values()) / 1e6:.2f}M parameters) trained in {train_minutes:.0f} minutes on a 2-core CPU
on {n_photos} photographs; the paper trains 875M parameters for 500K iterations on LSDIR with 8 V100s.

What to expect, on two held-out sets of the same seven photographs (256×256 centre crops, ×4): *heavy*,
LR made by the project's Real-ESRGAN degradation (blur, noise, JPEG, two passes), and *mild*, a slight
blur, light noise and JPEG 75 — {_set_summary("heavy", sets["heavy"])}; {_set_summary("mild", sets["mild"])}.
By default `patchscaler upscale` applies the `{result["color_fix"]}` colour fix (`--color-fix`, see
`docs/model.md`): it removes the colour cast, it does not make the model better than bicubic. On mildly
degraded photographs **plain bicubic (or `--refine none`) is the better choice** with these weights: the
GRM is still below bicubic there and Patch-DiT adds grain-like texture on top (the card's notes). Gates of
issues #10 and #16: {verdict}.

![held-out crops, heavy](heldout.png)

![held-out crops, mild]({Path(figure_path(str(figure), "mild")).name})

*Each row: LR (nearest ×4) | bicubic | GRM only | PatchScaler without colour fix | PatchScaler (with the
default colour fix, what `patchscaler upscale` writes) | HR | groups (green simple, yellow medium, red
hard), 160×160 centre crops at HR size; first figure heavy, second mild.*

## Model

- Preset `tiny`: {breakdown}. ×{cfg.scale}.
- Autoencoder: diffusers `AutoencoderDC` (`kind="{cfg.autoencoder.kind}"`),
  f = {cfg.autoencoder.downsample_factor}, {cfg.latent_channels} latent channels, latent scaling factor
  {cfg.autoencoder.scaling_factor:.4f} (1 / std of the trained autoencoder's latents). Why not the
  paper's SD-VAE (`AutoencoderKL`, f = 8, 4 channels): see `docs/model.md`, "The tiny preset".
- Sampler: {s.beta_schedule} β ({s.beta_start}…{s.beta_end}), `{s.prediction_type}`, τ = {list(s.taus)},
  N = {list(s.steps)}; γ1 = {s.gamma1:.4f}, γ2 = {s.gamma2:.4f}, calibrated by `train-grm` on the validation
  photographs to give the groups about a third of the patches each: {calibration_json}.
- Weights `assets/demo/weights` (version `{model.version}`), RTM `assets/demo/rtm` (version
  `{rtm_manifest.get('version')}`, {counts_rtm.get('entries', '?')} entries); {size_mb:.1f} MB in all.
- Everything was trained by `scripts/train_demo.sh` (each stage's `loss_curve.png` is in
  `assets/demo/curves/`).

## Data

- Training photographs: {n_photos} photographs of Debian's `mate-backgrounds` and
  `plasma-workspace-wallpapers` packages (GPL-2+), each at two scales (long side 1024 and 512 px),
  fetched by `scripts/fetch_demo_data.py` (licence table: `data/demo/LICENSES.md`, copied in
  `docs/training.md`). LR inputs are synthesised on the fly with the Real-ESRGAN degradation (×4).
- Validation (γ calibration only): two more photographs of the same packages (`garden`, `storm`).
- RTM: 2,000 candidate crops from the photographs, 18 illustrations of the Plasma package and
  `assets/textures/`, reduced to {counts_rtm.get('entries', '?')} by farthest point sampling.
- Texture classifier: `assets/textures/` (11 DTD classes, CC0 photographs and procedural textures).
- Held out (never trained on, never used to choose anything but the default colour fix): `assets/heldout/`
  — ladybird, dune, eveningglow, path (GPL-2+, from the same packages) and camera, chelsea, coffee (CC0),
  their 256×256 centre crops. Heavy set: the LR of `assets/samples/` (the project's degradation, fixed
  seeds), cut at the same place. Mild set: made by `trainer/heldout_sets.py` (`mild_lr`: Gaussian blur
  σ = 0.8 px, ×4 bicubic down, Gaussian noise σ = 2/255 seeded by the image's name, JPEG quality 75).

## Training

{training}

## Gates (held-out means)

Margin: how far inside (+) or outside (−) the bar the measured value is, in its unit.

| set | gate | bar | measured | margin | |
|---|---|---|---|---|---|
{chr(10).join(gate_rows)}
{notes}
## Per image (×4; PSNR-Y dB / SSIM-Y, pyiqa)

*refine none* is `--refine none` with the default colour fix; *PatchScaler raw* has no colour fix; colour
shift: largest |mean(out) − mean(HR)| of a channel (1/255); seam ratio of PatchScaler (1: no grid).
{per_image}
Measured by `trainer.heldout.measure_heldout`; `tests/test_demo_weights.py` re-measures and checks these
numbers and the gates' verdicts:

{MARK_BEGIN}
```json
{json.dumps(result, indent=1)}
```
{MARK_END}

## Intended use and limitations

The README's first command, smoke tests, CI, and a template for training real models
(`docs/training.md`). For real upscaling train the `small` or `paper` preset on LSDIR/DIV2K and DTD.
"""
    Path(args.out).write_text(text)
    print(json.dumps({"card": args.out, "failed_gates": [(kind, k) for kind, k, _ in failed]}))


if __name__ == "__main__":
    main()
