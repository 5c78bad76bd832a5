"""The nightly benchmark's gate, history and strict pairing, without Ray: tolerances and directions,
baseline selection, the history file and its provenance, `patchscaler history`, DIV2K / name-template
pairing, missing references and size mismatches, and the help and report fixes."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from eval.datasets import check_references, load_dataset, pair_counts, save_png
from eval.gate import DEFAULT_TOLERANCES, check, parse_tolerances
from eval.history import (
    HISTORY_SCHEMA,
    HOME_ENV,
    RunInfo,
    append_run,
    dataset_fingerprint,
    default_history,
    images_path,
    read_image_history,
)
from eval.metrics import METRICS, MetricScorer
from eval.paper import paper_dataset
from eval.report import render_report
from eval.results import RESULT_SCHEMA, SUMMARY_SCHEMA, conform, summarize
from jobs.checks import UsageError
from jobs.cli import build_parser, main
from jobs.evaluate import check_expected, check_metric_weights


def results(values: dict[tuple[str, str], float], method: str = "patchscaler") -> pd.DataFrame:
    """Per-image rows of set `s`: {(image, metric): value}."""
    rows = [{"image_id": i, "dataset": "s", "metric": m, "value": v, "method": method,
             "sr_path": f"/x/{i}.png", "runtime_s": 1.0} for (i, m), v in values.items()]
    return conform(pd.DataFrame(rows), RESULT_SCHEMA)


def night(uri: str, run_id: str, t: float, values: dict[tuple[str, str], float],
          **info: object) -> pd.DataFrame:
    frame = results(values)
    return append_run(summarize(frame), frame, uri, run_id=run_id, timestamp=t,
                      info=RunInfo(device="cpu", datasets={"s": (str(info.get("fp", "f1")), 2)}))


BASE = {("a", "psnr"): 30.0, ("b", "psnr"): 20.0, ("a", "piqe"): 40.0, ("b", "piqe"): 50.0}


def test_tolerances_parse_and_refuse() -> None:
    assert parse_tolerances("musiq=0.5, psnr=0.05") == {"musiq": 0.5, "psnr": 0.05}
    for bad in ("musiq", "nope=1", "psnr=-1", "psnr=x"):
        with pytest.raises(ValueError):
            parse_tolerances(bad)
    assert set(DEFAULT_TOLERANCES) == set(METRICS)  # every metric has a default
    parser = build_parser("benchmark")
    assert parser.parse_args(["benchmark", "--dataset", "a=b", "--out", "o", "--tolerance", "psnr=0.05"]
                             ).tolerance == {"psnr": 0.05}
    assert main(["benchmark", "--dataset", "a=b", "--out", "o", "--tolerance", "psnr=oops"]) == 2


def test_gate_directions_tolerances_and_baselines(tmp_path: Path) -> None:
    uri = str(tmp_path / "h" / "history.parquet")
    night(uri, "n0", 100.0, BASE)
    # n1: psnr mean -0.04 (inside its 0.1 default), piqe (lower is better) -1.0: better -> passes
    n1 = {**BASE, ("a", "psnr"): 29.92, ("a", "piqe"): 38.0}
    night(uri, "n1", 200.0, n1)
    from eval.history import read_history
    hist, images = read_history(uri), read_image_history(uri)
    gate = check(hist, images, run_id="n1")
    assert gate.passed and gate.baseline_runs == ("n0",) and gate.compared == 2
    # a tighter psnr tolerance turns the same change into a regression naming image a
    gate = check(hist, images, run_id="n1", tolerances={"psnr": 0.01})
    (reg,) = gate.regressions
    assert (reg["set"], reg["metric"], reg["method"]) == ("s", "psnr", "patchscaler")
    assert reg["baseline_run"] == "n0"
    assert reg["baseline"] == 25.0 and reg["value"] == pytest.approx(24.96) and reg["tolerance"] == 0.01
    assert [i["image_id"] for i in reg["images"]] == ["a"]
    assert reg["images"][0]["delta"] == pytest.approx(-0.08)
    # n2: piqe rises by 3 (worse: lower is better) while psnr rises (better); b failed piqe
    n2 = {**n1, ("a", "psnr"): 31.0, ("a", "piqe"): 44.0, ("b", "piqe"): 50.0}
    night(uri, "n2", 300.0, n2, fp="f2")
    hist, images = read_history(uri), read_image_history(uri)
    gate = check(hist, images, run_id="n2")  # the previous run, n1
    assert [r["metric"] for r in gate.regressions] == ["piqe"] and gate.baseline_runs == ("n1",)
    assert gate.regressions[0]["delta"] == pytest.approx(3.0) and gate.regressions[0]["lower_better"]
    assert gate.regressions[0]["dataset_changed"]  # the set's file list changed since n1
    assert check(hist, images, run_id="n2", baseline_run="n0").passed is False
    pinned = check(hist, images, run_id="n2", baseline_run="n0", tolerances={"piqe": 5.0})
    assert pinned.passed and pinned.baseline_runs == ("n0",)  # piqe 45 -> 47: inside 5
    with pytest.raises(KeyError):
        check(hist, images, run_id="n2", baseline_run="nope")
    # a metric that failed on every image (NaN mean) regresses
    night(uri, "n3", 400.0, {**n2, ("a", "psnr"): math.nan, ("b", "psnr"): math.nan})
    hist, images = read_history(uri), read_image_history(uri)
    (reg,) = check(hist, images, run_id="n3").regressions
    assert reg["metric"] == "psnr" and reg["value"] is None
    assert [(i["image_id"], i["baseline"], i["value"]) for i in reg["images"]] == [("a", 31.0, None),
                                                                                  ("b", 20.0, None)]
    assert check(hist, images, run_id="n3").record()["gate"] == "regression"


def test_history_keeps_provenance_and_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    assert default_history() == str(tmp_path / "home" / "history.parquet")
    monkeypatch.delenv(HOME_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_history() == str(tmp_path / "xdg" / "patchscaler" / "history.parquet")
    assert images_path("s3://b/h/history.parquet") == "s3://b/h/history_images.parquet"
    uri = str(tmp_path / "history.parquet")
    hist = night(uri, "n0", 1_700_000_000.0, BASE)
    assert list(hist.columns) == HISTORY_SCHEMA.names
    from importlib.metadata import version
    row = hist.iloc[0]
    assert row["iqa_version"] == version("pyiqa") and row["torch_version"] == version("torch")
    assert row["date"] == "2023-11-14T22:13:20Z" and row["device"] == "cpu" and row["dataset_images"] == 2
    assert row["git_commit"] == "" or len(row["git_commit"]) == 40
    images = read_image_history(uri)
    assert len(images) == 4 and set(images["run_id"]) == {"n0"} and set(images["sr_path"]) == {"/x/a.png",
                                                                                                  "/x/b.png"}
    night(uri, "n0", 1_700_000_100.0, BASE)  # the same run id again replaces it
    assert len(read_image_history(uri)) == 4
    fp = dataset_fingerprint([("k", "/data/LR/k.png", "/data/HR/k.png")])
    assert fp == dataset_fingerprint([("k", "/elsewhere/LR/k.png", "/elsewhere/HR/k.png")])
    assert fp != dataset_fingerprint([("k", "/data/LR/k.png", "/data/HR/other.png")])


def test_history_command_prints_filtered_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = str(tmp_path / "history.parquet")
    night(uri, "n0", 1_764_547_200.0, BASE)  # 2025-12-01
    night(uri, "n1", 1_764_633_600.0, {**BASE, ("a", "psnr"): 32.0})  # 2025-12-02
    assert main(["history", "--history", uri, "--metric", "psnr"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| date | run_id | dataset | method | metric | mean |") and len(lines) == 4
    assert "| n1 | s | patchscaler | psnr | 26 |" in lines[3] and "| 1 |" in lines[3]  # change +1
    assert main(["history", "--history", uri, "--format", "csv", "--since", "2025-12-02", "--set", "s"]) == 0
    table = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    assert set(table["run_id"]) == {"n1"} and sorted(table["metric"]) == ["piqe", "psnr"]
    assert main(["history", "--history", uri, "--images", "--metric", "psnr", "--until", "2025-12-02"]) == 0
    assert capsys.readouterr().out.count("| n0 |") == 2
    assert main(["history", "--history", str(tmp_path / "none.parquet")]) == 2


def _png(path: Path, h: int, w: int) -> None:
    save_png(torch.rand(3, h, w, generator=torch.Generator().manual_seed(h * w)), path)


def test_div2k_layout_templates_and_strict_references(tmp_path: Path) -> None:
    div2k = tmp_path / "div2k"
    for n in ("0801", "0802"):
        _png(div2k / "DIV2K_valid_HR" / f"{n}.png", 32, 32)
        _png(div2k / "DIV2K_valid_LR_bicubic" / "X4" / f"{n}x4.png", 8, 8)
        _png(div2k / "DIV2K_valid_LR_bicubic" / "X2" / f"{n}x2.png", 16, 16)
    entries = load_dataset("div2k", str(div2k))  # auto-detected; only the X4 folder; x4 stripped
    assert [(e.key, Path(e.lr).name, Path(e.hr).name) for e in entries] == [
        ("0801", "0801x4.png", "0801.png"), ("0802", "0802x4.png", "0802.png")]
    # the paired layout with a name template: LR/0801x4.png pairs with HR/0801.png
    paired = tmp_path / "paired"
    _png(paired / "LR" / "0801x4.png", 8, 8)
    _png(paired / "HR" / "0801.png", 32, 32)
    _png(paired / "LR" / "0803x4.png", 8, 8)  # no HR
    plain = load_dataset("p", str(paired))
    assert pair_counts(plain) == {"images": 2, "with_hr": 0, "without_hr": 2}
    with pytest.raises(ValueError, match=r"2 of 2 LR images have no HR image for psnr: 0801x4\.png, 0803x4"):
        check_references("p", plain, ["psnr"])
    templated = load_dataset("p", str(paired), lr_template="{}x4")
    assert [(e.key, bool(e.hr)) for e in templated] == [("0801", True), ("0803", False)]
    with pytest.raises(ValueError, match=r"0803x4\.png"):
        check_references("p", templated, ["psnr", "ssim"])
    check_references("p", templated, [])  # no-reference metrics only: fine
    # realsr: an LR without its HR is kept, not dropped
    realsr = tmp_path / "realsr"
    _png(realsr / "x_LR4.png", 8, 8)
    _png(realsr / "x_HR.png", 32, 32)
    _png(realsr / "y_LR4.png", 8, 8)
    assert [(e.key, bool(e.hr)) for e in load_dataset("r", str(realsr))] == [("x", True), ("y", False)]
    check_expected({"r": 2}, [("r", 2)])
    with pytest.raises(UsageError, match="has 2 images"):
        check_expected({"r": 2}, [("r", 3)])
    with pytest.raises(UsageError, match="no --dataset q"):
        check_expected({"r": 2}, [("q", 2)])


def test_size_mismatch_is_an_error_not_a_crop(tmp_path: Path) -> None:
    scorer = MetricScorer(metrics=["psnr"], cache_dir=str(tmp_path), crop_border=4, size_slack=3)
    hr = torch.rand(3, 35, 34, generator=torch.Generator().manual_seed(0))
    (ok,) = scorer.score(hr[:, :32, :32], hr)  # a 35x34 HR is 3/2 px larger than the x4 output: rounding
    assert ok.error == "" and ok.value > 70
    (bad,) = scorer.score(hr[:, :24, :32], hr)
    assert math.isnan(bad.value) and "SizeMismatchError" in bad.error and "24x32" in bad.error


def test_help_pairs_weights_urls_and_paper_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["benchmark", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("(default: True)") == 1  # --overwrite only; --resume is its other half
    assert main(["benchmark", "--dataset", "a=b", "--out", "o", "--overwrite", "--resume"]) == 2
    assert "argument --resume: not allowed with argument --overwrite" in capsys.readouterr().err
    with pytest.raises(UsageError) as err:
        check_metric_weights(("psnr", "musiq", "lpips"), str(tmp_path))
    for _, url in (*METRICS["musiq"].files, *METRICS["lpips"].files):
        assert url in str(err.value)
    assert paper_dataset("realset65") is None and paper_dataset("realset110") == "RealSet110"
    assert paper_dataset("realsr") == "RealSR" and paper_dataset("lsdir-test") == "LSDIR-Test"
    # both ManIQA variants: the paper's column gets the PIPAL one, the KonIQ one is shown apart
    summary = conform(pd.DataFrame({
        "dataset": ["realsr"] * 3, "method": ["patchscaler"] * 3,
        "metric": ["maniqa-koniq", "maniqa-pipal", "musiq"],
        "mean": [0.1111, 0.2222, 55.0], "std": [0.0] * 3, "count": [1] * 3, "failed": [0] * 3,
        "lower_better": [False] * 3, "mean_runtime_s": [np.nan] * 3}), SUMMARY_SCHEMA)
    empty = conform(pd.DataFrame(), RESULT_SCHEMA)
    render_report(results=empty, summary=summary, history=pd.DataFrame(columns=HISTORY_SCHEMA.names),
                  out=str(tmp_path / "r"))
    md = (tmp_path / "r" / "report.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| **PatchScaler (this run)**"))
    assert "0.2222" in row and "0.1111" not in row and "55.00" in row
    assert "maniqa-koniq = 0.1111" in md and "ManIQA = maniqa-pipal" in md


def test_pipeline_scores_imports_nothing_from_eval() -> None:
    tree = ast.parse((Path(__file__).resolve().parent.parent / "pipeline" / "scores.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert modules and not any(m == "eval" or m.startswith("eval.") for m in modules if m)


def test_report_shows_worst_images_drops_with_crops_and_dates(tmp_path: Path) -> None:
    """Triage: the worst images, the biggest drops since the baseline run with crops of both runs'
    outputs, a dated trend with runtime, and the gate's table."""
    g = torch.Generator().manual_seed(0)
    hr = torch.rand(3, 32, 32, generator=g)
    save_png(hr, tmp_path / "hr.png")
    uri = str(tmp_path / "history.parquet")
    frames = {}
    for run, t, noise in (("n0", 1_764_547_200.0, 0.0), ("n1", 1_764_633_600.0, 0.4)):
        rows = []
        for image_id in ("a", "b"):
            sr = hr if image_id == "b" else (hr + noise * torch.rand(hr.shape, generator=g)).clamp(0, 1)
            save_png(sr, tmp_path / run / f"{image_id}.png")
            (v,) = MetricScorer(metrics=["psnr"], cache_dir=str(tmp_path)).score(sr, hr)
            rows.append({"image_id": image_id, "dataset": "s", "metric": "psnr", "value": min(v.value, 60.0),
                         "sr_path": str(tmp_path / run / f"{image_id}.png"),
                         "hr_path": str(tmp_path / "hr.png"),
                         "runtime_s": 2.0 if run == "n0" else 3.0, "method": "patchscaler"})
        frames[run] = conform(pd.DataFrame(rows), RESULT_SCHEMA)
        hist = append_run(summarize(frames[run]), frames[run], uri, run_id=run, timestamp=t)
    images = read_image_history(uri)
    gate = check(hist, images, run_id="n1")
    assert [r["images"][0]["image_id"] for r in gate.regressions] == ["a"]
    out = tmp_path / "report"
    render_report(results=frames["n1"], summary=summarize(frames["n1"]), history=hist, out=str(out),
                  image_history=images, gate=gate, worst=1, examples_per_dataset=0)
    md = (out / "report.md").read_text()
    assert "## Regression gate" in md and "## Worst 1 images per set and metric" in md
    worst = next(line for line in md.splitlines() if line.startswith("| s | patchscaler | psnr | a ("))
    assert "b (" not in worst  # only the worst one
    assert "## Biggest per-image drops since the baseline run" in md and "drop_000.png" in md
    assert "2025-12-01 00:00 (n0)" in md and "2025-12-02 00:00 (n1)" in md  # dated trend columns
    with Image.open(out / "drop_000.png") as png:  # baseline, this run and HR side by side
        assert png.size[0] > 2.5 * png.size[1]
    with Image.open(out / "trend.png") as png:
        png.verify()
