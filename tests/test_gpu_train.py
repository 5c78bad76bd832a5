"""The GPU training benchmark on CPU: ``bench/gpu_train.py`` end to end at the tiny preset with
diffusers, Ray, faiss and pyiqa unimportable (as on the lent GPU machine), its denoiser against the
trainer's, the training-step FLOP count of ``bench/flops.py`` and the GPU-hours table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_gpu_model import BLOCKER

from patchscaler.patch_dit import PatchDiT
from patchscaler.presets import PRESETS
from patchscaler.texture import TextureEncoder

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from flops import count_flops, train_step_flops, windows_per_crop  # noqa: E402
from gpu_train import Denoiser, build  # noqa: E402


def test_denoiser_is_the_trainers_texture_denoiser() -> None:
    from patchscaler.training.steps import TextureDenoiser  # imports diffusers: here, not on the GPU machine

    cfg = PRESETS["tiny"]
    ours = build(cfg, torch.device("cpu"), seed=0)  # gates randomised: a non-trivial output
    ref = TextureDenoiser(patch_dit=PatchDiT(config=cfg.patch_dit),
                          texture_encoder=TextureEncoder(dit=cfg.patch_dit, config=cfg.texture_encoder))
    ref.load_state_dict(ours.state_dict(), strict=True)  # the same submodules, the same names
    g = torch.Generator().manual_seed(0)
    c, v, k = cfg.latent_channels, cfg.sampler.patch_size, cfg.texture_encoder.top_k
    x_t, y0 = torch.randn(3, c, v, v, generator=g), torch.randn(3, c, v, v, generator=g)
    values, scores = torch.randn(3, k, c, v, v, generator=g), torch.rand(3, k, generator=g)
    t = torch.tensor([1.0, 500.0, 1000.0])
    out = ours(x_t, t, y0, values, scores)
    torch.testing.assert_close(out, ref(x_t, t, y0, values, scores), rtol=0, atol=0)
    assert out.abs().mean() > 1e-3
    assert isinstance(ours, Denoiser)


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_train_step_flops(preset: str) -> None:
    cfg = PRESETS[preset]
    d, k = cfg.patch_dit, cfg.texture_encoder.top_k
    with torch.device("meta"):
        encoder, dit = TextureEncoder(dit=d, config=cfg.texture_encoder), PatchDiT(config=d)
        x, t = torch.empty(1, d.latent_channels, 16, 16), torch.empty(1)
        values, scores = torch.empty(1, k, d.latent_channels, 16, 16), torch.empty(1, k)
        prompt = torch.empty(1, k * d.num_tokens, d.hidden_size)
    forward = count_flops(encoder, values, scores) + count_flops(dit, x, t, x, prompt)
    one = train_step_flops(cfg, 1)
    assert 2.95 * forward < one <= 3 * forward  # backward = 2x forward, less the inputs' gradients
    if preset == "tiny":
        assert train_step_flops(cfg, 3) == 3 * one  # linear in the batch
    else:
        assert round(one / 1e9, 1) == 366.5  # docs/training.md's GPU-hours rest on this


def test_windows_per_crop() -> None:
    assert windows_per_crop(PRESETS["paper"], 256) == 9  # 32 x 32 latent, 16 x 16 windows at stride 8
    assert windows_per_crop(PRESETS["tiny"], 96) == 4  # f = 4: 24 x 24 latent
    with pytest.raises(ValueError, match="smaller than one"):
        windows_per_crop(PRESETS["paper"], 64)


def test_gpu_hours_table(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import gpu_train

    monkeypatch.setattr(sys, "argv", ["gpu_train.py", "--gpu-hours", "--presets", "small", "--crops", "6",
                                      "--total-steps", "1000000", "--utilisation", "0.5", "--gpu", "X=100"])
    gpu_train.main()
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| `small`"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:3] == ["6", "54"]
    train_hours = 1e6 * train_step_flops(PRESETS["small"], 54) / (100e12 * 0.5) / 3600
    only, with_frozen = (float(x) for x in cells[-1].split(" / "))
    assert only == pytest.approx(train_hours, abs=0.05) and with_frozen > only


@pytest.mark.timeout(300)
def test_gpu_train_runs_on_cpu_without_diffusers_ray_faiss(tmp_path: Path) -> None:
    out = tmp_path / "gpu_train.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-c", BLOCKER, str(ROOT / "bench" / "gpu_train.py"), "--device", "cpu",
           "--presets", "tiny", "--precisions", "fp32", "bf16", "--crop", "64", "--crops", "2",
           "--warmup", "1", "--steps", "2", "--budget", "240", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert not data["skipped"] and data["peak_tflops"] > 0
    rows = data["rows"]["train_step"]
    assert set(rows) == {"tiny, fp32, 2 crops", "tiny, bf16, 2 crops"}
    flops = train_step_flops(PRESETS["tiny"], 2)
    for row in rows.values():
        assert row["patches"] == 2 and row["tflop_per_step"] == flops / 1e12
        for key in ("steps_per_s", "samples_per_s", "crops_per_s", "tflops", "mfu", "loss", "grad_norm"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row[key])
        assert row["samples_per_s"] == pytest.approx(2 * row["steps_per_s"])
        assert row["mfu"] == pytest.approx(row["tflops"] / data["peak_tflops"])
        assert row["peak_gb"] is None  # CUDA only
    assert data["parameters"]["tiny"] > 0 and "| tiny, bf16, 2 crops | 2 |" in proc.stdout
