"""The driver of ``upscale-dataset``: list, skip what is finished, run, record.

1. :func:`plan_job` (``pipeline/jobplan.py``, no Ray): list the inputs (every non-hidden file under
   ``--input``, or ``--input-list``; outputs under the input folder are left out), plan one output per
   input, drop the finished ones (from the manifest) and the ones that failed permanently before (unless
   ``--retry-failed``), delete temp files a killed run left in a local output folder, and write what is
   left as Parquet shards. With nothing left to do the job ends here, without starting Ray.
2. :func:`run_pipeline`: run the rest as one streaming Ray Data execution (``build.py``); memory and
   object-store use are bounded by Ray Data's backpressure, not by the collection. A thread consumes
   the execution's rows while the driver records them (:class:`Recorder`: a manifest part at least every
   ``--commit-seconds``) and shows one progress line. A storage outage while recording does not stop
   the job: the rows stay in memory, are written at the next commit that succeeds, and the job ends
   with its summary and exit code 1 if some never could be. Automatic Patch-DiT pool sizes follow the
   plan's expected group shares (``jobplan.group_shares``), so every actor starts once. The driver stops
   the job (exit 1, the manifest intact) when no image finished for ``--stall-minutes`` or when more than
   ``--max-error-rate`` of the first 100 images failed; an image that kills its actor is stopped by the
   ledger (``pipeline/faults.py``).
3. Rewrite the consolidated manifest (and ``scores.parquet`` when scoring) and print a summary that
   lists the failed images.

Scores (``--score``) and group maps (``--maps``) of the same pass: see ``pipeline/scores.py``.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import queue
import re
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline import schema as S
from pipeline import scores as Q
from pipeline.build import PipelineConfig, cluster_nodes, iter_manifest_rows, plan_graph
from pipeline.io import SCORES_DIR, join, remove
from pipeline.jobplan import JobPlan, clear_work, plan_job, todo_rows
from pipeline.manifest import (
    COMPACT_EVERY,
    MANIFEST_FILE,
    consolidate,
    consolidate_table,
    finished_ids,
    part_uri,
    read_manifest,
    read_parts,
    remove_parts,
    write_part,
)
from pipeline.plan import block_bytes_of
from pipeline.progress import Progress
from pipeline.shared import LoadedAssets

# the manifest functions live in manifest.py; these names stay importable from here
__all__ = ["MANIFEST_FILE", "JobPlan", "PipelineConfig", "Summary", "consolidate", "finished_ids", "part_uri",
           "plan_job", "read_manifest", "read_parts", "run_pipeline", "write_part"]
SHOWN_FAILURES = 20
_IN_MEMORY = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def name_the_file(error: str, source: str) -> str:
    """Pillow names an in-memory file ``<_io.BytesIO object at 0x…>``; the manifest names the source."""
    return _IN_MEMORY.sub(posixpath.basename(source.replace(os.sep, "/")), error)


def _short(exc: BaseException) -> str:
    """``Type: first line of the message`` (Ray errors carry whole tracebacks), at most 300 chars."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@dataclass
class Summary:
    inputs: int
    skipped: int  # finished by an earlier run
    ok: int
    failed: int
    seconds: float
    parts: int  # manifest parts written
    pools: list[dict[str, int]]  # actors per pool, per execution
    kept: int = 0  # failed permanently before, not retried (--retry-failed)
    unrecorded: int = 0  # finished rows that could not be written to the manifest
    storage_error: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)  # (source, error), this run's first
    manifest: str = ""
    stopped: str = ""  # why the driver stopped the job early (--stall-minutes, --max-error-rate)

    @property
    def processed(self) -> int:
        return self.ok + self.failed

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def all_ok(self) -> bool:
        return not (self.failed or self.kept or self.unrecorded or self.storage_error or self.stopped)

    def line(self) -> str:
        text = (f"done: {self.ok} ok, {self.failed} failed, {self.skipped} skipped (already done) "
                f"of {self.inputs} inputs in {self.seconds:.1f} s")
        if self.processed:
            text += f", {self.images_per_second:.2f} images/s"
        if self.kept:
            text += f"; {self.kept} failed before and not retried (--retry-failed retries them)"
        if self.stopped:
            left = self.inputs - self.skipped - self.processed - self.kept
            text += f"; stopped ({self.stopped}), {left} not run: run the same command to resume"
        return text

    def report(self) -> list[str]:
        """The closing lines: the summary, the failed images (the first 20), where the manifest is."""
        lines = [self.line()]
        if self.failures:
            lines.append(f"failed images ({len(self.failures)}):")
            lines += [f"  {source}: {error}" for source, error in self.failures[:SHOWN_FAILURES]]
            if len(self.failures) > SHOWN_FAILURES:
                lines.append(f"  ... and {len(self.failures) - SHOWN_FAILURES} more")
        if self.unrecorded or self.storage_error:
            lines.append(f"error: storage failed, {self.unrecorded} results not recorded "
                         f"({self.storage_error}); run the same command again to redo them")
        if self.manifest:
            lines.append(f"manifest: {self.manifest}")
        return lines


