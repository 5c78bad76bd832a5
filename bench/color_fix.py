"""Colour fixes of the demo model on both held-out sets, and where its colour shift comes from.

    python bench/color_fix.py                      # the demo weights, both sets, seed 0
    python bench/color_fix.py --sets mild --weights W --rtm R
    python bench/color_fix.py --cache /tmp/heldout-cache   # reuse PatchScaler outputs of another bench

For every image of the held-out sets (``trainer/heldout_sets.py``: heavy = ``assets/samples``, mild =
slight blur, light noise, JPEG 75), one run computes:

1. the colour-fix table: the GRM's decoded output and PatchScaler's (adaptive PGS, seed 0), each with
   every fix of ``patchscaler.colorfix`` (``none``, ``adain``, ``wavelet``) against the x4 bicubic image:
   held-out mean PSNR-Y minus bicubic's (pyiqa), the largest mean channel shift over all images and
   channels (|mean(out_c) - mean(HR_c)|, 1/255), the sharpness ratio (mean luma gradient / HR's) and the
   seam ratio (luma step across Patch-DiT patch borders / elsewhere, ``trainer.heldout.seam_ratio``);
2. the stage table: the signed mean channel shift (mean(out_c) - mean(HR_c), R/G/B, in 1/255; held-out
   mean, and the number of images with red the largest positive shift) after each stage of the model:
   the autoencoder round trip of the HR image; encoding the bicubic image and decoding it (what the GRM
   starts from); the GRM (decoded y_HR); Patch-DiT (PatchScaler without colour fix).

Prints both tables as Markdown and one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import torch
import torch.nn.functional as F
from heldout_args import add_heldout_arguments

from patchscaler.autoencoder import upscale_input
from patchscaler.colorfix import COLOR_FIXES
from patchscaler.upscaler import PatchScaler, fix_colors, restore
from patchscaler.weights import load_checkpoint, load_rtm
from trainer.heldout import gradient_magnitude, seam_ratio, signed_shift, upscale_cached
from trainer.heldout_sets import heldout_pairs

STAGES = ("autoencoder(HR)", "autoencoder(bicubic)", "GRM", "Patch-DiT")


@torch.no_grad()
def stage_images(upscaler: PatchScaler, lr: torch.Tensor, hr: torch.Tensor, seed: int, *, name: str,
                 cache: str | None) -> dict[str, torch.Tensor]:
    """bicubic and the output of every stage (``STAGES``), each (3, H, W) like ``hr``, no colour fix."""
    model = upscaler.model
    ae, s = model.autoencoder, model.config.scale
    h, w = hr.shape[-2:]
    f = ae.factor

    def round_trip(x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x[None], (0, (-w) % f, 0, (-h) % f), mode="replicate")  # (1, 3, H', W')
        return ae.decode(ae.encode(x))[0, :, :h, :w]

    bicubic = upscale_input(lr[None], s)[0]
    y_hr, _ = restore(model, lr)  # (C, H'/f, W'/f)
    grm = ae.decode(y_hr[None])[0, :, :h, :w]
    model_out = upscale_cached(upscaler, lr, seed=seed, name=name, cache=cache).image
    return {"bicubic": bicubic, "autoencoder(HR)": round_trip(hr),
            "autoencoder(bicubic)": round_trip(bicubic), "GRM": grm, "Patch-DiT": model_out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_heldout_arguments(p, cache_help="folder of cached PatchScaler outputs "
                                        "(trainer.heldout.upscale_cached)")
    args = p.parse_args()

    import pyiqa

    psnr = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", device="cpu")
    model = load_checkpoint(args.weights)
    upscaler = PatchScaler(model=model, rtm=load_rtm(args.rtm)[0], color_fix="none")
    sampler = model.config.sampler
    stride = (sampler.patch_size - sampler.overlap) * model.autoencoder.factor
    start = time.perf_counter()
    fixes: dict[tuple[str, str, str], list[dict]] = {}
    stages: dict[tuple[str, str], list[list[float]]] = {}
    for kind in args.sets:
        pairs = heldout_pairs(kind, heldout=args.heldout, samples=args.samples, scale=model.config.scale)
        pairs = [x for x in pairs if args.images is None or x[0] in args.images]
        for i, (name, lr, hr) in enumerate(pairs, 1):
            print(f"[{kind} {i}/{len(pairs)}] {name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)
            images = stage_images(upscaler, lr, hr, args.seed, name=f"{kind}-{name}", cache=args.cache)
            base = float(psnr(images["bicubic"][None], hr[None]))
            hr_grad = gradient_magnitude(hr)
            for stage in STAGES:
                stages.setdefault((kind, stage), []).append(signed_shift(images[stage], hr))
            for method, raw in (("GRM", images["GRM"]), ("PatchScaler", images["Patch-DiT"])):
                for fix in COLOR_FIXES:
                    out = fix_colors(raw, lr, scale=model.config.scale, method=fix).clamp(0, 1)
                    fixes.setdefault((kind, method, fix), []).append({
                        "dpsnr": float(psnr(out[None], hr[None])) - base,
                        "shift": max(abs(v) for v in signed_shift(out, hr)),
                        "sharpness": gradient_magnitude(out) / hr_grad,
                        "seams": seam_ratio(out, stride)})
            for fix in ("bicubic",):
                fixes.setdefault((kind, "bicubic", "-"), []).append({
                    "dpsnr": 0.0, "shift": max(abs(v) for v in signed_shift(images[fix], hr)),
                    "sharpness": gradient_magnitude(images[fix]) / hr_grad,
                    "seams": seam_ratio(images[fix], stride)})

    rows = []
    print(f"\n`{' '.join(shlex.quote(a) for a in sys.argv)}` ({time.perf_counter() - start:.0f} s)\n")
    print("| set | output | colour fix | PSNR-Y − bicubic (dB) | largest mean channel shift (1/255) "
          "| sharpness | seam ratio |\n|---|---|---|---|---|---|---|")
    for (kind, method, fix), vals in fixes.items():
        n = len(vals)
        row = {"set": kind, "output": method, "fix": fix,
               "dpsnr": round(sum(v["dpsnr"] for v in vals) / n, 3),
               "largest_shift": round(max(v["shift"] for v in vals), 2),
               "sharpness": round(sum(v["sharpness"] for v in vals) / n, 3),
               "seam_ratio": round(sum(v["seams"] for v in vals) / n, 3)}
        rows.append(row)
        print(f"| {kind} | {method} | {fix} | {row['dpsnr']:+.2f} | {row['largest_shift']:.1f} | "
              f"{row['sharpness']:.2f} | {row['seam_ratio']:.2f} |")
    print("\n| set | after | mean shift R / G / B (1/255) | largest |R|,|G|,|B| | images with red the "
          "largest positive shift |\n|---|---|---|---|---|")
    stage_rows = []
    for (kind, stage), shifts in stages.items():
        n = len(shifts)
        mean = [round(sum(s[c] for s in shifts) / n, 2) for c in range(3)]
        largest = round(max(abs(v) for s in shifts for v in s), 2)
        red = sum(1 for s in shifts if s[0] > 0 and s[0] >= max(s))
        stage_rows.append({"set": kind, "stage": stage, "mean_shift_rgb": mean, "largest": largest,
                           "red_first": red, "images": n})
        print(f"| {kind} | {stage} | {mean[0]:+.2f} / {mean[1]:+.2f} / {mean[2]:+.2f} | {largest:.1f} | "
              f"{red} of {n} |")
    print(json.dumps({"fixes": rows, "stages": stage_rows, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
