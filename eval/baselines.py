"""Baselines measured in the same run: the set's LR images upscaled by a fixed method, scored with the
same metrics, so that a drift of the metric stack (pyiqa, torch, the weights of a metric) can be told from
a drift of the model: bicubic moves only when the metric stack or the set does.

``bicubic``: ×scale bicubic interpolation of the LR image (torch, ``align_corners=False``, clamped and
quantised to 8 bits), written to ``OUT/baselines/bicubic/NAME/<key>.png`` and scored like PatchScaler's
outputs (rows with ``method="bicubic"``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from eval.datasets import DatasetEntry, encode_png, load_image
from pipeline.io import join, write_bytes_atomic

BASELINES = ("bicubic",)


def bicubic_upscale(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """(3, h, w) in [0, 1] -> (3, h*scale, w*scale), bicubic, 8-bit quantised."""
    up = F.interpolate(lr[None], scale_factor=scale, mode="bicubic", align_corners=False)[0]  # (3, sh, sw)
    return (up.clamp(0, 1) * 255.0).round() / 255.0


def write_baseline(method: str, entries: list[DatasetEntry], out: str, *, dataset: str, scale: int,
                   options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Upscale every entry's LR with ``method`` into ``out/baselines/METHOD/DATASET/`` and return the
    scoring rows (``eval.score.INPUT_COLUMNS``) of the written images."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")
    rows = []
    for e in entries:
        uri = join(out, "baselines", method, dataset, *f"{e.key}.png".split("/"))
        write_bytes_atomic(uri, encode_png(bicubic_upscale(load_image(e.lr, options), scale)), options or {})
        rows.append({"image_id": e.key, "dataset": dataset, "sr": uri, "hr": e.hr, "lr": e.lr,
                     "model_version": "", "rtm_version": "", "runtime_s": float("nan"), "method": method})
    return rows
