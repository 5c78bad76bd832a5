"""Training throughput of the four trainers (samples/s, steps/s) at the demo recipe's settings, no Ray.

    python bench/train_throughput.py                                 # tiny preset, synthetic data, 2 threads
    python bench/train_throughput.py --data data/demo/photos --json /tmp/train_throughput.json
    python bench/train_throughput.py --only patchdit --steps 50 --weights runs/demo/cls --rtm runs/demo/rtm

What is timed is what ``patchscaler train-*`` runs per step (``trainer/loop.py``'s loop body), in one
process instead of a Ray Train worker: the trainer's own ``Task`` (``trainer/tasks.py``: ``setup`` picks
and unfreezes the trainable module, AdamW over its parameters as ``build_worker_state`` makes it) and one
step = ``next(batches)`` + ``Task.step`` (degradation, frozen encoders, forward, loss, backward, gradient
clipping, optimizer step). Settings as ``scripts/train_demo.sh``:

- autoencoder: batch 16, crop 64, 8 crops per image, ``--recon-loss mse``;
- GRM: batch 8, crop 128, 4 crops per image, Real-ESRGAN degradation (Eq. 1/8);
- classifier: batch 32, crop 64 (one latent patch), 8 crops per image;
- Patch-DiT + texture encoder: batch 8, crop 128, 4 crops per image, ``--t-sampling sampler``, an RTM;
  every 16x16 latent window of a crop (stride 8) is a training patch, so one crop is several patches.

A *sample* is one HR crop: samples/s = batch x steps/s, steps/s = 1 / median step seconds (after
``--warmup`` untimed steps, over ``--steps`` timed ones). Each step is split into: *batch* (making the
batch: ``next(batches)``), *degradation* (``Task.degrade``, timed by wrapping it on the task; GRM and
Patch-DiT only) and *model* (the rest of ``Task.step``: frozen encoders, GRM/classifier/RTM look-up,
forward, backward, optimizer); the shares are of the summed step time.

Data: by default synthetic in memory (random sinusoid-and-noise textures, 16 images of 256 px, cropped by
``trainer.data.random_crop``, random DTD labels for the classifier); with ``--data DIR`` (repeatable)
image files through the trainers' own pipeline (``RandomCrops`` + ``CropBatches``: decoding is then part
of *batch*); the classifier reads DIR as a DTD-layout folder if it is one, else its images with random
labels. Weights: a random init of ``--preset`` (time does not depend on the values) or ``--weights DIR``.
RTM: ``--rtm DIR``, else ``--rtm-entries`` random latent values with their classifier features as keys,
written to a temporary artifact that ``PatchDiTTask.setup`` loads as ``train-patchdit`` does.
``--compare-degradation N``: besides, the Real-ESRGAN degradation of one GRM batch (recipe batch and crop,
``DegradationConfig()``: Real-ESRGAN's pipeline alone) timed two ways, alternating, N times each: the whole
batch in one ``degrade`` call (per-image kernels by one grouped convolution, batched noise and JPEG) and
one ``degrade`` call per image (how ``degrade`` worked before it was batched); medians and their ratio.
Single process, ``--threads`` torch threads (default 2). The output says which data, weights and RTM were
used, prints the exact command line and a markdown table; ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from patchscaler.model import PatchScalerModel
from patchscaler.presets import PRESETS
from patchscaler.training.degradations import DegradationConfig, degrade
from patchscaler.weights import load_checkpoint, save_rtm
from trainer.data import DTD_CLASSES, CropBatches, RandomCrops, balanced_files, random_crop
from trainer.tasks import TASKS, Task, TrainConfig, learning_rate

# scripts/train_demo.sh's settings per trainer (plus its common --lr-schedule cosine --warmup-steps 50).
RECIPE: dict[str, dict[str, Any]] = {
    "autoencoder": {"batch_size": 16, "crop": 64, "crops_per_image": 8, "lr": 1e-3, "recon_loss": "mse"},
    "grm": {"batch_size": 8, "crop": 128, "crops_per_image": 4, "lr": 1e-3},
    "classifier": {"batch_size": 32, "crop": 64, "crops_per_image": 8, "lr": 1e-3},
    "patchdit": {"batch_size": 8, "crop": 128, "crops_per_image": 4, "lr": 1e-3, "t_sampling": "sampler"},
}
COMMON: dict[str, Any] = {"lr_schedule": "cosine", "warmup_steps": 50}
SYNTHETIC_IMAGES, SYNTHETIC_SIZE = 16, 256
PHASES = ("batch", "degradation", "model")


def synthetic_texture(size: int, g: torch.Generator) -> torch.Tensor:
    """(3, size, size) in [0, 1]: four random oriented sinusoids with random colours, plus fine noise."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")  # (size, size) each
    image = torch.zeros(3, size, size)
    for _ in range(4):
        freq = 2 * math.pi * (0.01 + 0.2 * float(torch.rand((), generator=g)))  # radians per pixel
        angle = math.pi * float(torch.rand((), generator=g))
        phase = 2 * math.pi * float(torch.rand((), generator=g))
        wave = torch.sin(freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)  # (size, size)
        image += torch.rand(3, 1, 1, generator=g) * wave  # (3, size, size)
    image = 0.5 + image / 8 + 0.05 * torch.randn(3, size, size, generator=g)
    return image.clamp(0.0, 1.0)