def sampler_steps(config: Any, mode: str | None) -> tuple[int, int, int]:
    """Model calls per patch of each group, for sizing the pools (uniform: the hard group's)."""
    steps = tuple(config.sampler.steps)
    return (steps[-1],) * 3 if (mode or config.sampler.mode) == "uniform" else (steps[0], steps[1], steps[2])


def lost_row(item: dict[str, str], cfg: PipelineConfig, sampling: str, why: str) -> dict[str, Any]:
    """The manifest row of an image the execution did not return (redone by the next run); ``item``:
    its job plan row (id, source, output)."""
    meta = S.fail(S.new_meta(source=item["source"], output=item["output"]), "pipeline", RuntimeError(why))
    return S.manifest_row(meta, image_id_=item["id"], sampling=sampling, seed=cfg.seed,
                          finished_at=time.time())


def lost_items(plan: JobPlan, returned: set[str], options: dict[str, Any]) -> list[dict[str, str]]:
    """The job plan rows (id, source, output) whose ids did not come back, read from its shards."""
    if len(returned) >= plan.todo:
        return []
    out = []
    for block in todo_rows(plan, options):
        for row in block.select(["id", "source", "output"]).to_pylist():
            if row["id"] not in returned:
                out.append(row)
    return out


class Recorder:
    """Buffers finished rows and writes them as manifest (and score) parts, at least every
    ``commit_seconds`` and at most ``window`` rows per part; merges a run's parts as it goes. A failed
    write keeps the rows for the next commit (pipeline.io retries each write before giving up)."""

    def __init__(self, cfg: PipelineConfig, run_id: str) -> None:
        self.cfg, self.run_id = cfg, run_id
        self.rows: list[dict[str, Any]] = []
        self.scores: list[dict[str, Any]] = []
        self.parts: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = []  # small, unmerged
        self.n = self.written = self.scored = 0
        self.last = time.monotonic()
        self.error = ""

    def add(self, row: dict[str, Any]) -> None:
        scores = Q.rows_of(row)  # from the full row: the score rows travel in a column the manifest lacks
        row = {f.name: row[f.name] for f in S.MANIFEST_SCHEMA}
        row["error"] = name_the_file(row["error"], row["source"])
        self.rows.append(row)
        self.scores += scores

    def due(self) -> bool:
        return bool(self.rows) and (len(self.rows) >= self.cfg.window
                                    or time.monotonic() - self.last >= self.cfg.commit_seconds)

    def _write(self, name: str, rows: list[dict[str, Any]], scores: list[dict[str, Any]]) -> None:
        opts = self.cfg.storage_options
        if self.cfg.score is not None:  # the scores first: a manifest part never lacks its scores
            Q.write_part(self.cfg.output, name, scores, opts)
        write_part(self.cfg.output, name, rows, opts)

    def commit(self) -> bool:
        self.last = time.monotonic()
        if not self.rows:
            return True
        name = f"{self.run_id}-{self.n:05d}"
        try:
            self._write(name, self.rows, self.scores)
        except Exception as exc:  # storage outage: keep the rows, try again at the next commit
            if not self.error:
                print(f"warning: cannot record results ({_short(exc)}); retrying", file=sys.stderr,
                      flush=True)
            self.error = _short(exc)
            return False
        self.error = ""
        self.n += 1
        self.written += len(self.rows)
        self.scored += len(self.scores)
        self.parts.append((name, self.rows, self.scores))
        self.rows, self.scores = [], []
        if len(self.parts) >= COMPACT_EVERY:
            self.merge()
        return True

    def merge(self) -> None:
        """Merge the run's unmerged small parts into one (deleted after it is written). Merged parts are
        not merged again: a long run writes one file per ``COMPACT_EVERY`` commits, each once."""
        if len(self.parts) < 2:
            return
        names = [name for name, _, _ in self.parts]
        merged = f"{self.run_id}-c{self.n:05d}"
        try:
            self._write(merged, [r for _, rows, _ in self.parts for r in rows],
                        [r for _, _, scores in self.parts for r in scores])
        except Exception:  # merging only tidies up: the small parts hold the same rows
            return
        self.n += 1
        self.parts = []
        opts = self.cfg.storage_options
        with contextlib.suppress(Exception):
            remove_parts(self.cfg.output, names, opts)
            if self.cfg.score is not None:
                for name in names:
                    remove(join(self.cfg.output, SCORES_DIR, f"part-{name}.parquet"), opts)

    def close(self) -> None:
        self.commit()
        if not self.rows:
            self.merge()


