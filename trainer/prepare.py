"""``prepare-data``: cut a large HR image set into sub-images once, as BasicSR's ``extract_subimages.py``.

Decoding a full 2K PNG to take a few 256 px crops is what makes a training loop wait on its data; BasicSR
and Real-ESRGAN therefore cut DIV2K / LSDIR into overlapping sub-images once (480 x 480, step 240, PNG) and
train on those. Here that is a Ray Data job over a local folder or ``s3://`` prefix:

- every image file under ``input`` becomes ``size`` x ``size`` windows at ``step`` (the last window of a
  row / column moved in to end at the image's edge when more than ``thresh_size`` pixels would be left;
  a side smaller than ``size`` gives windows of that side's length), written as PNG to
  ``out/<path>_s<NNN>.png`` (``<path>``: the file's path under ``input``, its extension dropped; names
  are made distinct by ``pipeline.naming``);
- ``out/manifest.parquet`` lists every sub-image (``path`` relative to ``out``, ``source``, ``x``, ``y``,
  ``width``, ``height``) and every input that failed (``error`` non-empty, no ``path``). The trainers'
  ``--data OUT`` reads the list from it instead of walking millions of keys (``trainer.data``);
- the driver shows one progress line (images done of all, ok / failed, rate, ETA) and streams the
  manifest to storage as batches finish, so memory does not grow with the data set.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

MANIFEST_FILE = "manifest.parquet"
MANIFEST_SCHEMA = pa.schema([
    ("path", pa.string()), ("source", pa.string()), ("x", pa.int32()), ("y", pa.int32()),
    ("width", pa.int32()), ("height", pa.int32()), ("error", pa.string()),
])


@dataclass(frozen=True)
class PrepareConfig:
    input: str  # folder or s3:// prefix of HR images (searched recursively)
    out: str  # folder or s3:// prefix for the sub-images and manifest.parquet
    size: int = 480  # sub-image side (BasicSR's DIV2K setting)
    step: int = 240  # window stride
    thresh_size: int = 0  # a last window is added when more than this many pixels would be left
    compression: int = 3  # PNG compression level (BasicSR's cv2 setting)
    tasks: int = 4  # concurrent cutting tasks
    cpus_per_task: float = 1.0
    progress: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)


def window_starts(length: int, size: int, step: int, thresh_size: int) -> list[int]:
    """Start offsets of the windows along one side (BasicSR's ``extract_subimages`` rule)."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, step))
    if length - (starts[-1] + size) > thresh_size:
        starts.append(length - size)
    return starts


def sub_image_uri(output: str, index: int) -> str:
    """``out/a/b.png`` (the distinct output name of ``a/b.jpg``) -> ``out/a/b_s001.png`` for index 1."""
    return f"{output[: -len('.png')]}_s{index:03d}.png"


class CutStage:
    """Ray Data stage (a task pool; nothing heavy to set up): (source, output) rows -> one row per
    written sub-image, or one error row per input that could not be read, decoded or written."""

    def __init__(self, *, size: int, step: int, thresh_size: int, compression: int, out: str,
                 storage_options: dict[str, Any]) -> None:
        self.size, self.step, self.thresh_size, self.compression = size, step, thresh_size, compression
        self.out, self.options = out, storage_options

    def cut(self, source: str, output: str) -> list[dict[str, Any]]:
        from PIL import Image

        from pipeline.io import read_bytes, refusal, relative, write_bytes_atomic

        reason = refusal(output)
        if reason is not None:
            return [_error_row(source, reason)]
        try:
            with Image.open(io.BytesIO(read_bytes(source, self.options))) as im:
                rgb = im.convert("RGB")
            rgb.load()
        except Exception as exc:  # unreadable or corrupt: one error row, the job goes on
            return [_error_row(source, f"{type(exc).__name__}: {exc}")]
        w, h = rgb.size
        rows = []
        try:
            for y in window_starts(h, self.size, self.step, self.thresh_size):
                for x in window_starts(w, self.size, self.step, self.thresh_size):
                    box = (x, y, min(x + self.size, w), min(y + self.size, h))
                    buf = io.BytesIO()
                    rgb.crop(box).save(buf, "PNG", compress_level=self.compression)
                    uri = sub_image_uri(output, len(rows) + 1)
                    write_bytes_atomic(uri, buf.getvalue(), self.options)
                    rows.append({"path": relative(self.out, uri), "source": source, "x": x, "y": y,
                                 "width": box[2] - x, "height": box[3] - y, "error": ""})
        except Exception as exc:  # a failed write: the input is reported, its rows so far dropped
            return [_error_row(source, f"{type(exc).__name__}: {exc}")]
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        pairs = zip(batch["source"], batch["output"], strict=True)
        rows = [r for source, output in pairs for r in self.cut(str(source), str(output))]
        return {name: [r[name] for r in rows] for name in MANIFEST_SCHEMA.names}


def _error_row(source: str, error: str) -> dict[str, Any]:
    return {"path": "", "source": source, "x": 0, "y": 0, "width": 0, "height": 0, "error": error or "error"}


@dataclass
class PrepareSummary:
    input: str
    out: str
    images: int
    ok: int
    failed: int
    sub_images: int
    seconds: float
    failures: list[dict[str, str]]  # the first few: source and error

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def prepare_data(cfg: PrepareConfig) -> PrepareSummary:
    """Cut every image under ``cfg.input`` into sub-images under ``cfg.out`` and write the manifest."""
    import ray

    from pipeline.io import filesystem, join, list_files, plan_outputs
    from pipeline.progress import Progress
    from trainer.data import IMAGE_SUFFIXES

    if cfg.size < 1 or cfg.step < 1:
        raise ValueError(f"size {cfg.size} and step {cfg.step} must be positive")
    start = time.perf_counter()
    files = [f for f in list_files(cfg.input, cfg.storage_options) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise ValueError(f"no image files under {cfg.input}")
    outputs = plan_outputs(files, cfg.input, cfg.out, "png")
    rows = [{"source": f, "output": outputs[f]} for f in files]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 16 * cfg.tasks))
    stage = CutStage(size=cfg.size, step=cfg.step, thresh_size=cfg.thresh_size, compression=cfg.compression,
                     out=cfg.out, storage_options=cfg.storage_options)
    ds = ds.map_batches(stage, batch_size=1, batch_format="numpy", num_cpus=cfg.cpus_per_task,
                        compute=ray.data.TaskPoolStrategy(size=cfg.tasks))
    progress = Progress(len(files), enabled=cfg.progress)
    done_sources: set[str] = set()
    failed: dict[str, str] = {}
    sub_images = 0
    fs, manifest_path = filesystem(join(cfg.out, MANIFEST_FILE), cfg.storage_options)
    fs.makedirs(manifest_path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(manifest_path, "wb") as f, pq.ParquetWriter(f, MANIFEST_SCHEMA) as writer:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            table = batch.cast(MANIFEST_SCHEMA)
            if table.num_rows == 0:
                continue
            writer.write_table(table)
            for source, error in zip(table["source"].to_pylist(), table["error"].to_pylist(), strict=True):
                done_sources.add(source)
                if error:
                    failed[source] = error
                else:
                    sub_images += 1
            progress.update(len(done_sources) - len(failed), len(failed))
    progress.close()
    return PrepareSummary(
        input=cfg.input, out=cfg.out, images=len(files), ok=len(done_sources) - len(failed),
        failed=len(failed),
        sub_images=sub_images, seconds=round(time.perf_counter() - start, 1),
        failures=[{"source": s, "error": e} for s, e in sorted(failed.items())[:10]],
    )


def read_manifest(out: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The sub-image URIs listed in ``out/manifest.parquet`` (failed inputs left out), in manifest order."""
    from pipeline.io import filesystem, join

    fs, path = filesystem(join(out, MANIFEST_FILE), storage_options or {})
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=["path", "error"])
    return [join(out, *p.split("/")) for p, e in zip(table["path"].to_pylist(), table["error"].to_pylist(),
                                                    strict=True) if not e]
