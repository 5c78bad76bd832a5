"""The single layout: one actor runs an image from start to end (read, decode, GRM, Patch-DiT, assemble,
write), and the pool has one such actor per CPU (or GPU).

It is the default on CPU and for small GPU jobs (``plan.choose_layout``): each actor process imports
torch and builds the model once, so a job of a few images starts one or two processes instead of five
(GRM, three Patch-DiT pools, assemble), and no patch rows travel between processes. The stages are the
pools layout's own (``pipeline/stages.py``), called one after the other on the same batch and sharing
one model and RTM (``pipeline/shared.py`` builds them once per process): same seeds, same math, same
outputs. Patch-DiT runs all groups in one loop (``stages.fused_refine``, equal to per-group sampling)
when their schedules share a grid, else group after group.
"""

from __future__ import annotations

from typing import Any

from pipeline.shared import SharedModel, SharedRTM

Batch = dict[str, Any]


class ImageStage:
    """Ray Data callable class: a batch of images (image id + meta rows) -> their manifest rows."""

    def __init__(self, *, weights: str | SharedModel, rtm: str | SharedRTM, device: str, seed: int,
                 mode: str | None, autoencoder: str | None, fused: bool, fmt: str, quality: int,
                 max_pixels: int, storage_options: dict[str, Any], score: bool,
                 crash_marker: str | None = None, precision: str | None = None, refine: str = "diffusion",
                 color_fix: str | None = None) -> None:
        from pipeline.stages import AssembleStage, DecodeStage, GRMStage, PatchDiTStage, ReadStage

        model = {"weights": weights, "device": device, "autoencoder": autoencoder, "precision": precision}
        dit = {"rtm": rtm, "mode": mode, "seed": seed, "crash_marker": crash_marker}
        groups = [None] if fused else [0, 1, 2]  # fused: all groups in one loop
        groups = [] if refine == "none" else groups  # refine none: no Patch-DiT at all
        options = {"refine": refine, "color_fix": color_fix}
        sampling = (mode or "checkpoint") + ("+fused" if fused else "")
        self.stages = [
            ReadStage(storage_options=storage_options),
            DecodeStage(max_pixels=max_pixels),
            GRMStage(**model, rtm=rtm, seed=seed, mode=mode, storage_options=storage_options, **options),
            *[PatchDiTStage(**model, **dit, group=g) for g in groups],
            AssembleStage(**model, fmt=fmt, quality=quality, storage_options=storage_options,
                          sampling=sampling, seed=seed, score=score, **options),
        ]

    def __call__(self, batch: Batch) -> Batch:
        for stage in self.stages:
            batch = stage(batch)
        return batch


def can_fuse(config: Any, mode: str | None) -> bool:
    """Whether the groups' schedules of ``config`` (a ``PatchScalerConfig``) with sampling ``mode`` share
    one step grid, so that ``fused_refine`` equals per-group sampling."""
    from dataclasses import replace

    from patchscaler.diffusion import NoiseSchedule
    from patchscaler.pgs import group_plan
    from patchscaler.sampling import shared_grid

    sampler = replace(config.sampler, mode=mode) if mode else config.sampler
    plan = group_plan(sampler)
    try:
        shared_grid(NoiseSchedule(config=sampler), [p.tau for p in plan], [p.steps for p in plan])
    except ValueError:
        return False
    return True
