"""The manifest of ``upscale-dataset``: what resume reads and what a user looks at.

- ``OUTPUT/_manifest/part-<run>-<n>.parquet``: rows of finished images, written (atomically) by the
  driver a few seconds after their outputs were written (``--commit-seconds``, at most ``--window``
  rows per part), so a killed driver loses the records of the images in flight only. Every
  ``COMPACT_EVERY`` small parts of a run are merged into one (``part-<run>-c<n>``), and at the end of a
  run its remaining small parts are, so the folder stays small (a run of a few minutes: one part).
- ``OUTPUT/manifest.parquet``: rewritten at the end of every run from the parts: for each input of the
  run its latest row (``finished_at``), one row per input however many runs it took.

An image counts as finished when its latest row says ``ok`` **and** its output exists. Error rows are
*transient* (reading or writing failed, the model ran out of memory, the result never came back: redone
by the next run) or *permanent* (the file is not a decodable image, or is over ``--max-pixels``: redone
only with ``--retry-failed``); :func:`is_permanent` tells them apart by the stage that failed.
"""

from __future__ import annotations

import io
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.io import MANIFEST_DIR, existing, filesystem, is_remote, join, remove, write_bytes_atomic

MANIFEST_FILE = "manifest.parquet"
PERMANENT_STAGES = ("decode",)  # an undecodable or too large file stays so: retried on request only
COMPACT_EVERY = 64  # parts of a run merged into one as the run goes
CONSOLIDATE_ROWS = 65536  # rows of the consolidated manifest taken and written at a time


