"""Crops -> RTM values, keys and texture classes: the model half of an RTM build.

For a batch of 128×128 RGB crops:

- value = ``model.autoencoder.encode(crop)``: the scaled latent (4, 16, 16), what Patch-DiT's texture
  encoder reads back at inference;
- key = ``normalize(model.classifier.features(value))``: the texture feature, L2-normalised so that the
  faiss inner-product index ranks by cosine similarity, as the upscaler's queries are;
- class = ``argmax model.classifier(value)``: the predicted texture (DTD) class, used only to group the
  contact sheet.

``EncodeStage`` is the Ray Data actor: the checkpoint is loaded once per actor in ``__init__``; pool size,
batch size and GPUs are set by ``build.py``. ``encode_crops`` is the same computation as a plain function
(benchmarks, tests).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from patchscaler.model import PatchScalerModel
from patchscaler.weights import load_checkpoint

Batch = dict[str, np.ndarray]
PASSTHROUGH = ("id", "source", "path", "box")


@torch.inference_mode()
def encode_crops(
    model: PatchScalerModel, pixels: np.ndarray | torch.Tensor, *, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 crops (B, c, c, 3) -> (values (B, C, c/f, c/f), keys (B, D) unit norm, classes (B,)); c is one
    latent patch of the autoencoder (``build.crop_size``: 128 for f=8)."""
    device = next(model.parameters()).device
    # Ray hands over read-only arrays: np.require copies those (torch wants writable memory).
    crops = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.require(pixels, None, "WC"))
    values, keys, classes = [], [], []
    for i in range(0, crops.shape[0], batch_size):
        chunk = crops[i : i + batch_size].to(device)  # (b, H, W, 3) uint8
        image = chunk.permute(0, 3, 1, 2).float() / 255.0  # (b, 3, H, W) in [0, 1]
        value = model.autoencoder.encode(image)  # (b, 4, H/8, W/8)
        feats = model.classifier.features(value)  # (b, D)
        logits = model.classifier(value)  # (b, num_classes); the public API, features computed again
        values.append(value.float().cpu())
        keys.append(F.normalize(feats.float(), dim=1).cpu())
        classes.append(logits.argmax(dim=1).cpu())
    if not values:
        raise ValueError("no crops to encode")
    return (torch.cat(values).numpy(), torch.cat(keys).numpy(),
            torch.cat(classes).to(torch.int32).numpy())


class EncodeStage:
    """Ray Data actor: crop rows (id, source, path, box, pixels) -> candidate rows (id, source, path, box,
    value, key, texture_class, weights_hash)."""

    def __init__(self, *, weights: str, device: str, autoencoder: str | None, batch_size: int,
                 threads: int) -> None:
        torch.set_num_threads(threads)  # CPU threads of this actor: its num_cpus, rounded down (build.py)
        self.model = load_checkpoint(weights, device=device, autoencoder=autoencoder)
        self.batch_size = batch_size

    def __call__(self, batch: Batch) -> Batch:
        out = {name: batch[name] for name in PASSTHROUGH}
        n = len(batch["id"])
        if n == 0:
            d = self.model.config.classifier.feature_dim
            c = self.model.config.autoencoder.latent_channels
            v = self.model.config.sampler.patch_size
            out.update(value=np.zeros((0, c, v, v), np.float32), key=np.zeros((0, d), np.float32),
                       texture_class=np.zeros(0, np.int32), weights_hash=np.zeros(0, dtype=object))
            return out
        values, keys, classes = encode_crops(self.model, batch["pixels"], batch_size=self.batch_size)
        hashes = np.empty(n, dtype=object)
        hashes[:] = self.model.version
        out.update(value=values, key=keys, texture_class=classes, weights_hash=hashes)
        return out
