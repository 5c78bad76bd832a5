"""``patchscaler build-rtm --source NAME=DIR_OR_S3[:WEIGHT] ... --out DIR_OR_S3 --weights DIR``.

Rebuilds the Reference Texture Memory from texture sources: random 128×128 crops, encoded by the
checkpoint's autoencoder and texture classifier in a Ray Data actor pool, reduced by farthest point
sampling. ``--add-source`` extends an existing artifact instead (only the new crops are encoded). See
``rtm_builder/__init__.py``.
"""

from __future__ import annotations

import argparse
import json
import os

from jobs.defaults import DEMO_WEIGHTS
from rtm_builder import DEFAULT_CANDIDATES, DEFAULT_ENTRIES
from rtm_builder.sources import Source, check_unique, parse_source


def source_arg(text: str) -> Source:
    try:
        return parse_source(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--source", action="append", type=source_arg, metavar="NAME=DIR_OR_S3[:WEIGHT]",
                      help="a texture source (repeatable): build a new RTM from these sources")
    what.add_argument("--add-source", action="append", type=source_arg, metavar="NAME=DIR_OR_S3[:WEIGHT]",
                      help="a source to add to the RTM at --base (default --out), reusing its candidates")
    p.add_argument("--out", required=True, help="artifact folder or s3:// prefix")
    p.add_argument("--base", default=None, help="with --add-source: the artifact to extend (default --out)")
    p.add_argument("--weights", default=str(DEMO_WEIGHTS), help="checkpoint dir or s3:// prefix")
    p.add_argument("--autoencoder", default=None, help="separate SD-VAE weights (file or diffusers dir)")
    p.add_argument("--candidates", type=int, default=None,
                   help=f"random crops to encode (default {DEFAULT_CANDIDATES}; with --add-source: as many "
                        "per unit of weight as the stored pool has)")
    p.add_argument("--entries", type=int, default=DEFAULT_ENTRIES,
                   help="RTM size after farthest point sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of the crop plan")
    p.add_argument("--encode-actors", type=int, default=None, help="encoder pool size (default: GPUs or 1)")
    p.add_argument("--encode-batch", type=int, default=64, help="crops per encoder call")
    p.add_argument("--read-tasks", type=int, default=4, help="concurrent probe / crop tasks")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--gpus-per-actor", type=float, default=1.0)
    p.add_argument("--max-pixels", type=int, default=8192 * 8192, help="pixel limit per source image")
    p.add_argument("--per-class", type=int, default=8, help="contact sheet entries per texture class")
    p.add_argument("--no-contact-sheet", action="store_true")
    p.add_argument("--device", default="auto", help="auto (cuda if the cluster has GPUs), cpu, cuda")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on, e.g. HEAD:6379 (default: a private local Ray instance)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (MinIO, Ceph, ...)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--verbose", action="store_true", help="show Ray's logs and Ray Data's progress bars")


def run(args: argparse.Namespace) -> int:
    from jobs.checks import UsageError, check_checkpoint, check_exists, check_output, short
    from jobs.runtime import start_ray
    from pipeline.io import join, storage_options
    from rtm_builder.artifact import CANDIDATES_FILE
    from rtm_builder.build import BuildConfig, build_rtm

    if args.s3_endpoint:  # before ray.init, so that local workers (checkpoint loads) see it too
        os.environ.setdefault("AWS_ENDPOINT_URL", args.s3_endpoint)
    options = storage_options(args.s3_endpoint)
    try:
        sources = check_unique(args.add_source or args.source)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    flag = "--add-source" if args.add_source else "--source"
    for source in sources:
        check_exists(source.uri, options, what=f"{flag} {source.name}")
    if args.add_source:
        what = "--base" if args.base else "--out (the RTM to extend)"
        check_exists(args.base or args.out, options, what=what)
        # the candidate pool is what --add-source extends; the bundled demo RTM ships without it (16 MB)
        check_exists(join(args.base or args.out, CANDIDATES_FILE), options,
                     what=f"{what}: its candidate pool (rebuild it with --source to extend it)")
    check_checkpoint(args.weights, options)
    if args.autoencoder:
        check_exists(args.autoencoder, options, what="--autoencoder")
    check_output(args.out, options, what="--out")
    start_ray(args.address, verbose=args.verbose)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = not args.no_progress  # one overall bar
    cfg = BuildConfig(
        sources=sources, out=args.out, weights=args.weights, incremental=bool(args.add_source),
        base=args.base, candidates=args.candidates, entries=args.entries, seed=args.seed,
        autoencoder=args.autoencoder, device=args.device, encode_actors=args.encode_actors,
        encode_batch=args.encode_batch,
        read_tasks=args.read_tasks, cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
        max_pixels=args.max_pixels, contact_sheet=not args.no_contact_sheet, per_class=args.per_class,
        storage_options=options,
    )
    try:
        summary = build_rtm(cfg)
    except (FileNotFoundError, ValueError) as exc:  # e.g. no readable image in a source, a name clash
        raise UsageError(short(exc)) from None
    print(json.dumps(summary.to_dict(), indent=1))
    return 0
