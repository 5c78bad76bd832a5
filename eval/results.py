"""Evaluation tables: per-image scores (long format) and the per-dataset summary of one run.

- ``scores.parquet`` (:data:`RESULT_SCHEMA`, defined in ``pipeline/scores.py`` where the pipeline writes
  it): one row per (image, metric) — image id, dataset, method, metric, value, the model and RTM versions
  that made the image, its upscaling runtime, the metric's own time, the files;
- ``summary.parquet`` and ``summary.csv`` (:data:`SUMMARY_SCHEMA`): per (dataset, method, metric) mean /
  std / count of the finite values, the failures, the mean upscaling runtime of the dataset's images.

The run history that nights are compared in is ``eval/history.py``. All files are written whole and
atomically (local or ``s3://``).
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

from eval.metrics import METRICS
from pipeline.io import filesystem, join, write_bytes_atomic
from pipeline.scores import DEFAULT_METHOD, RESULT_SCHEMA

__all__ = ["RESULT_SCHEMA", "SUMMARY_SCHEMA", "conform", "read_table", "summarize", "write_run"]

SUMMARY_SCHEMA = pa.schema([
    ("dataset", pa.string()),
    ("method", pa.string()),  # who made the SR images: "patchscaler", "bicubic", `evaluate --method`
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

SCORES_FILE = "scores.parquet"
SUMMARY_FILE = "summary.parquet"
SUMMARY_CSV = "summary.csv"


def conform(frame: pd.DataFrame, schema: pa.Schema) -> pd.DataFrame:
    """``frame`` with exactly ``schema``'s columns, in order and types (missing ones filled empty)."""
    frame = frame.copy()
    for f in schema:
        if f.name not in frame.columns:
            frame[f.name] = "" if pa.types.is_string(f.type) else np.nan
    if "method" in schema.names:  # tables written before the method column: PatchScaler's outputs
        frame["method"] = frame["method"].fillna("").replace("", DEFAULT_METHOD)
    table = pa.Table.from_pandas(frame[[f.name for f in schema]], schema=schema, preserve_index=False)
    return table.to_pandas()


def results_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return conform(pd.DataFrame(rows), RESULT_SCHEMA)


def _versions(values: pd.Series) -> str:
    return ",".join(sorted({v for v in values if isinstance(v, str) and v}))


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, method, metric): statistics of the finite values, sorted by those three."""
    rows = []
    for (dataset, method, metric), g in results.groupby(["dataset", "method", "metric"], sort=True):
        values = g["value"].to_numpy(dtype=np.float64)
        finite = values[np.isfinite(values)]
        same = results[(results["dataset"] == dataset) & (results["method"] == method)]
        runtime = same.drop_duplicates("image_id")["runtime_s"].to_numpy(dtype=np.float64)
        runtime = runtime[np.isfinite(runtime)]
        rows.append({
            "dataset": dataset, "method": method, "metric": metric,
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


def write_run(results: pd.DataFrame, out: str, *, options: dict[str, Any] | None = None) -> pd.DataFrame:
    """Write ``scores.parquet``, ``summary.parquet`` and ``summary.csv`` under ``out``; returns the
    summary."""
    summary = summarize(results)
    write_table(results, join(out, SCORES_FILE), RESULT_SCHEMA, options)
    write_table(summary, join(out, SUMMARY_FILE), SUMMARY_SCHEMA, options)
    write_bytes_atomic(join(out, SUMMARY_CSV), summary.to_csv(index=False).encode(), options or {})
    return summary


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
