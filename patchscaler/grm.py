"""Global Restoration Module (appendix A.1, Fig. 9a) and its confidence-driven loss, Eq. (1)/(8).

A latent UNet: ``conv_in``, then at each of the ``len(channel_mult)`` scales ``num_res_blocks`` residual
blocks followed by a stride-2 convolution (4 down-samplings for 5 scales), a middle block at the
coarsest scale (residual block, self-attention over all positions for long-range dependencies, residual
block), and the mirrored up path: nearest-neighbour x2 + conv, concatenation with the skip of that scale,
``num_res_blocks`` residual blocks. Two output branches at the last scale:

- ``y_hr = y_lr + head_y(h)``: the coarse HR latent as a residual on the input (``head_y`` starts at
  zero, so an untrained GRM is the identity on y);
- ``conf = exp(-softplus(z))`` with ``z = head_conf(h)``: the confidence map. It lies in (0, 1]: C -> 1 as
  z -> -inf, C -> 0 as z -> +inf (it rounds to exactly 1.0 in float32 for z below about -18).

Any latent size works: the input is padded (replicate) to a multiple of ``config.multiple`` inside
``forward`` and the outputs are cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from patchscaler.config import GRMConfig
from patchscaler.layers import Attention, zero_module
from patchscaler.precision import float32_region


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3, twice, plus the input (through a 1x1 conv when channels change)."""

    def __init__(self, *, in_channels: int, out_channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, h, w)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, Cout, h, w)
        return self.skip(x) + h


class SpatialSelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over the h*w positions of a feature map, with a residual."""

    def __init__(self, *, channels: int, norm_groups: int, head_dim: int = 64) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.attn = Attention(dim=channels, num_heads=max(1, channels // head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, h*w, C)
        out = self.attn(tokens).transpose(1, 2).reshape(b, c, h, w)  # (B, C, h, w)
        return x + out


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: (B, C, h, w) -> (B, C, h/2, w/2)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution: (B, C, h, w) -> (B, C, 2h, 2w)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2h, 2w)


class GRM(nn.Module):
    def __init__(self, *, config: GRMConfig) -> None:
        super().__init__()
        self.config = config
        groups = config.norm_groups
        chans = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(config.in_channels, chans[0], 3, padding=1)

        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = chans[0]
        for i, out_ch in enumerate(chans):
            blocks = []
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(in_channels=ch, out_channels=out_ch, norm_groups=groups))
                ch = out_ch
            self.down_blocks.append(nn.Sequential(*blocks))
            if i < len(chans) - 1:
                self.downsamples.append(Downsample(channels=ch))

        self.mid = nn.Sequential(
            ResBlock(in_channels=ch, out_channels=ch, norm_groups=groups),
            SpatialSelfAttention(channels=ch, norm_groups=groups),
            ResBlock(in_channels=ch, out_channels=ch, norm_groups=groups),
        )

        # Up path, coarsest scale first. up_blocks[j] works at scale i = S-1-j; upsamples[j] (j < S-1)
        # takes its output to scale i-1.
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for i in reversed(range(len(chans))):
            blocks = []
            in_ch = ch + chans[i]  # upsampled features + skip of this scale
            for _ in range(config.num_res_blocks):
                blocks.append(ResBlock(in_channels=in_ch, out_channels=chans[i], norm_groups=groups))
                in_ch = chans[i]
            ch = chans[i]
            self.up_blocks.append(nn.Sequential(*blocks))
            if i > 0:
                self.upsamples.append(Upsample(channels=ch))

        self.norm_out = nn.GroupNorm(groups, ch)
        self.head_y = zero_module(nn.Conv2d(ch, config.out_channels, 3, padding=1))
        self.head_conf = nn.Conv2d(ch, 1, 3, padding=1)

    def forward(self, y_lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y_lr (B, 4, h, w) -> (y_hr (B, 4, h, w), conf (B, 1, h, w) in (0, 1])."""
        h_in, w_in = y_lr.shape[-2:]
        m = self.config.multiple
        pad_h, pad_w = (-h_in) % m, (-w_in) % m
        x = F.pad(y_lr, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else y_lr  # (B, 4, H, W)

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = []
        for i, blocks in enumerate(self.down_blocks):
            h = blocks(h)  # (B, Ci, H/2^i, W/2^i)
            skips.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)  # (B, Ci, H/2^(i+1), W/2^(i+1))
        h = self.mid(h)  # (B, C_{S-1}, H/2^(S-1), W/2^(S-1))
        for j, blocks in enumerate(self.up_blocks):
            h = blocks(torch.cat([h, skips.pop()], dim=1))  # (B, Ci, H/2^i, W/2^i)
            if j < len(self.upsamples):
                h = self.upsamples[j](h)  # (B, Ci, H/2^(i-1), W/2^(i-1))

        h = F.silu(self.norm_out(h))  # (B, C0, H, W)
        y_hr = x + self.head_y(h)  # (B, 4, H, W)
        # float32 even under autocast (bf16 inference): C is compared against thresholds such as 0.95
        # (Eq. 2), so its head runs in float32 too; it is one output channel, a negligible cost.
        with float32_region(h.device):
            conf = torch.exp(-F.softplus(self.head_conf(h.float())))  # (B, 1, H, W) in (0, 1]
        return y_hr[..., :h_in, :w_in], conf[..., :h_in, :w_in]


def grm_loss(
    y_hr: torch.Tensor, conf: torch.Tensor, x_hr: torch.Tensor, *, lam: float, eta: float
) -> torch.Tensor:
    """Eq. (1)/(8): mean |y_hr - x_hr| + lam * mean(C * e - eta * log C), e = sum_c (y_hr - x_hr)^2.

    y_hr, x_hr (B, 4, h, w); conf (B, 1, h, w). Computed in float32. For a fixed per-pixel squared error
    e, ``C e - eta log C`` is minimised over (0, 1] at C* = min(1, eta / e): the confidence stays at 1
    while e <= eta and falls as eta / e beyond, so eta is the error at which confidence starts to drop.

    log C is taken as ``log(clamp(C, 1e-12))``. ``GRM`` produces C = exp(-softplus(z)), so this equals
    -softplus(z) (and its gradient -sigmoid(z)) as long as C >= 1e-12, i.e. an error above 1e12 * eta,
    far outside any latent's range. The L1 term is the mean over all elements (the paper's
    ||.||_1; the square in Eq. 1 of the main text is not in the appendix's Eq. 8, which we follow)."""
    diff = y_hr.float() - x_hr.float()  # (B, 4, h, w)
    conf = conf.float()  # (B, 1, h, w)
    err = diff.pow(2).sum(dim=1, keepdim=True)  # (B, 1, h, w)
    log_conf = torch.log(conf.clamp_min(1e-12))  # (B, 1, h, w)
    return diff.abs().mean() + lam * (conf * err - eta * log_conf).mean()
