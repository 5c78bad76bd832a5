"""Shared building blocks of the GRM, Patch-DiT and the texture encoder.

Written after facebookresearch/DiT ``models.py`` (and timm's ``Attention`` / ``Mlp``): plain modules,
attention through ``torch.nn.functional.scaled_dot_product_attention`` so that PyTorch picks the flash /
memory-efficient kernel on GPU.

Conditioning may be shared by all tokens, ``c (B, D)`` as in DiT, or given per group of consecutive
tokens, ``c (B, G, D)``: the texture encoder's K references each have their own similarity embedding
and L tokens, so G = K. Group-wise modulation reshapes the tokens to (B, G, N/G, D) instead of
materialising a (B, N, 6D) modulation tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not) of ``module``."""
    return sum(p.numel() for p in module.parameters())


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it (adaLN-Zero gates, residual heads)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a float tensor t (B,) -> (B, dim), as DiT / ADM (cos first, then sin)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)  # (B, dim)
    return embedding


class TimestepEmbedder(nn.Module):
    """Scalars -> vectors: sinusoidal features of ``input_scale * t`` followed by a 2-layer MLP (DiT).

    ``input_scale`` lets the same module embed similarity scores in [-1, 1] (scale 1000, so that they
    span the range a diffusion time step does) as well as time steps in 1..T (scale 1)."""

    def __init__(self, *, hidden_size: int, frequency_size: int = 256, input_scale: float = 1.0) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.input_scale = input_scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t (B,) float -> (B, hidden_size)."""
        freq = timestep_embedding(t * self.input_scale, self.frequency_size)  # (B, frequency_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


def _grouped(x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Make x (B, N, D) and a conditioning vector v (B, D) or (B, G, D) broadcastable: returns
    (x (B, 1, N, D), v (B, 1, 1, D)) or (x (B, G, N/G, D), v (B, G, 1, D))."""
    b, n, d = x.shape
    if v.dim() == 2:
        v = v[:, None]  # (B, 1, D)
    g = v.shape[1]
    if n % g:
        raise ValueError(f"{n} tokens cannot be split into {g} conditioning groups")
    return x.reshape(b, g, n // g, d), v[:, :, None]  # (B, G, N/G, D), (B, G, 1, D)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift. x (B, N, D); shift, scale (B, D) for all tokens or (B, G, D), one
    row per group of N/G consecutive tokens."""
    xg, shift_g = _grouped(x, shift)  # (B, G, N/G, D), (B, G, 1, D)
    _, scale_g = _grouped(x, scale)  # (B, G, 1, D)
    return (xg * (1 + scale_g) + shift_g).reshape(x.shape)  # (B, N, D)


def gate(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Dimension-wise gate g * x with the same (B, D) / (B, G, D) broadcasting as ``modulate``."""
    xg, gg = _grouped(x, g)  # (B, G, N/G, D), (B, G, 1, D)
    return (xg * gg).reshape(x.shape)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, D)."""

    def __init__(self, *, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        out = out.transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return self.proj(out)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from x (B, N, D), keys and values from context (B, S, Dc).

    The keys and values depend on the context only, so a caller whose context is fixed over many calls
    (Patch-DiT's texture prompt over the sampling steps) computes them once with ``project_kv`` and
    passes them as ``kv``; the result is the same as passing the context."""

    def __init__(self, *, dim: int, num_heads: int, context_dim: int | None = None,
                 qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim or dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, S, Dc) -> (k, v), each (B, H, S, hd)."""
        b, s = context.shape[:2]
        kv = self.kv(context).reshape(b, s, 2, self.num_heads, self.head_dim)  # (B, S, 2, H, hd)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2 x (B, H, S, hd)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        *,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, N, D) and either context (B, S, Dc) or its ``project_kv(context)`` -> (B, N, D)."""
        if (context is None) == (kv is None):
            raise ValueError("pass exactly one of context and kv")
        b, n, d = x.shape
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, hd)
        k, v = self.project_kv(context) if kv is None else kv  # 2 x (B, H, S, hd)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, hd)
        out = out.transpose(1, 2).reshape(b, n, d)  # (B, N, D)
        return self.proj(out)


class Mlp(nn.Module):
    """Linear -> GELU (tanh approximation, as DiT) -> Linear."""

    def __init__(self, *, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """(B, C, S, S) -> (B, (S/p)^2, D) tokens in row-major order: Conv2d with kernel = stride = p."""

    def __init__(self, *, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, D, S/p, S/p)
        return x.flatten(2).transpose(1, 2)  # (B, L, D)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero: self-attention and MLP, both modulated and gated by c.

    c is (B, D) for all tokens or (B, G, D) per group of N/G consecutive tokens (see ``modulate``)."""

    def __init__(self, *, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim=hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, N, D), c (B, D) or (B, G, D) -> (B, N, D)."""
        mods = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (B, D) or (B, G, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate(self.attn(modulate(self.norm1(x), shift_msa, scale_msa)), gate_msa)
        x = x + gate(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)), gate_mlp)
        return x


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos (M,) -> (M, embed_dim): sin in the first half, cos in the second (MAE)."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)  # (D/2,)
    omega = 1.0 / 10000**omega  # (D/2,)
    out = pos.reshape(-1).double()[:, None] * omega[None]  # (M, D/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, D)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (grid_size**2, embed_dim), float32, row-major tokens.

    A torch port of MAE's / DiT's numpy ``get_2d_sincos_pos_embed`` that reproduces its values, including
    its order: the first half of the channels encodes the column index, the second half the row index."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (S, S) each
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, cols)  # (S*S, D/2)
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, rows)  # (S*S, D/2)
    return torch.cat([emb_w, emb_h], dim=1).float()  # (S*S, D)
