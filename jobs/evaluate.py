"""``patchscaler evaluate --results DIR|s3://… --dataset NAME=DIR … --out DIR``: IQA scores and a report.

Scores the upscaled images with pyiqa metrics in Ray actors, writes ``scores.parquet`` (per image and
metric), ``summary.parquet`` (per dataset and metric), appends the summary to ``history.parquet`` and
renders ``report.md`` / ``report.html``. Metric weights come from a local cache only (``--metric-cache``
or ``$PATCHSCALER_IQA_CACHE``); see ``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from eval.datasets import LAYOUTS
from eval.metrics import CACHE_ENV, PAPER_METRICS, parse_metrics


def parse_dataset(text: str) -> tuple[str, str]:
    name, sep, root = text.partition("=")
    if not sep or not name.strip() or not root.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name.strip(), root.strip()


def metric_list(text: str) -> tuple[str, ...]:
    try:
        return parse_metrics(text)
    except KeyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """Dataset layout, scale and metrics: shared by ``evaluate`` and ``benchmark``."""
    p.add_argument("--dataset-layout", dest="dataset_layout", choices=LAYOUTS, default="auto",
                   help="how the evaluation set's files are laid out (auto: detected)")
    p.add_argument("--scale", type=int, default=4, help="upscaling factor (RealSR's *_LR<scale> files)")
    p.add_argument("--metrics", type=metric_list, default=PAPER_METRICS,
                   help=f"comma-separated (default: {','.join(PAPER_METRICS)}); psnr,ssim,piqe need no "
                        "weight files")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", required=True,
                   help="upscaled images: folder or s3:// prefix (RESULTS/NAME per dataset when several)")
    p.add_argument("--dataset", action="append", type=parse_dataset, default=[], metavar="NAME=DIR",
                   help="an evaluation set (repeatable); names lsdir*/realsr*/realset* are compared with the "
                        "paper; without any, every result image is scored alone (no-reference metrics)")
    add_dataset_arguments(p)
    p.add_argument("--out", required=True, help="output folder or s3:// prefix (tables, report)")
    p.add_argument("--metric-cache", default=None,
                   help="folder of metric weights (default: $PATCHSCALER_IQA_CACHE, else torch hub's folder)")
    p.add_argument("--history", default=None,
                   help="history Parquet to append to (default: OUT/history.parquet)")
    p.add_argument("--run-id", default=None, help="name of this run in the history (default: time + random)")
    p.add_argument("--seed", type=int, default=0, help="torch seed before each metric call (random crops)")
    p.add_argument("--crop-border", type=int, default=None, help="PSNR/SSIM border crop (default: the scale)")
    p.add_argument("--actors", type=int, default=1, help="scoring actors")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default: 0.25 when there are GPUs")
    p.add_argument("--batch-size", type=int, default=4, help="images per scoring call")
    p.add_argument("--examples", type=int, default=2, help="example crops per dataset in the report")
    p.add_argument("--no-report", action="store_true", help="write the Parquet tables only")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on, e.g. HEAD:6379 (default: a private local Ray instance)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (MinIO, Ceph, ...)")
    p.add_argument("--verbose", action="store_true", help="show Ray's logs and progress bars")


def check_metric_weights(metrics: tuple[str, ...], cache_dir: str | None, *, flag: str = "--metrics") -> None:
    """Check the metric weights before anything starts: a ``UsageError`` (one line) naming the missing
    files, the cache folder, the option that sets it (``--metric-cache``) and the metrics that need no
    weights (for ``flag``, the option that chose the metrics)."""
    from eval.metrics import (
        OFFLINE_METRICS,
        MissingDependencyError,
        MissingWeightsError,
        check_weights,
        missing_files,
        resolve_cache_dir,
    )
    from jobs.checks import UsageError

    cache = resolve_cache_dir(cache_dir)
    absent = missing_files(metrics, cache)
    if absent:
        files = ", ".join(f"{m} needs {os.path.relpath(path, cache)}" for m, found in absent.items()
                          for path, _ in found)
        raise UsageError(f"metric weights missing from the metric cache {cache} ({files}); put them there "
                         f"(the folder is --metric-cache or ${CACHE_ENV}; sources in docs/evaluation.md) "
                         f"or use {flag} {','.join(OFFLINE_METRICS)}, which need no weights")
    try:
        check_weights(metrics, cache)
    except (MissingWeightsError, MissingDependencyError) as exc:
        raise UsageError(" ".join(str(exc).split())) from None


def record_run(results: Any, *, out: str, history: str | None, run_id: str, maps: dict[Any, dict[str, str]],
               examples: int, report: bool, options: dict[str, Any]) -> Any:
    """Write the tables of ``results`` (``eval.results.RESULT_SCHEMA`` rows) under ``out``, append the run
    to the history, render the report (``report``) and print the summary; returns the summary frame."""
    from eval.report import render_report
    from eval.results import write_run

    timestamp = time.time()
    summary, hist = write_run(results, out, history=history, run_id=run_id, timestamp=timestamp,
                              options=options)
    if report:
        files = render_report(results=results, summary=summary, history=hist, out=out, maps=maps,
                              run_id=run_id, examples_per_dataset=examples, options=options)
        print(f"report: {files.html}")
    for r in summary.itertuples():
        print(json.dumps({"dataset": r.dataset, "metric": r.metric, "mean": r.mean, "std": r.std,
                          "count": r.count, "failed": r.failed}))
    return summary


def run(args: argparse.Namespace) -> int:
    from eval.datasets import plan_scoring
    from eval.metrics import resolve_cache_dir
    from eval.results import new_run_id
    from eval.score import ScoreConfig, score_rows
    from jobs.checks import UsageError, check_exists, check_output, short
    from jobs.runtime import start_ray
    from pipeline.io import storage_options

    options = storage_options(args.s3_endpoint)
    check_metric_weights(args.metrics, args.metric_cache)  # before anything starts
    check_exists(args.results, options, what="--results")
    for name, root in args.dataset:
        check_exists(root, options, what=f"--dataset {name}")
    check_output(args.out, options, what="--out")
    cache = resolve_cache_dir(args.metric_cache)
    try:
        plan = plan_scoring(args.results, args.dataset, layout=args.dataset_layout, scale=args.scale,
                            options=options)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(short(exc)) from None
    for entry in plan.missing:
        print(json.dumps({"dataset": entry.dataset, "image_id": entry.key, "status": "missing",
                          "error": f"no upscaled image in {args.results}"}))
    if not plan.rows:
        raise UsageError(f"no upscaled images to score under {args.results}")

    start_ray(args.address, verbose=args.verbose)
    config = ScoreConfig(metrics=tuple(args.metrics), cache_dir=cache, seed=args.seed,
                         crop_border=args.scale if args.crop_border is None else args.crop_border,
                         actors=args.actors, gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size,
                         storage_options=options)
    results = score_rows(plan.rows, config)
    run_id = args.run_id or new_run_id(time.time())
    summary = record_run(results, out=args.out, history=args.history, run_id=run_id, maps=plan.maps,
                         examples=args.examples, report=not args.no_report, options=options)
    failed = int(summary["failed"].sum()) if not summary.empty else 0
    print(f"run {run_id}: {results['image_id'].nunique()} images scored, {failed} failed values, "
          f"{len(plan.missing)} missing results")
    return 1 if failed or plan.missing else 0
