"""One pass: `upscale-dataset --score/--maps` writes images, IQA scores and group maps; the score records'
resume rules; `patchscaler benchmark` (upscale + score + report) twice into one history."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pipeline_data import im, make_assets

from eval.datasets import load_image, save_png
from eval.history import HISTORY_SCHEMA
from eval.metrics import MetricScorer, installed_version
from eval.results import RESULT_SCHEMA
from jobs.cli import build_parser, main
from patchscaler.upscaler import group_map, plan_patches, restore
from patchscaler.weights import load_checkpoint
from pipeline import schema as S
from pipeline import scores as Q
from pipeline.decode import decode_image, to_float
from pipeline.runner import read_manifest

pytestmark = pytest.mark.timeout(400)
NAMES = ("a.png", "b.png", "sub/c.png")  # LR 16x16, 12x20, 20x12
FAST = ["--fused", "--dit-actors", "1", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("bench")
    inputs = root / "in"
    (inputs / "sub").mkdir(parents=True)
    for name, (h, w), seed in zip(NAMES, ((16, 16), (12, 20), (20, 12)), (1, 2, 3), strict=True):
        im(h, w, seed).save(inputs / name)
    (inputs / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    weights, rtm = make_assets(root, inputs, list(NAMES))
    return SimpleNamespace(root=root, inputs=inputs, weights=weights, rtm=rtm,
                           model=["--weights", weights, "--rtm", rtm])


def bicubic_x4(path: Path) -> torch.Tensor:
    return F.interpolate(load_image(str(path))[None], scale_factor=4, mode="bicubic")[0].clamp(0, 1)


def test_upscale_dataset_scores_and_maps_in_one_pass(ray_session, assets, tmp_path: Path) -> None:
    out, cache = tmp_path / "out", tmp_path / "empty-cache"
    hr = tmp_path / "hr"  # references for a and c only, named by stem with _HR
    save_png(bicubic_x4(assets.inputs / "a.png"), hr / "a_HR.png")
    save_png(bicubic_x4(assets.inputs / "sub/c.png"), hr / "c.png")
    base = ["upscale-dataset", "--input", str(assets.inputs), "--output", str(out), *assets.model, *FAST,
            "--maps", "--metric-cache", str(cache), "--seed", "3"]
    assert main([*base, "--score", "piqe,musiq"]) == 2  # musiq's weights are missing: nothing starts
    assert not out.exists()
    assert main([*base, "--score", "piqe,psnr", "--score-hr", str(hr)]) == 1  # the corrupt file fails

    manifest = read_manifest(str(out))
    assert pq.read_schema(out / "manifest.parquet").remove_metadata() == S.MANIFEST_SCHEMA  # unchanged
    ok = manifest[manifest["status"] == "ok"].set_index("source")
    assert len(ok) == 3 and (manifest["status"] == "error").sum() == 1
    assert pq.read_schema(out / "scores.parquet").remove_metadata() == RESULT_SCHEMA
    assert list((out / "_scores").glob("part-*.parquet"))
    scores = pd.read_parquet(out / "scores.parquet")
    assert sorted(zip(scores["image_id"], scores["metric"], strict=True)) == [
        ("a", "piqe"), ("a", "psnr"), ("b", "piqe"), ("sub/c", "piqe"), ("sub/c", "psnr")]  # none: corrupt
    assert (scores["error"] == "").all() and np.isfinite(scores["value"]).all()
    assert set(scores["dataset"]) == {"in"} and set(scores["iqa_version"]) == {installed_version("pyiqa")}
    scorer = MetricScorer(metrics=["piqe", "psnr"], cache_dir=str(cache), crop_border=4)
    hr_of = {"a": str(hr / "a_HR.png"), "sub/c": str(hr / "c.png")}
    for r in scores.itertuples():
        row = ok.loc[r.lr_path]  # lr_path is the input
        assert r.sr_path == row["output"] and r.model_version == row["model_version"]
        assert r.runtime_s == pytest.approx(sum(row[f"seconds_{s}"] for s in S.STAGES))
        assert r.hr_path == hr_of.get(r.image_id, "")  # the image's reference, for each of its metrics
        sr = load_image(r.sr_path)  # the score is the written file's
        reference = load_image(r.hr_path) if r.hr_path else None
        (value,) = [v.value for v in scorer.score(sr, reference) if v.metric == r.metric]
        assert r.value == pytest.approx(value, rel=1e-6)

    # group maps: the GRM's groups of each image, one pixel per latent pixel, under _maps/<output stem>.png
    model = load_checkpoint(assets.weights)
    for name in NAMES:
        image = to_float(decode_image((assets.inputs / name).read_bytes(), max_pixels=1 << 20).rgb)
        plan = plan_patches(*restore(model, image), model, torch.Generator().manual_seed(3))
        with Image.open(out / "_maps" / name) as png:
            per_lr_pixel = model.config.scale / model.config.autoencoder.downsample_factor  # latent px
            size = (round(image.shape[-1] * per_lr_pixel), round(image.shape[-2] * per_lr_pixel))
            assert png.mode == "P" and png.size == size
            assert np.array_equal(np.asarray(png), group_map(plan.groups, plan.grid).numpy())
    assert not (out / "_maps" / "corrupt.png").exists()


def _part(ids_times: list[tuple[str, float]], metric: str, value: float) -> list[dict[str, object]]:
    return [{"image_id": i, "dataset": "d", "metric": metric, "value": value, "id": i, "finished_at": t}
            for i, t in ids_times]


def test_score_records_follow_the_latest_manifest_row(tmp_path: Path) -> None:
    """Resume: a skipped image keeps the scores of the run that made it, a redone one gets the new ones,
    an image whose latest row is an error has none; an image lacking a required metric is not done."""
    out = str(tmp_path)
    Q.write_part(out, "run1-00000", _part([("x", 1.0), ("y", 1.0), ("z", 1.0)], "piqe", 10.0), {})
    Q.write_part(out, "run2-00000", _part([("y", 2.0)], "piqe", 20.0) + _part([("y", 2.0)], "psnr", 30.0), {})
    latest = pd.DataFrame({"id": ["x", "y", "z"], "finished_at": [1.0, 2.0, 3.0],
                           "status": ["ok", "ok", "error"]})
    rows = Q.consolidate(out, latest, {})
    assert list(zip(rows["image_id"], rows["metric"], rows["value"], strict=True)) == [
        ("x", "piqe", 10.0), ("y", "piqe", 20.0), ("y", "psnr", 30.0)]
    assert pq.read_schema(tmp_path / "scores.parquet").remove_metadata() == RESULT_SCHEMA
    need = {"x": {"piqe", "psnr"}, "y": {"piqe", "psnr"}, "z": {"piqe"}}
    assert Q.scored_ids(out, latest, need, {}) == {"y"}
    assert Q.map_uri(out, str(tmp_path / "a" / "b.jpg")) == str(tmp_path / "_maps" / "a" / "b.png")


def test_benchmark_nightly_gate_history_and_report(ray_session, assets, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """As cron runs it: night-0 upscales and scores; night-1 (an interrupted night resumed, with a
    measured bicubic baseline) is clean and passes the gate; night-2 scores perturbed outputs of the same
    set into the same history (`evaluate`), and the gate fails with exit 3 naming the metric and image."""
    data = tmp_path / "tiny-set"  # the paired layout: LR/ and HR/ with the same names
    for name in ("a.png", "b.png"):
        (data / "LR").mkdir(parents=True, exist_ok=True)
        Image.open(assets.inputs / name).save(data / "LR" / name)
        save_png(bicubic_x4(data / "LR" / name), data / "HR" / name)
    out, history = tmp_path / "bench", tmp_path / "state" / "history.parquet"
    argv = ["benchmark", "--dataset", f"tiny={data}", "--out", str(out), *assets.model, *FAST,
            "--metrics", "psnr,ssim,piqe", "--metric-cache", str(tmp_path / "cache"),
            "--history", str(history), "--fail-on-regression", "--tolerance", "psnr=0.05"]
    assert build_parser("benchmark").parse_args(argv).overwrite  # a night redoes every image by default
    assert main([*argv, "--expect", "tiny=3"]) == 2  # the set has 2 images: nothing starts
    assert not out.exists()
    capsys.readouterr()
    assert main([*argv, "--run-id", "night-0", "--expect", "tiny=2"]) == 0
    first = pd.read_parquet(out / "scores.parquet")
    manifest = read_manifest(str(out / "results" / "tiny"))
    printed = capsys.readouterr().out
    assert "tiny: 2 images, 2 with HR, 0 without" in printed
    assert json.loads(printed.splitlines()[-1]) == {"gate": "pass", "run_id": "night-0", "baseline_run": None,
                                                     "compared": 0, "regressions": []}
    # night-1 resumes into the same --out (nothing is upscaled again, the finished images keep their
    # scores) and measures bicubic in the same run: clean, the gate passes
    assert main([*argv, "--run-id", "night-1", "--resume", "--baseline", "bicubic"]) == 0
    gate = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert gate["gate"] == "pass" and gate["baseline_run"] == "night-0" and gate["compared"] == 3
    assert read_manifest(str(out / "results" / "tiny"))["finished_at"].equals(manifest["finished_at"])

    hist = pd.read_parquet(history)
    assert pq.read_schema(history).remove_metadata() == HISTORY_SCHEMA
    assert list(hist.drop_duplicates("run_id")["run_id"]) == ["night-0", "night-1"]
    night1 = hist[hist["run_id"] == "night-1"]
    assert sorted(zip(night1["method"], night1["metric"], strict=True)) == [
        ("bicubic", "piqe"), ("bicubic", "psnr"), ("bicubic", "ssim"),
        ("patchscaler", "piqe"), ("patchscaler", "psnr"), ("patchscaler", "ssim")]
    assert (hist["count"] == 2).all() and (hist["failed"] == 0).all()
    ours = hist[hist["method"] == "patchscaler"].pivot(index="metric", columns="run_id", values="mean")
    assert ours["night-0"].equals(ours["night-1"]) and ours.notna().all().all()
    bicubic = night1[night1["method"] == "bicubic"].set_index("metric")
    assert bicubic.loc["psnr", "mean"] > 60  # the HR images are the bicubic upscales of the LR images
    assert set(hist["iqa_version"]) == {installed_version("pyiqa")} and set(hist["device"]) == {"cpu"}
    assert set(hist["weights_uri"]) == {assets.weights} and len(hist["weights_sha256"].iloc[0]) == 64
    assert hist["dataset_fingerprint"].nunique() == 1 and (hist["dataset_images"] == 2).all()
    assert (hist["crop_border"] == 4).all() and (hist["seed"] == 0).all() and (hist["date"] != "").all()
    scores = pd.read_parquet(out / "scores.parquet")
    assert scores[scores["method"] == "patchscaler"].reset_index(drop=True).equals(first)
    assert all(p.endswith(f"HR/{i}.png") for i, p in zip(first["image_id"], first["hr_path"], strict=True))
    assert (out / "summary.csv").read_text().startswith("dataset,method,metric,mean")

    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Trend over 2 run(s)" in page
    assert "Worst 5 images per set and metric" in page and "Regression gate" in page
    pngs = re.findall(r"src='([^']+)'", page)
    assert {"trend.png", "crops_000.png", "groups_000.png"} <= set(pngs)  # the group map over the image
    for name in pngs:
        with Image.open(out / name) as png:
            png.verify()

    # night-2: the same outputs, one of them perturbed, scored into the same history: the gate trips
    perturbed = tmp_path / "perturbed"
    for image_id, sr_path, hr_path in zip(first["image_id"], first["sr_path"], first["hr_path"], strict=True):
        sr = load_image(sr_path)
        if image_id == "a":  # twice as far from its HR image
            sr = (2 * sr - load_image(hr_path)).clamp(0, 1)
        save_png(sr, perturbed / f"{image_id}_out.png")  # (written once per metric row: the same image)
    capsys.readouterr()
    code = main(["evaluate", "--results", str(perturbed), "--suffix", "_out", "--dataset", f"tiny={data}",
                 "--metrics", "psnr,ssim", "--metric-cache", str(tmp_path / "cache"), "--out",
                 str(tmp_path / "night-2"), "--history", str(history), "--run-id", "night-2",
                 "--fail-on-regression", "--baseline-run", "night-0", "--no-report"])
    assert code == 3
    gate = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert gate["gate"] == "regression" and gate["baseline_run"] == "night-0"
    worse = {g["metric"]: g for g in gate["regressions"]}
    assert "psnr" in worse and set(worse) <= {"psnr", "ssim"}
    assert worse["psnr"]["set"] == "tiny" and worse["psnr"]["method"] == "patchscaler"
    assert worse["psnr"]["delta"] < -0.1 and worse["psnr"]["tolerance"] == 0.1  # the default
    assert worse["psnr"]["images"][0]["image_id"] == "a"  # the perturbed image moved most
    assert [i["image_id"] for i in worse["psnr"]["images"]] == ["a"]  # b did not move
