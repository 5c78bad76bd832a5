"""Colour correction of an upscaled image against a reference: the x`scale` bicubic image of its input.

Latent-diffusion upscalers shift colours: their autoencoder, their coarse restoration and their sampler
each move the mean of a channel a little, and the errors add up to a cast. The usual fix (StableSR, Wang
et al. 2023; its ``wavelet_color_fix`` and ``adaptive_instance_normalization``) keeps the output's detail
and takes the colour from the reference, which has the input's colours by construction:

- ``wavelet``: split both images into a high-frequency part and a low-frequency residual with an à-trous
  wavelet (a 3x3 binomial blur, dilated 1, 2, 4, 8, 16 times, ``levels`` levels) and add the output's
  high frequencies to the reference's low frequencies. Colour and smooth gradients come from the
  reference, edges and texture from the output.
- ``adain``: per channel, scale and shift the output to the reference's mean and standard deviation.
- ``none``: the output as it is.

Pure functions on (3, H, W) tensors in [0, 1]; ``color_fix`` returns a tensor clamped to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COLOR_FIXES = ("wavelet", "adain", "none")
DEFAULT_COLOR_FIX = "wavelet"  # chosen by bench/color_fix.py on both held-out sets (docs/benchmarks.md)
WAVELET_LEVELS = 5


def _blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """(N, C, H, W) -> the same, blurred by the 3x3 binomial kernel with the given dilation
    (replicate padding, so any size works)."""
    k1 = torch.tensor([0.25, 0.5, 0.25], dtype=image.dtype, device=image.device)
    kernel = (k1[:, None] * k1[None, :]).expand(image.shape[1], 1, 3, 3)  # (C, 1, 3, 3), sums to 1
    padded = F.pad(image, (dilation,) * 4, mode="replicate")  # (N, C, H+2d, W+2d)
    return F.conv2d(padded, kernel, dilation=dilation, groups=image.shape[1])  # (N, C, H, W)


def wavelet_decomposition(image: torch.Tensor, levels: int = WAVELET_LEVELS
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, H, W) -> (high, low), high + low == image: the sum of ``levels`` detail bands and the
    low-frequency residual of an à-trous wavelet (blur dilated 1, 2, 4, ...)."""
    low = image[None]  # (1, C, H, W)
    high = torch.zeros_like(low)
    for i in range(levels):
        blurred = _blur(low, 2**i)
        high = high + (low - blurred)
        low = blurred
    return high[0], low[0]


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = WAVELET_LEVELS
                      ) -> torch.Tensor:
    """The output's high frequencies on the reference's low frequencies: (3, H, W) each."""
    high, _ = wavelet_decomposition(image, levels)
    _, low = wavelet_decomposition(reference, levels)
    return high + low


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per channel, ``image`` moved to the mean and standard deviation of ``reference``: (3, H, W) each."""
    mean, std = image.mean(dim=(1, 2), keepdim=True), image.std(dim=(1, 2), keepdim=True)  # (3, 1, 1)
    ref_mean, ref_std = reference.mean(dim=(1, 2), keepdim=True), reference.std(dim=(1, 2), keepdim=True)
    return (image - mean) / (std + eps) * ref_std + ref_mean


def color_fix(image: torch.Tensor, reference: torch.Tensor, method: str) -> torch.Tensor:
    """``image`` (3, H, W) with its colours taken from ``reference`` (3, H, W) by ``method`` (one of
    ``COLOR_FIXES``), clamped to [0, 1]."""
    if method not in COLOR_FIXES:
        raise ValueError(f"unknown colour fix {method!r}; expected one of {', '.join(COLOR_FIXES)}")
    if image.shape != reference.shape:
        raise ValueError(f"image {tuple(image.shape)} and reference {tuple(reference.shape)} differ in shape")
    if method == "none":
        return image
    image, reference = image.float(), reference.float()
    fixed = wavelet_color_fix(image, reference) if method == "wavelet" else adain_color_fix(image, reference)
    return fixed.clamp(0, 1)
