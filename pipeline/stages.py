"""The pipeline's stages: small callables with their heavy setup (weights, RTM) in ``__init__``.

Each ``__call__`` takes and returns a Ray Data numpy batch (dict of arrays); column layouts are in
``schema.py``. Resources, pool sizes and batch sizes are set in ``build.py`` only. Every stage turns a
failure of one image into an error row (``meta["status"] == "error"``) instead of failing the job.

The math is ``patchscaler.upscaler``'s stage functions, called with the same per-image seed as the
reference upscaler, so the pipeline's output equals ``PatchScaler.upscale`` image for image.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from patchscaler.colorfix import DEFAULT_COLOR_FIX
from patchscaler.diffusion import NoiseSchedule
from patchscaler.model import PatchScalerModel
from patchscaler.patching import plan_grid, split_patches
from patchscaler.precision import resolve_precision
from patchscaler.sampling import fused_refine_patches
from patchscaler.upscaler import (
    check_options,
    finish,
    fix_colors,
    group_map,
    plan_patches,
    refine,
    restore,
    retrieve,
)
from pipeline import schema as S
from pipeline.decode import GREY_MODES, decode_image, encode_group_map, encode_output, to_float, to_uint8
from pipeline.io import read_bytes, write_bytes_atomic
from pipeline.shared import SharedModel, SharedRTM, load_model_source, load_rtm_source

Batch = dict[str, np.ndarray]


def load_model(weights: str | SharedModel, *, device: str, mode: str | None, autoencoder: str | None
               ) -> PatchScalerModel:
    """The checkpoint (a path, or the driver's copy in the object store: ``pipeline/shared.py``) on
    ``device``, with the sampling mode overridden when ``mode`` is given."""
    model = load_model_source(weights, device=device, autoencoder=autoencoder)
    if mode:
        model.config = model.config.replace(sampler=replace(model.config.sampler, mode=mode))
    return model


def _metas(batch: Batch) -> list[dict[str, Any]]:
    return [S.load_meta(m) for m in batch[S.META]]


class ReadStage:
    """Read each source file's bytes (CPU tasks): adds ``data``. Rows that are already errors (an input
    ``plan_outputs`` refused) are not read. Transient storage errors are retried (``io.retrying``)."""

    def __init__(self, *, storage_options: dict[str, Any]) -> None:
        self.storage_options = storage_options

    def __call__(self, batch: Batch) -> Batch:
        metas, data = _metas(batch), []
        for meta in metas:
            start = time.perf_counter()
            blob = b""
            if meta["status"] == S.STATUS_OK:
                try:
                    blob = read_bytes(meta["source"], self.storage_options)
                    meta["bytes_in"] = len(blob)
                except Exception as exc:  # a missing/unreadable object is this image's error, not the job's
                    S.fail(meta, "read", exc, subject=meta["source"])
            meta["seconds"]["read"] = time.perf_counter() - start
            data.append(blob)
        return {S.IMAGE_ID: batch[S.IMAGE_ID], S.META: S.object_column([S.dump_meta(m) for m in metas]),
                S.DATA: S.object_column(data)}


class DecodeStage:
    """Decode bytes to pixels, alpha and colour metadata (CPU tasks); ``data`` becomes ``pixels``."""

    def __init__(self, *, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    def __call__(self, batch: Batch) -> Batch:
        metas = _metas(batch)
        pixels, alpha, icc, exif = [], [], [], []
        for meta, blob in zip(metas, batch[S.DATA], strict=True):
            start = time.perf_counter()
            px = a = c = e = b""
            if meta["status"] == S.STATUS_OK:
                try:
                    dec = decode_image(bytes(blob), max_pixels=self.max_pixels)
                    meta.update(mode_in=dec.mode, shape=list(dec.rgb.shape[:2]), dtype=str(dec.rgb.dtype))
                    px, c, e = dec.rgb.tobytes(), dec.icc, dec.exif
                    a = dec.alpha.tobytes() if dec.alpha is not None else b""
                except Exception as exc:  # corrupt, empty, not an image, too large
                    S.fail(meta, "decode", exc, subject=meta["source"])
            meta["seconds"]["decode"] = time.perf_counter() - start
            pixels.append(px)
            alpha.append(a)
            icc.append(c)
            exif.append(e)
        return {S.IMAGE_ID: batch[S.IMAGE_ID], S.META: S.object_column([S.dump_meta(m) for m in metas]),
                S.PIXELS: S.object_column(pixels), S.ALPHA: S.object_column(alpha),
                S.ICC: S.object_column(icc), S.EXIF: S.object_column(exif)}


def pixels_of(meta: dict[str, Any], blob: bytes) -> np.ndarray:
    h, w = meta["shape"]
    return np.frombuffer(blob, dtype=np.dtype(meta["dtype"])).reshape(h, w, 3)  # (h, w, 3)


def explode(
    image_id: str, meta: dict[str, Any], side: tuple[bytes, ...], tensors: dict[str, np.ndarray],
) -> Batch:
    """One image -> its image row followed by one row per patch (``schema.ROW_COLUMNS``)."""
    m = len(tensors[S.PATCH])
    groups = tensors.pop(S.GROUP)
    out: Batch = {
        S.IMAGE_ID: S.object_column([image_id] * (m + 1)),
        S.PATCH_INDEX: np.concatenate([[S.IMAGE_ROW], np.arange(m)]).astype(np.int64),
        S.GROUP: np.concatenate([[S.IMAGE_ROW], groups]).astype(np.int64),
    }
    for name, value in tensors.items():
        out[name] = np.concatenate([np.zeros((1, *value.shape[1:]), value.dtype), value])
    out[S.SECONDS] = np.zeros(m + 1, np.float64)
    out[S.ERROR] = S.object_column([""] * (m + 1))
    out[S.META] = S.object_column([S.dump_meta(meta)] + [""] * m)
    for name, blob in zip((S.ALPHA, S.ICC, S.EXIF, S.PIXELS), side, strict=True):
        out[name] = S.object_column([blob] + [b""] * m)
    return out


def concat_batches(parts: list[Batch]) -> Batch:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def take(batch: Batch, rows: np.ndarray) -> Batch:
    return {k: v[rows] for k, v in batch.items()}


class GRMStage:
    """Per image: encode + GRM -> (y_HR, C), patches, groups, noise (seeded as the reference does),
    texture retrieval; explodes each image into its image row and one row per patch. The images of one
    call become one block (see ``build.py``). An image whose ``meta["map"]`` names a file gets its group
    map written there (``--maps``): one pixel per latent pixel, the group of the nearest patch (Fig. 7).
    With ``refine="none"`` there is no retrieval (scores and RTM ids stay zero: nothing samples). The
    image row carries the LR pixels on to the assembler unless ``color_fix`` is ``none``."""

    def __init__(self, *, weights: str | SharedModel, rtm: str | SharedRTM, device: str, seed: int,
                 mode: str | None, autoencoder: str | None, storage_options: dict[str, Any],
                 precision: str | None = None, refine: str = "diffusion", color_fix: str | None = None
                 ) -> None:
        self.refine, self.color_fix = refine, color_fix or DEFAULT_COLOR_FIX
        check_options(refine=self.refine, color_fix=self.color_fix)
        self.model = load_model(weights, device=device, mode=mode, autoencoder=autoencoder)
        self.precision = resolve_precision(precision, device)
        self.storage_options = storage_options
        self.rtm, manifest = load_rtm_source(rtm, use_gpu=device.startswith("cuda"))
        self.rtm_version = str(manifest.get("version", ""))
        self.seed = seed
        cfg = self.model.config
        c, v, k = cfg.latent_channels, cfg.sampler.patch_size, cfg.texture_encoder.top_k
        self.empty = {S.PATCH: np.zeros((0, c, v, v), np.float32),
                      S.SCORES: np.zeros((0, k), np.float32), S.RTM_IDX: np.zeros((0, k), np.int64),
                      S.GROUP: np.zeros((0,), np.int64)}

    def _plan(self, meta: dict[str, Any], blob: bytes) -> dict[str, np.ndarray]:
        image = to_float(pixels_of(meta, blob))  # (3, h, w)
        y_hr, conf = restore(self.model, image)  # float32 under every precision
        plan = plan_patches(y_hr, conf, self.model, torch.Generator().manual_seed(self.seed))
        if self.refine == "none":  # nothing samples: no texture retrieval
            k, m = self.model.config.texture_encoder.top_k, len(plan.patches)
            scores, idx = torch.zeros(m, k), torch.zeros(m, k, dtype=torch.long)
        else:
            scores, idx = retrieve(self.model, self.rtm, plan.patches, precision=self.precision)
        meta.update(latent=[plan.grid.height, plan.grid.width], num_patches=len(plan.patches),
                    groups=[int((plan.groups == g).sum()) for g in range(3)])
        if meta.get("map"):
            png = encode_group_map(group_map(plan.groups, plan.grid).numpy())  # (h_lat, w_lat) PNG
            write_bytes_atomic(meta["map"], png, self.storage_options)
        return {S.PATCH: plan.patches.float().numpy(),
                S.SCORES: scores.float().numpy(), S.RTM_IDX: idx.long().numpy(),
                S.GROUP: plan.groups.long().numpy()}

    def __call__(self, batch: Batch) -> Batch:
        parts = []
        for i, meta in enumerate(_metas(batch)):
            start = time.perf_counter()
            tensors = {k: v.copy() for k, v in self.empty.items()}
            meta["model_version"], meta["rtm_version"] = self.model.version, self.rtm_version
            if meta["status"] == S.STATUS_OK:
                try:
                    tensors = self._plan(meta, bytes(batch[S.PIXELS][i]))
                except Exception as exc:  # e.g. out of memory on one huge image
                    S.fail(meta, "grm", exc)
            meta["seconds"]["grm"] = time.perf_counter() - start
            side = (bytes(batch[S.ALPHA][i]), bytes(batch[S.ICC][i]), bytes(batch[S.EXIF][i]),
                    bytes(batch[S.PIXELS][i]) if self.color_fix != "none" else b"")
            parts.append(explode(str(batch[S.IMAGE_ID][i]), meta, side, tensors))
        rows = concat_batches(parts)
        # image rows first, then the patches by group: a pool's share of the block is one slice
        return take(rows, np.argsort(rows[S.GROUP], kind="stable"))


# --- fused sampling ---------------------------------------------------------------------------------
# Fused Patch-adaptive Group Sampling: all three groups in one loop over a shared time grid
# (``patchscaler.sampling.fused_refine_patches``): the result equals per-group sampling patch for patch,
# while a model call may carry patches of several groups: fewer, fuller batches, one actor pool instead
# of three.


@torch.no_grad()
def fused_refine(
    model: PatchScalerModel,
    y0: torch.Tensor,
    groups: torch.Tensor,
    noise: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    batch_size: int | None = None,
    prompt_cache: bool = True,
    precision: str = "fp32",
) -> torch.Tensor:
    """Same arguments and result as ``patchscaler.upscaler.refine``: x0 patches (M, 4, V, V)."""
    return fused_refine_patches(
        patch_dit=model.patch_dit, texture_encoder=model.texture_encoder, sampler=model.config.sampler,
        y0=y0, groups=groups, noise=noise, values=values, scores=scores, schedule=schedule,
        batch_size=batch_size, prompt_cache=prompt_cache, precision=precision,
    )


def redraw_noise(batch: Batch, rows: np.ndarray, *, seed: int, config: Any) -> np.ndarray:
    """Eq. 7's noise of the patch rows ``rows`` (M, C, V, V), drawn again as ``plan_patches`` drew it in
    the GRM stage: the image's whole latent from ``Generator().manual_seed(seed)``, cut like y_HR. The
    image row of each image is in the block (blocks hold whole images), with the latent's size."""
    ids, index = batch[S.IMAGE_ID], batch[S.PATCH_INDEX]
    heads = np.flatnonzero(index == S.IMAGE_ROW)
    latent = {ids[h]: S.load_meta(batch[S.META][h])["latent"] for h in heads}
    c, s = config.latent_channels, config.sampler
    out = np.empty((len(rows), c, s.patch_size, s.patch_size), np.float32)
    mine = ids[rows]
    for image in dict.fromkeys(mine):
        at = np.flatnonzero(mine == image)
        h, w = latent[image]
        full = torch.randn((c, h, w), generator=torch.Generator().manual_seed(seed))  # (C, h, w)
        grid = plan_grid(h, w, patch=s.patch_size, overlap=s.overlap)
        out[at] = split_patches(full, grid)[torch.from_numpy(index[rows[at]].astype(np.int64))].numpy()
    return out


