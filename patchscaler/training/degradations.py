"""Synthetic LR images from HR ones: Real-ESRGAN's second-order degradation model, in torch.

Each order: blur (isotropic / anisotropic / generalised / plateau Gaussian kernels, or a 2-D sinc),
random resize (up / down / keep, area / bilinear / bicubic), Gaussian or Poisson noise (colour or grey),
JPEG. The second order ends, in random order, with [resize to H/scale + final sinc filter] and JPEG.
The ranges are Real-ESRGAN's ×4 defaults (``DegradationConfig``); the paper trains on exactly this
pipeline and builds its synthetic test set (LSDIR-Test) the same way.

All randomness comes from one ``torch.Generator`` (CPU), drawn in a fixed order per image, so a seed
fixes the result on any device. ``kind="bicubic"`` is the plain (antialiased) bicubic down-sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchscaler.training.jpeg import jpeg_compress

KERNEL_TYPES: tuple[str, ...] = (
    "iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso"
)
RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")


@dataclass(frozen=True)
class DegradationConfig:
    """Real-ESRGAN's ``realesrgan_x4plus`` degradation settings (first order, then the ``*2`` second)."""

    kind: str = "realesrgan"  # or "bicubic"
    scale: int = 4
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)  # sigma on the 0..255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second order
    second_blur_prob: float = 0.8
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    resize_probs2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    final_sinc_prob: float = 0.8
    max_kernel_size: int = 21  # every kernel is zero-padded to this size


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _choice(g: torch.Generator, n: int, probs: tuple[float, ...] | None = None) -> int:
    weights = torch.tensor(probs if probs is not None else [1.0] * n, dtype=torch.float64)
    return int(torch.multinomial(weights, 1, generator=g))


def _coin(g: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=g)) < p


def _pad_kernel(kernel: torch.Tensor, size: int) -> torch.Tensor:
    p = (size - kernel.shape[-1]) // 2
    return F.pad(kernel, (p, p, p, p))  # (size, size)


def mixed_gaussian_kernel(
    kind: str, size: int, sigma_x: float, sigma_y: float, theta: float, beta: float = 1.0
) -> torch.Tensor:
    """A normalised (size, size) kernel: Gaussian, generalised Gaussian (exp(-q^beta/2)) or plateau
    (1 / (1 + q^beta)), where q = x^T Sigma^-1 x and Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T."""
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    sigma = rot @ torch.diag(torch.tensor([sigma_x**2, sigma_y**2], dtype=torch.float64)) @ rot.T
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    grid = torch.stack(torch.meshgrid(ax, ax, indexing="xy"), dim=-1)  # (size, size, 2) as (x, y)
    q = ((grid @ torch.linalg.inv(sigma)) * grid).sum(-1)  # (size, size)
    if kind.startswith("plateau"):
        kernel = 1.0 / (q.pow(beta) + 1.0)
    elif kind.startswith("generalized"):
        kernel = torch.exp(-0.5 * q.pow(beta))
    else:
        kernel = torch.exp(-0.5 * q)
    return (kernel / kernel.sum()).float()


def sinc_kernel(size: int, omega_c: float) -> torch.Tensor:
    """2-D circular low-pass (sinc) kernel with cutoff ``omega_c``: ringing and overshoot artefacts."""
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    r = torch.sqrt(ax[None, :] ** 2 + ax[:, None] ** 2)  # (size, size)
    r_safe = torch.where(r == 0, torch.ones_like(r), r)
    kernel = omega_c * torch.special.bessel_j1(omega_c * r_safe) / (2 * math.pi * r_safe)
    kernel = torch.where(r == 0, torch.full_like(r, omega_c**2 / (4 * math.pi)), kernel)
    return (kernel / kernel.sum()).float()


