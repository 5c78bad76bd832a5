"""The RTM builder: sources, probing of bad files, the crop plan, the artifact, and end-to-end builds on a
local folder and on a real S3-compatible server (moto), plus an incremental ``--add-source``."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from s3util import moto_s3

from jobs import build_rtm as job
from jobs import init_weights
from patchscaler.weights import load_checkpoint, load_rtm
from pipeline.io import storage_options
from rtm_builder.artifact import Candidates, read_entries, read_index, read_pool
from rtm_builder.build import BuildConfig, build_rtm, candidate_budget
from rtm_builder.contact_sheet import layout, render
from rtm_builder.crop import CROP, Probe, allocate, decode_rgb8, plan_crops, plan_source, probe_file
from rtm_builder.encode import encode_crops
from rtm_builder.sources import parse_source, parse_sources


def texture(kind: int, h: int, w: int, seed: int) -> np.ndarray:
    """A small synthetic texture (stripes, checks, noise, rings), (h, w, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = [np.sin(x / 3.0), np.sign(np.sin(x / 7.0) * np.sin(y / 7.0)), rng.normal(size=(h, w)),
            np.sin(np.hypot(x - w / 2, y - h / 2) / 4.0)][kind % 4]
    rgb = np.stack([base * c for c in rng.uniform(0.3, 1.0, 3)], axis=2)  # (h, w, 3)
    return ((rgb - rgb.min()) / (np.ptp(rgb) + 1e-8) * 255).astype(np.uint8)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_good(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"tex{i}.png").write_bytes(png(texture(i + seed, 136 + 24 * i, 200 - 8 * i, seed + i)))


def write_mixed(folder: Path) -> None:
    """Grey, RGBA and 16-bit images (usable after conversion) and five files that must be skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "grey.png").write_bytes(png(texture(1, 150, 150, 7)[:, :, 0]))
    rgba = np.dstack([texture(2, 140, 170, 8), np.full((140, 170), 200, np.uint8)])
    (folder / "rgba.png").write_bytes(png(rgba))
    sixteen = (texture(3, 144, 144, 9)[:, :, 0].astype(np.uint16) * 257)
    Image.fromarray(sixteen).save(folder / "sixteen.png")
    (folder / "zero.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    good = png(texture(0, 160, 160, 10))
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + np.random.default_rng(0).bytes(300))
    (folder / "small.png").write_bytes(png(texture(0, 48, 96, 11)))  # under any crop (64 or 128)


EXPECTED_SKIPPED = {"empty": 1, "not_an_image": 2, "corrupt": 1, "too_small": 1}
EXPECTED_CONVERTED = {"L": 1, "RGBA": 1, "I;16": 1}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rtm_data")
    init_weights.run(argparse.Namespace(preset="tiny", out=str(root / "weights"), seed=0, autoencoder=None))
    write_good(root / "a", 4, seed=0)
    write_mixed(root / "b")
    write_good(root / "c", 2, seed=20)
    return {"root": root, "weights": root / "weights", "a": root / "a", "b": root / "b", "c": root / "c"}


# --- units (no Ray) ----------------------------------------------------------------------------------


def test_parse_source() -> None:
    assert parse_source("div2k=/data/div2k:2.0").weight == 2.0
    assert parse_source("div2k=/data/div2k:2.0").uri == "/data/div2k"
    s3 = parse_source("tex=s3://bucket/dtd")
    assert (s3.uri, s3.weight) == ("s3://bucket/dtd", 1.0)
    assert parse_source("tex=s3://bucket/dtd/:0.5").uri == "s3://bucket/dtd"
    for bad in ("nodir", "=x", "a b=/x", "a=/x:-1", "a="):
        with pytest.raises(ValueError):
            parse_source(bad)
    with pytest.raises(ValueError, match="unique"):
        parse_sources(["a=/x", "a=/y"])


def test_probe_counts_bad_files_and_converts_modes(data: dict[str, Path]) -> None:
    files = sorted(data["b"].iterdir())
    probes = [probe_file("b", str(p), storage_options={}, max_pixels=10**8) for p in files]
    by_name = {Path(p.path).name: p for p in probes}
    assert {n: p.status for n, p in by_name.items()} == {
        "garbage.jpg": "not_an_image", "grey.png": "ok", "notes.txt": "not_an_image", "rgba.png": "ok",
        "sixteen.png": "ok", "small.png": "too_small", "truncated.png": "corrupt", "zero.png": "empty"}
    assert (by_name["grey.png"].mode, by_name["rgba.png"].mode, by_name["sixteen.png"].mode) == ("L", "RGBA",
                                                                                               "I;16")
    rgb, _ = decode_rgb8((data["b"] / "sixteen.png").read_bytes(), max_pixels=10**8)
    assert rgb.dtype == np.uint8 and rgb.shape == (144, 144, 3)
    assert np.array_equal(rgb[:, :, 0], texture(3, 144, 144, 9)[:, :, 0])  # v*257 -> v exactly


def test_allocate_and_plan_are_deterministic() -> None:
    assert allocate(10, [1.0, 1.0, 1.0]) == [4, 3, 3]
    assert allocate(96, [1.0, 0.5]) == [64, 32]
    assert allocate(5, [0.0, 2.0]) == [0, 5]
    images = [("/x/1.png", 300, 200), ("/x/0.png", 128, 128)]
    plan = plan_source("a", images, 50, seed=3)
    assert plan == plan_source("a", list(reversed(images)), 50, seed=3)
    assert plan != plan_source("a", images, 50, seed=4)
    assert [c.id for c in plan] == [f"a:{i:06d}" for i in range(50)]
    for c in plan:
        w, h = {p: (w, h) for p, w, h in images}[c.path]
        assert 0 <= c.x <= w - CROP and 0 <= c.y <= h - CROP
    # The 128×128 image has one window of 173*73 + 1 in all: almost every crop comes from the big one.
    assert sum(c.path == "/x/0.png" for c in plan) <= 2
    probes = [Probe("a", p, "ok", w, h) for p, w, h in images] + [Probe("b", "/y/s.png", "too_small", 9, 9)]
    full, counts = plan_crops(probes, {"a": 1.0, "b": 3.0}, 40, seed=3)
    assert counts == {"a": 40, "b": 0}  # b has no usable image: its share goes to a
    assert full == plan_source("a", images, 40, seed=3)  # a's plan does not depend on b


def test_candidate_budget() -> None:
    cfg = BuildConfig(sources=parse_sources(["c=/c:0.5", "d=/d"]), out="/o", weights="/w")
    assert candidate_budget(cfg, 0, None) == 20_000
    stored = {"sources": [{"weight": 1.0, "candidates": 48}, {"weight": 0.5, "candidates": 24},
                          {"weight": 4.0, "candidates": 0}]}  # a source without usable images does not count
    assert candidate_budget(cfg, 72, stored) == 72  # 48 per unit of weight, 1.5 units added
    assert candidate_budget(replace(cfg, candidates=10), 72, stored) == 10


def test_candidates_parquet_round_trip() -> None:
    rng = np.random.default_rng(0)
    cands = Candidates(
        np.array(["a:000000", "b:000001"], dtype=object), np.array(["a", "b"], dtype=object),
        np.array(["/a.png", "s3://x/b.png"], dtype=object), np.array([[0, 1, 128, 129]] * 2, np.int32),
        rng.normal(size=(2, 6)).astype(np.float32), rng.normal(size=(2, 4, 16, 16)).astype(np.float32),
        np.array([3, 46], np.int32))
    back = Candidates.from_table(cands.to_table())
    for name in ("ids", "sources", "paths", "boxes", "keys", "values", "classes"):
        assert np.array_equal(getattr(back, name), getattr(cands, name)), name


def test_contact_sheet_layout_groups_by_class() -> None:
    rows = layout(np.array([5, 2, 5, 5, 2, 9]), per_class=2)
    assert rows == [(5, 3, [0, 2]), (2, 2, [1, 4]), (9, 1, [5])]
    thumbs = {i: np.full((128, 128, 3), 40 * i, np.uint8) for i in range(6)}
    sheet = render(rows, thumbs, [f"c{i}" for i in range(10)], per_class=2, thumb=32, title="t")
    assert sheet.size == (170 + 2 * 36 + 4, 28 + 3 * 36 + 4)
    assert sheet.getpixel((170 + 36 + 5, 28 + 5)) == (80, 80, 80)  # row 0, second thumb: entry 2


# --- end to end (Ray) --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_build(ray_session, data: dict[str, Path]) -> Path:
    out = data["root"] / "rtm"
    cfg = BuildConfig(sources=parse_sources([f"a={data['a']}", f"b={data['b']}:0.5"]), out=str(out),
                      weights=str(data["weights"]), candidates=72, entries=16, seed=0, device="cpu",
                      cpus_per_actor=1.0, encode_batch=32, read_tasks=2, per_class=4)
    summary = build_rtm(cfg)
    assert (summary.entries, summary.candidates, summary.encoded, summary.reused) == (16, 72, 72, 0)
    return out


def test_local_build_artifact(local_build: Path, data: dict[str, Path]) -> None:
    rtm, manifest = load_rtm(str(local_build))
    channels = load_checkpoint(str(data["weights"])).config.latent_channels
    assert len(rtm) == 16 and rtm.values.shape == (16, channels, 16, 16)
    assert torch.allclose(rtm.keys.norm(dim=1), torch.ones(16), atol=1e-5)
    assert manifest["counts"]["skipped"] == EXPECTED_SKIPPED
    assert manifest["counts"]["converted"] == EXPECTED_CONVERTED
    assert {s["name"]: s["candidates"] for s in manifest["sources"]} == {"a": 48, "b": 24}
    assert sum(s["entries"] for s in manifest["sources"]) == 16
    assert manifest["weights"]["hash"] == load_checkpoint(str(data["weights"])).version
    assert len(manifest["skipped_inputs"]) == sum(EXPECTED_SKIPPED.values())
    entries = read_entries(str(local_build), {})
    assert np.allclose(entries.keys, rtm.keys.numpy(), atol=1e-6)  # the RTM normalises once more
    assert np.array_equal(entries.values, rtm.values.numpy())
    assert len(set(entries.ids.tolist())) == 16
    # An entry is the encoding of its crop box of its source image.
    model = load_checkpoint(str(data["weights"]))
    x0, y0, x1, y1 = entries.boxes[0]
    rgb, _ = decode_rgb8(Path(entries.paths[0]).read_bytes(), max_pixels=10**8)
    values, keys, _ = encode_crops(model, rgb[None, y0:y1, x0:x1])
    assert np.allclose(values[0], entries.values[0], atol=1e-4)
    assert np.allclose(keys[0], entries.keys[0], atol=1e-4)
    # Queried back through the faiss index and the RTM: each key finds itself.
    _, idx = read_index(str(local_build), {}).search(entries.keys[:6], 1)
    assert idx[:, 0].tolist() == list(range(6))
    assert rtm.search(rtm.keys[:6], 1)[1][:, 0].tolist() == list(range(6))
    with Image.open(local_build / "contact_sheet.png") as sheet:
        assert sheet.size[0] > 170 and sheet.size[1] > 28


def test_add_source_encodes_only_new_crops(local_build: Path, data: dict[str, Path], tmp_path: Path) -> None:
    base_pool, _ = read_pool(str(local_build), {})
    out = tmp_path / "rtm2"
    shutil.copytree(local_build, out)
    cfg = BuildConfig(sources=parse_sources([f"c={data['c']}:0.5"]), out=str(out),
                      weights=str(data["weights"]), incremental=True, entries=20, device="cpu",
                      cpus_per_actor=1.0, encode_batch=32, read_tasks=2, contact_sheet=False)
    summary = build_rtm(cfg)
    # 72 stored crops over a weight of 1.5: 48 per unit of weight, so c (weight 0.5) gets 24, only those
    # are encoded.
    assert (summary.encoded, summary.reused, summary.candidates, summary.entries) == (24, 72, 96, 20)
    pool, manifest = read_pool(str(out), {})
    assert np.array_equal(pool.keys[:72], base_pool.keys)
    assert np.array_equal(pool.values[:72], base_pool.values)
    assert np.array_equal(pool.ids[:72], base_pool.ids)
    assert (pool.sources[72:] == "c").all() and manifest["counts"]["encoded"] == 24
    assert [s["name"] for s in manifest["sources"]] == ["a", "b", "c"]
    assert [h["mode"] for h in manifest["history"]] == ["build", "add-source"]
    assert manifest["counts"]["skipped"] == EXPECTED_SKIPPED  # carried over
    rtm, _ = load_rtm(str(out))
    assert len(rtm) == 20
    with pytest.raises(ValueError, match="already in the RTM"):
        build_rtm(BuildConfig(sources=parse_sources([f"a={data['c']}"]), out=str(out),
                              weights=str(data["weights"]), incremental=True, device="cpu"))


def test_cli_build_on_s3(ray_session, data: dict[str, Path]) -> None:
    with moto_s3("rtm-bucket"):
        import s3fs

        fs = s3fs.S3FileSystem()
        for p in sorted(data["a"].iterdir())[:2]:
            fs.pipe(f"rtm-bucket/src/{p.name}", p.read_bytes())
        fs.pipe("rtm-bucket/src/zero.png", b"")
        parser = argparse.ArgumentParser()
        job.add_arguments(parser)
        args = parser.parse_args([
            "--source", "s3src=s3://rtm-bucket/src", "--out", "s3://rtm-bucket/rtm/v1",
            "--weights", str(data["weights"]), "--candidates", "24", "--entries", "8", "--device", "cpu",
            "--cpus-per-actor", "1", "--read-tasks", "2", "--per-class", "2", "--no-progress"])
        assert job.run(args) == 0
        rtm, manifest = load_rtm("s3://rtm-bucket/rtm/v1")
        assert len(rtm) == 8 and manifest["counts"]["skipped"] == {"empty": 1}
        assert manifest["sources"][0]["uri"] == "s3://rtm-bucket/src"
        entries = read_entries("s3://rtm-bucket/rtm/v1", storage_options())
        assert all(p.startswith("s3://rtm-bucket/src/") for p in entries.paths)
        _, idx = read_index("s3://rtm-bucket/rtm/v1", storage_options()).search(entries.keys, 1)
        assert idx[:, 0].tolist() == list(range(8))
        assert rtm.search(rtm.keys, 2)[1][:, 0].tolist() == list(range(8))
        names = {n.rsplit("/", 1)[-1] for n in fs.ls("rtm-bucket/rtm/v1")}
        assert names == {"rtm.safetensors", "manifest.json", "entries.parquet", "index.faiss",
                         "candidates.parquet", "contact_sheet.png"}
        assert json.loads(fs.cat("rtm-bucket/rtm/v1/manifest.json"))["version"] == manifest["version"]


def test_cli_rejects_bad_source() -> None:
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--source", "no-equals-sign", "--out", "x"])
    with pytest.raises(SystemExit):  # --source and --add-source are exclusive
        parser.parse_args(["--source", "a=/x", "--add-source", "b=/y", "--out", "x"])
