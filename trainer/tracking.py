"""Seeing a run: metrics averaged over ranks, TensorBoard events in the run's storage, one progress line.

- ``rank_mean``: every ``--log-every`` steps each rank's window means are averaged over the ranks with
  ``torch.distributed.all_reduce`` (what ``ray.train.report`` and TensorBoard then get).
- ``TensorBoard``: rank 0's ``SummaryWriter``, writing into ``STORAGE/train-TASK/tensorboard``: directly
  when the storage is local; when it is an object store (``s3://…``) into a local folder whose event
  files are uploaded at every checkpoint and at the end. A resumed run purges the events after its step,
  so the curves have no doubled stretch.
- ``ProgressBoard`` (a Ray actor) + ``watch``: rank 0 posts its step and loss; the driver draws the one
  progress line (``pipeline.progress.Progress``: redrawn on a terminal, a line every 30 s in a log) and
  says when the run resumed after a failure.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any, TextIO

import fsspec
import torch

from pipeline.progress import MIN_RATE_SECONDS, Progress, duration


def rank_mean(means: dict[str, float], device: torch.device) -> dict[str, float]:
    """``means`` averaged over all ranks (unchanged without ``torch.distributed``)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return means
    keys = sorted(means)
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    values = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=backend_device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist(), strict=True))


class TensorBoard:
    """Rank 0's TensorBoard events under ``remote`` (a local folder or an object-store prefix)."""

    def __init__(self, remote: str, *, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.remote = remote
        self.local = remote if "://" not in remote else tempfile.mkdtemp(prefix="patchscaler-tb-")
        self.writer = SummaryWriter(log_dir=self.local, purge_step=purge_step, flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def images(self, step: int, name: str, images: torch.Tensor) -> None:
        """``images`` (N, 3, H, W) in [0, 1]."""
        self.writer.add_images(name, images.clamp(0, 1), step)

    def sync(self) -> None:
        """Flush; upload the event files when the storage is an object store."""
        self.writer.flush()
        if self.local == self.remote:
            return
        fs, root = fsspec.core.url_to_fs(self.remote)
        for name in sorted(os.listdir(self.local)):
            fs.put_file(os.path.join(self.local, name), f"{root.rstrip('/')}/{name}")

    def close(self) -> None:
        self.sync()
        self.writer.close()
        if self.local != self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


class ProgressBoard:
    """A small Ray actor: the latest step/loss of rank 0 and the resumes, read by the driver."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}
        self.events: list[str] = []

    def post(self, values: dict[str, Any]) -> None:
        self.latest = values

    def event(self, text: str) -> None:
        self.events.append(text)

    def read(self, seen: int) -> tuple[dict[str, Any], list[str]]:
        return self.latest, self.events[seen:]


class StepProgress(Progress):
    """``train-grm: step 120/30000, loss 0.01234, 2.31 steps/s, ETA 3h36m, 1m02s elapsed``."""

    def __init__(self, total: int, *, task: str, stream: TextIO | None = None,
                 interval: float = 30.0) -> None:
        super().__init__(total, stream=stream, interval=interval)
        self.task = task
        self.loss: float | None = None
        self.first_step = 0

    def advance(self, step: int, loss: float | None, *, force: bool = False) -> None:
        if self.first is None and step > self.ok:
            self.first_step = step
        if step < self.ok:  # resumed from an earlier checkpoint: the rate starts again
            self.first, self.ok = None, step
        self.loss = loss
        self.update(step, 0, force=force)

    def line(self) -> str:
        text = f"train-{self.task}: step {self.ok}/{self.total}"
        if self.loss is not None:
            text += f", loss {self.loss:.5g}"
        since_first = time.monotonic() - self.first if self.first is not None else 0.0
        if self.ok > self.first_step and since_first >= MIN_RATE_SECONDS:
            rate = (self.ok - self.first_step) / since_first
            text += f", {rate:.2f} steps/s"
            if self.ok < self.total:
                text += f", ETA {duration((self.total - self.ok) / max(rate, 1e-9))}"
        return text + f", {duration(time.monotonic() - self.start)} elapsed"

    def _show(self) -> None:
        if not self.tty and self.shown_done == self.ok and self.ok == self.total:
            return  # the last line of a log is not printed twice
        super()._show()


def watch(board: Any, total: int, *, task: str, stop: threading.Event, stream: TextIO | None = None,
          poll: float = 0.5) -> None:
    """Draw the progress line from ``board`` until ``stop`` is set (run in a driver thread)."""
    import ray

    stream = stream or sys.stderr
    progress = StepProgress(total, task=task, stream=stream)
    seen = 0
    while True:
        done = stop.wait(poll)
        try:
            latest, events = ray.get(board.read.remote(seen), timeout=30)
        except ray.exceptions.GetTimeoutError:  # a loaded machine: try again
            continue
        except Exception:  # the board is gone (Ray shutting down): keep what was shown
            break
        for text in events:
            stream.write(f"train-{task}: {text}\n")
            stream.flush()
        seen += len(events)
        if latest:
            progress.advance(int(latest["step"]), latest.get("loss"), force=done)
        if done:
            break
    progress.close()
