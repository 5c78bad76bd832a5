"""The four trainers: one ``TrainConfig`` for all, per-task defaults, and a ``Task`` per module.

A task says which part of ``PatchScalerModel`` it trains (everything else is frozen), where its batches
come from and how one step goes (``patchscaler.training.steps``). ``trainer.loop`` runs any task on Ray
Train. Defaults follow the paper where it says something (Adam, batch 6, lr 5e-5, 50K GRM / classifier
iterations, 500K Patch-DiT iterations, 256 px HR crops as Real-ESRGAN, RTM patches of 128 px); the
autoencoder's follow LDM's first stage without its perceptual and adversarial terms.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from patchscaler.config import PatchScalerConfig
from patchscaler.model import PatchScalerModel
from patchscaler.training.degradations import DegradationConfig, PairPool, degrade
from patchscaler.training.precision import Amp
from patchscaler.training.steps import (
    AutoencoderForTraining,
    TextureDenoiser,
    autoencoder_step,
    classifier_step,
    grm_step,
    patchdit_step,
)
from patchscaler.weights import load_rtm
from trainer.data import CropBatches, RandomCrops, balanced_files, list_textures


@dataclass(frozen=True)
class TrainConfig:
    task: str  # one of TASKS
    init: str  # input checkpoint dir (e.g. from `patchscaler init-weights`)
    out: str  # output checkpoint dir; also where a rerun resumes from
    data: tuple[str, ...]  # HR folders / s3:// prefixes, or one DTD-layout folder (classifier)
    steps: int = 50_000
    batch_size: int = 6
    lr: float = 5e-5
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # or "cosine" (to 0 at `steps`)
    warmup_steps: int = 0  # linear warm-up
    crop: int = 256
    crops_per_image: int = 4
    color_augment: bool = False  # random channel order, saturation and gains per crop
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1000
    max_grad_norm: float | None = 1.0
    degradation: str = "realesrgan"  # or "bicubic"
    # grm / patchdit: shares of clean (bicubic-only) and mild pairs beside Real-ESRGAN's (DegradationConfig)
    clean_share: float = 0.1
    mild_share: float = 0.2
    keep_color: bool = True  # grm / patchdit: each degraded LR keeps its bicubic's channel means
    pair_pool: int = 0  # grm / patchdit: Real-ESRGAN's pool of training pairs (pairs kept; 0: off)
    kl_weight: float = 1e-6  # autoencoder (AutoencoderKL only)
    recon_loss: str = "l1"  # autoencoder: "l1" (LDM), "mse" or "mse+fft" (patchscaler/training/losses.py)
    calibrate_scale: bool = True  # autoencoder: write scaling_factor = 1 / std(latents)
    rtm: str | None = None  # patchdit: RTM artifact dir
    # grm / classifier / patchdit: a pretrained diffusers AutoencoderKL folder that replaces --init's
    # autoencoder (weights and config, scaling_factor included); written into every checkpoint
    autoencoder: str | None = None
    # patchdit: "uniform" t ~ U{1..T} (Eq. 9) or "sampler": only the times PGS evaluates the network at
    t_sampling: str = "uniform"
    # validation HR images (never trained on): validated every val_every steps (trainer/validation.py);
    # grm: gamma1/gamma2 are calibrated on them for the export to give the groups these (simple, medium,
    # hard) shares (trainer/calibrate.py)
    val_data: tuple[str, ...] = ()
    group_shares: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    num_workers: int = 1  # Ray Train workers (one per GPU)
    use_gpu: bool | None = None  # None: use GPUs when the Ray cluster has them
    cpus_per_worker: int = 1
    loader_workers: int = 0  # DataLoader processes per Ray worker
    loader_prefetch: int = 4  # batches each DataLoader process reads ahead
    storage: str | None = None  # Ray Train storage path; default OUT/ray
    address: str | None = None  # Ray cluster address; default: a local Ray
    # unattended runs and what they keep (trainer/checkpoints.py, trainer/ema.py)
    ema_decay: float = 0.9999  # EMA of the trained weights, warm-up min(decay, (1 + step) / (10 + step))
    keep_checkpoints: int = 3  # the last k checkpoints in the run's storage
    max_failures: int = 3  # worker failures Ray Train recovers from (from the last checkpoint)
    # seeing the run (trainer/tracking.py, trainer/validation.py)
    val_every: int = 1000  # validation crops through the real sampler (needs val_data)
    val_images: int = 4  # how many validation crops
    verbose: bool = False  # Ray's own logs
    # precision and speed (patchscaler/training/precision.py)
    precision: str = "auto"  # bf16 | fp16 (with GradScaler) | fp32 | auto: bf16 on CUDA, fp32 elsewhere
    compile: bool = False  # torch.compile of the trained module
    tf32: bool = True  # TF32 matmuls and convolutions on CUDA

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        tuples = {k: tuple(data[k]) for k in ("data", "val_data", "group_shares") if k in data}
        return cls(**{**data, **tuples})


# The four trainer configs: per-task defaults over TrainConfig's.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "autoencoder": {"steps": 100_000, "batch_size": 8, "lr": 1e-4, "crop": 256},
    "grm": {"steps": 50_000, "batch_size": 6, "lr": 5e-5, "crop": 256},
    "classifier": {"steps": 100_000, "batch_size": 32, "lr": 5e-5, "crop": 128, "crops_per_image": 8},
    "patchdit": {"steps": 500_000, "batch_size": 6, "lr": 5e-5, "crop": 256},
}


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of 0-based ``step``: linear warm-up, then constant (the paper) or cosine."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_schedule == "constant":
        return cfg.lr * warm
    if cfg.lr_schedule == "cosine":
        return cfg.lr * warm * 0.5 * (1.0 + math.cos(math.pi * min(step, cfg.steps) / max(1, cfg.steps)))
    raise ValueError(f"unknown lr schedule {cfg.lr_schedule!r}; use 'constant' or 'cosine'")


def _freeze_all_but(model: PatchScalerModel, trainable: nn.Module) -> nn.Module:
    model.requires_grad_(False)
    model.eval()
    trainable.requires_grad_(True)
    trainable.train()
    return trainable


@dataclass
class Task:
    """Base: ``setup`` picks the trainable module, ``batches`` the data, ``step`` one update."""

    cfg: TrainConfig
    model: PatchScalerModel
    device: torch.device
    extras: dict[str, Any] = field(default_factory=dict)
    amp: Amp | None = None  # mixed precision of the step; None: bf16 on CUDA, fp32 elsewhere

    def __post_init__(self) -> None:
        if self.cfg.autoencoder:
            self.use_autoencoder(self.cfg.autoencoder)

    def use_autoencoder(self, source: str) -> None:
        """Put the pretrained autoencoder at ``source`` (``weights.load_pretrained_autoencoder``) in place
        of the model's own, frozen; the model's config (what checkpoints record) follows it."""
        from patchscaler.autoencoder import LatentAutoencoder
        from patchscaler.weights import load_pretrained_autoencoder, with_autoencoder

        vae, ae_config = load_pretrained_autoencoder(source, self.model.config.autoencoder)
        self.model.config = with_autoencoder(self.model.config, ae_config, source=source)
        self.model.autoencoder = LatentAutoencoder(config=ae_config, vae=vae).to(self.device)

    def setup(self) -> nn.Module:
        raise TypeError(f"{type(self).__name__} must define setup()")

    def batches(self, *, rank: int, start_step: int) -> CropBatches:
        files, weights = balanced_files(self.cfg.data)
        dataset = RandomCrops(files=files, weights=weights, crop=self.cfg.crop,
                              crops_per_image=self.cfg.crops_per_image, color_augment=self.cfg.color_augment,
                              seed=_stream_seed(self.cfg.seed, rank, start_step))
        return CropBatches(dataset, batch_size=self.cfg.batch_size, num_workers=self.cfg.loader_workers,
                           prefetch_factor=self.cfg.loader_prefetch, pin_memory=self.device.type == "cuda")

    def step(self, module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
             optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict[str, float]:
        raise TypeError(f"{type(self).__name__} must define step()")

    def checkpoint_config(self, batches: CropBatches) -> PatchScalerConfig:
        """The config written next to the weights (the autoencoder task calibrates the latent scale)."""
        return self.model.config

    def degradation(self) -> DegradationConfig:
        return DegradationConfig(kind=self.cfg.degradation, scale=self.model.config.scale,
                                 clean_share=self.cfg.clean_share, mild_share=self.cfg.mild_share,
                                 keep_color=self.cfg.keep_color)

    def degrade(self, hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """LR images of ``hr`` (B, 3, H, W) on the training device. Off the CPU, the randomness comes from
        a generator on that device, seeded once from ``generator`` (so noise is drawn where it is used)."""
        if hr.device.type != generator.device.type:
            if "degrade_generator" not in self.extras:
                seed = int(torch.randint(2**62, (), generator=generator))
                self.extras["degrade_generator"] = torch.Generator(device=hr.device).manual_seed(seed)
            generator = self.extras["degrade_generator"]
        return degrade(hr, config=self.degradation(), generator=generator)

    def pairs(self, hr: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(HR, LR) training pairs of a batch of HR crops: degraded, then mixed through the pair pool."""
        lr = self.degrade(hr, generator)
        if self.cfg.pair_pool <= 0:
            return hr, lr
        pool = self.extras.setdefault("pair_pool", PairPool(size=self.cfg.pair_pool))
        return pool.mix(hr, lr, generator)

    def check_crop(self, minimum: int) -> None:
        multiple = self.model.autoencoder.factor * self.model.config.scale
        if self.cfg.crop % multiple or self.cfg.crop < minimum:
            raise ValueError(f"--crop {self.cfg.crop}: must be a multiple of {multiple} and >= {minimum}")


