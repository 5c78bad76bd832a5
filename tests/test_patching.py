"""Patch grid, split / merge round trips and seam-free merging."""

from __future__ import annotations

import math

import pytest
import torch

from patchscaler.patching import (
    PatchGrid,
    feather_window,
    merge_patches,
    patch_means,
    plan_grid,
    split_patches,
)

SIZES = [(16, 16), (20, 12), (3, 5), (33, 47), (24, 24), (8, 40)]


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_grid_covers_the_latent_with_the_fewest_patches(h: int, w: int) -> None:
    grid = plan_grid(h, w, patch=16, overlap=8)
    assert (grid.height, grid.width, grid.patch, grid.stride) == (h, w, 16, 8)
    for size, padded, count in [(h, grid.padded_height, grid.rows), (w, grid.padded_width, grid.cols)]:
        assert padded >= size and padded >= 16
        assert padded == (count - 1) * 8 + 16  # the patches tile the padded size exactly
        assert count == 1 + max(0, math.ceil((size - 16) / 8))
        if count > 1:
            assert (count - 2) * 8 + 16 < size  # one patch fewer would not cover it
    assert grid.num_patches == grid.rows * grid.cols


def test_grid_examples_and_validation() -> None:
    assert plan_grid(16, 16) == PatchGrid(16, 16, 16, 16, 1, 1, 16, 8)
    assert plan_grid(20, 12) == PatchGrid(20, 12, 24, 16, 2, 1, 16, 8)
    assert plan_grid(3, 5) == PatchGrid(3, 5, 16, 16, 1, 1, 16, 8)
    assert plan_grid(33, 47).num_patches == 4 * 5  # 33 -> 40 padded, 47 -> 48
    assert plan_grid(32, 32, patch=16, overlap=0).num_patches == 4
    for kwargs in [{"patch": 16, "overlap": 16}, {"patch": 16, "overlap": -1}]:
        with pytest.raises(ValueError):
            plan_grid(20, 20, **kwargs)
    with pytest.raises(ValueError):
        plan_grid(0, 20)


@pytest.mark.parametrize(("h", "w"), SIZES)
def test_split_then_merge_returns_the_input(h: int, w: int) -> None:
    grid = plan_grid(h, w)
    x = torch.randn(4, h, w, generator=torch.Generator().manual_seed(h * 100 + w))
    patches = split_patches(x, grid)
    assert patches.shape == (grid.num_patches, 4, 16, 16)
    assert torch.allclose(merge_patches(patches, grid), x, atol=1e-6)
    const = torch.full((4, h, w), 0.3712)
    merged = merge_patches(split_patches(const, grid), grid)
    assert merged.shape == (4, h, w)
    assert torch.allclose(merged, const, atol=1e-6)


def test_split_is_row_major_and_replicate_padded() -> None:
    h, w = 20, 30
    grid = plan_grid(h, w)  # 2 rows x 3 cols, padded 24 x 32
    x = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
    patches = split_patches(x, grid)
    for r in range(grid.rows):
        for c in range(grid.cols):
            top, left = r * grid.stride, c * grid.stride
            window = patches[r * grid.cols + c, 0]  # (16, 16)
            rows = torch.arange(top, top + 16).clamp(max=h - 1)  # replicate: the last row repeats
            cols = torch.arange(left, left + 16).clamp(max=w - 1)
            assert torch.equal(window, x[0][rows[:, None], cols[None, :]])


def test_tiny_latent_is_one_padded_patch() -> None:
    grid = plan_grid(3, 5)
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))
    patch = split_patches(x, grid)[0]  # (4, 16, 16)
    assert torch.equal(patch[:, :3, :5], x)
    assert torch.equal(patch[:, 10, 12], x[:, 2, 4])  # bottom-right corner replicated
    assert torch.allclose(merge_patches(split_patches(x, grid), grid), x, atol=1e-6)


def test_merge_is_consistent_with_a_shared_smooth_perturbation() -> None:
    """Patches each perturbed by the same smooth field (cut from one canvas) merge into base + field."""
    h, w = 33, 47
    grid = plan_grid(h, w)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, h, w, generator=g)
    ys = torch.linspace(0, 3, h)[:, None]
    xs = torch.linspace(0, 5, w)[None, :]
    field = torch.stack([torch.sin(ys + k) * torch.cos(xs - k) for k in range(4)])  # (4, h, w)
    merged = merge_patches(split_patches(base, grid) + split_patches(field, grid), grid)
    assert torch.allclose(merged, base + field, atol=1e-5)


def test_independent_patches_blend_without_seams() -> None:
    """Each patch set to its own constant: the feathered merge changes by at most range/8 between
    neighbouring pixels, where butting the patches edge to edge would jump by the whole range."""
    grid = plan_grid(40, 40)  # 4 x 4 patches
    g = torch.Generator().manual_seed(2)
    levels = torch.rand(grid.num_patches, generator=g)
    patches = levels.view(-1, 1, 1, 1).expand(-1, 1, 16, 16).clone()  # (M, 1, 16, 16)
    merged = merge_patches(patches, grid)[0]  # (40, 40)
    spread = float(levels.max() - levels.min())
    down = (merged[1:] - merged[:-1]).abs()  # (39, 40)
    right = (merged[:, 1:] - merged[:, :-1]).abs()  # (40, 39)
    steps = torch.cat([down.flatten(), right.flatten()])
    assert float(steps.max()) <= spread / 8 + 1e-6
    assert float(merged.min()) >= float(levels.min()) - 1e-6  # a convex blend of the patches
    assert float(merged.max()) <= float(levels.max()) + 1e-6


def test_feather_window_is_positive_and_peaked() -> None:
    win = feather_window(16)
    assert win.shape == (16, 16) and bool((win > 0).all())
    assert win[0, 0].item() == 1.0 and win[7, 7].item() == 64.0 and win[8, 8].item() == 64.0
    assert torch.equal(win, win.T) and torch.equal(win, win.flip(0))
    tri = win[0]
    assert torch.equal(tri[8:] + tri[:8], torch.full((8,), 9.0))  # overlapping halves sum to a constant


def test_patch_means() -> None:
    grid = plan_grid(24, 24)  # 2 x 2 patches
    conf = torch.zeros(1, 24, 24)
    conf[:, :12, :12] = 1.0
    means = patch_means(conf, grid)
    assert means.shape == (4,)
    expected = torch.stack([split_patches(conf, grid)[i].mean() for i in range(4)])
    assert torch.allclose(means, expected)
    assert means[0].item() == pytest.approx(144 / 256)  # top-left patch: 12 x 12 ones
    assert means[3].item() == pytest.approx(16 / 256)  # bottom-right: rows/cols 8..11 only
    small = plan_grid(3, 5)
    assert patch_means(torch.full((1, 3, 5), 0.8), small).item() == pytest.approx(0.8)
    with pytest.raises(ValueError):
        patch_means(torch.zeros(2, 24, 24), grid)


def test_shape_errors() -> None:
    grid = plan_grid(20, 12)
    with pytest.raises(ValueError):
        split_patches(torch.zeros(4, 12, 20), grid)
    with pytest.raises(ValueError):
        merge_patches(torch.zeros(grid.num_patches + 1, 4, 16, 16), grid)
