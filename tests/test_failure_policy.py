"""The failure policy's parts, in this process (issue 18): the ledger that turns an image that kills its
worker into an error row, the driver's stop rules (stall, error rate), the shared-storage check, and the
RTM index selection (faiss-gpu on GPU hosts, faiss-cpu elsewhere). The whole of it on a simulated
cluster: ``tests/test_pipeline_cluster.py``."""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_rtm
from PIL import Image

from jobs.checks import UsageError, check_shared_storage
from jobs.cli import main
from patchscaler.rtm import ReferenceTextureMemory, gpu_available
from patchscaler.weights import save_checkpoint, save_rtm
from pipeline import schema as S
from pipeline.build import PipelineConfig
from pipeline.faults import Guarded, start_ledger
from pipeline.runner import Summary, _Tally, read_manifest, stop_reason


class Died(BaseException):
    """Stands in for a worker's death: the stage never returns, so the ledger never hears ``end``."""


class PoisonStage:
    """Records the images of every call; dies on image ``p`` unless it is already an error row."""

    calls: ClassVar[list[list[str]]] = []

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch[S.IMAGE_ID]]
        PoisonStage.calls.append(ids)
        metas = {i: S.load_meta(m) for i, m in zip(ids, batch[S.META], strict=True)}
        if "p" in metas and metas["p"]["status"] == S.STATUS_OK:
            raise Died
        return batch


def test_an_image_that_kills_its_worker_becomes_an_error_row(ray_session) -> None:
    ledger = start_ledger()
    guarded = Guarded(stage=PoisonStage, kwargs={}, ledger=ledger, limit=3, name="stage")
    ids = ["a", "p", "b"]
    batch = {S.IMAGE_ID: S.object_column(ids),
             S.META: S.object_column([S.dump_meta(S.new_meta(source=f"/in/{i}.png", output=f"/out/{i}.png"))
                                      for i in ids])}
    PoisonStage.calls = []
    for _ in range(3):  # three deaths: the batch, then the suspects one at a time
        with pytest.raises(Died):
            guarded(batch)
    out = guarded(batch)
    metas = {str(i): S.load_meta(m) for i, m in zip(out[S.IMAGE_ID], out[S.META], strict=True)}
    assert sorted(metas) == sorted(ids)
    assert metas["a"]["status"] == metas["b"]["status"] == S.STATUS_OK
    assert metas["p"]["status"] == S.STATUS_ERROR
    assert metas["p"]["error"].startswith("crashed: KilledItsWorker: the image was in flight in 3 worker")
    # 1: all three die together; 2: suspects alone, p dies; 3: a (cleared) runs, then b and p alone, p
    # dies; 4: p is condemned and passes through with a, b runs alone
    assert PoisonStage.calls == [["a", "p", "b"], ["a"], ["p"], ["a"], ["p"], ["a", "p"], ["b"]]
    assert ray_session.get(ledger.size.remote()) == 0  # every image ended, nothing left in flight
    ray_session.kill(ledger)


def test_the_driver_stops_a_stalled_job_and_one_whose_first_images_mostly_fail() -> None:
    cfg = PipelineConfig(input="/in", output="/out", weights="w", rtm="r", stall_minutes=2,
                         max_error_rate=0.5, error_window=100)
    tally = _Tally(ok=40, failed=59, failures=[("/in/x.png", "grm: RuntimeError: bad weights")] * 59)
    assert stop_reason(cfg, tally, todo=1000, idle=119) == ""
    assert "no image finished in 2 minutes (--stall-minutes)" in stop_reason(cfg, tally, todo=1000, idle=120)
    tally.failed = 60  # the 100th image is in: 60 of 100 failed
    reason = stop_reason(cfg, tally, todo=1000, idle=0)
    assert reason.startswith("60 of the first 100 images failed, more than --max-error-rate 0.5")
    assert "first error: grm: RuntimeError: bad weights" in reason
    assert stop_reason(cfg, tally, todo=100, idle=0) == ""  # the job is no bigger than the window
    assert stop_reason(cfg, _Tally(ok=50, failed=50), todo=1000, idle=0) == ""  # exactly half: goes on
    jumped = _Tally(ok=10, failed=85)  # the driver saw 95 images done, then 130
    assert stop_reason(cfg, jumped, todo=1000, idle=0) == "" and not jumped.rate_checked
    jumped.failed = 120
    assert stop_reason(cfg, jumped, todo=1000, idle=0).startswith("120 of the first 130 images failed")
    healthy = _Tally(ok=70, failed=40)  # checked once, at 110 done: 40 failed goes on ...
    assert stop_reason(cfg, healthy, todo=1000, idle=0) == "" and healthy.rate_checked
    healthy.failed = 400  # ... and later failures are not the first images': no second check
    assert stop_reason(cfg, healthy, todo=1000, idle=0) == ""
    never = PipelineConfig(input="/in", output="/out", weights="w", rtm="r", stall_minutes=0,
                           max_error_rate=1.0)
    assert stop_reason(never, _Tally(ok=0, failed=100), todo=1000, idle=1e9) == ""
    summary = Summary(inputs=1000, skipped=0, ok=40, failed=60, seconds=10, parts=1, pools=[],
                      stopped="60 of the first 100 images failed")
    assert not summary.all_ok and "900 not run: run the same command to resume" in summary.line()


