"""The bundled demo weights and RTM: they load, upscale a bundled image ×4, and the model card's
held-out numbers match a fresh measurement."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from jobs.defaults import ASSETS, DEMO_RTM, DEMO_WEIGHTS, SAMPLES
from trainer.data import list_images, read_image

CARD = ASSETS / "demo" / "MODEL_CARD.md"


def _card_claim() -> dict:
    text = CARD.read_text()
    match = re.search(r"<!-- heldout-metrics:begin -->\s*```json\n(.*?)```\s*<!-- heldout-metrics:end -->",
                      text, re.S)
    assert match, "the model card has no heldout-metrics block"
    return json.loads(match.group(1))


def test_demo_assets_are_small_and_licensed() -> None:
    size = sum(f.stat().st_size for d in (DEMO_WEIGHTS, DEMO_RTM) for f in Path(d).iterdir())
    assert size < 30e6
    licences = (ASSETS / "LICENSES.md").read_text()
    for folder in ("train", "heldout"):
        for path in (ASSETS / folder).iterdir():
            assert f"{folder}/{path.name}" in licences, path
    assert "demonstration model, not the paper's quality" in CARD.read_text()
    assert (ASSETS / "demo" / "heldout.png").stat().st_size < 3e6


def test_demo_weights_upscale_a_bundled_image() -> None:
    from patchscaler.upscaler import PatchScaler
    from patchscaler.weights import load_checkpoint, load_rtm

    model = load_checkpoint(str(DEMO_WEIGHTS))
    rtm, manifest = load_rtm(str(DEMO_RTM))
    assert model.version == _card_claim()["model_version"]
    v = model.config.sampler.patch_size
    assert rtm.values.shape[1:] == (model.config.latent_channels, v, v)
    assert len(rtm) == manifest["counts"]["entries"]
    lr = read_image(list_images(str(SAMPLES))[0])
    result = PatchScaler(model=model, rtm=rtm).upscale(lr, generator=torch.Generator().manual_seed(0))
    assert result.image.shape == (3, 4 * lr.shape[1], 4 * lr.shape[2])
    assert torch.isfinite(result.image).all() and float(result.image.std()) > 0.02  # not a flat image


@pytest.mark.slow
def test_model_card_matches_a_fresh_measurement() -> None:
    """The card's held-out figures and gate verdicts are what the shipped weights give today."""
    from trainer.heldout import measure_heldout

    claim = _card_claim()
    fresh = measure_heldout(str(DEMO_WEIGHTS), str(DEMO_RTM), heldout=str(ASSETS / "heldout"),
                            samples=str(SAMPLES), seed=claim["seed"])
    assert sorted(fresh["images"]) == sorted(claim["images"]) and len(fresh["images"]) >= 7
    for method in ("bicubic", "autoencoder", "grm", "model"):
        for key, tol in (("psnr", 0.05), ("ssim", 0.002), ("rgb_psnr", 0.05), ("sharpness", 0.01)):
            got, want = fresh["mean"][method][key], claim["mean"][method][key]
            assert got == pytest.approx(want, abs=tol), (method, key)
    assert fresh["groups"] == claim["groups"]
    verdicts = {k: g["pass"] for k, g in fresh["gates"].items()}
    assert verdicts == {k: g["pass"] for k, g in claim["gates"].items()}
    card = CARD.read_text()
    for method in ("model", "bicubic", "grm"):  # the tables show the same numbers as the JSON block
        assert f"{claim['mean'][method]['psnr']:.2f}" in card
    for name, gate in claim["gates"].items():
        assert ("pass" if gate["pass"] else "FAIL") in card, name
