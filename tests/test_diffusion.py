"""Noise schedule values, forward noising (Eq. 4/7), time-step grids and the DDIM step."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from patchscaler.config import SamplerConfig
from patchscaler.diffusion import NoiseSchedule, make_betas

LINEAR = SamplerConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule(config=LINEAR)


def oracle_eps(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """The epsilon that x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps implies: a perfect denoiser."""
    abar = float(schedule.alphas_cumprod[t])
    return (x_t - math.sqrt(abar) * x0) / math.sqrt(1.0 - abar)


def test_linear_schedule_matches_hand_derived_values(schedule: NoiseSchedule) -> None:
    ac = schedule.alphas_cumprod
    assert ac.dtype == torch.float64 and ac.shape == (1001,)
    assert schedule.betas.shape == (1000,)
    assert schedule.betas[0].item() == pytest.approx(1e-4, abs=1e-15)  # beta_1
    assert schedule.betas[-1].item() == pytest.approx(0.02, abs=1e-15)  # beta_T
    beta_2 = 1e-4 + (0.02 - 1e-4) / 999
    assert ac[0].item() == 1.0  # abar_0, the empty product
    assert ac[1].item() == pytest.approx(0.9999, abs=1e-15)
    assert ac[2].item() == pytest.approx(0.9999 * (1 - beta_2), abs=1e-15)
    assert ac[1000].item() == pytest.approx(math.prod(1 - b for b in schedule.betas.tolist()), rel=1e-12)
    assert bool((ac[1:] < ac[:-1]).all())  # strictly decreasing
    assert 0.0 < ac[-1].item() < 1e-4


def test_scaled_linear_is_the_default_with_sd_endpoints_and_unknown_name() -> None:
    sched = NoiseSchedule(config=SamplerConfig())
    assert sched.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert sched.betas[-1].item() == pytest.approx(0.012, rel=1e-12)
    mid = ((0.00085**0.5 + 0.012**0.5) / 2) ** 2  # linear in sqrt(beta): the middle of an odd count
    assert make_betas("scaled_linear", 0.00085, 0.012, 5)[2].item() == pytest.approx(mid, rel=1e-12)
    assert sched.alphas_cumprod[0].item() == 1.0
    # every PGS group starts with a real share of y0 (docs/model.md): sqrt(abar) at 400/700/1000
    roots = [round(sched.alphas_cumprod[t].item() ** 0.5, 2) for t in (400, 700, 1000)]
    assert roots == [0.65, 0.29, 0.07]
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule(config=dataclasses.replace(SamplerConfig(), beta_schedule="cosine"))


def test_q_sample_formula_scalar_and_per_sample_t(schedule: NoiseSchedule) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 16, 16, generator=g)
    noise = torch.randn(3, 4, 16, 16, generator=g)
    abar = schedule.alphas_cumprod
    out = schedule.q_sample(x0, 500, noise)
    expected = math.sqrt(abar[500].item()) * x0 + math.sqrt(1 - abar[500].item()) * noise
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=1e-6)
    t = torch.tensor([1, 400, 1000])
    per = schedule.q_sample(x0, t, noise)
    for i, ti in enumerate(t.tolist()):
        assert torch.allclose(per[i], schedule.q_sample(x0[i:i + 1], ti, noise[i:i + 1])[0], atol=1e-6)
    assert torch.equal(schedule.q_sample(x0, 0, noise), x0)  # abar_0 = 1: no noise at all
    assert schedule.q_sample(x0.double(), t, noise.double()).dtype == torch.float64
    with pytest.raises(ValueError):
        schedule.q_sample(x0, 1001, noise)
    with pytest.raises(ValueError):
        schedule.q_sample(x0, torch.tensor([1, 2]), noise)  # one t per sample


@pytest.mark.parametrize(("tau", "n"), [(400, 8), (700, 14), (1000, 20)])
def test_default_groups_share_stride_50(schedule: NoiseSchedule, tau: int, n: int) -> None:
    assert schedule.timesteps(tau, n) == list(range(tau, 0, -50))


def test_timesteps_rounding_and_validation(schedule: NoiseSchedule) -> None:
    assert schedule.timesteps(1000, 1) == [1000]
    assert schedule.timesteps(5, 5) == [5, 4, 3, 2, 1]
    assert schedule.timesteps(1000, 3) == [1000, 667, 333]  # tau - round(k * tau / n)
    for tau, n in [(10, 4), (999, 7), (3, 2)]:
        ts = schedule.timesteps(tau, n)
        assert len(ts) == n and ts[0] == tau and ts[-1] >= 1
        assert all(a > b for a, b in itertools.pairwise(ts))
    for tau, n in [(0, 1), (1001, 20), (10, 0), (10, 11)]:
        with pytest.raises(ValueError):
            schedule.timesteps(tau, n)


@pytest.mark.parametrize(("tau", "n"), [(400, 8), (700, 14), (1000, 20)])
def test_ddim_with_oracle_denoiser_recovers_x0(schedule: NoiseSchedule, tau: int, n: int) -> None:
    g = torch.Generator().manual_seed(tau)
    x0 = torch.randn(6, 4, 16, 16, generator=g, dtype=torch.float64)
    x = schedule.q_sample(x0, tau, torch.randn(6, 4, 16, 16, generator=g, dtype=torch.float64))
    times = schedule.timesteps(tau, n)
    for i, t in enumerate(times):
        t_prev = times[i + 1] if i + 1 < len(times) else 0
        eps = oracle_eps(schedule, x0, x, t)
        assert torch.allclose(schedule.predict_x0(eps, t, x), x0, atol=1e-10)
        x = schedule.ddim_step(eps, t, t_prev, x)
        if t_prev:  # every intermediate state stays on the trajectory of the same eps
            assert torch.allclose(x, schedule.q_sample(x0, t_prev, eps), atol=1e-10)
    assert torch.allclose(x, x0, atol=1e-5)


def test_ddim_step_formula_and_per_sample_times(schedule: NoiseSchedule) -> None:
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    ab = schedule.alphas_cumprod
    x0_hat = (x_t - (1 - ab[300]).sqrt() * eps) / ab[300].sqrt()
    expected = ab[250].sqrt() * x0_hat + (1 - ab[250]).sqrt() * eps
    assert torch.allclose(schedule.ddim_step(eps, 300, 250, x_t), expected, atol=1e-12)
    assert torch.allclose(schedule.ddim_step(eps, 300, 0, x_t), x0_hat, atol=1e-12)  # lands on x0_hat
    t, t_prev = torch.tensor([300, 1000, 50]), torch.tensor([250, 950, 0])
    batched = schedule.ddim_step(eps, t, t_prev, x_t)
    for i in range(3):
        one = schedule.ddim_step(eps[i:i + 1], int(t[i]), int(t_prev[i]), x_t[i:i + 1])
        assert torch.allclose(batched[i:i + 1], one, atol=1e-12)
    with pytest.raises(ValueError):
        schedule.ddim_step(eps, 250, 300, x_t)  # t_prev must be earlier
    with pytest.raises(ValueError):
        schedule.ddim_step(eps[:2], 300, 250, x_t)


def test_lookups_follow_a_replaced_table() -> None:
    """A trainer replaces ``alphas_cumprod`` by a copy on its device; lookups must read the new table."""
    sched = NoiseSchedule(config=LINEAR)
    table = sched.alphas_cumprod.clone()
    table[20] = 0.25
    sched.alphas_cumprod = table
    x0, noise = torch.ones(2, 4, 4, 4), torch.full((2, 4, 4, 4), 2.0)
    out = sched.q_sample(x0, torch.tensor([10, 20]), noise)
    assert torch.allclose(out[1], torch.full((4, 4, 4), 0.5 + 2 * 0.75**0.5))
    assert torch.allclose(sched.q_sample(x0, 20, noise), torch.full((2, 4, 4, 4), 0.5 + 2 * 0.75**0.5))


def oracle_output(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """What a perfect network of the schedule's prediction type outputs at (x_t, t)."""
    eps = oracle_eps(schedule, x0, x_t, t)
    return schedule.training_target(x0, eps, t)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(("tau", "n"), [(400, 8), (700, 14), (1000, 20)])
