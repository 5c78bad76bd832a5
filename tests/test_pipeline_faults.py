"""Fault tolerance: a Patch-DiT actor killed mid-run. Multi-node clusters (a node removed mid-job, an
image that kills its worker, shared storage): ``tests/test_pipeline_cluster.py``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pipeline_data import make_assets, read_rgb, reference_images, write_images

from pipeline.build import PipelineConfig
from pipeline.runner import read_manifest, run_pipeline

NAMES = ["rgb_24x32.png", "rgb_48x40.png", "rgba.png", "grey.png", "sub/nested.png", "cmyk.jpg"]


@pytest.fixture(scope="module")
def subset(tmp_path_factory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("faults")
    write_images(root / "all")
    (root / "in" / "sub").mkdir(parents=True)
    for name in NAMES:
        (root / "in" / name).write_bytes((root / "all" / name).read_bytes())
    weights, rtm = make_assets(root, root / "in", NAMES)
    return root, weights, rtm


@pytest.mark.timeout(300)
def test_a_killed_patch_dit_actor_does_not_fail_the_job(ray_session, subset) -> None:
    root, weights, rtm = subset
    marker = root / "crashed"
    cfg = PipelineConfig(input=str(root / "in"), output=str(root / "out"), weights=weights, rtm=rtm, seed=1,
                         dit_actors={"simple": 1, "medium": 1, "hard": 1}, grm_batch=2,
                         crash_marker=str(marker))
    summary = run_pipeline(cfg, echo=False)
    assert marker.exists()  # an actor did die in the middle of a Patch-DiT call ...
    assert int(marker.read_text()) != os.getpid()
    assert (summary.ok, summary.failed) == (len(NAMES), 0)  # ... and nothing was lost
    refs = reference_images(weights, rtm, root / "in", NAMES, seed=1)
    for name in NAMES:
        out = root / "out" / (os.path.splitext(name)[0] + ".png")
        assert np.abs(read_rgb(out.read_bytes()).astype(int) - refs[name]).max() <= 1, name
    assert len(read_manifest(str(root / "out"))) == len(NAMES)
