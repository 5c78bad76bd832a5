"""The job plan (``pipeline/jobplan.py``): input lists, the streamed listing, output names without a
dict per input, resume from the manifest at 10^4 inputs, shards, ``--dry-run``; and one small job
from an ``--input-list`` through Ray."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema as S
from pipeline.build import PipelineConfig
from pipeline.io import list_files, plan_outputs
from pipeline.jobplan import (
    BLOCK_ROWS,
    SHARD_SCHEMA,
    WORK_DIR,
    _columns,
    _unique_sorted,
    iter_input_list,
    name_outputs,
    plan_job,
    read_block,
    to_items,
    walk_local,
)
from pipeline.manifest import write_part

pytestmark = pytest.mark.timeout(600)


def test_input_list_formats(tmp_path: Path) -> None:
    root = str(tmp_path / "in")
    text = tmp_path / "list.txt"
    text.write_text(f"# inputs\n{root}/a.png\n\nsub/b.png\ns3://bucket/in/c.png\n")
    assert list(iter_input_list(str(text), root, {})) == [f"{root}/a.png", f"{root}/sub/b.png",
                                                         "s3://bucket/in/c.png"]
    header = tmp_path / "keys.csv"
    header.write_text("bucket,key,size\nb1,in/x y.png,3\nb2,in/z.png,4\n")
    assert list(iter_input_list(str(header), root, {})) == ["s3://b1/in/x y.png", "s3://b2/in/z.png"]
    inventory = tmp_path / "inventory.csv"  # S3 Inventory CSV: no header, URL-encoded keys
    inventory.write_text('"b1","in/x+y%C3%A9.png","3"\n"b1","in/plain.png","4"\n')
    assert list(iter_input_list(str(inventory), root, {})) == ["s3://b1/in/x yé.png", "s3://b1/in/plain.png"]
    parquet = tmp_path / "inventory.parquet"
    pq.write_table(pa.table({"bucket": ["b1", "b1"], "key": ["in/p.png", "in/q.png"]}), parquet)
    assert list(iter_input_list(str(parquet), root, {})) == ["s3://b1/in/p.png", "s3://b1/in/q.png"]
    paths = tmp_path / "paths.parquet"
    pq.write_table(pa.table({"path": ["r.png", f"{root}/s.png"]}), paths)
    assert list(iter_input_list(str(paths), root, {})) == [f"{root}/r.png", f"{root}/s.png"]
    pq.write_table(pa.table({"name": ["r.png"]}), paths)
    with pytest.raises(ValueError, match="no column named key"):
        list(iter_input_list(str(paths), root, {}))


def test_the_walk_finds_what_list_files_finds(tmp_path: Path) -> None:
    root = tmp_path / "in"
    for rel in ("a.png", "sub/b.png", "sub/deep/c.jpg", ".hidden.png", ".git/x.png", "_manifest/p.parquet",
                "_jobplan/r/todo.parquet", "out/o.png", "sub/_manifest/kept.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    listed = [s for s in list_files(str(root), {}) if not s.startswith(str(root / "out") + "/")]
    assert sorted(walk_local(str(root), str(root / "out"))) == listed
    assert str(root / "sub/_manifest/kept.png") in listed  # only the top-level folder is the pipeline's
    assert list(walk_local(str(root / "a.png"), "/nowhere")) == [str(root / "a.png")]


def _names(sources: list[str], root: str) -> dict[str, str]:
    folders: set[str] = set()
    table = _unique_sorted(_columns(sources, root, "png", folders))
    return dict(zip(table["source"].to_pylist(), name_outputs(table, root, "/o", "png", folders).to_pylist(),
                    strict=True))


def test_output_names_equal_naming_all_inputs_at_once() -> None:
    """Only contenders go through naming.output_names; the result is io.plan_outputs' for the whole set."""
    root = "/in"
    tricky = ["/in/a.png", "/in/a.jpg", "/in/A.png", "/in/a.jpg.png", "/in/a.png/x.png", "/in/café.png",
              "/in/cafe\u0301.png", "/in//x.png", "/in/x.png", "/in/../y.png", "/elsewhere/z.png",
              "/in/_maps/q.png", "/in/_jobplan/q.png", "/in/d.", "/in/d", "/in/d.png."]
    rng = random.Random(0)
    cases = [tricky]
    for _ in range(200):
        folder, stem = ["", "a/", "A/", "a.png/"], ["a", "A", "a.jpg", "a~2", "b"]
        cases.append([f"/in/{rng.choice(folder)}{rng.choice(stem)}{rng.choice(['.png', '.jpg', ''])}"
                      for _ in range(rng.randint(1, 10))])
    for sources in cases:
        assert _names(sources + sources[:2], root) == plan_outputs(sorted(set(sources)), root, "/o", "png")


