"""Texture prompt networks (appendix A.3): the texture classifier and the similarity-aware texture encoder.

- ``TextureClassifier`` learns texture representations of 4x16x16 latent patches on DTD's 47 classes.
  ``features`` (before the last linear layer) are the RTM keys and the retrieval queries.
- ``TextureEncoder`` turns the top-K retrieved RTM values and their similarity scores into the texture
  prompt that Patch-DiT cross-attends to. It is "a trimmed copy of the first half of Patch-DiT" with the
  time embedding replaced by a similarity embedding: the same patch embedding and fixed 2D sin-cos
  position embedding, ``config.depth`` adaLN-Zero DiT blocks with a lighter MLP (``config.mlp_ratio``),
  and no time input at all, so a patch's prompt is computed once, not at every sampling step.
"""

from __future__ import annotations

import torch
from torch import nn

from patchscaler.config import ClassifierConfig, PatchDiTConfig, TextureEncoderConfig
from patchscaler.layers import DiTBlock, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed

# Similarity scores are cosines in [-1, 1]; x1000 spreads them over the range time steps 1..1000 use.
SIMILARITY_SCALE = 1000.0


class TextureClassifier(nn.Module):
    """Conv stack over (B, 4, 16, 16) latent patches -> global average pool -> features -> logits.

    Stage i: conv3x3 (stride 1 for the first stage, 2 after) + GroupNorm + SiLU. The features are
    ``LayerNorm(Linear(pooled))``: zero-mean per vector, which suits the cosine retrieval of the RTM."""

    def __init__(self, *, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        stages = []
        in_ch = config.in_channels
        for i, ch in enumerate(config.channels):
            stages += [
                nn.Conv2d(in_ch, ch, 3, stride=1 if i == 0 else 2, padding=1),
                nn.GroupNorm(config.norm_groups, ch),
                nn.SiLU(),
            ]
            in_ch = ch
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Linear(in_ch, config.feature_dim)
        self.norm = nn.LayerNorm(config.feature_dim)
        self.head = nn.Linear(config.feature_dim, config.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 4, V, V) -> (B, feature_dim)."""
        h = self.stages(x)  # (B, C_last, V/2^(n-1), V/2^(n-1))
        pooled = h.mean(dim=(2, 3))  # (B, C_last)
        return self.norm(self.proj(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 4, V, V) -> logits (B, num_classes)."""
        return self.head(self.features(x))


class TextureEncoder(nn.Module):
    """Similarity-aware texture encoder: (values (B, K, 4, V, V), scores (B, K)) -> prompt (B, K*L, hidden).

    Every reference patch is patch-embedded like Patch-DiT's input (Conv2d with kernel = stride =
    patch_size, plus the fixed 2D sin-cos position embedding) and tagged with a learned embedding of its
    rank (1st, 2nd, ... most similar). Self-attention runs over all K*L tokens of one target patch; the
    adaLN-Zero conditioning of each token is the similarity embedding of its own reference. A final
    LayerNorm gives the prompt tokens. K may be less than ``config.top_k`` (the first K rank embeddings)."""

    def __init__(self, *, dit: PatchDiTConfig, config: TextureEncoderConfig) -> None:
        super().__init__()
        self.dit = dit
        self.config = config
        hidden = dit.hidden_size
        self.x_embedder = PatchEmbed(
            in_channels=dit.latent_channels, hidden_size=hidden, patch_size=dit.patch_size
        )
        pos = get_2d_sincos_pos_embed(hidden, dit.input_size // dit.patch_size)  # (L, hidden)
        self.register_buffer("pos_embed", pos[None], persistent=False)  # (1, L, hidden), fixed
        self.rank_embed = nn.Parameter(torch.zeros(1, config.top_k, 1, hidden))  # (1, K, 1, hidden)
        self.s_embedder = TimestepEmbedder(hidden_size=hidden, input_scale=SIMILARITY_SCALE)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size=hidden, num_heads=dit.num_heads, mlp_ratio=config.mlp_ratio)
            for _ in range(config.depth)
        ])
        self.norm_out = nn.LayerNorm(hidden, eps=1e-6)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, zero adaLN modulation (each block starts as identity)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.rank_embed, std=0.02)
        nn.init.normal_(self.s_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.s_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)

    def forward(self, values: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """values (B, K, 4, V, V), scores (B, K) -> prompt (B, K*L, hidden)."""
        b, k = values.shape[:2]
        if k > self.config.top_k:
            raise ValueError(f"{k} references, but the encoder has rank embeddings for {self.config.top_k}")
        if scores.shape != (b, k):
            raise ValueError(f"scores {tuple(scores.shape)} do not match values {tuple(values.shape)}")
        hidden, n_tok = self.dit.hidden_size, self.dit.num_tokens
        x = self.x_embedder(values.flatten(0, 1)) + self.pos_embed  # (B*K, L, hidden)
        x = x.reshape(b, k, n_tok, hidden) + self.rank_embed[:, :k]  # (B, K, L, hidden)
        x = x.reshape(b, k * n_tok, hidden)  # (B, K*L, hidden)
        c = self.s_embedder(scores.reshape(-1)).reshape(b, k, hidden)  # (B, K, hidden), one per reference
        for block in self.blocks:
            x = block(x, c)  # (B, K*L, hidden)
        return self.norm_out(x)
