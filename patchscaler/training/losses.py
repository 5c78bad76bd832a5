"""Training losses: the autoencoder's reconstruction + KL, the GRM's Eq. (1)/(8), Patch-DiT's Eq. (9).

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


def autoencoder_loss(
    recon: torch.Tensor, target: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, *, kl_weight: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """LDM's first-stage objective without the perceptual and adversarial terms:
    (sum |x - x_rec| + kl_weight * KL) per image, divided by the number of pixel values so that the
    scale does not depend on the crop size. Images in [-1, 1]. Returns (loss, parts for logging)."""
    per_value = recon[0].numel()
    rec = (recon.float() - target.float()).abs().flatten(1).sum(1)  # (B,)
    kl = kl_divergence(mean.float(), logvar.float())  # (B,)
    loss = ((rec + kl_weight * kl) / per_value).mean()
    return loss, {"l1": float(rec.detach().mean()) / per_value, "kl": float(kl.detach().mean())}


def classifier_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over the 47 DTD classes; also returns the batch accuracy."""
    loss = F.cross_entropy(logits.float(), labels)
    acc = float((logits.argmax(1) == labels).float().mean())
    return loss, {"acc": acc}


def diffusion_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. (9) (appendix Eq. 8): ||target - f(x_t, t, y0, tp^k, s^k)||^2, averaged over elements; the
    target is eps for the paper's parameterisation (v or x0 for the others, ``training_target``)."""
    return F.mse_loss(output.float(), target.float())