def _manifest_row(source: str, output: str, status: str, error: str = "", t: float = 1.0) -> dict:
    meta = S.new_meta(source=source, output=output)
    meta.update(status=status, error=error, groups=[1, 2, 7])
    return S.manifest_row(meta, image_id_=S.image_id(source), sampling="adaptive", seed=0, finished_at=t)


def test_a_plan_of_ten_thousand_inputs_resumes_from_the_manifest(tmp_path: Path) -> None:
    """10^4 listed inputs (an --input-list with duplicates), a manifest of earlier runs: ok rows whose
    outputs exist are done, ok rows whose outputs are gone and transient errors are redone, permanent
    failures are kept; the rest is written to shards of row groups that Ray Data reads one at a time."""
    root, out = tmp_path / "in", tmp_path / "out"
    n = 10_000
    sources = [f"{root}/d{i % 7}/img{i:05d}.png" for i in range(n)]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(sources + sources[:50]) + "\n")
    outputs = {s: f"{out}/{os.path.relpath(s, root)}" for s in sources}
    ok_present, ok_gone = sources[:6000:2], sources[1:6000:2][:500]
    transient, permanent = sources[7000:7100], sources[7100:7130]
    for s in ok_present:
        Path(outputs[s]).parent.mkdir(parents=True, exist_ok=True)
        Path(outputs[s]).write_bytes(b"")
    rows = [_manifest_row(s, outputs[s], S.STATUS_OK) for s in ok_present + ok_gone]
    rows += [_manifest_row(s, outputs[s], S.STATUS_ERROR, "read: StorageError: gone") for s in transient]
    rows += [_manifest_row(s, outputs[s], S.STATUS_ERROR, "decode: NotAnImage: no") for s in permanent]
    rows += [_manifest_row(s, outputs[s], S.STATUS_ERROR, "grm: later", t=0.5) for s in ok_present[:10]]
    write_part(str(out), "earlier-00000", rows[: len(rows) // 2], {})
    write_part(str(out), "earlier-00001", rows[len(rows) // 2:], {})
    (out / ".x.png.partial-0123").write_bytes(b"half")
    cfg = PipelineConfig(input=str(root), output=str(out), weights="w", rtm="r", input_list=str(listing))

    dry = plan_job(cfg, write=False)
    assert (dry.inputs, dry.done, len(dry.kept)) == (n, len(ok_present), len(permanent))
    assert dry.todo == n - len(ok_present) - len(permanent) and not dry.shards
    assert (out / ".x.png.partial-0123").exists() and not (out / WORK_DIR).exists()  # untouched
    assert dry.shares == pytest.approx((0.1, 0.2, 0.7))  # measured by the earlier runs

    plan = plan_job(cfg)
    assert not (out / ".x.png.partial-0123").exists()
    assert (plan.inputs, plan.done, plan.todo) == (dry.inputs, dry.done, dry.todo)
    assert sorted(plan.kept["source"]) == sorted(permanent) and len(plan.ids) == n
    blocks = plan.blocks
    assert len(blocks) == -(-plan.todo // BLOCK_ROWS)
    got = pa.concat_tables(read_block(uri, g, {}) for uri, g in blocks)
    assert got.schema == SHARD_SCHEMA and got.num_rows == plan.todo
    assert set(got["source"].to_pylist()) == set(sources) - set(ok_present) - set(permanent)
    assert got["source"].to_pylist() == sorted(got["source"].to_pylist())
    assert all(o == outputs[s] for s, o in zip(got["source"].to_pylist(), got["output"].to_pylist(),
                                               strict=True))
    items = to_items(read_block(*blocks[0], {}))
    meta = S.load_meta(items[S.META][0])
    assert items[S.IMAGE_ID][0] == S.image_id(meta["source"]) and meta["output"] == outputs[meta["source"]]

    assert plan_job(PipelineConfig(input=str(root), output=str(out), weights="w", rtm="r",
                                   input_list=str(listing), retry_failed=True), write=False).todo \
        == plan.todo + len(permanent)
    assert plan_job(PipelineConfig(input=str(root), output=str(out), weights="w", rtm="r",
                                   input_list=str(listing), overwrite=True), write=False).todo == n


def test_dry_run_counts_and_plans_without_running(capsys, tmp_path: Path, monkeypatch) -> None:
    from jobs import runtime
    from jobs.cli import main

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "start_ray", refuse)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (64, 48), (40 * i, 90, 160)).save(folder / f"img{i}.png")
    out = tmp_path / "out"
    code = main(["upscale-dataset", "--input", str(folder), "--output", str(out), "--dry-run",
                 "--dry-run-sample", "3", "--tflops", "100"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "6 inputs: 6 to do, 0 already done" in stdout
    # 64x48 -> 256x192 -> a latent of 64x48 (demo autoencoder: factor 4) -> 7 x 5 patches of 16, overlap 8;
    # 3 of the 6 headers read (every second file), extrapolated x2
    assert "to do: 0.01843 Mpixels in, 210 latent patches (from the headers of 3 of them, extrapolated)" \
        in stdout
    assert "patch-steps: 2,940 with group shares 0.33/0.33/0.33" in stdout  # 210 x (8 + 14 + 20) / 3
    assert "GPU-hours at 100 TFLOP/s" in stdout
    assert "resource plan on 1 node(s) of this machine" in stdout and "nothing was run" in stdout
    assert not out.exists()  # nothing written, not even the shards


@pytest.mark.timeout(900)
def test_a_job_from_an_input_list(ray_session, tmp_path: Path) -> None:
    """Through Ray: the listed files only (one listed twice, one missing: a read error row), the shards
    removed at the end, a re-run with nothing left to do."""
    from jobs.defaults import DEMO_RTM, DEMO_WEIGHTS
    from pipeline.runner import read_manifest, run_pipeline

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 12), (60 * i, 90, 160)).save(folder / f"img{i}.png")
    listing = tmp_path / "list.txt"
    listing.write_text("img0.png\nimg2.png\nimg2.png\nmissing.png\n")
    out = tmp_path / "out"
    cfg = PipelineConfig(input=str(folder), output=str(out), weights=str(DEMO_WEIGHTS), rtm=str(DEMO_RTM),
                         input_list=str(listing), actors=1)
    summary = run_pipeline(cfg, echo=False)
    assert (summary.inputs, summary.ok, summary.failed) == (3, 2, 1)
    manifest = read_manifest(str(out))
    by_name = {Path(s).name: row for s, row in zip(manifest["source"], manifest.itertuples(), strict=True)}
    assert set(by_name) == {"img0.png", "img2.png", "missing.png"}
    assert by_name["missing.png"].error.startswith("read: ")
    assert (out / "img0.png").exists() and not (out / "img1.png").exists()
    assert not (out / WORK_DIR).exists()
    again = run_pipeline(cfg, echo=False)
    assert (again.skipped, again.ok, again.failed) == (2, 0, 1)  # the missing file is tried again


def test_patch_rows_carry_one_latent_and_the_noise_is_drawn_again(tiny_model) -> None:
    """Blocks stay small (issue 18 item 5): a patch row carries one latent (y0, then x0), no noise;
    the Patch-DiT stage draws Eq. 7's noise again from the seed, equal to what plan_patches drew."""
    import numpy as np
    import torch

    from patchscaler.upscaler import plan_patches
    from pipeline.stages import explode, redraw_noise

    c = tiny_model.config.latent_channels
    g = torch.Generator().manual_seed(1)
    plans = {name: plan_patches(torch.randn(c, h, w, generator=g), torch.rand(1, h, w, generator=g),
                                tiny_model, torch.Generator().manual_seed(7))
             for name, (h, w) in {"a": (40, 24), "b": (16, 9)}.items()}
    parts = []
    for name, plan in plans.items():
        meta = S.new_meta(source=f"/in/{name}.png", output=f"/out/{name}.png")
        meta["latent"] = [plan.grid.height, plan.grid.width]
        tensors = {S.PATCH: plan.patches.numpy(), S.SCORES: np.zeros((len(plan.patches), 2), np.float32),
                   S.RTM_IDX: np.zeros((len(plan.patches), 2), np.int64), S.GROUP: plan.groups.numpy()}
        parts.append(explode(name, meta, (b"", b"", b"", b""), tensors))
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert set(batch) == set(S.ROW_COLUMNS)
    rows = np.flatnonzero(batch[S.PATCH_INDEX] != S.IMAGE_ROW)[::-3]  # some patches of both, any order
    got = redraw_noise(batch, rows, seed=7, config=tiny_model.config)
    want = np.stack([plans[batch[S.IMAGE_ID][r]].noise[batch[S.PATCH_INDEX][r]].numpy() for r in rows])
    assert np.array_equal(got, want)
