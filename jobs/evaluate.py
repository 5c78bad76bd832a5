"""``patchscaler evaluate --results DIR|s3://… --dataset NAME=DIR … --out DIR``: IQA scores and a report.

Scores the upscaled images with pyiqa metrics in Ray actors, writes ``scores.parquet`` (per image and
metric), ``summary.parquet`` / ``summary.csv`` (per dataset, method and metric), appends the run to the
history (``eval/history.py``; ``--history``, by default in ``$PATCHSCALER_HOME``) and renders
``report.md`` / ``report.html``. ``--method NAME --results DIR [--suffix _out]`` scores another method's
outputs into the same tables and history; ``--fail-on-regression`` gates on the history (exit code 3).
Metric weights come from a local cache only (``--metric-cache`` or ``$PATCHSCALER_IQA_CACHE``); see
``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from eval.datasets import LAYOUTS, check_template
from eval.metrics import CACHE_ENV, PAPER_METRICS, parse_metrics

REGRESSION_EXIT = 3  # --fail-on-regression and a metric moved past its tolerance (jobs/cli.py EXIT_CODES)


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


def parse_expect(text: str) -> tuple[str, int]:
    name, sep, count = text.partition("=")
    if not sep or not name.strip() or not count.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected SET=N (N images), got {text!r}")
    return name.strip(), int(count)


def lr_template(text: str) -> str:
    try:
        return check_template(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def tolerance_list(text: str) -> dict[str, float]:
    from eval.gate import parse_tolerances

    try:
        return parse_tolerances(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """Dataset layout, scale and metrics: shared by ``evaluate`` and ``benchmark``."""
    p.add_argument("--dataset-layout", dest="dataset_layout", choices=LAYOUTS, default="auto",
                   help="how the evaluation set's files are laid out (auto: detected)")
    p.add_argument("--scale", type=int, default=4, help="upscaling factor (RealSR's *_LR<scale> files)")
    p.add_argument("--metrics", type=metric_list, default=PAPER_METRICS,
                   help=f"comma-separated (default: {','.join(PAPER_METRICS)}); psnr,ssim,piqe need no "
                        "weight files")
    p.add_argument("--lr-template", type=lr_template, default=None, metavar="TEMPLATE",
                   help="LR file name made from the image's name, e.g. '{}x4' pairs 0801x4.png with 0801.png "
                        "(default for the div2k layout: '{}x<scale>')")
    p.add_argument("--expect", action="append", type=parse_expect, default=[], metavar="SET=N",
                   help="the set must have N images (repeatable); otherwise exit 2 before anything starts")


def add_history_arguments(p: argparse.ArgumentParser) -> None:
    """The history and the regression gate: shared by ``evaluate`` and ``benchmark``."""
    p.add_argument("--history", default=None,
                   help="history Parquet to append to (default: $PATCHSCALER_HOME/history.parquet, else "
                        "~/.local/share/patchscaler/history.parquet; per-image scores go beside it in "
                        "history_images.parquet)")
    p.add_argument("--run-id", default=None, help="name of this run in the history (default: time + random)")
    p.add_argument("--fail-on-regression", action="store_true",
                   help="exit 3 when a metric's mean got worse than the baseline run's by more than its "
                        "tolerance; one JSON line on stdout lists the regressions and the images that moved")
    from eval.gate import DEFAULT_TOLERANCES

    defaults = ", ".join(f"{m}={t:g}" for m, t in DEFAULT_TOLERANCES.items())
    p.add_argument("--tolerance", type=tolerance_list, default=None, metavar="METRIC=VALUE,…",
                   help=f"absolute tolerances, e.g. musiq=0.5,psnr=0.05, overriding the defaults: {defaults}")
    p.add_argument("--baseline-run", default=None, metavar="RUN_ID",
                   help="compare with this run of the history (default: the previous run)")
    p.add_argument("--worst", type=int, default=5, help="worst and most-dropped images per set and metric in "
                                                        "the report")


def check_expected(counts: dict[str, int], expect: list[tuple[str, int]]) -> None:
    """``--expect SET=N``: a ``UsageError`` (one line) when a set has another number of images."""
    from jobs.checks import UsageError

    for name, n in expect:
        if name not in counts:
            raise UsageError(f"--expect {name}={n}: there is no --dataset {name}")
        if counts[name] != n:
            raise UsageError(f"--expect {name}={n}: dataset {name!r} has {counts[name]} images")


def print_pairs(name: str, entries: list[Any]) -> None:
    from eval.datasets import pair_counts

    c = pair_counts(entries)
    print(f"{name}: {c['images']} images, {c['with_hr']} with HR, {c['without_hr']} without", flush=True)


def history_uri(args: argparse.Namespace) -> str:
    from eval.history import default_history

    return args.history or default_history()


def check_baseline_run(args: argparse.Namespace, options: dict[str, Any]) -> None:
    """``--baseline-run`` must name a run of the history (checked before anything starts)."""
    from eval.history import read_history
    from jobs.checks import UsageError

    if args.baseline_run and args.baseline_run not in set(read_history(history_uri(args), options)["run_id"]):
        raise UsageError(f"--baseline-run {args.baseline_run}: no such run in the history "
                         f"{history_uri(args)}")

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
    add_history_arguments(p)
    p.add_argument("--method", default="patchscaler",
                   help="who made the --results images (another method's outputs: a name for its rows)")
    p.add_argument("--suffix", default="",
                   help="stripped from the result file names before matching, e.g. _out")
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
        urls = " ".join(f"{os.path.relpath(path, cache)} <- {url}" for found in absent.values()
                        for path, url in found)
        raise UsageError(f"metric weights missing from the metric cache {cache} ({files}); put them there "
                         f"(the folder is --metric-cache or ${CACHE_ENV}; nothing is downloaded at run time; "
                         f"download addresses: {urls}) or use {flag} {','.join(OFFLINE_METRICS)}, which need "
                         "no weights")
    try:
        check_weights(metrics, cache)
    except (MissingWeightsError, MissingDependencyError) as exc:
        raise UsageError(" ".join(str(exc).split())) from None


def record_run(results: Any, *, out: str, args: argparse.Namespace, run_id: str,
               maps: dict[Any, dict[str, str]], report: bool, options: dict[str, Any],
               info: Any = None) -> Any:
    """Write the tables of ``results`` (``eval.results.RESULT_SCHEMA`` rows) under ``out``, append the run
    to the history, check it against its baseline run, render the report (``report``) and print the
    summary; returns (summary frame, ``eval.gate.GateResult``)."""
    from eval.gate import check
    from eval.history import append_run, read_image_history
    from eval.report import render_report
    from eval.results import write_run

    timestamp = time.time()
    summary = write_run(results, out, options=options)
    uri = history_uri(args)
    hist = append_run(summary, results, uri, run_id=run_id, timestamp=timestamp, info=info, options=options)
    images = read_image_history(uri, options)
    gate = check(hist, images, run_id=run_id, baseline_run=args.baseline_run, tolerances=args.tolerance,
                 top=args.worst)
    if report:
        files = render_report(results=results, summary=summary, history=hist, out=out, maps=maps,
                              run_id=run_id, examples_per_dataset=args.examples, options=options,
                              image_history=images, gate=gate, worst=args.worst)
        print(f"report: {files.html}")
    print(f"history: {uri}")
    for r in summary.itertuples():
        print(json.dumps({"dataset": r.dataset, "method": r.method, "metric": r.metric, "mean": r.mean,
                          "std": r.std, "count": r.count, "failed": r.failed}))
    return summary, gate


def gate_exit(gate: Any, args: argparse.Namespace) -> int:
    """With ``--fail-on-regression``: print the gate's JSON line; :data:`REGRESSION_EXIT` if it failed."""
    if not args.fail_on_regression:
        return 0
    print(json.dumps(gate.record()), flush=True)
    return 0 if gate.passed else REGRESSION_EXIT


