"""Exact farthest point sampling (FPS) in torch, on any device, for 100k+ candidates.

The RTM keeps ``k`` of the ``N`` candidate crops so that the texture space is covered evenly (appendix
B.2). FPS is greedy: each pick is the candidate whose distance to the nearest already-picked one is the
largest. The implementation is the exact algorithm, not an approximation:

- memory: the points (N, D) on the device, their squared norms (N,) and one running vector (N,) of each
  point's squared distance to the nearest pick. Each step computes the distances of all points to the
  newest pick only, in row chunks of ``chunk_size`` (temporaries O(chunk_size)), so there is never an
  N×N (or N×k) matrix: 100k × 512 keys take 200 MB plus 0.8 MB of vectors;
- metric: squared euclidean distance, ``|x|² - 2 x·c + |c|²`` clamped at 0. On L2-normalised keys this is
  ``2 - 2 cos``, twice the cosine distance, so the picks are those of cosine-distance FPS (the RTM's
  retrieval metric);
- start: by default the point farthest from the centroid of all points (an extreme texture, no random
  choice); ``start=i`` starts at index ``i`` instead;
- ties: ``argmax`` returns the lowest index among equal maxima, so the result is deterministic for given
  input, device and dtype. Picked points are excluded explicitly (their running distance is set to -1),
  so duplicates in the input never make a point picked twice.

The loop never synchronises with the host (the next index stays a device tensor), so on a GPU the
``k`` steps queue back to back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FPSResult:
    indices: torch.Tensor  # (k,) int64, in pick order, on the CPU
    radii: torch.Tensor  # (k,) float: squared distance of each pick to the earlier picks (inf for the first)
    start: int

    @property
    def covering_radius(self) -> float:
        """Squared distance of the last pick to the others: a lower bound on the min pairwise squared
        distance within the picks (they are equal for FPS)."""
        return float(self.radii[-1])


def _sq_dist_to(points: torch.Tensor, sq_norms: torch.Tensor, center: torch.Tensor, start: int,
                stop: int) -> torch.Tensor:
    """Squared distances of ``points[start:stop]`` to ``center`` (D,)."""
    d = torch.addmv(sq_norms[start:stop], points[start:stop], center, alpha=-2.0)  # (n,) |x|² - 2 x·c
    return d.add_(center @ center).clamp_min_(0.0)


def farthest_point_sampling(
    points: torch.Tensor,
    k: int,
    *,
    start: int | None = None,
    device: str | torch.device | None = None,
    chunk_size: int = 65536,
    dtype: torch.dtype = torch.float32,
) -> FPSResult:
    """Pick ``k`` of the ``N`` rows of ``points`` (N, D) by exact farthest point sampling.

    ``device``: where to run (default: where ``points`` are). ``start``: the first index (default: the
    point farthest from the centroid). Returns indices in pick order and each pick's squared distance to
    the earlier picks (non-increasing after the first, which is ``inf``)."""
    if points.ndim != 2:
        raise ValueError(f"points must be (N, D), got {tuple(points.shape)}")
    n = points.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} points")
    if chunk_size < 1:
        raise ValueError("chunk_size must be positive")
    device = torch.device(device) if device is not None else points.device
    pts = points.to(device=device, dtype=dtype).contiguous()  # (N, D)
    bounds = [(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]
    sq_norms = torch.cat([(pts[a:b] ** 2).sum(dim=1) for a, b in bounds])  # (N,)

    if start is None:
        centroid = pts.mean(dim=0)  # (D,)
        from_mean = torch.cat([_sq_dist_to(pts, sq_norms, centroid, a, b) for a, b in bounds])  # (N,)
        first = torch.argmax(from_mean)
    else:
        if not 0 <= start < n:
            raise ValueError(f"start index {start} out of range for {n} points")
        first = torch.tensor(start, device=device)

    indices = torch.empty(k, dtype=torch.int64, device=device)
    radii = torch.empty(k, dtype=dtype, device=device)
    min_d = torch.full((n,), float("inf"), dtype=dtype, device=device)  # (N,) to the nearest pick
    current = first.reshape(())
    radii[0] = float("inf")
    for step in range(k):
        indices[step] = current
        if step > 0:
            radii[step] = min_d[current]
        center = pts[current]  # (D,)
        for a, b in bounds:
            torch.minimum(min_d[a:b], _sq_dist_to(pts, sq_norms, center, a, b), out=min_d[a:b])
        min_d[current] = -1.0  # never again, whatever the rounding of its self-distance
        if step + 1 < k:
            current = torch.argmax(min_d)
    return FPSResult(indices=indices.cpu(), radii=radii.float().cpu(), start=int(first))
