"""Issue 17: training runs unattended and shows how it goes (EMA, checkpoints, precision, a worker killed
mid-run, the terminal of ``train-grm``). CPU, tiny preset."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from conftest import make_tiny_model
from PIL import Image

from patchscaler.training.precision import Amp
from patchscaler.weights import load_checkpoint, save_checkpoint
from trainer.ema import EMA, warmup_decay
from trainer.tasks import TrainConfig

REPO = Path(__file__).resolve().parent.parent
NOISE_WORDS = ("warning", "deprecat", "traceback", "error", "placementgroup", "faiss")
ANSI = re.compile(r"\x1b\[")


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("init") / "ckpt"
    save_checkpoint(make_tiny_model(seed=0), str(path))
    return str(path)


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("hr")
    rng = np.random.default_rng(0)
    for i in range(3):
        small = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        Image.fromarray(small).resize((96, 96), Image.Resampling.BICUBIC).save(root / f"{i}.png")
    return str(root)


def _config(init: str, out: Path, data: str, **overrides) -> TrainConfig:
    base = dict(task="grm", init=init, out=str(out), data=(data,), steps=4, batch_size=2, lr=1e-3, crop=64,
                crops_per_image=2, log_every=1, checkpoint_every=2, num_workers=1, use_gpu=False,
                ema_decay=0.9)
    return TrainConfig(**{**base, **overrides})


def _steps(run, n: int) -> None:
    for step in range(1, n + 1):
        run.task.step(run.module, next(run.batches), run.optimizer, run.generator)
        run.ema.update(step)


def test_ema_warms_up_and_the_export_holds_it(tmp_path: Path, init_checkpoint: str, hr_folder: str) -> None:
    from trainer.loop import build_worker_state, export_final

    assert warmup_decay(0.9999, 0) == pytest.approx(0.1) and warmup_decay(0.9999, 10**6) == 0.9999
    lin = torch.nn.Linear(2, 2)
    ema = EMA(lin, lin, decay=0.5)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(step=100)  # d = min(0.5, 101/110) = 0.5
    assert torch.allclose(ema.shadow["weight"], before + 0.5)

    cfg = _config(init_checkpoint, tmp_path / "out", hr_folder)
    run = build_worker_state(cfg, source=None, device=torch.device("cpu"), rank=0)
    _steps(run, 4)
    raw = {k: p.detach().clone() for k, p in run.ema.params.items()}
    export_final(run)
    exported = load_checkpoint(cfg.out).state_dict()
    init = load_checkpoint(init_checkpoint).state_dict()
    assert raw and all(k.startswith("grm.") for k in raw)
    for k, shadow in run.ema.shadow.items():
        assert torch.equal(exported[k], shadow), k  # the export holds the EMA weights ...
    differ = [k for k in raw if not torch.equal(exported[k], raw[k])]
    assert len(differ) == len(raw)  # ... which differ from the raw weights (kept in the model)
    assert all(torch.equal(p, raw[k]) for k, p in run.ema.params.items())
    assert all(torch.equal(exported[k], init[k]) for k in init if not k.startswith("grm."))


def test_precision_switches_on_cpu(init_checkpoint: str, hr_folder: str, tmp_path: Path) -> None:
    """bf16 autocast runs a real GRM step on CPU; fp16's gradient scaler skips a step whose gradients
    overflowed and halves its scale, then steps normally."""
    from trainer.loop import build_worker_state

    run = build_worker_state(_config(init_checkpoint, tmp_path, hr_folder, precision="bf16"), source=None,
                             device=torch.device("cpu"), rank=0)
    assert run.amp.precision == "bf16"
    before = {k: p.detach().clone() for k, p in run.ema.params.items()}
    metrics = run.task.step(run.module, next(run.batches), run.optimizer, run.generator)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert any(not torch.equal(p, before[k]) for k, p in run.ema.params.items())

    lin = torch.nn.Linear(4, 4)
    amp = Amp.create("fp16", torch.device("cpu"))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    x = torch.randn(2, 4)
    with amp.autocast():
        y = lin(x)
    assert y.dtype == torch.float16 and amp.scaler.get_scale() == 2.0**16
    w = lin.weight.detach().clone()
    amp.update(y.float().sum() * float("inf"), lin, opt, max_grad_norm=1.0)  # overflow: skipped
    assert torch.equal(lin.weight, w) and amp.scaler.get_scale() == 2.0**15
    with amp.autocast():
        loss = lin(x).float().pow(2).mean()
    assert np.isfinite(amp.update(loss, lin, opt, max_grad_norm=1.0)) and not torch.equal(lin.weight, w)
    state = amp.state_dict()
    restored = Amp.create("fp16", torch.device("cpu"))
    restored.load_state_dict(json.loads(json.dumps(state)))  # kept in training_state.json
    assert restored.scaler.get_scale() == 2.0**15


def test_compile_wraps_the_trained_module(
    monkeypatch: pytest.MonkeyPatch, init_checkpoint: str, hr_folder: str, tmp_path: Path
) -> None:
    """``--compile``: the trained module goes through torch.compile and trains. Inductor's C++ build
    takes minutes on a 2-core CPU, so here the compile runs with dynamo's "eager" backend."""
    from trainer.loop import build_worker_state

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    run = build_worker_state(_config(init_checkpoint, tmp_path, hr_folder, compile=True), source=None,
                             device=torch.device("cpu"), rank=0)
    assert isinstance(run.module, torch._dynamo.eval_frame.OptimizedModule)
    before = {k: p.detach().clone() for k, p in run.ema.params.items()}
    metrics = run.task.step(run.module, next(run.batches), run.optimizer, run.generator)
    assert np.isfinite(metrics["loss"])
    assert any(not torch.equal(p, before[k]) for k, p in run.ema.params.items())


