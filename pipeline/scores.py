"""IQA scores and group maps written by ``upscale-dataset`` in the same pass as the images.

With ``--score METRICS`` a scoring pool (``eval.score.PipelineScoreStage``) follows the assembler; every
finished image comes back to the driver with its score rows, which are recorded next to its manifest row:

- ``OUTPUT/_scores/part-<run>-<n>.parquet``: the score rows of the images of manifest part
  ``_manifest/part-<run>-<n>.parquet`` (:data:`PART_SCHEMA`: :data:`RESULT_SCHEMA` plus the
  image's manifest ``id`` and ``finished_at``, which tie a score row to the manifest row it belongs to);
- ``OUTPUT/scores.parquet`` (``RESULT_SCHEMA``): rewritten at the end of every run with the score rows of
  the latest ``ok`` manifest row of every input. A skipped (finished) image keeps the scores of the run
  that made it, a redone image has the new ones, an error row has none.

For resume, an image of a scoring run is finished only when its latest manifest row also has a score row
for every metric it should get (the no-reference ones, and the full-reference ones when it has an HR
image): an output made by a run without ``--score`` (or with fewer metrics) is redone and scored.

The score rows' schema (:data:`RESULT_SCHEMA`) and the image key of an input (:func:`split_key`) live here,
in the pipeline that writes them; ``eval/`` imports them from here (the arrow points down: nothing under
``pipeline/`` imports ``eval/``). The scoring stage itself comes from ``eval/`` through ``cfg.score``.

With ``--maps`` the GRM stage writes each image's group map to ``OUTPUT/_maps/<output path without
extension>.png`` (:func:`map_uri`), which ``eval`` finds and draws over the image in its report.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.io import MAPS_DIR, SCORES_DIR, filesystem, join, normalize_root, relative, write_bytes_atomic

if TYPE_CHECKING:
    from pipeline.build import PipelineConfig

SCORES_FILE = "scores.parquet"
DEFAULT_METHOD = "patchscaler"  # the `method` of the pipeline's own outputs
# one row per (image, metric): scores.parquet, the _scores parts, the rows of the scoring stage
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
    ("iqa_version", pa.string()),  # pyiqa version that scored it (installed, importlib.metadata)
    ("method", pa.string()),  # who made the SR image: "patchscaler", "bicubic", `evaluate --method NAME`
])
_LR_SUFFIX = re.compile(r"_LR(\d+)$", re.IGNORECASE)


def split_key(rel: str) -> tuple[str, int | None]:
    """``Canon/Canon_001_LR4.png`` -> (``Canon/Canon_001``, 4); ``a/b.png`` -> (``a/b``, None)."""
    stem = posixpath.splitext(rel)[0]
    m = _LR_SUFFIX.search(stem)
    return (stem[: m.start()], int(m.group(1))) if m else (stem, None)
PART_SCHEMA = pa.schema([*RESULT_SCHEMA, ("id", pa.string()), ("finished_at", pa.float64())])


def map_uri(output_root: str, output: str) -> str:
    """``OUTPUT/a/b.png`` -> ``OUTPUT/_maps/a/b.png``: where the group map of that output goes."""
    stem = posixpath.splitext(relative(output_root, output))[0]
    return join(output_root, MAPS_DIR, *f"{stem}.png".split("/"))


def eval_info(cfg: PipelineConfig, source: str) -> dict[str, str]:
    """The scoring info of an input: its image id and HR image from ``cfg.score_pairs`` when given there,
    else its path under the input root without extension and ``_LRn`` suffix, and no HR."""
    root = normalize_root(cfg.input)
    key, hr = cfg.score_pairs.get(source, (split_key(relative(root, source))[0], ""))
    dataset = cfg.score_dataset or posixpath.basename(root.rstrip("/").replace("\\", "/")) or "results"
    return {"image_id": key, "dataset": dataset, "hr": hr, "lr": source}


def required_metrics(cfg: PipelineConfig, info: dict[str, str]) -> set[str]:
    """The metrics an image gets: the no-reference ones, and the full-reference ones when it has an HR."""
    if cfg.score is None:
        return set()
    return {m for m in cfg.score.metrics if m not in cfg.score.reference_metrics or info["hr"]}


def rows_of(manifest_row: dict[str, Any]) -> list[dict[str, Any]]:
    """The score rows the scoring pool attached to a manifest row, tied to it by id and finish time."""
    rows = json.loads(manifest_row.get(S.IQA) or "[]")
    return [{**r, "id": manifest_row["id"], "finished_at": manifest_row["finished_at"]} for r in rows]


def write_part(output: str, name: str, rows: list[dict[str, Any]], options: dict[str, Any]) -> str:
    """Write one window's score rows as ``_scores/part-<name>.parquet``; returns its URI."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=PART_SCHEMA), buf)
    uri = join(output, SCORES_DIR, f"part-{name}.parquet")
    write_bytes_atomic(uri, buf.getvalue(), options)
    return uri


def read_parts(output: str, options: dict[str, Any]) -> pd.DataFrame:
    """Every score row ever recorded under ``output`` (:data:`PART_SCHEMA`)."""
    fs, path = filesystem(join(output, SCORES_DIR), options)
    fs.invalidate_cache()
    frames = []
    if fs.exists(path):
        for part in sorted(fs.find(path)):
            if part.endswith(".parquet") and "/." not in part:
                with fs.open(part, "rb") as f:
                    frames.append(pq.read_table(f, schema=PART_SCHEMA).to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else PART_SCHEMA.empty_table().to_pandas()


def of_latest(scores: pd.DataFrame, latest: pd.DataFrame) -> pd.DataFrame:
    """The score rows of the ``ok`` rows of ``latest`` (one manifest row per input)."""
    ok = latest.loc[latest["status"] == S.STATUS_OK, ["id", "finished_at"]]
    return scores.merge(ok, on=["id", "finished_at"], how="inner")


def scored_ids(output: str, latest: pd.DataFrame, required: dict[str, set[str]],
               options: dict[str, Any]) -> set[str]:
    """Ids of ``required`` (id -> metrics it needs) whose latest ``ok`` row has a score for each."""
    found = of_latest(read_parts(output, options), latest).groupby("id")["metric"].agg(set).to_dict()
    return {i for i, need in required.items() if need <= found.get(i, set())}


def consolidate(output: str, latest: pd.DataFrame, options: dict[str, Any]) -> pd.DataFrame:
    """Write ``OUTPUT/scores.parquet`` (``RESULT_SCHEMA``) from the parts: the score rows of each ``ok``
    row of ``latest`` (the consolidated manifest); returns them."""
    rows = of_latest(read_parts(output, options), latest)
    rows = rows.sort_values(["dataset", "image_id", "metric"], kind="stable").reset_index(drop=True)
    rows["method"] = rows["method"].fillna("").replace("", DEFAULT_METHOD)
    buf = io.BytesIO()
    table = pa.Table.from_pandas(rows[RESULT_SCHEMA.names], schema=RESULT_SCHEMA, preserve_index=False)
    pq.write_table(table, buf)
    write_bytes_atomic(join(output, SCORES_FILE), buf.getvalue(), options)
    return rows