def _pump(rows: Any, out: queue.Queue, stop: threading.Event) -> None:
    try:
        for row in rows:
            if stop.is_set():
                break
            out.put(("row", row))
    except BaseException as exc:  # the execution failed as a whole: the driver records the rest as lost
        out.put(("error", exc))
    finally:  # a stopped job: closing the stream shuts its execution down
        with contextlib.suppress(BaseException):
            rows.close()
    out.put(("end", None))


@dataclass
class _Tally:
    ok: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    pools: list[dict[str, int]] = field(default_factory=list)
    stopped: str = ""
    rate_checked: bool = False  # the --max-error-rate check ran (it runs once)


def stop_reason(cfg: PipelineConfig, tally: _Tally, *, todo: int, idle: float) -> str:
    """Why the driver should stop the job now ("" to go on), printed as one line: no image finished for
    ``--stall-minutes`` (``idle`` seconds), or more than ``--max-error-rate`` of the first images failed:
    checked once (``tally.rate_checked``) in a job of more than ``error_window`` images, at the first
    call that sees at least ``error_window`` done, on all the images done then."""
    if cfg.stall_minutes > 0 and idle >= cfg.stall_minutes * 60:
        return f"no image finished in {cfg.stall_minutes:g} minutes (--stall-minutes)"
    done = tally.ok + tally.failed
    if tally.rate_checked or todo <= cfg.error_window or done < cfg.error_window:
        return ""
    tally.rate_checked = True
    if tally.failed > cfg.max_error_rate * done:
        first = tally.failures[0][1] if tally.failures else ""
        return (f"{tally.failed} of the first {done} images failed, more than --max-error-rate "
                f"{cfg.max_error_rate:g} (check --weights, --rtm and the options; first error: {first})")
    return ""


def _execute(cfg: PipelineConfig, plan: JobPlan, assets: LoadedAssets, recorder: Recorder, progress: Progress,
             echo: bool) -> _Tally:
    import ray

    from pipeline.faults import start_ledger
    from pipeline.shared import share
    from pipeline.single import can_fuse

    model, rtm = share(assets)
    model_bytes = sum(t.numel() * t.element_size() for t in assets.model.state_dict().values())
    nodes = cluster_nodes()
    steps = sampler_steps(assets.model.config, cfg.mode)
    fused_ok = can_fuse(assets.model.config, cfg.mode)
    layout = cfg.resolved_layout(plan.todo)
    counts = {g: round(share * 1_000_000) for g, share in enumerate(plan.shares)}  # only the ratio counts
    tally = _Tally()
    graph = plan_graph(cfg, nodes, layout=layout, todo=plan.todo, counts=counts, steps=steps,
                       fused_ok=fused_ok, model_bytes=model_bytes,
                       image_bytes=block_bytes_of(assets.model.config, cfg.max_pixels))
    tally.pools.append({name: p.actors for name, p in graph.plan.pools.items()})
    if echo:
        print(f"running {plan.todo} images: {graph.describe()}", flush=True)
        for note in graph.plan.notes:
            print(f"note: {note}", flush=True)
    graph.ledger = start_ledger()
    returned: set[str] = set()  # ids that came back (at a million images: about 100 MB)
    rows: queue.Queue = queue.Queue()
    stream = iter_manifest_rows(cfg, plan.blocks, graph, model, rtm)
    stop = threading.Event()
    threading.Thread(target=_pump, args=(stream, rows, stop), daemon=True, name="pipeline-rows").start()
    why = "no result came back"
    last = time.monotonic()
    while True:
        try:
            kind, value = rows.get(timeout=0.5)
        except queue.Empty:
            kind, value = "", None
        if kind == "row" and value["id"] not in returned:
            last = time.monotonic()
            returned.add(value["id"])
            recorder.add(value)
            if value["status"] == S.STATUS_OK:
                tally.ok += 1
            else:
                tally.failed += 1
                tally.failures.append((value["source"], recorder.rows[-1]["error"]))
        elif kind == "error":
            why = f"the pipeline stopped: {_short(value)}"
            print(f"error: {why}", file=sys.stderr, flush=True)
        elif kind == "end":
            break
        if recorder.due():
            recorder.commit()
        progress.update(tally.ok, tally.failed)
        tally.stopped = stop_reason(cfg, tally, todo=plan.todo, idle=time.monotonic() - last)
        if tally.stopped:  # the images not run get no row: the next run does them
            stop.set()
            print(f"error: stopping the job: {tally.stopped}", file=sys.stderr, flush=True)
            break
    with contextlib.suppress(Exception):
        ray.kill(graph.ledger)
    if not tally.stopped:
        for item in lost_items(plan, returned, cfg.storage_options):  # an error each, redone next time
            row = lost_row(item, cfg, graph.sampling, why)
            recorder.add(row)
            tally.failed += 1
            tally.failures.append((row["source"], row["error"]))
    recorder.commit()
    return tally


