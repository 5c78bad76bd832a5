"""Configuration dataclasses, one per module, in the style of nanoGPT's ``GPTConfig``.

Every class is frozen: a config is a value, compared and hashed like one, and serialised to the JSON
that sits next to a checkpoint (``weights.py``). Presets live in ``presets.py`` as a literal dict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AutoencoderConfig:
    """A diffusers autoencoder, f = 2**(len(block_out_channels)-1): by default ``AutoencoderKL`` with the
    SD-VAE layout (f = 8, 4 channels); ``kind="dc"`` is ``AutoencoderDC`` (patchscaler/autoencoder.py)."""

    kind: str = "kl"  # "kl" (AutoencoderKL, SD-VAE) or "dc" (AutoencoderDC, residual autoencoding)
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32  # "kl" only ("dc" uses RMSNorm)
    # SD-VAE's latent scaling factor: latents are multiplied by it after encoding so that they
    # have roughly unit variance, and divided by it before decoding.
    scaling_factor: float = 0.18215
    # Tiling (diffusers' own tiled encode/decode), used above ``tile_sample_size`` pixels.
    tile_sample_size: int = 512
    tile_overlap: float = 0.25
    # where pretrained weights came from (``init-weights --autoencoder DIR``), "" when trained here
    pretrained: str = ""

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class GRMConfig:
    """Global Restoration Module (appendix A.1): a latent UNet with 4 down-samplings."""

    in_channels: int = 4
    out_channels: int = 4
    base_channels: int = 128
    # One multiplier per scale; 5 scales = 4 down-samplings.
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    norm_groups: int = 32
    # Eq. (1)/(8): L1 + lambda * (C * ||y_HR - x_HR||^2 - eta * log C).
    loss_lambda: float = 0.1
    loss_eta: float = 0.05

    @property
    def multiple(self) -> int:
        """Latent sizes are padded to a multiple of this before the UNet."""
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class ClassifierConfig:
    """Texture classifier: conv stack + linear over DTD's 47 classes, on 4x16x16 latent patches."""

    in_channels: int = 4
    channels: tuple[int, ...] = (128, 256, 512)
    feature_dim: int = 512
    num_classes: int = 47
    norm_groups: int = 32


@dataclass(frozen=True)
class PatchDiTConfig:
    """Patch-DiT (appendix A.2): DiT blocks over a 16x16 latent patch, cross-attention to the prompt."""

    input_size: int = 16
    patch_size: int = 2
    latent_channels: int = 4  # noisy latent; y0 is concatenated, so the stem sees 2x this
    hidden_size: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextureEncoderConfig:
    """Similarity-aware texture encoder (A.3): a trimmed copy of Patch-DiT's first half."""

    depth: int = 12
    mlp_ratio: float = 2.0  # "trimmed": a lighter MLP than Patch-DiT's blocks
    top_k: int = 4


@dataclass(frozen=True)
class SamplerConfig:
    """Diffusion schedule and Patch-adaptive Group Sampling (Eq. 2-7)."""

    num_train_timesteps: int = 1000
    # "scaled_linear" is Stable Diffusion's beta schedule (the latent space PatchScaler works in): sqrt(abar)
    # at tau = 400/700/1000 is 0.65/0.29/0.07, so every group starts with a share of y0. DDPM/DiT's
    # "linear" (1e-4..0.02) gives 0.44/0.08/0.006: the medium group would start from almost pure noise
    # (docs/model.md). Checkpoints store their own schedule in config.json.
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    # What Patch-DiT outputs: "epsilon" (the paper's Eq. 9), "v_prediction" or "sample" (diffusion.py).
    prediction_type: str = "epsilon"
    # Eq. (2): simple if mean C > gamma1, medium if gamma2 < mean C <= gamma1, hard otherwise.
    gamma1: float = 0.95
    gamma2: float = 0.75
    # Per group (simple, medium, hard): intermediate time step tau and number of DDIM steps N.
    taus: tuple[int, int, int] = (400, 700, 1000)
    steps: tuple[int, int, int] = (8, 14, 20)
    # "adaptive" = PGS; "uniform" = every patch starts at taus[-1] with steps[-1] (ablation).
    mode: str = "adaptive"
    patch_size: int = 16  # latent patch V
    overlap: int = 8
    batch_size: int = 64  # patches per Patch-DiT call in the reference upscaler


@dataclass(frozen=True)
class PatchScalerConfig:
    scale: int = 4
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    grm: GRMConfig = field(default_factory=GRMConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    patch_dit: PatchDiTConfig = field(default_factory=PatchDiTConfig)
    texture_encoder: TextureEncoderConfig = field(default_factory=TextureEncoderConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        """Every module that reads or writes latents must agree on their channel count."""
        channels = {
            "autoencoder.latent_channels": self.autoencoder.latent_channels,
            "grm.in_channels": self.grm.in_channels,
            "grm.out_channels": self.grm.out_channels,
            "classifier.in_channels": self.classifier.in_channels,
            "patch_dit.latent_channels": self.patch_dit.latent_channels,
        }
        if len(set(channels.values())) != 1:
            raise ValueError(f"latent channel counts disagree: {channels}")
        if self.patch_dit.input_size != self.sampler.patch_size:
            raise ValueError(f"patch_dit.input_size {self.patch_dit.input_size} != sampler.patch_size "
                             f"{self.sampler.patch_size}")

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatchScalerConfig:
        """Inverse of ``to_dict``; unknown keys are an error, missing keys take defaults."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value = data[f.name]
            sub = _SUBCONFIGS.get(f.name)
            kwargs[f.name] = _build(sub, value) if sub is not None else value
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown PatchScalerConfig keys: {sorted(unknown)}")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> PatchScalerConfig:
        return dataclasses.replace(self, **changes)


_SUBCONFIGS: dict[str, type] = {
    "autoencoder": AutoencoderConfig,
    "grm": GRMConfig,
    "classifier": ClassifierConfig,
    "patch_dit": PatchDiTConfig,
    "texture_encoder": TextureEncoderConfig,
    "sampler": SamplerConfig,
}


def _build(cls: type, data: dict[str, Any]) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    # JSON turns tuples into lists; frozen configs keep tuples so they stay hashable.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
