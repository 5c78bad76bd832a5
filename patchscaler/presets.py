"""Model presets: an explicit dict, as DiT's ``DiT_models`` (no registry scanning, no YAML).

- ``tiny``: CPU tests and the bundled demo, a few M parameters in all.
- ``small``: trainable on one GPU in about an hour.
- ``paper``: sized to the paper's reported 875M parameters (appendix, Table 11). The per-module
  breakdown and the choices the paper leaves open are documented in ``docs/model.md``.
"""

from __future__ import annotations

from patchscaler.config import (
    AutoencoderConfig,
    ClassifierConfig,
    GRMConfig,
    PatchDiTConfig,
    PatchScalerConfig,
    SamplerConfig,
    TextureEncoderConfig,
)

PRESETS: dict[str, PatchScalerConfig] = {
    # The demo's preset, trainable on a 2-core CPU (docs/model.md, "The tiny preset"): AutoencoderDC with
    # f = 4 and 8 latent channels (AutoencoderKL from scratch learns too slowly there), Patch-DiT with
    # v-prediction.
    "tiny": PatchScalerConfig(
        autoencoder=AutoencoderConfig(
            kind="dc", block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=8,
            scaling_factor=1.0, tile_sample_size=256,
        ),
        grm=GRMConfig(in_channels=8, out_channels=8, base_channels=24, channel_mult=(1, 2, 2, 4, 4),
                      num_res_blocks=2, norm_groups=8),
        classifier=ClassifierConfig(in_channels=8, channels=(32, 64, 64), feature_dim=64, norm_groups=8),
        patch_dit=PatchDiTConfig(latent_channels=8, hidden_size=96, depth=4, num_heads=4, mlp_ratio=4.0),
        texture_encoder=TextureEncoderConfig(depth=2, mlp_ratio=2.0, top_k=4),
        sampler=SamplerConfig(batch_size=64, prediction_type="v_prediction"),
    ),
    "small": PatchScalerConfig(
        autoencoder=AutoencoderConfig(
            block_out_channels=(64, 128, 256, 256), layers_per_block=2, norm_num_groups=32,
            scaling_factor=1.0,
        ),
        grm=GRMConfig(base_channels=64, channel_mult=(1, 2, 2, 4, 4), num_res_blocks=2),
        classifier=ClassifierConfig(channels=(64, 128, 256), feature_dim=256),
        patch_dit=PatchDiTConfig(hidden_size=384, depth=12, num_heads=6, mlp_ratio=4.0),
        texture_encoder=TextureEncoderConfig(depth=6, mlp_ratio=2.0, top_k=4),
        sampler=SamplerConfig(batch_size=256),
    ),
    # SD-VAE 83.65M + GRM 42.43M + classifier 1.77M + Patch-DiT 582.82M (width 1024, 24 blocks with
    # cross-attention) + texture encoder 165.07M (12 trimmed blocks) = 875.7M (docs/model.md).
    "paper": PatchScalerConfig(
        autoencoder=AutoencoderConfig(),
        grm=GRMConfig(base_channels=96, channel_mult=(1, 2, 2, 4, 4), num_res_blocks=2),
        classifier=ClassifierConfig(channels=(128, 256, 512), feature_dim=512),
        patch_dit=PatchDiTConfig(hidden_size=1024, depth=24, num_heads=16, mlp_ratio=4.0),
        texture_encoder=TextureEncoderConfig(depth=12, mlp_ratio=1.5, top_k=4),
        sampler=SamplerConfig(batch_size=512),
    ),
}


def get_preset(name: str) -> PatchScalerConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
