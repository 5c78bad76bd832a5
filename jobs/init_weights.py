"""``patchscaler init-weights --preset tiny --out DIR``: a randomly initialised checkpoint of a preset.

For smoke tests, benchmarks and as the starting point of training; the weights produce no useful image.
"""

from __future__ import annotations

import argparse
import json

import torch

from patchscaler.model import PatchScalerModel
from patchscaler.presets import PRESETS
from patchscaler.weights import save_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", required=True, help="checkpoint dir or s3:// prefix")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    model = PatchScalerModel(config=PRESETS[args.preset])
    version = save_checkpoint(model, args.out)
    counts = model.parameter_counts()
    total = sum(counts.values())
    print(json.dumps({"out": args.out, "version": version, "parameters": counts, "total": total}))
    return 0
