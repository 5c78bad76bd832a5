"""bf16 inference (autocast) against fp32 on the tiny preset, CPU: the output is >= 35 dB PSNR from the
fp32 output and the groups (decided on the float32 confidence map) are unchanged, with the bundled
demo weights and with random weights, thresholds set so that all three groups occur (on a crop of each
sample image, wide enough that the x4 output is decoded in tiles); the precision is
a value of the upscaler, the stages and the jobs, defaulting to bf16 on CUDA and fp32 elsewhere."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import pytest
import torch

from jobs.defaults import DEMO_RTM, DEMO_WEIGHTS, SAMPLES
from patchscaler.precision import autocast, default_precision, resolve_precision
from patchscaler.upscaler import PatchScaler, plan_patches, restore
from trainer.data import list_images, read_image

MIN_PSNR_DB = 35.0
# A (height, width) crop of each sample image. Its x4 output is 288 px wide: above the autoencoder's
# tile size (256), so the bf16 decode runs diffusers' tiled path as it does on a full-size image; a
# crop has ~4.5x fewer latent patches than a whole sample, and the Patch-DiT work scales with them.
CROP = (40, 72)


def center_crop(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The centre ``size`` (h, w) of a (3, H, W) image."""
    h, w = size
    top, left = (image.shape[-2] - h) // 2, (image.shape[-1] - w) // 2
    assert top >= 0 and left >= 0, f"image {tuple(image.shape)} is smaller than the crop {size}"
    return image[..., top:top + h, left:left + w].contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return 10 * math.log10(1.0 / mse) if mse > 0 else math.inf


def test_precision_values() -> None:
    assert default_precision("cuda") == default_precision("cuda:1") == "bf16"
    assert default_precision("cpu") == "fp32"
    assert resolve_precision(None, "cuda") == resolve_precision("auto", "cuda:0") == "bf16"
    assert resolve_precision(None, "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="precision"):
        autocast("cpu", "half")
    lin = torch.nn.Linear(4, 4)
    with autocast("cpu", "bf16"):
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast("cpu", "fp32"):
        assert lin(torch.randn(2, 4)).dtype == torch.float32


def test_confidence_head_stays_float32_under_autocast(tiny_model) -> None:
    c = tiny_model.config.latent_channels
    y_lr = torch.randn(1, c, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, conf32 = tiny_model.grm(y_lr)
        with autocast("cpu", "bf16"):
            _, conf = tiny_model.grm(y_lr)
    assert not torch.equal(conf, conf32)  # the trunk did run in bf16 ...
    assert conf.dtype == torch.float32  # ... and the confidence head opted out


def _models_with_three_groups(images: list[torch.Tensor]) -> dict:
    """The demo model and a random one, each with gamma1/gamma2 at the tertiles of its patch means on
    ``images`` (the default thresholds put every patch of these images in the hard group)."""
    from conftest import make_tiny_model, make_tiny_rtm

    from patchscaler.weights import load_checkpoint, load_rtm

    random_model = make_tiny_model()
    models = {"demo": (load_checkpoint(str(DEMO_WEIGHTS)), load_rtm(str(DEMO_RTM))[0]),
              "random": (random_model, make_tiny_rtm(random_model))}
    for model, _ in models.values():
        plans = [plan_patches(*restore(model, im), model, torch.Generator().manual_seed(0)) for im in images]
        means = torch.cat([plan.mean_conf for plan in plans])
        gamma2, gamma1 = torch.quantile(means, torch.tensor([0.34, 0.67])).tolist()
        sampler = replace(model.config.sampler, gamma1=gamma1, gamma2=gamma2)
        model.config = model.config.replace(sampler=sampler)
    return models


@pytest.mark.timeout(600)
def test_bf16_output_is_within_35db_of_fp32_and_groups_are_unchanged() -> None:
    images = [center_crop(read_image(p), CROP) for p in list_images(str(SAMPLES))]
    assert len(images) >= 3
    for name, (model, rtm) in _models_with_three_groups(images).items():
        assert model.config.scale * CROP[1] > model.config.autoencoder.tile_sample_size  # a tiled decode
        fp32 = PatchScaler(model=model, rtm=rtm, precision="fp32")
        bf16 = PatchScaler(model=model, rtm=rtm, precision="bf16")
        seen = torch.zeros(3, dtype=torch.long)
        for i, image in enumerate(images):
            ref = fp32.upscale(image, generator=torch.Generator().manual_seed(0))
            low = bf16.upscale(image, generator=torch.Generator().manual_seed(0))
            db = psnr(ref.image, low.image)
            assert low.image.dtype == torch.float32
            assert db < 100.0, f"{name} image {i}: bf16 changed nothing, was it bf16?"
            assert db >= MIN_PSNR_DB, f"{name} image {i}: bf16 is {db:.1f} dB from fp32"
            # the confidence map is computed in float32 under both precisions: same map, same groups
            assert torch.equal(low.confidence, ref.confidence), f"{name} image {i}: confidence changed"
            assert torch.equal(low.groups, ref.groups), f"{name} image {i}: groups changed"
            seen += torch.bincount(ref.groups, minlength=3)
        assert (seen > 0).all(), f"{name}: not every group occurred ({seen.tolist()})"


def test_precision_flags_reach_the_upscaler_and_the_pipeline() -> None:
    from jobs import upscale, upscale_dataset

    p = argparse.ArgumentParser()
    upscale.add_arguments(p)
    assert p.parse_args(["in.png", "out.png"]).precision == "auto"
    assert p.parse_args(["in.png", "out.png", "--precision", "bf16"]).precision == "bf16"
    with pytest.raises(SystemExit):
        p.parse_args(["in.png", "out.png", "--precision", "fp16"])
    p = argparse.ArgumentParser()
    upscale_dataset.add_arguments(p)
    for flag, expected in (("auto", None), ("bf16", "bf16"), ("fp32", "fp32")):
        args = p.parse_args(["--input", "i", "--output", "o", "--precision", flag])
        cfg = upscale_dataset.pipeline_config(args, input="i", output="o", device="cpu", options={})
        assert cfg.precision == expected


def test_upscale_job_runs_in_bf16(tmp_path, capsys) -> None:
    import json

    from jobs.cli import main

    src = list_images(str(SAMPLES))[1]
    code = main(["upscale", src, str(tmp_path / "out.png"), "--device", "cpu", "--precision", "bf16"])
    assert code == 0 and (tmp_path / "out.png").exists()
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["status"] == "ok" and line["precision"] == "bf16"
