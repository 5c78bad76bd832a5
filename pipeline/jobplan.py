"""What there is to do: the job plan of ``upscale-dataset``, built once by the driver before Ray starts.

1. **Inputs, streamed.** Either a walk of ``--input`` (local: ``os.scandir``, folder by folder; object
   stores: one listing of the prefix) or ``--input-list FILE|s3://…`` (:func:`iter_input_list`: a text
   file, one path or URI a line; or a CSV/Parquet file with a ``key`` column, the layout of an S3
   Inventory report), read in chunks. Nothing holds a Python object per input: every chunk becomes
   Arrow columns (id, source, first-choice output name and its folded form), a few bytes per input.
2. **Output names** (``naming.py``): the first choice of every input, except for the few whose folded
   name is wanted twice or is an output folder's; only those go through ``naming.output_names``, with
   the names already given as ``taken``. Same result as naming all inputs at once, checked injective.
3. **Resume from the manifest**, not from a listing of the output root: the latest row per id of
   ``_manifest/`` (Arrow, seven columns), an anti-join of the planned ids against the finished ones
   (latest row ``ok`` and, on a local disk, the planned output present: one ``stat`` each; an object
   store's ``ok`` row is trusted: its object was written whole before the row). Permanent failures
   are kept unless ``--retry-failed``; with ``--score`` an image also needs its scores.
4. **Shards.** What is left is written as Parquet under ``OUTPUT/_jobplan/<run>/`` (:data:`SHARD_SCHEMA`,
   :data:`SHARD_ROWS` rows a file in row groups of :data:`BLOCK_ROWS`); ``build.py`` reads them a row
   group at a time, so Ray Data never sees a list of every image. The driver keeps counts.

Estimates (``--dry-run``, pool sizes): :func:`estimate` reads image headers (all of them up to
``--dry-run-sample``, else a sample) and turns sizes into patches, and patches into patch-steps with
the group shares (:func:`group_shares`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema as S
from pipeline.io import (
    MANIFEST_DIR,
    REFUSED,
    WORK_DIR,
    exact_relative,
    filesystem,
    is_remote,
    join,
    list_files,
    normalize_root,
    read_bytes,
    remove_partials,
    write_bytes_atomic,
)
from pipeline.manifest import is_permanent, read_latest
from pipeline.naming import UnsafeName, first_name, fold, output_names

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.build import PipelineConfig

BLOCK_ROWS = 1024  # rows per row group: what one Ray Data read task reads
SHARD_ROWS = 64 * BLOCK_ROWS  # rows per shard file
CHUNK = 65536  # inputs turned into Arrow columns at a time
SHARD_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("output", pa.string()),
                          ("meta", pa.string())])  # meta: JSON of map/eval info, "" when none
PRIOR_SHARES = (1 / 3, 1 / 3, 1 / 3)  # simple, medium, hard: train-grm's calibration target
KEY_COLUMNS = ("key", "path", "uri", "source")  # the column of an input list that names the files


@dataclass
class JobPlan:
    inputs: int  # distinct inputs listed
    todo: int  # to run now
    done: int  # finished by an earlier run
    kept: pd.DataFrame  # latest rows (source, error) of permanent failures that are not retried
    ids: pa.Array  # the id of every input (the consolidated manifest's rows)
    shards: list[str] = field(default_factory=list)  # URIs of the todo shards (SHARD_SCHEMA)
    work: str = ""  # the folder of the shards, removed when the run ends
    shares: tuple[float, float, float] = PRIOR_SHARES  # expected patch shares of the groups
    shares_from: str = "prior"
    sample: list[str] = field(default_factory=list)  # todo sources evenly spaced, for estimates

    @property
    def blocks(self) -> list[tuple[str, int]]:
        """(shard URI, row group) of every block of todo rows."""
        groups = math.ceil(SHARD_ROWS / BLOCK_ROWS)
        out = []
        for i, uri in enumerate(self.shards):
            rows = min(SHARD_ROWS, self.todo - i * SHARD_ROWS)
            out += [(uri, g) for g in range(min(groups, math.ceil(rows / BLOCK_ROWS)))]
        return out


# --- inputs ------------------------------------------------------------------------------------------


def _hidden(name: str) -> bool:
    return name.startswith(".") and name not in (".", "..")


def walk_local(root: str, skip: str) -> Iterator[str]:
    """Every file under the local folder ``root`` as ``io.list_files`` finds them (hidden files and
    folders, the top-level ``_manifest``/``_jobplan`` and everything under ``skip`` left out), folder
    by folder, unsorted. A file ``root`` is a list of one."""
    if os.path.isfile(root):
        yield root
        return
    if not os.path.isdir(root):
        raise FileNotFoundError(f"input not found: {root}")
    skip = skip.rstrip(os.sep)
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if _hidden(entry.name):
                    continue
                path = os.path.join(folder, entry.name)
                if entry.is_dir():
                    if path == skip or (folder == root and entry.name in (MANIFEST_DIR, WORK_DIR)):
                        continue
                    stack.append(path)
                elif entry.is_file():
                    yield path


def iter_listing(root: str, skip: str, options: dict[str, Any]) -> Iterator[str]:
    """The inputs under ``root`` (normalised); object stores through ``io.list_files``."""
    if is_remote(root):
        prefix = skip.rstrip("/") + "/"
        yield from (s for s in list_files(root, options) if not s.startswith(prefix))
    else:
        yield from walk_local(root, skip)


def _resolve(root: str, name: str) -> str:
    """An input list's entry as a URI: URIs and absolute paths as they are, others under ``root``."""
    if name.startswith("/") or "://" in name:
        return name
    return f"{root.rstrip('/')}/{name}" if is_remote(root) else os.path.join(root, name)


