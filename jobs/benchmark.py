"""``patchscaler benchmark --dataset NAME=DIR … --weights … --rtm … --out OUT``: upscale + score + report.

The nightly job. For each evaluation set (any layout of ``eval.datasets``), its LR images go through the
``upscale-dataset`` pipeline into ``OUT/results/NAME``, scored with the IQA metrics in the same pass (the
full-reference ones against the set's HR images) and with their group maps written. Then the scores of
all sets are written under ``OUT`` (``scores.parquet``, ``summary.parquet``, ``summary.csv``), appended to
the history (``--history``, by default ``$PATCHSCALER_HOME/history.parquet``, so that dated ``--out``
folders keep one history; ``eval/history.py``) with what the run was made with, and rendered as the report
(``OUT/report.html``), as ``patchscaler evaluate`` does. ``--baseline bicubic`` scores bicubic upscales of
the same LR images in the same run; ``--fail-on-regression`` exits 3 when a metric got worse than the
baseline run by more than its tolerance (``eval/gate.py``). See ``docs/evaluation.md``.

Every image is upscaled again on every run (the run measures the weights it is given); ``--resume``
continues an interrupted run into the same ``--out``, keeping the images and scores it finished.
"""

from __future__ import annotations

import argparse
import time

from jobs.evaluate import add_dataset_arguments, add_history_arguments, parse_dataset
from jobs.upscale_dataset import add_pipeline_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", action="append", type=parse_dataset, required=True, metavar="NAME=DIR",
                   help="an evaluation set (repeatable); names lsdir*/realsr*/realset* are compared with the "
                        "paper's Tables 1-2")
    p.add_argument("--out", required=True,
                   help="output folder or s3:// prefix: results/NAME/ (images, manifest, scores), tables, "
                        "report")
    add_dataset_arguments(p)
    add_history_arguments(p)
    p.add_argument("--baseline", action="append", choices=("bicubic",), default=[],
                   help="also upscale the LR images with this method and score them in the same run "
                        "(method column; tells metric-stack drift from model drift)")
    p.add_argument("--examples", type=int, default=2, help="example crops and maps per dataset in the report")
    add_pipeline_arguments(p)
    resume_pair(p)


def resume_pair(p: argparse.ArgumentParser) -> None:
    """``--overwrite`` (the default: a night measures the weights it is given) or ``--resume``, never both."""
    (overwrite,) = [a for a in p._actions if a.dest == "overwrite"]
    overwrite.default = True
    overwrite.help = "redo every image (a night measures the weights it is given)"
    pair = p.add_mutually_exclusive_group()
    pair._group_actions.append(overwrite)
    pair.add_argument("--resume", dest="overwrite", action="store_false", default=argparse.SUPPRESS,
                      help="instead keep the images (and their scores) that an interrupted run into this "
                           "--out finished")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from eval.baselines import write_baseline
    from eval.datasets import check_references, list_results, load_dataset, match_results
    from eval.history import RunInfo, dataset_fingerprint, local_sha256
    from eval.metrics import get_spec
    from eval.results import RESULT_SCHEMA, conform, new_run_id, read_table
    from eval.score import score_rows
    from jobs.checks import UsageError, check_exists, check_output, short
    from jobs.evaluate import (
        check_baseline_run,
        check_expected,
        check_metric_weights,
        gate_exit,
        print_pairs,
        record_run,
    )
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
    check_baseline_run(args, options)
    reference = [m for m in args.metrics if get_spec(m).needs_reference]
    try:
        sets = [(name, normalize_root(root),
                 load_dataset(name, root, layout=args.dataset_layout, scale=args.scale, options=options,
                              lr_template=args.lr_template))
                for name, root in args.dataset]
        for name, _, entries in sets:
            print_pairs(name, entries)
            check_references(name, entries, reference)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(short(exc)) from None
    check_expected({name: len(entries) for name, _, entries in sets}, args.expect)
    jobs = []
    for name, root, entries in sets:
        cfg = pipeline_config(args, input=root, output=join(args.out, "results", name), device=args.device,
                              options=options)
        cfg.sources, cfg.maps = [e.lr for e in entries], True
        cfg.score = score_config(args, args.metrics, options)
        cfg.score.crop_border = args.scale
        cfg.score.size_slack = max(args.scale - 1, 0)
        cfg.score_dataset, cfg.score_pairs = name, {e.lr: (e.key, e.hr) for e in entries}
        jobs.append((name, root, entries, cfg, plan_job(cfg)))
    assets, device = None, args.device
    if any(plan.todo for *_, plan in jobs):
        assets = load_assets(args)
    if any(plan.todo for *_, plan in jobs) or args.baseline:  # the baselines are scored on Ray too
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
    for method in args.baseline:  # the same LR images, upscaled by a fixed method, scored the same way
        print(f"== baseline {method}: {sum(len(e) for _, _, e in sets)} images", flush=True)
        rows = [r for name, _, entries in sets
                for r in write_baseline(method, entries, args.out, dataset=name, scale=args.scale,
                                        options=options)]
        frames.append(score_rows(rows, jobs[0][3].score))
    results = conform(pd.concat(frames, ignore_index=True), RESULT_SCHEMA)
    run_id = args.run_id or new_run_id(time.time())
    info = RunInfo(device=device, weights_uri=args.weights, weights_sha256=local_sha256(args.weights),
                   rtm_uri=args.rtm, rtm_sha256=local_sha256(args.rtm), crop_border=args.scale,
                   scale=args.scale, seed=args.seed,
                   datasets={name: (dataset_fingerprint([(e.key, e.lr, e.hr) for e in entries]), len(entries))
                             for name, _, entries in sets})
    summary, gate = record_run(results, out=args.out, args=args, run_id=run_id, maps=maps, report=True,
                               options=options, info=info)
    bad_values = int(summary["failed"].sum()) if not summary.empty else 0
    print(f"run {run_id}: {results['image_id'].nunique()} images scored, {failed} failed images, "
          f"{bad_values} failed values")
    return gate_exit(gate, args) or (1 if failed or bad_values else 0)