@pytest.mark.parametrize("task", ["grm", "patchdit", "autoencoder"])
def test_validation_runs_the_inference_path(task: str, hr_folder: str) -> None:
    from conftest import make_tiny_rtm

    from trainer.validation import Validation, psnr_y, validation_crops

    model = make_tiny_model(seed=0)
    pairs = validation_crops((hr_folder,), crop=64, count=2, scale=4, degradation="realesrgan")
    assert [tuple(lr.shape) + tuple(hr.shape) for lr, hr in pairs] == [(3, 16, 16, 3, 64, 64)] * 2
    again = validation_crops((hr_folder,), crop=64, count=2, scale=4, degradation="realesrgan")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(pairs, again, strict=True))  # fixed crops
    check = Validation(task=task, model=model, pairs=pairs, rtm=make_tiny_rtm(model),
                       device=torch.device("cpu"))
    values, images = check.run()
    assert images.shape == (2, 3, 64, 192) and 0 <= float(images.min()) and float(images.max()) <= 1
    out = images[0, :, :, 64:128]
    second = images[1, :, :, 64:128]
    assert values["val/psnr_y"] == pytest.approx((psnr_y(out, pairs[0][1]) + psnr_y(second, pairs[1][1])) / 2)
    assert 5 < values["val/psnr_y"] < 60
    assert psnr_y(pairs[0][1], pairs[0][1]) > 100  # identical images


def _rank_mean_worker(rank: int, store_file: str, results: str) -> None:
    import torch.distributed as dist

    from trainer.tracking import rank_mean

    dist.init_process_group("gloo", store=dist.FileStore(store_file, 2), rank=rank, world_size=2)
    try:
        means = rank_mean({"loss": 1.0 + 2.0 * rank, "grad_norm": 10.0 * rank}, torch.device("cpu"))
        Path(results, f"{rank}.json").write_text(json.dumps(means))
    finally:
        dist.destroy_process_group()


def test_metrics_are_averaged_over_ranks(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from trainer.tracking import rank_mean

    assert rank_mean({"loss": 3.0}, torch.device("cpu")) == {"loss": 3.0}  # one process: unchanged
    # forked, not spawned: a spawned child imports torch and this module again (minutes on a busy CI box)
    mp.start_processes(_rank_mean_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == {"grad_norm": 5.0, "loss": 2.0}


def test_tensorboard_events_reach_s3(tmp_path: Path) -> None:
    """On an object-store storage the event files are written locally and uploaded at every sync."""
    from s3util import moto_s3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainer.tracking import TensorBoard

    with moto_s3("runs"):
        import fsspec

        tb = TensorBoard("s3://runs/final/ray/train-grm/tensorboard", purge_step=None)
        tb.scalars(1, {"train/loss": 0.5})
        tb.images(1, "val/images", torch.rand(2, 3, 8, 24))
        tb.sync()
        fs = fsspec.filesystem("s3")
        names = fs.ls("runs/final/ray/train-grm/tensorboard")
        assert len(names) == 1 and "events.out.tfevents" in names[0]
        tb.scalars(2, {"train/loss": 0.25})
        local = Path(tb.local)
        tb.close()
        assert not local.exists()  # the local copy is gone, the bucket has everything
        fs.invalidate_cache()
        fs.get(names[0], str(tmp_path / names[0].rsplit("/", 1)[-1]))
        events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 0.5), (2, 0.25)]
        assert events.Tags()["images"] == ["val/images"]


