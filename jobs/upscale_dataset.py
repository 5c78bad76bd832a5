"""``patchscaler upscale-dataset --input DIR|s3://… --output DIR|s3://…``: the distributed ×4 pipeline.

Runs on a private local Ray instance by default, or on an existing cluster with ``--address``. Re-running
the same command resumes: finished images (ok manifest row and output present) are skipped, and a job
with nothing left to do does not start Ray. With ``--score psnr,piqe,…`` the same pass also scores every
output with IQA metrics (``OUTPUT/scores.parquet``); with ``--maps`` it writes each image's group map
(``OUTPUT/_maps/``). ``--input-list`` names the inputs instead of a listing of ``--input``; ``--dry-run``
prints what the job would do and cost (``pipeline/jobplan.py``) and runs no model. See
``docs/pipeline.md`` and ``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import os
import posixpath
from typing import Any

from jobs.defaults import DEMO_RTM, DEMO_WEIGHTS, add_refine_arguments

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


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def error_rate(text: str) -> float:
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
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
    p.add_argument("--input-list", default=None, metavar="FILE",
                   help="the inputs, instead of listing --input: a text file (one path or URI a line, "
                        "relative ones under --input), or a .csv/.parquet file with a key column (an S3 "
                        "Inventory report: bucket,key); local or s3://")
    p.add_argument("--dry-run", action="store_true",
                   help="count inputs, done and to do, pixels, patches, patch-steps and GPU-hours, and "
                        "print the resource plan; runs no model")
    p.add_argument("--tflops", type=positive_float, default=400.0,
                   help="--dry-run: sustained TFLOP/s of one GPU for the GPU-hour estimate")
    p.add_argument("--dry-run-sample", type=positive_int, default=1000, metavar="N",
                   help="--dry-run: read the headers of at most N inputs (evenly spaced) and extrapolate")
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
    add_refine_arguments(p, pipeline=True)
    p.add_argument("--device", default="auto", help="auto (cuda if the cluster has GPUs), cpu, cuda")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="inference precision of the model actors; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--overwrite", action="store_true", help="redo every image, ignoring the manifest")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's logs and Ray Data's per-stage progress bars")
    p.add_argument("--metric-cache", default=None,
                   help="folder of IQA metric weights (default: $PATCHSCALER_IQA_CACHE, else torch hub's)")
    p.add_argument("--shared-fs", action="store_true",
                   help="the local paths (--input, --output, --metric-cache, --score-hr) are on a filesystem "
                        "every node of the --address cluster mounts at the same path")
    p.add_argument("--stall-minutes", type=non_negative_float, default=30.0,
                   help="stop the job (exit 1, the manifest kept) when no image finished for this long; "
                        "0: never")
    p.add_argument("--max-error-rate", type=error_rate, default=0.5,
                   help="stop the job (exit 1) when more than this share of its first 100 images failed "
                        "(wrong weights or options); 1: never")
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
    g.add_argument("--decode-tasks", type=positive_int, default=None,
                   help="at most this many concurrent read/decode tasks (default: as many as the CPUs that "
                        "the model actors leave free hold)")
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
        stall_minutes=args.stall_minutes, max_error_rate=args.max_error_rate,
    )


def exit_code(summary: Any) -> int:
    return 0 if summary.all_ok else 1


def run(args: argparse.Namespace) -> int:
    from jobs.checks import UsageError, check_exists, check_output, short
    from jobs.evaluate import check_metric_weights
    from pipeline.io import normalize_root, storage_options
    from pipeline.jobplan import list_sources
    from pipeline.runner import plan_job, run_pipeline

    if args.score:
        check_metric_weights(args.score, args.metric_cache, flag="--score")
    options = storage_options(args.s3_endpoint)
    check_exists(args.input, options, what="--input")
    if args.input_list:
        check_exists(args.input_list, options, what="--input-list")
    check_output(args.output, options)
    if args.score_hr:
        check_exists(args.score_hr, options, what="--score-hr")
    check_pipeline_args(args, options)
    cfg = pipeline_config(args, input=args.input, output=args.output, device=args.device, options=options)
    cfg.maps, cfg.input_list = args.maps, args.input_list
    try:
        if args.score:
            cfg.score = score_config(args, args.score, options)
            if args.score_hr:
                cfg.score_pairs = hr_pairs(list_sources(cfg), normalize_root(args.input), args.score_hr,
                                           options)
        if args.dry_run:
            return dry_run(args, cfg)
        plan = plan_job(cfg)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(short(exc)) from None
    if not plan.todo:  # nothing to do: no Ray, no model
        return exit_code(run_pipeline(cfg, plan=plan))
    assets, cfg.device = load_assets_starting_ray(args)
    check_cluster_storage(args)
    return exit_code(run_pipeline(cfg, plan=plan, assets=assets, progress=not args.no_progress))


def check_cluster_storage(args: argparse.Namespace) -> None:
    """On a cluster (``--address``) of more than one node, the paths the workers read or write must be
    object-store URLs or on a shared filesystem (``--shared-fs``); ``--weights``, ``--rtm`` and
    ``--autoencoder`` are read by the driver only (``pipeline/shared.py``)."""
    import ray

    from jobs.checks import check_shared_storage

    if not args.address:
        return
    paths = {"--input": args.input, "--output": args.output}
    if args.score:
        from eval.metrics import resolve_cache_dir

        paths["--metric-cache"] = str(resolve_cache_dir(args.metric_cache))
        paths["--score-hr"] = args.score_hr
    nodes = sum(bool(n.get("Alive")) for n in ray.nodes())
    check_shared_storage(paths, nodes=nodes, shared_fs=args.shared_fs)


def plan_nodes(args: argparse.Namespace) -> list[Any]:
    """The nodes to plan for: the cluster's with ``--address`` (connecting starts no actor), else this
    machine's CPUs and GPUs, as a private local Ray would see them."""
    from pipeline.plan import Node

    if args.address:
        from jobs.runtime import start_ray as start
        from pipeline.build import cluster_nodes

        start(args.address, verbose=args.verbose)
        return cluster_nodes()
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # no usable CUDA here
        gpus = 0
    return [Node(cpus=float(os.cpu_count() or 1), gpus=gpus)]