class SyntheticCrops:
    """Batches as ``CropBatches`` yields them, (images (B, 3, c, c) in [0, 1], labels (B,)), from textures
    in memory: ``crops_per_image`` random crops (``random_crop``: random window and flip) per drawn image."""

    def __init__(self, *, images: list[torch.Tensor], labels: list[int], batch_size: int, crop: int,
                 crops_per_image: int, seed: int) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.crop, self.crops_per_image = batch_size, crop, crops_per_image
        self.g = torch.Generator().manual_seed(seed)
        self._current, self._left = 0, 0

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        crops, labels = [], []
        while len(crops) < self.batch_size:
            if self._left == 0:
                self._current = int(torch.randint(len(self.images), (), generator=self.g))
                self._left = self.crops_per_image
            crops.append(random_crop(self.images[self._current], self.crop, self.g))
            labels.append(self.labels[self._current])
            self._left -= 1
        return torch.stack(crops), torch.tensor(labels, dtype=torch.long)


def make_batches(task: Task, *, synthetic: list[torch.Tensor] | None, seed: int) -> tuple[Any, str]:
    """The task's batch stream and a description of it: synthetic textures in memory, else the files of
    ``task.cfg.data`` through the trainer's own pipeline."""
    cfg = task.cfg
    if synthetic is not None:
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(len(DTD_CLASSES), (len(synthetic),), generator=g).tolist()
        batches = SyntheticCrops(images=synthetic, labels=labels, batch_size=cfg.batch_size, crop=cfg.crop,
                                 crops_per_image=cfg.crops_per_image, seed=seed)
        return batches, "synthetic"
    if cfg.task != "classifier":
        return task.batches(rank=0, start_step=0), "files"
    try:
        return task.batches(rank=0, start_step=0), "files, DTD labels"
    except ValueError:  # not one DTD-layout folder: its images with random labels
        files, weights = balanced_files(cfg.data)
        g = torch.Generator().manual_seed(seed)
        labels = torch.randint(len(DTD_CLASSES), (len(files),), generator=g).tolist()
        dataset = RandomCrops(files=files, weights=weights, labels=labels, crop=cfg.crop,
                              crops_per_image=cfg.crops_per_image, seed=seed)
        return CropBatches(dataset, batch_size=cfg.batch_size), "files, random labels"


def make_model(args: argparse.Namespace, device: torch.device) -> PatchScalerModel:
    if args.weights:
        return load_checkpoint(args.weights, device=device)
    torch.manual_seed(args.seed)  # as `patchscaler init-weights`
    return PatchScalerModel(config=PRESETS[args.preset]).to(device).eval()


