"""JPEG compression in torch (baseline JPEG: YCbCr, 4:2:0 chroma, 8x8 DCT, quality-scaled tables).

Real-ESRGAN compresses with DiffJPEG, a torch re-implementation of the JPEG codec; this one follows the
same steps with hard rounding (the degradation pipeline needs no gradient through it). A whole batch is
coded at once, each image at its own quality. It runs on any device and is deterministic: the same image
and quality give the same result everywhere.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# The standard luminance and chrominance quantisation tables (ITU-T T.81, Annex K), quality 50.
_Y_TABLE = [
    [16, 11, 10, 16, 24, 40, 51, 61],
    [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56],
    [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77],
    [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101],
    [72, 92, 95, 98, 112, 100, 103, 99],
]
_C_TABLE = [[99.0] * 8 for _ in range(8)]
for _r, _row in enumerate([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]):
    _C_TABLE[_r][:4] = [float(v) for v in _row]


def _dct_matrix(device: torch.device) -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix D, so that a block's DCT is D @ B @ D.T."""
    k = torch.arange(8, dtype=torch.float32, device=device)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16)  # (8, 8) [freq, pos]
    d[0] *= 1 / math.sqrt(2)
    return d * 0.5


def quality_tables(quality: torch.Tensor | float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """libjpeg's quality scaling of the standard tables: (Y tables, C tables), each (..., 8, 8), >= 1, for a
    quality (8, 8) or a (B,) tensor of qualities (B, 8, 8)."""
    q = torch.as_tensor(quality, dtype=torch.float32, device=device).clamp(1.0, 100.0)
    factor = torch.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)[..., None, None]  # (..., 1, 1)
    tables = []
    for base in (_Y_TABLE, _C_TABLE):
        t = torch.tensor(base, dtype=torch.float32, device=device)  # (8, 8)
        tables.append(torch.floor((t * factor + 50.0) / 100.0).clamp(min=1.0))  # (..., 8, 8)
    return tables[0], tables[1]


def _rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 255] -> YCbCr (JFIF), same shape."""
    r, g, b = x.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0
    return torch.stack([y, cb, cr], dim=1)  # (B, 3, H, W)


def _ycbcr_to_rgb(x: torch.Tensor) -> torch.Tensor:
    y, cb, cr = x.unbind(1)
    r = y + 1.402 * (cr - 128.0)
    g = y - 0.344136 * (cb - 128.0) - 0.714136 * (cr - 128.0)
    b = y + 1.772 * (cb - 128.0)
    return torch.stack([r, g, b], dim=1)  # (B, 3, H, W)


def _code_plane(plane: torch.Tensor, table: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """Quantise planes (B, H, W) (H, W multiples of 8) in the DCT domain with one table per image
    (B, 8, 8) and return them decoded."""
    b, h, w = plane.shape
    blocks = plane.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)  # (B, h/8, w/8, 8, 8)
    coeffs = dct @ (blocks - 128.0) @ dct.T  # (B, h/8, w/8, 8, 8)
    table = table[:, None, None]  # (B, 1, 1, 8, 8)
    coeffs = torch.round(coeffs / table) * table
    blocks = dct.T @ coeffs @ dct + 128.0  # (B, h/8, w/8, 8, 8)
    return blocks.permute(0, 1, 3, 2, 4).reshape(b, h, w)  # (B, H, W)


def jpeg_compress(image: torch.Tensor, quality: torch.Tensor | float) -> torch.Tensor:
    """Compress and decompress (B, 3, H, W) in [0, 1] at JPEG quality 1..100 (a (B,) tensor, one per image,
    or one number for all), the whole batch at once on the image's device.

    The image is padded (replicate) to a multiple of 16 as an encoder does, and cropped back."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"jpeg_compress wants (B, 3, H, W), got {tuple(image.shape)}")
    bsz, _, h, w = image.shape
    qualities = torch.as_tensor(quality, dtype=torch.float32, device=image.device).flatten().expand(bsz)
    pad_h, pad_w = (-h) % 16, (-w) % 16
    x = F.pad(image.float() * 255.0, (0, pad_w, 0, pad_h), mode="replicate")  # (B, 3, H16, W16)
    x = _rgb_to_ycbcr(torch.round(x.clamp(0.0, 255.0)))
    dct = _dct_matrix(x.device)
    y_table, c_table = quality_tables(qualities, x.device)  # (B, 8, 8) each
    y = _code_plane(x[:, 0], y_table, dct)  # (B, H16, W16)
    chroma = F.avg_pool2d(x[:, 1:], 2)  # (B, 2, H16/2, W16/2), 4:2:0 subsampling
    pad_ch, pad_cw = (-chroma.shape[-2]) % 8, (-chroma.shape[-1]) % 8
    chroma = F.pad(chroma, (0, pad_cw, 0, pad_ch), mode="replicate")  # multiples of 8
    hc, wc = chroma.shape[-2:]
    coded = _code_plane(chroma.reshape(bsz * 2, hc, wc), c_table.repeat_interleave(2, 0), dct)  # (2B, hc, wc)
    cbcr = coded.reshape(bsz, 2, hc, wc)[..., : x.shape[-2] // 2, : x.shape[-1] // 2]  # (B, 2, H16/2, W16/2)
    cbcr = F.interpolate(cbcr, scale_factor=2, mode="bilinear", align_corners=False)  # (B, 2, H16, W16)
    rgb = _ycbcr_to_rgb(torch.cat([y.unsqueeze(1), cbcr], dim=1))[..., :h, :w]  # (B, 3, H, W)
    return (torch.round(rgb.clamp(0.0, 255.0)) / 255.0).to(image.dtype)
