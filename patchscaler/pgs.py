"""Patch-adaptive Group Sampling (PGS, sec. 3.2).

1. Eq. (2): each patch's mean confidence Avg(C<y_0>) puts it in a group: simple, medium or hard.
2. Eq. (6)/(7): a group with intermediate time step tau starts its reverse process from
   y_tau = sqrt(abar_tau) y_0 + sqrt(1 - abar_tau) eps (Eq. 7), which approximates the true x_tau
   (Eq. 6) the better the coarser error of y_0 is small (simple patches) or tau large (hard ones).
3. It then takes N deterministic DDIM steps tau -> ... -> 0 with the denoiser, N model calls.

The denoiser is a caller-supplied callable over a batch of patch indices, so this module never sees the
model, the texture prompts or the device; results do not depend on how patches are batched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from patchscaler.config import SamplerConfig
from patchscaler.diffusion import NoiseSchedule

GROUP_NAMES: tuple[str, str, str] = ("simple", "medium", "hard")

# denoise(x_t (b, C, V, V), t (b,) float, idx (b,) long patch indices) -> the network's output (b, C, V, V):
# the predicted noise, v or x0, by the schedule's ``prediction_type``
Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def assign_groups(mean_conf: torch.Tensor, gamma1: float, gamma2: float) -> torch.Tensor:
    """Eq. (2): (M,) mean confidences -> (M,) long groups, 0 simple, 1 medium, 2 hard.

        simple  when Avg(C) in (gamma1, 1]
        medium  when Avg(C) in (gamma2, gamma1]
        hard    when Avg(C) in [0, gamma2]

    The intervals are half-open on the left, so a mean exactly at a threshold falls into the harder
    group. Confidences come from the GRM in (0, 1]; values outside [0, 1] (or NaN) are not rejected:
    above 1 counts as simple, below 0 and NaN as hard."""
    if mean_conf.ndim != 1:
        raise ValueError(f"expected (M,) mean confidences, got {tuple(mean_conf.shape)}")
    if not 0.0 <= gamma2 <= gamma1 <= 1.0:
        raise ValueError(f"need 0 <= gamma2 <= gamma1 <= 1, got gamma1={gamma1}, gamma2={gamma2}")
    groups = torch.full(mean_conf.shape, 2, dtype=torch.long, device=mean_conf.device)  # (M,) hard
    groups[mean_conf > gamma2] = 1  # medium: (gamma2, gamma1]
    groups[mean_conf > gamma1] = 0  # simple: (gamma1, 1]
    return groups


@dataclass(frozen=True)
class GroupSchedule:
    """One group's sampling configuration: start at ``tau`` (Eq. 7), take ``steps`` DDIM steps."""

    name: str
    tau: int
    steps: int


def group_plan(config: SamplerConfig) -> list[GroupSchedule]:
    """The (tau, N) of each group, in ``GROUP_NAMES`` order.

    ``adaptive`` (PGS) gives group g ``(taus[g], steps[g])``; ``uniform`` (the paper's unified-sampling
    ablation, Table 4) gives every group the hard group's ``(taus[-1], steps[-1])``."""
    if len(config.taus) != len(GROUP_NAMES) or len(config.steps) != len(GROUP_NAMES):
        raise ValueError(f"taus and steps need one entry per group {GROUP_NAMES}")
    if config.mode == "adaptive":
        pairs = list(zip(config.taus, config.steps, strict=True))
    elif config.mode == "uniform":
        pairs = [(config.taus[-1], config.steps[-1])] * len(GROUP_NAMES)
    else:
        raise ValueError(f"unknown sampling mode {config.mode!r}; choose 'adaptive' or 'uniform'")
    for tau, n in pairs:
        if not 1 <= n <= tau <= config.num_train_timesteps:
            raise ValueError(f"need 1 <= steps <= tau <= {config.num_train_timesteps}, got tau={tau}, N={n}")
    return [GroupSchedule(name, int(tau), int(n)) for name, (tau, n) in zip(GROUP_NAMES, pairs, strict=True)]