def write_random_rtm(model: PatchScalerModel, path: str, entries: int, seed: int) -> None:
    """``entries`` random latent patches (M, C, V, V) as RTM-values, their classifier features as keys."""
    g = torch.Generator().manual_seed(seed)
    c, v = model.config.latent_channels, model.config.sampler.patch_size
    values = torch.randn(entries, c, v, v, generator=g)
    with torch.no_grad():
        keys = model.classifier.features(values)  # (M, D)
    save_rtm(path, keys=keys, values=values, manifest={"source": "bench/train_throughput.py, random"})


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_trainer(name: str, args: argparse.Namespace, rtm: str | None,
                 synthetic: list[torch.Tensor] | None) -> dict[str, Any]:
    """Set up ``name``'s task as ``build_worker_state`` does and time ``--warmup`` + ``--steps`` steps."""
    device = torch.device(args.device)
    cfg = TrainConfig(task=name, init=args.weights or f"random-init:{args.preset}", out="",
                      data=tuple(args.data), steps=args.warmup + args.steps, seed=args.seed, rtm=rtm,
                      cpus_per_worker=args.threads,
                      **COMMON, **RECIPE[name])
    task = TASKS[name](cfg=cfg, model=make_model(args, device), device=device)
    trainable = task.setup()
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed * 7919)
    batches, data = make_batches(task, synthetic=synthetic, seed=args.seed)

    degrade_seconds = [0.0]
    degrade = task.degrade

    def timed_degrade(hr: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        sync(device)
        start = time.perf_counter()
        out = degrade(hr, g)
        sync(device)
        degrade_seconds[0] += time.perf_counter() - start
        return out

    task.degrade = timed_degrade  # an instance attribute: Task.step's self.degrade(...) calls it
    steps, phases = [], {p: 0.0 for p in PHASES}
    metrics: dict[str, float] = {}
    for i in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, i)
        degrade_seconds[0] = 0.0
        start = time.perf_counter()
        batch = next(batches)
        made = time.perf_counter()
        metrics = task.step(trainable, batch, optimizer, generator)
        sync(device)
        end = time.perf_counter()
        if i >= args.warmup:
            steps.append(end - start)
            phases["batch"] += made - start
            phases["degradation"] += degrade_seconds[0]
            phases["model"] += end - made - degrade_seconds[0]
    median = statistics.median(steps)
    total = sum(steps)
    return {
        "batch_size": cfg.batch_size, "crop": cfg.crop, "crops_per_image": cfg.crops_per_image, "data": data,
        "step_seconds_median": median, "steps_per_s": 1.0 / median, "samples_per_s": cfg.batch_size / median,
        "shares": {p: phases[p] / total for p in PHASES}, "step_seconds": steps,
        "loss_last": metrics["loss"], "patches_per_step": metrics.get("patches", float(cfg.batch_size)),
        "trainable_parameters": sum(p.numel() for p in params),
    }


def compare_degradation(args: argparse.Namespace, synthetic: list[torch.Tensor] | None,
                        reps: int) -> dict[str, Any]:
    """Median seconds of degrading one GRM batch at once vs image by image (alternating, ``reps`` each)."""
    device = torch.device(args.device)
    batch, crop = RECIPE["grm"]["batch_size"], RECIPE["grm"]["crop"]
    g = torch.Generator().manual_seed(args.seed)
    images = synthetic or [synthetic_texture(SYNTHETIC_SIZE, g) for _ in range(batch)]
    hr = torch.stack([random_crop(images[i % len(images)], crop, g) for i in range(batch)]).to(device)
    config = DegradationConfig()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    times: dict[str, list[float]] = {"batched": [], "per_image": []}
    for _ in range(reps + 1):  # the first round is a warm-up
        for how in times:
            sync(device)
            start = time.perf_counter()
            if how == "batched":
                degrade(hr, config=config, generator=gen)
            else:
                torch.cat([degrade(hr[i:i + 1], config=config, generator=gen) for i in range(batch)])
            sync(device)
            times[how].append(time.perf_counter() - start)
    med = {how: statistics.median(t[1:]) for how, t in times.items()}
    return {"batch_size": batch, "crop": crop, "reps": reps, "batched_s": med["batched"],
            "per_image_s": med["per_image"], "speedup": med["per_image"] / med["batched"]}