def run_pipeline(cfg: PipelineConfig, *, echo: bool = True, plan: JobPlan | None = None,
                 assets: LoadedAssets | None = None, progress: bool = True) -> Summary:
    """Upscale every unfinished input of ``cfg.input`` into ``cfg.output``. Ray must be initialised when
    there is something to do (``plan.todo``); the checkpoint and RTM are loaded here unless ``assets``
    (``pipeline.shared.load_assets``) come with the call."""
    start = time.perf_counter()
    plan = plan or plan_job(cfg)
    if echo:
        kept = f", {len(plan.kept)} failed before (not retried)" if len(plan.kept) else ""
        print(f"{plan.inputs} inputs: {plan.todo} to do, {plan.done} already done{kept}", flush=True)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    recorder = Recorder(cfg, run_id)
    tally = _Tally()
    bar = Progress(plan.todo, enabled=echo and progress)
    try:
        if plan.todo:
            if assets is None:
                from pipeline.shared import load_assets

                assets = load_assets(cfg.weights, cfg.rtm, autoencoder=cfg.autoencoder)
            tally = _execute(cfg, plan, assets, recorder, bar, echo)
    finally:  # also on Ctrl-C: what finished is recorded
        recorder.close()
        bar.close()
        if plan.work:  # the shards: the next run writes its own
            with contextlib.suppress(Exception):
                clear_work(cfg.output, cfg.storage_options)
    storage_error = recorder.error
    consolidated = 0
    try:
        table = consolidate_table(cfg.output, plan.ids, cfg.storage_options,
                                  columns=["id", "status", "finished_at"])  # what scores.consolidate reads
        consolidated = table.num_rows
        if cfg.score is not None:
            scores = Q.consolidate(cfg.output, table.to_pandas(), cfg.storage_options)
            if echo:
                nan, images = int(scores["value"].isna().sum()), scores["image_id"].nunique()
                print(f"scores: {len(scores)} values ({recorder.scored} new, {nan} failed) of {images} "
                      f"images -> {join(cfg.output, Q.SCORES_FILE)}", flush=True)
    except Exception as exc:  # storage outage at the very end: the parts that were written stay
        storage_error = storage_error or _short(exc)
    kept = [(r.source, r.error) for r in plan.kept.itertuples()]
    summary = Summary(inputs=plan.inputs, skipped=plan.done, ok=tally.ok, failed=tally.failed,
                      seconds=time.perf_counter() - start, parts=recorder.n, pools=tally.pools,
                      kept=len(plan.kept), unrecorded=len(recorder.rows), storage_error=storage_error,
                      failures=sorted(tally.failures) + sorted(kept), stopped=tally.stopped,
                      manifest=join(cfg.output, MANIFEST_FILE) if consolidated else "")
    if echo:
        print("\n".join(summary.report()), flush=True)
    return summary

