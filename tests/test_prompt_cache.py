"""The prompt K/V cache: Patch-DiT's cross-attention keys and values computed once per patch give the
same result as recomputing them at every step, in Patch-DiT, ``refine``, ``fused_refine`` and the
reference upscaler end to end; parameters and checkpoint keys are unchanged."""

from __future__ import annotations

import pytest
import torch
from test_models import PRESET_NAMES, dit_inputs, randomize_zero_params

from jobs.defaults import DEMO_WEIGHTS
from patchscaler.diffusion import NoiseSchedule
from patchscaler.patch_dit import PatchDiT
from patchscaler.presets import PRESETS
from patchscaler.texture import TextureEncoder
from patchscaler.upscaler import PatchScaler, finish, plan_patches, refine, restore, retrieve
from pipeline.stages import fused_refine


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_patch_dit_with_prompt_kv_equals_with_prompt(preset: str) -> None:
    cfg = PRESETS[preset]
    torch.manual_seed(0)
    dit = randomize_zero_params(PatchDiT(config=cfg.patch_dit)).eval()
    enc = randomize_zero_params(TextureEncoder(dit=cfg.patch_dit, config=cfg.texture_encoder)).eval()
    inp = dit_inputs(cfg, b=3)
    with torch.no_grad():
        prompt = enc(inp["values"], inp["scores"])  # (3, K*L, hidden)
        kv = dit.prompt_kv(prompt)
        eps = dit(inp["x_t"], inp["t"], inp["y0"], prompt)
        cached = dit(inp["x_t"], inp["t"], inp["y0"], prompt_kv=kv)
        # the same K/V serve every time step: only x_t and t change between steps
        t2 = inp["t"].flip(0)
        eps_t2 = dit(inp["x_t"] * 0.5, t2, inp["y0"], prompt)
        cached_t2 = dit(inp["x_t"] * 0.5, t2, inp["y0"], prompt_kv=kv)
        # rows of the cache select patches
        rows = torch.tensor([2, 0])
        kv_rows = [(k[rows], v[rows]) for k, v in kv]
        sub = dit(inp["x_t"][rows], inp["t"][rows], inp["y0"][rows], prompt_kv=kv_rows)
    heads, hd = cfg.patch_dit.num_heads, cfg.patch_dit.hidden_size // cfg.patch_dit.num_heads
    assert len(kv) == cfg.patch_dit.depth
    assert all(k.shape == v.shape == (3, heads, prompt.shape[1], hd) for k, v in kv)
    assert eps.abs().sum() > 0 and not torch.allclose(eps, eps_t2)
    torch.testing.assert_close(cached, eps, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(cached_t2, eps_t2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sub, eps[rows], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        dit(inp["x_t"], inp["t"], inp["y0"], prompt, prompt_kv=kv)
    with pytest.raises(ValueError, match="exactly one"):
        dit(inp["x_t"], inp["t"], inp["y0"])
    with pytest.raises(ValueError, match="entries"):
        dit(inp["x_t"], inp["t"], inp["y0"], prompt_kv=kv[:-1])


def test_parameters_and_checkpoint_keys_are_unchanged() -> None:
    """The cache adds no parameter or buffer: the bundled demo checkpoint's Patch-DiT keys are exactly
    the module's (loading it strictly is tested in test_demo_weights.py)."""
    from safetensors import safe_open

    with safe_open(str(DEMO_WEIGHTS / "model.safetensors"), framework="pt") as f:
        saved = {k[len("patch_dit."):] for k in f.keys() if k.startswith("patch_dit.")}
    dit = PatchDiT(config=PRESETS["tiny"].patch_dit)
    assert set(dit.state_dict()) == saved
    block = dict(dit.blocks[0].cross_attn.named_parameters())
    assert sorted(block) == ["kv.bias", "kv.weight", "proj.bias", "proj.weight", "q.bias", "q.weight"]


def _patches(model, rtm, m: int = 9, seed: int = 3):
    g, c = torch.Generator().manual_seed(seed), model.config.latent_channels
    y0 = torch.randn(m, c, 16, 16, generator=g)
    noise = torch.randn(m, c, 16, 16, generator=g)
    groups = torch.tensor([0, 1, 2, 2, 1, 0, 1, 2, 0][:m])
    with torch.no_grad():
        scores, idx = rtm.search(model.classifier.features(y0), model.config.texture_encoder.top_k)
    return y0, groups, noise, rtm.gather(idx), scores


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("sampler", [refine, fused_refine], ids=["refine", "fused_refine"])
def test_samplers_with_and_without_the_cache_agree(tiny_model, tiny_rtm, sampler, precision: str) -> None:
    y0, groups, noise, values, scores = _patches(tiny_model, tiny_rtm)
    schedule = NoiseSchedule(config=tiny_model.config.sampler)
    kw = {"schedule": schedule, "batch_size": 4, "precision": precision}
    cached = sampler(tiny_model, y0, groups, noise, values, scores, prompt_cache=True, **kw)
    uncached = sampler(tiny_model, y0, groups, noise, values, scores, prompt_cache=False, **kw)
    assert cached.dtype == torch.float32 and cached.shape == y0.shape
    assert not torch.allclose(cached, y0, atol=1e-2)  # it did sample
    torch.testing.assert_close(cached, uncached, rtol=1e-5, atol=1e-5)


def test_fused_refine_batches_that_mix_groups(tiny_model, tiny_rtm) -> None:
    """Batches of 3 over 9 patches sorted by join time: some batches hold two groups (patches join
    mid-batch) and the result still equals per-group sampling."""
    y0, groups, noise, values, scores = _patches(tiny_model, tiny_rtm)
    schedule = NoiseSchedule(config=tiny_model.config.sampler)
    per_group = refine(tiny_model, y0, groups, noise, values, scores, schedule=schedule, batch_size=2)
    fused = fused_refine(tiny_model, y0, groups, noise, values, scores, schedule=schedule, batch_size=4)
    torch.testing.assert_close(fused, per_group, rtol=1e-4, atol=1e-4)


def test_reference_upscaler_end_to_end_cached_equals_uncached(tiny_model, tiny_rtm) -> None:
    image = torch.rand(3, 40, 36, generator=torch.Generator().manual_seed(4))
    seed = 11
    result = PatchScaler(model=tiny_model, rtm=tiny_rtm, color_fix="none").upscale(
        image, generator=torch.Generator().manual_seed(seed))  # the cache is on by default
    # the same stage functions by hand, with the cache off
    y_hr, conf = restore(tiny_model, image)
    plan = plan_patches(y_hr, conf, tiny_model, torch.Generator().manual_seed(seed))
    scores, idx = retrieve(tiny_model, tiny_rtm, plan.patches)
    x0 = refine(tiny_model, plan.patches, plan.groups, plan.noise, tiny_rtm.gather(idx), scores,
                schedule=NoiseSchedule(config=tiny_model.config.sampler), prompt_cache=False)
    uncached = finish(tiny_model, x0, plan.grid, (40, 36))
    assert plan.grid.num_patches > 1
    torch.testing.assert_close(result.image, uncached, rtol=0, atol=1e-5)
