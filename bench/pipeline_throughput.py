"""Throughput of ``upscale-dataset`` against a bare single-process loop of the reference upscaler.

    python bench/pipeline_throughput.py                             # tiny preset, CPU, 32 images
    python bench/pipeline_throughput.py --preset small --device cuda --images 256 --min-size 96 --max-size 256

On the same generated images (random RGB, sizes drawn in [--min-size, --max-size]) and in one run:

- ``bare loop``: one process, read -> decode -> ``PatchScaler.upscale`` -> encode PNG -> write, per image;
- ``pipeline``: ``run_pipeline`` on a private local Ray with all cores (or ``--address``), in the
  per-pool, fused and single layouts, adaptive (PGS) and uniform sampling. Its seconds are the whole
  job as a user sees it: actor start and checkpoint loading included. ``steady images/s`` leaves the
  start-up out: images finished after the first one, over the time from the first to the last (the
  manifest's ``finished_at``).

The ratio is pipeline images/s over bare-loop images/s with the same sampling mode. Weights are random
(the rates do not depend on their values), but the group thresholds γ1/γ2 are set at the tertiles of
these images' patch confidences, so that adaptive sampling has a realistic mix of simple, medium and
hard patches to save work on (random weights would put every patch in one group).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from patchscaler.model import PatchScalerModel
from patchscaler.presets import PRESETS
from patchscaler.rtm import ReferenceTextureMemory
from patchscaler.upscaler import PatchScaler, plan_patches, restore
from patchscaler.weights import load_checkpoint, load_rtm, save_checkpoint, save_rtm
from pipeline.decode import decode_image, encode_image, to_float, to_uint8


def make_images(folder: Path, count: int, lo: int, hi: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        h, w = rng.integers(lo, hi + 1, 2)
        small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        path = folder / f"img{i:04d}.png"
        Image.fromarray(small).resize((int(w), int(h)), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def make_weights(root: Path, preset: str, images: list[Path], device: str) -> tuple[str, str]:
    """A random checkpoint with γ1/γ2 at the tertiles of the images' patch confidences, and an RTM."""
    torch.manual_seed(0)
    model = PatchScalerModel(config=PRESETS[preset]).to(device).eval()
    means = []
    for path in images[:16]:
        image = to_float(decode_image(path.read_bytes(), max_pixels=1 << 26).rgb)
        y_hr, conf = restore(model, image)
        means.append(plan_patches(y_hr, conf, model, torch.Generator().manual_seed(0)).mean_conf)
    gamma2, gamma1 = torch.quantile(torch.cat(means), torch.tensor([0.34, 0.67])).tolist()
    model.config = model.config.replace(sampler=replace(model.config.sampler, gamma1=gamma1, gamma2=gamma2))
    weights, rtm_dir = str(root / "weights"), str(root / "rtm")
    save_checkpoint(model.cpu(), weights)
    c, v = model.config.latent_channels, model.config.sampler.patch_size
    values = torch.randn(256, c, v, v, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        keys = model.classifier.features(values)
    rtm = ReferenceTextureMemory(keys=keys, values=values)
    save_rtm(rtm_dir, keys=rtm.keys, values=rtm.values, manifest={"name": "bench"})
    return weights, rtm_dir


def bare_loop(weights: str, rtm: str, images: list[Path], out: Path, mode: str, device: str) -> dict:
    """The reference upscaler over every image in this process: images/s, loading excluded."""
    model = load_checkpoint(weights, device=device)
    model.config = model.config.replace(sampler=replace(model.config.sampler, mode=mode))
    upscaler = PatchScaler(model=model, rtm=load_rtm(rtm)[0], device=device)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for path in images:
        dec = decode_image(path.read_bytes(), max_pixels=1 << 26)
        result = upscaler.upscale(to_float(dec.rgb), generator=torch.Generator().manual_seed(0))
        data = encode_image(to_uint8(result.image), None, fmt="png", quality=95, icc=dec.icc, exif=dec.exif)
        (out / (path.stem + ".png")).write_bytes(data)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": len(images) / seconds}


def pipeline_run(weights: str, rtm: str, inputs: Path, out: Path, *, mode: str, layout: str,
                 device: str, dit_actors: int | None) -> dict:
    from pipeline.build import PipelineConfig
    from pipeline.runner import read_manifest, run_pipeline

    cfg = PipelineConfig(input=str(inputs), output=str(out), weights=weights, rtm=rtm, device=device,
                         mode=mode, layout=layout, dit_actors=dit_actors, window=1 << 30)
    summary = run_pipeline(cfg, echo=False)
    assert summary.failed == 0, f"{summary.failed} images failed"
    done = np.sort(read_manifest(str(out))["finished_at"].to_numpy())
    steady = (len(done) - 1) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else 0.0
    return {"seconds": summary.seconds, "images_per_s": summary.images_per_second, "steady_per_s": steady,
            "pools": summary.pools}


def device_line(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")]
        cpu = names[0] if names else cpu
    line = f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"
    if device.startswith("cuda"):
        line += f", {torch.cuda.get_device_name(0)}"
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--min-size", type=int, default=32)
    p.add_argument("--max-size", type=int, default=96)
    p.add_argument("--device", default="cpu")
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: local Ray)")
    p.add_argument("--dit-actors", type=int, default=None, help="Patch-DiT actors in all (default: auto)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()

    import ray

    root = Path(tempfile.mkdtemp(prefix="pipeline_bench_"))
    images = make_images(root / "in", args.images, args.min_size, args.max_size)
    weights, rtm = make_weights(root, args.preset, images, args.device)
    results: dict[str, dict] = {}
    for mode in ("adaptive", "uniform"):
        results[f"bare loop, {mode}"] = bare_loop(weights, rtm, images, root / f"bare_{mode}", mode,
                                                  args.device)
    from jobs.runtime import start_ray

    start_ray(args.address)  # a private local Ray without --address
    for layout, label in (("pools", "per-pool"), ("fused", "fused"), ("single", "single")):
        for mode in ("adaptive", "uniform"):
            name = f"pipeline {label}, {mode}"
            results[name] = pipeline_run(weights, rtm, root / "in", root / name.replace(" ", "_"), mode=mode,
                                         layout=layout, device=args.device, dit_actors=args.dit_actors)
            bare = results[f"bare loop, {mode}"]["images_per_s"]
            results[name]["ratio"] = results[name]["images_per_s"] / bare
    ray.shutdown()

    command = "python bench/pipeline_throughput.py " + shlex.join(sys.argv[1:])
    print(f"\nCommand: `{command.strip()}`  \nDevice: {device_line(args.device)}; "
          f"{args.images} images, {args.min_size}-{args.max_size} px, preset {args.preset}\n")
    print("| run | seconds | images/s | vs bare loop | steady images/s | Patch-DiT actors |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in results.items():
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "1.00x"
        steady = f"{r['steady_per_s']:.3f}" if "steady_per_s" in r else "-"
        pools = ", ".join(f"{k} {v}" for k, v in r["pools"][0].items()) if "pools" in r else "-"
        print(f"| {name} | {r['seconds']:.1f} | {r['images_per_s']:.3f} | {ratio} | {steady} | {pools} |")
    speedup = results["bare loop, adaptive"]["images_per_s"] / results["bare loop, uniform"]["images_per_s"]
    print(f"\nAdaptive vs uniform sampling (bare loop): {speedup:.2f}x images/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "results": results}, indent=2))


if __name__ == "__main__":
    main()
