"""``patchscaler history [--history PATH] [--set NAME] [--metric M] [--since DATE] [--until DATE]``: the
benchmark history as a table.

Prints one row per run, set, method and metric (date, run id, mean, std, images, failures, the change from
the previous run shown, upscaling seconds per image, model version, git commit, pyiqa version, device) as
Markdown (default) or CSV, oldest first. ``--images`` prints the per-image scores instead. The history is
the one ``benchmark`` / ``evaluate`` append to (``eval/history.py``).
"""

from __future__ import annotations

import argparse
import sys


def date_arg(text: str) -> float:
    from eval.history import parse_date

    try:
        return parse_date(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a date like 2026-12-01 or 2026-12-01T03:00, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--history", default=None,
                   help="history Parquet (default: $PATCHSCALER_HOME/history.parquet, else "
                        "~/.local/share/patchscaler/history.parquet)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="NAME",
                   help="only this evaluation set (repeatable)")
    p.add_argument("--metric", dest="metrics", action="append", default=[], metavar="METRIC",
                   help="only this metric (repeatable)")
    p.add_argument("--method", dest="methods", action="append", default=[], metavar="NAME",
                   help="only this method: patchscaler, bicubic, an `evaluate --method` name (repeatable)")
    p.add_argument("--since", type=date_arg, default=None, metavar="DATE", help="runs from this UTC date on")
    p.add_argument("--until", type=date_arg, default=None, metavar="DATE", help="runs before this UTC date")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="table format")
    p.add_argument("--images", action="store_true", help="per-image scores instead of the per-set means")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (MinIO, Ceph, ...)")


def run(args: argparse.Namespace) -> int:
    from eval.history import (
        IMAGE_HISTORY_SCHEMA,
        default_history,
        history_table,
        query,
        read_history,
        read_image_history,
        to_csv,
        to_markdown,
    )
    from jobs.checks import UsageError
    from pipeline.io import filesystem, storage_options

    options = storage_options(args.s3_endpoint)
    uri = args.history or default_history()
    fs, path = filesystem(uri, options)
    if not fs.exists(path):
        raise UsageError(f"no history at {uri} (--history; benchmark and evaluate write it)")
    select = {"datasets": args.sets, "metrics": args.metrics, "methods": args.methods, "since": args.since,
              "until": args.until}
    if args.images:
        rows = query(read_image_history(uri, options), **select)
        table = rows[[c for c in IMAGE_HISTORY_SCHEMA.names if c not in ("sr_path", "hr_path", "lr_path")]]
    else:
        table = history_table(query(read_history(uri, options), **select))
    if table.empty:
        print(f"no runs in {uri} match", file=sys.stderr)
        return 0
    print(to_csv(table) if args.format == "csv" else to_markdown(table) + "\n", end="")
    return 0
