"""Shared command-line plumbing of the four ``train-*`` subcommands (each a thin module over this one).

    patchscaler train-autoencoder --init DIR --out DIR --data HR_DIR_OR_S3 [--data ...]
    patchscaler train-grm         --init DIR --out DIR --data ...
    patchscaler train-classifier  --init DIR --out DIR --data DTD_DIR
    patchscaler train-patchdit    --init DIR --out DIR --data ... --rtm RTM_DIR

Every run is resumable: rerunning the same command continues from the last checkpoint in ``--out``
(and ``--steps`` may be raised to train longer).
"""

from __future__ import annotations

import argparse
import json

from trainer.tasks import TASK_DEFAULTS, TrainConfig


def add_arguments(p: argparse.ArgumentParser, task: str) -> None:
    d = {**{f: TrainConfig.__dataclass_fields__[f].default for f in TrainConfig.__dataclass_fields__
            if f not in ("task", "init", "out", "data")}, **TASK_DEFAULTS[task]}
    p.add_argument("--init", required=True, help="input checkpoint dir or s3:// prefix")
    p.add_argument("--out", required=True, help="output checkpoint dir (resumed from when it has state)")
    data_help = ("a DTD-layout folder (<class>/*.jpg or images/<class>/*.jpg)" if task == "classifier"
                 else "HR image folder or s3:// prefix, searched recursively (repeatable; every source is "
                       "drawn equally often)")
    p.add_argument("--data", action="append", required=True, help=data_help)
    p.add_argument("--steps", type=int, default=d["steps"], help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=d["batch_size"], help="per worker")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=d["lr_schedule"])
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"])
    p.add_argument("--crop", type=int, default=d["crop"], help="HR crop size in pixels")
    p.add_argument("--crops-per-image", type=int, default=d["crops_per_image"])
    p.add_argument("--color-augment", action="store_true",
                   help="random channel order / saturation / gain per crop (small or colour-poor data)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--log-every", type=int, default=d["log_every"])
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"])
    p.add_argument("--max-grad-norm", type=float, default=d["max_grad_norm"])
    if task in ("grm", "patchdit"):
        p.add_argument("--degradation", choices=["realesrgan", "bicubic"], default=d["degradation"])
        p.add_argument("--clean-share", type=float, default=d["clean_share"],
                       help="share of pairs degraded by bicubic down-sampling only")
        p.add_argument("--mild-share", type=float, default=d["mild_share"],
                       help="share of pairs degraded mildly (light blur, noise and JPEG 70-95); the rest get "
                            "Real-ESRGAN's second-order degradation")
        p.add_argument("--no-keep-color", dest="keep_color", action="store_false",
                       help="keep the colour shift that the degradation's noise clipping leaves in the "
                            "LR (Real-ESRGAN as published; by default each LR keeps its bicubic's channel "
                            "means)")
        p.add_argument("--pair-pool", type=int, default=d["pair_pool"],
                       help="Real-ESRGAN's pool of (HR, LR) pairs on the training device that mixes batches "
                            "(e.g. 15 x --batch-size; 0: off)")
    if task in ("grm", "classifier", "patchdit"):
        p.add_argument("--autoencoder", default=None, metavar="DIR",
                       help="pretrained diffusers AutoencoderKL folder (local or s3://) that replaces "
                            "--init's autoencoder, config.json's scaling_factor included (see init-weights "
                            "--autoencoder, which writes it into the checkpoint once)")
    if task == "grm":
        p.add_argument("--val-data", action="append", default=[],
                       help="validation HR images (never trained on): validated every --val-every steps, and "
                            "gamma1/gamma2 of PGS are calibrated on them for the export (repeatable)")
        p.add_argument("--group-shares", type=_shares, default=d["group_shares"],
                       help="target simple,medium,hard shares of the calibration, e.g. 0.34,0.33,0.33")
    if task == "autoencoder":
        p.add_argument("--kl-weight", type=float, default=d["kl_weight"], help="KL term (AutoencoderKL only)")
        p.add_argument("--recon-loss", choices=["l1", "mse", "mse+fft"], default=d["recon_loss"],
                       help="reconstruction loss: l1 (LDM's), mse (what PSNR measures), mse+fft (+ frequency "
                            "term that keeps detail)")
        p.add_argument("--no-calibrate-scale", dest="calibrate_scale", action="store_false",
                       help="keep the config's latent scaling_factor instead of 1/std(latents)")
    if task == "patchdit":
        p.add_argument("--rtm", required=True, help="RTM artifact dir or s3:// prefix")
        p.add_argument("--t-sampling", choices=["uniform", "sampler"], default=d["t_sampling"],
                       help="uniform: t ~ U{1..T} (the paper); sampler: only the time steps PGS uses")
    if task in ("autoencoder", "patchdit"):
        p.add_argument("--val-data", action="append", default=[],
                       help="validation HR images (never trained on), validated every --val-every steps "
                            "(repeatable)")
    p.add_argument("--val-every", type=int, default=d["val_every"],
                   help="validate the EMA weights on --val-data crops every N steps (PSNR-Y + images to "
                        "TensorBoard)")
    p.add_argument("--val-images", type=int, default=d["val_images"], help="validation crops")
    p.add_argument("--ema-decay", type=float, default=d["ema_decay"],
                   help="EMA of the trained weights (exported to --out), with warm-up "
                        "min(decay, (1+step)/(10+step)); 0: the raw weights")
    p.add_argument("--keep-checkpoints", type=int, default=d["keep_checkpoints"],
                   help="keep the last k checkpoints (step_NNNNNNNN) in the run's storage")
    p.add_argument("--max-failures", type=int, default=d["max_failures"],
                   help="worker failures to recover from by restarting from the last checkpoint (-1: always)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=d["precision"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a gradient scaler")
    p.add_argument("--compile", action="store_true", help="torch.compile the trained module")
    p.add_argument("--no-tf32", dest="tf32", action="store_false", help="no TF32 matmuls on CUDA")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP), one GPU each")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto",
                   help="auto: use GPUs when the Ray cluster has them")
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (and torch threads) per worker")
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker")
    p.add_argument("--loader-prefetch", type=int, default=4,
                   help="batches each DataLoader process reads ahead (with --loader-workers > 0)")
    p.add_argument("--storage", default=None,
                   help="the run's storage, local or s3:// (default OUT/ray): checkpoints, TensorBoard")
    p.add_argument("--address", default=None,
                   help="Ray cluster to run on, e.g. HEAD:6379 (default: a private local Ray instance)")