def random_blur_kernel(g: torch.Generator, cfg: DegradationConfig, *, second: bool) -> torch.Tensor:
    """Draw one blur kernel of the first or second order, padded to ``max_kernel_size``."""
    size = cfg.kernel_sizes[_choice(g, len(cfg.kernel_sizes))]
    if _coin(g, cfg.sinc_prob2 if second else cfg.sinc_prob):
        omega = _uniform(g, math.pi / 3, math.pi) if size < 13 else _uniform(g, math.pi / 5, math.pi)
        return _pad_kernel(sinc_kernel(size, omega), cfg.max_kernel_size)
    kind = KERNEL_TYPES[_choice(g, len(KERNEL_TYPES), cfg.kernel_probs)]
    lo, hi = cfg.blur_sigma2 if second else cfg.blur_sigma
    sigma_x = _uniform(g, lo, hi)
    sigma_y, theta = sigma_x, 0.0
    if "aniso" in kind:
        sigma_y, theta = _uniform(g, lo, hi), _uniform(g, -math.pi, math.pi)
    beta = 1.0
    if kind.startswith("generalized") or kind.startswith("plateau"):
        b_lo, b_hi = cfg.betag_range if kind.startswith("generalized") else cfg.betap_range
        beta = _uniform(g, b_lo, 1.0) if _coin(g, 0.5) and b_lo < 1.0 else _uniform(g, max(b_lo, 1.0), b_hi)
    kernel = mixed_gaussian_kernel(kind, size, sigma_x, sigma_y, theta, beta)
    return _pad_kernel(kernel, cfg.max_kernel_size)


def filter2d(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depth-wise 2-D filtering of (B, C, H, W) with one (k, k) kernel; reflect padding (replicate where
    the image is smaller than the kernel's radius)."""
    k = kernel.shape[-1]
    pad = k // 2
    mode = "reflect" if min(image.shape[-2:]) > pad else "replicate"
    x = F.pad(image, (pad, pad, pad, pad), mode=mode)  # (B, C, H+k-1, W+k-1)
    c = image.shape[1]
    weight = kernel.to(image).expand(c, 1, k, k)  # (C, 1, k, k)
    return F.conv2d(x, weight, groups=c)  # (B, C, H, W)


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, size[0]), max(1, size[1]))
    if mode == "area":
        return F.interpolate(image, size=size, mode="area")
    return F.interpolate(image, size=size, mode=mode, align_corners=False)


def _random_resize(g: torch.Generator, image: torch.Tensor, probs: tuple[float, float, float],
                   rng: tuple[float, float], base: tuple[int, int]) -> torch.Tensor:
    updown = _choice(g, 3, probs)
    factor = _uniform(g, 1.0, rng[1]) if updown == 0 else _uniform(g, rng[0], 1.0) if updown == 1 else 1.0
    mode = RESIZE_MODES[_choice(g, len(RESIZE_MODES))]
    return _resize(image, (int(base[0] * factor), int(base[1] * factor)), mode)


def _random_noise(g: torch.Generator, image: torch.Tensor, *, gaussian_prob: float,
                  sigma_range: tuple[float, float], poisson_range: tuple[float, float],
                  gray_prob: float) -> torch.Tensor:
    gaussian = _coin(g, gaussian_prob)
    gray = _coin(g, gray_prob)
    shape = (image.shape[0], 1 if gray else image.shape[1], *image.shape[2:])
    if gaussian:
        sigma = _uniform(g, *sigma_range) / 255.0
        noise = torch.randn(shape, generator=g) * sigma  # (B, 1|3, H, W)
    else:
        scale = _uniform(g, *poisson_range)
        img = (image.detach().cpu().float().clamp(0, 1) * 255.0).round() / 255.0  # (B, 3, H, W)
        if gray:
            img = (0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3])  # (B, 1, H, W)
        levels = 2.0 ** math.ceil(math.log2(max(2, len(torch.unique(img)))))
        noise = (torch.poisson(img * levels, generator=g) / levels - img) * scale
    return (image + noise.to(image)).clamp(0.0, 1.0)


def _random_jpeg(g: torch.Generator, image: torch.Tensor, rng: tuple[float, float]) -> torch.Tensor:
    return jpeg_compress(image.clamp(0.0, 1.0), _uniform(g, *rng))


