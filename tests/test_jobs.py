"""``upscale-dataset`` run unattended (issue 11): the terminal of a default run, ``--score`` with the
default resource plan, kill -9 of the driver, a storage outage while recording.

The first and third tests run the command as a user does, in a subprocess (its own private local
Ray, all of this machine's CPUs, the bundled demo weights); the others reuse the session's Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image

from jobs.cli import main
from pipeline import manifest as M
from pipeline.runner import read_manifest, read_parts

REPO = Path(__file__).resolve().parent.parent
NOISE_WORDS = ("warning", "deprecat", "traceback", "error")


def make_images(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (size[1] // 4 + 1, size[0] // 4 + 1, 3), dtype=np.uint8)
        path = folder / f"img{i:02d}.png"
        Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def cli(*args: str, timeout: float = 1200, **popen: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_WAIT_POLICY", None)  # as a user runs it
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


@pytest.mark.timeout(2400)  # about 2 minutes on an idle 2-core machine
def test_a_default_run_is_quiet_and_scores_with_the_default_plan(tmp_path: Path) -> None:
    """3 images: at most 30 lines, none a warning; then ``--score piqe`` (the scoring pool beside the
    model actors, default resource plan: this hung before) finishes; then a re-run has nothing to do."""
    make_images(tmp_path / "in", 3, (32, 24))
    out = tmp_path / "out"
    job = ["upscale-dataset", "--input", str(tmp_path / "in"), "--output", str(out)]
    first = cli(*job)
    lines = (first.stdout + first.stderr).splitlines()
    assert first.returncode == 0, first.stdout + first.stderr
    assert len(lines) <= 30, lines
    assert not [x for x in lines if any(w in x.lower() for w in NOISE_WORDS)], lines
    assert "done: 3 ok, 0 failed" in first.stdout and f"manifest: {out / 'manifest.parquet'}" in first.stdout

    scored = cli(*job, "--score", "piqe")  # outputs without scores are redone and scored
    lines = (scored.stdout + scored.stderr).splitlines()
    assert scored.returncode == 0, scored.stdout + scored.stderr
    assert len(lines) <= 30 and not [x for x in lines if any(w in x.lower() for w in NOISE_WORDS)], lines
    scores = pd.read_parquet(out / "scores.parquet")
    assert sorted(scores["metric"]) == ["piqe"] * 3 and np.isfinite(scores["value"]).all()

    start = time.perf_counter()
    again = cli(*job, "--score", "piqe")
    assert again.returncode == 0 and "3 inputs: 0 to do, 3 already done" in again.stdout
    assert "done: 0 ok, 0 failed, 3 skipped" in again.stdout
    assert time.perf_counter() - start < 60  # no Ray started (that alone takes 10-20 s here)


@pytest.mark.timeout(1800)
def test_kill_9_loses_only_the_images_in_flight(ray_session, tmp_path: Path) -> None:
    """Issue 11 item 3: the driver is killed with SIGKILL mid-run; the re-run redoes only images whose
    outputs were written in the last seconds before the kill (in flight), not a window of 64."""
    make_images(tmp_path / "in", 16, (64, 48))
    out = tmp_path / "out"
    commit, slack = 1.0, 4.0  # rows are recorded within `commit` s of coming back; slack: a loaded machine
    job = ["upscale-dataset", "--input", str(tmp_path / "in"), "--output", str(out), "--actors", "1",
           "--grm-batch", "1", "--commit-seconds", str(commit), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", *job], cwd=str(REPO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    job_processes: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:
            written = {p: p.stat().st_mtime for p in out.glob("img*.png")}
            old = [p for p, t in written.items() if t < time.time() - commit - slack]
            if len(old) >= 3:
                break
            job_processes.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
            time.sleep(0.2)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, as kill -9 <pid> does
        killed_at = time.time()
        proc.wait(timeout=60)
    finally:  # the job's own Ray processes outlive its driver (an actor finishes its call): end them
        time.sleep(2)
        if proc.poll() is None:
            proc.kill()
        for p in job_processes.values():
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(list(job_processes.values()), timeout=30)
    written = {p.stem: p.stat().st_mtime for p in out.glob("img*.png")}
    must_be_recorded = {stem for stem, t in written.items() if t < killed_at - commit - slack}
    assert 3 <= len(must_be_recorded) and len(written) < 16
    recorded = {Path(s).stem for s in read_parts(str(out), {})["source"]}
    assert must_be_recorded <= recorded  # an image finished more than a few seconds before: not lost

    from pipeline.build import PipelineConfig
    from pipeline.runner import run_pipeline

    cfg = PipelineConfig(input=str(tmp_path / "in"), output=str(out), actors=2,  # 2 cores here
                         weights=str(REPO / "assets/demo/weights"), rtm=str(REPO / "assets/demo/rtm"))
    summary = run_pipeline(cfg, echo=False)
    assert (summary.ok, summary.failed, summary.skipped) == (16 - len(recorded), 0, len(recorded))
    redone = set(read_parts(str(out), {}).loc[lambda r: r["finished_at"] > killed_at, "source"])
    in_flight = {str(tmp_path / "in" / f"{stem}.png") for stem in set(written) - must_be_recorded}
    never_written = {str(p) for p in (tmp_path / "in").glob("*.png") if p.stem not in written}
    assert redone <= in_flight | never_written
    assert len(read_manifest(str(out))) == 16 and (read_manifest(str(out))["status"] == "ok").all()


@pytest.mark.timeout(1200)
def test_a_storage_outage_ends_with_a_summary_not_a_traceback(ray_session, tmp_path: Path, capsys,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11 item 4: while the job runs, writing the manifest fails (as with an S3 endpoint gone) and
    two outputs cannot be written; the job goes on, lists the failures, says what was not recorded and
    exits 1. When storage is back, the re-run loses nothing."""
    make_images(tmp_path / "in" / "a", 2, (24, 24))
    make_images(tmp_path / "in" / "b", 2, (24, 24), seed=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "b").write_text("a file where the folder b/ should be: writing b/*.png fails")
    calls = []

    def storage_down(uri: str, data: bytes, options: dict) -> None:
        calls.append(uri)
        raise OSError(f"Could not connect to the endpoint URL: {uri}")

    monkeypatch.setattr(M, "write_bytes_atomic", storage_down)
    job = ["upscale-dataset", "--input", str(tmp_path / "in"), "--output", str(out), "--commit-seconds", "1",
           "--no-progress", "--actors", "2"]
    code = main(job)
    stdout, stderr = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in stdout + stderr and len(calls) >= 2  # parts and the manifest were tried
    assert "done: 2 ok, 2 failed, 0 skipped" in stdout, stdout
    assert "failed images (2):" in stdout and stdout.count(": write: ") == 2, stdout  # the stage that failed
    assert stdout.count("FileExistsError") == 2, stdout
    err = stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: cannot record results (OSError")  # said once
    assert "error: storage failed, 4 results not recorded (OSError: Could not connect" in stdout

    monkeypatch.undo()  # storage is back
    (out / "b").unlink()
    assert main(job) == 0
    manifest = read_manifest(str(out))
    assert len(manifest) == 4 and (manifest["status"] == "ok").all()
