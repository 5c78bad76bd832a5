"""One-call GPU benchmark of a Patch-DiT training step: steps/s, samples/s, peak memory and MFU of the
``small`` and ``paper`` presets in bf16 and fp16 (fp16 with a gradient scaler), optionally compiled.

Pure torch (torch, the repo's pure-torch modules and ``bench/flops.py`` / ``bench/gpu_model.py``; no
Ray, diffusers, faiss or pyiqa), so it runs on the lent GPU machines as they come. The device command:

    run(kind="nvidia-h100-x1", timeout_s=420, command="PYTHONUNBUFFERED=1 PYTHONPATH=. python3
        bench/gpu_train.py --budget 270 --compile --json $OUT/gpu_train.json 2>&1 | tee $OUT/gpu_train.log")

On CPU, as ``tests/test_gpu_train.py`` runs it: ``python bench/gpu_train.py --device cpu --presets tiny
--precisions fp32 bf16 --crop 96 --crops 2 --warmup 1 --steps 2``. ``--gpu-hours`` prints instead the
GPU-hours of the paper's 500K Patch-DiT steps from the FLOP count (meta device; no GPU needed).

What one step is: ``patchscaler.training.steps.patchdit_step`` after its frozen part, on precomputed
latents. A batch of B training patches (``--crops`` HR crops of ``--crop`` px, every 16 x 16 latent
window at stride 8: 9 per 256 px crop at f = 8) is random y0, x0, top-K RTM values and scores on the
device; each step draws t ~ U{1..T} and the noise, ``NoiseSchedule.q_sample`` / ``training_target``, the
texture encoder + Patch-DiT forward under autocast (``Denoiser``: ``steps.TextureDenoiser``'s forward),
``training.losses.diffusion_loss``, backward, the gradient norm (clip), AdamW (lr 5e-5, weight decay 0,
as the trainer). The frozen autoencoder / GRM / classifier forward and the retrieval are not in it;
``--gpu-hours`` counts their FLOPs separately. Random weights (zero-initialised gates get small values).

Per row (preset x batch x precision, then ``--compile`` rows): ``--warmup`` steps, then ``--steps``
timed steps with one synchronize at the end (the GPU's own pace; fp16's scaler syncs once a step, as in
a real run). MFU = FLOPs of the step (forward + backward, counted on the meta device,
``flops.train_step_flops``) x steps/s over the peak: ``--peak-tflops``, else a bf16 8192^3 matrix
product measured at start. A row that would overrun ``--budget`` is skipped, a failing one (out of
memory, a compile error) recorded; the JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import platform
import shlex
import sys
import time
from typing import Any

import torch
from flops import frozen_crop_flops, train_step_flops, windows_per_crop
from gpu_model import Report, matmul_peak, randomize_zeros, sync
from torch import nn
from vae_standin import AutoencoderStandIn

from patchscaler.config import PatchScalerConfig
from patchscaler.diffusion import NoiseSchedule
from patchscaler.patch_dit import PatchDiT
from patchscaler.presets import PRESETS
from patchscaler.texture import TextureEncoder
from patchscaler.training.losses import diffusion_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Denoiser(nn.Module):
    """Patch-DiT + texture encoder as ``patchscaler.training.steps.TextureDenoiser`` (same submodule
    names, same forward; that module imports diffusers, which the GPU machine lacks; the test checks the
    two agree)."""

    def __init__(self, *, patch_dit: PatchDiT, texture_encoder: TextureEncoder) -> None:
        super().__init__()
        self.patch_dit = patch_dit
        self.texture_encoder = texture_encoder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y0: torch.Tensor, values: torch.Tensor,
                scores: torch.Tensor) -> torch.Tensor:
        """x_t, y0 (B, C, V, V); t (B,); values (B, K, C, V, V); scores (B, K) -> output (B, C, V, V)."""
        prompt = self.texture_encoder(values, scores)  # (B, K*L, hidden)
        return self.patch_dit(x_t, t, y0, prompt)


def train_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


@dataclasses.dataclass
class Batch:
    """Precomputed latents of B training patches."""

    y0: torch.Tensor  # (B, C, V, V), the GRM's coarse patch
    x0: torch.Tensor  # (B, C, V, V), the HR latent patch
    values: torch.Tensor  # (B, K, C, V, V), top-K RTM values
    scores: torch.Tensor  # (B, K), their similarity

    @classmethod
    def random(cls, cfg: PatchScalerConfig, batch: int, device: torch.device, seed: int) -> Batch:
        g = torch.Generator(device).manual_seed(seed)
        c, v, k = cfg.latent_channels, cfg.sampler.patch_size, cfg.texture_encoder.top_k
        x0 = torch.randn(batch, c, v, v, generator=g, device=device)
        return cls(y0=x0 + 0.3 * torch.randn(x0.shape, generator=g, device=device), x0=x0,
                   values=torch.randn(batch, k, c, v, v, generator=g, device=device),
                   scores=torch.rand(batch, k, generator=g, device=device))


def train_step(model: nn.Module, params: list[nn.Parameter], batch: Batch, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, schedule: NoiseSchedule, precision: str,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step (Eq. 9); returns (loss, grad norm) as tensors (no host sync)."""
    x0, device = batch.x0, batch.x0.device
    # t and the noise drawn on the CPU as patchdit_step does (t stays there: the schedule's table is)
    t = torch.randint(1, schedule.num_train_timesteps + 1, (x0.shape[0],), generator=generator)  # (B,)
    eps = torch.randn(x0.shape, generator=generator).to(device)  # (B, C, V, V)
    x_t = schedule.q_sample(x0, t, eps)  # (B, C, V, V), Eq. (4)
    target = schedule.training_target(x0, eps, t)
    with train_autocast(device, precision):
        out = model(x_t, t.to(device).float(), batch.y0, batch.values, batch.scores)
    loss = diffusion_loss(out, target)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # fp16: true gradients before the norm; a no-op otherwise
    norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), norm


