"""FLOP budget of one upscale, per stage and per image, counted on the meta device (no GPU, no memory).

    python bench/flops.py                                   # every preset, 2048x2048 output (512 -> 2048)
    python bench/flops.py --preset paper --out-size 1024 1024 --shares 0.2 0.3 0.5 --tflops 790 312
    python bench/flops.py --preset paper --measured-seconds 2.36 --peak-tflops 312   # what a time implies

``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products, convolutions and attention of
each stage as the code runs it (a multiply-add is 2 FLOPs; element-wise work, norms and the DDIM
arithmetic are not counted). Stages, for an output of H x W (latent h x w = H/8 x W/8, M patches of
16 x 16 with overlap 8):

- ``encode``: the autoencoder's encoder on the x4 bicubic image (diffusers' tiled encode above the
  preset's ``tile_sample_size``, as ``LatentAutoencoder`` runs it: tile overlaps are counted);
- ``GRM`` on y_LR; ``classifier``: texture features of the M patches (the retrieval queries);
- ``retrieval``: a flat inner-product top-K over ``--rtm-entries`` keys (2 M N D; faiss, not counted by
  torch); ``texture encoder``: the prompt of each patch, once per patch;
- ``prompt K/V``: with the prompt cache, the cross-attention keys and values of every Patch-DiT block,
  once per patch (``PatchDiT.prompt_kv``);
- ``Patch-DiT step``: one patch, one sampling step, without the cache (K/V recomputed from the prompt)
  and with it;
- ``decode``: the autoencoder's decoder on the merged latent.

Per image: adaptive sampling (PGS) with the group shares ``--shares simple medium hard`` (fractions of
the M patches; each group its (tau, N)) and uniform sampling (every patch N_hard steps), with and without
the cache, and the time floor of each at ``--tflops`` (FLOPs / rate: 100% utilisation, no overhead).
``--measured-seconds T --peak-tflops P`` adds what a measured Patch-DiT time T implies: the most FLOPs
per patch-step that fit in T at utilisation 100% / 50% / 30% of P.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from patchscaler.config import PatchScalerConfig
from patchscaler.flops import count_flops
from patchscaler.grm import GRM
from patchscaler.patch_dit import PatchDiT
from patchscaler.patching import plan_grid
from patchscaler.pgs import GROUP_NAMES, group_plan
from patchscaler.presets import PRESETS
from patchscaler.texture import TextureClassifier, TextureEncoder

META = torch.device("meta")


@dataclass(frozen=True)
class StageFlops:
    """FLOPs of each stage of one image (``per patch`` ones are for one patch)."""

    out_size: tuple[int, int]
    patches: int
    encode: int
    grm: int
    classifier: int  # per image (M patches)
    retrieval: int  # per image
    texture_encoder: int  # per image, once per patch
    prompt_kv: int  # per image, once per patch, with the prompt cache only
    dit_step: int  # per patch-step, without the cache
    dit_step_cached: int  # per patch-step, with the cache
    decode: int

    @property
    def fixed(self) -> int:
        """Everything but the Patch-DiT steps and the prompt K/V."""
        return self.encode + self.grm + self.classifier + self.retrieval + self.texture_encoder + self.decode

    def image_total(self, patch_steps: int, *, cached: bool) -> int:
        if cached:
            return self.fixed + self.prompt_kv + patch_steps * self.dit_step_cached
        return self.fixed + patch_steps * self.dit_step


def default_autoencoder(cfg: PatchScalerConfig) -> nn.Module:
    """The product's ``LatentAutoencoder`` (diffusers' ``AutoencoderKL``) on the meta device."""
    from patchscaler.autoencoder import LatentAutoencoder  # diffusers: only when no stand-in is given

    with META:
        return LatentAutoencoder(config=cfg.autoencoder).eval()


def stage_flops(
    cfg: PatchScalerConfig,
    out_size: tuple[int, int],
    *,
    rtm_entries: int = 2000,
    autoencoder: nn.Module | None = None,
) -> StageFlops:
    """Count every stage of one ``out_size`` (H, W) output, H and W multiples of 8.

    ``autoencoder``: a module with ``encode(image)`` / ``decode(latent)`` like ``LatentAutoencoder``
    (on any device; it is called on meta tensors); default: the product's, which imports diffusers."""
    height, width = out_size
    f = cfg.autoencoder.downsample_factor
    if height % f or width % f:
        raise ValueError(f"output size {out_size} must be a multiple of {f}")
    h, w = height // f, width // f
    s = cfg.sampler
    grid = plan_grid(h, w, patch=s.patch_size, overlap=s.overlap)
    m, v, k, c = grid.num_patches, s.patch_size, cfg.texture_encoder.top_k, cfg.latent_channels
    ae = autoencoder if autoencoder is not None else default_autoencoder(cfg)
    with META:
        grm = GRM(config=cfg.grm).eval()
        classifier = TextureClassifier(config=cfg.classifier).eval()
        encoder = TextureEncoder(dit=cfg.patch_dit, config=cfg.texture_encoder).eval()
        dit = PatchDiT(config=cfg.patch_dit).eval()
        image = torch.empty(1, 3, height, width)
        latent = torch.empty(1, c, h, w)
        patch = torch.empty(1, c, v, v)
        values, scores = torch.empty(1, k, c, v, v), torch.empty(1, k)
        prompt = torch.empty(1, k * cfg.patch_dit.num_tokens, cfg.patch_dit.hidden_size)
        t = torch.empty(1)
    with torch.no_grad():
        kv = dit.prompt_kv(prompt)
    return StageFlops(
        out_size=(height, width),
        patches=m,
        encode=count_flops(ae.encode, image),
        grm=count_flops(grm, latent),
        classifier=m * count_flops(classifier.features, patch),
        retrieval=2 * m * rtm_entries * cfg.classifier.feature_dim,
        texture_encoder=m * count_flops(encoder, values, scores),
        prompt_kv=m * count_flops(dit.prompt_kv, prompt),
        dit_step=count_flops(dit, patch, t, patch, prompt),
        dit_step_cached=count_flops(dit, patch, t, patch, prompt_kv=kv),
        decode=count_flops(ae.decode, latent),
    )


