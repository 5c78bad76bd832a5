"""``patchscaler init-weights --preset tiny --out DIR``: a randomly initialised checkpoint of a preset.

For smoke tests, benchmarks and as the starting point of training; the weights produce no useful image.
``--autoencoder DIR`` puts a pretrained diffusers ``AutoencoderKL`` folder (e.g. SD-VAE, as the paper
uses) in place of the random autoencoder: its weights and its ``config.json`` (sizes, ``scaling_factor``)
go into the checkpoint, and ``train-autoencoder`` then refuses to overwrite it (start at ``train-grm``).
"""

from __future__ import annotations

import argparse
import json

import torch

from patchscaler.model import PatchScalerModel
from patchscaler.presets import PRESETS
from patchscaler.weights import load_pretrained_autoencoder, save_checkpoint, with_autoencoder


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", required=True, help="checkpoint dir or s3:// prefix")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autoencoder", default=None, metavar="DIR",
                   help="pretrained diffusers AutoencoderKL folder (config.json + "
                        "diffusion_pytorch_model.safetensors or .bin; local or s3://) to use instead of a "
                        "random autoencoder; its scaling_factor is taken from its config.json")


def run(args: argparse.Namespace) -> int:
    from jobs.checks import UsageError, check_exists, short
    from pipeline.io import normalize_root, storage_options

    config, vae = PRESETS[args.preset], None
    if args.autoencoder:
        source = normalize_root(args.autoencoder)
        check_exists(source, storage_options(), what="--autoencoder")
        try:
            vae, ae_config = load_pretrained_autoencoder(source, config.autoencoder)
            config = with_autoencoder(config, ae_config, source=source)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise UsageError(f"--autoencoder {args.autoencoder}: {short(exc)}") from None
    torch.manual_seed(args.seed)
    model = PatchScalerModel(config=config, vae=vae)
    version = save_checkpoint(model, args.out)
    counts = model.parameter_counts()
    total = sum(counts.values())
    summary = {"out": args.out, "version": version, "parameters": counts, "total": total}
    if args.autoencoder:
        summary["autoencoder"] = {"pretrained": config.autoencoder.pretrained,
                                  "scaling_factor": config.autoencoder.scaling_factor}
    print(json.dumps(summary))
    return 0