def dry_run(args: argparse.Namespace, cfg: Any) -> int:
    """``--dry-run``: what the job would do and cost; writes nothing, runs no model."""
    from patchscaler.flops import patch_step_flops
    from patchscaler.weights import load_config
    from pipeline.build import plan_graph
    from pipeline.jobplan import estimate, plan_job
    from pipeline.plan import PlanError, block_bytes_of
    from pipeline.runner import sampler_steps
    from pipeline.single import can_fuse

    plan = plan_job(cfg, write=False, sample=args.dry_run_sample)
    config = load_config(args.weights)
    est = estimate(config, plan, cfg.storage_options, mode=cfg.mode)
    kept = f", {len(plan.kept)} failed before (not retried)" if len(plan.kept) else ""
    print(f"{plan.inputs} inputs: {plan.todo} to do, {plan.done} already done{kept}")
    how = (f"from the headers of {est.sampled} of them, extrapolated" if est.extrapolated
           else f"from the headers of all {est.sampled}")
    unread = f"; {est.failed} sampled files are not images" if est.failed else ""
    print(f"to do: {est.pixels / 1e6:,.4g} Mpixels in, {est.patches:,.0f} latent patches ({how}{unread})")
    shares = "/".join(f"{x:.2f}" for x in plan.shares)
    print(f"patch-steps: {est.patch_steps:,.0f} with group shares {shares} (simple/medium/hard, "
          f"{plan.shares_from}), steps {'/'.join(map(str, config.sampler.steps))}, mode "
          f"{cfg.mode or config.sampler.mode}")
    step, once = patch_step_flops(config)
    flops = est.patch_steps * step + est.patches * once
    hours = flops / (args.tflops * 1e12) / 3600
    print(f"Patch-DiT: {flops / 1e12:,.4g} TFLOP ({step / 1e9:.4g} GFLOP a patch-step with the prompt "
          f"cache): {hours:,.4g} GPU-hours at {args.tflops:g} TFLOP/s (the light stages add about 11% "
          f"at the paper preset, docs/pipeline.md)")
    nodes = plan_nodes(args)
    if args.device == "auto":  # as start_ray decides: the cluster's GPUs count
        cfg.device = "cuda" if any(n.gpus for n in nodes) else "cpu"
    if not plan.todo:
        print("nothing to do: no resource plan")
        return 0
    counts = {g: round(x * 1_000_000) for g, x in enumerate(plan.shares)}
    layout = cfg.resolved_layout(plan.todo)
    try:
        graph = plan_graph(cfg, nodes, layout=layout, todo=plan.todo, counts=counts,
                           steps=sampler_steps(config, cfg.mode), fused_ok=can_fuse(config, cfg.mode),
                           image_bytes=block_bytes_of(config, cfg.max_pixels))
    except PlanError as exc:
        print(f"resource plan: {exc}")
        return 2
    where = f"cluster at {args.address}" if args.address else "this machine"
    print(f"resource plan on {len(nodes)} node(s) of {where} "
          f"({', '.join(f'{n.cpus:g} CPU + {n.gpus} GPU' for n in nodes)}), device {cfg.device}:")
    for name, pool in graph.plan.pools.items():
        gpu = f" + {pool.num_gpus:g} GPU" if pool.num_gpus else ""
        print(f"  {name}: {pool.actors} actor(s) x {pool.num_cpus:g} CPU{gpu}")
    if graph.plan.tasks:
        print(f"  read/decode: up to {graph.plan.tasks} task(s) x {graph.plan.task_cpus:g} CPU")
    if graph.layout != "single":
        print(f"  {graph.batch} image(s) a GRM call and block (--grm-batch, capped by --max-pixels)")
    print(f"  layout {graph.layout}, {graph.plan.actors} model actors; nothing was run (--dry-run)")
    return 0


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
