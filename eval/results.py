"""Evaluation tables: per-image scores (long format), the per-dataset summary, and the run history.

- ``scores.parquet`` (:data:`RESULT_SCHEMA`): one row per (image, metric) — image id, dataset, metric, value,
  the model and RTM versions that made the image, its upscaling runtime, the metric's own time, the files;
- ``summary.parquet`` (:data:`SUMMARY_SCHEMA`): per (dataset, metric) mean / std / count of the finite
  values, the failures, the mean upscaling runtime of the dataset's images;
- ``history.parquet`` (:data:`HISTORY_SCHEMA`): the summary rows of every run, with the run id and time,
  appended to by each run so that nights can be compared.

All files are written whole and atomically (local or ``s3://``).
"""

from __future__ import annotations

import io
import time
import uuid
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from eval.metrics import METRICS, PYIQA_VERSION
from pipeline.io import filesystem, join, write_bytes_atomic

RESULT_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("dataset", pa.string()),
    ("metric", pa.string()),
    ("value", pa.float64()),  # NaN when the metric failed on this image (see error)
    ("model_version", pa.string()),
    ("rtm_version", pa.string()),
    ("runtime_s", pa.float64()),  # upscaling seconds of the image (pipeline manifest), NaN if unknown
    ("metric_s", pa.float64()),  # seconds this metric took on this image
    ("sr_path", pa.string()),
    ("hr_path", pa.string()),
    ("lr_path", pa.string()),
    ("error", pa.string()),
    ("iqa_version", pa.string()),  # pyiqa version that scored it
])

SUMMARY_SCHEMA = pa.schema([
    ("dataset", pa.string()),
    ("metric", pa.string()),
    ("mean", pa.float64()),
    ("std", pa.float64()),
    ("count", pa.int64()),  # finite values
    ("failed", pa.int64()),
    ("lower_better", pa.bool_()),
    ("mean_runtime_s", pa.float64()),  # mean upscaling seconds per image of the dataset
    ("model_version", pa.string()),
    ("rtm_version", pa.string()),
])

HISTORY_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("timestamp", pa.float64()),  # unix seconds the run finished
    *SUMMARY_SCHEMA,
    ("iqa_version", pa.string()),
])

SCORES_FILE = "scores.parquet"
SUMMARY_FILE = "summary.parquet"
HISTORY_FILE = "history.parquet"


def conform(frame: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """``frame`` with exactly ``schema``'s columns, in order and types (missing ones filled empty)."""
    frame = frame.copy()
    for f in schema:
        if f.name not in frame.columns:
            frame[f.name] = "" if pa.types.is_string(f.type) else np.nan
    table = pa.Table.from_pandas(frame[[f.name for f in schema]], schema=schema, preserve_index=False)
    return table.to_pandas()


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return conform(pd.DataFrame(rows), RESULT_SCHEMA)


def _versions(values: pd.Series) -> str:
    return ",".join(sorted({v for v in values if isinstance(v, str) and v}))


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, metric): statistics of the finite values, sorted by dataset then metric."""
    rows = []
    for (dataset, metric), g in results.groupby(["dataset", "metric"], sort=True):
        values = g["value"].to_numpy(dtype=np.float64)
        finite = values[np.isfinite(values)]
        per_image = results[results["dataset"] == dataset].drop_duplicates("image_id")["runtime_s"]
        runtime = per_image.to_numpy(dtype=np.float64)
        runtime = runtime[np.isfinite(runtime)]
        rows.append({
            "dataset": dataset, "metric": metric,
            "mean": float(finite.mean()) if finite.size else np.nan,
            "std": float(finite.std()) if finite.size else np.nan,
            "count": int(finite.size), "failed": int(values.size - finite.size),
            "lower_better": bool(METRICS[metric].lower_better) if metric in METRICS else False,
            "mean_runtime_s": float(runtime.mean()) if runtime.size else np.nan,
            "model_version": _versions(g["model_version"]), "rtm_version": _versions(g["rtm_version"]),
        })
    return conform(pd.DataFrame(rows), SUMMARY_SCHEMA)


def _table_bytes(frame: pd.DataFrame, schema: pa.Schema) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(conform(frame, schema), schema=schema, preserve_index=False), buf)
    return buf.getvalue()


def write_table(frame: pd.DataFrame, uri: str, schema: pa.Schema,
                options: dict[str, Any] | None = None) -> str:
    write_bytes_atomic(uri, _table_bytes(frame, schema), options or {})
    return uri


def read_table(uri: str, schema: pa.Schema, options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The table at ``uri``, or an empty one with ``schema`` when there is no file."""
    fs, path = filesystem(uri, options or {})
    fs.invalidate_cache()
    if not fs.exists(path):
        return schema.empty_table().to_pandas()
    with fs.open(path, "rb") as f:
        return conform(pq.read_table(f).to_pandas(), schema)


def new_run_id(timestamp: float) -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime(timestamp)) + "-" + uuid.uuid4().hex[:6]


def append_history(summary: pd.DataFrame, uri: str, *, run_id: str, timestamp: float,
                   options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Add ``summary`` as run ``run_id`` to the history at ``uri`` (created if absent; a run id already
    there is replaced) and return the whole history, oldest run first."""
    history = read_table(uri, HISTORY_SCHEMA, options)
    run = summary.assign(run_id=run_id, timestamp=float(timestamp), iqa_version=PYIQA_VERSION)
    history = pd.concat([history[history["run_id"] != run_id], conform(run, HISTORY_SCHEMA)],
                        ignore_index=True)
    history = history.sort_values(["timestamp", "dataset", "metric"], kind="stable").reset_index(drop=True)
    write_table(history, uri, HISTORY_SCHEMA, options)
    return history


def write_run(results: pd.DataFrame, out: str, *, history: str | None = None, run_id: str | None = None,
              timestamp: float | None = None, options: dict[str, Any] | None = None
              ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``scores.parquet`` and ``summary.parquet`` under ``out`` and append the summary to the
    history (``out/history.parquet`` unless given); returns (summary, history)."""
    timestamp = time.time() if timestamp is None else timestamp
    summary = summarize(results)
    write_table(results, join(out, SCORES_FILE), RESULT_SCHEMA, options)
    write_table(summary, join(out, SUMMARY_FILE), SUMMARY_SCHEMA, options)
    hist = append_history(summary, history or join(out, HISTORY_FILE), run_id=run_id or new_run_id(timestamp),
                          timestamp=timestamp, options=options)
    return summary, hist


def manifest_info(results_root: str, options: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """From the pipeline's ``manifest.parquet`` in ``results_root`` (if there is one): per output URI,
    its model and RTM versions and its upscaling seconds (the sum of the stage times)."""
    fs, path = filesystem(join(results_root, "manifest.parquet"), options or {})
    if not fs.exists(path):
        return {}
    with fs.open(path, "rb") as f:
        frame = pq.read_table(f).to_pandas()
    seconds = [c for c in frame.columns if c.startswith("seconds_")]
    info = {}
    for row in frame.to_dict("records"):
        if row.get("status", "ok") != "ok" or not row.get("output"):
            continue
        info[str(row["output"])] = {
            "model_version": str(row.get("model_version") or ""),
            "rtm_version": str(row.get("rtm_version") or ""),
            "runtime_s": float(sum(float(row[c]) for c in seconds)) if seconds else np.nan,
        }
    return info
