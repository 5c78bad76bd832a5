import pytest
import torch
import torch.nn.functional as F

from patchscaler.autoencoder import LatentAutoencoder, upscale_input
from patchscaler.presets import PRESETS


@pytest.fixture(scope="module")
def autoencoder() -> LatentAutoencoder:
    torch.manual_seed(0)
    return LatentAutoencoder(config=PRESETS["tiny"].autoencoder)


def test_encode_decode_shapes(autoencoder: LatentAutoencoder) -> None:
    image = torch.rand(2, 3, 96, 160)
    with torch.no_grad():
        z = autoencoder.encode(image)
        out = autoencoder.decode(z)
    assert z.shape == (2, 4, 12, 20)
    assert out.shape == image.shape
    assert torch.isfinite(z).all() and out.min() >= 0 and out.max() <= 1


def test_encode_rejects_sizes_off_the_latent_grid(autoencoder: LatentAutoencoder) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        autoencoder.encode(torch.rand(1, 3, 100, 96))


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
    g = torch.Generator().manual_seed(1)
    z = F.interpolate(torch.randn(1, 4, 6, 8, generator=g), size=(64, 80), mode="bicubic") * 0.3
    with torch.no_grad():
        tiled = autoencoder.decode(z)
        assert autoencoder.vae.use_tiling, "a 512x640 decode must use tiling with tile_sample_size=256"
        autoencoder.vae.disable_tiling()
        whole = ((autoencoder.vae.decode(z / autoencoder.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
    assert tiled.shape == whole.shape == (1, 3, 512, 640)
    # Tile borders would show up as columns with a gradient far above the untiled decode's.
    assert _seam_score(tiled) <= 1.25 * _seam_score(whole)
    assert (tiled - whole).abs().mean() < 0.1
