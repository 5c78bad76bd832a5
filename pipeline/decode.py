"""Pure functions: image file bytes -> pixels + alpha + colour metadata, and back (Pillow and numpy only).

Decoding (``decode_image``), in order:
1. the pixel limit is checked from the header, before any pixel is decoded (decompression bombs);
2. EXIF orientation is applied (``ImageOps.exif_transpose``); the EXIF written with the output has its
   orientation tag removed, so viewers do not rotate the result a second time;
3. the mode decides the pixels:

   ======================  ===============================================================
   L, RGB                  RGB uint8 (grey replicated to three channels)
   LA, RGBA, PA, P + tRNS  RGB uint8 + alpha uint8 (alpha is upscaled separately, bicubic)
   P                       the palette's RGB
   CMYK                    Pillow's CMYK -> RGB conversion; a CMYK ICC profile is dropped
   I;16*, I (16-bit grey)  RGB **uint16** (full precision into the model); output is 8-bit
   anything else           Pillow's conversion to RGB (first frame of animations)
   ======================  ===============================================================

   Pillow reads 16-bit-per-channel RGB(A) PNGs as 8-bit, so only 16-bit grey keeps 16 bits.
4. an ICC profile is kept only when it describes an RGB space (grey and CMYK profiles do not apply to the
   RGB output).

The model sees ``to_float(pixels)``: (3, h, w) float32 in [0, 1]. The output is 8-bit RGB (RGBA when the
input had alpha), as PNG (default), JPEG (no alpha: it is dropped) or WebP, with the ICC profile and EXIF.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
ORIENTATION_TAG = 0x0112
GROUP_PALETTE = ((46, 204, 113), (241, 196, 15), (231, 76, 60))  # simple / medium / hard


class ImageTooLarge(ValueError):
    """An image over the configured pixel limit."""


@dataclass
class Decoded:
    rgb: np.ndarray  # (h, w, 3) uint8 or uint16
    alpha: np.ndarray | None  # (h, w) uint8
    icc: bytes
    exif: bytes
    mode: str  # the file's mode before conversion, e.g. "P", "CMYK", "I;16"


def _rgb_icc(icc: bytes | None) -> bytes:
    """Keep an ICC profile only if its data colour space (header bytes 16..20) is RGB."""
    if not icc or len(icc) < 20 or icc[16:20] != b"RGB ":
        return b""
    return bytes(icc)


def _exif_without_orientation(im: Image.Image) -> bytes:
    exif = im.getexif()
    if not len(exif):
        return b""
    exif.pop(ORIENTATION_TAG, None)
    return exif.tobytes()


def decode_image(data: bytes, *, max_pixels: int) -> Decoded:
    """File bytes -> ``Decoded``. Raises ``ImageTooLarge`` over ``max_pixels`` and Pillow's errors
    (``UnidentifiedImageError``, ``OSError`` for truncated files) for unreadable input."""
    if not data:
        raise ValueError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                raise ImageTooLarge(f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
            mode = im.mode
            icc = im.info.get("icc_profile")
            im.load()
            upright = ImageOps.exif_transpose(im)
            exif = _exif_without_orientation(upright)  # after the transpose: getexif() is cached
            return Decoded(*_pixels(upright, mode), icc=_rgb_icc(icc), exif=exif, mode=mode)


def _pixels(im: Image.Image, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    if mode in SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(im).astype(np.int64), 0, 65535).astype(np.uint16)  # (h, w)
        return np.repeat(grey[:, :, None], 3, axis=2), None  # (h, w, 3)
    if mode in ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"))  # (h, w, 4)
        return np.ascontiguousarray(rgba[:, :, :3]), np.ascontiguousarray(rgba[:, :, 3])
    return np.asarray(im.convert("RGB")), None  # (h, w, 3)


def to_float(rgb: np.ndarray) -> torch.Tensor:
    """(h, w, 3) uint8/uint16 -> (3, h, w) float32 in [0, 1]: what the model sees."""
    scale = 65535.0 if rgb.dtype == np.uint16 else 255.0
    image = torch.from_numpy(rgb.astype(np.float32) / scale)  # (h, w, 3)
    return image.permute(2, 0, 1).contiguous()  # (3, h, w)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8, rounded as ``jobs/upscale.py`` saves."""
    return (image.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic ×scale of an alpha plane (h, w) uint8 -> (h*scale, w*scale) uint8."""
    h, w = alpha.shape
    return np.asarray(Image.fromarray(alpha).resize((w * scale, h * scale), Image.Resampling.BICUBIC))


def encode_image(
    rgb: np.ndarray, alpha: np.ndarray | None, *, fmt: str, quality: int, icc: bytes, exif: bytes
) -> bytes:
    """(H, W, 3) uint8 [+ (H, W) uint8 alpha] -> file bytes of ``fmt`` (png, jpeg, webp) with the ICC
    profile and EXIF; JPEG cannot hold alpha, which is then dropped."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {sorted(FORMATS)}")
    if alpha is not None and fmt != "jpeg":
        im = Image.fromarray(np.dstack([rgb, alpha]))  # (H, W, 4)
    else:
        im = Image.fromarray(rgb)
    options: dict[str, object] = {}
    if icc:
        options["icc_profile"] = icc
    if exif:
        options["exif"] = exif
    if fmt in ("jpeg", "webp"):
        options["quality"] = int(quality)
    buf = io.BytesIO()
    im.save(buf, format=FORMATS[fmt], **options)
    return buf.getvalue()


def encode_group_map(groups: np.ndarray) -> bytes:
    """A (h, w) map of patch groups 0/1/2 as a palette PNG: the pixel values are the groups, the palette
    shows them green / yellow / red (simple / medium / hard), as ``upscale --save-maps`` colours them."""
    h, w = groups.shape
    im = Image.frombytes("P", (w, h), np.ascontiguousarray(groups, dtype=np.uint8).tobytes())
    im.putpalette([c for rgb in GROUP_PALETTE for c in rgb])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
