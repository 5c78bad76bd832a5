"""The arguments of the benches that run the demo model over the held-out sets (``bench/color_fix.py``,
``bench/adaptive_quality.py``): which weights, which sets and images, the seed, the output cache.

A sibling module: ``python bench/X.py`` puts ``bench/`` first on ``sys.path``."""

from __future__ import annotations

import argparse

from jobs.defaults import ASSETS, DEMO_RTM, DEMO_WEIGHTS, SAMPLES
from trainer.heldout_sets import SETS


def add_heldout_arguments(p: argparse.ArgumentParser, *, cache_help: str) -> None:
    """--weights, --rtm, --heldout, --samples, --sets, --seed, --images and --cache (``cache_help``)."""
    p.add_argument("--weights", default=str(DEMO_WEIGHTS))
    p.add_argument("--rtm", default=str(DEMO_RTM))
    p.add_argument("--heldout", default=str(ASSETS / "heldout"))
    p.add_argument("--samples", default=str(SAMPLES))
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", nargs="+", default=None, help="only these images (file stems)")
    p.add_argument("--cache", default=None, help=cache_help)
