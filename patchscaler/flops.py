"""FLOPs of the Patch-DiT, counted on the meta device (no weights, no memory): what a patch-step costs.

``bench/flops.py`` counts every stage of an image with :func:`count_flops`; ``upscale-dataset --dry-run``
turns its patch-step estimate into GPU-hours with :func:`patch_step_flops`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from patchscaler.config import PatchScalerConfig
from patchscaler.patch_dit import PatchDiT
from patchscaler.texture import TextureEncoder

META = torch.device("meta")


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` (matrix products, convolutions, attention) as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


def patch_step_flops(cfg: PatchScalerConfig) -> tuple[int, int]:
    """(FLOPs of one Patch-DiT step of one patch with the prompt cache, FLOPs per patch that are paid
    once: its texture prompt and the prompt's K/V), as ``bench/flops.py`` counts them."""
    v, k, c = cfg.sampler.patch_size, cfg.texture_encoder.top_k, cfg.latent_channels
    with META:
        dit = PatchDiT(config=cfg.patch_dit).eval()
        encoder = TextureEncoder(dit=cfg.patch_dit, config=cfg.texture_encoder).eval()
        patch, t = torch.empty(1, c, v, v), torch.empty(1)
        values, scores = torch.empty(1, k, c, v, v), torch.empty(1, k)
        prompt = torch.empty(1, k * cfg.patch_dit.num_tokens, cfg.patch_dit.hidden_size)
    with torch.no_grad():
        kv = dit.prompt_kv(prompt)
    step = count_flops(dit, patch, t, patch, prompt_kv=kv)
    once = count_flops(encoder, values, scores) + count_flops(dit.prompt_kv, prompt)
    return step, once