def test_every_prediction_type_follows_the_same_ddim_trajectory(kind: str, tau: int, n: int) -> None:
    """With a perfect network each parameterisation gives the same states, which stay on the q_sample
    trajectory of the starting noise, and lands on x0."""
    sched = NoiseSchedule(config=SamplerConfig(prediction_type=kind))
    g = torch.Generator().manual_seed(tau)
    x0 = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    eps0 = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    x = sched.q_sample(x0, tau, eps0)
    times = sched.timesteps(tau, n)
    for i, t in enumerate(times):
        t_prev = times[i + 1] if i + 1 < len(times) else 0
        out = oracle_output(sched, x0, x, t)
        assert torch.allclose(sched.predict_x0(out, t, x), x0, atol=1e-9)
        x = sched.ddim_step(out, t, t_prev, x)
        if t_prev:
            assert torch.allclose(x, sched.q_sample(x0, t_prev, eps0), atol=1e-8)
    assert torch.allclose(x, x0, atol=1e-6)


def test_training_targets_by_hand_and_unknown_type() -> None:
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    for kind, expected in [("epsilon", lambda a: eps), ("sample", lambda a: x0),
                           ("v_prediction", lambda a: a**0.5 * eps - (1 - a) ** 0.5 * x0)]:
        sched = NoiseSchedule(config=SamplerConfig(prediction_type=kind))
        a = sched.alphas_cumprod[300].item()
        assert torch.allclose(sched.training_target(x0, eps, 300), expected(a), atol=1e-6)
        t = torch.tensor([300, 300])
        assert torch.allclose(sched.training_target(x0, eps, t), expected(a), atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(config=SamplerConfig(prediction_type="x0"))
