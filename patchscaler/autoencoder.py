"""The frozen latent autoencoder: a diffusers autoencoder, chosen by ``AutoencoderConfig.kind``.

- ``kl``: ``AutoencoderKL`` with the SD-VAE layout (f=8, 4 channels), the paper's autoencoder; the
  ``small`` and ``paper`` presets, and SD-VAE weights (``--autoencoder``), use it. Its latent is the
  posterior mode.
- ``dc``: ``AutoencoderDC`` (Chen et al. 2024, "Deep Compression Autoencoder"), deterministic, with
  residual space-to-channel shortcuts around every down/up-sampling. Trained from scratch it learns about
  as many dB in 300 steps as ``AutoencoderKL`` does in thousands (docs/model.md), which is what lets the
  ``tiny`` demo be trained on a 2-core CPU.

Reading of the paper: the LR image is first resized by the SR scale (bicubic), as ResShift and StableSR do,
and then encoded, so that every latent of the method (y_LR, y_HR, x_HR) lives on the HR grid / f. The GRM
then maps y_LR to y_HR at the same size. ``upscale_input`` does that resize.

Large images use diffusers' own tiled encode/decode (Table 9: the autoencoder dominates memory at
2048^2). diffusers blends the tile overlaps, so no seams appear; ``tile_sample_size`` sets where tiling
starts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC, AutoencoderKL
from torch import nn

from patchscaler.config import AutoencoderConfig

Autoencoder = AutoencoderKL | AutoencoderDC


def _build_kl(config: AutoencoderConfig) -> AutoencoderKL:
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


def _build_dc(config: AutoencoderConfig) -> AutoencoderDC:
    n = len(config.block_out_channels)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=config.latent_channels,
        encoder_block_types="ResBlock",
        decoder_block_types="ResBlock",
        encoder_block_out_channels=config.block_out_channels,
        decoder_block_out_channels=config.block_out_channels,
        encoder_layers_per_block=(config.layers_per_block,) * n,
        decoder_layers_per_block=(config.layers_per_block,) * n,
        encoder_qkv_multiscales=((),) * n,  # no attention blocks: ResBlocks only
        decoder_qkv_multiscales=((),) * n,
        scaling_factor=config.scaling_factor,
    )


# AutoencoderConfig.kind -> builder of a randomly initialised autoencoder (weights come from weights.py)
AUTOENCODERS: dict[str, Callable[[AutoencoderConfig], Autoencoder]] = {"kl": _build_kl, "dc": _build_dc}


def build_vae(config: AutoencoderConfig) -> Autoencoder:
    """A randomly initialised diffusers autoencoder of the configured kind and size."""
    try:
        return AUTOENCODERS[config.kind](config)
    except KeyError:
        raise ValueError(
            f"unknown autoencoder kind {config.kind!r}; choose one of {sorted(AUTOENCODERS)}") from None


def raw_latent(vae: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """The unscaled latent of x (B, 3, H, W) in [-1, 1]: the posterior mode (KL) or the code (DC)."""
    if isinstance(vae, AutoencoderKL):
        return vae.encode(x).latent_dist.mode()
    return vae.encode(x).latent


def upscale_input(image: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic resize of an LR batch (B, 3, h, w) in [0, 1] to (B, 3, h*scale, w*scale), clamped."""
    out = F.interpolate(image, scale_factor=scale, mode="bicubic", align_corners=False)  # (B,3,sh,sw)
    return out.clamp(0.0, 1.0)


class LatentAutoencoder(nn.Module):
    """Encode images in [0, 1] to scaled latents and back; tiles large inputs."""

    def __init__(self, *, config: AutoencoderConfig, vae: Autoencoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.vae = vae if vae is not None else build_vae(config)
        self.vae.requires_grad_(False)
        self.vae.eval()

    @property
    def factor(self) -> int:
        return self.config.downsample_factor

    def _tiling(self, pixels_h: int, pixels_w: int) -> None:
        """diffusers' tiling, on above ``tile_sample_size`` pixels: tiles of that size overlapping by
        ``tile_overlap`` of it."""
        size = self.config.tile_sample_size
        if max(pixels_h, pixels_w) <= size:
            self.vae.disable_tiling()
        elif isinstance(self.vae, AutoencoderKL):
            self.vae.enable_tiling()
            self.vae.tile_sample_min_size = size
            self.vae.tile_latent_min_size = size // self.factor
            self.vae.tile_overlap_factor = self.config.tile_overlap
        else:
            stride = int(size * (1.0 - self.config.tile_overlap)) // self.factor * self.factor
            self.vae.enable_tiling(tile_sample_min_height=size, tile_sample_min_width=size,
                                   tile_sample_stride_height=stride, tile_sample_stride_width=stride)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of f -> scaled latent (B, C, H/f, W/f)."""
        if image.shape[-1] % self.factor or image.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(image.shape[-2:])} is not a multiple of {self.factor}")
        self._tiling(image.shape[-2], image.shape[-1])
        return raw_latent(self.vae, image * 2.0 - 1.0) * self.config.scaling_factor  # (B, C, H/f, W/f)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, C, h, w) -> image (B, 3, f*h, f*w) in [0, 1]."""
        self._tiling(latent.shape[-2] * self.factor, latent.shape[-1] * self.factor)
        image = self.vae.decode(latent / self.config.scaling_factor).sample  # (B, 3, f*h, f*w)
        return ((image + 1.0) / 2.0).clamp(0.0, 1.0)
