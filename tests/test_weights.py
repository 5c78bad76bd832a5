import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from patchscaler.model import PatchScalerModel
from patchscaler.presets import PRESETS
from patchscaler.weights import load_checkpoint, load_rtm, save_checkpoint, save_rtm


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = make_tiny_model(seed=3)
    version = save_checkpoint(model, str(tmp_path / "ckpt"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_checkpoint(str(tmp_path / "ckpt"))
    assert loaded.config == model.config
    assert loaded.version == version
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_mismatched_checkpoint_names_the_keys(tmp_path: Path) -> None:
    save_checkpoint(make_tiny_model(), str(tmp_path / "ckpt"))
    # Claim a wider Patch-DiT in the config than the tensors hold.
    cfg_path = tmp_path / "ckpt" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["patch_dit"]["hidden_size"] = 128
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"shape mismatch \(\d+\): patch_dit\."):
        load_checkpoint(str(tmp_path / "ckpt"))


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_checkpoint(make_tiny_model(), str(tmp_path / "ckpt"))
    weights = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(weights)
    dropped = next(k for k in state if k.startswith("grm."))
    state.pop(dropped)
    state["grm.extra.weight"] = torch.zeros(2)
    save_file(state, weights)
    with pytest.raises(ValueError) as err:
        load_checkpoint(str(tmp_path / "ckpt"))
    assert f"missing (1): {dropped}" in str(err.value)
    assert "unexpected (1): grm.extra.weight" in str(err.value)


def test_absent_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_checkpoint(str(tmp_path / "nowhere"))


def test_separate_autoencoder_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = make_tiny_model(seed=1)
    save_checkpoint(model, str(tmp_path / "ckpt"))
    other = PatchScalerModel(config=PRESETS["tiny"])
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in other.autoencoder.vae.state_dict().items()}, vae_file)
    loaded = load_checkpoint(str(tmp_path / "ckpt"), autoencoder=str(vae_file))
    key = "encoder.conv_in.weight"
    assert torch.equal(loaded.autoencoder.vae.state_dict()[key], other.autoencoder.vae.state_dict()[key])
    assert torch.equal(loaded.grm.state_dict()["conv_in.weight"], model.grm.state_dict()["conv_in.weight"])


def test_rtm_round_trip(tmp_path: Path) -> None:
    keys, values = torch.randn(10, 8), torch.randn(10, 4, 16, 16)
    version = save_rtm(str(tmp_path / "rtm"), keys=keys, values=values, manifest={"entries": 10})
    rtm, manifest = load_rtm(str(tmp_path / "rtm"))
    assert manifest == {"entries": 10, "version": version}
    torch.testing.assert_close(rtm.values, values)
    torch.testing.assert_close(rtm.keys, torch.nn.functional.normalize(keys, dim=1))
