"""The colour shift that the training degradation leaves in the LR images (issue 16's red cast).

    python bench/degradation_color.py [--data data/demo/photos] [--crops-per-image 4] [--draws 3]

Random 128x128 crops of the training photographs, each degraded ``--draws`` times by every variant
below; prints mean(LR_c) - mean(bicubic LR_c) per channel (1/255), over all crops and over the warm ones
(mean red above mean blue by 0.1). Noise clipped to [0, 1] pulls saturated channels towards grey; a model
trained on such pairs learns the opposite cast. ``keep_color`` (DegradationConfig) removes it.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from patchscaler.training.degradations import DegradationConfig, degrade
from trainer.data import list_images, read_image

VARIANTS = {
    "heavy, as published": DegradationConfig(),
    "heavy, keep_color": DegradationConfig(keep_color=True),
    "mild, keep_color": DegradationConfig(mild_share=1.0, keep_color=True),
    "trainers' mix (10 % clean, 20 % mild), keep_color": DegradationConfig(clean_share=0.1, mild_share=0.2,
                                                                           keep_color=True),
}


def crops(folder: str, per_image: int, size: int = 128, seed: int = 0) -> torch.Tensor:
    rng, out = random.Random(seed), []
    for path in list_images(folder):
        image = read_image(path)
        if image is None or min(image.shape[-2:]) <= size:
            continue
        for _ in range(per_image):
            top, left = rng.randrange(image.shape[-2] - size), rng.randrange(image.shape[-1] - size)
            out.append(image[:, top:top + size, left:left + size])
    return torch.stack(out)  # (N, 3, size, size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/demo/photos")
    p.add_argument("--crops-per-image", type=int, default=4)
    p.add_argument("--draws", type=int, default=3)
    args = p.parse_args()
    hr = crops(args.data, args.crops_per_image)
    bicubic = F.interpolate(hr, scale_factor=0.25, mode="bicubic", antialias=True).clamp(0, 1)
    means = hr.mean(dim=(2, 3))  # (N, 3)
    warm = (means[:, 0] > means[:, 2] + 0.1).repeat(args.draws)
    print(f"{len(hr)} crops of {args.data}, {args.draws} draws each; {int(warm.sum()) // args.draws} warm\n")
    print("| degradation | R / G / B, all crops | R / G / B, warm crops |\n|---|---|---|")
    for name, config in VARIANTS.items():
        shift = torch.cat([
            (degrade(hr, config=config, generator=torch.Generator().manual_seed(seed)).mean(dim=(2, 3))
             - bicubic.mean(dim=(2, 3))) * 255 for seed in range(args.draws)
        ])  # (N * draws, 3)
        fmt = " / ".join
        print(f"| {name} | {fmt(f'{v:+.2f}' for v in shift.mean(0).tolist())} | "
              f"{fmt(f'{v:+.2f}' for v in shift[warm].mean(0).tolist())} |")


if __name__ == "__main__":
    main()