def _stream_seed(seed: int, rank: int, start_step: int) -> int:
    return seed * 1_000_003 + rank * 10_007 + start_step


class AutoencoderTask(Task):
    def setup(self) -> nn.Module:
        if self.model.config.autoencoder.pretrained:
            raise ValueError(f"the autoencoder of {self.cfg.init} is pretrained "
                             f"({self.model.config.autoencoder.pretrained}): skip train-autoencoder and "
                             "start at train-grm")
        self.check_crop(self.model.autoencoder.factor)
        ae = self.model.autoencoder
        return _freeze_all_but(self.model, AutoencoderForTraining(vae=ae.vae, config=ae.config))

    def step(self, module, batch, optimizer, generator):
        hr = batch[0].to(self.device)
        return autoencoder_step(module, hr, optimizer, kl_weight=self.cfg.kl_weight, generator=generator,
                                recon_loss=self.cfg.recon_loss,
                                max_grad_norm=self.cfg.max_grad_norm, amp=self.amp)

    @torch.no_grad()
    def checkpoint_config(self, batches: CropBatches) -> PatchScalerConfig:
        """LDM's recipe for the latent scale: 1 / std of the latents of a few training batches."""
        config = self.model.config
        if not self.cfg.calibrate_scale:
            return config
        from patchscaler.autoencoder import raw_latent

        vae = self.model.autoencoder.vae
        means = [raw_latent(vae, next(batches)[0].to(self.device) * 2 - 1) for _ in range(4)]
        factor = float(1.0 / torch.cat(means).float().std())
        ae = dataclasses.replace(config.autoencoder, scaling_factor=round(factor, 6))
        return config.replace(autoencoder=ae)


