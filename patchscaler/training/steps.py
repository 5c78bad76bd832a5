"""One optimisation step per trainable module, as plain functions (model parts + batch + optimizer).

The Ray Train loops (``trainer/``) call these; so can a notebook. Trainable parts may come wrapped in
``DistributedDataParallel``, which is why the autoencoder and the Patch-DiT + texture-encoder pair have
small training modules here whose ``forward`` is everything that needs gradients. Mixed precision:
``amp`` (``precision.py``: bf16, fp16 with a gradient scaler, or fp32); without it bf16 autocast on CUDA
and fp32 elsewhere. Losses are computed in fp32.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL
from torch import nn

from patchscaler.autoencoder import Autoencoder, LatentAutoencoder, upscale_input
from patchscaler.config import AutoencoderConfig
from patchscaler.patch_dit import PatchDiT
from patchscaler.rtm import ReferenceTextureMemory
from patchscaler.texture import TextureClassifier, TextureEncoder
from patchscaler.training.losses import autoencoder_loss, classifier_loss, diffusion_loss, grm_loss
from patchscaler.training.precision import Amp

if TYPE_CHECKING:
    from patchscaler.diffusion import NoiseSchedule


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _amp(amp: Amp | None, device: torch.device) -> Amp:
    return amp if amp is not None else Amp.create("auto", device)


class AutoencoderForTraining(nn.Module):
    """Wraps the diffusers autoencoder so one ``forward`` gives what the loss needs: (recon, latent,
    logvar). ``AutoencoderKL`` decodes a posterior sample (logvar for the KL term); ``AutoencoderDC`` is
    deterministic (logvar None, no KL term)."""

    def __init__(self, *, vae: Autoencoder, config: AutoencoderConfig) -> None:
        super().__init__()
        self.vae = vae
        self.latent_channels = config.latent_channels
        self.factor = config.downsample_factor

    def latent_shape(self, x: torch.Tensor) -> tuple[int, int, int, int]:
        return (x.shape[0], self.latent_channels, x.shape[-2] // self.factor, x.shape[-1] // self.factor)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                     torch.Tensor | None]:
        """x (B, 3, H, W) in [-1, 1], noise (B, C, H/f, W/f) -> recon (B, 3, H, W), latent, logvar."""
        if not isinstance(self.vae, AutoencoderKL):
            z = self.vae.encode(x).latent  # (B, C, H/f, W/f)
            return self.vae.decode(z).sample, z, None
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * noise  # (B, C, H/f, W/f), a posterior sample
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


class TextureDenoiser(nn.Module):
    """Patch-DiT and the similarity-aware texture encoder, trained together (Eq. 9)."""

    def __init__(self, *, patch_dit: PatchDiT, texture_encoder: TextureEncoder) -> None:
        super().__init__()
        self.patch_dit = patch_dit
        self.texture_encoder = texture_encoder

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y0: torch.Tensor, values: torch.Tensor,
                scores: torch.Tensor) -> torch.Tensor:
        """x_t, y0 (B, 4, V, V); t (B,); values (B, K, 4, V, V); scores (B, K) -> eps (B, 4, V, V)."""
        prompt = self.texture_encoder(values, scores)  # (B, K*L, hidden)
        return self.patch_dit(x_t, t, y0, prompt)


def autoencoder_step(
    model: nn.Module, hr: torch.Tensor, optimizer: torch.optim.Optimizer, *, kl_weight: float,
    generator: torch.Generator, max_grad_norm: float | None = None, recon_loss: str = "l1",
    amp: Amp | None = None,
) -> dict[str, float]:
    """``model``: an ``AutoencoderForTraining`` (maybe DDP-wrapped); ``hr`` (B, 3, H, W) in [0, 1]."""
    x = hr * 2.0 - 1.0  # (B, 3, H, W) in [-1, 1]
    inner = model.module if hasattr(model, "module") else model
    noise = torch.randn(inner.latent_shape(x), generator=generator)  # used by AutoencoderKL only
    amp = _amp(amp, x.device)
    with amp.autocast():
        recon, mean, logvar = model(x, noise.to(x.device))
    loss, parts = autoencoder_loss(recon, x, mean, logvar, kl_weight=kl_weight, recon_loss=recon_loss)
    grad_norm = amp.update(loss, model, optimizer, max_grad_norm)
    latent_std = float(mean.detach().float().std())
    return {"loss": float(loss.detach()), **parts, "latent_std": latent_std, "grad_norm": grad_norm}


@torch.no_grad()
def encode_pair(
    autoencoder: LatentAutoencoder, lr: torch.Tensor, hr: torch.Tensor, *, scale: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(LR (B, 3, h, w), HR (B, 3, h*scale, w*scale)) -> (y_LR, x_HR), both (B, 4, H/8, W/8)."""
    with autocast(hr.device):
        y_lr = autoencoder.encode(upscale_input(lr, scale))
        x_hr = autoencoder.encode(hr)
    return y_lr.float(), x_hr.float()


