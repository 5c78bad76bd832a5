"""``patchscaler upscale-dataset --input DIR|s3://… --output DIR|s3://…``: the distributed ×4 pipeline.

Runs on a private local Ray instance by default, or on an existing cluster with ``--address``. Re-running
the same command resumes: finished images (ok manifest row and output present) are skipped, and a job
with nothing left to do does not start Ray. With ``--score psnr,piqe,…`` the same pass also scores every
output with IQA metrics (``OUTPUT/scores.parquet``); with ``--maps`` it writes each image's group map
(``OUTPUT/_maps/``). See ``docs/pipeline.md`` and ``docs/evaluation.md``.
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
    if text.isdigit() and int(text) > 0:
        return int(text)
    sizes: dict[str, int] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in GROUPS or not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(f"expected auto, N or simple=N,medium=N,hard=N; got {text!r}")
        sizes[name.strip()] = int(value)
    return sizes


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def quality(text: str) -> int:
    value = positive_int(text)
    if value > 100:
        raise argparse.ArgumentTypeError(f"must be 1-100, got {value}")
    return value


class Pixels(int):
    """A pixel count that prints as ``WxH`` when it is a square (``4096x4096``)."""

    def __str__(self) -> str:
        side = round(self**0.5)
        return f"{side}x{side}" if side * side == self else str(int(self))


def pixel_limit(text: str) -> Pixels:
    """``4096x4096`` (W×H) or a pixel count."""
    w, sep, h = text.lower().partition("x")
    try:
        value = int(w) * int(h) if sep else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH (e.g. 4096x4096) or a pixel count, got {text!r}") \
            from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 pixel, got {text!r}")
    return Pixels(value)


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
    p.add_argument("--retry-failed", action="store_true",
                   help="also redo images that failed for good before (undecodable or too large files); "
                        "failed reads and writes are always retried")
    add_pipeline_arguments(p)


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    """The pipeline's options (shared with ``patchscaler benchmark``)."""
    p.add_argument("--weights", default=str(DEMO_WEIGHTS), help="checkpoint folder or s3:// prefix")
    p.add_argument("--rtm", default=str(DEMO_RTM), help="RTM artifact folder or s3:// prefix")
    p.add_argument("--autoencoder", default=None, help="separate SD-VAE weights (file or diffusers folder)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on, e.g. HEAD:6379 (default: a private local Ray instance)")
    p.add_argument("--s3-endpoint", default=None, help="S3-compatible endpoint URL (MinIO, Ceph, ...)")
    p.add_argument("--format", dest="fmt", choices=["png", "jpeg", "webp"], default="png",
                   help="output image format")
    p.add_argument("--quality", type=quality, default=95, help="JPEG/WebP quality (1-100)")
    p.add_argument("--max-pixels", type=pixel_limit, default=Pixels(4096 * 4096), metavar="WxH",
                   help="largest input image (W x H, or a pixel count); larger ones fail")
    p.add_argument("--seed", type=int, default=0, help="noise seed of every image (as `upscale --seed`)")
    p.add_argument("--mode", choices=["adaptive", "uniform"], default=None,
                   help="sampling mode (default: the checkpoint's)")
    p.add_argument("--refine", choices=["diffusion", "none"], default="diffusion",
                   help="diffusion: Patch-DiT sampling (PGS); none: the decoded GRM output, no sampling "
                        "(fast, no Patch-DiT actors, no generated texture)")
    p.add_argument("--color-fix", choices=["wavelet", "adain", "none"], default=None,
                   help="colour correction against the bicubic image (default: wavelet, chosen by "
                        "measurement: docs/model.md)")
    p.add_argument("--device", default="auto", help="auto (cuda if the cluster has GPUs), cpu, cuda")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="inference precision of the model actors; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--overwrite", action="store_true", help="redo every image, ignoring the manifest")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's logs and Ray Data's per-stage progress bars")
    p.add_argument("--metric-cache", default=None,
                   help="folder of IQA metric weights (default: $PATCHSCALER_IQA_CACHE, else torch hub's)")
    g = p.add_argument_group("layout and resources (defaults fit the job to the cluster)")
    g.add_argument("--layout", choices=["auto", "single", "pools", "fused"], default="auto",
                   help="single: one actor per image does every step; pools: read/decode tasks, GRM, one "
                        "Patch-DiT pool per group, assemble; fused: pools with one Patch-DiT pool; auto: "
                        "single on CPU and for small GPU jobs, else pools")
    g.add_argument("--fused", action="store_true", help="same as --layout fused")
    g.add_argument("--actors", type=positive_int, default=None,
                   help="actors of the single layout (default: one per CPU, or per GPU, at most one per "
                        "image)")
    g.add_argument("--grm-actors", type=positive_int, default=None, help="GRM actors (default: 1 on CPU)")
    g.add_argument("--dit-actors", type=parse_dit_actors, default=None,
                   help="Patch-DiT actors: auto | N (split by work) | simple=N,medium=N,hard=N")
    g.add_argument("--assemble-actors", type=positive_int, default=None,
                   help="assemble actors (default: 1 on CPU)")
    g.add_argument("--decode-tasks", type=positive_int, default=4, help="concurrent read/decode tasks")
    g.add_argument("--gpus-per-actor", type=positive_float, default=None,
                   help="GPU share of each model actor (default: the actors share the GPUs evenly)")
    g.add_argument("--cpus-per-actor", type=positive_float, default=None,
                   help="CPUs of each model actor (default: the actors share the CPUs evenly)")
    g.add_argument("--grm-batch", type=positive_int, default=4,
                   help="images per model call; their patches are sampled together")
    g.add_argument("--score-actors", type=positive_int, default=1, help="IQA scoring actors")
    g.add_argument("--score-batch", type=positive_int, default=4, help="images per scoring call")
    g.add_argument("--window", type=positive_int, default=64,
                   help="at most this many images per manifest part (the resume record)")
    g.add_argument("--commit-seconds", type=positive_float, default=2.0,
                   help="finished images are recorded in the manifest at least this often, so a killed "
                        "job redoes only the images in flight")


