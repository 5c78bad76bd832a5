"""The single-process reference upscaler, and the stage functions the Ray pipeline reuses.

    LR image --resize x4, encode--> y_LR --GRM--> (y_HR, C) --patchify (16x16, overlap 8)--> y0 patches
      --Eq. 2--> groups --classifier + RTM top-K--> texture prompt (once per patch)
      --PGS: each group from y_tau (Eq. 7) with its own (tau, N), Patch-DiT + DDIM--> x0 patches
      --feathered merge--> x_HR --decode--> SR image --colour fix against the bicubic image--> output

With ``refine="none"`` (the regression-only fast path) retrieval and PGS are skipped: the y0 patches are
merged as they are, so the output is the decoded GRM latent y_HR, through the same decode and colour fix.

Each arrow is one function below, so ``pipeline/stages.py`` runs exactly this code, split across actors.

``precision`` (``fp32`` or ``bf16``, see ``precision.py``) is an argument of ``PatchScaler`` and of the
stage functions after ``restore``; the latents handed from one stage to the next are float32 either way.
``restore`` (encode + GRM) always runs in float32: its confidence map decides the groups (Eq. 2), and
bf16 there moves patch means by up to 2e-3, enough to flip patches that lie near gamma1/gamma2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patchscaler.autoencoder import upscale_input
from patchscaler.colorfix import COLOR_FIXES, DEFAULT_COLOR_FIX, color_fix
from patchscaler.diffusion import NoiseSchedule
from patchscaler.model import PatchScalerModel
from patchscaler.patching import PatchGrid, merge_patches, patch_means, plan_grid, split_patches
from patchscaler.pgs import GROUP_NAMES, assign_groups
from patchscaler.precision import autocast, resolve_precision
from patchscaler.rtm import ReferenceTextureMemory
from patchscaler.sampling import Progress, refine_patches

REFINES = ("diffusion", "none")  # Patch-DiT sampling (PGS), or the decoded GRM output as it is


def check_options(*, refine: str, color_fix: str) -> None:
    if refine not in REFINES:
        raise ValueError(f"unknown refine {refine!r}; expected one of {', '.join(REFINES)}")
    if color_fix not in COLOR_FIXES:
        raise ValueError(f"unknown colour fix {color_fix!r}; expected one of {', '.join(COLOR_FIXES)}")


@dataclass
class PatchPlan:
    """Everything the GRM stage produces for one image (latent tensors on CPU)."""

    y_hr: torch.Tensor  # (4, h, w) coarse HR latent
    confidence: torch.Tensor  # (1, h, w) in (0, 1]
    grid: PatchGrid
    patches: torch.Tensor  # (M, 4, V, V) y0 per patch
    mean_conf: torch.Tensor  # (M,)
    groups: torch.Tensor  # (M,) 0 simple, 1 medium, 2 hard
    noise: torch.Tensor  # (M, 4, V, V) the epsilon of Eq. 7: one draw over the latent, cut into patches


@dataclass
class UpscaleResult:
    image: torch.Tensor  # (3, scale*h, scale*w) in [0, 1]
    group_counts: dict[str, int]
    confidence: torch.Tensor  # (1, h_lat, w_lat)
    groups: torch.Tensor  # (M,)
    group_map: torch.Tensor  # (h_lat, w_lat) group of the nearest patch centre, for display
    grid: PatchGrid


@torch.no_grad()
def restore(model: PatchScalerModel, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LR image (3, h, w) in [0, 1] -> (y_HR (4, H/8, W/8), C (1, H/8, W/8)) on the HR grid.

    Float32 under every ``precision`` (module docstring): the groups, and so the work, of an image do
    not depend on it; it costs the encoder's share of the FLOPs, 3.4% of an image at the paper preset
    (docs/model.md). The x`scale` bicubic image is padded (replicate) up to a multiple of the
    autoencoder factor; the padding is cropped again after decoding (``finish``)."""
    device = next(model.grm.parameters()).device
    lr = image.unsqueeze(0).to(device=device, dtype=torch.float32)  # (1, 3, h, w)
    hr_in = upscale_input(lr, model.config.scale)  # (1, 3, sh, sw)
    f = model.autoencoder.factor
    pad_h, pad_w = (-hr_in.shape[-2]) % f, (-hr_in.shape[-1]) % f
    hr_in = F.pad(hr_in, (0, pad_w, 0, pad_h), mode="replicate")  # (1, 3, H, W), multiples of f
    y_lr = model.autoencoder.encode(hr_in)  # (1, 4, H/f, W/f)
    y_hr, conf = model.grm(y_lr)  # (1, 4, H/f, W/f), (1, 1, H/f, W/f)
    return y_hr[0].cpu(), conf[0].cpu()


