"""Contract tests of the networks (GRM, texture classifier, texture encoder, Patch-DiT), per preset.

In the style of timm's tests/test_models.py: build each model from a preset, check output shapes,
finiteness and value ranges, that every parameter is reached by the gradient, and that each input the
contract names actually influences the output. adaLN-Zero gates and zero-initialised heads are
randomised first where a test needs every path of the network to be live.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from patchscaler.config import PatchScalerConfig
from patchscaler.grm import GRM, grm_loss
from patchscaler.layers import count_parameters, get_2d_sincos_pos_embed, timestep_embedding
from patchscaler.patch_dit import PatchDiT
from patchscaler.presets import PRESETS
from patchscaler.texture import TextureClassifier, TextureEncoder

PRESET_NAMES = ["tiny", pytest.param("small", marks=pytest.mark.slow)]


@pytest.fixture(params=PRESET_NAMES)
def config(request: pytest.FixtureRequest) -> PatchScalerConfig:
    return PRESETS[request.param]


def randomize_zero_params(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Give every all-zero parameter (adaLN-Zero gates, zero heads, biases) small random values."""
    with torch.no_grad():
        for p in module.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, std)
    return module


def assert_all_grads(module: nn.Module) -> None:
    missing = [n for n, p in module.named_parameters() if p.grad is None]
    zero = [n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() == 0]
    bad = [n for n, p in module.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
    assert not missing, f"no gradient: {missing}"
    assert not zero, f"zero gradient: {zero}"
    assert not bad, f"non-finite gradient: {bad}"


def dit_inputs(cfg: PatchScalerConfig, b: int = 2) -> dict[str, torch.Tensor]:
    s, k, c = cfg.patch_dit.input_size, cfg.texture_encoder.top_k, cfg.latent_channels
    return {
        "x_t": torch.randn(b, c, s, s),
        "t": torch.tensor([1.0, 1000.0, 437.0, 20.0][:b]),
        "y0": torch.randn(b, c, s, s),
        "values": torch.randn(b, k, c, s, s),
        "scores": torch.rand(b, k) * 2 - 1,
    }


# ---------------------------------------------------------------------------------------------- layers


def test_layers_embeddings() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 1.0, 999.0]), 65)
    assert emb.shape == (3, 65)
    assert torch.allclose(emb[0, :32], torch.ones(32)) and torch.all(emb[0, 32:] == 0)
    pos = get_2d_sincos_pos_embed(16, 4)
    assert pos.shape == (16, 16)
    assert len({tuple(row.tolist()) for row in pos}) == 16  # every token position is distinct
    # First half of the channels encodes the column, second half the row (MAE / DiT order).
    assert torch.equal(pos[1, :8], pos[5, :8]) and not torch.equal(pos[1, 8:], pos[5, 8:])
    assert count_parameters(nn.Linear(3, 5)) == 20


def test_tiny_preset_is_small() -> None:
    cfg = PRESETS["tiny"]
    total = sum(count_parameters(m) for m in (
        GRM(config=cfg.grm), TextureClassifier(config=cfg.classifier), PatchDiT(config=cfg.patch_dit),
        TextureEncoder(dit=cfg.patch_dit, config=cfg.texture_encoder),
    ))
    assert 1e5 < total < 5e6


# ------------------------------------------------------------------------------------------------- GRM