def grm_step(
    grm: nn.Module, autoencoder: LatentAutoencoder, lr: torch.Tensor, hr: torch.Tensor,
    optimizer: torch.optim.Optimizer, *, scale: int, lam: float, eta: float,
    max_grad_norm: float | None = None, amp: Amp | None = None,
) -> dict[str, float]:
    """Eq. (1)/(8) on one batch: the frozen autoencoder gives y_LR and x_HR, the GRM (y_HR, C)."""
    y_lr, x_hr = encode_pair(autoencoder, lr, hr, scale=scale)
    amp = _amp(amp, hr.device)
    with amp.autocast():
        y_hr, conf = grm(y_lr)
    loss = grm_loss(y_hr.float(), conf.float(), x_hr, lam=lam, eta=eta)
    grad_norm = amp.update(loss, grm, optimizer, max_grad_norm)
    l1 = float((y_hr.detach().float() - x_hr).abs().mean())
    conf_mean = float(conf.detach().float().mean())
    return {"loss": float(loss.detach()), "l1": l1, "conf": conf_mean, "grad_norm": grad_norm}


def classifier_step(
    classifier: nn.Module, autoencoder: LatentAutoencoder, images: torch.Tensor, labels: torch.Tensor,
    optimizer: torch.optim.Optimizer, *, max_grad_norm: float | None = None, amp: Amp | None = None,
) -> dict[str, float]:
    """Cross-entropy on latent patches: images (B, 3, 8V, 8V) in [0, 1] -> latents (B, 4, V, V)."""
    with torch.no_grad(), autocast(images.device):
        latents = autoencoder.encode(images).float()  # (B, 4, V, V)
    amp = _amp(amp, images.device)
    with amp.autocast():
        logits = classifier(latents)  # (B, 47)
    loss, parts = classifier_loss(logits, labels)
    grad_norm = amp.update(loss, classifier, optimizer, max_grad_norm)
    return {"loss": float(loss.detach()), **parts, "grad_norm": grad_norm}


def latent_windows(x: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Every (size, size) window of a latent batch at ``stride``: (B, C, h, w) -> (B * W, C, size, size),
    the W windows of image 0 first, each image's in row-major order (as ``patching.split_patches``)."""
    b, c, h, w = x.shape
    if h < size or w < size:
        raise ValueError(f"latent {h}x{w} is smaller than one {size}x{size} window")
    cols = torch.nn.functional.unfold(x, kernel_size=size, stride=stride)  # (B, C*size*size, W)
    n = cols.shape[-1]
    return cols.transpose(1, 2).reshape(b * n, c, size, size)  # (B*W, C, size, size)


@torch.no_grad()
def texture_condition(
    classifier: TextureClassifier, rtm: ReferenceTextureMemory, y0: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Retrieval of B.3: classifier features of y0 (B, 4, V, V) -> top-k RTM (values (B,k,4,V,V), scores)."""
    queries = classifier.features(y0).float().cpu()  # (B, D)
    scores, idx = rtm.search(queries, k)  # (B, k) each
    return rtm.gather(idx).to(y0.device), scores.to(y0.device)


def sample_timesteps(n: int, t_choices: torch.Tensor | None, num_train_timesteps: int,
                     generator: torch.Generator) -> torch.Tensor:
    """(n,) long training time steps: U{1..T} (Eq. 9), or uniform over ``t_choices`` (e.g. the times the
    PGS sampler ever evaluates the network at, ``SamplerConfig``'s shared grid)."""
    if t_choices is None:
        return torch.randint(1, num_train_timesteps + 1, (n,), generator=generator)
    return t_choices[torch.randint(len(t_choices), (n,), generator=generator)]


def patchdit_step(
    denoiser: nn.Module, *, grm: nn.Module, classifier: TextureClassifier, autoencoder: LatentAutoencoder,
    rtm: ReferenceTextureMemory, schedule: NoiseSchedule, lr: torch.Tensor, hr: torch.Tensor,
    optimizer: torch.optim.Optimizer, scale: int, patch: int, stride: int, top_k: int,
    generator: torch.Generator, t_choices: torch.Tensor | None = None, max_grad_norm: float | None = None,
    amp: Amp | None = None,
) -> dict[str, float]:
    """Eq. (9) on every V x V latent window (at the sampler's patch stride) of each crop: the frozen
    autoencoder + GRM give the coarse y0 and the target x0 once per crop; the frozen classifier + RTM give
    each window's top-K texture prior; t ~ U{1..T} (or ``t_choices``), one noise draw per window. The loss
    target follows the schedule's ``prediction_type`` (``NoiseSchedule.training_target``)."""
    y_lr, x_hr = encode_pair(autoencoder, lr, hr, scale=scale)
    with torch.no_grad(), autocast(hr.device):
        y_hr = grm(y_lr)[0].float()  # (B, C, h, w)
    y0 = latent_windows(y_hr, patch, stride)  # (B*W, C, V, V)
    x0 = latent_windows(x_hr, patch, stride)  # (B*W, C, V, V)
    values, scores = texture_condition(classifier, rtm, y0, top_k)
    t = sample_timesteps(x0.shape[0], t_choices, schedule.num_train_timesteps, generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)  # (B*W, C, V, V)
    x_t = schedule.q_sample(x0, t, eps)  # (B*W, C, V, V), Eq. (4)
    target = schedule.training_target(x0, eps, t)  # eps (Eq. 9), v or x0
    amp = _amp(amp, hr.device)
    with amp.autocast():
        out = denoiser(x_t, t.float(), y0, values, scores)
    loss = diffusion_loss(out, target)
    grad_norm = amp.update(loss, denoiser, optimizer, max_grad_norm)
    return {"loss": float(loss.detach()), "patches": float(x0.shape[0]), "grad_norm": grad_norm}
