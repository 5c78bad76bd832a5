"""``patchscaler prepare-data --input DIR_OR_S3 --out DIR_OR_S3``: sub-images for the trainers, cut once.

Every image under ``--input`` becomes ``--size`` x ``--size`` PNG sub-images at stride ``--step`` (BasicSR's
``extract_subimages.py``: 480 / 240 for DIV2K and LSDIR) under ``--out``, listed in
``--out/manifest.parquet`` with the inputs that could not be read. Pass ``--out`` as ``--data`` to the
``train-*`` commands (with ``--crops-per-image 1``); run once per source to keep every source drawn equally
often. See ``trainer/prepare.py``.
"""

from __future__ import annotations

import argparse
import json
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="HR image folder or s3:// prefix (searched recursively)")
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--size", type=int, default=480, help="sub-image side in pixels")
    p.add_argument("--step", type=int, default=240, help="stride between sub-images")
    p.add_argument("--thresh-size", type=int, default=0,
                   help="add a last window at an edge when more than this many pixels would be left")
    p.add_argument("--compression", type=int, default=3, choices=range(10), metavar="0-9",
                   help="PNG compression level")
    p.add_argument("--tasks", type=int, default=4, help="concurrent cutting workers")
    p.add_argument("--cpus-per-task", type=float, default=1.0)
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on, e.g. HEAD:6379 (default: a private local Ray instance)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (MinIO, Ceph, ...)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress line")
    p.add_argument("--verbose", action="store_true", help="show Ray's logs and Ray Data's progress bars")


def run(args: argparse.Namespace) -> int:
    from jobs.checks import UsageError, check_exists, check_output, check_positive, short
    from jobs.runtime import start_ray
    from pipeline.io import normalize_root, storage_options
    from trainer.prepare import PrepareConfig, prepare_data

    if args.s3_endpoint:
        os.environ.setdefault("AWS_ENDPOINT_URL", args.s3_endpoint)
    options = storage_options(args.s3_endpoint)
    for name in ("size", "step", "tasks"):
        check_positive("--" + name, getattr(args, name))
    source, out = normalize_root(args.input), normalize_root(args.out)
    check_exists(source, options, what="--input")
    check_output(out, options, what="--out")
    start_ray(args.address, verbose=args.verbose)
    cfg = PrepareConfig(input=source, out=out, size=args.size, step=args.step, thresh_size=args.thresh_size,
                        compression=args.compression, tasks=args.tasks, cpus_per_task=args.cpus_per_task,
                        progress=not args.no_progress, storage_options=options)
    try:
        summary = prepare_data(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(short(exc)) from None
    print(json.dumps(summary.to_dict(), indent=1))
    return 1 if summary.failed else 0
