"""The held-out sets of the demo model card: (name, LR, HR) triples made from ``assets/heldout``.

- ``heavy``: the LR images of ``assets/samples``, made once by the project's Real-ESRGAN degradation
  (blur, noise, JPEG, two passes; fixed seeds);
- ``mild``: the HR photographs degraded mildly here, deterministically (``mild_lr``): a slight Gaussian
  blur (σ = 0.8 px at HR size), x4 bicubic down, light Gaussian noise (σ = 2/255, seeded by the image's
  name) and JPEG at quality 75 — what an ordinary downscaled, re-saved photograph looks like.

Both sets use the centre ``CROP`` x ``CROP`` of each photograph (HR size; the heavy LR cut at the same
place), as the figures of issue #16 do: it keeps a measurement of both sets, and so the test that repeats
it, to about a minute on two CPU cores.

Plain PIL and torch on purpose: this set must stay fixed while the training degradations change.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from trainer.data import list_images, read_image

SETS = ("heavy", "mild")
MILD_BLUR_SIGMA = 0.8  # px at HR size
MILD_NOISE_SIGMA = 2.0 / 255
MILD_JPEG_QUALITY = 75
CROP = 256  # HR pixels, a multiple of the scale and of the patch stride in pixels (32 for the tiny preset)


def centre_box(h: int, w: int, size: int, align: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the centre ``size`` x ``size`` box of an (h, w) image (smaller sides
    kept whole), its corner on multiples of ``align``."""
    ch, cw = min(size, h), min(size, w)
    return (h - ch) // 2 // align * align, (w - cw) // 2 // align * align, ch, cw


def mild_lr(hr: torch.Tensor, *, name: str, scale: int = 4) -> torch.Tensor:
    """HR (3, H, W) in [0, 1] -> its mildly degraded LR (3, H/scale, W/scale); the noise is seeded by
    ``name``, so the same photograph always gets the same LR."""
    h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
    rgb = (hr.clamp(0, 1).permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy()  # (H, W, 3)
    image = Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(radius=MILD_BLUR_SIGMA))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)  # (h, w, 3)
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x = (x + MILD_NOISE_SIGMA * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    buf = io.BytesIO()
    Image.fromarray((x * 255 + 0.5).to(torch.uint8).numpy()).save(buf, format="JPEG",
                                                                   quality=MILD_JPEG_QUALITY)
    with Image.open(io.BytesIO(buf.getvalue())) as jpeg:
        lr = np.asarray(jpeg.convert("RGB"), dtype=np.float32) / 255  # (h, w, 3)
    return torch.from_numpy(lr).permute(2, 0, 1).contiguous()  # (3, h, w)


def heldout_pairs(kind: str, *, heldout: str, samples: str, scale: int = 4, crop: int | None = CROP
                  ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """[(name, LR (3, h, w), HR (3, scale*h, scale*w))] of held-out set ``kind`` (one of ``SETS``), the
    centre ``crop`` x ``crop`` (HR pixels; None: the whole image)."""
    if kind not in SETS:
        raise ValueError(f"unknown held-out set {kind!r}; expected one of {', '.join(SETS)}")
    hr_by_name = {Path(p).stem: p for p in list_images(heldout)}
    pairs = []
    names = [Path(p).stem for p in list_images(samples)] if kind == "heavy" else sorted(hr_by_name)
    lr_by_name = {Path(p).stem: p for p in list_images(samples)}
    for name in names:
        if name not in hr_by_name:
            continue
        hr = read_image(hr_by_name[name])
        lr = read_image(lr_by_name[name]) if kind == "heavy" else None
        if hr is None or (kind == "heavy" and lr is None):
            raise ValueError(f"held-out pair {name} is unreadable")
        if crop is not None:
            top, left, ch, cw = centre_box(hr.shape[-2], hr.shape[-1], crop, scale)
            hr = hr[:, top:top + ch, left:left + cw]  # (3, ch, cw)
            if lr is not None:
                lr = lr[:, top // scale:(top + ch) // scale, left // scale:(left + cw) // scale]
        if lr is None:
            lr = mild_lr(hr, name=name, scale=scale)
        pairs.append((name, lr, hr))
    if not pairs:
        raise ValueError(f"no LR sample in {samples} has an HR image in {heldout}")
    return pairs