def iter_input_list(uri: str, root: str, options: dict[str, Any]) -> Iterator[str]:
    """The entries of ``--input-list``: ``.parquet`` or ``.csv`` with a ``key`` (or ``path``/``uri``/
    ``source``) column and an optional ``bucket`` column (S3 Inventory; a header-less CSV is read as an
    inventory report: bucket, URL-encoded key, ...), else a text file of one path or URI a line (blank
    lines and ``#`` comments skipped). Keys without a scheme are relative to ``root`` unless a
    ``bucket`` column names theirs."""
    name = uri.lower().rsplit("/", 1)[-1]
    fs, path = filesystem(uri, options)
    if name.endswith(".parquet"):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            key = next((k for k in KEY_COLUMNS if k in names), None)
            if key is None:
                raise ValueError(f"--input-list {uri}: no column named {' or '.join(KEY_COLUMNS)}")
            cols = [key] + (["bucket"] if "bucket" in names else [])
            for batch in pf.iter_batches(batch_size=CHUNK, columns=cols):
                keys = batch.column(key).to_pylist()
                buckets = batch.column("bucket").to_pylist() if "bucket" in cols else None
                for i, k in enumerate(keys):
                    yield f"s3://{buckets[i]}/{k}" if buckets else _resolve(root, k)
        return
    with fs.open(path, "rt", encoding="utf-8", newline="") as f:
        if name.endswith(".csv"):
            rows = csv.reader(f)
            first = next(rows, None)
            if first is None:
                return
            header = [c.strip().lower() for c in first]
            key = next((k for k in KEY_COLUMNS if k in header), None)
            if key is None:  # S3 Inventory CSV: bucket, key (URL-encoded), ... and no header
                for row in [first, *rows] if first else rows:
                    if len(row) >= 2:
                        yield f"s3://{row[0]}/{urllib.parse.unquote_plus(row[1])}"
                return
            k, b = header.index(key), header.index("bucket") if "bucket" in header else None
            for row in rows:
                if len(row) > k and row[k]:
                    yield f"s3://{row[b]}/{row[k]}" if b is not None else _resolve(root, row[k])
            return
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip() and not line.lstrip().startswith("#"):
                yield _resolve(root, line)


def iter_sources(cfg: PipelineConfig) -> Iterator[str]:
    """Every input of ``cfg`` (duplicates included): ``cfg.sources``, ``cfg.input_list`` or the
    listing of ``cfg.input``."""
    in_root, out_root = normalize_root(cfg.input), normalize_root(cfg.output)
    if cfg.sources is not None:
        outside = [s for s in cfg.sources if exact_relative(in_root, s) is None]
        if outside:
            raise ValueError(f"inputs outside the input root {in_root}: {sorted(outside)[:3]}")
        yield from cfg.sources
    elif cfg.input_list:
        yield from iter_input_list(cfg.input_list, in_root, cfg.storage_options)
    else:
        yield from iter_listing(in_root, out_root, cfg.storage_options)


