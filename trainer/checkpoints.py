"""What a training checkpoint holds, where it goes, and the final export.

Intermediate checkpoints hold only what training changes; the frozen modules come from ``--init`` again
on resume. Rank 0 writes one into a fresh local directory and hands it to ``ray.train.report``, which
uploads it (in the background) to the run's storage as ``STORAGE/train-TASK/step_00001000/`` and deletes
the local copy: Ray's storage is the one place checkpoints are written to, and
``CheckpointConfig(num_to_keep=k)`` keeps the last ``--keep-checkpoints`` of them. One checkpoint:

- ``trainable.safetensors``: the raw weights (and buffers) of the trained module, named as in the
  PatchScaler checkpoint (``grm.…``, ``patch_dit.…``);
- ``ema.safetensors``: their exponential moving average (``trainer/ema.py``);
- ``optimizer.safetensors`` + ``training_state.json``: AdamW's state and param groups, and the JSON
  state: step, loss history, validation history, seconds, skipped files, resumes, the fp16 gradient
  scaler's state, the run's settings (``patchscaler.weights.save_training_state``). The learning-rate
  schedule is a function of the step (``trainer.tasks.learning_rate``), so the step is its state;
- ``rng.safetensors``: every rank's torch RNG state and step generator (``<name>.<rank>``).

The final export goes to ``--out``: a full PatchScaler checkpoint (``config.json`` +
``model.safetensors``) whose trained module holds the EMA weights (what ``patchscaler upscale`` loads and
the next trainer's ``--init``), ``training_log.json`` (the JSON state) and ``loss_curve.png``. The raw
weights stay in the last checkpoint in storage.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from patchscaler.model import PatchScalerModel
from patchscaler.weights import load_training_state, save_checkpoint, save_training_state

TRAINABLE_FILE = "trainable.safetensors"
EMA_FILE = "ema.safetensors"
RNG_FILE = "rng.safetensors"
LOG_FILE = "training_log.json"
LOSS_CURVE = "loss_curve.png"


def checkpoint_name(step: int) -> str:
    """The directory name of the checkpoint after ``step`` optimizer steps: ``step_00001000``."""
    return f"step_{step:08d}"


def write_bytes(path: str, data: bytes) -> None:
    """Write a file atomically: locally a temp file renamed into place; on object stores one PUT."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
    target = fs_path + (f".tmp-{os.getpid()}" if "://" not in path else "")
    with fs.open(target, "wb") as f:
        f.write(data)
    if target != fs_path:
        os.replace(target, fs_path)


def _read(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        return f.read()


def trainable_state(model: PatchScalerModel, trainable: nn.Module) -> dict[str, torch.Tensor]:
    """The trained module's parameters and buffers, keyed by their names in ``model.state_dict()``."""
    names = {id(t): k for k, t in [*model.named_parameters(), *model.named_buffers()]}
    state = {}
    for t in [*trainable.parameters(), *trainable.buffers()]:
        if id(t) not in names:
            raise ValueError("the trained module holds a tensor that is not part of the model")
        state[names[id(t)]] = t.detach().cpu().contiguous()
    return state


def save_train_checkpoint(
    dir_: str, *, model: PatchScalerModel, trainable: nn.Module, ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer, state: dict[str, Any], rng: dict[str, torch.Tensor],
) -> None:
    """Write one intermediate checkpoint (the files of the module docstring) under ``dir_``."""
    write_bytes(f"{dir_}/{TRAINABLE_FILE}", save_safetensors_bytes(trainable_state(model, trainable)))
    write_bytes(f"{dir_}/{EMA_FILE}", save_safetensors_bytes({k: v.detach().cpu().contiguous()
                                                             for k, v in ema.items()}))
    write_bytes(f"{dir_}/{RNG_FILE}", save_safetensors_bytes(rng))
    save_training_state(dir_, optimizer_state=optimizer.state_dict(), state=state)


def load_train_checkpoint(dir_: str, *, model: PatchScalerModel, trainable: nn.Module) -> dict[str, Any]:
    """Load the raw weights of ``dir_`` into the trained module ``trainable`` of ``model`` (strict: the
    same keys); returns {"ema", "optimizer", "state", "rng"} for the caller to restore."""
    weights = load_safetensors_bytes(_read(f"{dir_}/{TRAINABLE_FILE}"))
    own = model.state_dict()
    expected = set(trainable_state(model, trainable))
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"{dir_}: not a checkpoint of this trained module (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v)
    optimizer, state = load_training_state(dir_)
    return {"ema": load_safetensors_bytes(_read(f"{dir_}/{EMA_FILE}")), "optimizer": optimizer,
            "state": state, "rng": load_safetensors_bytes(_read(f"{dir_}/{RNG_FILE}"))}


def new_local_dir(step: int) -> str:
    """A fresh local directory for rank 0 to write a checkpoint into before Ray uploads it."""
    return tempfile.mkdtemp(prefix=f"patchscaler-{checkpoint_name(step)}-")


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


def export(out: str, *, model: PatchScalerModel, state: dict[str, Any], title: str) -> None:
    """The final export to ``out``: ``model`` as a full checkpoint (the caller has swapped the EMA
    weights and the config to record into it), ``training_log.json`` and ``loss_curve.png``."""
    save_checkpoint(model, out)
    write_bytes(f"{out.rstrip('/')}/{LOG_FILE}", json.dumps(state, indent=1).encode())
    write_bytes(f"{out.rstrip('/')}/{LOSS_CURVE}", plot_loss_curve(state["history"], title))


def read_training_log(out: str) -> dict[str, Any]:
    """The JSON state of a finished run's export (step, history, seconds, resumes, ...)."""
    return json.loads(_read(f"{out.rstrip('/')}/{LOG_FILE}"))
