"""The DDPM noise schedule and the deterministic DDIM sampler step, in the style of diffusers'
``schedulers/scheduling_ddim.py``: the schedule never owns the model, and randomness is passed in (the
caller draws every noise tensor from its own ``torch.Generator``).

Time steps follow the paper's 1-based convention (docs/design.md): ``t in {1..T}``, ``beta_t`` for
``t = 1..T``, ``alpha_t := 1 - beta_t`` and ``abar_t := prod_{i=1..t} alpha_i`` (Eq. 4). The empty
product ``abar_0 = 1`` is stored too, so ``alphas_cumprod`` has ``T + 1`` entries and a DDIM step that
lands on ``t_prev = 0`` lands exactly on the predicted clean sample. ``tau = T`` is a valid start.

The schedule is computed in float64; every tensor operation on samples runs in the samples' dtype, with
the per-step scalar coefficients computed in float64 first and cast once.
"""

from __future__ import annotations

import torch

from patchscaler.config import SamplerConfig

Timestep = int | torch.Tensor  # an int, or a (B,) long tensor: one time step per sample
# What the denoiser outputs (diffusers' names): the noise (the paper's Eq. 9), v = sqrt(abar) eps -
# sqrt(1 - abar) x0, or the clean sample x0 itself.
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def make_betas(name: str, beta_start: float, beta_end: float, num_train_timesteps: int) -> torch.Tensor:
    """beta_1..beta_T (Eq. 3) as a float64 tensor (T,).

    ``linear`` is DDPM's (and DiT's) schedule; ``scaled_linear`` is Stable Diffusion's, linear in
    sqrt(beta)."""
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if name == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if name == "scaled_linear":
        root = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64)
        return root**2
    raise ValueError(f"unknown beta_schedule {name!r}; choose 'linear' or 'scaled_linear'")