def list_sources(cfg: PipelineConfig) -> list[str]:
    """The inputs as a sorted list (small jobs: ``--score-hr`` pairs them by name)."""
    return sorted(set(iter_sources(cfg)))


# --- output names ------------------------------------------------------------------------------------


def _columns(sources: list[str], in_root: str, ext: str, folders: set[str]) -> pa.Table:
    """id, source, first-choice output name (or ``REFUSED`` + reason) and its fold; ``folders`` gets
    the folded output folders."""
    ids, names, folds = [], [], []
    seen: set[str] = set()
    for source in sources:
        ids.append(S.image_id(source))
        rel = exact_relative(in_root, source)
        if rel is None:
            names.append(f"{REFUSED}it is not under the input root {in_root}")
            folds.append(None)
            continue
        try:
            name = first_name(rel, ext)
        except UnsafeName as exc:
            names.append(f"{REFUSED}{exc}")
            folds.append(None)
            continue
        names.append(name)
        folds.append(fold(name))
        folder = name.rpartition("/")[0]
        if folder and folder not in seen:
            seen.add(folder)
            parts = folder.split("/")
            folders.update(fold("/".join(parts[:i])) for i in range(1, len(parts) + 1))
    return pa.table({"id": pa.array(ids, pa.string()), "source": pa.array(sources, pa.string()),
                     "name": pa.array(names, pa.string()), "fold": pa.array(folds, pa.string())})


def _unique_sorted(table: pa.Table) -> pa.Table:
    """The rows by source, each source once: one ``take`` (order and duplicates from the sources)."""
    order = pc.sort_indices(table, sort_keys=[("source", "ascending")])
    if table.num_rows >= 2:
        src = table["source"].take(order)
        new = pc.not_equal(src.slice(1), src.slice(0, table.num_rows - 1)).combine_chunks()
        order = order.filter(pa.concat_arrays([pa.array([True]), new]))
    return table.take(order)


def name_outputs(table: pa.Table, in_root: str, out_root: str, ext: str, folders: set[str]) -> pa.Array:
    """The output URI (or ``REFUSED`` + reason) of every row of ``table`` (``_columns``), as
    ``io.plan_outputs`` gives them for the same set of inputs."""
    folds = table["fold"]
    counts = pa.table({"fold": folds}).group_by("fold").aggregate([("fold", "count")])
    twice = counts.filter(pc.greater(counts["fold_count"], 1))["fold"]
    folder_set = pa.array(sorted(folders), pa.string())
    clash = pc.fill_null(pc.or_(pc.is_in(folds, value_set=twice.combine_chunks()),
                                pc.is_in(folds, value_set=folder_set)), False)
    names = table["name"].to_pylist() if pc.any(clash).as_py() else None
    if names is not None:  # the few contenders: naming.output_names, with every other name taken
        rows = pc.indices_nonzero(clash).to_pylist()
        rels = {i: exact_relative(in_root, table["source"][i].as_py()) or "" for i in rows}
        free = pc.invert(clash)
        given = pc.filter(folds, free)
        wanted = {fold(n) for i in rows for n in _wishes(rels[i], ext, len(rows))}
        hits = pc.filter(pa.array(sorted(wanted), pa.string()),
                         pc.is_in(pa.array(sorted(wanted), pa.string()), value_set=given.combine_chunks()))
        taken = set(hits.to_pylist()) | set(folders)
        for i, name in output_names(rels, ext, taken=taken).items():
            names[i] = f"{REFUSED}{name}" if isinstance(name, UnsafeName) else name
        final = [fold(n) for n in names if not n.startswith(REFUSED)]
        if len(final) != len(set(final)):  # a hashed name met a free one: name them all at once
            every = {}
            for i, source in enumerate(table["source"].to_pylist()):
                rel = exact_relative(in_root, source)
                if rel is not None:
                    every[i] = rel
            for i, name in output_names(every, ext).items():
                names[i] = f"{REFUSED}{name}" if isinstance(name, UnsafeName) else name
    column = pa.chunked_array([pa.array(names, pa.string())]) if names is not None else table["name"]
    prefix = out_root.rstrip("/") + "/"  # io.join on POSIX paths and URIs alike
    joined = pc.binary_join_element_wise(prefix, column, "")
    return pc.if_else(pc.starts_with(column, REFUSED), column, joined)


