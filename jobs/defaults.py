"""Paths of the bundled defaults (demo weights, demo RTM, sample images) shipped in ``assets/``."""

from __future__ import annotations

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
