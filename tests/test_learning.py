"""Learning tests: each trainer's step function overfits a tiny fixed set, and what it learnt works through
the inference path (autoencoder round trip, GRM restore, the real PGS sampler for every group's (tau, N)).
They guard every later change against a mismatch between training and inference (latent scaling,
time-step convention, prediction type, schedule), which no shape test can see. CPU, seconds each.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from patchscaler.diffusion import NoiseSchedule
from patchscaler.model import PatchScalerModel
from patchscaler.pgs import group_plan, sample_group
from patchscaler.presets import PRESETS
from patchscaler.training.losses import diffusion_loss
from patchscaler.training.steps import (
    AutoencoderForTraining,
    TextureDenoiser,
    autoencoder_step,
    encode_pair,
    grm_step,
    sample_timesteps,
)
from trainer.tasks import sampler_times

pytestmark = pytest.mark.timeout(600)


def _model(seed: int = 0) -> PatchScalerModel:
    torch.manual_seed(seed)
    return PatchScalerModel(config=PRESETS["tiny"])


def _image(size: int, seed: int) -> torch.Tensor:
    """(1, 3, size, size) in [0, 1]: smooth colour fields plus some finer structure."""
    g = torch.Generator().manual_seed(seed)
    low = F.interpolate(torch.rand(1, 3, 4, 4, generator=g), size=size, mode="bicubic", align_corners=False)
    mid = F.interpolate(torch.rand(1, 3, 12, 12, generator=g), size=size, mode="bilinear",
                        align_corners=False)
    return (0.7 * low + 0.3 * mid).clamp(0, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / max(float(((a.clamp(0, 1) - b) ** 2).mean()), 1e-12))


def test_autoencoder_overfits_one_image_to_30_db() -> None:
    model = _model()
    ae = model.autoencoder
    module = AutoencoderForTraining(vae=ae.vae, config=ae.config).requires_grad_(True).train()
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    image = _image(32, seed=1)
    g = torch.Generator().manual_seed(0)
    best = 0.0
    for step in range(600):
        autoencoder_step(module, image, opt, kl_weight=1e-6, generator=g)
        if step % 25 == 24:
            ae.vae.eval()
            with torch.no_grad():  # the inference path: encode (posterior mode, scaled) then decode
                best = max(best, _psnr(ae.decode(ae.encode(image)), image))
            ae.vae.train()
            if best >= 30.0:
                break
    assert best >= 30.0, f"autoencoder round trip of its one training image: {best:.2f} dB"


def test_grm_overfits_one_pair_well_past_the_bicubic_latent() -> None:
    model = _model()
    hr = _image(64, seed=2)
    lr = F.avg_pool2d(hr, 4)  # (1, 3, 16, 16): a plain x4 reduction
    grm = model.grm.requires_grad_(True).train()
    opt = torch.optim.Adam(grm.parameters(), lr=2e-3)
    g = model.config.grm
    for _ in range(150):
        grm_step(grm, model.autoencoder, lr, hr, opt, scale=4, lam=g.loss_lambda, eta=g.loss_eta)
    grm.eval()
    with torch.no_grad():
        y_lr, x_hr = encode_pair(model.autoencoder, lr, hr, scale=4)
        y_hr, conf = grm(y_lr)
    bicubic_err = float((y_lr - x_hr).abs().mean())
    grm_err = float((y_hr - x_hr).abs().mean())
    assert grm_err < 0.3 * bicubic_err, (grm_err, bicubic_err)
    assert 0 < float(conf.min()) and float(conf.max()) <= 1


def test_patch_dit_with_the_real_pgs_sampler_beats_y0_for_every_group() -> None:
    """Train Patch-DiT + texture encoder on 4 fixed (y0, x0) patches with the trainer's loss and time
    steps, then sample each group with ``pgs.sample_group`` from y_tau (Eq. 7): the sampled x0 must be
    closer to the true x0 than the coarse y0 it started from."""
    model = _model(seed=3)
    cfg = model.config
    schedule = NoiseSchedule(config=cfg.sampler)
    c, v, k = cfg.patch_dit.latent_channels, cfg.sampler.patch_size, cfg.texture_encoder.top_k
    g = torch.Generator().manual_seed(0)
    p = 4
    x0 = F.interpolate(torch.randn(p, c, 4, 4, generator=g), size=v, mode="bilinear", align_corners=False)
    y0 = x0 + 0.5 * F.interpolate(torch.randn(p, c, 2, 2, generator=g), size=v, mode="bilinear",
                                  align_corners=False)  # a coarse estimate: x0 plus a smooth error
    values = torch.randn(p, k, c, v, v, generator=g)  # a fixed texture prior per patch
    scores = torch.rand(p, k, generator=g)
    denoiser = TextureDenoiser(patch_dit=model.patch_dit, texture_encoder=model.texture_encoder)
    denoiser.requires_grad_(True).train()
    opt = torch.optim.Adam(denoiser.parameters(), lr=2e-3)
    t_choices = sampler_times(cfg, "sampler")
    reps = 4  # every patch at 4 random times per step
    for _ in range(100):  # measured: the error ratio is 0.08-0.14 after 100 steps, 0.37-0.54 after 50
        t = sample_timesteps(p * reps, t_choices, schedule.num_train_timesteps, g)
        eps = torch.randn(p * reps, c, v, v, generator=g)
        x0_r, y0_r = x0.repeat(reps, 1, 1, 1), y0.repeat(reps, 1, 1, 1)
        x_t = schedule.q_sample(x0_r, t, eps)
        out = denoiser(x_t, t.float(), y0_r, values.repeat(reps, 1, 1, 1, 1), scores.repeat(reps, 1))
        loss = diffusion_loss(out, schedule.training_target(x0_r, eps, t))
        opt.zero_grad()
        loss.backward()
        opt.step()
    denoiser.eval()
    idx = torch.arange(p)
    with torch.no_grad():
        prompts = model.texture_encoder(values, scores)

        def denoise(x_t: torch.Tensor, t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return model.patch_dit(x_t, t, y0[i], prompts[i])

        y0_err = float(((y0 - x0) ** 2).mean())
        for group in group_plan(cfg.sampler):
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(group.tau))
            sampled = sample_group(denoise, y0, noise, idx, schedule=schedule, tau=group.tau,
                                   steps=group.steps)
            err = float(((sampled - x0) ** 2).mean())
            assert err < 0.5 * y0_err, (
                f"{group.name} (tau={group.tau}, N={group.steps}): {err:.4f} vs y0 {y0_err:.4f}")
