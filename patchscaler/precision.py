"""Inference precision: ``fp32`` or ``bf16`` (autocast), a value the caller carries, never global state.

``bf16`` runs the texture classifier, texture encoder, Patch-DiT and the autoencoder's decoder with their
matrix products and convolutions in bfloat16 under ``torch.autocast`` (weights stay float32, so one
model object serves both precisions and checkpoints are unchanged). Float32 under every precision:

- ``upscaler.restore``, the encoder and the GRM: their confidence map C decides the groups of Eq. (2)
  (patch means of C against gamma1/gamma2). bf16 there moved patch means by up to 2e-3 on the test
  images and flipped patches near a threshold; in float32 the groups (and the y_HR the patches start
  from) are the same under both precisions. The GRM's confidence head also opts out of autocast by
  itself (``grm.py``), for callers that run the GRM under autocast;
- every latent handed between stages (y_HR, x0 patches), so the noise of Eq. (7) is drawn in float32;
- the diffusion arithmetic (Eq. 7 and the DDIM update, ``diffusion.py``): the samplers cast Patch-DiT's
  epsilon to float32 before each update, so the latents x_t stay float32 through all steps.

Measured on the tiny preset (``tests/test_precision.py``, ``docs/model.md``): bf16 output >= 35 dB PSNR
against fp32 with the same groups.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def default_precision(device: str | torch.device) -> str:
    """bf16 on CUDA (tensor cores), fp32 elsewhere (a CPU without bf16 units gains nothing from it)."""
    return "bf16" if torch.device(device).type == "cuda" else "fp32"


def resolve_precision(precision: str | None, device: str | torch.device) -> str:
    """``None`` or ``"auto"`` -> the device's default; ``fp32``/``bf16`` as given; else a ValueError."""
    if precision is None or precision == "auto":
        return default_precision(device)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS} or 'auto'")
    return precision


def autocast(device: str | torch.device, precision: str) -> AbstractContextManager[object]:
    """The autocast context of ``precision`` on ``device``: bfloat16 autocast for ``bf16``, nothing for
    ``fp32``. Wrap a whole loop in one context: autocast casts each weight to bf16 once per outermost
    context."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def float32_region(device: str | torch.device) -> AbstractContextManager[object]:
    """Autocast switched off (inside a ``bf16`` region): the ops within run in their inputs' dtype."""
    kind = torch.device(device).type
    if not torch.amp.is_autocast_available(kind):  # e.g. the meta device of bench/flops.py
        return contextlib.nullcontext()
    return torch.autocast(device_type=kind, enabled=False)
