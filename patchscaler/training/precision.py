"""Mixed precision of a training step: autocast dtype, and fp16's gradient scaler.

- ``bf16``: autocast to bfloat16 (CUDA and CPU); no scaler (bf16 has fp32's exponent range).
- ``fp16``: autocast to float16 with ``torch.amp.GradScaler`` (pre-Ampere GPUs such as the paper's
  V100s): the loss is scaled before ``backward``, gradients are unscaled before clipping, and a step
  whose gradients overflowed is skipped while the scale shrinks.
- ``fp32``: no autocast.
- ``auto``: bf16 on CUDA, fp32 elsewhere (what the trainers always did).

Losses are computed in fp32 in every mode (``steps.py`` casts model outputs with ``.float()``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class Amp:
    """``Amp.create("fp16", device)``; ``with amp.autocast(): ...``; ``amp.update(loss, ...)``."""

    precision: str  # bf16, fp16 or fp32 (resolved)
    device_type: str  # "cuda" or "cpu"
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, precision: str, device: torch.device) -> Amp:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
        if precision == "auto":
            precision = "bf16" if device.type == "cuda" else "fp32"
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        return cls(precision=precision, device_type=device.type, scaler=scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = _DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=dtype)

    def update(self, loss: torch.Tensor, module: nn.Module, optimizer: torch.optim.Optimizer,
               max_grad_norm: float | None) -> float:
        """backward, clip to ``max_grad_norm`` (None: no clipping) and step; returns the gradient norm
        (inf or nan on an fp16 step that overflowed: the scaler then skips the step)."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm or float("inf"))
            optimizer.step()
            return float(norm)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_grad_norm or float("inf"))
        self.scaler.step(optimizer)  # skipped when the gradients hold inf/nan
        self.scaler.update()
        return float(norm)

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