def _shares(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1) > 1e-3:
        raise argparse.ArgumentTypeError(
            f"expected three fractions summing to 1, e.g. 0.4,0.3,0.3; got {text!r}")
    return values  # type: ignore[return-value]


def config_from_args(args: argparse.Namespace, task: str) -> TrainConfig:
    fields = set(TrainConfig.__dataclass_fields__) - {"task", "data", "use_gpu"}
    values = {k: getattr(args, k) for k in fields if hasattr(args, k)}
    if "val_data" in values:
        values["val_data"] = tuple(values["val_data"])
    if values.get("autoencoder"):  # Ray Train workers run in their own working directory
        from pipeline.io import normalize_root

        values["autoencoder"] = normalize_root(values["autoencoder"])
    use_gpu = {"auto": None, "yes": True, "no": False}[args.gpu]
    return TrainConfig(task=task, data=tuple(args.data), use_gpu=use_gpu, **values)


def check_args(args: argparse.Namespace, task: str) -> None:
    """The checkpoint, data and RTM exist before Ray starts (``jobs.checks``: one line, exit code 2)."""
    from jobs.checks import check_checkpoint, check_exists, check_output, check_positive, check_rtm
    from pipeline.io import storage_options

    options = storage_options()
    for name in ("steps", "batch_size", "crop", "crops_per_image", "num_workers", "cpus_per_worker",
                 "log_every", "checkpoint_every", "keep_checkpoints", "val_images"):
        check_positive("--" + name.replace("_", "-"), getattr(args, name, None))
    check_positive("--lr", args.lr)
    check_positive("--loader-prefetch", args.loader_prefetch)
    from jobs.checks import UsageError

    if hasattr(args, "clean_share"):
        from patchscaler.training.degradations import DegradationConfig

        try:
            DegradationConfig(clean_share=args.clean_share, mild_share=args.mild_share)
        except ValueError as exc:
            raise UsageError(f"--clean-share/--mild-share: {exc}") from None
        check_positive("--pair-pool", args.pair_pool, allow_zero=True)
    if not 0 <= args.ema_decay < 1:
        raise UsageError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    for data in getattr(args, "val_data", []):
        check_exists(data, options, what="--val-data")
    check_checkpoint(args.init, options, what="--init")
    for data in args.data:
        check_exists(data, options, what="--data")
    if task == "patchdit":
        check_rtm(args.rtm, options)
    if getattr(args, "autoencoder", None):
        check_exists(args.autoencoder, options, what="--autoencoder")
    if task == "autoencoder":
        from patchscaler.weights import load_config

        pretrained = load_config(args.init).autoencoder.pretrained
        if pretrained:
            from jobs.checks import UsageError

            raise UsageError(f"--init {args.init} holds a pretrained autoencoder ({pretrained}); "
                             "train-autoencoder would overwrite it: skip this stage, start at train-grm")
    check_output(args.out, options, what="--out")


def _quiet_raylet_messages() -> None:
    """Ray's driver prints every raylet error message (e.g. the paragraph on a worker that died) to stdout
    even without ``log_to_driver``; Ray Train recovers from those failures itself and the progress line
    says so ("resumed from the checkpoint of step N"). Without ``--verbose`` they are left in Ray's logs.
    ``ray._private.worker.print_to_stdstream`` has no other caller once worker output is not forwarded."""
    import ray._private.worker as ray_worker

    ray_worker.print_to_stdstream = lambda data, ignore_prefix: None


def run_task(args: argparse.Namespace, task: str) -> int:
    from jobs.runtime import start_ray
    from trainer.loop import run_training

    check_args(args, task)
    cfg = config_from_args(args, task)
    start_ray(cfg.address, verbose=cfg.verbose)
    if not cfg.verbose:
        _quiet_raylet_messages()
    state = run_training(cfg)
    history = state.get("history") or [[0, float("nan")]]
    print(json.dumps({
        "task": task, "out": cfg.out, "step": state["step"], "loss_first": history[0][1],
        "loss_last": history[-1][1], "seconds": round(state["seconds"], 1), "skipped": state.get("skipped"),
        "workers": state.get("world_size"), "resumes": state.get("resumes"),
    }))
    return 0
