"""Test data for the pipeline tests: a folder of small images of mixed sizes, modes and formats (plus a
corrupt, an empty and a non-image file), a tiny checkpoint whose group thresholds split those images'
patches into all three groups, the single-process reference output of an input, and the pipeline's
stages chained in this process (no Ray)."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from conftest import make_tiny_model, make_tiny_rtm
from PIL import Image, ImageCms

from patchscaler.upscaler import PatchScaler, plan_patches, restore
from patchscaler.weights import load_checkpoint, load_rtm, save_checkpoint, save_rtm
from pipeline import schema as S
from pipeline.decode import EXTENSIONS, decode_image, to_float, to_grey, to_uint8
from pipeline.io import plan_outputs
from pipeline.stages import AssembleStage, DecodeStage, GRMStage, PatchDiTStage, ReadStage

BAD_FILES = ("corrupt.png", "empty.png", "notes.txt")
ALPHA_FILES = ("rgba.png", "la.png", "p_transparent.png", "rgba_webp.webp")
GREY_FILES = ("grey.png", "grey16.png", "la.png")  # written back as grey: L, L, LA


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    """Smooth-ish random RGB: a blurred noise field, so the images are not all alike."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // 4 + 1), max(1, w // 4 + 1), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def im(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(_noise(h, w, seed))


