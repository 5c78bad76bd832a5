"""``upscale-dataset`` on a simulated 4-node Ray cluster (``ray.cluster_utils.Cluster``: a 1-CPU head and
three 2-CPU workers on this machine), issue 18: a node-local path refused, S3 in and out, more than four
read/decode tasks at once, an image that kills its worker every time, a worker node removed mid-job, a
stalled job stopped.

It runs in a separate Python process: the test session already holds one Ray instance
(``ray_session``), and a driver connects to one cluster at a time. The faults are injected by a
``worker_process_setup_hook`` of this test's Ray job, which wraps ``DecodeStage.__call__`` in every worker
process (the package itself has no such hook): decoding takes a second and logs its start, end and node;
on S3 (job 2) it first waits until five decodes have started or five minutes have passed, so that the
log shows how many ran at once however slowly worker processes start; a source named ``poison*`` kills
the process (``os._exit``); one named ``hang*`` sleeps for an hour.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pipeline_data import make_assets, write_images
from s3util import moto_s3

from pipeline.runner import read_manifest

REPO = Path(__file__).resolve().parent.parent
NAMES = ["rgb_24x32.png", "rgb_48x40.png", "rgba.png", "grey.png", "sub/nested.png", "cmyk.jpg"]

SCRIPT = textwrap.dedent("""
    import contextlib, io, json, os, sys, threading, time
    import ray
    from ray.cluster_utils import Cluster

    cfg = json.loads(sys.argv[1])
    LOG = cfg["log"]
    MB = 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 150 * MB, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=150 * MB) for _ in range(3)]
    cluster.wait_for_nodes()

    def hook():
        import os, time
        from pipeline import schema as S
        from pipeline import stages
        decode = stages.DecodeStage.__call__

        def call(self, batch):
            metas = [S.load_meta(m) for m in batch[S.META]]  # not the images already failed
            sources = [m["source"] for m in metas if m["status"] == S.STATUS_OK] or [""]
            if any(os.path.basename(s).startswith("poison") for s in sources):
                os._exit(1)
            if any(os.path.basename(s).startswith("hang") for s in sources):
                time.sleep(3600)
            start = time.time()
            if sources[0].startswith("s3://"):  # job 2: wait (at most 5 minutes) for 5 decodes at once
                open(os.path.join(LOG, f"started-{os.getpid()}-{start:.6f}"), "w").close()
                while (time.time() - start < 300
                       and sum(f.startswith("started-") for f in os.listdir(LOG)) < 5):
                    time.sleep(0.2)
            time.sleep(1.0)
            out = decode(self, batch)
            node = ray.get_runtime_context().get_node_id()
            with open(os.path.join(LOG, f"ended-{os.getpid()}-{start:.6f}"), "w") as f:
                f.write(json.dumps([start, time.time(), node]))
            return out

        stages.DecodeStage.__call__ = call

    ray.init(address=cluster.address, runtime_env={"worker_process_setup_hook": hook},
             log_to_driver=False, logging_level="ERROR")
    from jobs.cli import main

    def job(*args):
        err = io.StringIO()
        t0 = time.time()
        with contextlib.redirect_stderr(err):
            code = main(["upscale-dataset", *args, "--address", cluster.address, "--no-progress",
                         "--device", "cpu", "--seed", "1"])
        return {"code": code, "stderr": err.getvalue(), "seconds": time.time() - t0}

    result = {"nodes": sum(n["Alive"] for n in ray.nodes())}
    model = ["--weights", cfg["weights"], "--rtm", cfg["rtm"]]
    # 1. a node-local output on a multi-node cluster: refused before anything runs
    result["local"] = job("--input", cfg["local_in"], "--output", cfg["local_out"], *model)
    result["local"]["manifest"] = os.path.exists(os.path.join(cfg["local_out"], "manifest.parquet"))
    # 2. S3 in and out, the pools layout: read/decode tasks, and a poison image
    result["s3"] = job("--input", cfg["s3_in"], "--output", cfg["s3_out"], "--s3-endpoint", cfg["endpoint"],
                       *model, "--fused", "--dit-actors", "1", "--cpus-per-actor", "0.5", "--grm-batch", "2",
                       "--max-pixels", "512x512")  # small images: 2 of them a block under the block cap
    decodes = [json.load(open(os.path.join(LOG, f))) for f in os.listdir(LOG) if f.startswith("ended-")]
    result["decodes"] = decodes
    for f in os.listdir(LOG):
        os.remove(os.path.join(LOG, f))
    # 3. the single layout on a shared folder; a worker node that decoded an image is removed mid-job
    removed, finished = [], threading.Event()

    def remove_a_worker():
        while not finished.is_set() and not removed:
            nodes = {json.load(open(os.path.join(LOG, f)))[2] for f in os.listdir(LOG)
                     if f.startswith("ended-")}
            for w in workers:
                if w.node_id in nodes:
                    cluster.remove_node(w)
                    removed.append(w.node_id)
                    break
            time.sleep(0.2)

    remover = threading.Thread(target=remove_a_worker, daemon=True)
    remover.start()
    result["removal"] = job("--input", cfg["local_in"], "--output", cfg["local_out"], *model, "--shared-fs",
                            "--layout", "single", "--actors", "2", "--cpus-per-actor", "1",
                            "--grm-batch", "1")
    finished.set()
    remover.join()
    result["removed"] = len(removed)
    result["nodes_after"] = sum(n["Alive"] for n in ray.nodes())
    # 4. a stall: the one new input never finishes
    open(os.path.join(cfg["local_in"], "hang.png"), "wb").write(open(cfg["hang_source"], "rb").read())
    result["stall"] = job("--input", cfg["local_in"], "--output", cfg["local_out"], *model, "--shared-fs",
                          "--layout", "single", "--stall-minutes", "0.1")
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.timeout(1800)  # four Ray nodes and ~12 worker processes: room for a loaded 2-core machine
def test_cluster_storage_scaling_and_faults(tmp_path: Path) -> None:
    import boto3

    write_images(tmp_path / "all")
    local_in = tmp_path / "in"
    (local_in / "sub").mkdir(parents=True)
    for name in NAMES:
        (local_in / name).write_bytes((tmp_path / "all" / name).read_bytes())
    weights, rtm = make_assets(tmp_path, local_in, NAMES)
    (tmp_path / "log").mkdir()
    s3_names = [f"img_{name.replace('/', '_')}" for name in NAMES] + ["poison.png"]
    with moto_s3("cluster") as endpoint:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        for name in s3_names:
            source = NAMES[0] if name == "poison.png" else name.split("_", 1)[1].replace("sub_", "sub/")
            s3.put_object(Bucket="cluster", Key=f"lr/{name}", Body=(tmp_path / "all" / source).read_bytes())
        cfg = {"log": str(tmp_path / "log"), "weights": weights, "rtm": rtm, "local_in": str(local_in),
               "local_out": str(tmp_path / "out"), "s3_in": "s3://cluster/lr", "s3_out": "s3://cluster/sr",
               "endpoint": endpoint, "hang_source": str(local_in / NAMES[0])}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(cfg)], env=env, cwd=str(REPO),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=1700)
        finally:
            with_cluster_gone(proc)
        lines = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        assert lines, stdout[-3000:] + stderr[-3000:]
        result = json.loads(lines[-1][len("RESULT "):])
        print(json.dumps({k: v for k, v in result.items() if k != "decodes"})[:4000])  # shown on failure
        assert result["nodes"] == 4

        # 1. one line, exit 2, nothing written
        local = result["local"]
        assert local["code"] == 2, local
        assert "--input" in local["stderr"] and "--shared-fs" in local["stderr"], local
        assert len(local["stderr"].strip().splitlines()) == 1 and not local["manifest"]

        # 2. every output on S3, the manifest complete; the poison image one error row; > 4 decodes at once
        s3job = result["s3"]
        assert s3job["code"] == 1, s3job  # the poison image failed, everything else is ok
        manifest = read_manifest("s3://cluster/sr", {"endpoint_url": endpoint, "key": "testing",
                                                      "secret": "testing"})
        assert len(manifest) == len(s3_names) and manifest["id"].is_unique
        bad = manifest[manifest["status"] != "ok"]
        assert list(bad["source"]) == ["s3://cluster/lr/poison.png"], bad
        assert bad["error"].iloc[0].startswith("crashed: KilledItsWorker: the image was in flight in 3 "), bad
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="cluster", Prefix="sr/")["Contents"]}
        outputs = {f"sr/{n.rsplit('.', 1)[0]}.png" for n in s3_names if n != "poison.png"}
        assert outputs <= keys and not any(".partial-" in k for k in keys)
        ok = manifest["status"] == "ok"
        assert set(manifest.loc[ok, "output"]) == {f"s3://cluster/{k}" for k in outputs}
        events = sorted([(start, 1) for start, _, _ in result["decodes"]] +
                        [(end, -1) for _, end, _ in result["decodes"]])
        running = peak = 0
        for _, step in events:
            running += step
            peak = max(peak, running)
        assert len(result["decodes"]) >= len(s3_names) - 1 and peak > 4, (peak, result["decodes"])

    # 3. a worker node removed mid-job: the job finishes, every image exactly once in the manifest and
    # on storage
    removal = result["removal"]
    assert result["removed"] == 1 and result["nodes_after"] == 3, result
    assert removal["code"] == 0, removal
    manifest = read_manifest(str(tmp_path / "out"))
    assert len(manifest) == len(NAMES) and manifest["id"].is_unique
    assert set(manifest["status"]) == {"ok"}
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")
                     if p.is_file() and not p.name.startswith(("manifest", "part-", ".")))
    assert written == sorted(n.rsplit(".", 1)[0] + ".png" for n in NAMES)

    # 4. stalled: one clear line, exit 1, the manifest intact
    stall = result["stall"]
    assert stall["code"] == 1, stall
    assert "error: stopping the job: no image finished in 0.1 minutes (--stall-minutes)" in stall["stderr"]
    manifest = read_manifest(str(tmp_path / "out"))
    assert len(manifest) == len(NAMES) and set(manifest["status"]) == {"ok"}


def with_cluster_gone(proc: subprocess.Popen) -> None:
    """The script's process group (its Ray nodes started in it) is ended with it."""
    import signal

    if proc.poll() is None:
        proc.kill()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
