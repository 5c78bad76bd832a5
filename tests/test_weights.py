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


# --- a pretrained diffusers autoencoder folder (init-weights --autoencoder, the trainers' --autoencoder) ---

OLD_ATTENTION_NAMES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


@pytest.fixture(scope="module")
def vae_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small AutoencoderKL (the tiny preset's latent size: f = 4, 8 channels; scaling_factor 0.5) saved
    as diffusers does today, with the older attention key names, and as a .bin."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(5)
    vae = AutoencoderKL(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=8,
                        norm_num_groups=8, scaling_factor=0.5)
    with torch.no_grad():  # diffusers zero-initialises nothing here, but make the attention matter anyway
        for p in vae.parameters():
            p.add_(0.01 * torch.randn_like(p))
    vae.save_pretrained(root / "new")
    vae.save_pretrained(root / "bin", safe_serialization=False)
    state = load_file(root / "new" / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for key, value in state.items():
        for new, old in OLD_ATTENTION_NAMES.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[key] = value
    assert any(".attentions.0.proj_attn." in k for k in renamed) and not any(".to_q." in k for k in renamed)
    (root / "old").mkdir()
    save_file(renamed, root / "old" / "diffusion_pytorch_model.safetensors")
    (root / "old" / "config.json").write_text((root / "new" / "config.json").read_text())
    return {"new": root / "new", "old": root / "old", "bin": root / "bin"}


def test_pretrained_autoencoder_in_both_key_layouts(vae_folders: dict[str, Path]) -> None:
    from patchscaler.autoencoder import LatentAutoencoder
    from patchscaler.weights import load_pretrained_autoencoder

    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs = []
    for layout in ("new", "old", "bin"):
        vae, config = load_pretrained_autoencoder(str(vae_folders[layout]), PRESETS["tiny"].autoencoder)
        assert config.scaling_factor == 0.5 and config.kind == "kl" and config.latent_channels == 8
        assert config.block_out_channels == (16, 32, 32) and config.pretrained == str(vae_folders[layout])
        ae = LatentAutoencoder(config=config, vae=vae)
        with torch.no_grad():
            latent = ae.encode(x)
            outputs.append((latent, ae.decode(latent)))
    for latent, image in outputs[1:]:
        torch.testing.assert_close(latent, outputs[0][0], rtol=0, atol=0)
        torch.testing.assert_close(image, outputs[0][1], rtol=0, atol=0)


def test_pretrained_autoencoder_errors(tmp_path: Path, vae_folders: dict[str, Path]) -> None:
    from patchscaler.weights import load_pretrained_autoencoder, with_autoencoder

    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_pretrained_autoencoder(str(tmp_path), PRESETS["tiny"].autoencoder)
    _, ae_config = load_pretrained_autoencoder(str(vae_folders["new"]), PRESETS["small"].autoencoder)
    with pytest.raises(ValueError, match="8 latent channels, the model 4"):  # small: SD-VAE's 4 channels
        with_autoencoder(PRESETS["small"], ae_config, source="x")
    # a checkpoint loaded with a separate autoencoder folder takes its config (upscale --autoencoder)
    save_checkpoint(make_tiny_model(seed=2), str(tmp_path / "ckpt"))
    model = load_checkpoint(str(tmp_path / "ckpt"), autoencoder=str(vae_folders["new"]))
    assert model.config.autoencoder.scaling_factor == 0.5 and model.config.autoencoder.kind == "kl"


def test_init_weights_writes_the_pretrained_autoencoder(tmp_path: Path, vae_folders: dict[str, Path]) -> None:
    from jobs.cli import main
    from patchscaler.weights import load_config, load_pretrained_autoencoder

    out = tmp_path / "init"
    assert main(["init-weights", "--preset", "tiny", "--out", str(out),
                 "--autoencoder", str(vae_folders["old"])]) == 0
    config = load_config(str(out))
    assert config.autoencoder.scaling_factor == 0.5
    assert config.autoencoder.pretrained == str(vae_folders["old"])
    model = load_checkpoint(str(out))
    vae, _ = load_pretrained_autoencoder(str(vae_folders["new"]), PRESETS["tiny"].autoencoder)
    for key, value in vae.state_dict().items():
        assert torch.equal(model.autoencoder.vae.state_dict()[key], value), key
    # train-autoencoder refuses to overwrite it (exit code 2 before Ray starts)
    assert main(["train-autoencoder", "--init", str(out), "--out", str(tmp_path / "ae"),
                 "--data", str(tmp_path)]) == 2
    # a trainer's --autoencoder swaps it into a checkpoint that has the model's own
    from trainer.tasks import GRMTask, TrainConfig

    plain = tmp_path / "plain"
    save_checkpoint(PatchScalerModel(config=PRESETS["tiny"]), str(plain))
    cfg = TrainConfig(task="grm", init=str(plain), out=str(tmp_path / "grm"), data=(str(tmp_path),),
                      autoencoder=str(vae_folders["new"]))
    task = GRMTask(cfg=cfg, model=load_checkpoint(str(plain)), device=torch.device("cpu"))
    assert task.model.config.autoencoder.scaling_factor == 0.5
    assert torch.equal(task.model.autoencoder.vae.state_dict()["encoder.conv_in.weight"],
                       vae.state_dict()["encoder.conv_in.weight"])