def _wishes(rel: str, ext: str, contenders: int) -> list[str]:
    """The names an input may end up with (``naming`` rules 1-4), for the ``taken`` look-up."""
    from pipeline.naming import _candidates, _segments

    try:
        names = _candidates(rel, _segments(rel), ext)
    except UnsafeName:
        return []
    stem, ext_ = os.path.splitext(names[-1])
    return names + [f"{stem}~{n}{ext_}" for n in range(2, contenders + 3)]


# --- the manifest --------------------------------------------------------------------------------


def _present(outputs: pa.ChunkedArray) -> pa.Array:
    """Whether each local output exists (a ``stat`` each, CHUNK names at a time)."""
    flags: list[bool] = []
    for start in range(0, len(outputs), CHUNK):
        flags += [os.path.exists(o) for o in outputs.slice(start, CHUNK).to_pylist()]
    return pa.array(flags, pa.bool_())


def group_shares(cfg: PipelineConfig, rows: pa.Table | None = None) -> tuple[tuple[float, float, float], str]:
    """Expected shares of the patches in the simple/medium/hard groups: measured by earlier runs into
    this output (the manifest's patch counts), else the checkpoint's γ calibration (``train-grm`` writes
    its group counts to ``training_state.json``), else equal thirds."""
    if rows is not None and rows.num_rows and "patches_simple" in rows.column_names:
        sums = [pc.sum(rows[f"patches_{g}"]).as_py() or 0 for g in ("simple", "medium", "hard")]
        if sum(sums) > 0:
            return tuple(s / sum(sums) for s in sums), "this output's manifest"  # type: ignore[return-value]
    try:
        doc = json.loads(read_bytes(join(cfg.weights, "training_state.json"), cfg.storage_options))
        groups = doc["state"]["calibration"]["groups"]
        counts = [float(groups[g]) for g in ("simple", "medium", "hard")]
        if sum(counts) > 0:
            return tuple(c / sum(counts) for c in counts), "the checkpoint's calibration"  # type: ignore
    except Exception:  # no training state next to the weights (e.g. the demo checkpoint): the prior
        pass
    return PRIOR_SHARES, "prior (equal thirds)"


# --- the plan ------------------------------------------------------------------------------------