def table_bytes(rows: list[dict[str, Any]]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=S.MANIFEST_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def part_uri(output: str, name: str) -> str:
    return join(output, MANIFEST_DIR, f"part-{name}.parquet")


def write_part(output: str, name: str, rows: list[dict[str, Any]], options: dict[str, Any]) -> str:
    """Write rows as ``_manifest/part-<name>.parquet``; returns its URI."""
    uri = part_uri(output, name)
    write_bytes_atomic(uri, table_bytes(rows), options)
    return uri


def read_parts(output: str, options: dict[str, Any]) -> pd.DataFrame:
    """All manifest rows ever written under ``output`` (empty frame when there are none)."""
    fs, path = filesystem(join(output, MANIFEST_DIR), options)
    fs.invalidate_cache()
    empty = S.MANIFEST_SCHEMA.empty_table().to_pandas()
    if not fs.exists(path):
        return empty
    frames = []
    for part in sorted(fs.find(path)):
        if not part.endswith(".parquet") or "/." in part:
            continue
        with fs.open(part, "rb") as f:
            frames.append(pq.read_table(f, schema=S.MANIFEST_SCHEMA).to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else empty


def read_all(output: str, options: dict[str, Any], columns: list[str] | None = None) -> pa.Table:
    """Every manifest row under ``OUTPUT/_manifest`` (``columns``; default: all), one chunk per part as
    read (parts read in parallel): nothing is copied into one buffer."""
    from concurrent.futures import ThreadPoolExecutor

    columns = columns or S.MANIFEST_SCHEMA.names
    fs, path = filesystem(join(output, MANIFEST_DIR), options)
    fs.invalidate_cache()
    schema = pa.schema([S.MANIFEST_SCHEMA.field(c) for c in columns])
    if not fs.exists(path):
        return schema.empty_table()
    parts = sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/." not in p)

    def read(part: str) -> pa.Table:
        with fs.open(part, "rb") as f:
            return pq.read_table(f, columns=columns, schema=S.MANIFEST_SCHEMA)

    with ThreadPoolExecutor(max_workers=8) as pool:
        tables = list(pool.map(read, parts))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def read_latest(output: str, options: dict[str, Any], columns: list[str] | None = None,
                ids: pa.Array | None = None) -> pa.Table:
    """The latest manifest row per id (``columns``, which must hold ``id`` and ``finished_at``; default:
    all) of every part under ``OUTPUT/_manifest`` (only the ids in ``ids``, when given), as Arrow: a few
    bytes per row and column, where the pandas frame of ``read_parts`` costs an object per value. One
    copy beside the rows read."""
    rows = read_all(output, options, columns)
    return rows.take(_latest_indices(rows, ids))


def _latest_indices(rows: pa.Table, ids: pa.Array | None = None) -> pa.Array:
    """Indices of the latest row per id (the one finished last; of equal times, the one read last), in
    id order, only of the ids in ``ids`` when given (only the id and time columns are read)."""
    if rows.num_rows < 2:
        latest = pa.array(range(rows.num_rows), pa.int64())
    else:
        order = pc.sort_indices(rows.select(["id", "finished_at"]),
                                sort_keys=[("id", "ascending"), ("finished_at", "ascending")])
        sorted_ids = rows["id"].take(order)
        last = pc.not_equal(sorted_ids.slice(0, rows.num_rows - 1), sorted_ids.slice(1)).combine_chunks()
        latest = order.filter(pa.concat_arrays([last, pa.array([True])]))
    if ids is not None:
        latest = latest.filter(pc.is_in(rows["id"].take(latest), value_set=ids))
    return latest


def remove_parts(output: str, names: list[str], options: dict[str, Any]) -> None:
    for name in names:
        remove(part_uri(output, name), options)


def latest(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per id: the one finished last."""
    if rows.empty:
        return rows
    return rows.sort_values("finished_at", kind="stable").drop_duplicates("id", keep="last")


def is_permanent(error: str) -> bool:
    """An error row that a re-run would fail the same way (``decode: ...``)."""
    return error.split(":", 1)[0].strip() in PERMANENT_STAGES


def finished_ids(output: str, planned: dict[str, str], options: dict[str, Any],
                 rows: pd.DataFrame | None = None) -> set[str]:
    """Ids (of ``planned``: id -> this run's output URI) whose latest manifest row is ``ok`` and whose
    output is present. The planned URI is checked, not the recorded one, so a moved output folder
    still resumes and a change of ``--format`` redoes everything."""
    rows = latest(read_parts(output, options)) if rows is None else rows
    ok = [i for i in rows.loc[rows["status"] == S.STATUS_OK, "id"] if i in planned]
    present = existing([planned[i] for i in ok], output, options)
    return {i for i in ok if planned[i] in present}


def permanent_failures(rows: pd.DataFrame, planned: dict[str, str]) -> pd.DataFrame:
    """The latest rows (of ``rows``, already latest per id) of ``planned`` ids that failed permanently."""
    failed = rows[(rows["status"] == S.STATUS_ERROR) & rows["id"].isin(set(planned))]
    return failed[failed["error"].map(is_permanent).astype(bool)]


def consolidate_table(output: str, ids: pa.Array, options: dict[str, Any], *,
                      columns: list[str] | None = None) -> pa.Table:
    """Write ``OUTPUT/manifest.parquet``: the latest row of every id in ``ids`` that has one, sorted by
    source; returns those rows' ``columns`` (default: all). Arrow from end to end, and the rows read are
    the only copy of the manifest: which rows go where is worked out on the id, time and source
    columns, and the file is written ``CONSOLIDATE_ROWS`` rows at a time (a million rows: a few hundred
    MB of rows read, not a copy per step)."""
    rows = read_all(output, options)
    keep = _latest_indices(rows, ids)
    keep = keep.take(pc.sort_indices(rows["source"].take(keep)))  # the rows of ``ids``, by source
    buf = pa.BufferOutputStream()
    with pq.ParquetWriter(buf, rows.schema) as writer:
        for start in range(0, max(1, len(keep)), CONSOLIDATE_ROWS):
            writer.write_table(rows.take(keep.slice(start, CONSOLIDATE_ROWS)))
    write_bytes_atomic(join(output, MANIFEST_FILE), buf.getvalue().to_pybytes(), options)
    del buf
    wanted = rows if columns is None else rows.select(columns)
    return wanted.take(keep)


def consolidate(output: str, ids: list[str], options: dict[str, Any]) -> pd.DataFrame:
    """``consolidate_table`` of a list of ids, as a frame."""
    return consolidate_table(output, pa.array(ids, pa.string()), options).to_pandas()


def read_manifest(output: str, options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The consolidated manifest of a finished run."""
    fs, path = filesystem(join(output, MANIFEST_FILE), options or {})
    if is_remote(output):
        fs.invalidate_cache()
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pandas()
