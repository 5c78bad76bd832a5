"""Quality of a checkpoint against bicubic on held-out images: what the demo's model card reports.

For every LR image in ``samples`` with an HR image of the same name in ``heldout``: the reference
upscaler's output (seed 0, as ``patchscaler upscale`` by default) and the ×scale bicubic image are scored
against the HR image with PSNR and SSIM on the Y channel (pyiqa's ``psnr`` / ``ssim``, the usual SR
convention). Deterministic: the same weights, RTM and images give the same numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.data import list_images, read_image


def _metrics() -> dict[str, Any]:
    import pyiqa

    return {name: pyiqa.create_metric(name, test_y_channel=True, color_space="ycbcr", device="cpu")
            for name in ("psnr", "ssim")}


def measure_heldout(weights: str, rtm: str, *, heldout: str, samples: str, seed: int = 0) -> dict[str, Any]:
    """Scores per image and their means:
    ``{"images": {name: {"model": {"psnr", "ssim"}, "bicubic": {...}}}, "mean": {...}, ...}``."""
    from patchscaler.autoencoder import upscale_input
    from patchscaler.upscaler import PatchScaler
    from patchscaler.weights import load_checkpoint, load_rtm

    model = load_checkpoint(weights)
    memory, _ = load_rtm(rtm)
    upscaler = PatchScaler(model=model, rtm=memory)
    metrics = _metrics()
    hr_by_name = {Path(p).stem: p for p in list_images(heldout)}
    results: dict[str, dict[str, dict[str, float]]] = {}
    for lr_path in list_images(samples):
        name = Path(lr_path).stem
        if name not in hr_by_name:
            continue
        lr, hr = read_image(lr_path), read_image(hr_by_name[name])
        if lr is None or hr is None:
            raise ValueError(f"held-out pair {name} is unreadable")
        sr = upscaler.upscale(lr, generator=torch.Generator().manual_seed(seed)).image
        bicubic = upscale_input(lr[None], model.config.scale)[0]
        if sr.shape != hr.shape:
            raise ValueError(f"{name}: upscaled {tuple(sr.shape)} but HR is {tuple(hr.shape)}")
        results[name] = {
            method: {k: round(float(m(img[None].clamp(0, 1), hr[None])), 4) for k, m in metrics.items()}
            for method, img in (("model", sr), ("bicubic", bicubic))
        }
    if not results:
        raise ValueError(f"no LR sample in {samples} has an HR image in {heldout}")
    mean = {
        method: {k: round(sum(r[method][k] for r in results.values()) / len(results), 4)
                 for k in ("psnr", "ssim")}
        for method in ("model", "bicubic")
    }
    return {"images": results, "mean": mean, "seed": seed, "model_version": model.version}