def _check_groups(groups: torch.Tensor, plan: list[GroupSchedule], m: int) -> None:
    if groups.shape != (m,):
        raise ValueError(f"expected ({m},) groups, got {tuple(groups.shape)}")
    if m and not (0 <= int(groups.min()) and int(groups.max()) < len(plan)):
        raise ValueError(f"groups must lie in 0..{len(plan) - 1}")


def count_patch_steps(groups: torch.Tensor, plan: list[GroupSchedule]) -> int:
    """Patch-DiT work of one sampling run: the sum over patches of their group's N (patch-steps)."""
    if groups.ndim != 1:
        raise ValueError(f"expected (M,) groups, got {tuple(groups.shape)}")
    _check_groups(groups, plan, groups.shape[0])
    return sum(int((groups == g).sum()) * sched.steps for g, sched in enumerate(plan))


def sample_group(
    denoise: Denoiser,
    y0: torch.Tensor,
    noise: torch.Tensor,
    idx: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    tau: int,
    steps: int,
) -> torch.Tensor:
    """Truncated reverse process of one batch of patches of one group: (b, 4, V, V) -> x0 (b, 4, V, V).

    y0, noise are the batch's own rows; idx (b,) their indices in the image's patch list."""
    times = schedule.timesteps(tau, steps)  # tau, tau - tau/N, ..., tau/N
    x = schedule.q_sample(y0, tau, noise)  # (b, 4, V, V): y_tau of Eq. (7) stands in for x_tau, Eq. (6)
    for i, t in enumerate(times):
        t_prev = times[i + 1] if i + 1 < len(times) else 0
        t_batch = torch.full((x.shape[0],), float(t), device=x.device)  # (b,) float32
        out = denoise(x, t_batch, idx)  # (b, C, V, V)
        x = schedule.ddim_step(out, t, t_prev, x)  # x_{t_prev}; at t_prev = 0 the clean estimate
    return x


@torch.no_grad()
def pgs_sample(
    denoise: Denoiser,
    y0: torch.Tensor,
    groups: torch.Tensor,
    noise: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    plan: list[GroupSchedule],
    batch_size: int,
) -> torch.Tensor:
    """PGS over the M patches of one image (or any set): y0, noise (M, 4, V, V), groups (M,) ->
    x0 (M, 4, V, V) in the input order.

    Each group g runs from y_tau (Eq. 7, tau = plan[g].tau) through ``schedule.timesteps(tau, N)`` to 0,
    ``batch_size`` patches per denoiser call; groups with equal (tau, N) share batches. ``noise`` is the
    eps of Eq. (7), drawn by the caller once per patch, so the result does not depend on ``batch_size``
    (exactly so for a denoiser whose output row depends only on its input row)."""
    m = y0.shape[0]
    if noise.shape != y0.shape:
        raise ValueError(f"noise {tuple(noise.shape)} does not match y0 {tuple(y0.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_groups(groups, plan, m)
    out = torch.empty_like(y0)  # (M, 4, V, V)
    members = groups.to(y0.device)
    # Groups that share a (tau, N) (all of them in uniform mode) are sampled together: fuller batches,
    # the same result, since every patch takes the same steps either way.
    shared: dict[tuple[int, int], list[int]] = {}
    for g, sched in enumerate(plan):
        shared.setdefault((sched.tau, sched.steps), []).append(g)
    for (tau, steps), group_ids in shared.items():  # Eq. (2) groups, each with its own (tau, N)
        mine = torch.isin(members, torch.tensor(group_ids, device=members.device))  # (M,) bool
        for idx in torch.nonzero(mine).flatten().split(batch_size):  # (b,) patch indices
            out[idx] = sample_group(
                denoise, y0[idx], noise[idx], idx, schedule=schedule, tau=tau, steps=steps
            )  # (b, 4, V, V)
    return out