class NoiseSchedule:
    """``alphas_cumprod`` (T+1,) float64 with ``alphas_cumprod[0] = 1``; forward noising (Eq. 4/7) and
    the DDIM reverse step (eta = 0).

    ``alphas_cumprod`` is a plain attribute: a trainer may move it to its device once
    (``schedule.alphas_cumprod = schedule.alphas_cumprod.to(device)``); lookups follow it and move the
    coefficients to the samples' device."""

    def __init__(self, *, config: SamplerConfig) -> None:
        self.config = config
        self.num_train_timesteps = config.num_train_timesteps
        if config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {config.prediction_type!r}; choose one of {PREDICTION_TYPES}")
        self.prediction_type = config.prediction_type
        self.betas = make_betas(
            config.beta_schedule, config.beta_start, config.beta_end, config.num_train_timesteps
        )  # (T,): betas[t - 1] is beta_t
        if not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ValueError("every beta_t must lie in (0, 1)")
        alphas = 1.0 - self.betas  # (T,), Eq. 3/4: alpha_t := 1 - beta_t
        one = torch.ones(1, dtype=torch.float64)
        self.alphas_cumprod = torch.cat([one, torch.cumprod(alphas, dim=0)])  # (T+1,), abar_0 = 1

    # --- lookups --------------------------------------------------------------------------------------

    def _check_int(self, t: int, what: str) -> None:
        if not 0 <= t <= self.num_train_timesteps:
            raise ValueError(f"{what} = {t} is outside 0..{self.num_train_timesteps}")

    def _abar(self, t: Timestep, like: torch.Tensor, what: str = "t") -> float | torch.Tensor:
        """abar_t in float64: a Python float for an int t, else a (B, 1, ..., 1) tensor broadcastable
        against ``like`` (B, ...) on ``like``'s device, still float64 (cast after the arithmetic)."""
        if isinstance(t, int):
            self._check_int(t, what)
            return float(self.alphas_cumprod[t])
        if t.ndim != 1 or t.shape[0] != like.shape[0]:
            raise ValueError(f"{what} must be an int or a ({like.shape[0]},) tensor, got {tuple(t.shape)}")
        table = self.alphas_cumprod
        abar = table[t.to(device=table.device, dtype=torch.long)].to(like.device)  # (B,)
        return abar.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)

    @staticmethod
    def _cast(coef: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
        return coef if isinstance(coef, float) else coef.to(like.dtype)

    # --- forward process --------------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: Timestep, noise: torch.Tensor) -> torch.Tensor:
        """Eq. (4): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per sample.

        With y0 in place of x0 and t = tau this is Eq. (7), the truncated forward process whose y_tau
        starts PGS's reverse process (the approximation of Eq. 6). x0, noise (B, ...); t an int or (B,)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise {tuple(noise.shape)} does not match x0 {tuple(x0.shape)}")
        abar = self._abar(t, x0)
        a = self._cast(abar**0.5, x0)  # sqrt(abar_t)
        s = self._cast((1.0 - abar) ** 0.5, x0)  # sqrt(1 - abar_t)
        return a * x0 + s * noise

    # --- reverse process ----------------------------------------------------------------------------------

    def timesteps(self, tau: int, n: int) -> list[int]:
        """The ``n`` model-evaluation times of a group with intermediate time step ``tau``, descending:
        ``tau, tau - tau/n, ..., tau/n``; the last DDIM step then lands on 0.

        Entry k is ``tau - round(k * tau / n)`` (halves rounded up, in exact integer arithmetic), so
        when n divides tau the stride is exactly tau / n: with the defaults 400/8, 700/14 and 1000/20
        it is 50 for every group and the groups share one grid. Needs 1 <= n <= tau <= T, which keeps
        the times strictly decreasing and >= 1."""
        if not 1 <= tau <= self.num_train_timesteps:
            raise ValueError(f"tau = {tau} is outside 1..{self.num_train_timesteps}")
        if not 1 <= n <= tau:
            raise ValueError(f"the number of steps must lie in 1..tau = {tau}, got {n}")
        return [tau - (2 * k * tau + n) // (2 * n) for k in range(n)]

    def predict_x0(self, model_output: torch.Tensor, t: Timestep, x_t: torch.Tensor) -> torch.Tensor:
        """The clean-sample estimate x0_hat that the network output implies at x_t (inverting Eq. 4):

            epsilon:       x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
            v_prediction:  x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v
            sample:        x0_hat = the output itself"""
        c_x, c_out = self._x0_coefficients(t, x_t)
        return self._cast(c_x, x_t) * x_t + self._cast(c_out, x_t) * model_output

    def _x0_coefficients(self, t: Timestep, x_t: torch.Tensor) -> tuple[float | torch.Tensor, ...]:
        """(c_x, c_out) in float64 with x0_hat = c_x x_t + c_out output, for the prediction type."""
        abar = self._abar(t, x_t)
        kind = self.prediction_type
        if kind == "epsilon":
            return abar**-0.5, -(((1.0 - abar) / abar) ** 0.5)
        if kind == "v_prediction":
            return abar**0.5, -((1.0 - abar) ** 0.5)
        return 0.0 * abar, 1.0 + 0.0 * abar  # sample

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: Timestep) -> torch.Tensor:
        """What the network learns to output for x_t = q_sample(x0, t, noise) (Eq. 9 for epsilon):
        ``noise`` (epsilon), ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (v_prediction, Salimans & Ho
        2022) or ``x0`` (sample)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        abar = self._abar(t, x0)
        return self._cast(abar**0.5, x0) * noise - self._cast((1.0 - abar) ** 0.5, x0) * x0

    def ddim_step(self, model_output: torch.Tensor, t: Timestep, t_prev: Timestep, x_t: torch.Tensor
                  ) -> torch.Tensor:
        """One deterministic DDIM step (eta = 0) from t to t_prev < t:

            x0_hat  = the clean estimate of the output (``predict_x0``)
            eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)
            x_prev  = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps_hat

        Both estimates are linear in (x_t, output), so this is ``x_prev = c_x x_t + c_out output`` with
        the two coefficients computed in float64 and a sample seeing one rounding per term. For epsilon:
        c_x = sqrt(abar_prev / abar_t), c_out = sqrt(1 - abar_prev) - c_x sqrt(1 - abar_t).
        ``t_prev = 0`` (abar_0 = 1) returns x0_hat. t and t_prev are ints or per-sample (B,) tensors."""
        if model_output.shape != x_t.shape:
            raise ValueError(
                f"model output {tuple(model_output.shape)} does not match x_t {tuple(x_t.shape)}")
        if isinstance(t, int) and isinstance(t_prev, int) and not 0 <= t_prev < t:
            raise ValueError(f"a DDIM step needs 0 <= t_prev < t, got t = {t}, t_prev = {t_prev}")
        abar = self._abar(t, x_t)
        abar_prev = self._abar(t_prev, x_t, "t_prev")
        if self.prediction_type == "epsilon":  # the classic form, no detour through x0_hat
            c_x = (abar_prev / abar) ** 0.5  # sqrt(abar_prev) / sqrt(abar_t)
            c_out = (1.0 - abar_prev) ** 0.5 - c_x * (1.0 - abar) ** 0.5
        else:
            a_x, a_out = self._x0_coefficients(t, x_t)  # x0_hat = a_x x_t + a_out out
            # eps_hat = (x_t - sqrt(abar) x0_hat) / sqrt(1 - abar); abar_t < 1 for every t >= 1
            s = (1.0 - abar) ** -0.5
            e_x, e_out = s * (1.0 - abar**0.5 * a_x), -s * abar**0.5 * a_out
            c_x = abar_prev**0.5 * a_x + (1.0 - abar_prev) ** 0.5 * e_x
            c_out = abar_prev**0.5 * a_out + (1.0 - abar_prev) ** 0.5 * e_out
        return self._cast(c_x, x_t) * x_t + self._cast(c_out, x_t) * model_output
