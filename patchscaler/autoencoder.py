"""The frozen latent autoencoder: diffusers' ``AutoencoderKL`` with the SD-VAE layout (f=8, 4 channels).

Reading of the paper: the LR image is first resized by the SR scale (bicubic), as ResShift and StableSR do,
and then encoded, so that every latent of the method (y_LR, y_HR, x_HR) lives on the HR grid / 8. The GRM
then maps y_LR to y_HR at the same size. ``upscale_input`` does that resize.

Large images use diffusers' own tiled encode/decode (Table 9: the autoencoder dominates memory at
2048^2). diffusers blends the tile overlaps, so no seams appear; ``tile_sample_size`` sets where tiling
starts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from patchscaler.config import AutoencoderConfig


def build_vae(config: AutoencoderConfig) -> AutoencoderKL:
    """A randomly initialised ``AutoencoderKL`` of the configured size (weights come from ``weights.py``)."""
    n = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups,
        sample_size=config.tile_sample_size,
        scaling_factor=config.scaling_factor,
    )


def upscale_input(image: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic resize of an LR batch (B, 3, h, w) in [0, 1] to (B, 3, h*scale, w*scale), clamped."""
    out = F.interpolate(image, scale_factor=scale, mode="bicubic", align_corners=False)  # (B,3,sh,sw)
    return out.clamp(0.0, 1.0)


class LatentAutoencoder(nn.Module):
    """Encode images in [0, 1] to scaled latents and back; tiles large inputs."""

    def __init__(self, *, config: AutoencoderConfig, vae: AutoencoderKL | None = None) -> None:
        super().__init__()
        self.config = config
        self.vae = vae if vae is not None else build_vae(config)
        self.vae.requires_grad_(False)
        self.vae.eval()
        f = config.downsample_factor
        # diffusers' tiling knobs: tiles of `tile_sample_min_size` pixels overlapping by `tile_overlap`.
        self.vae.tile_sample_min_size = config.tile_sample_size
        self.vae.tile_latent_min_size = config.tile_sample_size // f
        self.vae.tile_overlap_factor = config.tile_overlap

    @property
    def factor(self) -> int:
        return self.config.downsample_factor

    def _tiling(self, pixels_h: int, pixels_w: int) -> None:
        if max(pixels_h, pixels_w) > self.config.tile_sample_size:
            self.vae.enable_tiling()
        else:
            self.vae.disable_tiling()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of 8 -> scaled latent mean (B, 4, H/8, W/8)."""
        if image.shape[-1] % self.factor or image.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(image.shape[-2:])} is not a multiple of {self.factor}")
        self._tiling(image.shape[-2], image.shape[-1])
        posterior = self.vae.encode(image * 2.0 - 1.0).latent_dist
        return posterior.mode() * self.config.scaling_factor  # (B, 4, H/8, W/8)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, 4, h, w) -> image (B, 3, 8h, 8w) in [0, 1]."""
        self._tiling(latent.shape[-2] * self.factor, latent.shape[-1] * self.factor)
        image = self.vae.decode(latent / self.config.scaling_factor).sample  # (B, 3, 8h, 8w)
        return ((image + 1.0) / 2.0).clamp(0.0, 1.0)
