"""Colour correction (patchscaler/colorfix.py): a colour cast injected into the model's output is removed
by the upscaler's fix; the default fix leaves an image without a cast (nearly) as it is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jobs.defaults import ASSETS, DEMO_RTM, DEMO_WEIGHTS, SAMPLES
from patchscaler.colorfix import COLOR_FIXES, DEFAULT_COLOR_FIX, color_fix, wavelet_decomposition
from patchscaler.upscaler import PatchScaler, fix_colors
from trainer.data import list_images, read_image
from trainer.heldout import signed_shift
from trainer.heldout_sets import mild_lr

# the default may change an image without colour cast by at most this much (1/255): the mean absolute
# change over all pixels and the change of a channel's mean
UNSHIFTED_MEAN_ABS, UNSHIFTED_CHANNEL_MEAN = 1.5, 1.0


def test_wavelet_bands_sum_to_the_image_and_a_constant_is_all_low() -> None:
    image = torch.rand(3, 37, 50, generator=torch.Generator().manual_seed(0))
    high, low = wavelet_decomposition(image)
    assert torch.allclose(high + low, image, atol=1e-6)
    high_c, low_c = wavelet_decomposition(torch.full((3, 9, 5), 0.3))  # smaller than the widest dilation
    assert high_c.abs().max() < 1e-6 and torch.allclose(low_c, torch.full((3, 9, 5), 0.3))
    with pytest.raises(ValueError, match="unknown colour fix"):
        color_fix(image, image, "histogram")
    with pytest.raises(ValueError, match="shape"):
        color_fix(image, image[:, :10], "wavelet")


@pytest.mark.parametrize("method", ["wavelet", "adain"])
def test_a_colour_cast_injected_into_the_model_output_is_removed(method: str) -> None:
    """The demo model's decoder is made to add a constant cast (+12, -8, +6)/255; with the fix, the
    upscaler's output has the channel means it has without the cast (within 0.5/255), without the fix it
    keeps the cast."""
    from patchscaler.weights import load_checkpoint, load_rtm

    model = load_checkpoint(str(DEMO_WEIGHTS))
    rtm, _ = load_rtm(str(DEMO_RTM))
    lr = read_image(list_images(str(SAMPLES))[0])[:, :40, :48]  # (3, 40, 48)
    cast = torch.tensor([12.0, -8.0, 6.0]).view(1, 3, 1, 1) / 255

    def upscale(fix: str) -> torch.Tensor:
        upscaler = PatchScaler(model=model, rtm=rtm, refine="none", color_fix=fix)
        return upscaler.upscale(lr, generator=torch.Generator().manual_seed(0)).image

    clean = {fix: upscale(fix) for fix in (method, "none")}
    decode = model.autoencoder.decode
    model.autoencoder.decode = lambda z: decode(z) + cast  # the injected cast
    try:
        cast_out = {fix: upscale(fix) for fix in (method, "none")}
    finally:
        model.autoencoder.decode = decode
    kept = signed_shift(cast_out["none"], clean["none"])
    assert kept == pytest.approx([12.0, -8.0, 6.0], abs=0.5)  # the injection works: the cast is there
    removed = signed_shift(cast_out[method], clean[method])
    assert max(abs(v) for v in removed) <= 0.5, removed


def test_the_default_leaves_an_image_without_cast_nearly_unchanged() -> None:
    """The HR photographs as if they were the model's output (no cast), fixed against their mildly
    degraded LR (blur, noise, JPEG): the default changes them by at most ``UNSHIFTED_MEAN_ABS``/255 on
    average and moves no channel's mean by more than ``UNSHIFTED_CHANNEL_MEAN``/255."""
    assert DEFAULT_COLOR_FIX in COLOR_FIXES
    for path in list_images(str(ASSETS / "heldout")):
        hr = read_image(path)
        for lr in (mild_lr(hr, name=path), F.interpolate(hr[None], scale_factor=0.25, mode="bicubic",
                                                         antialias=True)[0].clamp(0, 1)):
            out = fix_colors(hr, lr, scale=4, method=DEFAULT_COLOR_FIX)
            assert float((out - hr).abs().mean()) * 255 <= UNSHIFTED_MEAN_ABS, path
            assert max(abs(v) for v in signed_shift(out, hr)) <= UNSHIFTED_CHANNEL_MEAN, path
