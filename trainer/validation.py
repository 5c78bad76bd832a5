"""Validation during training: a fixed set of crops through the real inference path, PSNR-Y and images.

The crops are fixed for the whole run (and across resumes): the centre ``crop`` x ``crop`` window of
each of the first ``count`` images of ``--val-data`` (sorted), its LR made by the project's degradation
from a fixed seed per crop (as the GRM's calibration does). Every ``--val-every`` steps rank 0 runs them,
with the EMA weights swapped in (what the export will hold), through

- ``grm``: the GRM (``upscaler.restore``), its coarse latent y_HR decoded;
- ``patchdit``: the reference upscaler ``PatchScaler.upscale`` (PGS with the RTM, seed 0);
- ``autoencoder``: decode(encode(HR)), the reconstruction;

and logs the mean PSNR on the Y channel (BT.601, the SR convention) and one image row per crop
(bicubic | output | HR) to TensorBoard. Tasks without an image output (the classifier) have none.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from patchscaler.model import PatchScalerModel
from patchscaler.training.degradations import DegradationConfig, degrade_image
from trainer.data import list_images, read_image

VALIDATED_TASKS = ("autoencoder", "grm", "patchdit")
VALIDATION_SEED = 4242


def psnr_y(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR (dB) of the BT.601 luma (16..235 range, as MATLAB's rgb2ycbcr) of two (3, H, W) images."""
    w = torch.tensor([65.481, 128.553, 24.966]).view(3, 1, 1) / 255.0

    def y(x: torch.Tensor) -> torch.Tensor:
        return (x.float().clamp(0, 1).cpu() * w).sum(0) + 16.0 / 255.0  # (H, W)

    mse = float((y(out) - y(ref)).pow(2).mean())
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


def validation_crops(sources: tuple[str, ...], *, crop: int, count: int, scale: int, degradation: str
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(LR (3, crop/scale, crop/scale), HR (3, crop, crop)) pairs; images smaller than ``crop`` skipped."""
    paths = [p for source in sources for p in list_images(source)]
    pairs = []
    for path in paths:
        hr = read_image(path)
        if hr is None or min(hr.shape[-2:]) < crop:
            continue
        top, left = (hr.shape[-2] - crop) // 2, (hr.shape[-1] - crop) // 2
        hr = hr[:, top : top + crop, left : left + crop].contiguous()  # (3, crop, crop)
        lr = degrade_image(hr, config=DegradationConfig(kind=degradation, scale=scale),
                           seed=VALIDATION_SEED + len(pairs))
        pairs.append((lr, hr))
        if len(pairs) == count:
            break
    if not pairs:
        raise ValueError(f"--val-data {list(sources)}: no image of at least {crop} px")
    return pairs


class Validation:
    def __init__(self, *, task: str, model: PatchScalerModel, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                 rtm: Any = None, device: torch.device) -> None:
        if task not in VALIDATED_TASKS:
            raise ValueError(f"train-{task} has no validation; tasks with one: {VALIDATED_TASKS}")
        self.task, self.model, self.pairs, self.rtm, self.device = task, model, pairs, rtm, device

    @torch.no_grad()
    def output(self, lr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
        """The task's image for one pair: (3, H, W) like ``hr``."""
        model = self.model
        if self.task == "autoencoder":
            ae = model.autoencoder
            return ae.decode(ae.encode(hr[None].to(self.device)))[0]
        if self.task == "grm":
            from patchscaler.upscaler import restore

            y_hr, _ = restore(model, lr.to(self.device))  # (C, H/f, W/f)
            return model.autoencoder.decode(y_hr[None])[0, :, : hr.shape[-2], : hr.shape[-1]]
        from patchscaler.upscaler import PatchScaler

        upscaler = PatchScaler(model=model, rtm=self.rtm, device=self.device)
        return upscaler.upscale(lr.to(self.device), generator=torch.Generator().manual_seed(0)).image

    def run(self) -> tuple[dict[str, float], torch.Tensor]:
        """({"val/psnr_y": mean dB}, image rows (N, 3, H, 3W): bicubic | output | HR)."""
        from patchscaler.autoencoder import upscale_input

        was_training = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            scores, rows = [], []
            for lr, hr in self.pairs:
                out = self.output(lr, hr).float().cpu().clamp(0, 1)
                bicubic = upscale_input(lr[None], hr.shape[-1] // lr.shape[-1])[0].clamp(0, 1)
                scores.append(psnr_y(out, hr))
                rows.append(torch.cat([bicubic, out, hr], dim=-1))  # (3, H, 3W)
        finally:
            for m, mode in was_training.items():
                m.train(mode)
        return {"val/psnr_y": sum(scores) / len(scores)}, torch.stack(rows)
