"""Benchmark of the RTM builder: crops encoded per second, and farthest point sampling 20k -> 2k.

    python bench/rtm_build.py                       # tiny preset, random weights, CPU
    python bench/rtm_build.py --device cuda --preset small --crops 4096

Three figures:

1. ``build``: an end-to-end ``build_rtm`` on generated 512×512 images (local Ray, one encoder actor),
   candidates / seconds of its encode phase (crop cutting, actor start and checkpoint load included);
2. ``encode``: the steady-state rate of ``encode_crops`` in this process (after one warm-up batch);
3. ``fps``: exact FPS of ``--fps-n`` random unit keys to ``--fps-k``, for the preset's key size and for
   the paper preset's (512).

Weights are random (``init-weights``); the rates do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from patchscaler.model import PatchScalerModel
from patchscaler.presets import PRESETS
from patchscaler.weights import save_checkpoint
from rtm_builder.encode import encode_crops
from rtm_builder.fps import farthest_point_sampling


def make_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def bench_build(weights: str, root: Path, args: argparse.Namespace) -> dict[str, float]:
    import ray

    from rtm_builder.build import BuildConfig, build_rtm
    from rtm_builder.sources import parse_sources

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    make_images(root / "images", args.images, 512)
    cfg = BuildConfig(sources=parse_sources([f"bench={root / 'images'}"]), out=str(root / "rtm"),
                      weights=weights, candidates=args.build_crops, entries=min(args.fps_k, args.build_crops),
                      device=args.device, cpus_per_actor=float(os.cpu_count() or 1), contact_sheet=False)
    summary = build_rtm(cfg)
    ray.shutdown()
    encode_s = summary.seconds["encode"]
    return {"crops": summary.encoded, "encode_s": encode_s, "crops_per_s": summary.encoded / encode_s,
            "total_s": sum(summary.seconds.values())}


def bench_encode(model: PatchScalerModel, crops: int, batch: int) -> dict[str, float]:
    pixels = np.random.default_rng(1).integers(0, 256, (crops, 128, 128, 3), dtype=np.uint8)
    encode_crops(model, pixels[:batch], batch_size=batch)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    encode_crops(model, pixels, batch_size=batch)
    seconds = time.perf_counter() - start
    return {"crops": crops, "seconds": seconds, "crops_per_s": crops / seconds}


def bench_fps(n: int, k: int, dim: int, device: str) -> dict[str, float]:
    keys = F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(0)), dim=1)
    farthest_point_sampling(keys[:1000], 10, device=device)  # warm-up
    start = time.perf_counter()
    result = farthest_point_sampling(keys, k, device=device)
    seconds = time.perf_counter() - start
    return {"n": n, "k": k, "dim": dim, "seconds": seconds, "covering_radius": result.covering_radius}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--crops", type=int, default=256, help="crops for the in-process encode rate")
    p.add_argument("--build-crops", type=int, default=256, help="candidates of the end-to-end build")
    p.add_argument("--images", type=int, default=8, help="generated 512x512 images of the build")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--fps-n", type=int, default=20_000)
    p.add_argument("--fps-k", type=int, default=2_000)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch threads in this process")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    torch.manual_seed(0)
    model = PatchScalerModel(config=PRESETS[args.preset]).to(args.device).eval()
    figures: dict[str, object] = {"preset": args.preset, "device": args.device,
                                  "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                                  "load_average_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "weights")
        save_checkpoint(model.cpu(), weights)
        model.to(args.device)
        figures["encode"] = bench_encode(model, args.crops, args.batch)
        print("encode (in process):", json.dumps(figures["encode"]), flush=True)
        dims = sorted({PRESETS[args.preset].classifier.feature_dim, PRESETS["paper"].classifier.feature_dim})
        figures["fps"] = [bench_fps(args.fps_n, args.fps_k, d, args.device) for d in dims]
        for f in figures["fps"]:
            print("fps:", json.dumps(f), flush=True)
        figures["build"] = bench_build(weights, Path(tmp), args)
        print("build (end to end):", json.dumps(figures["build"]))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