def plan_patches(
    y_hr: torch.Tensor, confidence: torch.Tensor, model: PatchScalerModel, generator: torch.Generator
) -> PatchPlan:
    """Patchify y_HR and C, group the patches (Eq. 2) and draw each patch's starting noise (Eq. 7)."""
    cfg = model.config.sampler
    grid = plan_grid(y_hr.shape[-2], y_hr.shape[-1], patch=cfg.patch_size, overlap=cfg.overlap)
    patches = split_patches(y_hr, grid)  # (M, 4, V, V)
    mean_conf = patch_means(confidence, grid)  # (M,)
    groups = assign_groups(mean_conf, cfg.gamma1, cfg.gamma2)  # (M,)
    # The noise of Eq. 7 is drawn once for the whole latent and cut like y_HR, so overlapping patches
    # start from the same noise where they overlap: the merge then blends near-identical samples instead
    # of averaging 2-4 independently generated textures.
    full = torch.randn(y_hr.shape, generator=generator, dtype=y_hr.dtype)  # (C, h, w)
    noise = split_patches(full, grid)  # (M, C, V, V)
    return PatchPlan(y_hr, confidence, grid, patches, mean_conf, groups, noise)


@torch.no_grad()
def retrieve(
    model: PatchScalerModel,
    rtm: ReferenceTextureMemory,
    patches: torch.Tensor,
    batch_size: int = 256,
    *,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Texture retrieval (B.3): classifier features of y0 as queries -> top-K (scores, idx), (M, K) each."""
    device = next(model.classifier.parameters()).device
    k = model.config.texture_encoder.top_k
    scores, idx = [], []
    for chunk in patches.split(batch_size):
        with autocast(device, precision):
            queries = model.classifier.features(chunk.to(device))  # (b, D)
        s, i = rtm.search(queries.float(), k)  # (b, K) each
        scores.append(s)
        idx.append(i)
    return torch.cat(scores), torch.cat(idx)


@torch.no_grad()
def refine(
    model: PatchScalerModel,
    y0: torch.Tensor,
    groups: torch.Tensor,
    noise: torch.Tensor,
    values: torch.Tensor,
    scores: torch.Tensor,
    *,
    schedule: NoiseSchedule,
    batch_size: int | None = None,
    prompt_cache: bool = True,
    precision: str = "fp32",
    progress: Progress | None = None,
) -> torch.Tensor:
    """Patch-adaptive Group Sampling with Patch-DiT over one set of patches -> x0 patches (M, 4, V, V).

    Texture prompts and (with ``prompt_cache``) their cross-attention K/V are computed once per patch
    and reused at every step (``sampling.refine_patches``). ``progress(done, total)`` is called before
    the first step and after every Patch-DiT call, in patch-steps (``pgs.count_patch_steps``)."""
    return refine_patches(
        patch_dit=model.patch_dit, texture_encoder=model.texture_encoder, sampler=model.config.sampler,
        y0=y0, groups=groups, noise=noise, values=values, scores=scores, schedule=schedule,
        batch_size=batch_size, prompt_cache=prompt_cache, precision=precision, progress=progress,
    )


@torch.no_grad()
def finish(
    model: PatchScalerModel,
    x0: torch.Tensor,
    grid: PatchGrid,
    lr_size: tuple[int, int],
    *,
    precision: str = "fp32",
) -> torch.Tensor:
    """Merge the refined patches (feathered overlap) and decode: -> (3, scale*h, scale*w) in [0, 1]."""
    device = next(model.grm.parameters()).device
    latent = merge_patches(x0.float(), grid)  # (4, h_lat, w_lat)
    with autocast(device, precision):
        image = model.autoencoder.decode(latent.unsqueeze(0).to(device))[0].float()  # (3, H, W)
    s = model.config.scale
    return image[:, : lr_size[0] * s, : lr_size[1] * s].cpu()  # crop the encode padding


def fix_colors(image: torch.Tensor, lr: torch.Tensor, *, scale: int, method: str) -> torch.Tensor:
    """The decoded output (3, scale*h, scale*w) with the colours of the x``scale`` bicubic image of its LR
    input ``lr`` (3, h, w) in [0, 1], by ``method`` (``patchscaler.colorfix``)."""
    if method == "none":
        return image
    reference = upscale_input(lr[None].float(), scale)[0]  # (3, scale*h, scale*w)
    return color_fix(image.float(), reference, method)


def group_map(groups: torch.Tensor, grid: PatchGrid) -> torch.Tensor:
    """(h_lat, w_lat) map of the group of the patch whose centre is nearest, for display (Fig. 7)."""
    half = grid.patch / 2
    ys = torch.arange(grid.height, dtype=torch.float32) + 0.5
    xs = torch.arange(grid.width, dtype=torch.float32) + 0.5
    rows = ((ys - half) / grid.stride).round().clamp(0, grid.rows - 1).long()  # (h,)
    cols = ((xs - half) / grid.stride).round().clamp(0, grid.cols - 1).long()  # (w,)
    return groups.view(grid.rows, grid.cols)[rows[:, None], cols[None, :]]  # (h, w)


def count_groups(groups: torch.Tensor) -> dict[str, int]:
    return {name: int((groups == g).sum()) for g, name in enumerate(GROUP_NAMES)}


class PatchScaler:
    """``PatchScaler(model=..., rtm=...).upscale(image, generator=g)``: the whole method in one process.

    ``precision``: ``fp32``, ``bf16`` or None for the device's default (bf16 on CUDA, fp32 elsewhere).
    ``refine``: ``diffusion`` (PGS with Patch-DiT) or ``none`` (the decoded GRM output); ``color_fix``:
    ``wavelet``, ``adain`` or ``none`` (``patchscaler.colorfix``)."""

    def __init__(
        self,
        *,
        model: PatchScalerModel,
        rtm: ReferenceTextureMemory,
        device: str | torch.device = "cpu",
        precision: str | None = None,
        refine: str = "diffusion",
        color_fix: str = DEFAULT_COLOR_FIX,
    ) -> None:
        check_options(refine=refine, color_fix=color_fix)
        self.refine, self.color_fix = refine, color_fix
        self.model = model.to(device).eval()
        self.rtm = rtm
        self.precision = resolve_precision(precision, device)
        self.schedule = NoiseSchedule(config=model.config.sampler)

    @torch.no_grad()
    def upscale(self, image: torch.Tensor, *, generator: torch.Generator, progress: Progress | None = None
                ) -> UpscaleResult:
        """(3, h, w) in [0, 1] -> ``UpscaleResult`` with the (3, scale*h, scale*w) image.
        ``progress(done, total)``: Patch-DiT patch-steps done of all, after each model call (``refine``)."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an RGB image tensor (3, h, w), got {tuple(image.shape)}")
        precision = self.precision
        y_hr, conf = restore(self.model, image)  # float32 under every precision
        plan = plan_patches(y_hr, conf, self.model, generator)
        if self.refine == "none":
            x0 = plan.patches
        else:
            scores, idx = retrieve(self.model, self.rtm, plan.patches, precision=precision)
            x0 = refine(
                self.model, plan.patches, plan.groups, plan.noise, self.rtm.gather(idx), scores,
                schedule=self.schedule, precision=precision, progress=progress,
            )
        out = finish(self.model, x0, plan.grid, (image.shape[-2], image.shape[-1]), precision=precision)
        out = fix_colors(out, image, scale=self.model.config.scale, method=self.color_fix)
        return UpscaleResult(
            image=out,
            group_counts=count_groups(plan.groups),
            confidence=conf,
            groups=plan.groups,
            group_map=group_map(plan.groups, plan.grid),
            grid=plan.grid,
        )
