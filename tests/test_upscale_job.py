"""``patchscaler upscale``: the same files as the pipeline for the same inputs (alpha, palette, EXIF
rotation, ICC, 16-bit grey, grey, CMYK, bad files), progress on stderr, one-line usage errors with exit
code 2 before anything heavy loads."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from pipeline_data import GREY_FILES, Stages, make_assets, write_images

from jobs import upscale
from pipeline.decode import ORIENTATION_TAG

pytestmark = pytest.mark.timeout(400)
REPO = Path(__file__).resolve().parent.parent
SEED = 4
NAMES = ["rgba.png", "la.png", "p_transparent.png", "palette.gif", "exif_rotated.jpg", "rgb_48x40.png",
         "grey16.png", "grey.png", "cmyk.jpg", "rgba_webp.webp", "tiny_5x3.png", "dup.png", "dup.jpg",
         "sub/nested.png"]
BAD = ["notes.txt", "corrupt.png", "empty.png"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("upscale_job")
    write_images(root / "all")
    for name in NAMES + BAD:
        (root / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "in" / name).write_bytes((root / "all" / name).read_bytes())
    weights, rtm = make_assets(root, root / "in", NAMES)
    return SimpleNamespace(root=root, inputs=root / "in", weights=weights, rtm=rtm)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    upscale.add_arguments(parser)
    return parser.parse_args(list(argv))


def _image(path: Path) -> tuple[str, tuple[int, int], bytes | None, dict, np.ndarray]:
    with Image.open(path) as im:
        return im.mode, im.size, im.info.get("icc_profile"), dict(im.getexif()), np.asarray(im)


def test_upscale_writes_what_the_pipeline_writes(data, capsys) -> None:
    out = data.root / "upscale_out"
    code = upscale.run(_args(str(data.inputs), str(out), "--weights", data.weights, "--rtm", data.rtm,
                             "--seed", str(SEED), "--device", "cpu"))
    captured = capsys.readouterr()
    lines = [json.loads(x) for x in captured.out.splitlines()[:-1]]
    assert captured.out.splitlines()[-1] == f"done: {len(NAMES)} ok, {len(BAD)} failed"
    assert code == 1  # some inputs failed
    by_input = {os.path.relpath(x["input"], data.inputs): x for x in lines}
    assert sorted(by_input) == sorted(NAMES + BAD)  # a non-image is an error line, not a silent skip

    stages = Stages(weights=data.weights, rtm=data.rtm, seed=SEED)
    sources = sorted(str(data.inputs / n) for n in NAMES + BAD)
    rows = {os.path.relpath(r["source"], data.inputs): r for r in stages.run(sources, str(data.inputs),
                                                                               str(data.root / "stages_out"))}
    for name in BAD:  # the same one-line error naming the file, without Pillow's BytesIO repr
        line = by_input[name]
        assert line["status"] == "error" and line["error"] == rows[name]["error"]
        kind = "UnreadableImage: empty file" if name == "empty.png" else "NotAnImage: not an image"
        assert line["error"].startswith(f"decode: {data.inputs / name}: {kind}")
        assert "BytesIO" not in line["error"]
    for name in NAMES:
        line, row = by_input[name], rows[name]
        assert line["status"] == "ok" == row["status"], (line, row["error"])
        same_name = os.path.relpath(row["output"], data.root / "stages_out")
        assert os.path.relpath(line["output"], out) == same_name
        mine, theirs = _image(Path(line["output"])), _image(Path(row["output"]))
        assert mine[:4] == theirs[:4], name  # mode, size, ICC profile, EXIF
        assert np.array_equal(mine[4], theirs[4]), name  # pixel for pixel (alpha included)
        mode, size, _, exif, _ = mine
        w, h = size
        assert line["size_out"] == f"{w}×{h}" and (row["width_out"], row["height_out"]) == (w, h)
        assert ORIENTATION_TAG not in exif
        if name in GREY_FILES:
            assert mode == ("LA" if name == "la.png" else "L")  # grey stays grey: no colour cast
    assert _image(Path(by_input["rgba.png"]["output"]))[0] == "RGBA"
    assert _image(Path(by_input["palette.gif"]["output"]))[0] == "RGB"
    assert _image(Path(by_input["rgb_48x40.png"]["output"]))[2]  # ICC kept
    assert _image(Path(by_input["exif_rotated.jpg"]["output"]))[1] == (96, 160)  # shown upright, x4
    assert by_input["dup.jpg"]["output"] != by_input["dup.png"]["output"]
    deep = _image(Path(by_input["grey16.png"]["output"]))[4]
    assert deep.min() < 64 and deep.max() > 192  # a 0..65535 ramp, not clipped to white
    assert "sampling" in captured.err and "patch-steps" in captured.err  # progress, one line per image
    assert len(captured.err.strip().splitlines()) == len(NAMES)


@pytest.mark.parametrize("refine,color_fix", [("none", "adain"), ("none", "none")])
def test_refine_and_color_fix_options_write_what_the_pipeline_writes(data, tmp_path, capsys, refine,
                                                                     color_fix) -> None:
    """``--refine none`` (the decoded GRM output) and every colour fix: the same pixels as the pipeline's
    stages given the same options (the default, diffusion + wavelet, is the test above)."""
    names = ["rgba.png", "grey16.png", "rgb_48x40.png", "tiny_5x3.png"]
    folder = tmp_path / "in"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes((data.inputs / name).read_bytes())
    code = upscale.run(_args(str(folder), str(tmp_path / "out"), "--weights", data.weights, "--rtm", data.rtm,
                             "--seed", str(SEED), "--device", "cpu", "--refine", refine,
                             "--color-fix", color_fix))
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()[:-1]]
    assert code == 0 and {(x["refine"], x["color_fix"]) for x in lines} == {(refine, color_fix)}
    stages = Stages(weights=data.weights, rtm=data.rtm, seed=SEED, refine=refine, color_fix=color_fix)
    rows = stages.run(sorted(str(folder / n) for n in names), str(folder), str(tmp_path / "stages"))
    for line, row in zip(sorted(lines, key=lambda x: x["input"]), rows, strict=True):
        assert row["status"] == "ok", row["error"]
        assert np.array_equal(_image(Path(line["output"]))[4], _image(Path(row["output"]))[4]), line["input"]


def test_progress_bar_on_a_terminal(monkeypatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bar = upscale.Progress("[1/2] a.png", tty=True)
    for done in (0, 10, 40, 100):
        bar(done, 100)
    bar.close()
    text = err.getvalue()
    assert "[1/2] a.png" in text and "100/100 patch-steps" in text and "%" in text
    err.seek(0)
    err.truncate()
    quiet = upscale.Progress("[2/2] b.png", tty=False)
    for done in (0, 50, 100):
        quiet(done, 100)
    quiet.close()
    assert err.getvalue().strip() == "[2/2] b.png: sampling 100 patch-steps"


def test_maps_never_overwrite_another_output(data, tmp_path, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "a_confidence.png"):
        (folder / name).write_bytes((data.inputs / "tiny_5x3.png").read_bytes())
    code = upscale.run(_args(str(folder), str(tmp_path / "out"), "--weights", data.weights, "--rtm", data.rtm,
                             "--device", "cpu", "--save-maps"))
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()[:-1]]
    assert code == 0
    a, other = sorted(lines, key=lambda x: x["input"])
    assert "warning" in a and "maps" not in a and other["maps"]
    with Image.open(tmp_path / "out" / "a_confidence.png") as im:
        assert im.size == (12, 20)  # the upscaled input, not a confidence map
    with Image.open(tmp_path / "out" / "a_confidence_groups.png") as im:
        assert im.mode == "RGB"


def _cli(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The command in a fresh process; it prints whether torch was imported (the check's cost)."""
    script = ("import sys\nfrom jobs.cli import main\ncode = main(sys.argv[1:])\n"
              "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\nsys.exit(code)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", script, "upscale", *argv], capture_output=True, text=True,
                          env=env, cwd=str(cwd), timeout=120)


