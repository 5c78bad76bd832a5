"""The command line as a user meets it (issue 11, items 5, 10 and 11): every mistake is one line on stderr
and exit code 2, found before Ray starts; Ctrl-C is one line and 130; a finished job does not start
Ray; help shows the defaults, the exit codes and the version. All in-process through ``jobs.cli.main``;
``jobs.runtime.start_ray`` is replaced by a function that fails the test, so nothing here starts Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from jobs import runtime
from jobs.cli import main
from jobs.defaults import DEMO_RTM, DEMO_WEIGHTS

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was started")

    monkeypatch.setattr(runtime, "start_ray", refuse)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, size in enumerate([(24, 16), (16, 20)]):
        Image.new("RGB", size, (40 * i, 90, 160)).save(folder / f"img{i}.png")
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, err.splitlines(), out


def assert_usage_error(capsys: pytest.CaptureFixture[str], *argv: str, says: str) -> None:
    code, err, _ = run(capsys, *argv)
    assert code == 2, err
    assert len(err) == 1, err  # one line, no traceback
    assert says in err[0], err
    assert "Traceback" not in err[0] and "<_io." not in err[0]


def test_user_mistakes_are_one_line_and_exit_2(capsys, images: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    out = str(tmp_path / "out")
    job = ["upscale-dataset", "--output", out]
    assert_usage_error(capsys, *job, "--input", str(tmp_path / "nope"), says=f"--input not found: {tmp_path}")
    inp = ["--input", str(images)]
    # --weights: missing, a folder that is not a checkpoint, a config.json that is not one
    assert_usage_error(capsys, *job, *inp, "--weights", str(tmp_path / "w"), says="--weights not found")
    (tmp_path / "empty").mkdir()
    assert_usage_error(capsys, *job, *inp, "--weights", str(tmp_path / "empty"),
                       says="--weights is not a checkpoint")
    bad = tmp_path / "bad-weights"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"format_version": 1, "no_such_key": 3}))
    (bad / "model.safetensors").write_bytes(b"junk")
    assert_usage_error(capsys, *job, *inp, "--weights", str(bad), says="not a PatchScaler checkpoint config")
    (bad / "config.json").write_text((DEMO_WEIGHTS / "config.json").read_text())  # a config, junk tensors
    assert_usage_error(capsys, *job, *inp, "--weights", str(bad), says=f"--weights {bad} does not load")
    assert_usage_error(capsys, *job, *inp, "--rtm", str(tmp_path / "empty"), says="--rtm is not an RTM")
    # the output is a file
    (tmp_path / "file").write_text("x")
    assert_usage_error(capsys, "upscale-dataset", *inp, "--output", str(tmp_path / "file"), says="is a file")
    # invalid option values (argparse): one line too
    for option, value in [("--quality", "0"), ("--window", "-3"), ("--max-pixels", "big"),
                          ("--dit-actors", "simple=0"), ("--commit-seconds", "0"), ("--layout", "x")]:
        assert_usage_error(capsys, *job, *inp, option, value, says=f"argument {option}")
    assert_usage_error(capsys, *job, *inp, "--score", "no-such-metric", says="unknown metric")
    # metric weights missing: the hint names the flags of this job
    code, err, _ = run(capsys, *job, *inp, "--score", "musiq", "--metric-cache", str(tmp_path / "cache"))
    assert code == 2 and len(err) == 1 and "--metric-cache" in err[0] and "--score psnr,ssim,piqe" in err[0]
    assert not Path(out).exists()  # nothing was started or written
    # build-rtm with a missing source, train with a missing --data
    assert_usage_error(capsys, "build-rtm", "--source", f"a={tmp_path / 'none'}", "--out",
                       str(tmp_path / "r"), says=f"--source a not found: {tmp_path / 'none'}")
    assert_usage_error(capsys, "train-grm", "--init", str(DEMO_WEIGHTS), "--out", str(tmp_path / "t"),
                       "--data", str(tmp_path / "none"), says="--data not found")
    assert_usage_error(capsys, "evaluate", "--results", str(tmp_path / "none"), "--out", out,
                       "--metrics", "psnr", says="--results not found")


def test_s3_without_credentials_or_endpoint_is_one_line(capsys, images: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(images))  # no ~/.aws either
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    nowhere = ["--s3-endpoint", "http://127.0.0.1:9"]  # nothing listens on port 9
    assert_usage_error(capsys, "upscale-dataset", "--input", "s3://bucket/lr", "--output", "/tmp/x", *nowhere,
                       says="no S3 credentials")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    s3fs.S3FileSystem.clear_instance_cache()
    assert_usage_error(capsys, "upscale-dataset", "--input", "s3://bucket/lr", "--output", "/tmp/x", *nowhere,
                       says="cannot reach the S3 endpoint")


def test_ctrl_c_is_one_line_and_130(capsys, images: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.runner

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.runner, "plan_job", interrupted)
    code, err, _ = run(capsys, "upscale-dataset", "--input", str(images), "--output", str(tmp_path / "o"))
    assert code == 130 and len(err) == 1 and "interrupted" in err[0]


def test_a_finished_job_does_not_start_ray(capsys, images: Path, tmp_path: Path) -> None:
    """Item 10: the manifest says every image is done (and one failed for good): no Ray, a summary."""
    from pipeline import schema as S
    from pipeline.manifest import write_part

    out = tmp_path / "out"
    rows = []
    for name in ("img0.png", "img1.png"):
        meta = S.new_meta(source=str(images / name), output=str(out / name))
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(out / name)
        rows.append(S.manifest_row(meta, image_id_=S.image_id(str(images / name)), sampling="x", seed=0,
                                   finished_at=1.0))
    (images / "broken.png").write_bytes(b"not a png")
    meta = S.fail(S.new_meta(source=str(images / "broken.png"), output=str(out / "broken.png")), "decode",
                  OSError("cannot identify image file broken.png"))
    rows.append(S.manifest_row(meta, image_id_=S.image_id(str(images / "broken.png")), sampling="x", seed=0,
                               finished_at=1.0))
    write_part(str(out), "earlier-00000", rows, {})
    code, err, stdout = run(capsys, "upscale-dataset", "--input", str(images), "--output", str(out))
    assert code == 1 and err == []  # the broken file failed before: listed, not retried, no Ray
    assert "3 inputs: 0 to do, 2 already done, 1 failed before (not retried)" in stdout
    assert "done: 0 ok, 0 failed, 2 skipped (already done) of 3 inputs" in stdout
    assert f"  {images / 'broken.png'}: decode: OSError: cannot identify image file broken.png" in stdout
    assert f"manifest: {out / 'manifest.parquet'}" in stdout
    (images / "broken.png").unlink()  # now everything is done: exit 0, still no Ray
    code, err, stdout = run(capsys, "upscale-dataset", "--input", str(images), "--output", str(out))
    assert code == 0 and err == [] and "2 inputs: 0 to do, 2 already done" in stdout


def test_help_shows_defaults_exit_codes_and_version(capsys) -> None:
    code, _, out = run(capsys, "upscale-dataset", "--help")
    assert code == 0
    text = " ".join(out.split())
    for expected in ("(default: 4096x4096)", "(default: 95)", "(default: 64)", "(default: auto)",
                     "(default: 2.0)", "exit codes:", "2 usage or configuration error", "130 interrupted"):
        assert expected in text, expected
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "bounded execution window" not in text
    code, _, out = run(capsys, "--help")
    assert code == 0 and "thin add" not in out and "add_arguments" not in out and "exit codes:" in out
    code, _, out = run(capsys, "--version")
    assert code == 0 and out.startswith("patchscaler ")


def test_demo_assets_pass_the_checks() -> None:
    from jobs.checks import check_checkpoint, check_rtm

    check_checkpoint(str(DEMO_WEIGHTS), {})
    check_rtm(str(DEMO_RTM), {})
