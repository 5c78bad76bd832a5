"""``PatchScalerModel``: the five networks of the method in one ``nn.Module``.

The state-dict prefixes (``autoencoder.``, ``grm.``, ``classifier.``, ``patch_dit.``,
``texture_encoder.``) are the checkpoint format (``weights.py``). Inference logic lives in
``upscaler.py``; training in ``patchscaler/training/``.
"""

from __future__ import annotations

from torch import nn

from patchscaler.autoencoder import Autoencoder, LatentAutoencoder
from patchscaler.config import PatchScalerConfig
from patchscaler.grm import GRM
from patchscaler.patch_dit import PatchDiT
from patchscaler.texture import TextureClassifier, TextureEncoder

MODULE_NAMES: tuple[str, ...] = ("autoencoder", "grm", "classifier", "patch_dit", "texture_encoder")


class PatchScalerModel(nn.Module):
    def __init__(self, *, config: PatchScalerConfig, vae: Autoencoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.autoencoder = LatentAutoencoder(config=config.autoencoder, vae=vae)
        self.grm = GRM(config=config.grm)
        self.classifier = TextureClassifier(config=config.classifier)
        self.patch_dit = PatchDiT(config=config.patch_dit)
        self.texture_encoder = TextureEncoder(dit=config.patch_dit, config=config.texture_encoder)
        # Set by weights.load_checkpoint: a short content hash of the weights, written to manifests.
        self.version: str = "random-init"

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per module, e.g. for the per-module breakdown of the ``paper`` preset."""
        return {name: sum(p.numel() for p in getattr(self, name).parameters()) for name in MODULE_NAMES}