def time_row(model: nn.Module, compiled: nn.Module | None, cfg: PatchScalerConfig, batch_size: int,
             precision: str, device: torch.device, warmup: int, steps: int, seed: int) -> dict[str, Any]:
    """Fresh AdamW and scaler, ``warmup`` + ``steps`` steps; seconds per step and peak memory."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    schedule = NoiseSchedule(config=cfg.sampler)
    batch = Batch.random(cfg, batch_size, device, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    run = compiled if compiled is not None else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        start = time.perf_counter()
        for _ in range(warmup):
            train_step(run, params, batch, optimizer, scaler, schedule, precision, generator)
        sync(device)
        warmup_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            loss, norm = train_step(run, params, batch, optimizer, scaler, schedule, precision, generator)
        sync(device)
        seconds = (time.perf_counter() - start) / steps
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        loss_value, norm_value = float(loss), float(norm)
    finally:
        optimizer.zero_grad(set_to_none=True)
        del optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not torch.isfinite(torch.tensor(loss_value)):
        raise RuntimeError(f"non-finite loss {loss_value}")
    row = {"seconds_per_step": seconds, "steps_per_s": 1 / seconds, "warmup_seconds": warmup_seconds,
           "peak_gb": peak, "loss": loss_value, "grad_norm": norm_value}
    if precision == "fp16":
        row["loss_scale"] = scaler.get_scale()
    return row


def gb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"  # peak memory: CUDA only


def build(cfg: PatchScalerConfig, device: torch.device, seed: int) -> Denoiser:
    """The trainable pair with random weights, initialised on ``device`` (fast for the paper's 748M)."""
    torch.manual_seed(seed)
    with device:
        model = Denoiser(patch_dit=PatchDiT(config=cfg.patch_dit),
                         texture_encoder=TextureEncoder(dit=cfg.patch_dit, config=cfg.texture_encoder))
    return randomize_zeros(model, torch.Generator().manual_seed(seed)).train()


def gpu_hours(args: argparse.Namespace) -> None:
    """The paper recipe's Patch-DiT steps in GPU-hours at a given utilisation, from the FLOP count."""
    gpus = dict(item.split("=") for item in args.gpu)
    print("command:", shlex.join(["python", *sys.argv]))
    print(f"{args.total_steps:,} steps, {args.crop} px crops, utilisation {args.utilisation:.0%}; "
          "GPU-hours = steps x FLOP/step / (peak x utilisation)\n")
    heads = " | ".join(f"{name} ({tf} TFLOP/s)" for name, tf in gpus.items())
    print(f"| preset | crops / step | patches / step | train step TFLOP | + frozen TFLOP | {heads} |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(gpus))
    for name in args.presets:
        cfg = PRESETS[name]
        per_crop = windows_per_crop(cfg, args.crop)
        ae_cfg = dataclasses.replace(cfg.autoencoder, kind="kl")
        with torch.device("meta"):
            ae = AutoencoderStandIn(config=ae_cfg)
        frozen = frozen_crop_flops(dataclasses.replace(cfg, autoencoder=ae_cfg), args.crop, autoencoder=ae)
        for crops in args.crops:
            train = train_step_flops(cfg, crops * per_crop)
            total = train + crops * frozen
            hours = " | ".join(
                f"{args.total_steps * train / (float(tf) * 1e12 * args.utilisation) / 3600:,.1f} / "
                f"{args.total_steps * total / (float(tf) * 1e12 * args.utilisation) / 3600:,.1f}"
                for tf in gpus.values())
            print(f"| `{name}` | {crops} | {crops * per_crop} | {train / 1e12:.3f} | "
                  f"{crops * frozen / 1e12:.3f} | {hours} |")
    print("\n(GPU-hours: train step only / with the frozen per-step encode, GRM and classifier)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["paper", "small"], choices=sorted(PRESETS))
    p.add_argument("--precisions", nargs="+", default=None, choices=["bf16", "fp16", "fp32"],
                   help="default: bf16 fp16 on CUDA, fp32 bf16 on CPU")
    p.add_argument("--crop", type=int, default=256, help="HR crop size of the recipe, px")
    p.add_argument("--crops", type=int, nargs="+", default=None,
                   help="HR crops per step, in order (default: 6 12 24, the paper's batch 6 first; "
                        "--gpu-hours: 6 48)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per row")
    p.add_argument("--budget", type=float, default=270.0, help="seconds for everything after setup")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd steps (first batch)")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: a matrix product measured here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--gpu-hours", action="store_true",
                   help="print the GPU-hours of the paper recipe, then exit")
    p.add_argument("--total-steps", type=int, default=500_000, help="--gpu-hours: the paper's 500K")
    p.add_argument("--utilisation", type=float, default=0.4, help="--gpu-hours: share of the peak")
    p.add_argument("--gpu", nargs="+", default=["A100=312", "H100=989", "V100=125"], metavar="NAME=TFLOPS",
                   help="--gpu-hours: dense bf16 (V100: fp16) peaks")
    args = p.parse_args()
    if args.gpu_hours:
        args.crops = args.crops or [6, 48]
        return gpu_hours(args)

    t0 = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precisions = args.precisions or (["bf16", "fp16"] if cuda else ["fp32", "bf16"])
    crops_list = args.crops or [6, 12, 24]
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    command = shlex.join(["python3", *sys.argv])
    print("command:", command, flush=True)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak(device)
    print(f"device {name}, torch {torch.__version__}; peak {peak / 1e12:.1f} TFLOP/s "
          f"({'given' if args.peak_tflops else 'measured matmul'})", flush=True)
    report = Report(args.json, {"command": command, "device": name, "torch": torch.__version__,
                                "peak_tflops": peak / 1e12, "crop": args.crop})
    deadline = time.perf_counter() + args.budget
    rate = 0.2 * peak  # FLOP/s guessed for the first row's estimate, then the last measured
    per_patch = {name: train_step_flops(PRESETS[name], 1) for name in args.presets}  # linear in the batch

    def attempt(key: str, cfg_name: str, model: nn.Module, compiled: nn.Module | None, crops: int,
                precision: str, extra_seconds: float) -> None:
        nonlocal rate
        cfg = PRESETS[cfg_name]
        per_crop = windows_per_crop(cfg, args.crop)
        b = crops * per_crop
        flops = b * per_patch[cfg_name]
        estimate = 1.5 * (args.warmup + args.steps) * flops / rate + extra_seconds
        left = deadline - time.perf_counter()
        if estimate > left:
            report.skip(key, f"needs about {estimate:.0f} s, {max(left, 0):.0f} s left")
            return
        row = None
        try:
            row = time_row(model, compiled, cfg, b, precision, device, args.warmup, args.steps, args.seed)
        except Exception as exc:  # out of memory, a compile failure: recorded, the next row goes on
            report.skip(key, f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        if row is None:
            model.zero_grad(set_to_none=True)
            gc.collect()  # the failed step's activations, now that the traceback is gone
            if cuda:
                torch.cuda.empty_cache()
            return
        achieved = flops / row["seconds_per_step"]
        rate = achieved
        row.update(preset=cfg_name, precision=precision, compiled=compiled is not None, crops=crops,
                   patches=b, samples_per_s=b / row["seconds_per_step"],
                   crops_per_s=crops / row["seconds_per_step"], tflop_per_step=flops / 1e12,
                   tflops=achieved / 1e12, mfu=achieved / peak)
        report.add("train_step", key, row)
        print(f"  {key}: {row['steps_per_s']:.3g} steps/s, {row['samples_per_s']:.4g} patches/s, "
              f"{row['tflops']:.4g} TFLOP/s, MFU {row['mfu']:.1%}, peak {gb(row['peak_gb'])} GB, "
              f"loss {row['loss']:.4g}  [{time.perf_counter() - t0:.0f} s]", flush=True)

    for compile_pass in ([False, True] if args.compile else [False]):
        for cfg_name in args.presets:
            cfg = PRESETS[cfg_name]
            model = build(cfg, device, args.seed)
            trainable = sum(p.numel() for p in model.parameters())
            report.data.setdefault("parameters", {})[cfg_name] = trainable
            print(f"{cfg_name}: {trainable / 1e6:.1f}M trainable parameters, "
                  f"{windows_per_crop(cfg, args.crop)} patches per {args.crop} px crop", flush=True)
            compiled = torch.compile(model) if compile_pass else None
            for crops in crops_list[:1] if compile_pass else crops_list:
                for precision in precisions:
                    key = f"{cfg_name}, {precision}, {crops} crops"
                    key += ", torch.compile" if compile_pass else ""
                    attempt(key, cfg_name, model, compiled, crops, precision, 90.0 if compile_pass else 0.0)
            del model, compiled
            if cuda:
                torch.cuda.empty_cache()

    rows = report.data["rows"].get("train_step", {})
    print("\n| row | patches | steps/s | patches/s | TFLOP/step | TFLOP/s | MFU | peak GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in rows.items():
        print(f"| {key} | {r['patches']} | {r['steps_per_s']:.3g} | {r['samples_per_s']:.4g} | "
              f"{r['tflop_per_step']:.4g} | {r['tflops']:.4g} | {r['mfu']:.1%} | {gb(r['peak_gb'])} |")
    report.data["seconds_total"] = time.perf_counter() - t0
    report.flush()
    print(f"total {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
