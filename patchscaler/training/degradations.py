"""Synthetic LR images from HR ones: Real-ESRGAN's second-order degradation, batched on the images' device.

Each order: blur (isotropic / anisotropic / generalised / plateau Gaussian kernels, or a 2-D sinc),
random resize (up / down / keep, area / bilinear / bicubic), Gaussian or Poisson noise (colour or grey),
JPEG. The second order ends, in random order, with [resize to H/scale + final sinc filter] and JPEG.
The ranges are Real-ESRGAN's ×4 defaults (``DegradationConfig``); the paper trains on exactly this
pipeline and builds its synthetic test set (LSDIR-Test) the same way.

Batched as Real-ESRGAN's ``RealESRGANModel.feed_data`` does it on the GPU: every image of a batch gets its
own blur kernels (applied together by one grouped convolution), noise level, noise colour and JPEG
quality; the resize factors and modes and the order of the last two steps are drawn once per batch (the
images must keep one size). Besides the full pipeline ("heavy"), a share of the images can be *clean*
(plain bicubic down-sampling, ``clean_share``) or *mild* (one light order: a small Gaussian blur, light
noise, JPEG 70-95; ``mild_share``), so that a model trained on the mix does not over-restore mild inputs.

All randomness comes from one ``torch.Generator``, drawn in a fixed order per batch; noise is drawn on the
generator's device (give a CUDA generator for CUDA images; a CPU generator works everywhere, at the cost
of a copy). A seed fixes the result on a given device type. ``PairPool`` is Real-ESRGAN's queue of
training pairs, which mixes the images of successive batches.
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
    """Real-ESRGAN's ``realesrgan_x4plus`` degradation settings (first order, then the ``*2`` second), the
    skip probabilities included, plus the shares of clean and mild pairs (0 by default: Real-ESRGAN's
    pipeline alone; the trainers default to 0.1 clean and 0.2 mild, ``trainer/tasks.py``)."""

    kind: str = "realesrgan"  # or "bicubic" (every pair clean)
    scale: int = 4
    kernel_sizes: tuple[int, ...] = (7, 9, 11, 13, 15, 17, 19, 21)
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # over KERNEL_TYPES
    sinc_prob: float = 0.1  # a sinc kernel instead of a Gaussian-family one (first order)
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5  # else Poisson
    noise_range: tuple[float, float] = (1.0, 30.0)  # sigma on the 0..255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # second order
    second_blur_prob: float = 0.8  # per image; the others skip the second blur
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    resize_probs2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    final_sinc_prob: float = 0.8  # per image; the others get no final sinc filter
    max_kernel_size: int = 21  # every kernel is zero-padded to this size
    # the range of input strengths (issue 16): shares of the batch, drawn per image
    clean_share: float = 0.0  # bicubic down-sampling only
    mild_share: float = 0.0  # one light order: Gaussian blur, resize to LR, light noise, JPEG
    mild_blur_sigma: tuple[float, float] = (0.2, 1.2)
    mild_noise_range: tuple[float, float] = (0.0, 5.0)  # Gaussian sigma on the 0..255 scale
    mild_jpeg_range: tuple[float, float] = (70.0, 95.0)
    # Move each degraded LR's per-channel mean to that of its plain bicubic down-sampling. The pipeline's
    # noise is clipped to [0, 1], which pulls saturated channels towards grey (on warm photographs about
    # -1.9/255 red, +3.4/255 blue on average): a model trained on it learns to push red up and blue down,
    # the cast issue 16 measured on inputs that were never clipped. Off here (Real-ESRGAN's pipeline as
    # published); the trainers turn it on (trainer/tasks.py, --no-keep-color).
    keep_color: bool = False

    def __post_init__(self) -> None:
        if min(self.clean_share, self.mild_share) < 0 or self.clean_share + self.mild_share > 1:
            raise ValueError(f"clean_share {self.clean_share} and mild_share {self.mild_share} must be >= 0 "
                             "and sum to at most 1")


# --- random draws: one generator, values moved to the images' device ---------------------------------


def _uniform(g: torch.Generator, n: int, lo: float, hi: float, device: torch.device) -> torch.Tensor:
    return (lo + (hi - lo) * torch.rand(n, generator=g, device=g.device)).to(device)  # (n,)


def _coins(g: torch.Generator, n: int, p: float, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, generator=g, device=g.device) < p).to(device)  # (n,) bool


def _choices(g: torch.Generator, n: int, probs: tuple[float, ...], device: torch.device) -> torch.Tensor:
    weights = torch.tensor(probs, dtype=torch.float32, device=g.device)
    return torch.multinomial(weights, n, replacement=True, generator=g).to(device)  # (n,) indices


def _choice(g: torch.Generator, probs: tuple[float, ...]) -> int:
    """One index for the whole batch."""
    return int(_choices(g, 1, probs, g.device))


# --- kernels --------------------------------------------------------------------------------------


def _grid(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ax = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    y, x = torch.meshgrid(ax, ax, indexing="ij")  # (size, size) each
    return x, y


def _mask_and_normalise(kernels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Zero every kernel (B, K, K) outside its centred ``sizes[i]`` x ``sizes[i]`` window; sum to 1."""
    x, y = _grid(kernels.shape[-1], kernels.device)
    half = ((sizes.to(kernels) - 1) / 2)[:, None, None]  # (B, 1, 1)
    inside = (x.abs() <= half) & (y.abs() <= half)  # (B, K, K)
    kernels = kernels * inside
    return (kernels / kernels.sum(dim=(-2, -1), keepdim=True)).float()


