"""Ray Train loop for every trainer: ``TorchTrainer`` (DDP), resumable, with a progress bar and loss curve.

``run_training(cfg)`` starts (or joins) Ray and runs ``train_loop_per_worker`` on ``cfg.num_workers``
workers. Each worker loads the input checkpoint (or the state to resume), wraps the task's trainable
module with ``ray.train.torch.prepare_model`` (DDP when there is more than one worker), and steps.

Checkpoints: every ``checkpoint_every`` steps and at the end, rank 0 writes a full PatchScaler
checkpoint (``config.json`` + ``model.safetensors``, the format ``weights.load_checkpoint`` reads) plus
the optimizer state and JSON training state (step, loss history) to ``cfg.out``, draws
``loss_curve.png`` there, and reports the same files to Ray as a ``ray.train.Checkpoint``. A restart
resumes from Ray's latest checkpoint if Ray has one (worker failure, or a rerun with the same storage),
else from the training state in ``cfg.out``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from tqdm import tqdm

from patchscaler.model import PatchScalerModel
from patchscaler.weights import (
    has_training_state,
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from trainer.data import CropBatches
from trainer.tasks import TASKS, Task, TrainConfig, learning_rate

LOSS_CURVE = "loss_curve.png"


def plot_loss_curve(history: list[list[float]], title: str) -> bytes:
    """PNG bytes of the logged loss (log scale) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if history:
        steps, losses = zip(*[(h[0], h[1]) for h in history], strict=True)
        ax.plot(steps, losses, lw=1.2)
        if min(losses) > 0:
            ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _write(path: str, data: bytes) -> None:
    """Write a file atomically: locally a temp file renamed into place; on object stores one PUT."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
    target = fs_path + (f".tmp-{os.getpid()}" if "://" not in path else "")
    with fs.open(target, "wb") as f:
        f.write(data)
    if target != fs_path:
        os.replace(target, fs_path)


@dataclass
class WorkerRun:
    """Everything one worker trains with; ``state`` is the JSON training state (step, loss history, ...)."""

    cfg: TrainConfig
    task: Task
    model: PatchScalerModel
    module: torch.nn.Module  # the trainable module, maybe DDP-wrapped
    optimizer: torch.optim.Optimizer
    state: dict[str, Any]
    batches: CropBatches
    generator: torch.Generator


def build_worker_state(
    cfg: TrainConfig, *, source: str | None, device: torch.device, rank: int,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m,
) -> WorkerRun:
    """Load ``source`` (a checkpoint with training state, to resume) or ``cfg.init``, pick the task's
    trainable module, wrap it (``prepare_model`` under Ray), and restore the optimizer and step."""
    model = load_checkpoint(source or cfg.init, device=device)
    task = TASKS[cfg.task](cfg=cfg, model=model, device=device)
    trainable = task.setup()
    module = wrap(trainable)
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state: dict[str, Any] = {"step": 0, "history": [], "seconds": 0.0, "task": cfg.task}
    if source is not None:
        opt_state, state = load_training_state(source)
        if state.get("task") != cfg.task:
            raise ValueError(f"{source} holds train-{state.get('task')} state, not train-{cfg.task}")
        optimizer.load_state_dict(opt_state)
    state["config"] = cfg.to_dict()  # the settings of the latest (resumed) run, for reports
    step = int(state["step"])
    batches = task.batches(rank=rank, start_step=step)
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + rank * 104_729 + step)
    return WorkerRun(cfg, task, model, module, optimizer, state, batches, generator)


def save_state(dir_: str, run: WorkerRun) -> None:
    """Checkpoint (config.json + model.safetensors), optimizer + training state, and loss_curve.png."""
    model = run.model
    trained_config = model.config
    model.config = run.task.checkpoint_config(run.batches)  # what config.json records (latent scale)
    try:
        save_checkpoint(model, dir_)
    finally:
        model.config = trained_config
    save_training_state(dir_, optimizer_state=run.optimizer.state_dict(), state=run.state)
    curve = plot_loss_curve(run.state["history"], f"train-{run.cfg.task}")
    _write(dir_.rstrip("/") + "/" + LOSS_CURVE, curve)


def _resume_source(cfg: TrainConfig) -> tuple[str | None, Any]:
    """(dir with checkpoint + training state, Ray checkpoint context) to resume from, else (None, None)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        ctx = ckpt.as_directory()
        return ctx.__enter__(), ctx
    if has_training_state(cfg.out):
        return cfg.out, None
    return None, None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, cfg.cpus_per_worker))
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    source, source_ctx = _resume_source(cfg)
    try:
        run = build_worker_state(cfg, source=source, device=device, rank=rank,
                                 wrap=ray.train.torch.prepare_model)
    finally:
        if source_ctx is not None:
            source_ctx.__exit__(None, None, None)

    step = int(run.state["step"])
    bar = _progress_bar(cfg, step, rank)
    window: dict[str, list[float]] = {}
    start = time.perf_counter()
    while step < cfg.steps:
        for group in run.optimizer.param_groups:  # the schedule (and a new --lr on resume) applies
            group["lr"] = learning_rate(cfg, step)
        metrics = run.task.step(run.module, next(run.batches), run.optimizer, run.generator)
        step += 1
        bar.update(1)
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        last = step == cfg.steps
        if step % cfg.log_every == 0 or last:
            means = {k: sum(v) / len(v) for k, v in window.items()}
            run.state["history"].append([step, means["loss"]])
            shown = " ".join(f"{k}={v:.4g}" for k, v in means.items() if k != "grad_norm")
            bar.set_description(f"train-{cfg.task} {shown}")
            window = {}
        if step % cfg.checkpoint_every == 0 or last:
            run.state.update(step=step, seconds=run.state["seconds"] + time.perf_counter() - start,
                             skipped=run.batches.skipped, world_size=world)
            start = time.perf_counter()
            _report(run, rank)
    bar.close()


