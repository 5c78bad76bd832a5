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
    for figure in ("heldout.png", "heldout_mild.png"):
        assert (ASSETS / "demo" / figure).stat().st_size < 3e6


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
    """The card's held-out figures and gate verdicts, on both held-out sets (heavy, mild), are what the
    shipped weights give today: a failing gate must be reported as failing, with its measured value."""
    from trainer.heldout import METHODS, measure_heldout

    claim = _card_claim()
    fresh = measure_heldout(str(DEMO_WEIGHTS), str(DEMO_RTM), heldout=str(ASSETS / "heldout"),
                            samples=str(SAMPLES), seed=claim["seed"])
    assert fresh["color_fix"] == claim["color_fix"]
    assert sorted(fresh["sets"]) == sorted(claim["sets"]) == ["heavy", "mild"]
    card = CARD.read_text()
    for kind, got_set in fresh["sets"].items():
        want_set = claim["sets"][kind]
        assert sorted(got_set["images"]) == sorted(want_set["images"]) and len(got_set["images"]) >= 7
        for method in METHODS:
            for key, tol in (("psnr", 0.05), ("ssim", 0.002), ("rgb_psnr", 0.05), ("sharpness", 0.01),
                             ("seam_ratio", 0.01)):
                got, want = got_set["mean"][method][key], want_set["mean"][method][key]
                assert got == pytest.approx(want, abs=tol), (kind, method, key)
        for name, images in got_set["images"].items():  # the per-image colour shifts the gate reads
            want = want_set["images"][name]["model"]["color_shift"]
            assert images["model"]["color_shift"] == pytest.approx(want, abs=0.1), (kind, name)
        assert got_set["groups"] == want_set["groups"], kind
        verdicts = {k: g["pass"] for k, g in got_set["gates"].items()}
        assert verdicts == {k: g["pass"] for k, g in want_set["gates"].items()}, kind
        for method in ("model", "bicubic", "grm", "fast"):  # the tables show the same numbers as the JSON
            assert f"{want_set['mean'][method]['psnr']:.2f}" in card, (kind, method)
        for name, gate in want_set["gates"].items():
            assert ("pass" if gate["pass"] else "FAIL") in card, (kind, name)
