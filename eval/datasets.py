"""Evaluation sets: their folder layouts, the matching of upscaled results to their inputs, and a
synthetic LSDIR-Test-style set made from HR images.

Layouts (``--dataset-layout``; ``auto`` picks the first that fits):

- ``realsr``: RealSR (V3) — ``*_LR4.png`` next to ``*_HR.png``, in any subfolders (``Canon/Test/4/``,
  ``Nikon/Test/4/``). When the tree has ``Test`` folders only those are used (RealSR's 100 test images).
- ``paired``: an ``LR``/``lq`` folder and an ``HR``/``gt`` folder with the same relative names
  (ResShift's LSDIR-Test, the synthetic sets of :func:`build_synthetic_set` before renaming).
- ``div2k``: DIV2K's validation folders — ``DIV2K_valid_HR/0801.png`` and
  ``DIV2K_valid_LR_bicubic/X4/0801x4.png`` (any ``*_HR`` and ``*_LR*`` folders; under ``X<scale>`` when
  the LR folder has such subfolders); an LR name is its HR name through ``--lr-template`` (default
  ``{}x<scale>``).
- ``lr``: every image is an LR input without a reference (RealSet110, or any folder).

``lr_template`` (``--lr-template '{}x4'``): the LR file name (without extension) made from the image's
key; the key is what ``{}`` stands for, so ``0801x4`` pairs with ``0801``.

Pairing is strict: an LR image without its HR is kept with ``hr=""`` (never dropped); asking for
full-reference metrics on such a set is an error naming the images (:func:`check_references`).

An entry's ``key`` — its path relative to the set without extension and without the ``_LR4`` suffix — is
its image id in every results table. Upscaled images are matched to entries by the same key computed on
the results folder (``Canon_001_LR4.png`` and ``Canon_001.png`` both match ``Canon_001``), falling back to
the file name alone when that is unambiguous. ``<key>_groups.png`` / ``<key>_confidence.png`` next to a
result are its group / confidence maps (``patchscaler upscale --save-maps``); ``_maps/<key>.png`` under the
results root is its group map from ``upscale-dataset --maps``.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.io import (
    MAPS_DIR,
    filesystem,
    is_remote,
    join,
    list_files,
    normalize_root,
    read_bytes,
    relative,
)
from pipeline.scores import split_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LAYOUTS = ("auto", "realsr", "paired", "div2k", "lr")
LR_DIRS = ("lr", "lq", "lr4", "lr_x4", "x4", "input")
HR_DIRS = ("hr", "gt", "target")
_LR_SUFFIX = re.compile(r"_LR(\d+)$", re.IGNORECASE)
_HR_SUFFIX = re.compile(r"_HR$", re.IGNORECASE)
_MAP_SUFFIX = re.compile(r"_(groups|confidence)$")  # maps written by `upscale --save-maps`

# (3, H, W) HR image in [0, 1], generator -> (3, H/s, W/s) LR image in [0, 1]
Degrade = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class DatasetEntry:
    key: str  # image id: relative path without extension and _LRn suffix
    dataset: str
    lr: str  # URI of the LR input
    hr: str  # URI of the reference, "" when there is none
    scale: int


def is_image(uri: str) -> bool:
    return uri.lower().endswith(IMAGE_SUFFIXES)


def _is_div2k_top(top: str, kind: str) -> bool:
    low = top.lower()
    return low.endswith("_hr") if kind == "hr" else ("_lr" in low and not low.endswith("_hr"))


def detect_layout(rels: list[str]) -> str:
    tops = {r.split("/")[0] for r in rels if "/" in r}
    if any(_is_div2k_top(t, "hr") for t in tops) and any(_is_div2k_top(t, "lr") for t in tops):
        return "div2k"
    if any(_LR_SUFFIX.search(posixpath.splitext(r)[0]) for r in rels) and \
            any(_HR_SUFFIX.search(posixpath.splitext(r)[0]) for r in rels):
        return "realsr"
    tops = {r.split("/")[0].lower() for r in rels if "/" in r}
    if tops & set(LR_DIRS) and tops & set(HR_DIRS):
        return "paired"
    return "lr"


def template_key(stem: str, template: str | None) -> str:
    """The key an LR file name (without extension) stands for under ``template`` (``{}x4``: ``0801x4``
    -> ``0801``); the name itself when it does not fit the template."""
    if not template:
        return stem
    before, _, after = template.partition("{}")
    m = re.fullmatch(re.escape(before) + "(.+?)" + re.escape(after), stem)
    return m.group(1) if m else stem


def check_template(template: str) -> str:
    if template.count("{}") != 1 or "/" in template:
        raise ValueError(f"an LR name template has one {{}} (the image's name) and no '/': {template!r}")
    return template


def load_dataset(name: str, root: str, *, layout: str = "auto", scale: int = 4,
                 options: dict[str, Any] | None = None, lr_template: str | None = None) -> list[DatasetEntry]:
    """The entries of the set under ``root`` (folder or ``s3://`` prefix), sorted by key."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {LAYOUTS}")
    root = normalize_root(root)
    uris = [u for u in list_files(root, options or {}) if is_image(u)]
    rels = {relative(root, u): u for u in uris}
    if layout == "auto":
        layout = detect_layout(list(rels))
    if layout == "realsr":
        entries = _realsr(name, rels, scale)
    elif layout == "paired":
        entries = _paired(name, rels, scale, lr_template)
    elif layout == "div2k":
        entries = _div2k(name, rels, scale, lr_template or f"{{}}x{scale}")
    else:
        entries = [DatasetEntry(_lr_key(r, lr_template), name, u, "", split_key(r)[1] or scale)
                   for r, u in rels.items() if not _MAP_SUFFIX.search(posixpath.splitext(r)[0])]
    if not entries:
        raise FileNotFoundError(f"dataset {name!r}: no {layout} images found under {root}")
    return sorted(entries, key=lambda e: e.key)


def _realsr(name: str, rels: dict[str, str], scale: int) -> list[DatasetEntry]:
    if any("test" in (p.lower() for p in r.split("/")[:-1]) for r in rels):
        rels = {r: u for r, u in rels.items() if "test" in (p.lower() for p in r.split("/")[:-1])}
    hrs = {_HR_SUFFIX.sub("", posixpath.splitext(r)[0]): u for r, u in rels.items()
           if _HR_SUFFIX.search(posixpath.splitext(r)[0])}
    out = []
    for rel, uri in rels.items():
        key, s = split_key(rel)
        if s == scale:  # an LR without its HR is kept (hr=""): check_references names it
            out.append(DatasetEntry(key, name, uri, hrs.get(key, ""), scale))
    return out


def _lr_key(rel: str, template: str | None) -> str:
    key = split_key(rel)[0]
    head, base = posixpath.split(key)
    return posixpath.join(head, template_key(base, template)) if head else template_key(base, template)


def _paired(name: str, rels: dict[str, str], scale: int, template: str | None) -> list[DatasetEntry]:
    lr, hr = {}, {}
    for rel, uri in rels.items():
        top, _, rest = rel.partition("/")
        if top.lower() in LR_DIRS:
            lr[_lr_key(rest, template)] = uri
        elif top.lower() in HR_DIRS:
            hr[_HR_SUFFIX.sub("", posixpath.splitext(rest)[0])] = uri
    return [DatasetEntry(k, name, u, hr.get(k, ""), scale) for k, u in lr.items()]


def _div2k(name: str, rels: dict[str, str], scale: int, template: str) -> list[DatasetEntry]:
    """``*_HR/0801.png`` with ``*_LR*/X<scale>/0801x<scale>.png`` (or ``*_LR*/0801x<scale>.png``)."""
    hr, lr = {}, {}
    for rel, uri in rels.items():
        top, _, rest = rel.partition("/")
        if _is_div2k_top(top, "hr"):
            hr[posixpath.splitext(rest)[0]] = uri
        elif _is_div2k_top(top, "lr"):
            lr[rest] = uri
    scaled = {r[len(f"X{scale}/"):]: u for r, u in lr.items() if r.upper().startswith(f"X{scale}/")}
    if scaled or any(re.match(r"x\d+/", r, re.IGNORECASE) for r in lr):
        lr = scaled  # X2/, X3/, X4/ folders: only this scale's
    return [DatasetEntry(_lr_key(r, template), name, u, hr.get(_lr_key(r, template), ""), scale)
            for r, u in lr.items()]


def pair_counts(entries: list[DatasetEntry]) -> dict[str, int]:
    """``{"images": N, "with_hr": P, "without_hr": N - P}`` of one set's entries."""
    with_hr = sum(1 for e in entries if e.hr)
    return {"images": len(entries), "with_hr": with_hr, "without_hr": len(entries) - with_hr}


def check_references(name: str, entries: list[DatasetEntry], reference_metrics: list[str]) -> None:
    """A ``ValueError`` naming the images of set ``name`` that lack their HR image when full-reference
    metrics (``reference_metrics``) are asked for: no silent drop, no silent scoring without a reference."""
    lacking = [e for e in entries if not e.hr]
    if reference_metrics and lacking:
        shown = ", ".join(posixpath.basename(e.lr) for e in lacking[:5]) + (" …" if len(lacking) > 5 else "")
        raise ValueError(f"dataset {name!r}: {len(lacking)} of {len(entries)} LR images have no HR image for "
                         f"{','.join(reference_metrics)}: {shown} (check the layout / --lr-template, or "
                         "leave the full-reference metrics out)")


@dataclass(frozen=True)
class ResultFiles:
    images: dict[str, str]  # result key -> URI of the upscaled image
    maps: dict[str, dict[str, str]]  # result key -> {"groups": URI, "confidence": URI}


def list_results(root: str, options: dict[str, Any] | None = None, suffix: str = "") -> ResultFiles:
    """The upscaled images under ``root`` and their maps, keyed like :class:`DatasetEntry` keys (with
    ``suffix`` stripped from the file names: ``0801_out.png`` -> ``0801``)."""
    root = normalize_root(root)
    images: dict[str, str] = {}
    maps: dict[str, dict[str, str]] = {}
    for uri in list_files(root, options or {}):
        if not is_image(uri):
            continue
        rel = relative(root, uri)
        if rel.startswith(MAPS_DIR + "/"):  # upscale-dataset --maps: _maps/<output path>.png
            maps.setdefault(split_key(rel[len(MAPS_DIR) + 1:])[0], {})["groups"] = uri
            continue
        key = split_key(rel)[0]
        if suffix and key.endswith(suffix):
            key = key[: -len(suffix)]
        m = _MAP_SUFFIX.search(key)
        if m:
            maps.setdefault(key[: m.start()], {})[m.group(1)] = uri
        else:
            images[key] = uri
    return ResultFiles(images, maps)


def _by_name(keys: list[str]) -> dict[str, str]:
    """file name -> key, for names that occur once."""
    count: dict[str, int] = {}
    for k in keys:
        count[posixpath.basename(k)] = count.get(posixpath.basename(k), 0) + 1
    return {posixpath.basename(k): k for k in keys if count[posixpath.basename(k)] == 1}


def match_results(entries: list[DatasetEntry], results: ResultFiles
                  ) -> tuple[list[tuple[DatasetEntry, str, dict[str, str]]], list[DatasetEntry]]:
    """([(entry, result URI, its maps)], [entries without a result])."""
    names = _by_name(list(results.images))
    entry_names = _by_name([e.key for e in entries])
    matched, missing = [], []
    for e in entries:
        key = e.key if e.key in results.images else None
        base = posixpath.basename(e.key)
        if key is None and base in entry_names and base in names:
            key = names[base]
        if key is None:
            missing.append(e)
        else:
            matched.append((e, results.images[key], results.maps.get(key, {})))
    return matched, missing


def results_only(name: str, results: ResultFiles) -> list[tuple[DatasetEntry, str, dict[str, str]]]:
    """Without a dataset: every upscaled image is scored on its own (no-reference metrics only)."""
    return [(DatasetEntry(k, name, "", "", 4), u, results.maps.get(k, {}))
            for k, u in sorted(results.images.items())]


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> (3, H, W) float32 in [0, 1] (alpha dropped, grey expanded)."""
    with Image.open(io.BytesIO(data)) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # (3, H, W)


def load_image(uri: str, options: dict[str, Any] | None = None) -> torch.Tensor:
    return decode_image(read_bytes(uri, options or {}))


def save_png(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(image))


def encode_png(image: torch.Tensor) -> bytes:
    """(3, H, W) in [0, 1] -> 8-bit PNG bytes."""
    arr = (image.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def bicubic_degrade(scale: int = 4) -> Degrade:
    """Plain ×``scale`` bicubic down-sampling (antialiased), quantised to 8 bits; ignores the generator."""
    def degrade(hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        h, w = hr.shape[-2] // scale, hr.shape[-1] // scale
        lr = F.interpolate(hr[None], size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        return (lr[0].clamp(0, 1) * 255.0).round() / 255.0  # (3, h, w)
    return degrade


def realesrgan_degrade(scale: int = 4) -> Degrade:
    """Real-ESRGAN's second-order degradation (the training pipeline's), as the paper builds LSDIR-Test."""
    from patchscaler.training.degradations import DegradationConfig, degrade

    config = DegradationConfig(scale=scale)

    def run(hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return degrade(hr[None], config=config, generator=generator)[0]  # (3, h, w)
    return run


def build_synthetic_set(hr_root: str, out_dir: str, *, degrade: Degrade, name: str = "lsdir-test",
                        scale: int = 4, seed: int = 0, crop: int | None = None,
                        options: dict[str, Any] | None = None) -> list[DatasetEntry]:
    """Write ``<key>_HR.png`` / ``<key>_LR<scale>.png`` pairs (the ``realsr`` layout) into ``out_dir``
    from the HR images under ``hr_root``. Each HR image is centre-cropped to ``crop`` (if given) and to a
    multiple of ``scale``; its LR image comes from ``degrade`` with a generator seeded from ``seed`` and
    the key, so an image's LR does not depend on the other images of the set."""
    out, hr_root = Path(out_dir), normalize_root(hr_root)
    entries = []
    for uri in sorted(u for u in list_files(hr_root, options or {}) if is_image(u)):
        key = _HR_SUFFIX.sub("", posixpath.splitext(relative(hr_root, uri))[0])
        hr = load_image(uri, options)
        h, w = hr.shape[-2:]
        ch, cw = (min(crop, h), min(crop, w)) if crop else (h, w)
        ch, cw = ch - ch % scale, cw - cw % scale
        top, left = (h - ch) // 2, (w - cw) // 2
        hr = hr[:, top : top + ch, left : left + cw]  # (3, ch, cw)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        lr = degrade(hr, g)
        if tuple(lr.shape[-2:]) != (ch // scale, cw // scale):
            raise ValueError(f"degrade gave {tuple(lr.shape)} for HR {tuple(hr.shape)} at ×{scale}")
        hr_path, lr_path = out / f"{key}_HR.png", out / f"{key}_LR{scale}.png"
        save_png(hr, hr_path)
        save_png(lr, lr_path)
        entries.append(DatasetEntry(key, name, str(lr_path), str(hr_path), scale))
    if not entries:
        raise FileNotFoundError(f"no HR images found under {hr_root}")
    return entries


@dataclass
class ScoringPlan:
    rows: list[dict[str, Any]]  # input rows of eval.score (INPUT_COLUMNS)
    maps: dict[tuple[str, str], dict[str, str]]  # (dataset, image id) -> its map URIs
    missing: list[DatasetEntry]  # dataset images without an upscaled result
    entries: dict[str, list[DatasetEntry]]  # dataset name -> its entries


def plan_scoring(results_root: str, datasets: list[tuple[str, str]], *, layout: str = "auto", scale: int = 4,
                 options: dict[str, Any] | None = None, lr_template: str | None = None, suffix: str = "",
                 method: str = "") -> ScoringPlan:
    """Match the upscaled images under ``results_root`` to the ``(name, root)`` datasets. With several
    datasets (or a ``results_root/NAME`` folder) each one's results are in ``results_root/NAME``; with
    none, every image in ``results_root`` is scored on its own. Model/RTM versions and upscaling times come
    from the pipeline's ``manifest.parquet`` where there is one. ``suffix`` (``_out``) is stripped from the
    result file names before matching (another method's outputs); ``method`` is who made them."""
    from eval.results import manifest_info

    options = options or {}
    results_root = normalize_root(results_root)
    fs, _ = filesystem(results_root, options)
    groups, plan_entries = [], {}
    if not datasets:
        name = posixpath.basename(results_root.rstrip("/")) or "results"
        groups.append((results_root, results_only(name, list_results(results_root, options, suffix)), []))
    for name, root in datasets:
        sub = join(results_root, name)
        res_root = sub if len(datasets) > 1 or fs.isdir(filesystem(sub, options)[1]) else results_root
        entries = load_dataset(name, root, layout=layout, scale=scale, options=options,
                               lr_template=lr_template)
        matched, missing = match_results(entries, list_results(res_root, options, suffix))
        groups.append((res_root, matched, missing))
        plan_entries[name] = entries
    plan = ScoringPlan([], {}, [], plan_entries)
    for res_root, matched, missing in groups:
        info = {_norm(k): v for k, v in manifest_info(res_root, options).items()}
        for entry, sr, maps in matched:
            meta = info.get(_norm(sr), {})
            plan.rows.append({"image_id": entry.key, "dataset": entry.dataset, "sr": sr, "hr": entry.hr,
                              "lr": entry.lr, "model_version": meta.get("model_version", ""),
                              "rtm_version": meta.get("rtm_version", ""),
                              "runtime_s": meta.get("runtime_s", float("nan")), "method": method})
            if maps:
                plan.maps[(entry.dataset, entry.key)] = maps
        plan.missing += missing
    return plan


def _norm(uri: str) -> str:
    return uri if is_remote(uri) else os.path.normpath(uri)
