"""Fault tolerance and clusters: a Patch-DiT actor killed mid-run, and a 2-node cluster on one machine.

The cluster test runs in a separate Python process: the test session already holds one Ray instance
(``ray_session``), and a driver connects to one cluster at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from pipeline_data import make_assets, read_rgb, reference_images, write_images

from pipeline.build import PipelineConfig
from pipeline.runner import read_manifest, run_pipeline

NAMES = ["rgb_24x32.png", "rgb_48x40.png", "rgba.png", "grey.png", "sub/nested.png", "cmyk.jpg"]
REPO = Path(__file__).resolve().parent.parent


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


CLUSTER_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 200 * 1024 * 1024, "include_dashboard": False})
    cluster.add_node(num_cpus=2, object_store_memory=200 * 1024 * 1024)
    cluster.wait_for_nodes()
    from jobs.cli import main

    code = main(["upscale-dataset", *sys.argv[1:], "--address", cluster.address])
    nodes = sum(n["Alive"] for n in ray.nodes())
    print("RESULT " + json.dumps({"code": code, "nodes": nodes}), flush=True)
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.timeout(400)
def test_two_node_cluster(subset) -> None:
    root, weights, rtm = subset
    out = root / "cluster_out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    # three model actors of one CPU each (GRM, fused Patch-DiT, assemble) do not fit on one 2-CPU node
    args = ["--input", str(root / "in"), "--output", str(out), "--weights", weights, "--rtm", rtm,
            "--seed", "1", "--fused", "--dit-actors", "1", "--cpus-per-actor", "1", "--device", "cpu",
            "--no-progress"]
    proc = subprocess.run([sys.executable, "-c", CLUSTER_SCRIPT, *args], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=380)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result == {"code": 0, "nodes": 2}
    manifest = read_manifest(str(out))
    assert list(manifest["status"]) == ["ok"] * len(NAMES)
    assert "done: 6 ok, 0 failed" in proc.stdout