def gaussian_kernels(kinds: torch.Tensor, sizes: torch.Tensor, sigma_x: torch.Tensor, sigma_y: torch.Tensor,
                     theta: torch.Tensor, beta: torch.Tensor, *, max_size: int) -> torch.Tensor:
    """(B, max_size, max_size) normalised kernels, one per image: Gaussian, generalised Gaussian
    (exp(-q^beta/2)) or plateau (1 / (1 + q^beta)) by ``kinds`` (indices into KERNEL_TYPES), where
    q = x^T Sigma^-1 x, Sigma = R(theta) diag(sx^2, sy^2) R(theta)^T, zero outside ``sizes``."""
    x, y = _grid(max_size, sigma_x.device)
    c, s = theta.double().cos()[:, None, None], theta.double().sin()[:, None, None]  # (B, 1, 1)
    ix, iy = 1 / sigma_x.double()[:, None, None] ** 2, 1 / sigma_y.double()[:, None, None] ** 2
    a, b, d = c * c * ix + s * s * iy, c * s * (ix - iy), s * s * ix + c * c * iy  # Sigma^-1 entries
    q = a * x * x + 2 * b * x * y + d * y * y  # (B, K, K)
    beta = beta.double()[:, None, None]
    plateau = (kinds >= KERNEL_TYPES.index("plateau_iso"))[:, None, None]
    generalized = ((kinds >= KERNEL_TYPES.index("generalized_iso")) & ~plateau[:, 0, 0])[:, None, None]
    kernel = torch.where(plateau, 1.0 / (q.pow(beta) + 1.0),
                         torch.where(generalized, torch.exp(-0.5 * q.pow(beta)), torch.exp(-0.5 * q)))
    return _mask_and_normalise(kernel, sizes)


def sinc_kernels(sizes: torch.Tensor, omega_c: torch.Tensor, *, max_size: int) -> torch.Tensor:
    """(B, max_size, max_size) circular low-pass (sinc) kernels with cutoffs ``omega_c`` (B,), zero outside
    ``sizes``: ringing and overshoot artefacts."""
    x, y = _grid(max_size, omega_c.device)
    r = torch.sqrt(x * x + y * y)  # (K, K)
    r_safe = torch.where(r == 0, torch.ones_like(r), r)
    w = omega_c.double()[:, None, None]  # (B, 1, 1)
    kernel = w * torch.special.bessel_j1(w * r_safe) / (2 * math.pi * r_safe)  # (B, K, K)
    kernel = torch.where(r == 0, w**2 / (4 * math.pi), kernel)
    return _mask_and_normalise(kernel, sizes)