@pytest.mark.parametrize("size", [(20, 12), (9, 7), (16, 16)])
def test_grm_shapes_and_range(config: PatchScalerConfig, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    grm = GRM(config=config.grm).eval()
    c = config.latent_channels
    y_lr = torch.randn(2, c, *size)
    with torch.no_grad():
        y_hr, conf = grm(y_lr)
    assert y_hr.shape == (2, c, *size) and conf.shape == (2, 1, *size)
    assert y_hr.isfinite().all() and conf.isfinite().all()
    assert (conf > 0).all() and (conf <= 1).all()
    # The y head starts at zero: an untrained GRM passes y_LR through unchanged.
    assert torch.equal(y_hr, y_lr)


def test_grm_batch_independent() -> None:
    torch.manual_seed(0)
    grm = randomize_zero_params(GRM(config=PRESETS["tiny"].grm)).eval()
    y_lr = torch.randn(3, PRESETS["tiny"].latent_channels, 20, 12)
    with torch.no_grad():
        y_all, c_all = grm(y_lr)
        y_one, c_one = grm(y_lr[1:2])
    assert not torch.allclose(y_all, y_lr)
    torch.testing.assert_close(y_all[1:2], y_one, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c_all[1:2], c_one, rtol=1e-4, atol=1e-5)


def test_grm_confidence_limits() -> None:
    grm = GRM(config=PRESETS["tiny"].grm).eval()
    y_lr = torch.randn(1, PRESETS["tiny"].latent_channels, 16, 16)
    with torch.no_grad():
        nn.init.zeros_(grm.head_conf.weight)
        nn.init.constant_(grm.head_conf.bias, -40.0)  # z -> -inf: C -> 1
        assert torch.all(grm(y_lr)[1] == 1.0)
        nn.init.constant_(grm.head_conf.bias, 40.0)  # z -> +inf: C -> 0, but stays positive
        conf = grm(y_lr)[1]
    assert (conf > 0).all() and (conf < 1e-16).all()
    loss = grm_loss(y_lr, conf, y_lr, lam=1.0, eta=0.05)
    assert loss.isfinite() and loss > 0


def test_grm_gradients_reach_every_parameter(config: PatchScalerConfig) -> None:
    torch.manual_seed(0)
    grm = randomize_zero_params(GRM(config=config.grm))
    c = config.latent_channels
    y_lr, x_hr = torch.randn(2, c, 20, 12), torch.randn(2, c, 20, 12)
    y_hr, conf = grm(y_lr)
    grm_loss(y_hr, conf, x_hr, lam=config.grm.loss_lambda, eta=config.grm.loss_eta).backward()
    assert_all_grads(grm)


def test_grm_loss_value() -> None:
    torch.manual_seed(0)
    y_hr, x_hr = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    conf = torch.rand(2, 1, 5, 6) * 0.9 + 0.05
    lam, eta = 0.3, 0.07
    err = ((y_hr - x_hr) ** 2).sum(1, keepdim=True)
    expected = (y_hr - x_hr).abs().mean() + lam * (conf * err - eta * conf.log()).mean()
    torch.testing.assert_close(grm_loss(y_hr, conf, x_hr, lam=lam, eta=eta), expected)


@pytest.mark.parametrize("err", [0.01, 0.05, 0.2, 1.0, 5.0])
def test_grm_loss_minimised_at_optimal_confidence(err: float) -> None:
    """For a fixed per-pixel squared error e, the loss over C in (0, 1] is minimal at min(1, eta / e)
    and decreases monotonically toward it from either side."""
    eta = 0.05
    x_hr = torch.zeros(1, 4, 2, 2)
    y_hr = torch.full((1, 4, 2, 2), (err / 4) ** 0.5)  # sum over the 4 channels of the square = err
    grid = torch.linspace(0.001, 1.0, 1000)
    losses = torch.stack([grm_loss(y_hr, torch.full((1, 1, 2, 2), float(c)), x_hr, lam=0.5, eta=eta)
                          for c in grid])
    best = int(losses.argmin())
    optimum = min(1.0, eta / err)
    assert abs(float(grid[best]) - optimum) <= 1.5e-3
    assert (losses[: best + 1].diff() < 0).all() and (losses[best:].diff() > 0).all()


# ------------------------------------------------------------------------------------------ classifier


def test_classifier_shapes_and_gradients(config: PatchScalerConfig) -> None:
    torch.manual_seed(0)
    cls_cfg = config.classifier
    clf = TextureClassifier(config=cls_cfg)
    x = torch.randn(5, config.latent_channels, 16, 16)
    feats = clf.features(x)
    logits = clf(x)
    assert feats.shape == (5, cls_cfg.feature_dim) and logits.shape == (5, cls_cfg.num_classes)
    assert feats.isfinite().all() and logits.isfinite().all()
    torch.testing.assert_close(logits, clf.head(feats))
    assert not torch.allclose(feats[0], feats[1])
    F.cross_entropy(logits, torch.arange(5)).backward()
    assert_all_grads(clf)


# ------------------------------------------------------------------------- texture encoder, Patch-DiT


def test_texture_encoder_shapes_and_conditioning(config: PatchScalerConfig) -> None:
    torch.manual_seed(0)
    dit_cfg, enc_cfg = config.patch_dit, config.texture_encoder
    enc = TextureEncoder(dit=dit_cfg, config=enc_cfg).eval()
    assert list(inspect.signature(enc.forward).parameters) == ["values", "scores"]  # no time input
    inp = dit_inputs(config, b=3)
    with torch.no_grad():
        prompt = enc(inp["values"], inp["scores"])
        assert prompt.shape == (3, enc_cfg.top_k * dit_cfg.num_tokens, dit_cfg.hidden_size)
        assert prompt.isfinite().all()
        randomize_zero_params(enc)
        prompt = enc(inp["values"], inp["scores"])
        scores2 = inp["scores"].clone()
        scores2[0, 1] += 0.3
        prompt2 = enc(inp["values"], scores2)
        values2 = inp["values"].clone()
        values2[0] = torch.randn_like(values2[0])
        prompt3 = enc(values2, inp["scores"])
        fewer = enc(inp["values"][:, :2], inp["scores"][:, :2])
    assert not torch.allclose(prompt[0], prompt2[0], atol=1e-5)  # scores matter ...
    torch.testing.assert_close(prompt[1:], prompt2[1:])  # ... for their own patch only
    assert not torch.allclose(prompt[0], prompt3[0], atol=1e-5)
    torch.testing.assert_close(prompt[1:], prompt3[1:], rtol=1e-4, atol=1e-5)
    assert fewer.shape == (3, 2 * dit_cfg.num_tokens, dit_cfg.hidden_size)
    with pytest.raises(ValueError):
        c = config.latent_channels
        enc(torch.randn(1, enc_cfg.top_k + 1, c, 16, 16), torch.rand(1, enc_cfg.top_k + 1))


def test_patch_dit_shapes_and_init(config: PatchScalerConfig) -> None:
    torch.manual_seed(0)
    dit = PatchDiT(config=config.patch_dit).eval()
    enc = TextureEncoder(dit=config.patch_dit, config=config.texture_encoder).eval()
    inp = dit_inputs(config)
    with torch.no_grad():
        eps = dit(inp["x_t"], inp["t"], inp["y0"], enc(inp["values"], inp["scores"]))
    assert eps.shape == inp["x_t"].shape
    assert torch.all(eps == 0)  # zero final layer, as DiT: the untrained model predicts eps = 0


def test_patch_dit_depends_on_every_input() -> None:
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    dit = randomize_zero_params(PatchDiT(config=cfg.patch_dit)).eval()
    s = cfg.patch_dit.num_tokens * cfg.texture_encoder.top_k
    inp = dit_inputs(cfg, b=3)
    prompt = torch.randn(3, s, cfg.patch_dit.hidden_size)
    with torch.no_grad():
        eps = dit(inp["x_t"], inp["t"], inp["y0"], prompt)
        assert eps.isfinite().all() and eps.abs().sum() > 0
        changed = {
            "x_t": dit(torch.randn_like(inp["x_t"]), inp["t"], inp["y0"], prompt),
            "t": dit(inp["x_t"], inp["t"] + 100.0, inp["y0"], prompt),
            "y0": dit(inp["x_t"], inp["t"], torch.randn_like(inp["y0"]), prompt),
            "prompt": dit(inp["x_t"], inp["t"], inp["y0"], torch.randn_like(prompt)),
        }
        single = dit(inp["x_t"][2:], inp["t"][2:], inp["y0"][2:], prompt[2:])
        shorter = dit(inp["x_t"], inp["t"], inp["y0"], prompt[:, :7])  # any prompt length S
    for name, out in changed.items():
        assert not torch.allclose(out, eps, atol=1e-6), f"output ignores {name}"
    torch.testing.assert_close(single, eps[2:], rtol=1e-4, atol=1e-5)
    assert shorter.shape == eps.shape


def test_denoiser_gradients_reach_every_parameter(config: PatchScalerConfig) -> None:
    """Patch-DiT + texture encoder trained together (Eq. 9): the eps loss reaches every parameter of both."""
    torch.manual_seed(0)
    dit = randomize_zero_params(PatchDiT(config=config.patch_dit))
    enc = randomize_zero_params(TextureEncoder(dit=config.patch_dit, config=config.texture_encoder))
    inp = dit_inputs(config)
    eps_pred = dit(inp["x_t"], inp["t"], inp["y0"], enc(inp["values"], inp["scores"]))
    F.mse_loss(eps_pred, torch.randn_like(eps_pred)).backward()
    assert_all_grads(dit)
    assert_all_grads(enc)
