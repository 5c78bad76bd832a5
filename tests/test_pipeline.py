"""End to end: the Ray Data pipeline on ~20 mixed images plus bad files, against the reference upscaler;
the manifest; resume after deleted outputs and a killed run; the fused mode through the CLI."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pipeline_data import (
    ALPHA_FILES,
    BAD_FILES,
    GREY_FILES,
    make_assets,
    read_rgb,
    reference_images,
    write_images,
)

from patchscaler.weights import load_checkpoint
from pipeline.build import PipelineConfig
from pipeline.decode import decode_image, upscale_alpha
from pipeline.io import MANIFEST_DIR
from pipeline.runner import read_manifest, read_parts, run_pipeline

SEED = 5
pytestmark = pytest.mark.timeout(900)  # the first run takes ~130 s alone, 400+ s on a busy 2-core box


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("pipeline")
    names = write_images(root / "in")
    weights, rtm = make_assets(root, root / "in", names)
    return SimpleNamespace(root=root, inputs=root / "in", names=names, weights=weights, rtm=rtm)


def config(data: SimpleNamespace, out: Path, **changes) -> PipelineConfig:
    base = {"input": str(data.inputs), "output": str(out), "weights": data.weights, "rtm": data.rtm,
            "seed": SEED, "window": 8, "dit_actors": {"simple": 1, "medium": 1, "hard": 1}}
    return PipelineConfig(**{**base, **changes})


def part_ids(part: Path) -> list[str]:
    return pq.read_table(io.BytesIO(part.read_bytes())).column("id").to_pylist()


def output_name(name: str) -> str:
    """dup.png keeps its name, dup.jpg (which wants the same one) keeps its extension in it."""
    return name + ".png" if name == "dup.jpg" else os.path.splitext(name)[0] + ".png"


@pytest.fixture(scope="module")
def first_run(ray_session, data) -> SimpleNamespace:
    out = data.root / "out"
    summary = run_pipeline(config(data, out), echo=False)
    return SimpleNamespace(summary=summary, out=out, manifest=read_manifest(str(out)))


def test_every_input_gets_one_manifest_row_and_good_ones_an_output(first_run, data) -> None:
    s, manifest = first_run.summary, first_run.manifest
    assert (s.inputs, s.ok, s.failed, s.skipped) == (len(data.names) + 3, len(data.names), 3, 0)
    assert s.parts >= -(-s.inputs // 8)  # recorded at most 8 rows (--window) at a time ...
    parts = list((first_run.out / MANIFEST_DIR).iterdir())
    assert len(parts) == 1 and sorted(part_ids(parts[0])) == sorted(manifest["id"])  # ... merged at the end
    assert len(manifest) == s.inputs and manifest["id"].is_unique
    by_source = manifest.set_index(manifest["source"].map(lambda p: os.path.relpath(p, data.inputs)))
    assert ".hidden.png" not in by_source.index
    for bad in BAD_FILES:
        row = by_source.loc[bad]
        assert row["status"] == "error" and row["error"].startswith("decode:") and row["output"] == ""
        assert str(data.inputs / bad) in row["error"] and "BytesIO" not in row["error"]  # names the file
    assert "empty file" in by_source.loc["empty.png", "error"]
    version = load_checkpoint(data.weights).version
    for name in data.names:
        row = by_source.loc[name]
        assert row["status"] == "ok", row["error"]
        assert row["output"] == str(first_run.out / output_name(name))
        dec = decode_image((data.inputs / name).read_bytes(), max_pixels=1 << 24)
        assert (row["height_in"], row["width_in"]) == dec.rgb.shape[:2]
        with Image.open(row["output"]) as im:
            assert (im.height, im.width) == (4 * row["height_in"], 4 * row["width_in"])
            assert (row["height_out"], row["width_out"]) == (im.height, im.width)
            colour = "L" if name in GREY_FILES else "RGB"
            assert im.mode == (colour + "A" if name in ALPHA_FILES else colour)
        assert row["patches_simple"] + row["patches_medium"] + row["patches_hard"] >= 1
        assert row["seconds_grm"] > 0 and row["seconds_dit"] > 0 and row["seconds_assemble"] > 0
        assert row["model_version"] == version and row["rtm_version"] and row["bytes_out"] > 0
    # the thresholds of the test checkpoint put patches in all three pools
    assert (manifest[["patches_simple", "patches_medium", "patches_hard"]].sum() > 0).all()
    leftovers = [p for p in first_run.out.rglob("*") if ".partial-" in p.name]
    assert leftovers == []


def test_outputs_equal_the_reference_upscaler(first_run, data) -> None:
    refs = reference_images(data.weights, data.rtm, data.inputs, data.names, SEED)
    for name in data.names:
        got = read_rgb((first_run.out / output_name(name)).read_bytes()).astype(int)
        assert got.shape == refs[name].shape, name
        assert np.abs(got - refs[name]).max() <= 1, name  # PNG of the same uint8 image, up to rounding


def test_alpha_icc_and_exif_are_kept(first_run, data) -> None:
    src = decode_image((data.inputs / "rgba.png").read_bytes(), max_pixels=1 << 24)
    with Image.open(first_run.out / "rgba.png") as im:
        assert np.array_equal(np.asarray(im)[..., 3], upscale_alpha(src.alpha, 4))
    for name in ("rgb_48x40.png", "exif_rotated.jpg"):
        with Image.open(first_run.out / output_name(name)) as im:
            assert im.info.get("icc_profile") == decode_image(
                (data.inputs / name).read_bytes(), max_pixels=1 << 24).icc != b""
    with Image.open(first_run.out / "exif_rotated.png") as im:
        assert (im.width, im.height) == (96, 160)  # 24x40 stored, shown rotated: 40x24 -> x4
        assert 0x0112 not in im.getexif()


def test_resume_redoes_only_what_is_missing(first_run, data) -> None:
    """Deleted outputs and outputs whose records were lost are redone; finished images are not touched
    and the undecodable files, which failed for good, are not retried (item 10 of issue 11)."""
    out = data.root / "resume"
    shutil.copytree(first_run.out, out)
    ok = first_run.manifest[first_run.manifest["status"] == "ok"].sort_values("source")
    planned = {r.id: out / os.path.relpath(r.output, first_run.out) for r in ok.itertuples()}
    deleted = set(list(planned)[::2])  # half of the outputs
    for i in deleted:
        planned[i].unlink()
    # a run killed after writing outputs but before recording them: the last rows are missing ...
    (part,) = (out / MANIFEST_DIR).iterdir()
    table = pq.read_table(io.BytesIO(part.read_bytes()))
    ok_ids = [i for i in table.column("id").to_pylist() if i in planned]
    unrecorded = set(ok_ids[-4:]) - deleted
    assert unrecorded
    keep = [i not in unrecorded for i in table.column("id").to_pylist()]
    pq.write_table(table.filter(keep), part)
    # ... and a temp file that was being written when it died
    (out / ".rgb_16.png.partial-0123456789ab").write_bytes(b"half an image")
    before = {i: p.stat().st_mtime_ns for i, p in planned.items() if p.exists()}

    summary = run_pipeline(config(data, out), echo=False)

    bad_ids = set(first_run.manifest.loc[first_run.manifest["status"] == "error", "id"])
    redo = deleted | unrecorded
    assert summary.skipped == len(planned) - len(redo)
    assert (summary.ok, summary.failed, summary.kept) == (len(redo), 0, len(bad_ids))
    assert {source for source, _ in summary.failures} == set(
        first_run.manifest.loc[first_run.manifest["status"] == "error", "source"])  # listed, not retried
    new_rows = read_parts(str(out), {})
    new_rows = new_rows[new_rows["finished_at"] > first_run.manifest["finished_at"].max()]
    assert set(new_rows["id"]) == redo and new_rows["id"].is_unique
    for i, p in planned.items():
        assert p.exists()
        if i not in redo:
            assert p.stat().st_mtime_ns == before[i]  # untouched
    assert not any(".partial-" in p.name for p in out.rglob("*"))
    manifest = read_manifest(str(out))
    assert len(manifest) == len(first_run.manifest) and manifest["id"].is_unique
    assert set(manifest.loc[manifest["status"] == "error", "id"]) == bad_ids

    retried = run_pipeline(config(data, out, retry_failed=True), echo=False)  # --retry-failed
    assert (retried.skipped, retried.ok, retried.failed, retried.kept) == (len(planned), 0, len(bad_ids), 0)


def test_fused_mode_through_the_job_equals_per_pool(first_run, data) -> None:
    import argparse

    from jobs import upscale_dataset

    subset = data.root / "subset"
    subset.mkdir()
    names = ["rgb_48x40.png", "rgba.png", "grey16.png", "sub/nested.png", "cmyk.jpg", "tiny_5x3.png"]
    for name in names:
        (subset / name).parent.mkdir(exist_ok=True)
        shutil.copy(data.inputs / name, subset / name)
    out = data.root / "fused"
    parser = argparse.ArgumentParser()
    upscale_dataset.add_arguments(parser)
    args = parser.parse_args(["--input", str(subset), "--output", str(out), "--weights", data.weights,
                              "--rtm", data.rtm, "--seed", str(SEED), "--fused", "--dit-actors", "1",
                              "--no-progress", "--device", "cpu"])
    code = upscale_dataset.run(args)
    assert code == 0
    manifest = read_manifest(str(out))
    assert list(manifest["status"]) == ["ok"] * len(names)
    assert set(manifest["sampling"]) == {"checkpoint+fused"}
    for name in names:
        fused = read_rgb((out / output_name(name)).read_bytes()).astype(int)
        per_pool = read_rgb((first_run.out / output_name(name)).read_bytes()).astype(int)
        assert np.abs(fused - per_pool).max() <= 1, name


def test_refine_none_equals_the_reference_upscaler_without_patch_dit(ray_session, data) -> None:
    """``--refine none`` in the pools layout: GRM and assemble actors only (no Patch-DiT pool, no
    seconds spent there), and the same images as ``PatchScaler(refine="none")``."""
    out = data.root / "refine_none"
    summary = run_pipeline(config(data, out, refine="none", layout="pools", dit_actors=None), echo=False)
    assert summary.ok == len(data.names)
    assert all(set(pools) == {"grm", "assemble"} for pools in summary.pools)
    manifest = read_manifest(str(out))
    ok = manifest[manifest["status"] == "ok"]
    assert (ok["sampling"] == "none").all() and (ok["seconds_dit"] == 0).all()
    refs = reference_images(data.weights, data.rtm, data.inputs, data.names, SEED, refine="none")
    for name in data.names:
        got = read_rgb((out / output_name(name)).read_bytes()).astype(int)
        assert np.abs(got - refs[name]).max() <= 1, name  # PNG of the same uint8 image, up to rounding