class PatchDiTStage:
    """Patch-DiT sampling over the patches of one group (``group``) from many images, or of all groups
    in one loop (``group=None``: the fused mode, ``fused_refine``). Rows of other groups and image rows
    pass through untouched, so the pools can be chained. ``refine`` runs each patch with its group's
    (τ, N). ``crash_marker`` is for fault-tolerance tests only: the first call that finds no file there
    creates it and kills the actor's process."""

    def __init__(self, *, weights: str | SharedModel, rtm: str | SharedRTM, device: str, mode: str | None,
                 autoencoder: str | None, group: int | None, seed: int, crash_marker: str | None = None,
                 precision: str | None = None) -> None:
        self.model = load_model(weights, device=device, mode=mode, autoencoder=autoencoder)
        self.precision = resolve_precision(precision, device)
        self.rtm, _ = load_rtm_source(rtm, use_gpu=False)  # only its values are gathered here, no search
        self.schedule = NoiseSchedule(config=self.model.config.sampler)
        self.group = group
        self.seed = seed
        self.crash_marker = crash_marker

    def _crash_once(self) -> None:
        if self.crash_marker and not os.path.exists(self.crash_marker):
            with open(self.crash_marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)

    def __call__(self, batch: Batch) -> Batch:
        groups_in = batch[S.GROUP]
        mine = groups_in != S.IMAGE_ROW if self.group is None else groups_in == self.group
        rows = np.flatnonzero(mine & (batch[S.ERROR] == ""))  # not the patches of a failed image
        if not len(rows):
            return batch
        self._crash_once()
        start = time.perf_counter()
        out = {k: v.copy() if k in (S.PATCH, S.SECONDS, S.ERROR) else v for k, v in batch.items()}
        y0 = torch.from_numpy(np.ascontiguousarray(batch[S.PATCH][rows]))
        groups = torch.from_numpy(groups_in[rows].astype(np.int64))
        noise = torch.from_numpy(redraw_noise(batch, rows, seed=self.seed, config=self.model.config))
        scores = torch.from_numpy(np.ascontiguousarray(batch[S.SCORES][rows]))
        values = self.rtm.gather(torch.from_numpy(batch[S.RTM_IDX][rows].astype(np.int64)))
        sample = fused_refine if self.group is None else refine
        try:
            x0 = sample(self.model, y0, groups, noise, values, scores, schedule=self.schedule,
                        precision=self.precision)
            out[S.PATCH][rows] = x0.float().cpu().numpy()
        except Exception as exc:  # the images of these patches become error rows in the assembly
            out[S.ERROR][rows] = f"dit: {type(exc).__name__}: {exc}"
        out[S.SECONDS][rows] = (time.perf_counter() - start) / len(rows)
        return out