def grey(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(_noise(h, w, seed)[:, :, 0])


def write_images(folder: Path) -> list[str]:
    """~20 readable images and the three bad files; returns the readable files' relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sub").mkdir(exist_ok=True)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    saves: dict[str, tuple[Image.Image, dict]] = {
        "rgb_24x32.png": (im(24, 32, 1), {}),
        "rgb_48x40.png": (im(48, 40, 2), {"icc_profile": icc}),
        "rgb_16.png": (im(16, 16, 3), {}),
        "tiny_5x3.png": (im(5, 3, 4), {}),  # smaller than one latent patch
        "one_pixel.png": (im(1, 1, 5), {}),
        "grey.png": (grey(32, 24, 6), {}),
        "rgb_jpeg.jpg": (im(40, 32, 7), {"quality": 92}),
        "rgb_webp.webp": (im(24, 24, 8), {"quality": 90}),
        "rgb_bmp.bmp": (im(20, 28, 9), {}),
        "rgb_tiff.tif": (im(16, 24, 10), {}),
        "palette.gif": (im(20, 20, 11).convert("P"), {}),
        "p_opaque.png": (im(16, 40, 12).convert("P"), {}),
        "cmyk.jpg": (im(32, 32, 13).convert("CMYK"), {"quality": 95}),
        "sub/nested.png": (im(28, 20, 14), {}),
        "dup.png": (im(16, 16, 15), {}),
        "dup.jpg": (im(16, 16, 16), {"quality": 90}),
    }
    rgba = np.dstack([_noise(33, 18, 17), np.tile(np.linspace(0, 255, 18).astype(np.uint8), (33, 1))])
    saves["rgba.png"] = (Image.fromarray(rgba), {})
    saves["rgba_webp.webp"] = (Image.fromarray(rgba[:24, :16]), {"lossless": True})
    saves["la.png"] = (Image.merge("LA", [grey(20, 28, 18), grey(20, 28, 19)]), {})
    saves["p_transparent.png"] = (im(24, 24, 20).convert("P"), {"transparency": 0})
    rotated = im(24, 40, 21)
    exif = rotated.getexif()
    exif[0x0112] = 6  # display rotated by 90 degrees
    saves["exif_rotated.jpg"] = (rotated, {"exif": exif.tobytes(), "icc_profile": icc, "quality": 95})
    deep = (np.linspace(0, 65535, 24 * 20).reshape(24, 20)).astype(np.uint16)
    saves["grey16.png"] = (Image.fromarray(deep), {})
    for name, (image, kw) in saves.items():
        image.save(folder / name, **kw)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image\n")
    (folder / ".hidden.png").write_bytes(b"hidden files are not inputs")
    return sorted(saves)


def make_assets(folder: Path, images: Path, names: list[str]) -> tuple[str, str]:
    """A tiny checkpoint and RTM under ``folder``; γ1/γ2 are set at the tertiles of the patch
    confidences of ``images``, so that all three groups (and pools) get patches."""
    model = make_tiny_model()
    means = []
    for name in names:
        image = to_float(decode_image((images / name).read_bytes(), max_pixels=1 << 24).rgb)
        y_hr, conf = restore(model, image)
        means.append(plan_patches(y_hr, conf, model, torch.Generator().manual_seed(0)).mean_conf)
    gamma2, gamma1 = torch.quantile(torch.cat(means), torch.tensor([0.34, 0.67])).tolist()
    model.config = model.config.replace(sampler=replace(model.config.sampler, gamma1=gamma1, gamma2=gamma2))
    weights, rtm_dir = str(folder / "weights"), str(folder / "rtm")
    save_checkpoint(model, weights)
    rtm = make_tiny_rtm(model)
    save_rtm(rtm_dir, keys=rtm.keys, values=rtm.values, manifest={"name": "test"})
    return weights, rtm_dir


def reference_images(weights: str, rtm: str, images: Path, names: list[str], seed: int,
                     mode: str | None = None, **options: str) -> dict[str, np.ndarray]:
    """The single-process reference upscaler's output (H, W, 3) uint8 per input, same seed, as it reads
    back from the written file: grey inputs are written as grey (luma replicated by ``read_rgb``)."""
    model = load_checkpoint(weights)
    if mode:
        model.config = model.config.replace(sampler=replace(model.config.sampler, mode=mode))
    upscaler = PatchScaler(model=model, rtm=load_rtm(rtm)[0], **options)  # refine, color_fix
    out = {}
    for name in names:
        dec = decode_image((images / name).read_bytes(), max_pixels=1 << 24)
        result = upscaler.upscale(to_float(dec.rgb), generator=torch.Generator().manual_seed(seed))
        rgb = to_uint8(result.image)  # (H, W, 3)
        out[name] = np.repeat(to_grey(rgb)[:, :, None], 3, axis=2) if dec.grey else rgb
    return out


class Stages:
    """The pipeline's stages chained in this process, one image per batch, the per-group Patch-DiT pools
    in order (as ``build.py`` chains them, without Ray): ``run`` returns the manifest rows."""

    def __init__(self, *, weights: str, rtm: str, seed: int, fmt: str = "png",
                 storage_options: dict | None = None, refine: str = "diffusion",
                 color_fix: str | None = None) -> None:
        opts = storage_options or {}
        model = {"weights": weights, "device": "cpu", "autoencoder": None}
        self.fmt = fmt
        self.stages = [
            ReadStage(storage_options=opts), DecodeStage(max_pixels=1 << 24),
            GRMStage(**model, rtm=rtm, seed=seed, mode=None, storage_options=opts, refine=refine,
                     color_fix=color_fix),
            *[PatchDiTStage(**model, rtm=rtm, mode=None, group=g, seed=seed) for g in range(3)
              if refine != "none"],
            AssembleStage(**model, fmt=fmt, quality=95, storage_options=opts, sampling="test", seed=seed,
                          score=False, refine=refine, color_fix=color_fix),
        ]

    def run(self, sources: list[str], input_root: str, output_root: str,
            before_assemble: Callable[[], None] | None = None) -> list[dict]:
        """Manifest rows of ``sources``; ``before_assemble()`` runs between Patch-DiT and the assembler."""
        outputs = plan_outputs(sources, input_root, output_root, EXTENSIONS[self.fmt])
        batches = [{S.IMAGE_ID: S.object_column([S.image_id(s)]),
                    S.META: S.object_column([S.dump_meta(S.new_meta(source=s, output=outputs[s]))])}
                   for s in sources]  # one image per batch, every stage over all images in turn
        for stage in self.stages:
            if stage is self.stages[-1] and before_assemble is not None:
                before_assemble()
            batches = [stage(batch) for batch in batches]
        return [dict(zip(b, row, strict=True)) for b in batches for row in zip(*b.values(), strict=True)]


def read_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