def plan_job(cfg: PipelineConfig, *, write: bool = True, sample: int = 64) -> JobPlan:
    """What this run has to do (no Ray). With ``cfg.score`` the metric weights are checked first
    (``eval.metrics.MissingWeightsError``). ``write=False`` (``--dry-run``): no shard is written and
    nothing under the output is touched. ``plan.sample``: up to ``sample`` todo inputs, evenly spaced."""
    from pipeline.decode import EXTENSIONS, FORMATS

    if cfg.score is not None:
        from eval.metrics import check_weights, resolve_cache_dir

        check_weights(cfg.score.metrics, resolve_cache_dir(cfg.score.cache_dir))
    if cfg.fmt not in FORMATS:
        raise ValueError(f"unknown output format {cfg.fmt!r}; choose one of {sorted(FORMATS)}")
    cfg.output = normalize_root(cfg.output)
    in_root, out_root, ext = normalize_root(cfg.input), cfg.output, EXTENSIONS[cfg.fmt]
    folders: set[str] = set()
    chunks, buf = [], []
    inside_output = out_root.rstrip("/") + ("/" if is_remote(out_root) else os.sep)
    for source in iter_sources(cfg):
        if not source.startswith(inside_output):
            buf.append(source)
        if len(buf) >= CHUNK:
            chunks.append(_columns(buf, in_root, ext, folders))
            buf = []
    if buf or not chunks:
        chunks.append(_columns(buf, in_root, ext, folders))
    table = _unique_sorted(pa.concat_tables(chunks))
    del chunks
    table = table.set_column(2, "output", name_outputs(table, in_root, out_root, ext, folders))
    table = table.drop_columns(["fold"])
    if write:
        remove_partials(out_root)
    cols = ["id", "status", "error", "finished_at", "patches_simple", "patches_medium", "patches_hard"]
    rows = read_latest(out_root, cfg.storage_options, cols, ids=table["id"].combine_chunks())
    shares = group_shares(cfg, rows.filter(pc.equal(rows["status"], S.STATUS_OK)))
    done = pa.array([], pa.string())
    kept = pa.table({"id": pa.array([], pa.string()), "source": pa.array([], pa.string()),
                     "error": pa.array([], pa.string())})
    if not cfg.overwrite:
        ok = rows["id"].filter(pc.equal(rows["status"], S.STATUS_OK)).combine_chunks()
        planned = pc.is_in(table["id"], value_set=ok)
        done = table["id"].filter(planned).combine_chunks()  # an object store's ok rows are trusted: the
        if not is_remote(out_root):  # object was written whole before its row; on disk it must be there
            done = done.filter(_present(table["output"].filter(planned)))
        if cfg.score is not None and len(done):
            done = _scored(cfg, table, rows, done)
        if not cfg.retry_failed:
            failed = rows.filter(pc.equal(rows["status"], S.STATUS_ERROR))
            permanent = pa.array([is_permanent(e) for e in failed["error"].to_pylist()], pa.bool_())
            kept = failed.filter(permanent).select(["id", "error"])
            sources = table.filter(pc.is_in(table["id"], value_set=kept["id"].combine_chunks()))
            kept = kept.join(sources.select(["id", "source"]), "id").select(["id", "source", "error"])
    skip = pa.concat_arrays([done, kept["id"].combine_chunks()]) if kept.num_rows else done
    todo = table.filter(pc.invert(pc.is_in(table["id"], value_set=skip)))
    plan = JobPlan(inputs=table.num_rows, todo=todo.num_rows, done=len(done),
                   kept=kept.select(["source", "error"]).to_pandas(), ids=table["id"].combine_chunks(),
                   shares=shares[0], shares_from=shares[1])
    if todo.num_rows and sample:  # evenly spaced over the sorted inputs
        step = max(1, todo.num_rows // sample)
        plan.sample = todo["source"].take(pa.array(range(0, todo.num_rows, step))[:sample]).to_pylist()
    if write and todo.num_rows:
        plan.work, plan.shards = write_shards(cfg, todo)
    return plan


def _scored(cfg: PipelineConfig, table: pa.Table, rows: pa.Table, done: pa.Array) -> pa.Array:
    """The ids of ``done`` whose latest ok row has a score for every metric it should get."""
    from pipeline import scores as Q

    sub = table.filter(pc.is_in(table["id"], value_set=done))
    required = {i: Q.required_metrics(cfg, Q.eval_info(cfg, s))
                for i, s in zip(sub["id"].to_pylist(), sub["source"].to_pylist(), strict=True)}
    frame = rows.select(["id", "status", "finished_at"]).to_pandas()
    return pa.array(sorted(Q.scored_ids(cfg.output, frame, required, cfg.storage_options)), pa.string())


def _meta(cfg: PipelineConfig, sources: list[str], outputs: list[str]) -> list[str]:
    """The ``meta`` column of the shards: the image's group-map URI and scoring info, when asked for."""
    if not cfg.maps and cfg.score is None:
        return [""] * len(sources)
    from pipeline import scores as Q

    out = []
    for source, output in zip(sources, outputs, strict=True):
        extra: dict[str, Any] = {}
        if cfg.maps and not output.startswith(REFUSED):
            extra["map"] = Q.map_uri(cfg.output, output)
        if cfg.score is not None:
            extra["eval"] = Q.eval_info(cfg, source)
        out.append(json.dumps(extra, separators=(",", ":")))
    return out


def write_shards(cfg: PipelineConfig, todo: pa.Table) -> tuple[str, list[str]]:
    """Write ``todo`` (id, source, output; sorted) as shards under a new ``OUTPUT/_jobplan/<run>/``
    (earlier runs' folders are removed first); returns (folder, shard URIs)."""
    clear_work(cfg.output, cfg.storage_options)
    work = join(cfg.output, WORK_DIR, time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6])
    uris = []
    for n, start in enumerate(range(0, todo.num_rows, SHARD_ROWS)):
        part = todo.slice(start, SHARD_ROWS)
        meta = _meta(cfg, part["source"].to_pylist(), part["output"].to_pylist())
        part = pa.table({"id": part["id"], "source": part["source"], "output": part["output"],
                         "meta": pa.array(meta, pa.string())}, schema=SHARD_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(part, buf, row_group_size=BLOCK_ROWS)
        uri = join(work, f"todo-{n:05d}.parquet")
        write_bytes_atomic(uri, buf.getvalue(), cfg.storage_options)
        uris.append(uri)
    return work, uris


def clear_work(output: str, options: dict[str, Any]) -> None:
    """Remove ``OUTPUT/_jobplan`` (the shards of earlier runs)."""
    fs, path = filesystem(join(output, WORK_DIR), options)
    try:
        if fs.exists(path):
            fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def read_block(uri: str, group: int, options: dict[str, Any]) -> pa.Table:
    """One row group of a shard."""
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read_row_group(group)


def to_items(table: pa.Table) -> dict[str, Any]:
    """Shard rows -> the pipeline's first rows (image id + meta, ``schema.new_meta``)."""
    metas = []
    for source, output, extra in zip(table["source"].to_pylist(), table["output"].to_pylist(),
                                     table["meta"].to_pylist(), strict=True):
        info = json.loads(extra) if extra else {}
        metas.append(S.dump_meta(S.new_meta(source=source, output=output, map_uri=info.get("map", ""),
                                            eval_info=info.get("eval"))))
    return {S.IMAGE_ID: S.object_column(table["id"].to_pylist()), S.META: S.object_column(metas)}


def todo_rows(plan: JobPlan, options: dict[str, Any]) -> Iterator[pa.Table]:
    """The todo shards' rows, a row group at a time (the driver: rows that never came back)."""
    for uri, group in plan.blocks:
        yield read_block(uri, group, options)


# --- estimates (--dry-run) -------------------------------------------------------------------------


@dataclass
class Estimate:
    images: int  # todo images
    sampled: int  # headers read
    failed: int  # sampled files whose header did not read
    pixels: float  # total LR pixels of the todo images (extrapolated when sampled < images)
    patches: float  # total latent patches
    patch_steps: float  # Patch-DiT patch-steps with the group shares
    out_pixels: float = 0.0

    @property
    def extrapolated(self) -> bool:
        return self.sampled < self.images


def image_size(uri: str, options: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of an image from its header (Pillow reads no pixels)."""
    from PIL import Image

    if is_remote(uri):
        fs, path = filesystem(uri, options)
        with fs.open(path, "rb", block_size=1 << 16) as f, Image.open(f) as im:
            return im.height, im.width
    with Image.open(uri) as im:
        return im.height, im.width


def patches_of(config: Any, height: int, width: int) -> int:
    """Latent patches of an LR image of ``height`` x ``width`` (``upscaler.restore``'s padding)."""
    from patchscaler.patching import plan_grid

    f = config.autoencoder.downsample_factor
    s = config.sampler
    grid = plan_grid(math.ceil(config.scale * height / f), math.ceil(config.scale * width / f),
                     patch=s.patch_size, overlap=s.overlap)
    return grid.num_patches


def estimate(config: Any, plan: JobPlan, options: dict[str, Any], *, mode: str | None = None) -> Estimate:
    """Pixels, patches and patch-steps of the todo images from the headers of ``plan.sample`` (all todo
    inputs when ``plan_job`` was asked for a sample that large, else evenly spaced ones, extrapolated)."""
    picked = plan.sample
    pixels = patches = out_pixels = 0.0
    failed = 0
    for uri in picked:
        try:
            h, w = image_size(uri, options)
        except Exception:  # not an image: the run makes it an error row
            failed += 1
            continue
        pixels += h * w
        out_pixels += h * w * config.scale ** 2
        patches += patches_of(config, h, w)
    factor = plan.todo / len(picked) if picked else 0.0
    sampler = config.sampler
    steps = list(sampler.steps)
    per_patch = steps[-1] if (mode or sampler.mode) == "uniform" else sum(
        share * n for share, n in zip(plan.shares, steps, strict=True))
    return Estimate(images=plan.todo, sampled=len(picked), failed=failed, pixels=pixels * factor,
                    patches=patches * factor, patch_steps=patches * factor * per_patch,
                    out_pixels=out_pixels * factor)
