"""Patch-DiT sampling of a set of patches: the texture prompt and its K/V once per batch, then PGS.

Two loops with the same arguments and the same result, patch for patch:

- ``refine_patches``: Patch-adaptive Group Sampling (``pgs.pgs_sample``): each group's patches in
  batches, each batch through its group's N DDIM steps from its tau (the reference upscaler and the
  pipeline's per-group pools);
- ``fused_refine_patches``: all groups in one loop over their shared time grid (the pipeline's fused
  pool). With the paper's schedules every group's steps lie on one grid of stride 50
  (1000/20 = 700/14 = 400/8). A batch runs the grid from its largest tau down; a patch of group g
  *joins* at t = tau_g from y_tau = q_sample(y0, tau_g, eps) (Eq. 7), exactly as its own group's
  sampler would start, and then takes the same steps. Patches are batched in the order they join
  (hard, medium, simple), so only batches at group boundaries mix groups: fewer, fuller batches.

In both, a batch's texture prompts are computed when the batch starts (once per patch: the prompt does
not depend on t) and, with ``prompt_cache``, so are the cross-attention keys and values of every
Patch-DiT block (``PatchDiT.prompt_kv``), which the batch's steps then reuse. Without the cache each
step recomputes them from the prompt: the same result, more FLOPs (35% of a step at the ``paper``
preset, ``bench/flops.py``). Only one batch's prompts and K/V are held at a time.

``precision`` (``precision.py``): the networks run under autocast; epsilon is cast to float32 before
each DDIM update, so the latents x_t stay float32 through all steps.

Pure torch: this module takes the two networks, not the whole model, so benchmarks import it without
the autoencoder (diffusers) or the RTM (faiss).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from patchscaler.config import SamplerConfig
from patchscaler.diffusion import NoiseSchedule
from patchscaler.patch_dit import PatchDiT
from patchscaler.pgs import Denoiser, count_patch_steps, group_plan, pgs_sample
from patchscaler.precision import autocast
from patchscaler.texture import TextureEncoder

# progress(done, total): patch-steps (one patch through one Patch-DiT call) done so far, of all
Progress = Callable[[int, int], None]


def counting(denoise: Denoiser, total: int, progress: Progress) -> Denoiser:
    """``denoise`` reporting ``progress(done, total)`` once before the first call and after each call,
    ``done`` counting patch-steps (rows denoised)."""
    done = 0
    progress(0, total)

    def counted(x_t: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        nonlocal done
        eps = denoise(x_t, t, idx)
        done += len(idx)
        progress(done, total)
        return eps

    return counted


def _condition(patch_dit: PatchDiT, prompt: torch.Tensor, prompt_cache: bool) -> dict[str, object]:
    """Patch-DiT's prompt keyword: the prompt's per-block K/V (cache) or the prompt itself."""
    return {"prompt_kv": patch_dit.prompt_kv(prompt)} if prompt_cache else {"prompt": prompt}


@torch.no_grad()
def refine_patches(
    *,
    patch_dit: PatchDiT,
    texture_encoder: TextureEncoder,
    sampler: SamplerConfig,
    y0: torch.Tensor,
    groups: torch.Tensor,
    noise: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    schedule: NoiseSchedule,
    batch_size: int | None = None,
    prompt_cache: bool = True,
    precision: str = "fp32",
    progress: Progress | None = None,
) -> torch.Tensor:
    """PGS with Patch-DiT: y0, noise (M, 4, V, V), groups (M,), RTM values (M, K, 4, V, V) and scores
    (M, K) -> x0 patches (M, 4, V, V) on y0's device. Networks run on their own device.
    ``progress(done, total)``, if given, after every Patch-DiT call (``counting``)."""
    bs = batch_size or sampler.batch_size
    device = next(patch_dit.parameters()).device
    y0_dev = y0.to(device)
    current: dict[str, object] = {}  # the batch being sampled: its indices and its prompt (or K/V)

    def denoise(x_t: torch.Tensor, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if "idx" not in current or not torch.equal(current["idx"], idx):  # a new batch starts
            current.clear()  # free the last batch's prompt and K/V first
            prompt = texture_encoder(values[idx].to(device), scores[idx].to(device))  # (b, K*L, D)
            current.update(idx=idx, cond=_condition(patch_dit, prompt, prompt_cache))
        eps = patch_dit(x_t.to(device), t.to(device), y0_dev[idx.to(device)], **current["cond"])
        return eps.float().to(x_t.device)  # (b, 4, V, V)

    if progress is not None:
        denoise = counting(denoise, count_patch_steps(groups, group_plan(sampler)), progress)
    with autocast(device, precision):
        return pgs_sample(
            denoise, y0, groups, noise, schedule=schedule, plan=group_plan(sampler), batch_size=bs
        )


def shared_grid(schedule: NoiseSchedule, taus: list[int], steps: list[int]) -> list[int]:
    """The common descending time grid of all groups; ``ValueError`` when their steps do not share one."""
    grids = [schedule.timesteps(tau, n) for tau, n in zip(taus, steps, strict=True)]
    longest = max(grids, key=len)
    for grid in grids:
        if grid != longest[len(longest) - len(grid):]:
            raise ValueError(
                f"fused sampling needs every group's steps on one grid; (tau, N) = "
                f"{list(zip(taus, steps, strict=True))} do not share one"
            )
    return longest


@torch.no_grad()
def fused_refine_patches(
    *,
    patch_dit: PatchDiT,
    texture_encoder: TextureEncoder,
    sampler: SamplerConfig,
    y0: torch.Tensor,
    groups: torch.Tensor,
    noise: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    schedule: NoiseSchedule,
    batch_size: int | None = None,
    prompt_cache: bool = True,
    precision: str = "fp32",
) -> torch.Tensor:
    """Same arguments and result as ``refine_patches``, all groups in one loop (module docstring)."""
    bs = batch_size or sampler.batch_size
    device = next(patch_dit.parameters()).device
    plan = group_plan(sampler)
    taus = [p.tau for p in plan]
    grid = shared_grid(schedule, taus, [p.steps for p in plan])
    if not len(y0):
        return y0.clone()
    start = torch.tensor(taus)[groups.cpu()].to(y0.device)  # (M,) the time step each patch joins at
    order = torch.argsort(start, descending=True, stable=True)  # (M,) hard first, then medium, simple
    x = torch.zeros_like(y0)  # (M, 4, V, V) on y0's device
    with autocast(device, precision):
        for batch in order.split(bs):  # (b,) patch indices
            joins = start[batch]  # (b,)
            prompt = texture_encoder(values[batch].to(device), scores[batch].to(device))  # (b, K*L, D)
            cond_all = _condition(patch_dit, prompt, prompt_cache)
            y0_b, noise_b = y0[batch], noise[batch]  # (b, 4, V, V)
            y0_dev = y0_b.to(device)
            xb = torch.zeros_like(y0_b)  # (b, 4, V, V)
            active = torch.zeros(len(batch), dtype=torch.bool, device=y0.device)
            for i in range(grid.index(int(joins.max())), len(grid)):
                t = grid[i]
                t_prev = grid[i + 1] if i + 1 < len(grid) else 0
                joining = joins == t  # (b,)
                if joining.any():
                    xb[joining] = schedule.q_sample(y0_b[joining], t, noise_b[joining])  # Eq. (7)
                    active |= joining
                rows = torch.nonzero(active).flatten()  # (a,)
                if len(rows) == len(batch):
                    cond, y0_rows = cond_all, y0_dev
                else:  # the batch's later-joining patches wait: select the active rows
                    r = rows.to(device)
                    cond = ({"prompt_kv": [(k[r], v[r]) for k, v in cond_all["prompt_kv"]]}
                            if prompt_cache else {"prompt": cond_all["prompt"][r]})
                    y0_rows = y0_dev[r]
                t_batch = torch.full((len(rows),), float(t), device=device)  # (a,)
                eps = patch_dit(xb[rows].to(device), t_batch, y0_rows, **cond)  # (a, 4, V, V)
                xb[rows] = schedule.ddim_step(eps.float().to(xb.device), t, t_prev, xb[rows])
            x[batch] = xb
    return x
