"""Patch-adaptive Group Sampling: Eq. (2) grouping, the group plans and the truncated DDIM sampler."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from patchscaler.config import SamplerConfig
from patchscaler.diffusion import NoiseSchedule
from patchscaler.pgs import (
    GROUP_NAMES,
    GroupSchedule,
    assign_groups,
    count_patch_steps,
    group_plan,
    pgs_sample,
)

ADAPTIVE = [
    GroupSchedule("simple", 400, 8), GroupSchedule("medium", 700, 14), GroupSchedule("hard", 1000, 20)
]


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule(config=SamplerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))


def _f32_next(value: float, toward: float) -> float:
    return torch.nextafter(torch.tensor(value), torch.tensor(toward)).item()


def test_group_names() -> None:
    assert GROUP_NAMES == ("simple", "medium", "hard")


def test_thresholds_at_exact_boundaries() -> None:
    cases = [
        (1.0, 0), (0.99, 0), (_f32_next(0.95, 1.0), 0),
        (0.95, 1), (_f32_next(0.95, 0.0), 1), (0.8, 1), (_f32_next(0.75, 1.0), 1),
        (0.75, 2), (_f32_next(0.75, 0.0), 2), (0.3, 2), (0.0, 2),
    ]
    for dtype in (torch.float32, torch.float64):
        conf = torch.tensor([c for c, _ in cases], dtype=dtype)
        groups = assign_groups(conf, 0.95, 0.75)
        assert groups.dtype == torch.long and groups.shape == (len(cases),)
        assert groups.tolist() == [g for _, g in cases], dtype


def test_assign_groups_other_thresholds_and_validation() -> None:
    conf = torch.tensor([0.2, 0.5, 0.6, 0.9])
    assert assign_groups(conf, 0.5, 0.2).tolist() == [2, 1, 0, 0]
    assert assign_groups(conf, 1.0, 0.0).tolist() == [1, 1, 1, 1]  # nothing exceeds 1, all exceed 0
    assert assign_groups(torch.empty(0), 0.95, 0.75).shape == (0,)
    with pytest.raises(ValueError):
        assign_groups(conf, 0.7, 0.8)  # gamma2 above gamma1
    with pytest.raises(ValueError):
        assign_groups(conf.view(2, 2), 0.95, 0.75)


def test_group_plan_adaptive_and_uniform() -> None:
    assert group_plan(SamplerConfig()) == ADAPTIVE
    uniform = group_plan(dataclasses.replace(SamplerConfig(), mode="uniform"))
    assert uniform == [GroupSchedule(name, 1000, 20) for name in GROUP_NAMES]
    custom = dataclasses.replace(SamplerConfig(), taus=(200, 500, 900), steps=(4, 10, 18), mode="uniform")
    assert [(p.tau, p.steps) for p in group_plan(custom)] == [(900, 18)] * 3
    with pytest.raises(ValueError, match="mode"):
        group_plan(dataclasses.replace(SamplerConfig(), mode="fused"))
    with pytest.raises(ValueError):
        group_plan(dataclasses.replace(SamplerConfig(), taus=(400, 700, 1200)))
    with pytest.raises(ValueError):
        group_plan(dataclasses.replace(SamplerConfig(), steps=(8, 14, 0)))


def test_count_patch_steps() -> None:
    groups = torch.tensor([0, 0, 1, 2, 2, 2])
    assert count_patch_steps(groups, ADAPTIVE) == 2 * 8 + 1 * 14 + 3 * 20
    uniform = group_plan(dataclasses.replace(SamplerConfig(), mode="uniform"))
    assert count_patch_steps(groups, uniform) == 6 * 20
    assert count_patch_steps(torch.empty(0, dtype=torch.long), ADAPTIVE) == 0
    with pytest.raises(ValueError):
        count_patch_steps(torch.tensor([0, 3]), ADAPTIVE)


class Oracle:
    """A perfect denoiser for known clean patches x0: the eps that x_t = sqrt(abar) x0 + sqrt(1-abar) eps
    implies. Records every call as (t values, idx, x_t)."""

    def __init__(self, schedule: NoiseSchedule, x0: torch.Tensor) -> None:
        self.schedule, self.x0 = schedule, x0
        self.calls: list[tuple[list[float], list[int], torch.Tensor]] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        assert t.dtype.is_floating_point and idx.dtype == torch.long and t.shape == idx.shape == (len(x_t),)
        self.calls.append((t.tolist(), idx.tolist(), x_t.clone()))
        abar = self.schedule.alphas_cumprod[t.long()].to(x_t.dtype).view(-1, 1, 1, 1)  # (b, 1, 1, 1)
        return (x_t - abar.sqrt() * self.x0[idx]) / (1 - abar).sqrt()


def _problem(m: int, seed: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(m, 4, 16, 16, generator=g, dtype=dtype)
    y0 = x0 + 0.1 * torch.randn(m, 4, 16, 16, generator=g, dtype=dtype)  # a coarse estimate of x0
    noise = torch.randn(m, 4, 16, 16, generator=g, dtype=dtype)
    groups = torch.randint(0, 3, (m,), generator=g)
    return x0, y0, noise, groups


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_oracle_sampling_returns_x0_in_order(schedule: NoiseSchedule, batch_size: int) -> None:
    x0, y0, noise, groups = _problem(11, seed=0)
    oracle = Oracle(schedule, x0)
    out = pgs_sample(oracle, y0, groups, noise, schedule=schedule, plan=ADAPTIVE, batch_size=batch_size)
    assert out.shape == x0.shape and out.dtype == x0.dtype
    assert torch.allclose(out, x0, atol=1e-5)
    # each patch: N calls at its group's times, starting from y_tau of Eq. (7), in batches <= batch_size
    seen: dict[int, list[float]] = {i: [] for i in range(11)}
    for ts, idx, x_t in oracle.calls:
        assert len(idx) <= batch_size and len({int(groups[i]) for i in idx}) == 1
        for t, i, x in zip(ts, idx, x_t, strict=True):
            if not seen[i]:
                tau = ADAPTIVE[int(groups[i])].tau
                assert t == tau and torch.allclose(x, schedule.q_sample(y0[i:i + 1], tau, noise[i:i + 1])[0])
            seen[i].append(t)
    for i, ts in seen.items():
        sched = ADAPTIVE[int(groups[i])]
        assert ts == [float(t) for t in range(sched.tau, 0, -50)] and len(ts) == sched.steps
    assert sum(len(idx) for _, idx, _ in oracle.calls) == count_patch_steps(groups, ADAPTIVE)


def test_elementwise_denoiser_is_bit_identical_across_batch_sizes(schedule: NoiseSchedule) -> None:
    _, y0, noise, groups = _problem(13, seed=1, dtype=torch.float32)

    def elementwise(y: torch.Tensor):  # the caller looks its y0 up by patch index
        def denoise(x_t: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return 0.9 * x_t - 0.3 * y[idx] + (t / 1000).view(-1, 1, 1, 1)  # row i depends on row i only

        return denoise

    outs = [pgs_sample(elementwise(y0), y0, groups, noise, schedule=schedule, plan=ADAPTIVE, batch_size=bs)
            for bs in (1, 3, 64)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    alone = pgs_sample(elementwise(y0[5:6]), y0[5:6], groups[5:6], noise[5:6], schedule=schedule,
                       plan=ADAPTIVE, batch_size=1)  # the same patch sampled on its own
    assert torch.equal(outs[0][5:6], alone)
    assert not torch.allclose(outs[0], y0, atol=1e-2)  # it did move the patches


def test_uniform_mode_runs_every_patch_from_T(schedule: NoiseSchedule) -> None:
    x0, y0, noise, groups = _problem(7, seed=2)
    oracle = Oracle(schedule, x0)
    plan = group_plan(dataclasses.replace(SamplerConfig(), mode="uniform"))
    out = pgs_sample(oracle, y0, groups, noise, schedule=schedule, plan=plan, batch_size=4)
    assert torch.allclose(out, x0, atol=1e-5)
    assert sum(len(idx) for _, idx, _ in oracle.calls) == 7 * 20 == count_patch_steps(groups, plan)
    # the groups share one schedule, so they share batches: 7 patches in 2 batches of <= 4, 20 calls each
    assert [len(idx) for _, idx, _ in oracle.calls] == [4] * 20 + [3] * 20
    assert len({int(groups[i]) for i in oracle.calls[0][1]}) > 1
    assert [ts[0] for ts, _, _ in oracle.calls[:20]] == [float(t) for t in range(1000, 0, -50)]


def test_groups_matter_and_inputs_are_checked(schedule: NoiseSchedule) -> None:
    _, y0, noise, _ = _problem(4, seed=3, dtype=torch.float32)

    def denoise(x_t: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x_t)

    # a zero eps gives x0_hat = y_tau / sqrt(abar_tau): the result depends on each patch's group
    simple = pgs_sample(denoise, y0, torch.zeros(4, dtype=torch.long), noise, schedule=schedule,
                        plan=ADAPTIVE, batch_size=2)
    hard = pgs_sample(denoise, y0, torch.full((4,), 2), noise, schedule=schedule, plan=ADAPTIVE, batch_size=2)
    scale = schedule.alphas_cumprod[400].sqrt().item()
    assert torch.allclose(simple, schedule.q_sample(y0, 400, noise) / scale, atol=1e-5)
    assert not torch.allclose(simple, hard, atol=1e-3)
    empty = pgs_sample(denoise, y0[:0], torch.zeros(0, dtype=torch.long), noise[:0], schedule=schedule,
                       plan=ADAPTIVE, batch_size=2)
    assert empty.shape == (0, 4, 16, 16)
    for bad_groups in (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2])):
        with pytest.raises(ValueError):
            pgs_sample(denoise, y0, bad_groups, noise, schedule=schedule, plan=ADAPTIVE, batch_size=2)
    with pytest.raises(ValueError):
        pgs_sample(denoise, y0, torch.zeros(4, dtype=torch.long), noise, schedule=schedule, plan=ADAPTIVE,
                   batch_size=0)
