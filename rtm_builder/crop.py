"""Probing the input files, planning the random 128×128 crops, and cutting them.

Probe (``ProbeStage``, Ray tasks): every listed file is read and fully decoded once, so that corrupt,
truncated, zero-byte and non-image files are known before any crop is planned, and the number of
candidates comes out exact. The decoder is the pipeline's (``pipeline.decode.decode_image``):

- L, P, CMYK and other modes are converted to RGB; LA/RGBA/PA lose their alpha (the colour channels
  are the texture);
- 16-bit grey (``I;16*``/``I``) is decoded at 16 bits and rounded to 8 (``v / 257``): the crops are 8-bit,
  as the autoencoder's training images are. Pillow itself reads 16-bit RGB PNGs as 8-bit.

Every file gets a status: ``ok`` or the reason it is skipped: ``empty`` (zero bytes), ``not_an_image``
(no format recognised), ``corrupt`` (truncated or damaged data), ``too_large`` (over ``max_pixels``),
``too_small`` (either side under the crop size), ``unreadable`` (the read itself failed). None of them
stops the job; all are counted in the manifest.

Plan (``plan_crops``, driver, deterministic for a seed): the candidate budget is split over the sources
by weight (largest remainder), and within a source each crop is uniform over *all distinct 128×128
windows* of its usable images: an image is drawn with probability proportional to its number of
windows ``(w - 127)(h - 127)``, then a window uniformly. Each source has its own random stream,
``default_rng([seed, crc32(name)])``, over its images in sorted path order, so one source's plan does
not depend on the others (what ``--add-source`` relies on). Candidate ids are ``NAME:000123``, the
ordinal in the source's plan.

Crop (``CropStage``, Ray tasks): one row per image with its planned windows in, one row per crop out
(``pixels`` (128, 128, 3) uint8). A file that fails on this second read yields no rows; the driver
notices the missing ids and records them.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from pipeline.decode import ImageTooLarge, decode_image
from pipeline.io import read_bytes

CROP = 128  # the paper's crop: one 16x16 latent patch of an f=8 autoencoder (build.crop_size)
STATUS_OK = "ok"
SKIP_REASONS = ("empty", "not_an_image", "corrupt", "too_large", "too_small", "unreadable")

Batch = dict[str, np.ndarray]


def strings(values: Sequence[str]) -> np.ndarray:
    """A string column for a Ray Data numpy batch."""
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


def decode_rgb8(data: bytes, *, max_pixels: int) -> tuple[np.ndarray, str]:
    """File bytes -> (RGB (h, w, 3) uint8, the file's own mode); raises on unreadable input."""
    decoded = decode_image(data, max_pixels=max_pixels)
    rgb = decoded.rgb
    if rgb.dtype == np.uint16:  # 16-bit grey: round to 8 bits (65535 / 255 = 257)
        rgb = ((rgb.astype(np.uint32) + 128) // 257).astype(np.uint8)
    return np.ascontiguousarray(rgb), decoded.mode


def skip_reason(exc: BaseException, data: bytes) -> str:
    if not data:
        return "empty"
    if isinstance(exc, UnidentifiedImageError):
        return "not_an_image"
    if isinstance(exc, ImageTooLarge):
        return "too_large"
    return "corrupt"


@dataclass(frozen=True)
class Probe:
    source: str
    path: str
    status: str  # "ok" or one of SKIP_REASONS
    width: int = 0
    height: int = 0
    mode: str = ""
    error: str = ""


def probe_file(source: str, path: str, *, storage_options: dict[str, Any], max_pixels: int,
               crop: int = CROP) -> Probe:
    try:
        data = read_bytes(path, storage_options)
    except Exception as exc:  # a vanished object or a denied read is this file's problem only
        return Probe(source, path, "unreadable", error=f"{type(exc).__name__}: {exc}")
    try:
        rgb, mode = decode_rgb8(data, max_pixels=max_pixels)
    except Exception as exc:  # corrupt, truncated, empty, not an image, too large
        reason = skip_reason(exc, data)
        error = "no image format recognised" if reason == "not_an_image" else f"{type(exc).__name__}: {exc}"
        return Probe(source, path, reason, error=error)
    h, w = rgb.shape[:2]
    status = STATUS_OK if min(h, w) >= crop else "too_small"
    error = "" if status == STATUS_OK else f"{w}x{h} is smaller than a {crop}x{crop} crop"
    return Probe(source, path, status, width=w, height=h, mode=mode, error=error)


class ProbeStage:
    """Ray Data callable (tasks): rows (source, path) -> the same rows with the probe's facts."""

    def __init__(self, *, storage_options: dict[str, Any], max_pixels: int, crop: int = CROP) -> None:
        self.storage_options = storage_options
        self.max_pixels = max_pixels
        self.crop = crop

    def __call__(self, batch: Batch) -> Batch:
        probes = [
            probe_file(str(s), str(p), storage_options=self.storage_options, max_pixels=self.max_pixels,
                       crop=self.crop)
            for s, p in zip(batch["source"], batch["path"], strict=True)
        ]
        return {
            "source": strings([p.source for p in probes]),
            "path": strings([p.path for p in probes]),
            "status": strings([p.status for p in probes]),
            "width": np.array([p.width for p in probes], dtype=np.int64),
            "height": np.array([p.height for p in probes], dtype=np.int64),
            "mode": strings([p.mode for p in probes]),
            "error": strings([p.error for p in probes]),
        }


def allocate(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder; ties to the first)."""
    if total < 0 or any(w < 0 for w in weights):
        raise ValueError("total and weights must be non-negative")
    whole = float(sum(weights))
    if not weights or whole == 0:
        return [0] * len(weights)
    shares = [total * w / whole for w in weights]
    counts = [int(s) for s in shares]
    order = sorted(range(len(weights)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class PlannedCrop:
    id: str
    source: str
    path: str
    x: int  # left
    y: int  # top

    def box(self, crop: int = CROP) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end-exclusive."""
        return (self.x, self.y, self.x + crop, self.y + crop)


def source_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def plan_source(name: str, images: Sequence[tuple[str, int, int]], count: int, *, seed: int,
                crop: int = CROP) -> list[PlannedCrop]:
    """``count`` crops of one source; ``images`` are (path, width, height), all at least ``crop`` a side."""
    if count == 0:
        return []
    if not images:
        raise ValueError(f"source {name!r} has no usable image for its {count} crops")
    images = sorted(images)
    windows = np.array([(w - crop + 1) * (h - crop + 1) for _, w, h in images], dtype=np.float64)
    rng = source_rng(seed, name)
    per_image = rng.multinomial(count, windows / windows.sum())
    plan: list[PlannedCrop] = []
    for (path, w, h), n in zip(images, per_image, strict=True):
        xs = rng.integers(0, w - crop + 1, size=n)
        ys = rng.integers(0, h - crop + 1, size=n)
        for x, y in zip(xs, ys, strict=True):
            plan.append(PlannedCrop(f"{name}:{len(plan):06d}", name, path, int(x), int(y)))
    return plan


def plan_crops(probes: Sequence[Probe], weights: dict[str, float], total: int, *, seed: int,
               crop: int = CROP) -> tuple[list[PlannedCrop], dict[str, int]]:
    """Plan ``total`` crops over the sources of ``weights`` (name -> weight, in order). Sources without a
    usable image get none; their share goes to the others. Returns the plan and the count per source."""
    usable: dict[str, list[tuple[str, int, int]]] = {name: [] for name in weights}
    for p in probes:
        if p.status == STATUS_OK:
            usable[p.source].append((p.path, p.width, p.height))
    names = list(weights)
    counts = allocate(total, [weights[n] if usable[n] else 0.0 for n in names])
    plan: list[PlannedCrop] = []
    for name, n in zip(names, counts, strict=True):
        plan += plan_source(name, usable[name], n, seed=seed, crop=crop)
    return plan, dict(zip(names, counts, strict=True))


def crop_rows(plan: Sequence[PlannedCrop]) -> list[dict[str, str]]:
    """One Ray Data row per image: its source, path and planned windows (JSON ``[[id, x, y], ...]``)."""
    grouped: dict[tuple[str, str], list[list[Any]]] = {}
    for c in plan:
        grouped.setdefault((c.source, c.path), []).append([c.id, c.x, c.y])
    return [{"source": s, "path": p, "crops": json.dumps(w)} for (s, p), w in grouped.items()]


class CropStage:
    """Ray Data callable (tasks): image rows -> crop rows (id, source, path, box, pixels)."""

    def __init__(self, *, storage_options: dict[str, Any], max_pixels: int, crop: int = CROP) -> None:
        self.storage_options = storage_options
        self.max_pixels = max_pixels
        self.crop = crop

    def __call__(self, batch: Batch) -> Batch:
        ids: list[str] = []
        sources: list[str] = []
        paths: list[str] = []
        boxes: list[tuple[int, int, int, int]] = []
        pixels: list[np.ndarray] = []
        c = self.crop
        for source, path, crops in zip(batch["source"], batch["path"], batch["crops"], strict=True):
            try:
                rgb, _ = decode_rgb8(read_bytes(str(path), self.storage_options), max_pixels=self.max_pixels)
            except Exception:  # changed since the probe: the driver records the missing ids
                continue
            for crop_id, x, y in json.loads(crops):
                window = rgb[y : y + c, x : x + c]  # (c, c, 3)
                if window.shape[:2] != (c, c):
                    continue
                ids.append(crop_id)
                sources.append(str(source))
                paths.append(str(path))
                boxes.append((x, y, x + c, y + c))
                pixels.append(window)
        return {
            "id": strings(ids),
            "source": strings(sources),
            "path": strings(paths),
            "box": np.array(boxes, dtype=np.int32).reshape(-1, 4),
            "pixels": np.stack(pixels) if pixels else np.zeros((0, c, c, 3), np.uint8),  # (n, c, c, 3)
        }