def _progress_bar(cfg: TrainConfig, step: int, rank: int) -> Any:
    """Rank 0's progress bar: Ray's ``tqdm_ray`` (drawn by the driver) inside Ray, tqdm elsewhere."""
    import ray
    from ray.experimental import tqdm_ray

    if rank != 0:
        return tqdm(total=cfg.steps, disable=True)
    if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
        bar = tqdm_ray.tqdm(total=cfg.steps, desc=f"train-{cfg.task}", unit="step")
        bar.update(step)
        return bar
    return tqdm(total=cfg.steps, initial=step, desc=f"train-{cfg.task}", unit="step")


def _report(run: WorkerRun, rank: int) -> None:
    import ray.train

    state = run.state
    metrics = {"step": state["step"], "loss": state["history"][-1][1] if state["history"] else float("nan")}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_state(tmp, run)
        for name in sorted(os.listdir(tmp)):  # the same files to --out (local or object store)
            with open(os.path.join(tmp, name), "rb") as f:
                _write(run.cfg.out.rstrip("/") + "/" + name, f.read())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    print(f"train-{run.cfg.task}: step {state['step']}, loss {metrics['loss']:.5g}, skipped files "
          f"{state['skipped']}, checkpoint {run.cfg.out}", flush=True)


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray Train workers run in their own working directory."""
    return dataclasses.replace(
        cfg, init=_absolute(cfg.init), out=_absolute(cfg.out), data=tuple(_absolute(d) for d in cfg.data),
        rtm=_absolute(cfg.rtm) if cfg.rtm else None, storage=_absolute(cfg.storage) if cfg.storage else None,
    )


def run_training(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``cfg`` on Ray Train; returns the final training state (step, history, seconds, ...)."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; one of {sorted(TASKS)}")
    if not ray.is_initialized():
        ray.init(address=cfg.address or "local", include_dashboard=False, log_to_driver=True)
    if cfg.use_gpu is None:
        cfg = dataclasses.replace(cfg, use_gpu=ray.cluster_resources().get("GPU", 0) > 0)
    cfg = absolute_paths(cfg)
    storage = _absolute(cfg.storage or (cfg.out.rstrip("/") + "/ray"))
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=f"train-{cfg.task}", storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()
    return load_training_state(cfg.out)[1]
