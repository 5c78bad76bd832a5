"""A contact sheet of the RTM for people (like the paper's Fig. 8): decoded entries grouped by texture.

One row per predicted texture class (the classifier's argmax over DTD's 47 classes), the most populous
class first; each row shows the class name, its entry count, and up to ``per_class`` of its entries in
RTM (farthest-point) order, decoded by the autoencoder to 128×128 pixels and shown at ``thumb`` pixels.
Only the entries shown are decoded.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from patchscaler.model import PatchScalerModel

LABEL_WIDTH = 170
TITLE_HEIGHT = 28
GAP = 4
BACKGROUND = (245, 245, 245)
INK = (20, 20, 20)


def class_names(num_classes: int) -> list[str]:
    """DTD's names (``trainer.data.DTD_CLASSES``) when the classifier has DTD's 47 classes, else
    ``class i``; also ``class i`` where the ``trainer`` package is not installed (it is not needed to build
    an RTM)."""
    try:
        from trainer.data import DTD_CLASSES
    except ImportError:
        DTD_CLASSES = ()
    if num_classes == len(DTD_CLASSES):
        return list(DTD_CLASSES)
    return [f"class {i}" for i in range(num_classes)]


def layout(classes: np.ndarray, per_class: int) -> list[tuple[int, int, list[int]]]:
    """Rows of (class, entries of that class, the first ``per_class`` entry indices), biggest class
    first, ties by class id."""
    ids, counts = np.unique(classes, return_counts=True)
    order = sorted(zip(ids.tolist(), counts.tolist(), strict=True), key=lambda t: (-t[1], t[0]))
    return [(c, n, np.flatnonzero(classes == c)[:per_class].tolist()) for c, n in order]


@torch.inference_mode()
def decode_values(model: PatchScalerModel, values: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Latent values (n, 4, 16, 16) -> uint8 RGB (n, 128, 128, 3)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(values), batch_size):
        z = torch.from_numpy(np.ascontiguousarray(values[i : i + batch_size])).to(device)  # (b, 4, v, v)
        image = model.autoencoder.decode(z)  # (b, 3, 8v, 8v) in [0, 1]
        out.append((image * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 128, 128, 3), np.uint8)  # (n, H, W, 3)


def render(rows: list[tuple[int, int, list[int]]], thumbs: dict[int, np.ndarray], names: list[str], *,
           per_class: int, thumb: int, title: str) -> Image.Image:
    """Draw the sheet: ``thumbs`` maps an entry index to its decoded pixels (H, W, 3) uint8."""
    width = LABEL_WIDTH + per_class * (thumb + GAP) + GAP
    height = TITLE_HEIGHT + len(rows) * (thumb + GAP) + GAP
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((GAP, 8), title, fill=INK, font=font)
    for r, (cls, count, entries) in enumerate(rows):
        top = TITLE_HEIGHT + r * (thumb + GAP)
        draw.text((GAP, top + thumb // 2 - 6), f"{names[cls]} ({count})", fill=INK, font=font)
        for j, e in enumerate(entries):
            tile = Image.fromarray(thumbs[e]).resize((thumb, thumb), Image.Resampling.BICUBIC)
            sheet.paste(tile, (LABEL_WIDTH + j * (thumb + GAP), top))
    return sheet


def contact_sheet(model: PatchScalerModel, values: np.ndarray, classes: np.ndarray, *, per_class: int = 8,
                  thumb: int = 64) -> Image.Image:
    """The sheet of RTM entries ``values`` (M, 4, 16, 16) with predicted ``classes`` (M,)."""
    if per_class < 1 or thumb < 8:
        raise ValueError("per_class must be >= 1 and thumb >= 8")
    rows = layout(np.asarray(classes), per_class)
    shown = [e for _, _, entries in rows for e in entries]
    pixels = decode_values(model, np.asarray(values)[shown])  # (S, H, W, 3)
    thumbs = dict(zip(shown, pixels, strict=True))
    names = class_names(model.config.classifier.num_classes)
    title = f"RTM: {len(classes)} entries in {len(rows)} texture classes (model {model.version})"
    return render(rows, thumbs, names, per_class=per_class, thumb=thumb, title=title)


def contact_sheet_png(model: PatchScalerModel, values: np.ndarray, classes: np.ndarray, *,
                      per_class: int = 8, thumb: int = 64) -> bytes:
    buf = io.BytesIO()
    contact_sheet(model, values, classes, per_class=per_class, thumb=thumb).save(buf, format="PNG")
    return buf.getvalue()
