"""``patchscaler evaluate --results DIR|s3://… --dataset NAME=DIR … --out DIR``: IQA scores and a report.

Scores the upscaled images with pyiqa metrics in Ray actors, writes ``scores.parquet`` (per image and
metric), ``summary.parquet`` (per dataset and metric), appends the summary to ``history.parquet`` and
renders ``report.md`` / ``report.html``. Metric weights come from a local cache only (``--metric-cache``
or ``$PATCHSCALER_IQA_CACHE``); see ``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from eval.datasets import LAYOUTS
from eval.metrics import PAPER_METRICS, parse_metrics


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
    p.add_argument("--layout", choices=LAYOUTS, default="auto", help="dataset layout (auto: detected)")
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
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (MinIO, Ceph, ...)")


def weights_missing(metrics: tuple[str, ...], cache_dir: str | None) -> bool:
    """Check the metric weights before anything starts; prints eval.metrics' error (naming every missing
    file and its URL) when some are missing. Jobs then exit with 2."""
    from eval.metrics import MissingDependencyError, MissingWeightsError, check_weights, resolve_cache_dir

    try:
        check_weights(metrics, resolve_cache_dir(cache_dir))
    except (MissingWeightsError, MissingDependencyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return True
    return False


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
    from pipeline.io import storage_options

    options = storage_options(args.s3_endpoint)
    if weights_missing(args.metrics, args.metric_cache):  # before anything starts
        return 2
    cache = resolve_cache_dir(args.metric_cache)
    plan = plan_scoring(args.results, args.dataset, layout=args.layout, scale=args.scale, options=options)
    for entry in plan.missing:
        print(json.dumps({"dataset": entry.dataset, "image_id": entry.key, "status": "missing",
                          "error": f"no upscaled image in {args.results}"}))
    if not plan.rows:
        print(f"error: no upscaled images to score under {args.results}", file=sys.stderr)
        return 1

    import ray

    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=False)
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
