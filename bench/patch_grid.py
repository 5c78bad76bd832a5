"""Where the demo's "patch grid" sits: the mean luma step between neighbouring output pixels by the
position of the pixel boundary within the Patch-DiT patch stride (32 output px for the tiny preset).

    python bench/patch_grid.py [--cache DIR] [--sets heavy mild] [--images coffee ...]

For each held-out crop and method (bicubic, GRM alone, PatchScaler raw), the mean |step| of the lines at
offset o (o = 0..stride-1; o = 0: where patches meet) divided by the mean over all offsets, averaged over
the images of a set. A patch seam is a peak at o = 0 alone; Patch-DiT's token grid (p = 2 latent pixels,
2 x f output px) is a peak at every multiple of 2 f; the decoder's own structure (it upsamples by f) a peak
at every multiple of f; JPEG blocks of the LR (8 px, x4 = 32) are at o = 0 too.
``trainer/heldout.py``'s seam ratio is o = 0 against all the others. ``--cache``: PatchScaler outputs of
``trainer.heldout.upscale_cached`` (shared with the other held-out benches and the card).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from heldout_args import add_heldout_arguments

from patchscaler.autoencoder import upscale_input
from patchscaler.upscaler import PatchScaler
from patchscaler.weights import load_checkpoint, load_rtm
from trainer.heldout import luma, upscale_cached
from trainer.heldout_sets import heldout_pairs


def step_profile(image: torch.Tensor, period: int) -> torch.Tensor:
    """(period,) mean |luma step| across the boundaries at offset o mod ``period``, over the mean of all."""
    y = luma(image.clamp(0, 1))  # (H, W)
    dx, dy = (y[:, 1:] - y[:, :-1]).abs(), (y[1:] - y[:-1]).abs()  # (H, W-1), (H-1, W)
    ox, oy = torch.arange(1, y.shape[1]) % period, torch.arange(1, y.shape[0]) % period
    means = torch.stack([torch.cat([dx[:, ox == o].flatten(), dy[oy == o].flatten()]).mean()
                         for o in range(period)])  # (period,)
    return means / means.mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_heldout_arguments(p, cache_help="cached PatchScaler outputs (trainer.heldout.upscale_cached)")
    args = p.parse_args()
    model = load_checkpoint(args.weights)
    memory, _ = load_rtm(args.rtm)
    upscaler = PatchScaler(model=model, rtm=memory, color_fix="none")
    f, token = model.autoencoder.factor, model.config.patch_dit.patch_size
    period = (model.config.sampler.patch_size - model.config.sampler.overlap) * f
    tokens = list(range(token * f, period, token * f))  # Patch-DiT token borders inside the stride
    pixels = [o for o in range(f, period, f) if o % (token * f)]  # latent pixel borders, not token borders
    other = [o for o in range(1, period) if o % f]
    print(f"weights {model.version}: patch stride {period} px, token {token * f} px")
    print("| set | method | o = 0 (patch border) | token borders inside the stride | other latent pixel "
          "borders | other offsets |")
    print("|---|---|---:|---:|---:|---:|")
    for kind in args.sets:
        profiles: dict[str, list[torch.Tensor]] = {"HR": [], "bicubic": [], "GRM": [],
                                                   "PatchScaler raw": []}
        for name, lr, hr in heldout_pairs(kind, heldout=args.heldout, samples=args.samples):
            if args.images and name not in args.images:
                continue
            s = model.config.scale
            grm = PatchScaler(model=model, rtm=memory, refine="none", color_fix="none").upscale(
                lr, generator=torch.Generator().manual_seed(args.seed)).image
            out = upscale_cached(upscaler, lr, seed=args.seed, name=f"{kind}-{name}", cache=args.cache).image
            for method, image in (("HR", hr), ("bicubic", upscale_input(lr[None], s)[0]), ("GRM", grm),
                                  ("PatchScaler raw", out)):
                profiles[method].append(step_profile(image, period))
        for method, rows in profiles.items():
            mean = torch.stack(rows).mean(0)  # (period,)
            print(f"| {kind} | {method} | {mean[0]:.3f} | {mean[tokens].mean():.3f} | "
                  f"{mean[pixels].mean():.3f} | {mean[other].mean():.3f} |")


if __name__ == "__main__":
    main()