def mixed_gaussian_kernel(
    kind: str, size: int, sigma_x: float, sigma_y: float, theta: float, beta: float = 1.0
) -> torch.Tensor:
    """One normalised (size, size) kernel of ``gaussian_kernels``."""
    one = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    kernels = gaussian_kernels(torch.tensor([KERNEL_TYPES.index(kind)]), torch.tensor([size]), one(sigma_x),
                               one(sigma_y), one(theta), one(beta), max_size=size)
    return kernels[0]


def sinc_kernel(size: int, omega_c: float) -> torch.Tensor:
    """One (size, size) kernel of ``sinc_kernels``."""
    return sinc_kernels(torch.tensor([size]), torch.tensor([omega_c], dtype=torch.float64), max_size=size)[0]


def pulse_kernels(n: int, size: int, device: torch.device) -> torch.Tensor:
    """(n, size, size) identity kernels: filtering with them changes nothing."""
    kernels = torch.zeros(n, size, size, device=device)
    kernels[:, size // 2, size // 2] = 1.0
    return kernels


def _kernel_sizes(g: torch.Generator, cfg: DegradationConfig, n: int, device: torch.device) -> torch.Tensor:
    """(n,) kernel sizes drawn uniformly from ``cfg.kernel_sizes``."""
    index = _choices(g, n, (1.0,) * len(cfg.kernel_sizes), device)
    return torch.tensor(cfg.kernel_sizes, device=device)[index]


def random_blur_kernels(g: torch.Generator, cfg: DegradationConfig, n: int, *, second: bool,
                        device: torch.device) -> torch.Tensor:
    """(n, K, K) blur kernels of the first or second order, one per image (K = ``max_kernel_size``)."""
    sizes = _kernel_sizes(g, cfg, n, device)
    sinc = _coins(g, n, cfg.sinc_prob2 if second else cfg.sinc_prob, device)
    omega = torch.where(sizes < 13, _uniform(g, n, math.pi / 3, math.pi, device),
                        _uniform(g, n, math.pi / 5, math.pi, device))
    kinds = _choices(g, n, cfg.kernel_probs, device)
    lo, hi = cfg.blur_sigma2 if second else cfg.blur_sigma
    aniso = (kinds % 2) == 1  # KERNEL_TYPES alternate iso / aniso
    sigma_x = _uniform(g, n, lo, hi, device)
    sigma_y = torch.where(aniso, _uniform(g, n, lo, hi, device), sigma_x)
    theta = torch.where(aniso, _uniform(g, n, -math.pi, math.pi, device), torch.zeros_like(sigma_x))
    below_one = _coins(g, n, 0.5, device)
    betas = []
    for b_lo, b_hi in (cfg.betag_range, cfg.betap_range):  # Real-ESRGAN: half below 1, half above
        low, high = _uniform(g, n, b_lo, 1.0, device), _uniform(g, n, max(b_lo, 1.0), b_hi, device)
        betas.append(torch.where(below_one & (b_lo < 1.0), low, high))
    beta = torch.where(kinds >= KERNEL_TYPES.index("plateau_iso"), betas[1],
                       torch.where(kinds >= KERNEL_TYPES.index("generalized_iso"), betas[0],
                                   torch.ones_like(sigma_x)))
    gauss = gaussian_kernels(kinds, sizes, sigma_x, sigma_y, theta, beta, max_size=cfg.max_kernel_size)
    return torch.where(sinc[:, None, None], sinc_kernels(sizes, omega, max_size=cfg.max_kernel_size), gauss)


def filter2d(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depth-wise 2-D filtering of (B, C, H, W) with one (k, k) kernel, or one per image (B, k, k) in one
    grouped convolution; reflect padding (replicate where the image is smaller than the kernel's radius)."""
    b, c, h, w = image.shape
    k = kernel.shape[-1]
    pad = k // 2
    mode = "reflect" if min(h, w) > pad else "replicate"
    x = F.pad(image, (pad, pad, pad, pad), mode=mode)  # (B, C, H+k-1, W+k-1)
    if kernel.ndim == 2:
        return F.conv2d(x, kernel.to(image).expand(c, 1, k, k), groups=c)  # (B, C, H, W)
    weight = kernel.to(image).repeat_interleave(c, dim=0)[:, None]  # (B*C, 1, k, k)
    out = F.conv2d(x.reshape(1, b * c, h + 2 * pad, w + 2 * pad), weight, groups=b * c)  # (1, B*C, H, W)
    return out.reshape(b, c, h, w)


# --- resize, noise, JPEG --------------------------------------------------------------------------


def _resize(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    size = (max(1, size[0]), max(1, size[1]))
    if mode == "area":
        return F.interpolate(image, size=size, mode="area")
    return F.interpolate(image, size=size, mode=mode, align_corners=False)


def _random_resize(g: torch.Generator, image: torch.Tensor, probs: tuple[float, float, float],
                   rng: tuple[float, float], base: tuple[int, int]) -> torch.Tensor:
    """One random up / down / keep factor and mode for the whole batch (the images keep one size)."""
    updown = _choice(g, probs)
    u = float(torch.rand((), generator=g, device=g.device))
    factor = 1.0 + (rng[1] - 1.0) * u if updown == 0 else rng[0] + (1.0 - rng[0]) * u if updown == 1 else 1.0
    mode = RESIZE_MODES[_choice(g, (1.0,) * len(RESIZE_MODES))]
    return _resize(image, (int(base[0] * factor), int(base[1] * factor)), mode)


def _gray(image: torch.Tensor) -> torch.Tensor:
    return 0.299 * image[:, 0:1] + 0.587 * image[:, 1:2] + 0.114 * image[:, 2:3]  # (B, 1, H, W)


def _poisson_noise(g: torch.Generator, image: torch.Tensor) -> torch.Tensor:
    """Real-ESRGAN's Poisson noise of (B, C, H, W): counts at 2^ceil(log2(distinct 8-bit values)) levels per
    image (the distinct values counted by one ``bincount`` over the batch)."""
    b = image.shape[0]
    codes = (image.clamp(0, 1) * 255.0).round()  # (B, C, H, W), 0..255
    offsets = (torch.arange(b, device=image.device) * 256)[:, None]  # (B, 1)
    counts = torch.bincount((codes.flatten(1).long() + offsets).flatten(), minlength=b * 256)  # (B*256,)
    distinct = (counts.reshape(b, 256) > 0).sum(1).clamp(min=2).float()  # (B,)
    levels = torch.exp2(torch.ceil(torch.log2(distinct)))[:, None, None, None]  # (B, 1, 1, 1)
    img = codes / 255.0
    counts = torch.poisson((img * levels).to(g.device), generator=g).to(image.device)
    return counts / levels - img


def _random_noise(g: torch.Generator, image: torch.Tensor, *, gaussian_prob: float,
                  sigma_range: tuple[float, float], poisson_range: tuple[float, float],
                  gray_prob: float) -> torch.Tensor:
    """Gaussian or Poisson noise, colour or grey, of its own strength on every image."""
    b, dev = image.shape[0], image.device
    gaussian = _coins(g, b, gaussian_prob, dev)  # (B,)
    gray = _coins(g, b, gray_prob, dev)  # (B,)
    sigma = (_uniform(g, b, *sigma_range, dev) / 255.0)[:, None, None, None]
    scale = _uniform(g, b, *poisson_range, dev)[:, None, None, None]
    noise = torch.zeros_like(image)
    if bool(gaussian.any()):
        color = torch.randn(image.shape, generator=g, device=g.device).to(dev)  # (B, 3, H, W)
        mono = torch.randn((b, 1, *image.shape[2:]), generator=g, device=g.device).to(dev)  # (B, 1, H, W)
        gauss = sigma * torch.where(gray[:, None, None, None], mono, color)  # (B, 3, H, W)
        noise = torch.where(gaussian[:, None, None, None], gauss, noise)
    for mono, index in ((False, (~gaussian & ~gray).nonzero().flatten()),
                        (True, (~gaussian & gray).nonzero().flatten())):
        if len(index):  # Poisson noise only on the images that get it, grey ones on their luma
            part = image[index]
            noise[index] = scale[index] * _poisson_noise(g, _gray(part) if mono else part)
    return (image + noise).clamp(0.0, 1.0)


def _random_jpeg(g: torch.Generator, image: torch.Tensor, rng: tuple[float, float]) -> torch.Tensor:
    quality = _uniform(g, image.shape[0], *rng, image.device)  # (B,): one quality per image
    return jpeg_compress(image.clamp(0.0, 1.0), quality)


# --- the pipelines --------------------------------------------------------------------------------


def _quantise(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255.0).round() / 255.0


def _clean(img: torch.Tensor, lr_size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(img, size=lr_size, mode="bicubic", align_corners=False, antialias=True)


def _heavy(g: torch.Generator, img: torch.Tensor, cfg: DegradationConfig,
           lr_size: tuple[int, int]) -> torch.Tensor:
    """Real-ESRGAN's two orders on a batch (B, 3, H, W) -> (B, 3, H/s, W/s)."""
    b, dev, k = img.shape[0], img.device, cfg.max_kernel_size
    h, w = img.shape[-2:]
    # first order
    out = filter2d(img, random_blur_kernels(g, cfg, b, second=False, device=dev))
    out = _random_resize(g, out, cfg.resize_probs, cfg.resize_range, (h, w))
    out = _random_noise(g, out, gaussian_prob=cfg.gaussian_noise_prob, sigma_range=cfg.noise_range,
                        poisson_range=cfg.poisson_scale_range, gray_prob=cfg.gray_noise_prob)
    out = _random_jpeg(g, out, cfg.jpeg_range)
    # second order: blur on a share of the images (the others a pulse)
    blur2 = _coins(g, b, cfg.second_blur_prob, dev)[:, None, None]
    kernels2 = random_blur_kernels(g, cfg, b, second=True, device=dev)
    out = filter2d(out, torch.where(blur2, kernels2, pulse_kernels(b, k, dev)))
    out = _random_resize(g, out, cfg.resize_probs2, cfg.resize_range2, lr_size)
    out = _random_noise(g, out, gaussian_prob=cfg.gaussian_noise_prob2, sigma_range=cfg.noise_range2,
                        poisson_range=cfg.poisson_scale_range2, gray_prob=cfg.gray_noise_prob2)
    # final sinc filter on a share of the images, resize to LR and JPEG, in a random order (per batch)
    sizes = _kernel_sizes(g, cfg, b, dev)
    sinc = sinc_kernels(sizes, _uniform(g, b, math.pi / 3, math.pi, dev), max_size=k)
    final = torch.where(_coins(g, b, cfg.final_sinc_prob, dev)[:, None, None], sinc, pulse_kernels(b, k, dev))
    mode = RESIZE_MODES[_choice(g, (1.0,) * len(RESIZE_MODES))]
    if _choice(g, (0.5, 0.5)) == 0:
        out = filter2d(_resize(out, lr_size, mode), final)
        out = _random_jpeg(g, out, cfg.jpeg_range2)
    else:
        out = _random_jpeg(g, out, cfg.jpeg_range2)
        out = filter2d(_resize(out, lr_size, mode), final)
    return out


def _mild(g: torch.Generator, img: torch.Tensor, cfg: DegradationConfig,
          lr_size: tuple[int, int]) -> torch.Tensor:
    """One light order: isotropic Gaussian blur, resize to LR, light Gaussian noise, JPEG 70-95."""
    b, dev = img.shape[0], img.device
    sizes = _kernel_sizes(g, cfg, b, dev)
    sigma = _uniform(g, b, *cfg.mild_blur_sigma, dev)
    iso = torch.zeros(b, dtype=torch.long, device=dev)
    kernels = gaussian_kernels(iso, sizes, sigma, sigma, torch.zeros_like(sigma), torch.ones_like(sigma),
                               max_size=cfg.max_kernel_size)
    out = _resize(filter2d(img, kernels), lr_size, RESIZE_MODES[_choice(g, (1.0,) * len(RESIZE_MODES))])
    out = _random_noise(g, out, gaussian_prob=1.0, sigma_range=cfg.mild_noise_range,
                        poisson_range=(0.0, 0.0), gray_prob=cfg.gray_noise_prob)
    return _random_jpeg(g, out, cfg.mild_jpeg_range)


def degrade(hr: torch.Tensor, *, config: DegradationConfig, generator: torch.Generator) -> torch.Tensor:
    """HR (B, 3, H, W) in [0, 1], H and W multiples of ``scale`` -> LR (B, 3, H/scale, W/scale), quantised
    to 8 bits, on ``hr``'s device. Each image is drawn clean / mild / heavy by the config's shares; each
    group is degraded as one batch, with per-image kernels, noise and JPEG quality."""
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise ValueError(f"degrade wants (B, 3, H, W), got {tuple(hr.shape)}")
    h, w = hr.shape[-2:]
    if h % config.scale or w % config.scale:
        raise ValueError(f"HR size {(h, w)} is not a multiple of the scale {config.scale}")
    if config.kind not in ("realesrgan", "bicubic"):
        raise ValueError(f"unknown degradation kind {config.kind!r}; use 'realesrgan' or 'bicubic'")
    lr_size = (h // config.scale, w // config.scale)
    img = hr.float()
    if config.kind == "bicubic":
        return _quantise(_clean(img, lr_size))
    u = _uniform(generator, img.shape[0], 0.0, 1.0, img.device)  # (B,): which group each image is in
    groups = {"clean": u < config.clean_share,
              "mild": (u >= config.clean_share) & (u < config.clean_share + config.mild_share),
              "heavy": u >= config.clean_share + config.mild_share}
    out = torch.empty(img.shape[0], 3, *lr_size, device=img.device)
    for name, member in groups.items():
        index = member.nonzero().flatten()
        if len(index) == 0:
            continue
        part = img[index]
        if name == "clean":
            out[index] = _clean(part, lr_size)
        elif name == "mild":
            out[index] = _mild(generator, part, config, lr_size)
        else:
            out[index] = _heavy(generator, part, config, lr_size)
    if config.keep_color:  # the degraded rows only: the clean ones are their bicubic already
        d = (~groups["clean"]).nonzero().flatten()
        shift = out[d].mean(dim=(2, 3), keepdim=True) - _clean(img[d], lr_size).mean(dim=(2, 3), keepdim=True)
        out[d] -= shift  # (D, 3, h, w)
    return _quantise(out)  # (B, 3, H/scale, W/scale)


def degrade_image(hr: torch.Tensor, *, config: DegradationConfig, seed: int) -> torch.Tensor:
    """One HR image (3, H, W) -> its LR image, from a seed: e.g. for a reproducible synthetic test set.
    The HR image is cropped (bottom/right) to a multiple of ``scale`` first."""
    s = config.scale
    h, w = hr.shape[-2] - hr.shape[-2] % s, hr.shape[-1] - hr.shape[-1] % s
    g = torch.Generator().manual_seed(seed)
    return degrade(hr[None, :, :h, :w], config=config, generator=g)[0]  # (3, h/s, w/s)


class PairPool:
    """Real-ESRGAN's training pair pool (its ``_dequeue_and_enqueue``): keeps ``size`` (HR, LR) pairs on the
    training device; once full, each new batch goes into the shuffled pool and as many old pairs come out,
    so a batch mixes images (and batch-level degradation choices) of many earlier batches."""

    def __init__(self, *, size: int) -> None:
        if size < 1:
            raise ValueError(f"pool size must be positive, got {size}")
        self.size = size
        self.hr: torch.Tensor | None = None
        self.lr: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.hr is None else self.hr.shape[0]

    def mix(self, hr: torch.Tensor, lr: torch.Tensor,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(HR (B, ...), LR (B, ...)) -> a batch of the same shapes: the input while the pool fills (or when B
        exceeds it), then B pairs drawn from the pool, the input taking their places."""
        b = hr.shape[0]
        if b > self.size:
            return hr, lr
        if self.hr is None or self.lr is None or len(self) < self.size:
            take = min(b, self.size - len(self))
            new_hr, new_lr = hr[:take].detach().clone(), lr[:take].detach().clone()
            self.hr = new_hr if self.hr is None else torch.cat([self.hr, new_hr])
            self.lr = new_lr if self.lr is None else torch.cat([self.lr, new_lr])
            return hr, lr
        order = torch.randperm(self.size, generator=generator, device=generator.device).to(self.hr.device)
        self.hr, self.lr = self.hr[order], self.lr[order]
        out_hr, out_lr = self.hr[:b].clone(), self.lr[:b].clone()
        self.hr[:b], self.lr[:b] = hr.detach(), lr.detach()
        return out_hr, out_lr