class GRMTask(Task):
    def setup(self) -> nn.Module:
        self.check_crop(self.model.autoencoder.factor * self.model.config.scale)
        return _freeze_all_but(self.model, self.model.grm)

    @torch.no_grad()
    def checkpoint_config(self, batches: CropBatches) -> PatchScalerConfig:
        """With ``val_data``: gamma1/gamma2 calibrated on the validation images (trainer/calibrate.py);
        the report (thresholds, group counts, histogram) goes to ``extras["calibration"]``."""
        if not self.cfg.val_data:
            return self.model.config
        from trainer.calibrate import calibrate
        from trainer.data import list_images, read_image

        if "val_images" not in self.extras:
            paths = [p for source in self.cfg.val_data for p in list_images(source)]
            images = [read_image(p) for p in paths]
            self.extras["val_images"] = [im for im in images if im is not None]
        self.model.grm.eval()
        try:
            config, report = calibrate(self.model, self.extras["val_images"], shares=self.cfg.group_shares,
                                       degradation=self.degradation())
        finally:
            self.model.grm.train()
        self.extras["calibration"] = report
        return config

    def step(self, module, batch, optimizer, generator):
        hr, lr = self.pairs(batch[0].to(self.device), generator)
        g = self.model.config.grm
        return grm_step(module, self.model.autoencoder, lr, hr, optimizer, scale=self.model.config.scale,
                        lam=g.loss_lambda, eta=g.loss_eta, max_grad_norm=self.cfg.max_grad_norm, amp=self.amp)


