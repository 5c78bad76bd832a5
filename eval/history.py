"""The run history that nights are compared in: what was measured, and with what.

- ``history.parquet`` (:data:`HISTORY_SCHEMA`): the summary rows (``eval.results.SUMMARY_SCHEMA``) of every
  run, each with its run id, time and UTC date, and what explains a change: the installed pyiqa and torch
  versions, the project's version and git commit (when known), the device, the weights' and RTM's URIs and
  SHA-256 / version, the fingerprint of the set's file list, the crop border, the scale and the seed;
- ``history_images.parquet`` next to it (:data:`IMAGE_HISTORY_SCHEMA`, :func:`images_path`): every run's
  per-image scores, to find the images that moved.

The default place (:func:`default_history`) does not depend on ``--out``, so a dated output folder per
night still adds to one history: ``$PATCHSCALER_HOME/history.parquet``, else
``$XDG_DATA_HOME/patchscaler/history.parquet`` (``~/.local/share/patchscaler/history.parquet``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import posixpath
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from eval.metrics import installed_version
from eval.results import SUMMARY_SCHEMA, conform, read_table, write_table

HOME_ENV = "PATCHSCALER_HOME"
HISTORY_NAME = "history.parquet"

RUN_INFO_SCHEMA = pa.schema([  # one value per run (dataset_* per dataset)
    ("iqa_version", pa.string()),  # installed pyiqa (importlib.metadata)
    ("torch_version", pa.string()),
    ("project_version", pa.string()),  # installed patchscaler distribution
    ("git_commit", pa.string()),  # HEAD of the source checkout, "" when not a git checkout
    ("device", pa.string()),
    ("weights_uri", pa.string()),
    ("weights_sha256", pa.string()),  # of a local single-file checkpoint / the folder's files, else ""
    ("rtm_uri", pa.string()),
    ("rtm_sha256", pa.string()),
    ("dataset_fingerprint", pa.string()),  # SHA-256 (16 hex) of the set's sorted (key, LR name, HR name)
    ("dataset_images", pa.int64()),
    ("crop_border", pa.int64()),
    ("scale", pa.int64()),
    ("seed", pa.int64()),
])
HISTORY_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("timestamp", pa.float64()),  # unix seconds the run finished
    ("date", pa.string()),  # the same, ISO 8601 UTC
    *SUMMARY_SCHEMA,
    *RUN_INFO_SCHEMA,
])
IMAGE_HISTORY_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("timestamp", pa.float64()),
    ("dataset", pa.string()),
    ("method", pa.string()),
    ("image_id", pa.string()),
    ("metric", pa.string()),
    ("value", pa.float64()),
    ("sr_path", pa.string()),
    ("hr_path", pa.string()),
    ("lr_path", pa.string()),
])


@dataclass
class RunInfo:
    """What a run was made with (the run-wide columns of :data:`RUN_INFO_SCHEMA`)."""

    device: str = ""
    weights_uri: str = ""
    weights_sha256: str = ""
    rtm_uri: str = ""
    rtm_sha256: str = ""
    crop_border: int = -1
    scale: int = -1
    seed: int = -1
    # dataset name -> (fingerprint, number of images)
    datasets: dict[str, tuple[str, int]] = field(default_factory=dict)
    iqa_version: str = field(default_factory=lambda: installed_version("pyiqa"))
    torch_version: str = field(default_factory=lambda: installed_version("torch"))
    project_version: str = field(default_factory=lambda: installed_version("patchscaler"))
    git_commit: str = field(default_factory=lambda: git_commit())

    def columns(self, dataset: str) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "datasets"}
        out["dataset_fingerprint"], out["dataset_images"] = self.datasets.get(dataset, ("", -1))
        return out


def default_history() -> str:
    """``$PATCHSCALER_HOME/history.parquet``, else ``$XDG_DATA_HOME/patchscaler/history.parquet`` (with
    ``~/.local/share`` for an unset ``XDG_DATA_HOME``)."""
    home = os.environ.get(HOME_ENV)
    if not home:
        data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        home = os.path.join(data, "patchscaler")
    return os.path.join(os.path.abspath(os.path.expanduser(home)), HISTORY_NAME)


def images_path(history: str) -> str:
    """``…/history.parquet`` -> ``…/history_images.parquet``: the per-image scores kept beside it."""
    stem, ext = posixpath.splitext(history)
    return f"{stem}_images{ext or '.parquet'}"


def git_commit() -> str:
    """The HEAD commit of the checkout this code runs from, "" when it is not one (an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return ""
    try:
        done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def dataset_fingerprint(files: list[tuple[str, str, str]]) -> str:
    """The first 16 hex digits of the SHA-256 of the sorted (key, LR file name, HR file name) triples:
    the same set gives the same fingerprint wherever it lies, an added, removed or re-paired image a new
    one."""
    text = "\n".join(sorted("\t".join((k, posixpath.basename(lr), posixpath.basename(hr)))
                            for k, lr, hr in files))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def local_sha256(uri: str) -> str:
    """SHA-256 of a local file, or of the sorted (name, SHA-256) list of a local folder's files; "" for
    ``s3://`` or missing paths (their version is the manifest's ``model_version`` / ``rtm_version``)."""
    from eval.metrics import file_sha256

    path = Path(uri)
    if "://" in uri or not path.exists():
        return ""
    if path.is_file():
        return file_sha256(str(path))
    lines = [f"{p.relative_to(path).as_posix()} {file_sha256(str(p))}" for p in sorted(path.rglob("*"))
             if p.is_file()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _date(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def append_run(summary: pd.DataFrame, results: pd.DataFrame, uri: str, *, run_id: str, timestamp: float,
               info: RunInfo | None = None, options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Add run ``run_id`` to the history at ``uri`` (created if absent; a run id already there is
    replaced) — its summary rows with ``info``, and its per-image scores to :func:`images_path` — and
    return the whole history, oldest run first."""
    info = info or RunInfo()
    history = read_table(uri, HISTORY_SCHEMA, options)
    rows = [{**r, **info.columns(r["dataset"])} for r in summary.to_dict("records")]
    run = pd.DataFrame(rows).assign(run_id=run_id, timestamp=float(timestamp), date=_date(timestamp))
    history = pd.concat([history[history["run_id"] != run_id], conform(run, HISTORY_SCHEMA)],
                        ignore_index=True)
    history = history.sort_values(["timestamp", "dataset", "method", "metric"], kind="stable")
    history = history.reset_index(drop=True)
    images = read_table(images_path(uri), IMAGE_HISTORY_SCHEMA, options)
    new = results[[c for c in IMAGE_HISTORY_SCHEMA.names if c in results.columns]]
    new = new.assign(run_id=run_id, timestamp=float(timestamp))
    images = pd.concat([images[images["run_id"] != run_id], conform(new, IMAGE_HISTORY_SCHEMA)],
                       ignore_index=True)
    write_table(images, images_path(uri), IMAGE_HISTORY_SCHEMA, options)  # first: a run never lacks them
    write_table(history, uri, HISTORY_SCHEMA, options)
    return history


def read_history(uri: str, options: dict[str, Any] | None = None) -> pd.DataFrame:
    return read_table(uri, HISTORY_SCHEMA, options)


def read_image_history(uri: str, options: dict[str, Any] | None = None) -> pd.DataFrame:
    return read_table(images_path(uri), IMAGE_HISTORY_SCHEMA, options)


def parse_date(text: str) -> float:
    """``2026-12-01`` or ``2026-12-01T03:00`` (UTC unless an offset is given) -> unix seconds."""
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def query(history: pd.DataFrame, *, datasets: list[str] | None = None, metrics: list[str] | None = None,
          methods: list[str] | None = None, since: float | None = None, until: float | None = None
          ) -> pd.DataFrame:
    """The history rows of the given sets, metrics and methods (all when None) with ``since <= timestamp
    < until``, oldest first."""
    keep = pd.Series(True, index=history.index)
    for column, values in (("dataset", datasets), ("metric", metrics), ("method", methods)):
        if values:
            keep &= history[column].isin(values)
    if since is not None:
        keep &= history["timestamp"] >= since
    if until is not None:
        keep &= history["timestamp"] < until
    return history[keep].sort_values(["timestamp", "dataset", "method", "metric"], kind="stable")


TABLE_COLUMNS = ("date", "run_id", "dataset", "method", "metric", "mean", "std", "count", "failed",
                 "change", "mean_runtime_s", "model_version", "git_commit", "iqa_version", "device")


def history_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The columns a person reads, with ``change``: the mean minus that of the previous run shown of the
    same (set, method, metric)."""
    rows = rows.copy()
    rows["change"] = rows.groupby(["dataset", "method", "metric"], sort=False)["mean"].diff()
    rows["git_commit"] = rows["git_commit"].str[:10]
    return rows[list(TABLE_COLUMNS)].reset_index(drop=True)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if value != value else f"{value:.6g}"
    return str(value)


def to_markdown(table: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def to_csv(table: pd.DataFrame) -> str:
    return table.to_csv(index=False)