def test_usage_errors_are_one_line_and_exit_2_before_torch_loads(data, tmp_path) -> None:
    image = str(data.inputs / "rgba.png")
    no_weights = tmp_path / "empty_weights"
    no_weights.mkdir()
    cases = [
        ([str(tmp_path / "missing.png"), str(tmp_path / "o")], "input not found: "),
        ([image, str(tmp_path / "o"), "--weights", str(tmp_path / "nowhere")], "--weights "),
        ([image, str(tmp_path / "o"), "--weights", str(no_weights)],
         "missing config.json, model.safetensors"),
        ([image, str(tmp_path / "o"), "--weights", data.weights, "--rtm", data.weights], "not an RTM folder"),
        ([image, str(tmp_path / "o.gif")], "unknown image extension '.gif'"),
        ([str(data.inputs), str(data.inputs)], "the output folder must differ from the input folder"),
    ]
    for argv, message in cases:
        proc = _cli(*argv)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("patchscaler upscale: error: ")
        assert message in proc.stderr
        assert proc.stdout.strip() == "torch not loaded"


def test_an_empty_folder_is_not_an_error(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    proc = _cli(str(tmp_path / "empty"), str(tmp_path / "o"))
    assert proc.returncode == 0 and proc.stderr.startswith("patchscaler upscale: no files in ")
    assert proc.stdout.strip() == "torch not loaded"


def test_a_broken_checkpoint_is_a_one_line_error(data, tmp_path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"\0" * 16)
    proc = _cli(str(data.inputs / "rgba.png"), str(tmp_path / "o"), "--weights", str(broken),
                "--rtm", data.rtm)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("patchscaler upscale: error: cannot load the model (")


def test_the_checked_file_names_are_the_loaders() -> None:
    from patchscaler import weights

    assert upscale.CHECKPOINT_FILES == (weights.CONFIG_FILE, weights.WEIGHTS_FILE)
    assert upscale.RTM_FILES == (weights.RTM_FILE, weights.RTM_MANIFEST)