def degrade(hr: torch.Tensor, *, config: DegradationConfig, generator: torch.Generator) -> torch.Tensor:
    """HR (B, 3, H, W) in [0, 1], H and W multiples of ``scale`` -> LR (B, 3, H/scale, W/scale), quantised
    to 8 bits. Images are degraded one after another, each with its own draws from ``generator``."""
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"degrade wants (B, 3, H, W), got {tuple(hr.shape)}")
    h, w = hr.shape[-2:]
    if h % config.scale or w % config.scale:
        raise ValueError(f"HR size {(h, w)} is not a multiple of the scale {config.scale}")
    return torch.cat([_degrade_one(hr[i : i + 1], config, generator) for i in range(hr.shape[0])])


def _degrade_one(img: torch.Tensor, cfg: DegradationConfig, g: torch.Generator) -> torch.Tensor:
    h, w = img.shape[-2:]
    lr_size = (h // cfg.scale, w // cfg.scale)
    if cfg.kind == "bicubic":
        out = F.interpolate(img, size=lr_size, mode="bicubic", align_corners=False, antialias=True)
        return (out.clamp(0, 1) * 255.0).round() / 255.0
    if cfg.kind != "realesrgan":
        raise ValueError(f"unknown degradation kind {cfg.kind!r}; use 'realesrgan' or 'bicubic'")
    out = img.float()
    # first order
    out = filter2d(out, random_blur_kernel(g, cfg, second=False))
    out = _random_resize(g, out, cfg.resize_probs, cfg.resize_range, (h, w))
    out = _random_noise(g, out, gaussian_prob=cfg.gaussian_noise_prob, sigma_range=cfg.noise_range,
                        poisson_range=cfg.poisson_scale_range, gray_prob=cfg.gray_noise_prob)
    out = _random_jpeg(g, out, cfg.jpeg_range)
    # second order
    if _coin(g, cfg.second_blur_prob):
        out = filter2d(out, random_blur_kernel(g, cfg, second=True))
    out = _random_resize(g, out, cfg.resize_probs2, cfg.resize_range2, lr_size)
    out = _random_noise(g, out, gaussian_prob=cfg.gaussian_noise_prob2, sigma_range=cfg.noise_range2,
                        poisson_range=cfg.poisson_scale_range2, gray_prob=cfg.gray_noise_prob2)
    final_kernel = torch.zeros(cfg.max_kernel_size, cfg.max_kernel_size)
    final_kernel[cfg.max_kernel_size // 2, cfg.max_kernel_size // 2] = 1.0  # identity ("pulse")
    if _coin(g, cfg.final_sinc_prob):
        size = cfg.kernel_sizes[_choice(g, len(cfg.kernel_sizes))]
        final_kernel = _pad_kernel(sinc_kernel(size, _uniform(g, math.pi / 3, math.pi)), cfg.max_kernel_size)
    mode = RESIZE_MODES[_choice(g, len(RESIZE_MODES))]
    if _coin(g, 0.5):
        out = filter2d(_resize(out, lr_size, mode), final_kernel)
        out = _random_jpeg(g, out, cfg.jpeg_range2)
    else:
        out = _random_jpeg(g, out, cfg.jpeg_range2)
        out = filter2d(_resize(out, lr_size, mode), final_kernel)
    return (out.clamp(0, 1) * 255.0).round() / 255.0  # (1, 3, H/scale, W/scale)


def degrade_image(hr: torch.Tensor, *, config: DegradationConfig, seed: int) -> torch.Tensor:
    """One HR image (3, H, W) -> its LR image, from a seed: e.g. for a reproducible synthetic test set.
    The HR image is cropped (bottom/right) to a multiple of ``scale`` first."""
    s = config.scale
    h, w = hr.shape[-2] - hr.shape[-2] % s, hr.shape[-1] - hr.shape[-1] % s
    g = torch.Generator().manual_seed(seed)
    return degrade(hr[None, :, :h, :w], config=config, generator=g)[0]  # (3, h/s, w/s)
