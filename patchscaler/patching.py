"""Latent patchify / merge with overlapping patches (sec. 3.1: y_HR -> {y_0,1 .. y_0,M} -> x_HR).

A latent (C, h, w) is padded (replicate, bottom and right) up to the smallest size an overlapping grid
of V x V patches with stride V - overlap covers exactly, and cut into M = rows * cols patches in
row-major order (``torch.nn.functional.unfold``). Merging is a weighted overlap-add (``fold``) with a
feathered, strictly positive separable window, normalised by the summed window, then cropped: the
overlaps blend linearly from one patch into the next, so independently refined patches show no seams,
and splitting then merging returns the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PatchGrid:
    """Where the M patches of one latent sit: latent (height, width), its padded size, the grid."""

    height: int
    width: int
    padded_height: int
    padded_width: int
    rows: int
    cols: int
    patch: int
    stride: int

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols


def _cover(size: int, patch: int, stride: int) -> tuple[int, int]:
    """(number of patches, padded size) along one axis: the fewest patches that cover ``size``."""
    count = 1 + max(0, math.ceil((size - patch) / stride))
    return count, (count - 1) * stride + patch


def plan_grid(height: int, width: int, *, patch: int = 16, overlap: int = 8) -> PatchGrid:
    """The patch grid of a (height, width) latent: stride = patch - overlap, padded size
    max(patch, ceil((size - patch) / stride) * stride + patch) per axis. A latent smaller than one patch
    (say 3 x 5) gets one padded patch."""
    if height < 1 or width < 1:
        raise ValueError(f"latent size must be positive, got {height}x{width}")
    if patch < 1 or not 0 <= overlap < patch:
        raise ValueError(f"need patch >= 1 and 0 <= overlap < patch, got patch={patch}, overlap={overlap}")
    stride = patch - overlap
    rows, padded_h = _cover(height, patch, stride)
    cols, padded_w = _cover(width, patch, stride)
    return PatchGrid(height, width, padded_h, padded_w, rows, cols, patch, stride)


def _check_latent(x: torch.Tensor, grid: PatchGrid) -> None:
    if x.ndim != 3 or tuple(x.shape[-2:]) != (grid.height, grid.width):
        raise ValueError(f"expected a (C, {grid.height}, {grid.width}) latent, got {tuple(x.shape)}")


def split_patches(x: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """(C, h, w) -> (M, C, V, V), row-major; the border is replicate-padded to the grid's size."""
    _check_latent(x, grid)
    c, p = x.shape[0], grid.patch
    pad_h, pad_w = grid.padded_height - grid.height, grid.padded_width - grid.width
    padded = F.pad(x.unsqueeze(0), (0, pad_w, 0, pad_h), mode="replicate")  # (1, C, H, W)
    cols = F.unfold(padded, kernel_size=p, stride=grid.stride)  # (1, C*V*V, M)
    return cols[0].transpose(0, 1).reshape(grid.num_patches, c, p, p)  # (M, C, V, V)


def feather_window(patch: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None
                   ) -> torch.Tensor:
    """(V, V) separable triangular window min(i + 1, V - i): strictly positive, peaked at the centre.

    With overlap V/2 two neighbours' weights sum to a constant across their overlap (1..V/2 rising
    against V/2..1 falling), so the blend from one patch into the next is linear."""
    i = torch.arange(patch, dtype=dtype, device=device)  # (V,)
    tri = torch.minimum(i + 1, patch - i)  # (V,)
    return tri[:, None] * tri[None, :]  # (V, V)


def merge_patches(patches: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """(M, C, V, V) -> (C, h, w): window-weighted overlap-add normalised by the summed window, cropped."""
    m, c, p = patches.shape[0], patches.shape[1], grid.patch
    if m != grid.num_patches or tuple(patches.shape[-2:]) != (p, p):
        raise ValueError(
            f"expected ({grid.num_patches}, C, {p}, {p}) patches for this grid, got {tuple(patches.shape)}"
        )
    size = (grid.padded_height, grid.padded_width)
    window = feather_window(p, dtype=patches.dtype, device=patches.device)  # (V, V)
    weighted = (patches * window).reshape(m, c * p * p)  # (M, C*V*V)
    num = F.fold(weighted.T.unsqueeze(0), size, kernel_size=p, stride=grid.stride)  # (1, C, H, W)
    weights = window.reshape(1, p * p, 1).expand(1, p * p, m)  # (1, V*V, M)
    den = F.fold(weights, size, kernel_size=p, stride=grid.stride)  # (1, 1, H, W), > 0 everywhere
    merged = num[0] / den[0]  # (C, H, W)
    return merged[:, : grid.height, : grid.width]  # (C, h, w)


def patch_means(x: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """(1, h, w) map -> (M,) its mean over each (padded) patch: Avg(C<y_0>) of Eq. (2)."""
    if x.shape[0] != 1:
        raise ValueError(f"expected a single-channel map (1, h, w), got {tuple(x.shape)}")
    return split_patches(x, grid).mean(dim=(1, 2, 3))  # (M,)
