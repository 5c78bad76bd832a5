"""S3 in and out: the pipeline against a real S3-compatible server (moto's server mode on 127.0.0.1).

The Ray workers were started before the server's settings existed, so this also checks that endpoint
and credentials reach every stage explicitly (``storage_options``), not through the environment."""

from __future__ import annotations

import numpy as np
import pytest
from pipeline_data import make_assets, read_rgb, reference_images, write_images
from s3util import moto_s3

from pipeline.build import PipelineConfig
from pipeline.io import storage_options
from pipeline.runner import read_manifest, run_pipeline

pytestmark = pytest.mark.timeout(900)  # ~70 s alone; give a busy 2-core box room
NAMES = ["rgb_24x32.png", "rgba.png", "sub/nested.png", "grey16.png"]


def test_s3_input_and_output(ray_session, tmp_path) -> None:
    import boto3

    local = tmp_path / "in"
    write_images(local)
    weights, rtm = make_assets(tmp_path, local, NAMES)
    with moto_s3("pipeline-bucket") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for name in [*NAMES, "corrupt.png"]:
            s3.put_object(Bucket="pipeline-bucket", Key=f"lr/{name}", Body=(local / name).read_bytes())
        options = storage_options(endpoint)
        assert options["endpoint_url"] == endpoint and options["key"] == "testing"
        cfg = PipelineConfig(input="s3://pipeline-bucket/lr", output="s3://pipeline-bucket/sr",
                             weights=weights, rtm=rtm, seed=3, fused=True, dit_actors=1, window=2,
                             storage_options=options)
        summary = run_pipeline(cfg, echo=False)
        assert (summary.ok, summary.failed) == (len(NAMES), 1)

        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="pipeline-bucket", Prefix="sr/")["Contents"]}
        outputs = {f"sr/{n.rsplit('.', 1)[0]}.png" for n in NAMES}
        assert outputs | {"sr/manifest.parquet"} <= keys
        assert sum(k.startswith("sr/_manifest/part-") for k in keys) == 1  # the run's parts, merged
        assert not any(".partial-" in k for k in keys)
        refs = reference_images(weights, rtm, local, NAMES, seed=3)
        for name in NAMES:
            key = f"sr/{name.rsplit('.', 1)[0]}.png"
            body = s3.get_object(Bucket="pipeline-bucket", Key=key)["Body"].read()
            assert np.abs(read_rgb(body).astype(int) - refs[name]).max() <= 1, name

        manifest = read_manifest("s3://pipeline-bucket/sr", options)
        assert len(manifest) == len(NAMES) + 1
        assert set(manifest.loc[manifest["status"] == "ok", "output"]) == {f"s3://pipeline-bucket/{k}"
                                                                          for k in outputs}
        # resume: the finished ones are skipped and the undecodable one is not retried (nothing to do)
        again = run_pipeline(cfg, echo=False)
        assert (again.skipped, again.kept, again.ok, again.failed) == (len(NAMES), 1, 0, 0)
