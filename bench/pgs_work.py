"""Patch-DiT work and wall time of Patch-adaptive Group Sampling (PGS) against uniform sampling.

    python bench/pgs_work.py                                  # tiny preset, synthetic 32x32 latent, CPU
    python bench/pgs_work.py --latent 64 64 --repeats 5
    python bench/pgs_work.py --conf-npy conf.npy --preset small --device cuda

For one latent confidence map (``--conf-npy``: a float array (h, w) or (1, h, w) in [0, 1], e.g. a GRM
output; by default a synthetic map: high confidence with a low-confidence blob, so the patches fall into
all three groups), in one run:

1. ``work``: Patch-DiT patch-steps (model evaluations x patches, ``count_patch_steps``) of the adaptive
   plan (each group its own (tau, N), Eq. 2/7) and of the uniform one (every patch (T, N_hard)), and
   their ratio. This is exact and hardware-independent.
2. ``time``: wall time of ``pgs_sample`` in both modes with a real ``PatchDiT`` of the preset (random
   weights; the cost does not depend on their values) as the denoiser, texture prompts from a
   ``TextureEncoder`` computed once per patch beforehand (as ``upscaler.refine`` does, not timed).
   The two modes alternate order over ``--repeats`` rounds after one warm-up; medians are reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from patchscaler.config import PatchScalerConfig
from patchscaler.diffusion import NoiseSchedule
from patchscaler.patch_dit import PatchDiT
from patchscaler.patching import patch_means, plan_grid
from patchscaler.pgs import GROUP_NAMES, assign_groups, count_patch_steps, group_plan, pgs_sample
from patchscaler.presets import PRESETS
from patchscaler.texture import TextureEncoder

MODES = ("adaptive", "uniform")


def synthetic_confidence(height: int, width: int) -> torch.Tensor:
    """(1, h, w): 0.99 in flat areas, dipping to 0.54 over a Gaussian blob centred at (0.7, 0.7)."""
    y = torch.arange(height, dtype=torch.float32)[:, None] / height  # (h, 1)
    x = torch.arange(width, dtype=torch.float32)[None, :] / width  # (1, w)
    r2 = (y - 0.7) ** 2 + (x - 0.7) ** 2  # (h, w)
    return (0.99 - 0.45 * torch.exp(-r2 / (2 * 0.2**2))).unsqueeze(0)  # (1, h, w)


def load_confidence(path: str) -> torch.Tensor:
    conf = np.load(path).astype(np.float32)
    if conf.ndim == 3 and conf.shape[0] == 1:
        conf = conf[0]
    if conf.ndim != 2:
        raise SystemExit(f"{path}: expected a confidence map (h, w) or (1, h, w), got {conf.shape}")
    return torch.from_numpy(conf).unsqueeze(0)  # (1, h, w)


def make_denoiser(
    cfg: PatchScalerConfig, y0: torch.Tensor, device: torch.device, seed: int
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A random-weight Patch-DiT closed over y0 and per-patch texture prompts, looked up by index."""
    torch.manual_seed(seed)
    dit = PatchDiT(config=cfg.patch_dit).to(device).eval()
    encoder = TextureEncoder(dit=cfg.patch_dit, config=cfg.texture_encoder).to(device).eval()
    g = torch.Generator().manual_seed(seed)
    k = cfg.texture_encoder.top_k
    values = torch.randn(len(y0), k, *y0.shape[1:], generator=g)  # (M, K, 4, V, V) stand-in references
    scores = torch.rand(len(y0), k, generator=g)  # (M, K)
    bs = cfg.sampler.batch_size
    with torch.no_grad():
        prompts = torch.cat([
            encoder(v.to(device), s.to(device))
            for v, s in zip(values.split(bs), scores.split(bs), strict=True)
        ])  # (M, K*L, hidden)
    y0_dev = y0.to(device)

    def denoise(x_t: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(device)
        return dit(x_t.to(device), t.to(device), y0_dev[idx], prompts[idx]).to(x_t.device)

    return denoise


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--conf-npy", default=None, help="latent confidence map (h, w) or (1, h, w), .npy")
    parser.add_argument("--latent", type=int, nargs=2, default=(32, 32), metavar=("H", "W"),
                        help="size of the synthetic map (ignored with --conf-npy)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="patches per call (preset's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-only", action="store_true", help="count patch-steps, skip the timing")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    cfg = PRESETS[args.preset]
    if args.batch_size:
        cfg = cfg.replace(sampler=dataclasses.replace(cfg.sampler, batch_size=args.batch_size))
    sampler = cfg.sampler
    device = torch.device(args.device)
    conf = load_confidence(args.conf_npy) if args.conf_npy else synthetic_confidence(*args.latent)
    grid = plan_grid(conf.shape[-2], conf.shape[-1], patch=sampler.patch_size, overlap=sampler.overlap)
    groups = assign_groups(patch_means(conf, grid), sampler.gamma1, sampler.gamma2)  # (M,)
    plans = {mode: group_plan(dataclasses.replace(sampler, mode=mode)) for mode in MODES}
    work = {mode: count_patch_steps(groups, plans[mode]) for mode in MODES}

    print("command:", shlex.join([sys.executable, *sys.argv]), flush=True)
    print(f"latent {grid.height}x{grid.width}: {grid.num_patches} patches "
          f"({grid.rows}x{grid.cols}, V={grid.patch}, stride {grid.stride}); groups "
          + ", ".join(f"{name} {int((groups == g).sum())}" for g, name in enumerate(GROUP_NAMES)))
    for mode in MODES:
        plan = ", ".join(f"{p.name} (tau {p.tau}, N {p.steps})" for p in plans[mode])
        print(f"{mode:>8}: {work[mode]:6d} patch-steps   [{plan}]")
    print(f"work ratio adaptive / uniform: {work['adaptive'] / work['uniform']:.3f} "
          f"({work['uniform'] / work['adaptive']:.2f}x fewer Patch-DiT patch-steps)", flush=True)
    result = {"patches": grid.num_patches, "patch_steps": work,
              "group_counts": {name: int((groups == g).sum()) for g, name in enumerate(GROUP_NAMES)}}
    if args.work_only:
        print(json.dumps(result))
        return

    g = torch.Generator().manual_seed(args.seed)
    y0 = torch.randn(grid.num_patches, cfg.patch_dit.latent_channels, grid.patch, grid.patch, generator=g)
    noise = torch.randn(y0.shape, generator=g)  # (M, 4, V, V), drawn once, in patch order
    denoise = make_denoiser(cfg, y0, device, args.seed)
    schedule = NoiseSchedule(config=sampler)

    def run(mode: str) -> float:
        sync(device)
        start = time.perf_counter()
        pgs_sample(denoise, y0, groups, noise, schedule=schedule, plan=plans[mode],
                   batch_size=sampler.batch_size)
        sync(device)
        return time.perf_counter() - start

    warm = torch.zeros(1, dtype=torch.long)  # warm-up: one simple patch (N_1 calls)
    pgs_sample(denoise, y0[:1], warm, noise[:1], schedule=schedule, plan=plans["adaptive"], batch_size=1)
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(args.repeats):
        for mode in (MODES if r % 2 == 0 else MODES[::-1]):
            seconds[mode].append(run(mode))
            print(f"  round {r + 1}: {mode:>8} {seconds[mode][-1]:.3f} s", flush=True)
    med = {mode: statistics.median(seconds[mode]) for mode in MODES}
    for mode in MODES:
        print(f"{mode:>8}: median {med[mode]:.3f} s over {args.repeats} "
              f"({work[mode] / med[mode]:.1f} patch-steps/s)")
    print(f"time ratio adaptive / uniform: {med['adaptive'] / med['uniform']:.3f} "
          f"({med['uniform'] / med['adaptive']:.2f}x faster); device {device}, preset {args.preset}, "
          f"batch {sampler.batch_size}, torch threads {torch.get_num_threads()}")
    result["seconds_median"] = med
    print(json.dumps(result))


if __name__ == "__main__":
    main()