def test_progress_line_in_a_log() -> None:
    from trainer.tracking import StepProgress

    stream = io.StringIO()
    progress = StepProgress(100, task="grm", stream=stream, interval=0.0)
    progress.advance(10, 0.5)
    progress.advance(100, 0.25)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("train-grm: step 10/100, loss 0.5,") and lines[0].endswith("elapsed")
    assert lines[-1].startswith("train-grm: step 100/100, loss 0.25,") and len(lines) == 2


def _train_workers(root: psutil.Process) -> list[psutil.Process]:
    found = []
    for p in root.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:
            continue
    return found


@pytest.mark.timeout(900)
def test_a_killed_worker_is_replaced_and_the_run_ends_quietly(
    tmp_path: Path, init_checkpoint: str, hr_folder: str
) -> None:
    """``train-grm`` with 2 workers, as a user runs it (its own Ray, output into a pipe): one training
    worker is killed (SIGKILL) after the first checkpoint; Ray Train restarts the workers, the run
    resumes from the last checkpoint and ends at the asked step with a continuous loss history. The
    output is a few lines: no colour codes, no Ray warnings. The last 2 checkpoints, TensorBoard events
    and the EMA export are where docs/training.md says."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_WAIT_POLICY", None)
    cmd = [sys.executable, "-m", "jobs.cli", "train-grm", "--init", init_checkpoint, "--out", str(out),
           "--data", hr_folder, "--val-data", hr_folder, "--steps", "24", "--batch-size", "2", "--crop", "64",
           "--crops-per-image", "2", "--lr", "1e-3", "--log-every", "2", "--checkpoint-every", "4",
           "--val-every", "12", "--val-images", "1", "--keep-checkpoints", "2", "--num-workers", "2",
           "--ema-decay", "0.99"]
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    storage = out / "ray" / "train-grm"
    snapshot = storage / "checkpoint_manager_snapshot.json"  # Ray's record of the committed checkpoints
    killed = None
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline and killed is None:
        if snapshot.exists() and "step_" in snapshot.read_text():
            workers = _train_workers(psutil.Process(proc.pid))
            if workers:
                killed = workers[-1].pid
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=max(10.0, deadline - time.monotonic()))
    lines = output.splitlines()
    assert proc.returncode == 0, output
    assert killed is not None, f"no checkpoint before the run ended: {output}"

    state = json.loads((out / "training_log.json").read_text())
    assert state["step"] == 24 and state["world_size"] == 2
    assert [h[0] for h in state["history"]] == list(range(2, 25, 2))  # no gap, no duplicate
    assert len(state["resumes"]) == 1 and state["resumes"][0] % 4 == 0 and 0 < state["resumes"][0] < 24
    assert [v[0] for v in state["validation"]] == [12, 24]
    assert sorted(p.name for p in storage.glob("step_*")) == ["step_00000020", "step_00000024"]
    assert list((storage / "tensorboard").glob("events.out.tfevents.*"))
    model = load_checkpoint(str(out))  # the EMA weights, loadable by `upscale`
    from safetensors.torch import load_file

    raw = load_file(storage / "step_00000024" / "trainable.safetensors")
    ema = load_file(storage / "step_00000024" / "ema.safetensors")
    exported = model.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in ema.items())
    assert any(not torch.equal(raw[k], v) for k, v in ema.items())

    assert len(lines) <= 12, lines
    assert not [x for x in lines if ANSI.search(x)], lines
    assert not [x for x in lines if any(w in x.lower() for w in NOISE_WORDS)], lines
    assert any(x.startswith("train-grm: resumed from the checkpoint of step ") for x in lines), lines
    assert any(x.startswith("train-grm: step 24/24") for x in lines), lines
    assert json.loads(lines[-1])["step"] == 24


def test_config_round_trips_new_fields() -> None:
    cfg = TrainConfig(task="grm", init="i", out="o", data=("d",), precision="fp16", compile=True,
                      ema_decay=0.5, keep_checkpoints=5, max_failures=-1, val_data=("v",))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert dataclasses.replace(cfg, precision="bf16").precision == "bf16"
