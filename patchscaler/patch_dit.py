"""Patch-DiT (appendix A.2, Fig. 9b): a DiT over one 16x16 latent patch, conditioned on the coarse patch
y0 (concatenated with the noisy latent) and on the texture prompt (cross-attention in every block).

Changes from DiT (facebookresearch/DiT ``models.py``), as the appendix lists them:

1. the input is ``concat(x_t, y0)`` (2 x 4 channels);
2. every block gets a cross-attention layer to the texture prompt, between self-attention and MLP. The
   prompt is time-independent (computed once per patch), so time enters this layer through
   "dimension-wise scaling parameters based on time embedding": ``x = x + g(c) * CrossAttn(norm(x), p)``
   with ``g = Linear(SiLU(c))`` of width hidden, initialised at zero like the adaLN-Zero gates;
3. no class-label embedding and no learned covariance: the output is epsilon only.

Prompt K/V cache: a block's cross-attention keys and values depend on the prompt only, not on t, so a
sampler computes them once per patch with ``PatchDiT.prompt_kv(prompt)`` and passes them to every
step as ``forward(..., prompt_kv=kv)``. At the ``paper`` preset (a 256-token prompt, 64 patch tokens)
the K/V projection is 35% of a step's FLOPs (``bench/flops.py``). Same parameters, same result.
"""

from __future__ import annotations

import torch
from torch import nn

from patchscaler.config import PatchDiTConfig
from patchscaler.layers import (
    Attention,
    CrossAttention,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    gate,
    get_2d_sincos_pos_embed,
    modulate,
)


class PatchDiTBlock(nn.Module):
    """adaLN-Zero self-attention -> time-gated cross-attention to the prompt -> adaLN-Zero MLP."""

    def __init__(self, *, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim=hidden_size, num_heads=num_heads)
        self.norm_xa = nn.LayerNorm(hidden_size, eps=1e-6)
        self.cross_attn = CrossAttention(dim=hidden_size, num_heads=num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.gate_xa = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        prompt: torch.Tensor | None = None,
        *,
        prompt_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x (B, L, D), c (B, D), and prompt (B, S, D) or its cross-attention (k, v) -> (B, L, D)."""
        mods = self.adaLN_modulation(c).chunk(6, dim=-1)  # 6 x (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate(self.attn(modulate(self.norm1(x), shift_msa, scale_msa)), gate_msa)
        x = x + gate(self.cross_attn(self.norm_xa(x), prompt, kv=prompt_kv), self.gate_xa(c))
        x = x + gate(self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)), gate_mlp)
        return x


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c) + linear to p*p*C_out values per token."""

    def __init__(self, *, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x (B, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, L, p*p*C)


class PatchDiT(nn.Module):
    def __init__(self, *, config: PatchDiTConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.out_channels = config.latent_channels
        self.x_embedder = PatchEmbed(
            in_channels=2 * config.latent_channels, hidden_size=hidden, patch_size=config.patch_size
        )
        self.t_embedder = TimestepEmbedder(hidden_size=hidden)
        pos = get_2d_sincos_pos_embed(hidden, config.input_size // config.patch_size)  # (L, hidden)
        self.register_buffer("pos_embed", pos[None], persistent=False)  # (1, L, hidden), fixed
        self.blocks = nn.ModuleList([
            PatchDiTBlock(hidden_size=hidden, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio)
            for _ in range(config.depth)
        ])
        self.final_layer = FinalLayer(
            hidden_size=hidden, patch_size=config.patch_size, out_channels=self.out_channels
        )
        # A 3x3 convolution after unpatchify, as U-ViT adds one after its last linear projection (Bao et
        # al., "All are Worth Words", CVPR 2023, arXiv:2209.12152): each token's p x p output comes from
        # its own linear row, so an undertrained DiT shows a grid of p-latent-pixel squares (every 8
        # output pixels of the tiny preset); the convolution mixes neighbouring tokens' borders. Residual
        # and zero at init.
        self.out_conv = nn.Conv2d(self.out_channels, self.out_channels, kernel_size=3, padding=1,
                                  padding_mode="replicate")
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """As DiT: xavier-uniform linears, patch embedding like a linear, N(0, 0.02) timestep MLP, zero
        adaLN modulation, zero cross-attention gates, a zero final layer and output convolution (so eps = 0
        at init)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            for layer in (block.adaLN_modulation[-1], block.gate_xa[-1]):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear, self.out_conv):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, S, S)."""
        c, p = self.out_channels, self.config.patch_size
        g = self.config.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)  # (B, g, g, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, g, p, g, p)
        return x.reshape(x.shape[0], c, g * p, g * p)  # (B, C, S, S)

    def prompt_kv(self, prompt: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """prompt (B, P, hidden) -> one (k, v) per block, each (B, heads, P, hidden/heads): the
        cross-attention keys and values, which do not depend on t. Rows follow the prompt's rows, so
        ``[(k[i], v[i]) for k, v in kv]`` selects patches."""
        return [block.cross_attn.project_kv(prompt) for block in self.blocks]

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        y0: torch.Tensor,
        prompt: torch.Tensor | None = None,
        *,
        prompt_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """x_t, y0 (B, 4, S, S); t (B,) float in 1..T; the texture prompt (B, P, hidden) or its
        ``prompt_kv(prompt)`` -> eps (B, 4, S, S)."""
        if (prompt is None) == (prompt_kv is None):
            raise ValueError("pass exactly one of prompt and prompt_kv")
        if prompt_kv is not None and len(prompt_kv) != len(self.blocks):
            raise ValueError(f"prompt_kv has {len(prompt_kv)} entries for {len(self.blocks)} blocks")
        x = self.x_embedder(torch.cat([x_t, y0], dim=1)) + self.pos_embed  # (B, L, hidden)
        c = self.t_embedder(t)  # (B, hidden)
        for i, block in enumerate(self.blocks):
            kv = prompt_kv[i] if prompt_kv is not None else None
            x = block(x, c, prompt, prompt_kv=kv)  # (B, L, hidden)
        x = self.final_layer(x, c)  # (B, L, p*p*C)
        x = self.unpatchify(x)  # (B, C, S, S)
        return x + self.out_conv(x)  # (B, C, S, S)
