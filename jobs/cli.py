"""``patchscaler`` console command: one subcommand per job, each a thin ``add_arguments`` + ``run``.

The registry below is an explicit dict (no import-time scanning); a job module is imported only when its
subcommand runs, so ``patchscaler --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module under jobs/, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "upscale": ("jobs.upscale", "upscale image files with the single-process reference upscaler"),
    "init-weights": ("jobs.init_weights", "write a randomly initialised checkpoint of a preset"),
    "train-autoencoder": ("jobs.train_autoencoder", "train the latent autoencoder (AutoencoderKL)"),
    "train-grm": ("jobs.train_grm", "train the Global Restoration Module (Eq. 1/8)"),
    "train-classifier": ("jobs.train_classifier", "train the texture classifier on DTD latent patches"),
    "train-patchdit": ("jobs.train_patchdit", "train Patch-DiT + texture encoder (Eq. 9) with an RTM"),
    "upscale-dataset": (
        "jobs.upscale_dataset", "upscale a folder or s3:// prefix with the Ray Data pipeline"
    ),
    "build-rtm": ("jobs.build_rtm", "build (or extend) a Reference Texture Memory from texture sources"),
    "evaluate": ("jobs.evaluate", "score upscaled images with IQA metrics (pyiqa) and write a report"),
    "benchmark": ("jobs.benchmark", "upscale + score + report evaluation sets, appending to a history"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to declare its arguments (the job modules
    are the one source of truth for them), so a heavy or broken job never slows or breaks the others."""
    parser = argparse.ArgumentParser(prog="patchscaler", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
