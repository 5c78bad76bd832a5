"""The driver of ``upscale-dataset``: list, skip what is finished, run, record.

1. List the inputs (every non-hidden file under ``--input``; outputs under the input folder are left
   out) and plan one output per input.
2. Resume: drop the inputs whose latest manifest row is ``ok`` and whose planned output exists; delete
   temp files a killed run left in a local output folder.
3. Run the rest as one streaming Ray Data execution (``build.py``): memory and object-store use are
   bounded by Ray Data's backpressure, not by the collection. The driver writes a manifest part every
   ``--window`` finished images, so a killed job loses at most that many images' records (their
   outputs, written atomically, are simply redone). With automatic pool sizes and more than two
   windows to do, the first window runs alone and its patches per group size the pools of the rest.
4. Rewrite the consolidated manifest (and ``scores.parquet`` when scoring) and print a summary.

The manifest:
- ``OUTPUT/_manifest/part-<run>-<n>.parquet``: the rows of ``--window`` finished images, written
  (atomically) after their outputs were written. They are the record resume reads.
- ``OUTPUT/manifest.parquet``: rewritten at the end of every run from the parts: for each input of the
  run its latest row (``finished_at``), so one row per input however many runs it took.

An image counts as finished when its latest row says ``ok`` **and** its output exists; anything else
(no row, an error row, a missing output) is redone on the next run. Error rows are retried because
some errors are transient (an object store hiccup, an out-of-memory on a busy GPU).

Scores (``--score``) and group maps (``--maps``) of the same pass: see ``pipeline/scores.py``.
"""

from __future__ import annotations

import io
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline import scores as Q
from pipeline.build import GROUP_KEYS, PipelineConfig, iter_manifest_rows, pool_sizes, total_dit_actors
from pipeline.decode import EXTENSIONS, FORMATS
from pipeline.io import (
    MANIFEST_DIR,
    existing,
    filesystem,
    is_remote,
    join,
    list_files,
    normalize_root,
    plan_outputs,
    remove_partials,
    write_bytes_atomic,
)

MANIFEST_FILE = "manifest.parquet"


