"""Calibrate PGS's group thresholds (Eq. 2) of a trained GRM on validation images.

The GRM's confidence is trained with Eq. (1)/(8), whose optimum is C* = min(1, eta / e) for a per-pixel
squared latent error e: how confident a trained GRM is depends on eta and on how good the GRM became,
neither of which the paper's gamma1 = 0.95 / gamma2 = 0.75 know about. A GRM whose confidence sits near
0.2 everywhere puts every patch in the hard group, and PGS degenerates into uniform sampling from
tau = 1000. So after GRM training the thresholds are set from the mean patch confidences of validation
images (never trained on, LR made by the project's degradation from fixed seeds): gamma1 and gamma2 are
the quantiles that give the groups the target shares (simple, medium, hard), and they are stored in the
checkpoint's ``sampler`` config, with the histogram of the mean confidences.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from patchscaler.config import PatchScalerConfig
from patchscaler.model import PatchScalerModel
from patchscaler.patching import patch_means, plan_grid
from patchscaler.pgs import GROUP_NAMES, assign_groups
from patchscaler.training.degradations import DegradationConfig, degrade_image
from patchscaler.upscaler import restore

DEFAULT_SHARES: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # simple, medium, hard
VALIDATION_SEED = 777


@torch.no_grad()
def mean_patch_confidences(model: PatchScalerModel, hr_images: list[torch.Tensor], *,
                           degradation: DegradationConfig, seed: int = VALIDATION_SEED) -> torch.Tensor:
    """Avg(C) of every latent patch (Eq. 2) of the degraded validation images, concatenated: (M,)."""
    sampler = model.config.sampler
    means = []
    for i, hr in enumerate(hr_images):  # (3, H, W) in [0, 1]
        lr = degrade_image(hr, config=degradation, seed=seed + i)  # (3, H/s, W/s)
        _, conf = restore(model, lr)  # (1, h, w)
        grid = plan_grid(conf.shape[-2], conf.shape[-1], patch=sampler.patch_size, overlap=sampler.overlap)
        means.append(patch_means(conf, grid))
    return torch.cat(means)


def thresholds_for_shares(mean_conf: torch.Tensor, shares: tuple[float, float, float] = DEFAULT_SHARES
                          ) -> tuple[float, float]:
    """(gamma1, gamma2) that split ``mean_conf`` (M,) into the target (simple, medium, hard) shares:
    gamma1 is the (1 - simple) quantile, gamma2 the hard quantile (Eq. 2's intervals are open below)."""
    if len(shares) != 3 or min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"shares must be three non-negative fractions summing to 1, got {shares}")
    if mean_conf.numel() == 0:
        raise ValueError("no validation patches to calibrate on")
    values = mean_conf.double()
    gamma1 = float(torch.quantile(values, 1.0 - shares[0]))
    gamma2 = float(torch.quantile(values, shares[2]))
    return min(gamma1, 1.0), min(max(gamma2, 0.0), gamma1)


def histogram(mean_conf: torch.Tensor, bins: int = 10) -> list[int]:
    """Counts of the mean patch confidences in ``bins`` equal bins over [0, 1]."""
    return torch.histc(mean_conf.float().clamp(0, 1), bins=bins, min=0.0, max=1.0).long().tolist()


def calibrate(model: PatchScalerModel, hr_images: list[torch.Tensor], *, degradation: DegradationConfig,
              shares: tuple[float, float, float] = DEFAULT_SHARES
              ) -> tuple[PatchScalerConfig, dict[str, Any]]:
    """The config with calibrated gamma1/gamma2, and a report: thresholds, group counts, histogram."""
    mean_conf = mean_patch_confidences(model, hr_images, degradation=degradation)
    gamma1, gamma2 = thresholds_for_shares(mean_conf, shares)
    groups = assign_groups(mean_conf, gamma1, gamma2)
    report = {
        "gamma1": round(gamma1, 6), "gamma2": round(gamma2, 6), "patches": int(mean_conf.numel()),
        "groups": {name: int((groups == g).sum()) for g, name in enumerate(GROUP_NAMES)},
        "target_shares": [round(s, 4) for s in shares],
        "histogram_0_to_1": histogram(mean_conf),
        "mean_confidence": round(float(mean_conf.mean()), 4),
    }
    sampler = dataclasses.replace(model.config.sampler, gamma1=report["gamma1"], gamma2=report["gamma2"])
    return model.config.replace(sampler=sampler), report
