"""Exponential moving average of the trained module's weights (DiT keeps 0.9999; diffusers' EMAModel).

``ema = EMA(model, trainable, decay=0.9999)`` shadows every trainable parameter of ``trainable`` (a part
of ``model``, or a wrapper around parts of it) in fp32, keyed by the parameter's name in
``model.state_dict()`` (``grm.…``, ``patch_dit.…``), so a checkpoint of the EMA weights is a slice of a
PatchScaler checkpoint. After every optimizer step ``ema.update(step)`` does

    ema <- d * ema + (1 - d) * param,   d = min(decay, (1 + step) / (10 + step))

(the usual warm-up: early weights are forgotten quickly, so a short run's EMA is not its random init).
``with ema.applied(): ...`` swaps the EMA weights into the model (validation, the final export) and the
raw weights back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def warmup_decay(decay: float, step: int) -> float:
    """The decay used after optimizer step ``step`` (1-based count of steps taken)."""
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    def __init__(self, model: nn.Module, trainable: nn.Module, *, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        names = {id(p): name for name, p in model.named_parameters()}
        self.params: dict[str, nn.Parameter] = {}
        for p in trainable.parameters():
            if p.requires_grad:
                if id(p) not in names:
                    raise ValueError("a trainable parameter is not a parameter of the model")
                self.params[names[id(p)]] = p
        self.shadow: dict[str, torch.Tensor] = {k: p.detach().float().clone() for k, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = warmup_decay(self.decay, step)
        names = list(self.params)
        shadow = [self.shadow[k] for k in names]
        current = [self.params[k].detach().float() for k in names]
        torch._foreach_lerp_(shadow, current, 1.0 - d)  # shadow += (1 - d) * (param - shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = set(self.shadow) - set(state), set(state) - set(self.shadow)
        if missing or unexpected:
            raise ValueError(f"EMA weights do not match the trained module: missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(unexpected)[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in the model for the duration of the block; the raw weights afterwards."""
        with torch.no_grad():
            raw = {k: p.detach().clone() for k, p in self.params.items()}
            for k, p in self.params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(raw[k])
