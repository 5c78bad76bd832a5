"""``bench/train_throughput.py`` end to end, in-process, at the tiny preset: one timed step of each of the
four trainers on synthetic data with a random RTM, the JSON it writes and the table it prints."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from train_throughput import RECIPE, main, rate  # noqa: E402

TRAINERS = ("autoencoder", "grm", "classifier", "patchdit")


@pytest.mark.timeout(300)
def test_one_step_of_each_trainer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "throughput.json"
    threads = torch.get_num_threads()  # passed on, so the test process keeps its thread count
    with torch.random.fork_rng():
        returned = main(["--steps", "1", "--warmup", "0", "--threads", str(threads), "--json", str(out),
                         "--compare-degradation", "1"])
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result == json.loads(json.dumps(returned))
    assert result["data"].startswith("synthetic") and result["rtm"].startswith("random")
    assert result["steps"] == 1 and result["warmup"] == 0 and result["threads"] == threads
    assert tuple(result["trainers"]) == TRAINERS
    for name, r in result["trainers"].items():
        assert r["batch_size"] == RECIPE[name]["batch_size"] and r["crop"] == RECIPE[name]["crop"]
        assert len(r["step_seconds"]) == 1 and r["step_seconds_median"] == r["step_seconds"][0] > 0
        assert math.isfinite(r["samples_per_s"]) and r["samples_per_s"] > 0
        assert r["samples_per_s"] == pytest.approx(r["batch_size"] * r["steps_per_s"], rel=1e-9)
        assert r["steps_per_s"] == pytest.approx(1 / r["step_seconds_median"], rel=1e-9)
        assert sum(r["shares"].values()) == pytest.approx(1.0) and min(r["shares"].values()) >= 0
        assert math.isfinite(r["loss_last"]) and r["trainable_parameters"] > 0
        row = next(line for line in printed.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {rate(r['steps_per_s'])} | {rate(r['samples_per_s'])} |" in row
    # Degradation happens in the GRM and Patch-DiT steps only; Patch-DiT trains on 9 windows per 128 px crop
    # (latent 32 x 32 at f = 4, 16 x 16 windows at stride 8).
    shares = {name: r["shares"]["degradation"] for name, r in result["trainers"].items()}
    assert shares["grm"] > 0 and shares["patchdit"] > 0
    assert shares["autoencoder"] == 0 and shares["classifier"] == 0
    assert result["trainers"]["patchdit"]["patches_per_step"] == 9 * RECIPE["patchdit"]["batch_size"]
    comparison = result["degradation_comparison"]
    assert comparison["batch_size"] == RECIPE["grm"]["batch_size"] and comparison["reps"] == 1
    assert comparison["speedup"] == pytest.approx(comparison["per_image_s"] / comparison["batched_s"])
    assert "grm: data + degradation = " in printed and "image by image" in printed
    assert printed.startswith("command: ") and "bench/train_throughput.py --steps 1 --warmup 0" in printed
