"""The driver's recording and terminal, without Ray: manifest parts by count and by time, merging, rows
kept through a storage outage, transient vs permanent errors, the progress line, the closing summary."""

from __future__ import annotations

import io
import time

import pytest

from pipeline import manifest as M
from pipeline import runner as R
from pipeline import schema as S
from pipeline.build import PipelineConfig
from pipeline.progress import Progress, duration


def row(i: int, status: str = "ok", stage: str = "decode") -> dict:
    meta = S.new_meta(source=f"/in/{i}.png", output=f"/out/{i}.png")
    if status != "ok":
        S.fail(meta, stage, OSError("bad"))
    return S.manifest_row(meta, image_id_=f"id{i}", sampling="x", seed=0, finished_at=float(i))


def test_parts_by_count_by_time_and_merged(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = PipelineConfig(input="/in", output=str(tmp_path), weights="w", rtm="r", window=3,
                         commit_seconds=3600)
    rec = R.Recorder(cfg, "run")
    for i in range(2):
        rec.add(row(i))
    assert not rec.due()  # 2 rows < window, and the last commit was just now
    rec.add(row(2))
    assert rec.due() and rec.commit()  # 3 rows: a part
    rec.add(row(3))
    rec.last -= 3601  # the commit interval has passed: a part with one row
    assert rec.due() and rec.commit()
    parts = sorted((tmp_path / "_manifest").iterdir())
    assert [len(M.read_parts(str(tmp_path), {}))] == [4] and len(parts) == 2
    rec.close()  # the run's small parts merged into one
    parts = sorted((tmp_path / "_manifest").iterdir())
    assert len(parts) == 1 and sorted(M.read_parts(str(tmp_path), {})["id"]) == [f"id{i}" for i in range(4)]
    # every COMPACT_EVERY small parts are merged while the run goes; merged parts are not merged again
    monkeypatch.setattr(R, "COMPACT_EVERY", 2)
    rec = R.Recorder(cfg, "run2")
    for i in range(10, 16):
        rec.add(row(i))
        rec.commit()
    assert len(list((tmp_path / "_manifest").glob("part-run2-c*"))) == 3
    assert not list((tmp_path / "_manifest").glob("part-run2-0*"))
    assert len(M.read_parts(str(tmp_path), {})) == 10


def test_rows_survive_a_storage_outage(tmp_path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    cfg = PipelineConfig(input="/in", output=str(tmp_path), weights="w", rtm="r")
    rec = R.Recorder(cfg, "run")

    def down(uri: str, data: bytes, options: dict) -> None:
        raise OSError("endpoint gone")

    monkeypatch.setattr(M, "write_bytes_atomic", down)
    rec.add(row(0))
    assert not rec.commit() and rec.error == "OSError: endpoint gone"
    rec.add(row(1))
    assert not rec.commit()
    assert capsys.readouterr().err.count("warning: cannot record results") == 1  # said once
    monkeypatch.undo()
    assert rec.commit() and rec.error == "" and rec.rows == []
    assert sorted(M.read_parts(str(tmp_path), {})["id"]) == ["id0", "id1"]


def test_error_text_names_the_file(tmp_path) -> None:
    cfg = PipelineConfig(input="/in", output=str(tmp_path), weights="w", rtm="r")
    rec = R.Recorder(cfg, "run")
    bad = row(7, "error")
    bad["error"] = "decode: UnidentifiedImageError: cannot identify image file <_io.BytesIO object at 0x7fd5>"
    rec.add(bad)
    assert rec.rows[0]["error"] == "decode: UnidentifiedImageError: cannot identify image file 7.png"


def test_permanent_and_transient_errors() -> None:
    assert M.is_permanent("decode: UnidentifiedImageError: cannot identify image file a.png")
    assert M.is_permanent("decode: ImageTooLarge: 5000x5000 = 25000000 pixels is over the limit")
    for error in ("read: ClientError: 503", "assemble: OSError: disk full", "pipeline: no result came back",
                  "grm: OutOfMemoryError: CUDA", "dit: RuntimeError: x", ""):
        assert not M.is_permanent(error), error
    rows = M.latest(M.pd.DataFrame([row(0, "error"), row(1, "error", stage="read"), row(2)]))
    planned = {"id0": "/out/0.png", "id1": "/out/1.png", "id2": "/out/2.png"}
    assert list(M.permanent_failures(rows, planned)["id"]) == ["id0"]
    assert M.permanent_failures(rows.iloc[0:0], planned).empty


def test_progress_line_in_a_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    bar = Progress(10, stream=stream, interval=30)
    bar.update(1, 0)
    now[0] += 10
    bar.update(4, 1)  # within the interval: nothing printed
    assert stream.getvalue() == ""
    now[0] += 25
    bar.update(5, 1)
    now[0] += 35
    bar.update(5, 1)  # nothing new: no line until 10 intervals have passed (a heartbeat)
    now[0] += 300
    bar.update(5, 1)
    now[0] += 5
    bar.close()
    lines = stream.getvalue().splitlines()
    # 6 done 35 s after the first: 5 more in 35 s -> 0.14 images/s, 4 to go -> ETA 28 s
    assert lines == ["[6/10] 5 ok, 1 failed, 0.14 images/s, ETA 28s, 35s elapsed",
                     "[6/10] 5 ok, 1 failed, 0.01 images/s, ETA 4m56s, 6m10s elapsed",
                     "[6/10] 5 ok, 1 failed, 0.01 images/s, ETA 5m00s, 6m15s elapsed"]
    assert duration(75) == "1m15s" and duration(3700) == "1h01m"


def test_summary_lists_the_first_20_failures_and_the_manifest() -> None:
    failures = [(f"/in/{i:02d}.png", "decode: OSError: bad") for i in range(23)]
    summary = R.Summary(inputs=30, skipped=2, ok=5, failed=23, seconds=12.0, parts=1, pools=[],
                        failures=failures, manifest="/out/manifest.parquet")
    lines = summary.report()
    assert lines[0] == "done: 5 ok, 23 failed, 2 skipped (already done) of 30 inputs in 12.0 s, 2.33 images/s"
    assert lines[1] == "failed images (23):"
    assert lines[2:22] == [f"  /in/{i:02d}.png: decode: OSError: bad" for i in range(20)]
    assert lines[22:] == ["  ... and 3 more", "manifest: /out/manifest.parquet"]
    assert not summary.all_ok and R.Summary(3, 3, 0, 0, 1.0, 0, []).all_ok