class ClassifierTask(Task):
    def setup(self) -> nn.Module:
        patch = self.model.config.sampler.patch_size * self.model.autoencoder.factor
        if self.cfg.crop != patch:
            raise ValueError(f"--crop {self.cfg.crop}: the classifier sees {patch} px crops (latent "
                             f"{self.model.config.sampler.patch_size}x{self.model.config.sampler.patch_size})")
        return _freeze_all_but(self.model, self.model.classifier)

    def batches(self, *, rank: int, start_step: int) -> CropBatches:
        if len(self.cfg.data) != 1:
            raise ValueError("train-classifier reads one DTD-layout folder")
        samples = list_textures(self.cfg.data[0])
        dataset = RandomCrops(files=[p for p, _ in samples], labels=[lab for _, lab in samples],
                              crop=self.cfg.crop, crops_per_image=self.cfg.crops_per_image,
                              seed=_stream_seed(self.cfg.seed, rank, start_step))
        return CropBatches(dataset, batch_size=self.cfg.batch_size, num_workers=self.cfg.loader_workers,
                           prefetch_factor=self.cfg.loader_prefetch, pin_memory=self.device.type == "cuda")

    def step(self, module, batch, optimizer, generator):
        images, labels = batch[0].to(self.device), batch[1].to(self.device)
        return classifier_step(module, self.model.autoencoder, images, labels, optimizer,
                               max_grad_norm=self.cfg.max_grad_norm, amp=self.amp)


class PatchDiTTask(Task):
    def setup(self) -> nn.Module:
        cfg = self.model.config
        self.check_crop(cfg.sampler.patch_size * self.model.autoencoder.factor)
        if not self.cfg.rtm:
            raise ValueError("train-patchdit needs --rtm (an RTM artifact, see `patchscaler build-rtm`)")
        from patchscaler.diffusion import NoiseSchedule

        self.extras["rtm"], _ = load_rtm(self.cfg.rtm)
        self.extras["schedule"] = NoiseSchedule(config=cfg.sampler)
        self.extras["schedule"].alphas_cumprod = self.extras["schedule"].alphas_cumprod.to(self.device)
        self.extras["t_choices"] = sampler_times(cfg, self.cfg.t_sampling)
        denoiser = TextureDenoiser(patch_dit=self.model.patch_dit, texture_encoder=self.model.texture_encoder)
        return _freeze_all_but(self.model, denoiser)

    def step(self, module, batch, optimizer, generator):
        hr, lr = self.pairs(batch[0].to(self.device), generator)
        cfg = self.model.config
        return patchdit_step(
            module, grm=self.model.grm, classifier=self.model.classifier, autoencoder=self.model.autoencoder,
            rtm=self.extras["rtm"], schedule=self.extras["schedule"], lr=lr, hr=hr, optimizer=optimizer,
            scale=cfg.scale, patch=cfg.sampler.patch_size,
            stride=cfg.sampler.patch_size - cfg.sampler.overlap,
            top_k=cfg.texture_encoder.top_k, generator=generator, t_choices=self.extras["t_choices"],
            max_grad_norm=self.cfg.max_grad_norm, amp=self.amp,
        )


def sampler_times(config: PatchScalerConfig, how: str) -> torch.Tensor | None:
    """None for t ~ U{1..T}; for "sampler", the (n,) sorted times at which PGS evaluates the network,
    over all groups of both modes (with the default schedules: 50, 100, ..., 1000)."""
    if how == "uniform":
        return None
    if how != "sampler":
        raise ValueError(f"unknown t_sampling {how!r}; use 'uniform' or 'sampler'")
    from patchscaler.diffusion import NoiseSchedule
    from patchscaler.pgs import group_plan

    schedule = NoiseSchedule(config=config.sampler)
    times = set()
    for mode in ("adaptive", "uniform"):
        plan = group_plan(dataclasses.replace(config.sampler, mode=mode))
        for group in plan:
            times.update(schedule.timesteps(group.tau, group.steps))
    return torch.tensor(sorted(times), dtype=torch.long)


TASKS: dict[str, type[Task]] = {
    "autoencoder": AutoencoderTask,
    "grm": GRMTask,
    "classifier": ClassifierTask,
    "patchdit": PatchDiTTask,
}
