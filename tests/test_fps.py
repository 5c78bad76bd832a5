"""Exact farthest point sampling (rtm_builder.fps): coverage, dispersion, exactness, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rtm_builder.fps import farthest_point_sampling


def sq_dists(points: torch.Tensor) -> torch.Tensor:
    return torch.cdist(points.double(), points.double()) ** 2  # (N, N)


def reference_fps(points: torch.Tensor, k: int, start: int) -> list[int]:
    """Textbook FPS on the full N×N distance matrix (float64)."""
    d = sq_dists(points)
    picks = [start]
    min_d = d[start].clone()
    for _ in range(k - 1):
        min_d[picks] = -1.0
        nxt = int(torch.argmax(min_d))
        picks.append(nxt)
        min_d = torch.minimum(min_d, d[nxt])
    return picks


def min_pairwise(points: torch.Tensor, idx: torch.Tensor) -> float:
    d = sq_dists(points[idx])
    d.fill_diagonal_(float("inf"))
    return float(d.min())


def planted_clusters(k: int, per: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(k, dim, generator=g), dim=1) * 10.0  # (k, dim), far apart
    labels = torch.arange(k).repeat_interleave(per)  # (k*per,)
    points = centers[labels] + 0.05 * torch.randn(k * per, dim, generator=g)  # (k*per, dim)
    perm = torch.randperm(k * per, generator=g)
    return points[perm], labels[perm]


@pytest.mark.parametrize("start", [None, 0, 17])
def test_first_k_picks_cover_k_planted_clusters(start: int | None) -> None:
    points, labels = planted_clusters(k=9, per=40, dim=12, seed=3)
    result = farthest_point_sampling(points, 9, start=start)
    assert sorted(labels[result.indices].tolist()) == list(range(9))


def test_fps_subset_is_more_spread_than_random_subsets() -> None:
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(600, 16, generator=g), dim=1)
    k = 40
    fps = farthest_point_sampling(keys, k)
    fps_min = min_pairwise(keys, fps.indices)
    random_mins = [min_pairwise(keys, torch.randperm(600, generator=g)[:k]) for _ in range(30)]
    assert fps_min >= max(random_mins)
    # For FPS the minimum pairwise distance of the subset is the last pick's radius.
    assert fps_min == pytest.approx(fps.covering_radius, rel=1e-4)


def test_matches_reference_for_any_chunk_size() -> None:
    g = torch.Generator().manual_seed(1)
    keys = F.normalize(torch.randn(300, 8, generator=g), dim=1)
    expected = reference_fps(keys, 50, start=5)
    for chunk in (7, 64, 300, 100_000):
        got = farthest_point_sampling(keys, 50, start=5, chunk_size=chunk, dtype=torch.float64)
        assert got.indices.tolist() == expected


def test_default_start_is_farthest_from_centroid() -> None:
    g = torch.Generator().manual_seed(2)
    points = torch.randn(200, 6, generator=g)
    result = farthest_point_sampling(points, 5, dtype=torch.float64)
    far = int(torch.argmax(((points.double() - points.double().mean(0)) ** 2).sum(1)))
    assert result.start == far == int(result.indices[0])
    assert result.indices.tolist() == reference_fps(points, 5, start=far)


def test_radii_are_distances_to_earlier_picks_and_cover_everything() -> None:
    g = torch.Generator().manual_seed(4)
    keys = F.normalize(torch.randn(400, 10, generator=g), dim=1)
    r = farthest_point_sampling(keys, 25, dtype=torch.float64)
    d = sq_dists(keys)
    idx = r.indices
    assert torch.isinf(r.radii[0])
    for j in range(1, 25):
        assert float(r.radii[j]) == pytest.approx(float(d[idx[j], idx[:j]].min()), abs=1e-6)
    assert bool((r.radii[2:] <= r.radii[1:-1] + 1e-7).all())  # non-increasing
    # Every point lies within the last radius of the picks (the covering property of FPS).
    assert float(d[:, idx].min(dim=1).values.max()) <= float(r.radii[-1]) + 1e-6
    # Cosine distance: on unit keys the squared distance is 2 - 2 cos.
    cos = float(keys[idx[0]] @ keys[idx[1]])
    assert float(r.radii[1]) == pytest.approx(2 - 2 * cos, abs=1e-5)


def test_duplicates_are_never_picked_twice() -> None:
    g = torch.Generator().manual_seed(5)
    distinct = F.normalize(torch.randn(10, 4, generator=g), dim=1)
    points = distinct.repeat(5, 1)  # (50, 4): every point five times
    r = farthest_point_sampling(points, 30)
    assert len(set(r.indices.tolist())) == 30
    assert sorted({i % 10 for i in r.indices[:10].tolist()}) == list(range(10))
    assert float(r.radii[10:].max()) < 1e-6  # zero up to float32 rounding


def test_many_candidates_with_small_chunks() -> None:
    g = torch.Generator().manual_seed(6)
    keys = F.normalize(torch.randn(120_000, 8, generator=g), dim=1)
    a = farthest_point_sampling(keys, 12, chunk_size=10_000)
    b = farthest_point_sampling(keys, 12)
    assert a.indices.tolist() == b.indices.tolist()
    assert len(set(a.indices.tolist())) == 12


def test_rejects_bad_arguments() -> None:
    keys = torch.randn(5, 3)
    with pytest.raises(ValueError, match="cannot pick"):
        farthest_point_sampling(keys, 6)
    with pytest.raises(ValueError, match="cannot pick"):
        farthest_point_sampling(keys, 0)
    with pytest.raises(ValueError, match="start index"):
        farthest_point_sampling(keys, 2, start=5)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        farthest_point_sampling(torch.randn(5), 2)
    assert np.array_equal(farthest_point_sampling(keys, 5).indices.sort().values.numpy(), np.arange(5))