def test_node_local_paths_are_refused_on_a_multi_node_cluster() -> None:
    paths = {"--input": "/data/in", "--output": "s3://b/out", "--metric-cache": None}
    check_shared_storage(paths, nodes=1, shared_fs=False)  # one node: its disk is the cluster's
    check_shared_storage(paths, nodes=3, shared_fs=True)  # the user says every node mounts it
    check_shared_storage({"--input": "s3://b/in", "--output": "gs://b/out"}, nodes=3, shared_fs=False)
    with pytest.raises(UsageError) as info:
        check_shared_storage(paths, nodes=3, shared_fs=False)
    text = str(info.value)
    assert text.startswith("--input /data/in is a local path") and "3 nodes" in text and "--shared-fs" in text
    assert "\n" not in text
    with pytest.raises(UsageError, match="--output file:///x"):
        check_shared_storage({"--output": "file:///x"}, nodes=2, shared_fs=False)


def test_rtm_search_is_the_same_whichever_index_is_asked_for() -> None:
    """The RTM asks for the GPU index on GPU actors (``use_gpu``): without faiss-gpu or a GPU it builds
    the CPU index through the same code (``rtm.build_index``); both give the exact top-K. The GPU
    branch itself has not run on a GPU (docs/pipeline.md, "GPU hosts")."""
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(200, 32, generator=g), torch.randn(200, 4, 16, 16, generator=g)
    queries = torch.randn(50, 32, generator=g)
    cpu = ReferenceTextureMemory(keys=keys, values=values, use_gpu=False)
    asked = ReferenceTextureMemory(keys=keys, values=values, use_gpu=True)
    assert not cpu.on_gpu and asked.on_gpu == gpu_available()
    scores, idx = asked.search(queries, 8)
    ref_scores, ref_idx = cpu.search(queries, 8)
    assert torch.equal(idx, ref_idx) and torch.allclose(scores, ref_scores, atol=1e-5)
    cosine = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
    top = cosine.topk(8, dim=1)
    assert torch.equal(idx, top.indices) and torch.allclose(scores, top.values, atol=1e-5)


def _png(size: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.timeout(600)
def test_a_running_job_whose_first_images_mostly_fail_stops_at_the_error_rate(
        ray_session, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--max-error-rate`` in a real ``upscale-dataset`` run: 110 truncated PNGs (they fail at decode,
    cheaply) and 10 good ones among them. The driver stops the job once 100 images are done: one line
    naming the flag, exit 1, a manifest of every image recorded so far (each ok row's output written).
    The same command would then do the rest (``--dry-run``: the images not run are still to do)."""
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    good = {f"img{i:03d}.png" for i in range(0, 120, 12)}  # 9 of the first 100, sorted by name
    for i in range(120):
        whole = _png(16, i)
        name = f"img{i:03d}.png"
        (inputs / name).write_bytes(whole if name in good else whole[: len(whole) // 2])
    model = make_tiny_model()
    save_checkpoint(model, str(tmp_path / "weights"))
    rtm = make_tiny_rtm(model)
    save_rtm(str(tmp_path / "rtm"), keys=rtm.keys, values=rtm.values, manifest={"name": "test"})
    job = ["upscale-dataset", "--input", str(inputs), "--output", str(out), "--actors", "2", "--no-progress",
           "--weights", str(tmp_path / "weights"), "--rtm", str(tmp_path / "rtm")]
    assert main(job) == 1
    stdout, stderr = capsys.readouterr()
    named = [line for line in stderr.splitlines() if "--max-error-rate" in line]
    assert len(named) == 1, stderr
    assert re.match(r"error: stopping the job: \d+ of the first \d+ images failed, more than "
                    r"--max-error-rate 0\.5 \(.*first error: decode: ", named[0]), named[0]
    ok, failed = map(int, re.search(r"done: (\d+) ok, (\d+) failed", stdout).groups())
    assert 100 <= ok + failed < 120 and "not run: run the same command to resume" in stdout, stdout
    manifest = read_manifest(str(out))  # readable, one row per image the driver got back
    assert len(manifest) == ok + failed and manifest["id"].is_unique
    assert ok >= 1 and (manifest["status"] == "ok").sum() == ok
    assert set(manifest.loc[manifest["status"] == "ok", "source"].map(lambda s: Path(s).name)) <= good
    assert all(Path(o).is_file() for o in manifest.loc[manifest["status"] == "ok", "output"])
    assert manifest.loc[manifest["status"] == "error", "error"].str.startswith("decode: ").all()

    assert main([*job, "--dry-run"]) == 0  # what the same command would do next: the rest
    stdout = capsys.readouterr().out
    left = 120 - ok - failed
    assert f"120 inputs: {left} to do, {ok} already done, {failed} failed before (not retried)" in stdout
