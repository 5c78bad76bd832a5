"""One-call GPU benchmark of the model, 512 -> 2048 at the ``paper`` preset: per-stage times (CUDA
events), peak memory, achieved TFLOP/s and utilisation of the Patch-DiT stage from the FLOP count.

Pure torch (it imports torch, the repo's pure-torch modules and ``bench/vae_standin.py``; no Ray,
diffusers, faiss or pyiqa), so it runs on the lent GPU machines as they come (torch 2.11, nothing to
install). Nothing to carry beyond the working tree (no wheels). The device command, one call:

    run(kind="nvidia-h100-x1", timeout_s=400, command="PYTHONUNBUFFERED=1 PYTHONPATH=. python3
        bench/gpu_model.py --budget 270 --json $OUT/gpu_model.json 2>&1 | tee $OUT/gpu_model.log")

(add ``--compile`` for a torch.compile row, ``--quick`` for a 1-2 minute run). On CPU, as the test
``tests/test_gpu_model.py`` runs it: ``python bench/gpu_model.py --device cpu --preset tiny
--out-size 256 256 --quick``.

What runs is the product's inference, with random weights (time does not depend on their values; the
zero-initialised gates get small random values so no matrix is all zeros):

- ``encode``: x4 bicubic of a random LR image, replicate pad, the autoencoder's tiled encode (float32
  under every precision, as ``upscaler.restore``: the confidence map decides the groups). The
  autoencoder is ``vae_standin.AutoencoderStandIn``: diffusers' SD-VAE network in plain torch, tested
  equal to ``AutoencoderKL`` (outputs and FLOPs; diffusers is not on the GPU machine);
- ``GRM`` (float32, the same reason); ``retrieve``: classifier features of the M patches, then an
  exact top-K of the normalised inner product against random RTM keys in torch (faiss's
  ``IndexFlatIP`` math; faiss is not there), RTM values gathered on the CPU as the product does;
- ``refine``: ``patchscaler.sampling.refine_patches`` (or ``fused_refine_patches``), the product's
  Patch-DiT stage: texture prompts and their K/V once per batch, PGS with DDIM. Groups come from
  ``--shares`` (random weights give a meaningless confidence map); patches live on the CPU between
  steps as in ``PatchScaler`` (``--resident`` variant: on the GPU);
- ``decode``: feathered merge of the patches, the autoencoder's tiled decode.

Then, in priority order while ``--budget`` seconds last (a row that would not fit is reported as
skipped; the JSON is rewritten after every row, so a killed run keeps what it measured): the
end-to-end image (``--repeats`` timed runs after a warm-up), the Patch-DiT step alone (bf16/fp32 x
cache on/off x batch sizes), refine variants (uniform, no cache, fused, resident, batch sizes, fp32),
and ``--compile``. Utilisation is achieved FLOP/s over the peak: ``--peak-tflops``, else a bf16 (fp32
on CPU) 8192^3 (1024^3 on CPU) matrix product measured at start. Goals (issue 12): refine >= 45% of
peak in bf16; the whole image within 1.5x its FLOP floor; peak memory <= 24 GB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from flops import group_counts, patch_steps, stage_flops
from torch import nn
from vae_standin import AutoencoderStandIn

from patchscaler.config import PatchScalerConfig
from patchscaler.diffusion import NoiseSchedule
from patchscaler.grm import GRM
from patchscaler.patch_dit import PatchDiT
from patchscaler.patching import merge_patches, plan_grid, split_patches
from patchscaler.precision import autocast
from patchscaler.presets import PRESETS
from patchscaler.sampling import fused_refine_patches, refine_patches
from patchscaler.texture import TextureClassifier, TextureEncoder

STAGES = ("encode", "grm", "retrieve", "refine", "decode")


class Clock:
    """Stage timer: CUDA events on a GPU (read after one synchronize), the host clock elsewhere; peak
    memory per stage on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any, Any, int]] = []

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            self.marks.append((name, start, end, torch.cuda.max_memory_allocated()))
        else:
            start = time.perf_counter()
            out = fn()
            self.marks.append((name, start, time.perf_counter(), 0))
        return out

    def read(self) -> dict[str, dict[str, float]]:
        if self.cuda:
            torch.cuda.synchronize()
            return {n: {"seconds": s.elapsed_time(e) / 1e3, "peak_gb": m / 1e9} for n, s, e, m in self.marks}
        return {n: {"seconds": e - s, "peak_gb": 0.0} for n, s, e, _ in self.marks}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def randomize_zeros(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Small random values for all-zero parameters (adaLN-Zero gates, zero heads): no all-zero matrix."""
    with torch.no_grad():
        for p in module.parameters():
            if not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return module


def matmul_peak(device: torch.device) -> float:
    """FLOP/s of a large matrix product on random data: bf16 8192^3 on CUDA, fp32 1024^3 on CPU."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(5 if device.type == "cuda" else 2):
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        sync(device)
        times.append((time.perf_counter() - start) / 5)
    return 2 * n**3 / statistics.median(times)


@dataclasses.dataclass
class Model:
    """The networks of one preset on the device, random weights."""

    cfg: PatchScalerConfig
    autoencoder: AutoencoderStandIn
    grm: GRM
    classifier: TextureClassifier
    texture_encoder: TextureEncoder
    patch_dit: PatchDiT

    @classmethod
    def build(cls, cfg: PatchScalerConfig, device: torch.device, seed: int) -> Model:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        mods = [AutoencoderStandIn(config=cfg.autoencoder), GRM(config=cfg.grm),
                TextureClassifier(config=cfg.classifier),
                TextureEncoder(dit=cfg.patch_dit, config=cfg.texture_encoder), PatchDiT(config=cfg.patch_dit)]
        return cls(cfg, *(randomize_zeros(m, g).to(device).eval() for m in mods))


@dataclasses.dataclass
class Inputs:
    lr: torch.Tensor  # (1, 3, h, w) on device
    groups: torch.Tensor  # (M,) long, CPU
    noise: torch.Tensor  # (M, C, V, V) CPU
    keys: torch.Tensor  # (N, D) normalised, device
    values: torch.Tensor  # (N, C, V, V) CPU


def make_inputs(cfg: PatchScalerConfig, out_size: tuple[int, int], shares: tuple[float, float, float],
                rtm_entries: int, device: torch.device, seed: int) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    f, s = cfg.autoencoder.downsample_factor, cfg.sampler
    grid = plan_grid(out_size[0] // f, out_size[1] // f, patch=s.patch_size, overlap=s.overlap)
    counts = group_counts(grid.num_patches, shares)
    groups = torch.cat([torch.full((n,), k, dtype=torch.long) for k, n in enumerate(counts)])
    groups = groups[torch.randperm(len(groups), generator=g)]  # groups scattered over the image
    v, c = s.patch_size, cfg.latent_channels
    return Inputs(
        lr=torch.rand(1, 3, out_size[0] // cfg.scale, out_size[1] // cfg.scale, generator=g).to(device),
        groups=groups,
        noise=torch.randn(grid.num_patches, c, v, v, generator=g),
        keys=F.normalize(torch.randn(rtm_entries, cfg.classifier.feature_dim, generator=g), dim=1).to(device),
        values=torch.randn(rtm_entries, c, v, v, generator=g),
    )


@dataclasses.dataclass(frozen=True)
class Variant:
    precision: str
    mode: str = "adaptive"
    prompt_cache: bool = True
    fused: bool = False
    resident: bool = False  # latents on the device between steps (the product keeps them on the CPU)
    batch_size: int | None = None

    def label(self) -> str:
        parts = [self.precision, self.mode, "cache" if self.prompt_cache else "no cache"]
        parts += ["fused"] if self.fused else []
        parts += ["resident"] if self.resident else []
        return ", ".join(parts + ([f"batch {self.batch_size}"] if self.batch_size else []))


def refine(model: Model, v: Variant, y0: torch.Tensor, inp: Inputs, scores: torch.Tensor,
           values: torch.Tensor, device: torch.device) -> torch.Tensor:
    sampler = dataclasses.replace(model.cfg.sampler, mode=v.mode)
    where = device if v.resident else torch.device("cpu")
    fn = fused_refine_patches if v.fused else refine_patches
    return fn(patch_dit=model.patch_dit, texture_encoder=model.texture_encoder, sampler=sampler,
              y0=y0.to(where), groups=inp.groups.to(where), noise=inp.noise.to(where),
              values=values.to(where), scores=scores.to(where),
              schedule=NoiseSchedule(config=sampler), batch_size=v.batch_size,
              prompt_cache=v.prompt_cache, precision=v.precision)


@torch.no_grad()
def upscale(model: Model, inp: Inputs, v: Variant, device: torch.device) -> tuple[dict, torch.Tensor]:
    """One image through every stage; returns per-stage {seconds, peak_gb} and the x0 patches."""
    cfg, clock, prec = model.cfg, Clock(device), v.precision
    s, k = cfg.sampler, cfg.texture_encoder.top_k
    f = cfg.autoencoder.downsample_factor

    def encode() -> torch.Tensor:  # = patchscaler.upscaler.restore: float32 under every precision
        hr = F.interpolate(inp.lr, scale_factor=cfg.scale, mode="bicubic", align_corners=False).clamp(0, 1)
        hr = F.pad(hr, (0, (-hr.shape[-1]) % f, 0, (-hr.shape[-2]) % f), mode="replicate")
        return model.autoencoder.encode(hr)  # (1, C, h, w)

    def grm() -> torch.Tensor:
        y_hr, _conf = model.grm(y_lr)
        return y_hr[0]  # (C, h, w)

    def retrieve() -> tuple[torch.Tensor, torch.Tensor]:
        queries = []
        with autocast(device, prec):
            for chunk in y0.split(256):
                queries.append(model.classifier.features(chunk))  # (b, D)
        q = F.normalize(torch.cat(queries).float(), dim=1)  # (M, D)
        scores, idx = (q @ inp.keys.T).topk(k, dim=1)  # (M, K) each: flat inner-product search
        return scores.cpu(), inp.values[idx.cpu()]  # RTM values gathered on the CPU, as rtm.gather

    y_lr = clock.stage("encode", encode)
    y_hr = clock.stage("grm", grm)
    grid = plan_grid(y_hr.shape[-2], y_hr.shape[-1], patch=s.patch_size, overlap=s.overlap)
    y0 = split_patches(y_hr, grid)  # (M, C, V, V) on device
    scores, values = clock.stage("retrieve", retrieve)
    x0 = clock.stage("refine", lambda: refine(model, v, y0, inp, scores, values, device))

    def decode() -> torch.Tensor:
        latent = merge_patches(x0.to(device).float(), grid)  # (C, h, w)
        with autocast(device, prec):
            return model.autoencoder.decode(latent[None])[0].float()  # (3, H, W)

    image = clock.stage("decode", decode)
    times = clock.read()
    if not (torch.isfinite(image).all() and torch.isfinite(x0).all()):
        raise RuntimeError(f"non-finite output in {v.label()}")
    return times, x0.float().cpu()


@torch.no_grad()
def dit_step_time(model: Model, v: Variant, batch: int, device: torch.device, calls: int,
                  compiled: nn.Module | None = None) -> float:
    """Median seconds of one Patch-DiT call on ``batch`` patches (prompt K/V precomputed with the cache)."""
    cfg, g = model.cfg, torch.Generator().manual_seed(1)
    v_ = cfg.sampler.patch_size
    x = torch.randn(batch, cfg.latent_channels, v_, v_, generator=g).to(device)
    t = torch.full((batch,), 500.0, device=device)
    tokens = cfg.texture_encoder.top_k * cfg.patch_dit.num_tokens
    prompt = torch.randn(batch, tokens, cfg.patch_dit.hidden_size, generator=g).to(device)
    dit = compiled if compiled is not None else model.patch_dit
    with autocast(device, v.precision):
        cond = {"prompt_kv": model.patch_dit.prompt_kv(prompt)} if v.prompt_cache else {"prompt": prompt}
        for _ in range(2):
            dit(x, t, x, **cond)
        sync(device)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            dit(x, t, x, **cond)
            sync(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class Report:
    def __init__(self, path: str | None, meta: dict[str, Any]) -> None:
        self.path, self.data = path, {**meta, "rows": {}, "skipped": {}}

    def add(self, section: str, key: str, row: dict[str, Any]) -> None:
        self.data["rows"].setdefault(section, {})[key] = row
        self.flush()

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"][what] = why
        print(f"  skipped {what}: {why}", flush=True)
        self.flush()

    def flush(self) -> None:
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    p.add_argument("--out-size", type=int, nargs=2, default=(2048, 2048), metavar=("H", "W"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="of the end-to-end rows (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--shares", type=float, nargs=3, default=(0.2, 0.3, 0.5),
                   metavar=("SIMPLE", "MEDIUM", "HARD"), help="patch shares of the groups")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                   help="Patch-DiT batch sizes to compare (default: 128 256 512 1024; CPU: 4 16)")
    p.add_argument("--rtm-entries", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=None, help="timed end-to-end runs (default 3; --quick 1)")
    p.add_argument("--budget", type=float, default=300.0, help="seconds for everything after setup")
    p.add_argument("--quick", action="store_true", help="fewer rows and repeats")
    p.add_argument("--compile", action="store_true", help="also time a torch.compile'd Patch-DiT step")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: a matrix product measured here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    cfg = PRESETS[args.preset]
    if cfg.autoencoder.kind != "kl":  # the stand-in is diffusers' AutoencoderKL network only
        print(f"note: preset {args.preset}'s autoencoder is {cfg.autoencoder.kind!r}; its stages are timed "
              f"with the AutoencoderKL network of the same widths, factor and latent channels")
        cfg = dataclasses.replace(cfg, autoencoder=dataclasses.replace(cfg.autoencoder, kind="kl"))
    precision = args.precision or ("fp32" if cpu else "bf16")
    other = "bf16" if precision == "fp32" else "fp32"
    batches = args.batch_sizes or ([4, 16] if cpu else [128, 256, 512, 1024])
    repeats = args.repeats or (1 if args.quick else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print("command:", shlex.join(["python3", *sys.argv]), flush=True)
    (out_h, out_w), scale = args.out_size, cfg.scale
    print(f"device {name}, torch {torch.__version__}, preset {args.preset}, "
          f"{out_h // scale}x{out_w // scale} -> {out_h}x{out_w}")

    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak(device)
    with torch.device("meta"):
        meta_ae = AutoencoderStandIn(config=cfg.autoencoder)
    sf = stage_flops(cfg, tuple(args.out_size), rtm_entries=args.rtm_entries, autoencoder=meta_ae)
    counts = group_counts(sf.patches, tuple(args.shares))
    steps = {mode: patch_steps(cfg, counts, mode) for mode in ("adaptive", "uniform")}
    model = Model.build(cfg, device, args.seed)
    inp = make_inputs(cfg, tuple(args.out_size), tuple(args.shares), args.rtm_entries, device, args.seed)
    print(f"peak {peak / 1e12:.1f} TFLOP/s ({'given' if args.peak_tflops else 'measured matmul'}); "
          f"{sf.patches} patches, groups {counts}, patch-steps {steps}; "
          f"setup {time.perf_counter() - t0:.1f} s", flush=True)
    report = Report(args.json, {
        "command": shlex.join(["python3", *sys.argv]), "device": name, "torch": torch.__version__,
        "preset": args.preset, "out_size": args.out_size, "group_counts": counts, "patch_steps": steps,
        "peak_tflops": peak / 1e12, "stage_flops": dataclasses.asdict(sf),
    })
    deadline = time.perf_counter() + args.budget

    def refine_flops(v: Variant) -> int:
        n = steps[v.mode]
        kv = sf.prompt_kv if v.prompt_cache else 0
        return sf.texture_encoder + kv + n * (sf.dit_step_cached if v.prompt_cache else sf.dit_step)

    def stage_row(times: dict, v: Variant) -> dict[str, Any]:
        flops = {"encode": sf.encode, "grm": sf.grm, "retrieve": sf.classifier + sf.retrieval,
                 "refine": refine_flops(v), "decode": sf.decode}
        return {st: {**times[st], "tflop": flops[st] / 1e12,
                     "utilisation": flops[st] / times[st]["seconds"] / peak} for st in STAGES}

    # 1. end to end, the headline configuration
    head = Variant(precision)
    upscale(model, inp, head, device)  # warm-up: kernels, autocast casts, allocator
    runs = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        times, x0_head = upscale(model, inp, head, device)
        sync(device)
        runs.append((time.perf_counter() - start, times))
    wall, times = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    total_flops = sf.image_total(steps["adaptive"], cached=True)
    e2e = {"wall_seconds": wall, "stages": stage_row(times, head), "flops": total_flops,
           "floor_seconds": total_flops / peak, "vs_floor": wall / (total_flops / peak),
           "peak_gb": max(t["peak_gb"] for t in times.values()), "runs": [r[0] for r in runs]}
    report.add("end_to_end", head.label(), e2e)
    refine_rate = times["refine"]["seconds"] / refine_flops(head)  # seconds per FLOP, for estimates

    def fits(what: str, estimate: float) -> bool:
        left = deadline - time.perf_counter()
        if estimate > left:
            report.skip(what, f"needs about {estimate:.0f} s, {max(left, 0):.0f} s left")
            return False
        return True

    def attempt(what: str, fn: Callable[[], Any]) -> Any:
        """Run one optional row; an error (out of memory, a compile failure) is recorded, not fatal."""
        try:
            return fn()
        except Exception as exc:
            report.skip(what, f"failed: {type(exc).__name__}: {str(exc)[:300]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return None

    # 2. the Patch-DiT step alone: precision x cache x batch
    fp32_slowdown = 1.0 if cpu else 12.0  # a first guess, replaced once measured
    for prec in (precision, other):
        for cache in (True, False):
            for b in batches if prec == precision else batches[-2:]:
                if args.quick and (b != batches[-1] or (prec == other and not cache)):
                    continue
                v = Variant(prec, prompt_cache=cache)
                step_flops = sf.dit_step_cached if cache else sf.dit_step
                calls = 3 if prec == "fp32" and not cpu else 10
                slow = fp32_slowdown if prec == "fp32" else 1.0
                estimate = (calls + 2) * b * step_flops * refine_rate * slow * 1.5
                if not fits(f"step {v.label()} x{b}", estimate):
                    continue
                sec = attempt(f"step {v.label()} x{b}", lambda v=v, b=b, c=calls: dit_step_time(
                    model, v, b, device, c))
                if sec is None:
                    continue
                row = {"batch": b, "seconds": sec, "patch_steps_per_s": b / sec,
                       "tflops": b * step_flops / sec / 1e12, "utilisation": b * step_flops / sec / peak}
                report.add("dit_step", f"{v.label()}, batch {b}", row)
                if prec == "fp32" and precision == "bf16" and cache:
                    base = report.data["rows"]["dit_step"].get(f"{Variant(precision).label()}, batch {b}")
                    if base:
                        fp32_slowdown = sec / base["seconds"]

    # 3. refine variants (the Patch-DiT stage of one image), each against the headline refine
    variants = [Variant(precision, mode="uniform"), Variant(precision, prompt_cache=False),
                Variant(precision, fused=True), Variant(precision, resident=True)]
    variants += [Variant(precision, batch_size=b) for b in batches if b != cfg.sampler.batch_size]
    variants += [Variant(other)]
    if args.quick:
        variants = [*variants[:3], Variant(other)]
    for v in variants:
        slow = fp32_slowdown if v.precision == "fp32" else 1.0
        if not fits(f"refine {v.label()}", 2.0 * refine_flops(v) * refine_rate * slow + 5):
            continue
        done = attempt(f"refine {v.label()}", lambda v=v: upscale(model, inp, v, device))
        if done is None:
            continue
        times, x0 = done
        row = stage_row(times, v)["refine"]
        row["x0_rel_diff_vs_headline"] = float((x0 - x0_head).norm() / x0_head.norm())
        report.add("refine", v.label(), row)

    # 4. torch.compile of the Patch-DiT step
    b = cfg.sampler.batch_size if not cpu else batches[-1]
    start = time.perf_counter()
    sec = None
    if args.compile and fits("compile", 120.0):
        sec = attempt("compile", lambda: dit_step_time(
            model, head, b, device, 10, compiled=torch.compile(model.patch_dit)))
    if sec is not None:
        report.add("dit_step", f"{head.label()}, batch {b}, torch.compile",
                   {"batch": b, "seconds": sec, "compile_and_time_seconds": time.perf_counter() - start,
                    "tflops": b * sf.dit_step_cached / sec / 1e12,
                    "utilisation": b * sf.dit_step_cached / sec / peak})

    # the summary table (last: the device reply carries the end of the output)
    rows = report.data["rows"]
    print(f"\nend to end, {head.label()}: {wall:.4g} s wall (median of {repeats}), FLOP floor "
          f"{total_flops / peak:.4g} s ({total_flops / 1e12:.4g} TFLOP at {peak / 1e12:.4g} TFLOP/s): "
          f"{e2e['vs_floor']:.2f}x; peak memory {e2e['peak_gb']:.2f} GB")
    print("| stage | seconds | TFLOP | utilisation | peak GB |\n|---|---:|---:|---:|---:|")
    for st, r in e2e["stages"].items():
        print(f"| {st} | {r['seconds']:.4g} | {r['tflop']:.4g} | {r['utilisation']:.1%} | "
              f"{r['peak_gb']:.2f} |")
    print("\n| Patch-DiT step | seconds | patch-steps/s | TFLOP/s | utilisation |\n|---|---:|---:|---:|---:|")
    for key, r in rows.get("dit_step", {}).items():
        print(f"| {key} | {r['seconds']:.4g} | {r['batch'] / r['seconds']:.4g} | {r['tflops']:.4g} | "
              f"{r['utilisation']:.1%} |")
    print("\n| refine (one image) | seconds | TFLOP | utilisation | peak GB | x0 rel. diff vs headline |"
          "\n|---|---:|---:|---:|---:|---:|")
    refine_rows = {head.label(): {**e2e["stages"]["refine"], "x0_rel_diff_vs_headline": 0.0},
                   **rows.get("refine", {})}
    for key, r in refine_rows.items():
        print(f"| {key} | {r['seconds']:.4g} | {r['tflop']:.4g} | {r['utilisation']:.1%} | "
              f"{r['peak_gb']:.2f} | {r['x0_rel_diff_vs_headline']:.3g} |")
    goals: dict[str, bool | None] = {
        "refine utilisation >= 45% (bf16)":
            e2e["stages"]["refine"]["utilisation"] >= 0.45 if precision == "bf16" else None,
        "end to end <= 1.5x FLOP floor": e2e["vs_floor"] <= 1.5,
        "peak memory <= 24 GB": e2e["peak_gb"] <= 24.0 if device.type == "cuda" else None,
    }
    report.data["goals"] = goals
    report.data["seconds_total"] = time.perf_counter() - t0
    report.flush()
    verdict = {True: "met", False: "NOT met", None: "n/a"}
    print("\ngoals: " + "; ".join(f"{k}: {verdict[ok]}" for k, ok in goals.items()))
    print(f"total {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
