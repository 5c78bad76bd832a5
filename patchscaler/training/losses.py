"""Training losses: the autoencoder's reconstruction (+ KL), the GRM's Eq. (1)/(8), Patch-DiT's Eq. (9).

The GRM loss lives with the GRM (``patchscaler.grm.grm_loss``) and is re-exported here so that the four
trainers find their losses in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchscaler.grm import grm_loss

__all__ = ["autoencoder_loss", "classifier_loss", "diffusion_loss", "grm_loss", "kl_divergence"]


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over the latent of each image: (B,)."""
    logvar = logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


RECON_LOSSES: tuple[str, ...] = ("l1", "mse", "mse+fft")


def autoencoder_loss(
    recon: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor | None, *,
    kl_weight: float, recon_loss: str = "l1", fft_weight: float = 0.01,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The autoencoder's objective on images in [-1, 1]; returns (loss, parts for logging).

    - ``l1``: LDM's first stage without the perceptual and adversarial terms, (sum |x - x_rec| +
      kl_weight * KL) per image divided by the number of pixel values (so the scale does not depend on
      the crop size);
    - ``mse``: the mean squared error (what PSNR measures) + kl_weight * KL per pixel value;
    - ``mse+fft``: plus ``fft_weight`` x the mean |FFT(x_rec) - FFT(x)| (orthonormal 2-D FFT), which
      weighs every frequency alike and so keeps fine detail that a pixel loss trades for blur.

    The KL term is KL(q(z|x) || N(0, I)) for ``AutoencoderKL``; a deterministic autoencoder (DC) passes
    ``logvar=None`` and has none."""
    if recon_loss not in RECON_LOSSES:
        raise ValueError(f"unknown recon_loss {recon_loss!r}; choose one of {RECON_LOSSES}")
    per_value = recon[0].numel()
    r, x = recon.float(), target.float()
    l1 = (r - x).abs().flatten(1).sum(1) / per_value  # (B,)
    kl = kl_divergence(mean.float(), logvar.float()) if logvar is not None else torch.zeros_like(l1)
    rec = l1 if recon_loss == "l1" else (r - x).pow(2).flatten(1).mean(1)  # (B,)
    parts = {"l1": float(l1.detach().mean()), "kl": float(kl.detach().mean())}
    if recon_loss == "mse+fft":
        spectrum = (torch.fft.rfft2(r, norm="ortho") - torch.fft.rfft2(x, norm="ortho")).abs()
        fft = spectrum.flatten(1).mean(1)  # (B,)
        rec = rec + fft_weight * fft
        parts["fft"] = float(fft.detach().mean())
    loss = (rec + kl_weight * kl / per_value).mean()
    return loss, parts


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over the 47 DTD classes; also returns the batch accuracy."""
    loss = F.cross_entropy(logits.float(), labels)
    acc = float((logits.argmax(1) == labels).float().mean())
    return loss, {"acc": acc}


def diffusion_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. (9) (appendix Eq. 8): ||target - f(x_t, t, y0, tp^k, s^k)||^2, averaged over elements; the
    target is eps for the paper's parameterisation (v or x0 for the others, ``training_target``)."""
    return F.mse_loss(output.float(), target.float())