def run(args: argparse.Namespace) -> int:
    from eval.datasets import check_references, plan_scoring
    from eval.history import RunInfo, dataset_fingerprint
    from eval.metrics import get_spec, resolve_cache_dir
    from eval.results import new_run_id
    from eval.score import ScoreConfig, score_rows, stage_resources
    from jobs.checks import UsageError, check_exists, check_output, short
    from jobs.runtime import start_ray
    from pipeline.io import storage_options

    options = storage_options(args.s3_endpoint)
    check_metric_weights(args.metrics, args.metric_cache)  # before anything starts
    check_exists(args.results, options, what="--results")
    for name, root in args.dataset:
        check_exists(root, options, what=f"--dataset {name}")
    check_output(args.out, options, what="--out")
    check_baseline_run(args, options)
    cache = resolve_cache_dir(args.metric_cache)
    try:
        plan = plan_scoring(args.results, args.dataset, layout=args.dataset_layout, scale=args.scale,
                            options=options, lr_template=args.lr_template, suffix=args.suffix,
                            method=args.method)
        reference = [m for m in args.metrics if get_spec(m).needs_reference]
        for name, entries in plan.entries.items():
            print_pairs(name, entries)
            check_references(name, entries, reference)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(short(exc)) from None
    check_expected({n: len(e) for n, e in plan.entries.items()}, args.expect)
    for entry in plan.missing:
        print(json.dumps({"dataset": entry.dataset, "image_id": entry.key, "status": "missing",
                          "error": f"no upscaled image in {args.results}"}))
    if not plan.rows:
        raise UsageError(f"no upscaled images to score under {args.results}")

    start_ray(args.address, verbose=args.verbose)
    config = ScoreConfig(metrics=tuple(args.metrics), cache_dir=cache, seed=args.seed,
                         crop_border=args.scale if args.crop_border is None else args.crop_border,
                         actors=args.actors, gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size,
                         storage_options=options, size_slack=max(args.scale - 1, 0))
    results = score_rows(plan.rows, config)
    run_id = args.run_id or new_run_id(time.time())
    info = RunInfo(device=stage_resources(config)["device"], crop_border=config.crop_border, scale=args.scale,
                   seed=args.seed,
                   datasets={n: (dataset_fingerprint([(e.key, e.lr, e.hr) for e in es]), len(es))
                             for n, es in plan.entries.items()})
    summary, gate = record_run(results, out=args.out, args=args, run_id=run_id, maps=plan.maps,
                               report=not args.no_report, options=options, info=info)
    failed = int(summary["failed"].sum()) if not summary.empty else 0
    print(f"run {run_id}: {results['image_id'].nunique()} images scored, {failed} failed values, "
          f"{len(plan.missing)} missing results")
    return gate_exit(gate, args) or (1 if failed or plan.missing else 0)
