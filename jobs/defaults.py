"""Paths of the bundled defaults (demo weights, demo RTM, sample images) shipped in ``assets/``."""

from __future__ import annotations

import argparse
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_WEIGHTS = ASSETS / "demo" / "weights"
DEMO_RTM = ASSETS / "demo" / "rtm"
SAMPLES = ASSETS / "samples"


def pick_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def add_refine_arguments(p: argparse.ArgumentParser, *, pipeline: bool = False) -> None:
    """``--refine`` and ``--color-fix``, the same on ``upscale`` and ``upscale-dataset``."""
    actors = "no Patch-DiT actors, " if pipeline else ""
    p.add_argument("--refine", choices=["diffusion", "none"], default="diffusion",
                   help="diffusion: Patch-DiT sampling (PGS); none: the decoded GRM output, no sampling "
                        f"(fast, {actors}no generated texture)")
    p.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default=None,
                   help="colour correction against the bicubic image (default: wavelet, chosen by "
                        "measurement: docs/model.md)")
