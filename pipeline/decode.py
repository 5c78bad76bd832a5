"""Pure functions: image file bytes -> pixels + alpha + colour metadata, and back (Pillow and numpy only).

This is the one decode/encode path of both ``patchscaler upscale`` and ``upscale-dataset``: both call
``decode_image`` on the file's bytes and ``encode_output`` on the model's result, so they write the same
file for the same input.

Decoding (``decode_image``), in order:
1. the pixel limit is checked from the header, before any pixel is decoded (decompression bombs);
2. EXIF orientation is applied (``ImageOps.exif_transpose``); the EXIF written with the output has its
   orientation tag removed, so viewers do not rotate the result a second time;
3. the mode decides the pixels:

   ======================  ===============================================================
   L, 1, RGB               RGB uint8 (grey replicated to three channels)
   LA, RGBA, PA, P + tRNS  RGB uint8 + alpha uint8 (alpha is upscaled separately, bicubic)
   P                       the palette's RGB
   CMYK                    Pillow's CMYK -> RGB conversion; a CMYK ICC profile is dropped
   I;16*, I (16-bit grey)  RGB **uint16** (full precision into the model); output is 8-bit
   anything else           Pillow's conversion to RGB (first frame of animations)
   ======================  ===============================================================

   Pillow reads 16-bit-per-channel RGB(A) PNGs as 8-bit, so only 16-bit grey keeps 16 bits.
4. an ICC profile is kept only when it describes the output's colour space: RGB for colour inputs, GRAY
   for grey ones (CMYK profiles do not apply to the RGB output).

Unreadable input (empty, truncated, corrupt, not an image) raises ``UnreadableImage`` with a one-line
reason; the caller names the file.

The model sees ``to_float(pixels)``: (3, h, w) float32 in [0, 1]. ``encode_output`` writes its result:

- 8-bit RGB, or RGBA when the input had alpha (the LR alpha upscaled bicubic and recombined);
- **grey inputs** (L, LA, 1, 16-bit grey) come back **grey**: the model's RGB output is converted to
  luma (Pillow's ``convert("L")``, ITU-R 601-2), so a grey photo never gets a colour cast; 8-bit L or LA
  (WebP, which has no grey mode, stores it as RGB(A) with equal channels);
- as PNG (default), JPEG (no alpha: it is dropped) or WebP, with the ICC profile and EXIF.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
GREY_MODES = ("1", "L", "LA", "La", *SIXTEEN_BIT_MODES)  # written back as grey (L / LA)
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
ORIENTATION_TAG = 0x0112
GROUP_PALETTE = ((46, 204, 113), (241, 196, 15), (231, 76, 60))  # simple / medium / hard


class ImageTooLarge(ValueError):
    """An image over the configured pixel limit."""


class UnreadableImage(ValueError):
    """Bytes that are not an image Pillow can decode: empty, truncated, corrupt or another format."""


class NotAnImage(UnreadableImage, UnidentifiedImageError):
    """Bytes in no image format Pillow knows (still a Pillow ``UnidentifiedImageError`` for callers that
    tell that case apart, e.g. ``rtm_builder``'s skip reasons)."""


@dataclass
class Decoded:
    rgb: np.ndarray  # (h, w, 3) uint8 or uint16
    alpha: np.ndarray | None  # (h, w) uint8
    icc: bytes
    exif: bytes
    mode: str  # the file's mode before conversion, e.g. "P", "CMYK", "I;16"

    @property
    def grey(self) -> bool:
        """Written back as grey (``encode_output``)."""
        return self.mode in GREY_MODES


def icc_space(icc: bytes) -> bytes:
    """The data colour space of an ICC profile (header bytes 16..20): ``b"RGB "``, ``b"GRAY"``, ..."""
    return bytes(icc[16:20]) if len(icc) >= 20 else b""


def _kept_icc(icc: bytes | None, mode: str) -> bytes:
    """Keep an ICC profile only if it describes the output's colour space (GRAY for grey inputs)."""
    if not icc:
        return b""
    return bytes(icc) if icc_space(icc) == (b"GRAY" if mode in GREY_MODES else b"RGB ") else b""


def _exif_without_orientation(im: Image.Image) -> bytes:
    exif = im.getexif()
    if not len(exif):
        return b""
    exif.pop(ORIENTATION_TAG, None)
    return exif.tobytes()


def decode_image(data: bytes, *, max_pixels: int) -> Decoded:
    """File bytes -> ``Decoded``. Raises ``ImageTooLarge`` over ``max_pixels`` and ``UnreadableImage``
    (one line, saying why) for anything Pillow cannot decode."""
    if not data:
        raise UnreadableImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageTooLarge(f"{w}×{h} = {w * h} pixels is over the limit of {max_pixels}")
                mode = im.mode
                icc = im.info.get("icc_profile")
                im.load()
                upright = ImageOps.exif_transpose(im)
                exif = _exif_without_orientation(upright)  # after the transpose: getexif() is cached
                return Decoded(*_pixels(upright, mode), icc=_kept_icc(icc, mode), exif=exif, mode=mode)
    except ImageTooLarge:
        raise
    except Image.DecompressionBombError as exc:  # over Pillow's own limit, before ours is checked
        raise ImageTooLarge(_clean(str(exc))) from None
    except UnidentifiedImageError:
        raise NotAnImage("not an image, or an image format Pillow cannot read") from None
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError, ... here
        reason = f"{type(exc).__name__}: {_clean(str(exc))}"
        raise UnreadableImage(f"corrupt or truncated image ({reason})") from exc


def _clean(message: str) -> str:
    """One line, without Pillow's ``<_io.BytesIO object at 0x...>`` (the caller names the file)."""
    return " ".join(re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", message).split())


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
    import torch  # here, so that the job's argument checks run before torch loads

    scale = 65535.0 if rgb.dtype == np.uint16 else 255.0
    image = torch.from_numpy(rgb.astype(np.float32) / scale)  # (h, w, 3)
    return image.permute(2, 0, 1).contiguous()  # (3, h, w)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 (rounded to nearest)."""
    import torch

    return (image.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic ×scale of an alpha plane (h, w) uint8 -> (h*scale, w*scale) uint8."""
    h, w = alpha.shape
    return np.asarray(Image.fromarray(alpha).resize((w * scale, h * scale), Image.Resampling.BICUBIC))


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 luma (Pillow's ``convert("L")``: L = 0.299 R + 0.587 G + 0.114 B)."""
    return np.asarray(Image.fromarray(rgb).convert("L"))


def encode_output(rgb: np.ndarray, lr_alpha: np.ndarray | None, *, grey: bool, scale: int, fmt: str,
                  quality: int, icc: bytes, exif: bytes) -> bytes:
    """The model's result (H, W, 3) uint8 -> the output file's bytes, for ``upscale`` and the pipeline
    alike: the LR alpha (h, w) upscaled ×``scale`` (bicubic) and recombined, grey inputs written as grey
    (``to_grey``), then ``encode_image``."""
    alpha = upscale_alpha(lr_alpha, scale) if lr_alpha is not None else None
    pixels = to_grey(rgb) if grey else rgb  # (H, W) or (H, W, 3)
    return encode_image(pixels, alpha, fmt=fmt, quality=quality, icc=icc, exif=exif)


def encode_image(
    pixels: np.ndarray, alpha: np.ndarray | None, *, fmt: str, quality: int, icc: bytes, exif: bytes
) -> bytes:
    """(H, W, 3) RGB or (H, W) grey uint8 [+ (H, W) uint8 alpha] -> file bytes of ``fmt`` (png, jpeg,
    webp) with the ICC profile (when it fits the stored colour space) and EXIF; JPEG cannot hold alpha,
    which is then dropped; WebP stores grey as RGB."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {sorted(FORMATS)}")
    if alpha is not None and fmt != "jpeg":
        im = Image.fromarray(np.dstack([pixels, alpha]))  # (H, W, 4) RGBA or (H, W, 2) LA
    else:
        im = Image.fromarray(pixels)
    if fmt == "webp" and im.mode in ("L", "LA"):
        im = im.convert("RGBA" if im.mode == "LA" else "RGB")
    options: dict[str, object] = {}
    if icc and icc_space(icc) == (b"GRAY" if im.mode in ("L", "LA") else b"RGB "):
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
