"""``patchscaler``: ×4 super-resolution of images and image collections (PatchScaler), and its jobs.

Each subcommand is a module of ``jobs/`` with ``add_arguments(parser)`` and ``run(args) -> exit code``,
listed in the explicit registry below; a module is imported only when its subcommand runs, so
``patchscaler --help`` stays fast. Errors a user can fix (a missing input, a bad ``--weights``, an S3
prefix that cannot be reached, an invalid option value) are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
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
    "prepare-data": (
        "jobs.prepare_data", "cut an HR image set into sub-images once (BasicSR's practice) for training"
    ),
    "build-rtm": ("jobs.build_rtm", "build (or extend) a Reference Texture Memory from texture sources"),
    "evaluate": ("jobs.evaluate", "score upscaled images with IQA metrics (pyiqa) and write a report"),
    "benchmark": ("jobs.benchmark", "upscale + score + report evaluation sets, appending to a history"),
    "history": ("jobs.history", "print the benchmark history as a Markdown or CSV table"),
}

EXIT_CODES = """exit codes:
  0    done, every image ok (or nothing left to do)
  1    some images failed (listed at the end of the run and in the manifest)
  2    usage or configuration error (one line on stderr; nothing was started)
  3    benchmark/evaluate --fail-on-regression: a metric got worse than the baseline run by more than its
       tolerance (one JSON line on stdout lists them; takes precedence over 1)
  130  interrupted (Ctrl-C); finished images are recorded, run the same command to resume"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default (leaving out the empty ones) and keeps the epilog's layout."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("patchscaler")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to declare its arguments (the job modules
    are the one source of truth for them), so a heavy or broken job never slows or breaks the others."""
    parser = Parser(prog="patchscaler", description=__doc__.splitlines()[0].split(": ", 1)[1],
                    epilog=EXIT_CODES, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"patchscaler {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXIT_CODES,
                           formatter_class=HelpFormatter)
        p.set_defaults(_module=module_name)
        if name == command:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; returns its exit code (see ``EXIT_CODES``), also for usage errors."""
    from jobs.checks import UsageError
    from pipeline.plan import PlanError

    argv = sys.argv[1:] if argv is None else argv
    # A job starts Ray itself (jobs/runtime.py); no Ray call may start another one behind its back
    # (e.g. a thread still reading results while the interpreter exits after Ctrl-C).
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    if "--verbose" not in argv:  # bitsandbytes (imported by diffusers) warns on import about a kernel
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # package this project never uses
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        module = importlib.import_module(args._module)
        return int(module.run(args) or 0)
    except (UsageError, PlanError) as exc:
        print(f"patchscaler {args.command}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"patchscaler {args.command}: interrupted; what finished is kept, run the same command "
              "again to resume", file=sys.stderr, flush=True)
        for name in ("ray", "ray.data"):  # Ray Data's threads complain while Ray shuts down at exit
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        return 130


if __name__ == "__main__":
    sys.exit(main())
