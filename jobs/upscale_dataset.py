"""``patchscaler upscale-dataset --input DIR|s3://… --output DIR|s3://…``: the distributed ×4 pipeline.

Runs on a local Ray instance by default, or on an existing cluster with ``--address``. Re-running the
same command resumes: finished images (ok manifest row and output present) are skipped. With
``--score psnr,piqe,…`` the same pass also scores every output with IQA metrics (``OUTPUT/scores.parquet``);
with ``--maps`` it writes each image's group map (``OUTPUT/_maps/``). See ``docs/pipeline.md`` and
``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import os
import posixpath
from typing import Any

from jobs.defaults import DEMO_RTM, DEMO_WEIGHTS

GROUPS = ("simple", "medium", "hard")


def parse_dit_actors(text: str) -> dict[str, int] | int | None:
    """``auto`` -> None; ``6`` -> 6 in all (split by work); ``simple=1,medium=2,hard=3`` -> per group."""
    if text == "auto":
        return None
    if text.isdigit():
        return int(text)
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in GROUPS or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected auto, N or simple=N,medium=N,hard=N; got {text!r}")
        sizes[name.strip()] = int(value)
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    from jobs.evaluate import metric_list

    p.add_argument("--input", required=True, help="folder, file or s3:// prefix of LR images")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix (manifest included)")
    p.add_argument("--score", type=metric_list, default=None, metavar="METRICS",
                   help="also score every output with these IQA metrics (comma-separated, e.g. musiq,piqe) "
                        "in the same pass: OUTPUT/scores.parquet")
    p.add_argument("--score-hr", default=None, metavar="DIR",
                   help="HR images, paired with the inputs by file stem (_HR/_LRn suffixes ignored), for "
                        "the full-reference metrics (psnr, ssim, lpips)")
    p.add_argument("--maps", action="store_true", help="write each image's group map to OUTPUT/_maps/")
    add_pipeline_arguments(p)


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """The pipeline's options (shared with ``patchscaler benchmark``)."""
    p.add_argument("--weights", default=str(DEMO_WEIGHTS), help="checkpoint dir or s3:// prefix")
    p.add_argument("--rtm", default=str(DEMO_RTM), help="RTM artifact dir or s3:// prefix")
    p.add_argument("--autoencoder", default=None, help="separate SD-VAE weights (file or diffusers dir)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (MinIO, Ceph, ...)")
    p.add_argument("--format", dest="fmt", choices=["png", "jpeg", "webp"], default="png")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="LR pixel limit per image")
    p.add_argument("--seed", type=int, default=0, help="noise seed of every image (as `upscale --seed`)")
    p.add_argument("--mode", choices=["adaptive", "uniform"], default=None, help="override sampling mode")
    p.add_argument("--fused", action="store_true", help="one Patch-DiT pool running all groups in one loop")
    p.add_argument("--window", type=int, default=64, help="images per bounded execution window")
    p.add_argument("--grm-actors", type=int, default=1)
    p.add_argument("--dit-actors", type=parse_dit_actors, default=None,
                   help="auto | N (split by work) | simple=N,medium=N,hard=N")
    p.add_argument("--assemble-actors", type=int, default=1)
    p.add_argument("--decode-tasks", type=int, default=4, help="concurrent read/decode tasks")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default: fit all actors on the GPUs")
    p.add_argument("--cpus-per-actor", type=float, default=None)
    p.add_argument("--grm-batch", type=int, default=4,
                   help="images per GRM call; their patches travel as one block through the pools")
    p.add_argument("--device", default="auto", help="auto (cuda if the cluster has GPUs), cpu, cuda")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="inference precision of the model actors; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--overwrite", action="store_true", help="redo every image, ignoring the manifest")
    p.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bars")
    p.add_argument("--metric-cache", default=None,
                   help="folder of IQA metric weights (default: $PATCHSCALER_IQA_CACHE, else torch hub's)")
    p.add_argument("--score-actors", type=int, default=1, help="IQA scoring actors")
    p.add_argument("--score-batch", type=int, default=4, help="images per scoring call")


def score_config(args: argparse.Namespace, metrics: tuple[str, ...], options: dict[str, Any]) -> Any:
    """The ``eval.score.ScoreConfig`` of the scoring pool (resources: see ``pipeline/build.py``)."""
    from eval.score import ScoreConfig

    return ScoreConfig(metrics=tuple(metrics), cache_dir=args.metric_cache, seed=args.seed,
                       actors=args.score_actors, batch_size=args.score_batch, storage_options=options)


def hr_pairs(sources: list[str], input_root: str, hr_dir: str, options: dict[str, Any]
             ) -> dict[str, tuple[str, str]]:
    """source -> (image id, HR URI) for the inputs whose stem (without ``_LRn``) names an HR image of
    ``hr_dir`` (stem without ``_HR``); the image id is the input's path without extension and suffix."""
    from eval.datasets import is_image, split_key
    from pipeline.io import list_files, normalize_root, relative

    hrs = {}
    for uri in list_files(normalize_root(hr_dir), options):
        stem = posixpath.splitext(posixpath.basename(uri.replace(os.sep, "/")))[0]
        if is_image(uri):
            hrs[stem[:-3] if stem.upper().endswith("_HR") else stem] = uri
    pairs = {}
    for source in sources:
        key = split_key(relative(input_root, source))[0]
        if posixpath.basename(key) in hrs:
            pairs[source] = (key, hrs[posixpath.basename(key)])
    return pairs


def start_ray(args: argparse.Namespace) -> str:
    """Connect to (or start) Ray; returns the device the model actors use."""
    import ray

    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = not args.no_progress
    if args.device == "auto":  # the cluster's GPUs count, not the driver's (a head node may have none)
        return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    return args.device


def pipeline_config(args: argparse.Namespace, *, input: str, output: str, device: str,
                    options: dict[str, Any]) -> Any:
    """The ``PipelineConfig`` of the pipeline options in ``args`` (``add_pipeline_arguments``)."""
    from pipeline.build import PipelineConfig

    return PipelineConfig(
        input=input, output=output, weights=args.weights, rtm=args.rtm,
        autoencoder=args.autoencoder, device=device, fmt=args.fmt, quality=args.quality,
        max_pixels=args.max_pixels, seed=args.seed, mode=args.mode, fused=args.fused, window=args.window,
        grm_actors=args.grm_actors, dit_actors=args.dit_actors, assemble_actors=args.assemble_actors,
        decode_tasks=args.decode_tasks, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, grm_batch=args.grm_batch, storage_options=options,
        overwrite=args.overwrite, precision=None if args.precision == "auto" else args.precision,
    )


def run(args: argparse.Namespace) -> int:
    from jobs.evaluate import weights_missing
    from pipeline.io import normalize_root, storage_options
    from pipeline.runner import plan_inputs, run_pipeline

    if args.score and weights_missing(args.score, args.metric_cache):  # before anything starts
        return 2
    options = storage_options(args.s3_endpoint)
    device = start_ray(args)
    cfg = pipeline_config(args, input=args.input, output=args.output, device=device, options=options)
    cfg.maps = args.maps
    if args.score:
        cfg.score = score_config(args, args.score, options)
        if args.score_hr:
            sources = plan_inputs(cfg)[0]
            cfg.score_pairs = hr_pairs(sources, normalize_root(args.input), args.score_hr, options)
    summary = run_pipeline(cfg)
    return 1 if summary.failed else 0
