"""Ray Train loop for every trainer: ``TorchTrainer`` (DDP), unattended and resumable, with EMA.

``run_training(cfg)`` starts (or joins) Ray and runs ``train_loop_per_worker`` on ``cfg.num_workers``
workers under ``FailureConfig(max_failures=cfg.max_failures)``. Each worker loads ``cfg.init`` (the
frozen modules and the starting weights), overlays the latest checkpoint of the run if Ray has one (a
worker failure or a rerun with the same storage: ``trainer/checkpoints.py``), wraps the task's trainable
module with ``ray.train.torch.prepare_model`` (DDP when there is more than one worker), optionally
``torch.compile``, and steps. Every ``log_every`` steps the rank-averaged metrics go to
``ray.train.report``, TensorBoard and the driver's progress line (``trainer/tracking.py``); every
``val_every`` steps rank 0 validates the EMA weights (``trainer/validation.py``); every
``checkpoint_every`` steps rank 0 writes a checkpoint that Ray uploads to the run's storage. At the end
rank 0 exports the EMA weights as a full checkpoint to ``cfg.out``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from patchscaler.model import PatchScalerModel
from patchscaler.training.precision import Amp
from patchscaler.weights import load_checkpoint
from trainer import checkpoints as C
from trainer.data import CropBatches
from trainer.ema import EMA
from trainer.tasks import TASKS, Task, TrainConfig, learning_rate


@dataclass
class WorkerRun:
    """Everything one worker trains with; ``state`` is the JSON training state (step, loss history, ...)."""

    cfg: TrainConfig
    task: Task
    model: PatchScalerModel
    trainable: torch.nn.Module  # the trained module, unwrapped
    module: torch.nn.Module  # the same, maybe DDP-wrapped and compiled
    optimizer: torch.optim.Optimizer
    ema: EMA
    amp: Amp
    state: dict[str, Any]
    batches: CropBatches
    generator: torch.Generator


def _generator_seed(cfg: TrainConfig, rank: int, step: int) -> int:
    return cfg.seed * 7919 + rank * 104_729 + step


def build_worker_state(
    cfg: TrainConfig, *, source: str | None, device: torch.device, rank: int,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
) -> WorkerRun:
    """Load ``cfg.init``, pick the task's trainable module, overlay the checkpoint ``source`` (weights,
    EMA, optimizer, scaler, RNG, step) when given, wrap the module (``prepare_model`` under Ray)."""
    model = load_checkpoint(cfg.init, device=device)
    task = TASKS[cfg.task](cfg=cfg, model=model, device=device)
    trainable = task.setup()
    amp = Amp.create(cfg.precision, device)
    task.amp = amp
    state: dict[str, Any] = {"step": 0, "history": [], "validation": [], "seconds": 0.0, "task": cfg.task,
                             "resumes": []}
    saved = C.load_train_checkpoint(source, model=model, trainable=trainable) if source else None
    ema = EMA(model, trainable, decay=cfg.ema_decay)
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    module = wrap(trainable)
    if cfg.compile:
        module = torch.compile(module)
    generator = torch.Generator()
    if saved is not None:
        state = saved["state"]
        if state.get("task") != cfg.task:
            raise ValueError(f"{source} holds train-{state.get('task')} state, not train-{cfg.task}")
        optimizer.load_state_dict(saved["optimizer"])
        ema.load_state_dict(saved["ema"])
        amp.load_state_dict(state.get("scaler", {}))
        rng = saved["rng"]
        if f"generator.{rank}" in rng:  # the same rank existed before (else: seeded from the step below)
            generator.set_state(rng[f"generator.{rank}"])
            torch.set_rng_state(rng[f"torch.{rank}"])
            if device.type == "cuda" and f"cuda.{rank}" in rng:
                torch.cuda.set_rng_state(rng[f"cuda.{rank}"], device)
        else:
            generator.manual_seed(_generator_seed(cfg, rank, int(state["step"])))
    else:
        generator.manual_seed(_generator_seed(cfg, rank, 0))
    state["config"] = cfg.to_dict()  # the settings of the latest (resumed) run, for reports
    batches = task.batches(rank=rank, start_step=int(state["step"]))
    return WorkerRun(cfg, task, model, trainable, module, optimizer, ema, amp, state, batches, generator)


def rng_states(run: WorkerRun, rank: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, gathered on all ranks (``rng.safetensors`` of a checkpoint)."""
    import torch.distributed as dist

    mine = {"generator": run.generator.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    everyone = [mine]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    return {f"{k}.{r}": v.cpu() for r, states in enumerate(everyone) for k, v in states.items()}


def save_checkpoint_dir(run: WorkerRun, dir_: str, rng: dict[str, torch.Tensor]) -> None:
    run.state["scaler"] = run.amp.state_dict()
    C.save_train_checkpoint(dir_, model=run.model, trainable=run.trainable, ema=run.ema.state_dict(),
                            optimizer=run.optimizer, state=run.state, rng=rng)


def export_final(run: WorkerRun) -> None:
    """The EMA weights (and the task's recorded config: latent scale, calibrated gamma) to ``cfg.out``."""
    model = run.model
    with run.ema.applied():
        trained_config = model.config
        model.config = run.task.checkpoint_config(run.batches)
        try:
            if "calibration" in run.task.extras:  # train-grm with validation images: gamma1/gamma2
                run.state["calibration"] = run.task.extras["calibration"]
            C.export(run.cfg.out, model=model, state=run.state, title=f"train-{run.cfg.task}")
        finally:
            model.config = trained_config


def _configure_backends(cfg: TrainConfig, device: torch.device) -> None:
    torch.set_num_threads(max(1, cfg.cpus_per_worker))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from trainer.tracking import TensorBoard, rank_mean

    board = config.pop("progress_board", None)
    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    _configure_backends(cfg, device)
    checkpoint = ray.train.get_checkpoint()
    wrap = ray.train.torch.prepare_model
    if checkpoint is not None:
        with checkpoint.as_directory() as source:
            run = build_worker_state(cfg, source=source, device=device, rank=rank, wrap=wrap)
    else:
        run = build_worker_state(cfg, source=None, device=device, rank=rank, wrap=wrap)
    step = int(run.state["step"])
    if checkpoint is not None and rank == 0 and step < cfg.steps:
        run.state["resumes"].append(step)
        if board is not None:
            board.event.remote(f"resumed from the checkpoint of step {step} (a worker or node failed; "
                               f"{cfg.max_failures} restarts allowed)")
    tb = TensorBoard(run_storage(cfg) + "/tensorboard", purge_step=step + 1) if rank == 0 else None
    validation = _validation(run, device) if rank == 0 else None
    window: dict[str, list[float]] = {}
    start = last_log = time.perf_counter()
    last_step = step
    while step < cfg.steps:
        lr = learning_rate(cfg, step)
        for group in run.optimizer.param_groups:  # the schedule (and a new --lr on resume) applies
            group["lr"] = lr
        metrics = run.task.step(run.module, next(run.batches), run.optimizer, run.generator)
        step += 1
        run.ema.update(step)
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        last = step == cfg.steps
        log = step % cfg.log_every == 0 or last
        save = step % cfg.checkpoint_every == 0 or last
        if validation is not None and (step % cfg.val_every == 0 or last):
            with run.ema.applied():
                values, images = validation.run()
            run.state["validation"].append([step, values["val/psnr_y"]])
            tb.scalars(step, values)
            tb.images(step, "val/bicubic_output_hr", images)
        if not (log or save):
            continue
        now = time.perf_counter()
        reported: dict[str, float] = {"step": step}
        if log:
            means = rank_mean({k: sum(v) / len(v) for k, v in window.items()}, device)
            steps_per_s = (step - last_step) / max(now - last_log, 1e-9)
            reported |= means | {"lr": lr, "steps_per_s": steps_per_s,
                                 "samples_per_s": steps_per_s * cfg.batch_size * world}
            run.state["history"].append([step, means["loss"]])
            window, last_log, last_step = {}, now, step
            if tb is not None:
                tb.scalars(step, {f"train/{k}": v for k, v in reported.items() if k != "step"})
            if board is not None and rank == 0:
                board.post.remote({"step": step, "loss": means["loss"]})
        ckpt = None
        if save:
            run.state.update(step=step, seconds=run.state["seconds"] + now - start,
                             skipped=run.batches.skipped, world_size=world)
            start = now
            rng = rng_states(run, rank, device)
            if rank == 0:
                dir_ = C.new_local_dir(step)
                save_checkpoint_dir(run, dir_, rng)
                ckpt = ray.train.Checkpoint.from_directory(dir_)
                tb.sync()
        ray.train.report(reported, checkpoint=ckpt, checkpoint_dir_name=C.checkpoint_name(step),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
    if rank == 0:
        export_final(run)
        tb.close()


def _validation(run: WorkerRun, device: torch.device) -> Any:
    from trainer.validation import VALIDATED_TASKS, Validation, validation_crops

    cfg = run.cfg
    if not cfg.val_data or cfg.val_every <= 0 or cfg.task not in VALIDATED_TASKS:
        return None
    pairs = validation_crops(cfg.val_data, crop=cfg.crop, count=cfg.val_images,
                             scale=run.model.config.scale, degradation=cfg.degradation)
    return Validation(task=cfg.task, model=run.model, pairs=pairs, rtm=run.task.extras.get("rtm"),
                      device=device)


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray Train workers run in their own working directory."""
    return dataclasses.replace(
        cfg, init=_absolute(cfg.init), out=_absolute(cfg.out), data=tuple(_absolute(d) for d in cfg.data),
        val_data=tuple(_absolute(d) for d in cfg.val_data), rtm=_absolute(cfg.rtm) if cfg.rtm else None,
        storage=_absolute(cfg.storage or cfg.out.rstrip("/") + "/ray"),
    )


def run_name(cfg: TrainConfig) -> str:
    return f"train-{cfg.task}"


def run_storage(cfg: TrainConfig) -> str:
    """The run's folder in Ray's storage: its checkpoints (``step_…``) and ``tensorboard/``."""
    return f"{cfg.storage.rstrip('/')}/{run_name(cfg)}"


def run_training(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` on Ray Train; returns the final training state (step, history, seconds, ...)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainer.tracking import ProgressBoard, watch

    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; one of {sorted(TASKS)}")
    if not ray.is_initialized():  # `patchscaler train-*` starts a quiet one first (jobs/runtime.py)
        ray.init(address=cfg.address or "local", include_dashboard=False, log_to_driver=cfg.verbose)
    if cfg.use_gpu is None:
        cfg = dataclasses.replace(cfg, use_gpu=ray.cluster_resources().get("GPU", 0) > 0)
    cfg = absolute_paths(cfg)
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    board = ray.remote(num_cpus=0)(ProgressBoard).remote() if progress else None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict() | {"progress_board": board},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name(cfg), storage_path=cfg.storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
    )
    stop = threading.Event()
    drawer = threading.Thread(target=watch, args=(board, cfg.steps), kwargs={"task": cfg.task, "stop": stop},
                              daemon=True) if board is not None else None
    if drawer is not None:
        drawer.start()
    try:
        trainer.fit()
    finally:
        stop.set()
        if drawer is not None:
            drawer.join(timeout=15)
        if board is not None:
            ray.kill(board)
    return C.read_training_log(cfg.out)
