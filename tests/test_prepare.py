"""prepare-data: sub-images cut once (BasicSR's practice), a Parquet manifest, and the trainers reading it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from trainer.data import CropBatches, RandomCrops, list_images
from trainer.prepare import window_starts


def test_window_starts_follow_basicsr() -> None:
    assert window_starts(100, 48, 24, 0) == [0, 24, 48, 52]  # the last window moved in to the edge
    assert window_starts(96, 48, 24, 0) == [0, 24, 48]  # nothing left over
    assert window_starts(100, 48, 24, 10) == [0, 24, 48]  # 4 px left <= thresh_size: dropped
    assert window_starts(40, 48, 24, 0) == [0]  # a side smaller than the window: one, of that side


def test_prepare_data_cuts_lists_and_feeds_the_loader(
    ray_session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from jobs.cli import main

    src = tmp_path / "hr"
    (src / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    big = (rng.random((70, 100, 3)) * 255).astype(np.uint8)  # (H, W, 3)
    Image.fromarray(big).save(src / "a" / "big.png")
    Image.fromarray(big[:40, :40]).save(src / "small.jpg", quality=95)
    (src / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "sub"
    code = main(["prepare-data", "--input", str(src), "--out", str(out), "--size", "48", "--step", "24",
                 "--tasks", "2"])
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert code == 1  # one input failed; the others are done and listed
    assert (summary["images"], summary["ok"], summary["failed"]) == (3, 2, 1)
    # big: 4 x-windows (0, 24, 48, 52) x 2 y-windows (0, 22); small: one 40 x 40
    assert summary["sub_images"] == 4 * 2 + 1
    assert summary["failures"][0]["source"].endswith("broken.png")
    assert "[3/3] 2 ok, 1 failed" in captured.err  # the one progress line

    table = pq.read_table(out / "manifest.parquet").to_pylist()
    rows = {r["path"]: r for r in table if not r["error"]}
    assert len(rows) == 9 and sum(1 for r in table if r["error"]) == 1
    last = rows["a/big_s008.png"]
    assert (last["x"], last["y"], last["width"], last["height"]) == (52, 22, 48, 48)
    sub = np.asarray(Image.open(out / "a" / "big_s008.png"))
    assert np.array_equal(sub, big[22:70, 52:100])  # PNG: lossless
    assert (rows["small_s001.png"]["width"], rows["small_s001.png"]["height"]) == (40, 40)

    files = list_images(str(out))  # from the manifest, not by walking the folder
    assert len(files) == 9 and all(Path(f).exists() for f in files)
    (out / "stray.png").write_bytes((out / "small_s001.png").read_bytes())  # not in the manifest
    assert len(list_images(str(out))) == 9
    batches = CropBatches(RandomCrops(files=files, crop=32, seed=0, crops_per_image=1), batch_size=4,
                          num_workers=2, prefetch_factor=2)
    images, _ = next(batches)
    assert images.shape == (4, 3, 32, 32)


def test_prepare_data_from_and_to_s3(ray_session, tmp_path: Path) -> None:
    """Endpoint and credentials reach the cutting workers through ``storage_options`` (the Ray workers
    started before the server existed); the trainers' listing reads the manifest on S3."""
    import boto3
    from s3util import moto_s3

    from pipeline.io import storage_options
    from trainer.prepare import PrepareConfig, prepare_data, read_manifest

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((50, 60, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    with moto_s3("prep-bucket") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.put_object(Bucket="prep-bucket", Key="hr/x/one.png", Body=buf.getvalue())
        options = storage_options(endpoint)
        summary = prepare_data(PrepareConfig(input="s3://prep-bucket/hr", out="s3://prep-bucket/sub", size=32,
                                             step=32, tasks=1, progress=False, storage_options=options))
        assert (summary.ok, summary.failed, summary.sub_images) == (1, 0, 4)  # windows at 0 and 28 / 18
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="prep-bucket", Prefix="sub/")["Contents"]}
        assert keys == {"sub/manifest.parquet", *(f"sub/x/one_s00{i}.png" for i in range(1, 5))}
        listed = read_manifest("s3://prep-bucket/sub", options)
        assert listed == [f"s3://prep-bucket/sub/x/one_s00{i}.png" for i in range(1, 5)]
        assert list_images("s3://prep-bucket/sub") == listed