def group_counts(patches: int, shares: tuple[float, float, float]) -> list[int]:
    """Split ``patches`` by ``shares`` (simple, medium, hard; normalised) into whole counts that sum to
    ``patches`` (largest remainders)."""
    if len(shares) != len(GROUP_NAMES) or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"need {len(GROUP_NAMES)} non-negative shares, got {shares}")
    ideal = [patches * x / sum(shares) for x in shares]
    counts = [int(x) for x in ideal]
    for g in sorted(range(len(ideal)), key=lambda g: ideal[g] - counts[g], reverse=True):
        if sum(counts) == patches:
            break
        counts[g] += 1
    return counts


def patch_steps(cfg: PatchScalerConfig, counts: list[int], mode: str) -> int:
    """Patch-DiT patch-steps of one image with ``counts`` patches per group in ``mode``."""
    plan = group_plan(dataclasses.replace(cfg.sampler, mode=mode))
    return sum(n * sched.steps for n, sched in zip(counts, plan, strict=True))


def windows_per_crop(cfg: PatchScalerConfig, crop: int) -> int:
    """Training patches of one ``crop`` px HR crop: every V x V latent window at the sampler's patch
    stride (``patchscaler.training.steps.latent_windows``; 9 for 256 px at f = 8)."""
    s, f = cfg.sampler, cfg.autoencoder.downsample_factor
    h, stride = crop // f, s.patch_size - s.overlap
    if h < s.patch_size:
        raise ValueError(f"a {crop} px crop is a {h}x{h} latent, smaller than one {s.patch_size}^2 window")
    return ((h - s.patch_size) // stride + 1) ** 2


def train_step_flops(cfg: PatchScalerConfig, batch: int) -> int:
    """FLOPs of one Patch-DiT training step on ``batch`` patches (``patchdit_step`` on precomputed
    latents): the texture encoder and Patch-DiT forward (prompt given, no K/V cache) and backward (the
    weights' gradients; the inputs need none), counted on the meta device. About 3x the forward; the
    optimizer's element-wise update is not counted."""
    d, k = cfg.patch_dit, cfg.texture_encoder.top_k
    v, c = d.input_size, d.latent_channels
    with META:
        encoder = TextureEncoder(dit=d, config=cfg.texture_encoder)
        dit = PatchDiT(config=d)
        x, t = torch.empty(batch, c, v, v), torch.empty(batch)
        values, scores = torch.empty(batch, k, c, v, v), torch.empty(batch, k)
    with FlopCounterMode(display=False) as counter:
        out = dit(x, t, x, encoder(values, scores))  # (B, C, V, V)
        out.float().pow(2).mean().backward()
    return int(counter.get_total_flops())


def frozen_crop_flops(cfg: PatchScalerConfig, crop: int, *, autoencoder: nn.Module | None = None) -> int:
    """FLOPs of the frozen forward work per HR crop that ``patchdit_step`` does at every step today: the
    autoencoder encodes the x4 bicubic LR input and the HR crop, the GRM runs on y_LR, the classifier on
    every training window (retrieval in faiss, not counted). ``autoencoder`` as in ``stage_flops``."""
    f = cfg.autoencoder.downsample_factor
    v = cfg.sampler.patch_size
    ae = autoencoder if autoencoder is not None else default_autoencoder(cfg)
    with META:
        grm = GRM(config=cfg.grm).eval()
        classifier = TextureClassifier(config=cfg.classifier).eval()
        image = torch.empty(1, 3, crop, crop)
        latent = torch.empty(1, cfg.latent_channels, crop // f, crop // f)
        patch = torch.empty(1, cfg.latent_channels, v, v)
    return (2 * count_flops(ae.encode, image) + count_flops(grm, latent)
            + windows_per_crop(cfg, crop) * count_flops(classifier.features, patch))


def gflop(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS), help="default: all")
    parser.add_argument("--out-size", type=int, nargs=2, default=(2048, 2048), metavar=("H", "W"))
    parser.add_argument("--shares", type=float, nargs=3, default=(0.2, 0.3, 0.5),
                        metavar=("SIMPLE", "MEDIUM", "HARD"), help="patch shares of the groups (adaptive)")
    parser.add_argument("--tflops", type=float, nargs="+", default=(790.0,),
                        help="rates for the time floor, TFLOP/s (790: dense bf16 on an H100/H200 here)")
    parser.add_argument("--rtm-entries", type=int, default=2000, help="RTM size (the paper's: 2000)")
    parser.add_argument("--measured-seconds", type=float, default=None,
                        help="a measured Patch-DiT time per image, to derive the FLOPs it implies")
    parser.add_argument("--peak-tflops", type=float, default=312.0,
                        help="peak rate of the device of --measured-seconds (A100 dense bf16/fp16: 312)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    presets = args.preset or list(PRESETS)
    out = tuple(args.out_size)
    print("command:", shlex.join(["python", *sys.argv]))
    print(f"output {out[0]}x{out[1]}; GFLOP per stage (multiply-add = 2 FLOPs)\n")
    stages = {name: stage_flops(PRESETS[name], out, rtm_entries=args.rtm_entries) for name in presets}

    print("| preset | patches | encode | GRM | classifier | retrieval | texture encoder | prompt K/V "
          "(cache) | Patch-DiT / patch-step | cached / patch-step | K/V share of a step | decode |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, sf in stages.items():
        share = 1 - sf.dit_step_cached / sf.dit_step
        print(f"| `{name}` | {sf.patches} | {gflop(sf.encode)} | {gflop(sf.grm)} | {gflop(sf.classifier)} | "
              f"{gflop(sf.retrieval)} | {gflop(sf.texture_encoder)} | {gflop(sf.prompt_kv)} | "
              f"{sf.dit_step / 1e9:.3f} | {sf.dit_step_cached / 1e9:.3f} | {share:.1%} | "
              f"{gflop(sf.decode)} |")

    rates = [r * 1e12 for r in args.tflops]
    heads = " | ".join(f"floor at {r:g} TFLOP/s (no cache / cache)" for r in args.tflops)
    print(f"\nper image, shares simple/medium/hard = {'/'.join(f'{x:g}' for x in args.shares)} (adaptive)\n")
    print(f"| preset | sampling | patch-steps | TFLOP no cache | TFLOP cache | cache saves | {heads} |")
    print("|---|---|---:|---:|---:|---:|" + "---:|" * len(rates))
    result: dict[str, Any] = {"out_size": out, "shares": args.shares, "tflops": args.tflops, "presets": {}}
    for name, sf in stages.items():
        cfg = PRESETS[name]
        counts = group_counts(sf.patches, tuple(args.shares))
        rows = {}
        for mode in ("adaptive", "uniform"):
            n = patch_steps(cfg, counts, mode)
            plain, cached = sf.image_total(n, cached=False), sf.image_total(n, cached=True)
            floors = " | ".join(f"{plain / r:.3f} s / {cached / r:.3f} s" for r in rates)
            print(f"| `{name}` | {mode} | {n:,} | {plain / 1e12:,.2f} | {cached / 1e12:,.2f} | "
                  f"{1 - cached / plain:.1%} | {floors} |")
            rows[mode] = {"patch_steps": n, "flops": plain, "flops_cached": cached,
                          "dit_flops": n * sf.dit_step,
                          "dit_flops_cached": sf.prompt_kv + n * sf.dit_step_cached}
        result["presets"][name] = {"stages": dataclasses.asdict(sf), "group_counts": counts, "images": rows}

    if args.measured_seconds:
        print(f"\nwhat {args.measured_seconds:g} s of Patch-DiT per image implies at a peak of "
              f"{args.peak_tflops:g} TFLOP/s (most GFLOP per patch-step that fit)\n")
        print("| preset | sampling | patch-steps | preset GFLOP / patch-step (cache) | at 100% | at 50% "
              "| at 30% | preset time at 100% / 50% (cache) |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for name in stages:
            for mode, row in result["presets"][name]["images"].items():
                n = row["patch_steps"]
                budget = args.measured_seconds * args.peak_tflops * 1e12
                fits = " | ".join(f"{budget * u / n / 1e9:.1f}" for u in (1.0, 0.5, 0.3))
                need = row["dit_flops_cached"] / (args.peak_tflops * 1e12)
                print(f"| `{name}` | {mode} | {n:,} | {row['dit_flops_cached'] / n / 1e9:.1f} | {fits} | "
                      f"{need:.2f} s / {2 * need:.2f} s |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