def _table_bytes(rows: list[dict[str, Any]]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=S.MANIFEST_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_part(output: str, name: str, rows: list[dict[str, Any]], options: dict[str, Any]) -> str:
    """Write one window's rows as ``_manifest/part-<name>.parquet``; returns its URI."""
    uri = join(output, MANIFEST_DIR, f"part-{name}.parquet")
    write_bytes_atomic(uri, _table_bytes(rows), options)
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


def latest(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per id: the one finished last."""
    if rows.empty:
        return rows
    return rows.sort_values("finished_at", kind="stable").drop_duplicates("id", keep="last")


def finished_ids(output: str, planned: dict[str, str], options: dict[str, Any]) -> set[str]:
    """Ids (of ``planned``: id -> this run's output URI) whose latest manifest row is ``ok`` and whose
    output is present. The planned URI is checked, not the recorded one, so a moved output folder
    still resumes and a change of ``--format`` redoes everything."""
    rows = latest(read_parts(output, options))
    ok = [i for i in rows.loc[rows["status"] == S.STATUS_OK, "id"] if i in planned]
    present = existing([planned[i] for i in ok], output, options)
    return {i for i in ok if planned[i] in present}


def consolidate(output: str, ids: list[str], options: dict[str, Any]) -> pd.DataFrame:
    """Write ``OUTPUT/manifest.parquet``: the latest row of every id in ``ids`` that has one."""
    rows = latest(read_parts(output, options))
    rows = rows[rows["id"].isin(set(ids))].sort_values("source", kind="stable")
    records = rows.to_dict("records")
    write_bytes_atomic(join(output, MANIFEST_FILE), _table_bytes(records), options)
    return rows.reset_index(drop=True)


def read_manifest(output: str, options: dict[str, Any] | None = None) -> pd.DataFrame:
    """The consolidated manifest of a finished run."""
    fs, path = filesystem(join(output, MANIFEST_FILE), options or {})
    if is_remote(output):
        fs.invalidate_cache()
    with fs.open(path, "rb") as f:
        return pq.read_table(f).to_pandas()


@dataclass
class Summary:
    inputs: int
    skipped: int  # finished by an earlier run
    ok: int
    failed: int
    seconds: float
    parts: int  # manifest parts written
    pools: list[dict[str, int]]  # Patch-DiT pool sizes per execution

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"done: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (already done) "
                f"of {self.inputs} inputs in {self.seconds:.1f} s, {self.images_per_second:.2f} images/s")


def plan_inputs(cfg: PipelineConfig) -> tuple[list[str], dict[str, str]]:
    """(sources, output URI per source) for the normalised input and output roots of ``cfg``."""
    in_root, out_root = normalize_root(cfg.input), normalize_root(cfg.output)
    if cfg.sources is not None:
        sources = sorted(set(cfg.sources))
        outside = [s for s in sources if not s.startswith(in_root.rstrip("/") + "/") and s != in_root]
        if outside:
            raise ValueError(f"inputs outside the input root {in_root}: {outside[:3]}")
    else:
        sources = [s for s in list_files(in_root, cfg.storage_options)
                   if not s.startswith(out_root.rstrip("/") + "/")]
    if cfg.fmt not in FORMATS:
        raise ValueError(f"unknown output format {cfg.fmt!r}; choose one of {sorted(FORMATS)}")
    return sources, plan_outputs(sources, in_root, out_root, EXTENSIONS[cfg.fmt])


def sampler_steps(cfg: PipelineConfig) -> tuple[int, int, int]:
    """Model calls per patch of each group, for sizing the pools (uniform: the hard group's)."""
    from patchscaler.weights import load_config

    sampler = load_config(cfg.weights).sampler
    mode = cfg.mode or sampler.mode
    steps = tuple(sampler.steps)
    return (steps[-1],) * 3 if mode == "uniform" else (steps[0], steps[1], steps[2])


def _item(cfg: PipelineConfig, source: str, output: str) -> dict[str, str]:
    meta = S.new_meta(source=source, output=output, map_uri=Q.map_uri(cfg.output, output) if cfg.maps else "",
                      eval_info=Q.eval_info(cfg, source) if cfg.score is not None else None)
    return {S.IMAGE_ID: S.image_id(source), S.META: S.dump_meta(meta)}


def _finished(cfg: PipelineConfig, sources: list[str], planned: dict[str, str]) -> set[str]:
    """Ids to skip: ok, output present and, when scoring, scored with every metric they should get."""
    if cfg.overwrite:
        return set()
    done = finished_ids(cfg.output, planned, cfg.storage_options)
    if cfg.score is None or not done:
        return done
    required = {S.image_id(s): Q.required_metrics(cfg, Q.eval_info(cfg, s)) for s in sources}
    rows = latest(read_parts(cfg.output, cfg.storage_options))
    return done & Q.scored_ids(cfg.output, rows, {i: required[i] for i in done}, cfg.storage_options)


def lost_row(item: dict[str, str], cfg: PipelineConfig) -> dict[str, Any]:
    """The manifest row of an image the execution did not return (redone by the next run)."""
    meta = S.fail(S.load_meta(item[S.META]), "pipeline", RuntimeError("no result came back"))
    return S.manifest_row(meta, image_id_=item[S.IMAGE_ID], sampling=cfg.sampling, seed=cfg.seed,
                          finished_at=time.time())


def executions(cfg: PipelineConfig, items: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """One execution for all items, except that with automatic pool sizes a long run first executes
    one window alone, whose patches per group then size the pools of the rest."""
    probe = not cfg.fused and not isinstance(cfg.dit_actors, dict) and len(items) > 2 * cfg.window
    return [items[:cfg.window], items[cfg.window:]] if probe else [items]


def run_pipeline(cfg: PipelineConfig, *, echo: bool = True) -> Summary:
    """Upscale every unfinished input of ``cfg.input`` into ``cfg.output`` on the connected Ray cluster.
    With ``cfg.score`` the metric weights are checked first (``eval.metrics.MissingWeightsError`` before
    anything starts)."""
    start = time.perf_counter()
    if cfg.score is not None:
        from eval.metrics import check_weights, resolve_cache_dir

        check_weights(cfg.score.metrics, resolve_cache_dir(cfg.score.cache_dir))
    cfg.output = normalize_root(cfg.output)
    sources, outputs = plan_inputs(cfg)
    remove_partials(cfg.output)
    planned = {S.image_id(s): outputs[s] for s in sources}
    done = _finished(cfg, sources, planned)
    todo = [_item(cfg, s, outputs[s]) for s in sources if S.image_id(s) not in done]
    steps = sampler_steps(cfg)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    if echo:
        print(f"{len(sources)} inputs, {len(sources) - len(todo)} already done, {len(todo)} to do",
              flush=True)
    counts = dict.fromkeys(range(3), 0)  # patches per group so far: sizes the pools
    ok = failed = parts = scored = 0
    pools: list[dict[str, int]] = []
    for items in executions(cfg, todo) if todo else []:
        sizes = pool_sizes(cfg, counts, steps)
        pools.append({GROUP_KEYS[g]: n for g, n in sizes.items()} or {"fused": total_dit_actors(cfg)})
        if echo:
            print(f"running {len(items)} images, Patch-DiT actors {pools[-1]}", flush=True)
        pending = {i[S.IMAGE_ID]: i for i in items}
        buffer: list[dict[str, Any]] = []
        score_rows: list[dict[str, Any]] = []
        rows = iter_manifest_rows(cfg, items, sizes)
        while True:
            row = next(rows, None)
            if row is not None and pending.pop(row["id"], None) is not None:
                buffer.append(row)
                score_rows += Q.rows_of(row)
                for g, name in enumerate(GROUP_KEYS):
                    counts[g] += int(row[f"patches_{name}"])
                ok, failed = (ok + 1, failed) if row["status"] == S.STATUS_OK else (ok, failed + 1)
            if row is None:  # the execution is over: whatever did not come back is an error
                buffer += [lost_row(i, cfg) for i in pending.values()]
                failed += len(pending)
            if buffer and (row is None or len(buffer) >= cfg.window):
                if cfg.score is not None:  # the scores first: a manifest part never lacks its scores
                    Q.write_part(cfg.output, f"{run_id}-{parts:05d}", score_rows, cfg.storage_options)
                    scored += len(score_rows)
                write_part(cfg.output, f"{run_id}-{parts:05d}", buffer, cfg.storage_options)
                parts += 1
                buffer, score_rows = [], []
                if echo:
                    print(f"recorded {ok + failed}/{len(todo)}: {ok} ok, {failed} failed", flush=True)
            if row is None:
                break
    manifest = consolidate(cfg.output, [S.image_id(s) for s in sources], cfg.storage_options)
    if cfg.score is not None:
        scores = Q.consolidate(cfg.output, manifest, cfg.storage_options)
        if echo:
            nan, images = int(scores["value"].isna().sum()), scores["image_id"].nunique()
            print(f"scores: {len(scores)} values ({scored} new, {nan} failed) of {images} images -> "
                  f"{join(cfg.output, Q.SCORES_FILE)}", flush=True)
    summary = Summary(inputs=len(sources), skipped=len(sources) - len(todo), ok=ok, failed=failed,
                      seconds=time.perf_counter() - start, parts=parts, pools=pools)
    if echo:
        print(summary.line(), flush=True)
    return summary
