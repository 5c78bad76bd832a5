"""``patchscaler upscale IN OUT``: the single-process reference upscaler on files or a folder."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jobs.defaults import DEMO_RTM, DEMO_WEIGHTS, pick_device
from patchscaler.upscaler import UpscaleResult

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="an image file or a folder of images")
    p.add_argument("output", help="output file (for one input image) or folder")
    p.add_argument("--weights", default=str(DEMO_WEIGHTS), help="checkpoint dir or s3:// prefix")
    p.add_argument("--rtm", default=str(DEMO_RTM), help="RTM artifact dir or s3:// prefix")
    p.add_argument("--autoencoder", default=None, help="separate SD-VAE weights (file or diffusers dir)")
    p.add_argument("--mode", choices=["adaptive", "uniform"], default=None, help="override sampling mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="inference precision; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--save-maps", action="store_true", help="also write the confidence and group maps")


def _inputs(src: Path) -> list[Path]:
    if src.is_dir():
        return sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not src.exists():
        raise FileNotFoundError(f"input not found: {src}")
    return [src]


def load_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (h, w, 3)
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()  # (3, h, w)


def save_rgb(image: torch.Tensor, path: Path) -> None:
    arr = (image.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()  # (H, W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def run(args: argparse.Namespace) -> int:
    from patchscaler.upscaler import PatchScaler
    from patchscaler.weights import load_checkpoint, load_rtm

    device = pick_device(args.device)
    model = load_checkpoint(args.weights, device=device, autoencoder=args.autoencoder)
    if args.mode:
        model.config = model.config.replace(sampler=replace(model.config.sampler, mode=args.mode))
    rtm, rtm_manifest = load_rtm(args.rtm, use_gpu=device.startswith("cuda"))
    upscaler = PatchScaler(model=model, rtm=rtm, device=device, precision=args.precision)

    src, dst = Path(args.input), Path(args.output)
    files = _inputs(src)
    failures = 0
    for path in files:
        out = dst / (path.stem + ".png") if (src.is_dir() or dst.suffix == "") else dst
        try:
            image = load_rgb(path)
            start = time.perf_counter()
            result = upscaler.upscale(image, generator=torch.Generator().manual_seed(args.seed))
            seconds = time.perf_counter() - start
        except Exception as exc:  # one bad file must not stop the others
            failures += 1
            error = f"{type(exc).__name__}: {exc}"
            print(json.dumps({"input": str(path), "status": "error", "error": error}))
            continue
        save_rgb(result.image, out)
        if args.save_maps:
            _save_maps(result, out)
        print(json.dumps({
            "input": str(path), "output": str(out), "status": "ok",
            "size_in": list(image.shape[-2:]), "size_out": list(result.image.shape[-2:]),
            "patches": result.group_counts, "seconds": round(seconds, 3),
            "precision": upscaler.precision,
            "model_version": model.version, "rtm_version": rtm_manifest.get("version"),
        }))
    print(f"done: {len(files) - failures} ok, {failures} failed")
    return 1 if failures else 0


def _save_maps(result: UpscaleResult, out: Path) -> None:
    conf = (result.confidence[0].clamp(0, 1) * 255).to(torch.uint8).numpy()
    Image.fromarray(conf).save(out.with_name(out.stem + "_confidence.png"))
    palette = np.array([[46, 204, 113], [241, 196, 15], [231, 76, 60]], dtype=np.uint8)  # simple/medium/hard
    Image.fromarray(palette[result.group_map.numpy()]).save(out.with_name(out.stem + "_groups.png"))
