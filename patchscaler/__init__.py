"""PatchScaler model package: pure torch (no Ray, no argparse); file I/O only in ``weights.py``."""

from patchscaler.config import PatchScalerConfig
from patchscaler.presets import PRESETS, get_preset

__all__ = ["PRESETS", "PatchScalerConfig", "get_preset"]
