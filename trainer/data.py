"""Training data: HR image folders (local or ``s3://``), random HR crops, and DTD-layout texture folders.

- HR sources are searched recursively for image files, so LSDIR (``LSDIR/0001000/*.png``), DIV2K
  (``DIV2K_train_HR/*.png``) and any other folder layout work the same.
- A DTD-layout folder holds one sub-folder per texture class (``dtd/images/<class>/*.jpg`` or
  ``<root>/<class>/*``); the label is the class's index in ``DTD_CLASSES``, so a folder with only some of
  the 47 classes still gets the right labels.
- Unreadable files (and images smaller than the crop) are skipped and counted, never fatal; every crop
  carries the running counts of the data-loader worker that read it, so the loop can report them.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# The 47 classes of the Describable Textures Dataset (Cimpoi et al. 2014), in DTD's own (sorted) order.
DTD_CLASSES: tuple[str, ...] = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked",
    "crosshatched", "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid",
    "grooved", "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed",
    "paisley", "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared",
    "spiralled", "sprinkled", "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled",
    "woven", "wrinkled", "zigzagged",
)


def _is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_SUFFIXES)


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def list_images(source: str) -> list[str]:
    """Every image file under ``source`` (a folder or ``s3://`` prefix, searched recursively), sorted; for
    the output of ``prepare-data`` (a folder with ``manifest.parquet``), the sub-images its manifest lists,
    without walking the folder."""
    from trainer.prepare import MANIFEST_FILE, read_manifest

    fs, root = fsspec.core.url_to_fs(source)
    if not fs.exists(root):
        raise FileNotFoundError(f"training data not found: {source}")
    if fs.isdir(root) and fs.exists(root.rstrip("/") + "/" + MANIFEST_FILE):
        return sorted(read_manifest(source.rstrip("/")))
    if fs.isfile(root):
        return [_url(fs, root)] if _is_image(root) else []
    return sorted(_url(fs, p) for p in fs.find(root) if _is_image(p))


def list_textures(source: str) -> list[tuple[str, int]]:
    """(image path, DTD label) of a DTD-layout folder: ``source/images/<class>/*`` or ``source/<class>/*``."""
    fs, root = fsspec.core.url_to_fs(source)
    if not fs.exists(root):
        raise FileNotFoundError(f"texture data not found: {source}")
    base = root.rstrip("/") + "/images" if fs.isdir(root.rstrip("/") + "/images") else root.rstrip("/")
    classes = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(base, detail=False) if fs.isdir(p))
    unknown = [c for c in classes if c not in DTD_CLASSES]
    if unknown:
        raise ValueError(f"{source}: class folders that are not DTD classes: {unknown}")
    samples = []
    for name in classes:
        files = sorted(p for p in fs.find(f"{base}/{name}") if _is_image(p))
        samples += [(_url(fs, p), DTD_CLASSES.index(name)) for p in files]
    if not samples:
        raise ValueError(f"{source}: no images in DTD class folders")
    return samples


def balanced_files(sources: tuple[str, ...] | list[str]) -> tuple[list[str], list[float]]:
    """The images of all sources, with weights that draw every source equally often."""
    files: list[str] = []
    weights: list[float] = []
    for source in sources:
        found = list_images(source)
        if not found:
            raise ValueError(f"no images under {source}")
        files += found
        weights += [1.0 / len(found)] * len(found)
    return files, weights


def read_image(path: str) -> torch.Tensor | None:
    """RGB image as (3, H, W) float in [0, 1], or None when the file cannot be read or decoded."""
    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    except Exception:  # any unreadable or corrupt file is skipped by the caller and counted
        return None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # (3, H, W)


@dataclass
class ReadStats:
    read: int = 0
    unreadable: int = 0
    too_small: int = 0


class RandomCrops(IterableDataset):
    """An endless stream of random ``crop`` x ``crop`` crops (random flips, optionally random colours):
    for each file drawn (by ``weights``, default uniform), ``crops_per_image`` crops.
    Items: (crop (3, c, c), label, unreadable, too_small, worker id);
    the label is -1 for unlabelled HR images."""

    def __init__(self, *, files: list[str], crop: int, seed: int, crops_per_image: int = 4,
                 labels: list[int] | None = None, color_augment: bool = False,
                 weights: list[float] | None = None) -> None:
        super().__init__()
        if not files:
            raise ValueError("no training images")
        self.files, self.labels = files, labels
        self.crop, self.seed, self.crops_per_image = crop, seed, crops_per_image
        self.color_augment = color_augment
        # Sampling weight per file (e.g. 1 / files-in-its-source, so that every source is drawn equally).
        self.weights = torch.tensor(weights or [1.0] * len(files), dtype=torch.float64)
        self.stats = ReadStats()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, int, int, int]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        g = torch.Generator().manual_seed(self.seed * 1000 + worker)
        failures_in_a_row = 0
        while True:
            i = int(torch.multinomial(self.weights, 1, generator=g))
            image = read_image(self.files[i])
            small = image is not None and min(image.shape[-2:]) < self.crop
            if image is None or small:
                self.stats.unreadable += image is None
                self.stats.too_small += bool(small)
                failures_in_a_row += 1
                if failures_in_a_row >= max(100, 4 * len(self.files)):
                    raise RuntimeError(f"no usable image among {len(self.files)} files (all unreadable"
                                       f" or smaller than {self.crop} px): {self.stats}")
                continue
            failures_in_a_row = 0
            self.stats.read += 1
            label = self.labels[i] if self.labels is not None else -1
            for _ in range(self.crops_per_image):
                crop = random_crop(image, self.crop, g)
                if self.color_augment:
                    crop = color_augment(crop, g)
                yield crop, label, self.stats.unreadable, self.stats.too_small, worker


def color_augment(image: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random colour change of a (3, h, w) crop in [0, 1]: channel permutation, saturation (0.4..1.6 of
    the grey-to-colour distance) and a per-channel gain (0.8..1.2). Small colour-poor training sets
    otherwise teach an autoencoder only the colours they happen to contain."""
    out = image[torch.randperm(3, generator=g)]
    gray = (0.299 * out[0] + 0.587 * out[1] + 0.114 * out[2]).unsqueeze(0)  # (1, h, w)
    sat = 0.4 + 1.2 * float(torch.rand((), generator=g))
    gain = 0.8 + 0.4 * torch.rand(3, 1, 1, generator=g)  # (3, 1, 1)
    return ((gray + sat * (out - gray)) * gain).clamp(0.0, 1.0)


def random_crop(image: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """A random (3, size, size) window, flipped horizontally with probability 1/2."""
    h, w = image.shape[-2:]
    top = int(torch.randint(h - size + 1, (), generator=g))
    left = int(torch.randint(w - size + 1, (), generator=g))
    out = image[:, top : top + size, left : left + size]
    if float(torch.rand((), generator=g)) < 0.5:
        out = out.flip(-1)
    return out.contiguous()


class CropBatches:
    """Batches from ``RandomCrops`` through a ``DataLoader``; keeps the skip counts of every loader worker.

    Iterating yields (images (B, 3, c, c), labels (B,))."""

    def __init__(self, dataset: RandomCrops, *, batch_size: int, num_workers: int = 0,
                 prefetch_factor: int = 4, pin_memory: bool = False) -> None:
        # num_workers > 0: that many processes read and decode ahead, each up to ``prefetch_factor``
        # batches; pinned (page-locked) host memory makes the copy to a GPU faster
        extra = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
        self.loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                 persistent_workers=num_workers > 0, pin_memory=pin_memory, **extra)
        self._counts: dict[int, tuple[int, int]] = {}
        self._iter = iter(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, unreadable, small, workers = next(self._iter)
        for u, s, w in zip(unreadable.tolist(), small.tolist(), workers.tolist(), strict=True):
            old = self._counts.get(w, (0, 0))
            self._counts[w] = (max(old[0], u), max(old[1], s))
        return images, labels

    @property
    def skipped(self) -> dict[str, int]:
        """Files skipped so far: {"unreadable": n, "too_small": m} over all loader workers."""
        return {"unreadable": sum(c[0] for c in self._counts.values()),
                "too_small": sum(c[1] for c in self._counts.values())}