class AssembleStage:
    """Per image of a block: merge the refined patches (feathered overlaps), decode (tiled when large),
    encode as ``patchscaler upscale`` does (``decode.encode_output``: alpha, grey, ICC, EXIF), write
    atomically; returns the images' manifest rows. A failed write (after ``io.retrying``'s attempts) is
    that image's error row (stage ``write``), never a failed actor. With ``score`` the rows also carry the
    written bytes and the scoring info to the scoring pool (``schema.ENCODED``/``EVAL``).
    ``refine="none"``: the y0 patches (the GRM's y_HR) are merged instead of x0. ``color_fix``: as
    ``PatchScaler.upscale`` does (``upscaler.fix_colors`` against the image row's LR pixels)."""

    def __init__(self, *, weights: str | SharedModel, device: str, autoencoder: str | None, fmt: str,
                 quality: int, storage_options: dict[str, Any], sampling: str, seed: int,
                 score: bool, precision: str | None = None, refine: str = "diffusion",
                 color_fix: str | None = None) -> None:
        self.refine, self.color_fix = refine, color_fix or DEFAULT_COLOR_FIX
        check_options(refine=self.refine, color_fix=self.color_fix)
        self.model = load_model(weights, device=device, mode=None, autoencoder=autoencoder)
        self.precision = resolve_precision(precision, device)
        self.fmt, self.quality = fmt, quality
        self.storage_options = storage_options
        self.sampling, self.seed = sampling, seed
        self.score = score

    def _assemble(self, meta: dict[str, Any], rows: Batch, head: int) -> tuple[tuple[int, int], bytes]:
        """The image's patches -> ((H, W), the output file's bytes)."""
        patch_rows = np.flatnonzero(rows[S.PATCH_INDEX] != S.IMAGE_ROW)
        patch_rows = patch_rows[np.argsort(rows[S.PATCH_INDEX][patch_rows], kind="stable")]
        found = rows[S.PATCH_INDEX][patch_rows]
        if not np.array_equal(found, np.arange(meta["num_patches"])):
            raise RuntimeError(f"expected {meta['num_patches']} patches, got {len(found)}")
        errors = [e for e in rows[S.ERROR][patch_rows] if e]
        if errors:
            raise RuntimeError(errors[0])
        meta["seconds"]["dit"] = float(rows[S.SECONDS][patch_rows].sum())
        start = time.perf_counter()
        cfg = self.model.config
        grid = plan_grid(*meta["latent"], patch=cfg.sampler.patch_size, overlap=cfg.sampler.overlap)
        x0 = torch.from_numpy(np.ascontiguousarray(rows[S.PATCH][patch_rows]))  # (M, C, V, V), refined
        # (with --refine none the GRM's patches as they are)
        image = finish(self.model, x0, grid, tuple(meta["shape"]), precision=self.precision)  # (3, H, W)
        if self.color_fix != "none":
            lr = to_float(pixels_of(meta, bytes(rows[S.PIXELS][head])))  # (3, h, w)
            image = fix_colors(image, lr, scale=cfg.scale, method=self.color_fix)
        rgb = to_uint8(image)  # (H, W, 3)
        lr_alpha = None
        if len(rows[S.ALPHA][head]):
            lr_alpha = np.frombuffer(bytes(rows[S.ALPHA][head]), np.uint8).reshape(*meta["shape"])  # (h, w)
        data = encode_output(rgb, lr_alpha, grey=meta["mode_in"] in GREY_MODES, scale=cfg.scale,
                             fmt=self.fmt, quality=self.quality, icc=bytes(rows[S.ICC][head]),
                             exif=bytes(rows[S.EXIF][head]))
        meta["seconds"]["assemble"] = time.perf_counter() - start
        return (rgb.shape[0], rgb.shape[1]), data

    def _one(self, rows: Batch) -> tuple[dict[str, Any], bytes, str]:
        head = int(np.flatnonzero(rows[S.PATCH_INDEX] == S.IMAGE_ROW)[0])
        meta = S.load_meta(rows[S.META][head])
        shape, data = (0, 0), b""
        if meta["status"] == S.STATUS_OK:
            try:
                shape, data = self._assemble(meta, rows, head)
            except Exception as exc:
                S.fail(meta, "assemble", exc, subject=meta["source"])
        if meta["status"] == S.STATUS_OK:
            start = time.perf_counter()
            try:
                write_bytes_atomic(meta["output"], data, self.storage_options)
            except Exception as exc:  # storage down, permission denied: this image's error row
                S.fail(meta, "write", exc, subject=meta["output"])
            meta["seconds"]["write"] = time.perf_counter() - start
        if meta["status"] != S.STATUS_OK:
            shape, data = (0, 0), b""
        row = S.manifest_row(meta, image_id_=str(rows[S.IMAGE_ID][head]), sampling=self.sampling,
                             seed=self.seed, finished_at=time.time(), out_shape=shape, bytes_out=len(data))
        return row, data, json.dumps(meta.get("eval") or {})

    def __call__(self, block: Batch) -> Batch:
        """A block of whole images -> one manifest row per image (``schema.MANIFEST_SCHEMA``), plus
        ``encoded`` and ``eval`` when scoring."""
        ids = block[S.IMAGE_ID]
        heads = np.flatnonzero(block[S.PATCH_INDEX] == S.IMAGE_ROW)
        done = [self._one(take(block, np.flatnonzero(ids == ids[h]))) for h in heads]
        rows = [r for r, _, _ in done]
        out = {f.name: S.object_column([r[f.name] for r in rows]) if f.type == "string"
               else np.array([r[f.name] for r in rows], dtype=f.type.to_pandas_dtype())
               for f in S.MANIFEST_SCHEMA}
        if self.score:
            out[S.ENCODED] = S.object_column([d for _, d, _ in done])
            out[S.EVAL] = S.object_column([e for _, _, e in done])
        return out
