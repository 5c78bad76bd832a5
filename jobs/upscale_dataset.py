"""``patchscaler upscale-dataset --input DIR|s3://… --output DIR|s3://…``: the distributed ×4 pipeline.

Runs on a local Ray instance by default, or on an existing cluster with ``--address``. Re-running the
same command resumes: finished images (ok manifest row and output present) are skipped. See
``docs/pipeline.md``.
"""

from __future__ import annotations

import argparse

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
    p.add_argument("--input", required=True, help="folder, file or s3:// prefix of LR images")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix (manifest included)")
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
    p.add_argument("--overwrite", action="store_true", help="redo every image, ignoring the manifest")
    p.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bars")


def run(args: argparse.Namespace) -> int:
    import ray

    from pipeline.build import PipelineConfig
    from pipeline.io import storage_options
    from pipeline.runner import run_pipeline

    if not ray.is_initialized():
        ray.init(address=args.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = not args.no_progress
    device = args.device
    if device == "auto":  # the cluster's GPUs count, not the driver's (a head node may have none)
        device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    cfg = PipelineConfig(
        input=args.input, output=args.output, weights=args.weights, rtm=args.rtm,
        autoencoder=args.autoencoder, device=device, fmt=args.fmt, quality=args.quality,
        max_pixels=args.max_pixels, seed=args.seed, mode=args.mode, fused=args.fused, window=args.window,
        grm_actors=args.grm_actors, dit_actors=args.dit_actors, assemble_actors=args.assemble_actors,
        decode_tasks=args.decode_tasks, gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor, grm_batch=args.grm_batch,
        storage_options=storage_options(args.s3_endpoint), overwrite=args.overwrite,
    )
    summary = run_pipeline(cfg)
    return 1 if summary.failed else 0
