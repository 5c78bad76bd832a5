import torch

from patchscaler.model import PatchScalerModel
from patchscaler.rtm import ReferenceTextureMemory
from patchscaler.upscaler import PatchScaler, group_map


def _upscale(model: PatchScalerModel, rtm: ReferenceTextureMemory, image: torch.Tensor, seed: int):
    return PatchScaler(model=model, rtm=rtm).upscale(image, generator=torch.Generator().manual_seed(seed))


def test_end_to_end_40x24_is_x4_and_reproducible(tiny_model, tiny_rtm) -> None:
    image = torch.rand(3, 24, 40, generator=torch.Generator().manual_seed(0))
    first = _upscale(tiny_model, tiny_rtm, image, seed=7)
    second = _upscale(tiny_model, tiny_rtm, image, seed=7)
    assert first.image.shape == (3, 96, 160)
    assert torch.isfinite(first.image).all()
    assert torch.equal(first.image, second.image)  # bit-identical for the same generator seed
    # tiny's f = 4: latent 40x24 (HR / 4) -> padded to 40x24 -> a 4 x 2 grid of 16x16 patches, stride 8
    assert tiny_model.autoencoder.factor == 4
    assert first.confidence.shape == (1, 24, 40)
    assert (first.grid.rows, first.grid.cols) == (2, 4)
    assert sum(first.group_counts.values()) == first.grid.num_patches == len(first.groups)
    assert first.group_map.shape == (24, 40)
    other_seed = _upscale(tiny_model, tiny_rtm, image, seed=8)
    assert not torch.equal(first.image, other_seed.image)


def test_odd_sizes_and_tiny_images(tiny_model, tiny_rtm) -> None:
    for h, w in [(7, 5), (33, 18), (1, 1)]:
        image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(h))
        result = _upscale(tiny_model, tiny_rtm, image, seed=0)
        assert result.image.shape == (3, 4 * h, 4 * w)


def _with_sampler(source: PatchScalerModel, *, mode: str, conf_bias: float) -> PatchScalerModel:
    """A copy of ``source`` with the sampler ``mode`` and a confidence head whose weights are zero and
    bias ``conf_bias``: C = exp(-softplus(bias)) everywhere (-20 -> C ~ 1: every patch is simple)."""
    from dataclasses import replace

    model = PatchScalerModel(config=source.config)
    model.load_state_dict(source.state_dict())
    model.config = model.config.replace(sampler=replace(model.config.sampler, mode=mode))
    with torch.no_grad():
        model.grm.head_conf.weight.zero_()
        model.grm.head_conf.bias.fill_(conf_bias)
    return model.eval()


def test_uniform_mode_puts_every_patch_on_the_hard_schedule(tiny_model, tiny_rtm) -> None:
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    adaptive = _upscale(_with_sampler(tiny_model, mode="adaptive", conf_bias=-20.0), tiny_rtm, image, seed=0)
    uniform = _upscale(_with_sampler(tiny_model, mode="uniform", conf_bias=-20.0), tiny_rtm, image, seed=0)
    n = adaptive.grid.num_patches
    assert adaptive.group_counts == {"simple": n, "medium": 0, "hard": 0}  # C ~ 1: all simple
    assert uniform.group_counts == adaptive.group_counts  # groups are PGS's; only the schedule differs
    assert uniform.image.shape == adaptive.image.shape
    assert not torch.equal(uniform.image, adaptive.image)
    # uniform runs every patch on the hard schedule (tau=1000, N=20): it equals adaptive sampling of a
    # model whose confidence (C ~ 0) makes every patch hard; y_HR, patches and noise are unchanged
    hard = _upscale(_with_sampler(tiny_model, mode="adaptive", conf_bias=20.0), tiny_rtm, image, seed=0)
    assert hard.group_counts["hard"] == n
    assert torch.equal(hard.image, uniform.image)


def test_group_map_paints_nearest_patch() -> None:
    from patchscaler.patching import plan_grid

    grid = plan_grid(24, 24, patch=16, overlap=8)  # 2 x 2 patches
    groups = torch.tensor([0, 1, 2, 0])
    gmap = group_map(groups, grid)
    assert gmap.shape == (24, 24)
    assert gmap[0, 0] == 0 and gmap[0, 23] == 1 and gmap[23, 0] == 2 and gmap[23, 23] == 0


def test_overlapping_patches_start_from_the_same_noise(tiny_model) -> None:
    """Eq. 7's noise is drawn once per latent and cut like y_HR: where two patches overlap, their noise
    is the same numbers (so the merge blends near-identical samples), and the draw depends on the seed."""
    from patchscaler.patching import merge_patches
    from patchscaler.upscaler import plan_patches

    y_hr, conf = torch.randn(4, 30, 21), torch.rand(1, 30, 21)
    plan = plan_patches(y_hr, conf, tiny_model, torch.Generator().manual_seed(3))
    grid = plan.grid
    assert grid.rows * grid.cols == len(plan.noise) > 4
    s = grid.stride
    for r in range(grid.rows):
        for c in range(grid.cols - 1):  # right half of a patch == left half of its right neighbour
            left, right = plan.noise[r * grid.cols + c], plan.noise[r * grid.cols + c + 1]
            assert torch.equal(left[..., s:], right[..., :-s])
    for r in range(grid.rows - 1):
        top, below = plan.noise[r * grid.cols], plan.noise[(r + 1) * grid.cols]
        assert torch.equal(top[:, s:], below[:, :-s])
    # merging the cut noise gives back the one draw over the latent (no averaging of different draws)
    field = merge_patches(plan.noise, grid)
    drawn = torch.randn(y_hr.shape, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(field, drawn, atol=1e-6)
    again = plan_patches(y_hr, conf, tiny_model, torch.Generator().manual_seed(3))
    assert torch.equal(again.noise, plan.noise)
    other = plan_patches(y_hr, conf, tiny_model, torch.Generator().manual_seed(4))
    assert not torch.equal(other.noise, plan.noise)


def test_progress_reports_patch_steps_and_changes_nothing(tiny_model, tiny_rtm) -> None:
    from patchscaler.pgs import count_patch_steps, group_plan

    image = torch.rand(3, 40, 24, generator=torch.Generator().manual_seed(5))
    calls: list[tuple[int, int]] = []
    with_progress = PatchScaler(model=tiny_model, rtm=tiny_rtm).upscale(
        image, generator=torch.Generator().manual_seed(2), progress=lambda d, t: calls.append((d, t)))
    plain = _upscale(tiny_model, tiny_rtm, image, seed=2)
    assert torch.equal(with_progress.image, plain.image)
    total = count_patch_steps(plain.groups, group_plan(tiny_model.config.sampler))
    assert total == sum(n * s for n, s in zip(plain.group_counts.values(), tiny_model.config.sampler.steps,
                                              strict=True))
    assert calls[0] == (0, total) and calls[-1] == (total, total) and {t for _, t in calls} == {total}
    done = [d for d, _ in calls]
    assert done == sorted(done) and len(done) > 2  # one report per Patch-DiT call
