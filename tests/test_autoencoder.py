import dataclasses

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC, AutoencoderKL

from patchscaler.autoencoder import LatentAutoencoder, build_vae, upscale_input
from patchscaler.config import AutoencoderConfig
from patchscaler.presets import PRESETS

# Both kinds at test size: the tiny preset's AutoencoderDC (f=4, 8 channels) and a small AutoencoderKL
# in the SD-VAE layout (f=8, 4 channels) like the small / paper presets'.
KL_SMALL = AutoencoderConfig(kind="kl", block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                             norm_num_groups=8, scaling_factor=1.0, tile_sample_size=256)
CONFIGS = {"dc-tiny": PRESETS["tiny"].autoencoder, "kl-small": KL_SMALL}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def autoencoder(request) -> LatentAutoencoder:
    torch.manual_seed(0)
    return LatentAutoencoder(config=CONFIGS[request.param])


def test_kinds_build_their_diffusers_class() -> None:
    assert isinstance(build_vae(PRESETS["tiny"].autoencoder), AutoencoderDC)
    assert isinstance(build_vae(PRESETS["paper"].autoencoder), AutoencoderKL)
    with pytest.raises(ValueError, match="autoencoder kind"):
        build_vae(dataclasses.replace(KL_SMALL, kind="vq"))


def test_encode_decode_shapes(autoencoder: LatentAutoencoder) -> None:
    f, c = autoencoder.factor, autoencoder.config.latent_channels
    image = torch.rand(2, 3, 96, 160)
    with torch.no_grad():
        z = autoencoder.encode(image)
        out = autoencoder.decode(z)
    assert z.shape == (2, c, 96 // f, 160 // f)
    assert out.shape == image.shape
    assert torch.isfinite(z).all() and out.min() >= 0 and out.max() <= 1


def test_encode_rejects_sizes_off_the_latent_grid(autoencoder: LatentAutoencoder) -> None:
    with pytest.raises(ValueError, match=f"multiple of {autoencoder.factor}"):
        autoencoder.encode(torch.rand(1, 3, 96 + autoencoder.factor // 2, 96))


def test_upscale_input_is_bicubic_x_scale() -> None:
    lr = torch.rand(1, 3, 24, 40)
    hr = upscale_input(lr, 4)
    assert hr.shape == (1, 3, 96, 160)
    expected = F.interpolate(lr, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    torch.testing.assert_close(hr, expected)


def _seam_score(image: torch.Tensor) -> float:
    """Largest mean |horizontal gradient| of an interior column, relative to the median column."""
    grad = (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1, 2))[8:-8]  # (W-17,)
    return float(grad.max() / grad.median())


def test_tiled_decode_has_no_seams(autoencoder: LatentAutoencoder) -> None:
    # A smooth latent large enough (640 px wide) for diffusers' tiling (tiles of 256 px) to kick in.
    f, c = autoencoder.factor, autoencoder.config.latent_channels
    g = torch.Generator().manual_seed(1)
    z = F.interpolate(torch.randn(1, c, 6, 8, generator=g), size=(512 // f, 640 // f), mode="bicubic") * 0.3
    with torch.no_grad():
        tiled = autoencoder.decode(z)
        assert autoencoder.vae.use_tiling, "a 512x640 decode must use tiling with tile_sample_size=256"
        autoencoder.vae.disable_tiling()
        whole = ((autoencoder.vae.decode(z / autoencoder.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    assert tiled.shape == whole.shape == (1, 3, 512, 640)
    # Tile borders would show up as columns with a gradient far above the untiled decode's.
    assert _seam_score(tiled) <= 1.25 * _seam_score(whole)
    assert (tiled - whole).abs().mean() < 0.1
