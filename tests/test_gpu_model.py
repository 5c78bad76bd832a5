"""The GPU benchmark's pieces on CPU: the FLOP counts of ``bench/flops.py`` (against a hand count), the
pure-torch autoencoder stand-in (equal to diffusers' ``AutoencoderKL``: weights, outputs, FLOPs), and
``bench/gpu_model.py`` end to end at the tiny preset with diffusers, Ray, faiss and pyiqa unimportable,
as on the lent GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from patchscaler.config import AutoencoderConfig
from patchscaler.patch_dit import PatchDiT
from patchscaler.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from flops import count_flops, group_counts, patch_steps, stage_flops  # noqa: E402
from vae_standin import AutoencoderStandIn  # noqa: E402


def hand_count_patch_dit_step(preset: str) -> int:
    """FLOPs of one Patch-DiT call on one patch, without the prompt cache, written out layer by layer."""
    cfg = PRESETS[preset]
    d, n_tok, p = cfg.patch_dit.hidden_size, cfg.patch_dit.num_tokens, cfg.patch_dit.patch_size
    s, mlp = cfg.texture_encoder.top_k * n_tok, int(d * cfg.patch_dit.mlp_ratio)
    c = cfg.patch_dit.latent_channels
    embed = 2 * n_tok * (2 * c * p * p) * d + 2 * (256 * d + d * d)  # patch embedding, time MLP
    block = (
        2 * d * 6 * d + 2 * d * d  # adaLN modulation, cross-attention gate
        + 2 * n_tok * d * 3 * d + 2 * 2 * n_tok * n_tok * d + 2 * n_tok * d * d  # self-attention
        + 2 * n_tok * d * d + 2 * s * d * 2 * d + 2 * 2 * n_tok * s * d + 2 * n_tok * d * d  # cross-attn
        + 2 * 2 * n_tok * d * mlp  # MLP
    )
    size = cfg.patch_dit.input_size
    final = 2 * d * 2 * d + 2 * n_tok * d * p * p * c + 2 * size * size * c * c * 9  # + output 3x3 conv
    return embed + cfg.patch_dit.depth * block + final


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_patch_dit_flops_and_the_cache(preset: str) -> None:
    cfg = PRESETS[preset]
    with torch.device("meta"):
        dit = PatchDiT(config=cfg.patch_dit)
        x, t = torch.empty(1, cfg.patch_dit.latent_channels, 16, 16), torch.empty(1)
        tokens = cfg.texture_encoder.top_k * cfg.patch_dit.num_tokens
        prompt = torch.empty(1, tokens, cfg.patch_dit.hidden_size)
    step = count_flops(dit, x, t, x, prompt)
    kv_flops = count_flops(dit.prompt_kv, prompt)
    cached = count_flops(dit, x, t, x, prompt_kv=dit.prompt_kv(prompt))
    assert step == hand_count_patch_dit_step(preset)
    assert cached + kv_flops == step  # the cache moves the K/V work out of the step, nothing else
    if preset == "paper":
        assert round(step / 1e9, 1) == 73.2  # the figure
        assert 0.35 < kv_flops / step < 0.36


def test_group_counts_and_patch_steps() -> None:
    assert group_counts(961, (0.2, 0.3, 0.5)) == [192, 288, 481]
    assert sum(group_counts(9, (1, 1, 1))) == 9 and group_counts(10, (0, 0, 1)) == [0, 0, 10]
    with pytest.raises(ValueError):
        group_counts(5, (0, 0, 0))
    cfg = PRESETS["paper"]
    assert patch_steps(cfg, [192, 288, 481], "adaptive") == 192 * 8 + 288 * 14 + 481 * 20
    assert patch_steps(cfg, [192, 288, 481], "uniform") == 961 * 20


def _random_vae_config(latent_channels: int = 4, blocks: tuple[int, ...] = (32, 64, 64, 64),
                       tile: int = 64) -> AutoencoderConfig:
    """A small AutoencoderKL (the stand-in is that network; the tiny preset's own is AutoencoderDC)."""
    return AutoencoderConfig(kind="kl", block_out_channels=blocks, layers_per_block=1,
                             latent_channels=latent_channels, tile_sample_size=tile)  # tiling from `tile` px


def test_autoencoder_stand_in_is_diffusers_autoencoder_kl() -> None:
    from patchscaler.autoencoder import LatentAutoencoder

    torch.manual_seed(0)
    cfg = _random_vae_config()
    ref = LatentAutoencoder(config=cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    stand_in = AutoencoderStandIn(config=cfg).eval()
    stand_in.load_state_dict(ref.vae.state_dict(), strict=True)  # the same modules, the same names
    for h, w in ((48, 56), (136, 160)):  # one tile; a 3 x 3 grid of blended tiles
        image = torch.rand(1, 3, h, w)
        f = cfg.downsample_factor
        latent = torch.randn(1, cfg.latent_channels, h // f, w // f)
        with torch.no_grad():
            torch.testing.assert_close(stand_in.encode(image), ref.encode(image), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(stand_in.decode(latent), ref.decode(latent), rtol=1e-5, atol=1e-5)
        assert count_flops(stand_in.encode, image) == count_flops(ref.encode, image)
        assert count_flops(stand_in.decode, latent) == count_flops(ref.decode, latent)


def test_stage_flops_with_the_stand_in_equal_the_products() -> None:
    tiny = PRESETS["tiny"]  # with an AutoencoderKL of its latent channels, f = 4
    cfg = replace(tiny, autoencoder=_random_vae_config(tiny.latent_channels, (32, 64, 64), tile=256))
    with torch.device("meta"):
        stand_in = AutoencoderStandIn(config=cfg.autoencoder)
    ours = stage_flops(cfg, (384, 320), autoencoder=stand_in)  # above tile_sample_size 256: tiled
    product = stage_flops(cfg, (384, 320))  # diffusers' AutoencoderKL
    assert ours == product
    assert ours.patches == 11 * 9 and ours.encode > 0 and ours.decode > 0  # 96 x 80 latent, stride 8
    assert ours.dit_step == ours.dit_step_cached + ours.prompt_kv // ours.patches


BLOCKER = """
import importlib.abc, os, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"diffusers", "ray", "faiss", "pyiqa"}:
            raise ImportError(f"{name} is not on the GPU machine")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python bench/gpu_model.py` does
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.timeout(600)
def test_gpu_model_runs_on_cpu_without_diffusers_ray_faiss(tmp_path: Path) -> None:
    out = tmp_path / "gpu_model.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    probe = tmp_path / "probe.py"
    probe.write_text("import patchscaler.autoencoder\n")  # imports diffusers: the blocker must stop it
    blocked = subprocess.run([sys.executable, "-c", BLOCKER, str(probe)], env=env, capture_output=True,
                             text=True)
    assert blocked.returncode != 0 and "not on the GPU machine" in blocked.stderr
    cmd = [sys.executable, "-c", BLOCKER, str(ROOT / "bench" / "gpu_model.py"), "--device", "cpu",
           "--preset", "tiny", "--out-size", "256", "256", "--quick", "--budget", "300", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=550)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "goals:" in proc.stdout
    data = json.loads(out.read_text())
    assert data["preset"] == "tiny" and not data["skipped"]
    assert data["group_counts"] == [10, 15, 24]  # 7 x 7 patches
    (head, e2e), = data["rows"]["end_to_end"].items()
    assert head == "fp32, adaptive, cache"
    for stage in ("encode", "grm", "retrieve", "refine", "decode"):
        assert e2e["stages"][stage]["seconds"] > 0 and e2e["stages"][stage]["tflop"] > 0
    assert e2e["floor_seconds"] > 0 and e2e["wall_seconds"] >= sum(
        s["seconds"] for s in e2e["stages"].values()) * 0.99
    refine = data["rows"]["refine"]
    assert set(refine) == {"fp32, uniform, cache", "fp32, adaptive, no cache", "fp32, adaptive, cache, fused",
                           "bf16, adaptive, cache"}
    assert refine["fp32, adaptive, no cache"]["tflop"] > e2e["stages"]["refine"]["tflop"]
    assert refine["fp32, adaptive, no cache"]["x0_rel_diff_vs_headline"] < 1e-5  # the cache changes nothing
    assert refine["fp32, adaptive, cache, fused"]["x0_rel_diff_vs_headline"] < 1e-4
    assert 0 < refine["bf16, adaptive, cache"]["x0_rel_diff_vs_headline"] < 0.05
    assert {r.split(",")[0] for r in data["rows"]["dit_step"]} == {"fp32", "bf16"}
