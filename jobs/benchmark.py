"""``patchscaler benchmark --dataset NAME=DIR … --weights … --rtm … --out OUT``: upscale + score + report.

The nightly job. For each evaluation set (any layout of ``eval.datasets``), its LR images go through the
``upscale-dataset`` pipeline into ``OUT/results/NAME``, scored with the IQA metrics in the same pass (the
full-reference ones against the set's HR images) and with their group maps written. Then the scores of
all sets are written under ``OUT`` (``scores.parquet``, ``summary.parquet``), appended to the history
(``OUT/history.parquet`` or ``--history``) so that nights can be compared, and rendered as the report
(``OUT/report.html``), as ``patchscaler evaluate`` does. See ``docs/evaluation.md``.

Every image is upscaled again on every run (the run measures the weights it is given); ``--resume``
continues an interrupted run into the same ``--out``, keeping the images and scores it finished.
"""

from __future__ import annotations

import argparse
import time

from jobs.evaluate import add_dataset_arguments, parse_dataset
from jobs.upscale_dataset import add_pipeline_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", action="append", type=parse_dataset, required=True, metavar="NAME=DIR",
                   help="an evaluation set (repeatable); names lsdir*/realsr*/realset* are compared with the "
                        "paper's Tables 1-2")
    p.add_argument("--out", required=True,
                   help="output folder or s3:// prefix: results/NAME/ (images, manifest, scores), tables, "
                        "report")
    add_dataset_arguments(p)
    p.add_argument("--history", default=None,
                   help="history Parquet to append to (default: OUT/history.parquet)")
    p.add_argument("--run-id", default=None, help="name of this run in the history (default: time + random)")
    p.add_argument("--examples", type=int, default=2, help="example crops and maps per dataset in the report")
    add_pipeline_arguments(p)
    p.set_defaults(overwrite=True)
    p.add_argument("--resume", dest="overwrite", action="store_false",
                   help="keep the images (and their scores) that an interrupted run into this --out finished")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from eval.datasets import list_results, load_dataset, match_results
    from eval.results import RESULT_SCHEMA, conform, new_run_id, read_table
    from jobs.checks import UsageError, check_exists, check_output, short
    from jobs.evaluate import check_metric_weights, record_run
    from jobs.upscale_dataset import (
        check_pipeline_args,
        load_assets,
        pipeline_config,
        score_config,
        start_ray,
    )
    from pipeline.io import join, normalize_root, storage_options
    from pipeline.runner import plan_job, run_pipeline
    from pipeline.scores import SCORES_FILE

    check_metric_weights(args.metrics, args.metric_cache)  # before anything starts
    options = storage_options(args.s3_endpoint)
    for name, root in args.dataset:
        check_exists(root, options, what=f"--dataset {name}")
    check_output(args.out, options, what="--out")
    check_pipeline_args(args, options)
    try:
        sets = [(name, normalize_root(root),
                 load_dataset(name, root, layout=args.dataset_layout, scale=args.scale, options=options))
                for name, root in args.dataset]
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(short(exc)) from None
    jobs = []
    for name, root, entries in sets:
        cfg = pipeline_config(args, input=root, output=join(args.out, "results", name), device=args.device,
                              options=options)
        cfg.sources, cfg.maps = [e.lr for e in entries], True
        cfg.score = score_config(args, args.metrics, options)
        cfg.score.crop_border = args.scale
        cfg.score_dataset, cfg.score_pairs = name, {e.lr: (e.key, e.hr) for e in entries}
        jobs.append((name, root, entries, cfg, plan_job(cfg)))
    assets, device = None, args.device
    if any(plan.todo for *_, plan in jobs):
        assets = load_assets(args)
        device = start_ray(args)
    frames, maps, failed = [], {}, 0
    for name, root, entries, cfg, plan in jobs:
        print(f"== {name}: {len(entries)} images from {root} -> {cfg.output}", flush=True)
        cfg.device = device
        summary = run_pipeline(cfg, plan=plan, assets=assets, progress=not args.no_progress)
        failed += summary.failed + summary.kept + summary.unrecorded
        frames.append(read_table(join(cfg.output, SCORES_FILE), RESULT_SCHEMA, options))
        matched, _ = match_results(entries, list_results(cfg.output, options))
        maps.update({(name, e.key): m for e, _, m in matched if m})
    results = conform(pd.concat(frames, ignore_index=True), RESULT_SCHEMA)
    run_id = args.run_id or new_run_id(time.time())
    summary = record_run(results, out=args.out, history=args.history, run_id=run_id, maps=maps,
                         examples=args.examples, report=True, options=options)
    bad_values = int(summary["failed"].sum()) if not summary.empty else 0
    print(f"run {run_id}: {results['image_id'].nunique()} images scored, {failed} failed images, "
          f"{bad_values} failed values")
    return 1 if failed or bad_values else 0