def score_config(args: argparse.Namespace, metrics: tuple[str, ...], options: dict[str, Any]) -> Any:
    """The ``eval.score.ScoreConfig`` of the scoring pool (resources: see ``pipeline/plan.py``)."""
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


def check_pipeline_args(args: argparse.Namespace, options: dict[str, Any]) -> None:
    """Everything about the model that can be checked before Ray starts (``jobs.checks``)."""
    from jobs.checks import check_checkpoint, check_exists, check_rtm

    check_checkpoint(args.weights, options)
    check_rtm(args.rtm, options)
    if args.autoencoder:
        check_exists(args.autoencoder, options, what="--autoencoder")


def load_assets(args: argparse.Namespace) -> Any:
    """The checkpoint and RTM, loaded (strictly) in the driver before Ray starts."""
    from jobs.checks import loaded
    from patchscaler.weights import load_checkpoint, load_rtm
    from pipeline.shared import LoadedAssets

    model = loaded("--weights", args.weights, load_checkpoint, args.weights, autoencoder=args.autoencoder)
    memory, manifest = loaded("--rtm", args.rtm, load_rtm, args.rtm)
    return LoadedAssets(model=model, rtm_keys=memory.keys.numpy(), rtm_values=memory.values.numpy(),
                        rtm_manifest=manifest)


def start_ray(args: argparse.Namespace) -> str:
    """Start a private local Ray (or connect to ``--address``); returns the device of the model actors."""
    import ray

    from jobs.runtime import start_ray as start

    start(args.address, verbose=args.verbose)
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
        max_pixels=int(args.max_pixels), seed=args.seed, mode=args.mode, layout=args.layout,
        refine=args.refine, color_fix=args.color_fix,
        fused=args.fused, window=args.window, commit_seconds=args.commit_seconds, actors=args.actors,
        grm_actors=args.grm_actors, dit_actors=args.dit_actors, assemble_actors=args.assemble_actors,
        decode_tasks=args.decode_tasks, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, grm_batch=args.grm_batch, storage_options=options,
        overwrite=args.overwrite, retry_failed=getattr(args, "retry_failed", False),
        precision=None if args.precision == "auto" else args.precision,
    )


def exit_code(summary: Any) -> int:
    return 0 if summary.all_ok else 1


def run(args: argparse.Namespace) -> int:
    from jobs.checks import UsageError, check_exists, check_output, short
    from jobs.evaluate import check_metric_weights
    from pipeline.io import normalize_root, storage_options
    from pipeline.runner import plan_inputs, plan_job, run_pipeline

    if args.score:
        check_metric_weights(args.score, args.metric_cache, flag="--score")
    options = storage_options(args.s3_endpoint)
    check_exists(args.input, options, what="--input")
    check_output(args.output, options)
    if args.score_hr:
        check_exists(args.score_hr, options, what="--score-hr")
    check_pipeline_args(args, options)
    cfg = pipeline_config(args, input=args.input, output=args.output, device=args.device, options=options)
    cfg.maps = args.maps
    try:
        if args.score:
            cfg.score = score_config(args, args.score, options)
            if args.score_hr:
                sources = plan_inputs(cfg)[0]
                cfg.score_pairs = hr_pairs(sources, normalize_root(args.input), args.score_hr, options)
        plan = plan_job(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(short(exc)) from None
    if not plan.todo:  # nothing to do: no Ray, no model
        return exit_code(run_pipeline(cfg, plan=plan))
    assets, cfg.device = load_assets_starting_ray(args)
    return exit_code(run_pipeline(cfg, plan=plan, assets=assets, progress=not args.no_progress))


def load_assets_starting_ray(args: argparse.Namespace) -> tuple[Any, str]:
    """``load_assets`` in a thread while Ray starts (both take seconds: torch and diffusers imports, Ray's
    processes); returns the assets and the device. The checks before already caught missing files."""
    import threading

    result: dict[str, Any] = {}

    def load() -> None:
        try:
            result["assets"] = load_assets(args)
        except BaseException as exc:
            result["error"] = exc

    loader = threading.Thread(target=load, name="load-weights", daemon=True)
    loader.start()
    device = start_ray(args)
    loader.join()
    if "error" in result:
        raise result["error"]
    return result["assets"], device
