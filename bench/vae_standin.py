"""A pure-torch stand-in for the product's autoencoder (diffusers' ``AutoencoderKL`` in
``patchscaler/autoencoder.py``), for benchmarks on machines without diffusers (``bench/gpu_model.py``).

It is the same network, not an approximation: the SD-VAE layout of diffusers 0.42's ``Encoder`` /
``Decoder`` (ResnetBlock2D, Downsample2D with (0, 1, 0, 1) padding, nearest Upsample2D, a mid block with
one single-head self-attention), with diffusers' module names, so a diffusers state dict loads into it
strictly; ``encode`` / ``decode`` follow ``LatentAutoencoder`` (scaling factor, [0, 1] <-> [-1, 1]) and
diffusers' tiled encode/decode above ``tile_sample_size`` (the same tile grid, overlaps and the same
row-by-row blending loops). ``tests/test_gpu_model.py`` loads a diffusers ``AutoencoderKL``'s weights into
it and checks equal outputs, tiled and not, and equal FLOP counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchscaler.config import AutoencoderConfig

EPS = 1e-6


class ResnetBlock2D(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, Cout, H, W)
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class Downsample2D(nn.Module):
    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Attention(nn.Module):
    """diffusers' mid-block attention: GroupNorm, one head over all H*W positions, residual."""

    def __init__(self, *, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.group_norm(x.view(b, c, h * w)).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(tokens)[:, None] for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return out + x


class MidBlock(nn.Module):
    def __init__(self, *, channels: int, groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=channels, out_channels=channels, groups=groups) for _ in range(2)
        ])
        self.attentions = nn.ModuleList([Attention(channels=channels, groups=groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class DownBlock(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int, layers: int, groups: int, down: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          groups=groups)
            for i in range(layers)
        ])
        self.downsamplers = nn.ModuleList([Downsample2D(channels=out_channels)]) if down else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpBlock(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int, layers: int, groups: int, up: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                          groups=groups)
            for i in range(layers)
        ])
        self.upsamplers = nn.ModuleList([Upsample2D(channels=out_channels)]) if up else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> moments (B, 2*latent, H/f, W/f) (before ``quant_conv``)."""

    def __init__(self, *, config: AutoencoderConfig) -> None:
        super().__init__()
        chans, groups, n = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels)
        self.conv_in = nn.Conv2d(3, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownBlock(in_channels=chans[max(i - 1, 0)], out_channels=chans[i], layers=config.layers_per_block,
                      groups=groups, down=i < n - 1)
            for i in range(n)
        ])
        self.mid_block = MidBlock(channels=chans[-1], groups=groups)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """(B, latent, h, w) -> (B, 3, f*h, f*w) in about [-1, 1] (after ``post_quant_conv``)."""

    def __init__(self, *, config: AutoencoderConfig) -> None:
        super().__init__()
        chans, groups, n = config.block_out_channels, config.norm_num_groups, len(config.block_out_channels)
        rev = list(reversed(chans))
        self.conv_in = nn.Conv2d(config.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(channels=rev[0], groups=groups)
        self.up_blocks = nn.ModuleList([
            UpBlock(in_channels=rev[max(i - 1, 0)], out_channels=rev[i], layers=config.layers_per_block + 1,
                    groups=groups, up=i < n - 1)
            for i in range(n)
        ])
        self.conv_norm_out = nn.GroupNorm(groups, chans[0], eps=EPS)
        self.conv_out = nn.Conv2d(chans[0], 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def _blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):  # diffusers' loop, row by row
        b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - y / extent) + b[:, :, y, :] * (y / extent)
    return b


def _blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)
    return b


def _tiled(x: torch.Tensor, fn, tile_in: int, tile_out: int, overlap: float) -> torch.Tensor:
    """diffusers' tiled encode/decode: tiles of ``tile_in`` at stride tile_in*(1-overlap), each mapped
    by ``fn`` to ``tile_out``, blended with the tile above and to the left, cropped and concatenated."""
    stride = int(tile_in * (1 - overlap))
    extent = int(tile_out * overlap)
    limit = tile_out - extent
    rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend_v(rows[i - 1][j], tile, extent)
            if j > 0:
                tile = _blend_h(row[j - 1], tile, extent)
            out_row.append(tile[:, :, :limit, :limit])
        out_rows.append(torch.cat(out_row, dim=3))
    return torch.cat(out_rows, dim=2)


class AutoencoderStandIn(nn.Module):
    """``encode(image in [0, 1]) -> scaled latent``, ``decode(latent) -> image in [0, 1]``, as
    ``patchscaler.autoencoder.LatentAutoencoder``; its state dict is ``AutoencoderKL``'s."""

    def __init__(self, *, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config=config)
        self.decoder = Decoder(config=config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1)
        self.post_quant_conv = nn.Conv2d(c, c, 1)

    @property
    def factor(self) -> int:
        return self.config.downsample_factor

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _pixels(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> scaled latent mean (B, 4, H/f, W/f)."""
        cfg, x = self.config, image * 2.0 - 1.0
        size = cfg.tile_sample_size
        if max(x.shape[-2:]) > size:
            moments = _tiled(x, self._moments, size, size // self.factor, cfg.tile_overlap)
        else:
            moments = self._moments(x)
        return moments[:, : cfg.latent_channels] * cfg.scaling_factor  # the posterior's mode = its mean

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, 4, h, w) -> image (B, 3, f*h, f*w) in [0, 1]."""
        cfg, z = self.config, latent / self.config.scaling_factor
        size = cfg.tile_sample_size // self.factor
        if max(z.shape[-2:]) > size:
            image = _tiled(z, self._pixels, size, cfg.tile_sample_size, cfg.tile_overlap)
        else:
            image = self._pixels(z)
        return ((image + 1.0) / 2.0).clamp(0.0, 1.0)