def rate(x: float) -> str:
    """Three significant digits, without an exponent up to 99,999."""
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def table(trainers: dict[str, dict[str, Any]]) -> str:
    lines = ["| trainer | batch (crops) | crop (px) | median step (s) | steps/s | samples/s | batch | "
             "degradation | model |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in trainers.items():
        share = {p: f"{100 * r['shares'][p]:.0f}%" for p in PHASES}
        if name in ("autoencoder", "classifier"):
            share["degradation"] = "-"
        lines.append(f"| {name} | {r['batch_size']} | {r['crop']} | {r['step_seconds_median']:.3f} | "
                     f"{rate(r['steps_per_s'])} | {rate(r['samples_per_s'])} | {share['batch']} | "
                     f"{share['degradation']} | {share['model']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="random init (no --weights)")
    p.add_argument("--weights", default=None, help="checkpoint dir instead of a random init")
    p.add_argument("--data", action="append", default=[], metavar="DIR",
                   help="image folder (repeatable); default: synthetic textures in memory")
    p.add_argument("--rtm", default=None, help="RTM artifact dir (Patch-DiT); default: a random one")
    p.add_argument("--rtm-entries", type=int, default=256, help="entries of the random RTM (the demo's)")
    p.add_argument("--only", default=",".join(RECIPE), help="comma-separated trainers (default: all four)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare-degradation", type=int, default=0, metavar="N",
                   help="also time the degradation of one GRM batch at once vs image by image, N times each")
    p.add_argument("--json", default=None, metavar="PATH", help="write the numbers here")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := [n for n in names if n not in RECIPE]:
        parser.error(f"--only: unknown trainers {unknown}; choose from {list(RECIPE)}")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--steps must be >= 1, --warmup >= 0, --threads >= 1")
    torch.set_num_threads(args.threads)
    synthetic = None
    if not args.data:
        g = torch.Generator().manual_seed(args.seed)
        synthetic = [synthetic_texture(SYNTHETIC_SIZE, g) for _ in range(SYNTHETIC_IMAGES)]
        data = (f"synthetic: {SYNTHETIC_IMAGES} random textures of {SYNTHETIC_SIZE} px in memory, "
                "random classifier labels")
    else:
        data = f"image files under {', '.join(args.data)} (decoded per drawn image, as the trainers do)"
    weights = args.weights or f"random init of preset {args.preset!r} (seed {args.seed})"
    rtm = args.rtm or f"random, {args.rtm_entries} entries (temporary artifact)"
    command = shlex.join([Path(sys.executable).name, "bench/train_throughput.py", *argv])
    print("command:", command, flush=True)
    print(f"data: {data}\nweights: {weights}\nrtm: {rtm}\ndevice {args.device}, torch threads "
          f"{torch.get_num_threads()}, warm-up {args.warmup} + {args.steps} timed steps per trainer",
          flush=True)

    trainers: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        rtm_dir = args.rtm
        if "patchdit" in names and rtm_dir is None:
            rtm_dir = str(Path(tmp) / "rtm")
            write_random_rtm(make_model(args, torch.device("cpu")), rtm_dir, args.rtm_entries, args.seed)
        for name in names:
            r = time_trainer(name, args, rtm_dir, synthetic)
            trainers[name] = r
            print(f"  {name}: median step {r['step_seconds_median']:.3f} s, {rate(r['samples_per_s'])} "
                  f"samples/s ({r['data']}), last loss {r['loss_last']:.4g}", flush=True)

    print()
    print(table(trainers))
    print("\nA sample is one HR crop (samples/s = batch x steps/s). Shares of the step: batch = making the "
          "batch, degradation = Task.degrade, model = frozen encoders + forward + backward + optimizer.")
    for name in ("grm", "patchdit"):
        if name in trainers:
            share = trainers[name]["shares"]
            both = 100 * (share["batch"] + share["degradation"])
            print(f"{name}: data + degradation = {both:.0f}% of a step "
                  f"(batch {100 * share['batch']:.0f}%, degradation {100 * share['degradation']:.0f}%)")
    comparison = None
    if args.compare_degradation:
        comparison = compare_degradation(args, synthetic, args.compare_degradation)
        print(f"degradation of one GRM batch ({comparison['batch_size']} x {comparison['crop']} px, "
              f"Real-ESRGAN only), median of {comparison['reps']}: batched {comparison['batched_s']:.3f} s, "
              f"image by image {comparison['per_image_s']:.3f} s ({comparison['speedup']:.2f}x)")
    if "patchdit" in trainers:
        r = trainers["patchdit"]
        print(f"Patch-DiT trains on {r['patches_per_step'] / r['batch_size']:.0f} latent windows per crop: "
              f"{rate(r['patches_per_step'] * r['steps_per_s'])} windows/s.")
    result = {"command": command, "data": data, "weights": weights,
              "rtm": rtm if "patchdit" in names else None, "preset": args.preset, "device": args.device,
              "threads": torch.get_num_threads(),
              "warmup": args.warmup, "steps": args.steps, "torch": torch.__version__,
              "settings": {n: {**COMMON, **RECIPE[n]} for n in names}, "trainers": trainers,
              "degradation_comparison": comparison}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
