"""Pure parts of the pipeline, without Ray: decoding/encoding, paths, atomic writes, pool sizing, the
manifest, and the fused sampler's equality with per-group sampling."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import schema as S
from pipeline.build import dit_pool_sizes
from pipeline.decode import (
    ImageTooLarge,
    UnreadableImage,
    decode_image,
    encode_image,
    encode_output,
    to_float,
    to_grey,
    upscale_alpha,
)
from pipeline.io import plan_outputs, remove_partials, write_bytes_atomic
from pipeline.runner import consolidate, finished_ids, write_part

ORIENTATION = 0x0112


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _srgb_icc() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def test_decode_modes() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    a = decode_image(_png(Image.fromarray(grey)), max_pixels=100)
    assert a.rgb.shape == (6, 5, 3) and a.alpha is None and a.mode == "L"
    assert np.array_equal(a.rgb[..., 0], grey) and np.array_equal(a.rgb[..., 2], grey)
    la_image = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(255 - grey)])
    la = decode_image(_png(la_image), max_pixels=100)
    assert np.array_equal(la.alpha, 255 - grey) and np.array_equal(la.rgb[..., 1], grey)
    rgba = decode_image(_png(Image.fromarray(np.dstack([rgb, grey]))), max_pixels=100)
    assert np.array_equal(rgba.rgb, rgb) and np.array_equal(rgba.alpha, grey)
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 0
    p = decode_image(_png(pal, transparency=0), max_pixels=100)
    assert p.mode == "P" and p.alpha is not None and (p.alpha == 0).any() == (np.asarray(pal) == 0).any()
    deep = (np.arange(30, dtype=np.uint16).reshape(6, 5) * 2000).astype(np.uint16)
    d16 = decode_image(_png(Image.fromarray(deep)), max_pixels=100)
    assert d16.rgb.dtype == np.uint16 and np.array_equal(d16.rgb[..., 0], deep)
    assert torch.allclose(to_float(d16.rgb)[0], torch.from_numpy(deep / 65535.0).float())
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, format="JPEG", quality=95)
    cmyk = decode_image(buf.getvalue(), max_pixels=100)
    assert cmyk.mode == "CMYK" and cmyk.rgb.shape == (6, 5, 3) and cmyk.rgb.dtype == np.uint8


def test_decode_exif_orientation_icc_and_limits() -> None:
    arr = np.zeros((4, 7, 3), np.uint8)
    arr[0, 0] = 255  # a marker in the top-left corner
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[ORIENTATION] = 6  # rotate 90 degrees clockwise to display
    exif[0x010F] = "PatchScaler test camera"
    icc = _srgb_icc()
    dec = decode_image(_png(im, exif=exif.tobytes(), icc_profile=icc), max_pixels=100)
    assert dec.rgb.shape == (7, 4, 3)  # transposed
    assert dec.rgb[0, -1].tolist() == [255, 255, 255]  # the corner moved with the rotation
    kept = Image.Exif()
    kept.load(dec.exif)
    assert ORIENTATION not in kept and kept[0x010F] == "PatchScaler test camera"
    assert dec.icc == icc
    grey_icc = icc[:16] + b"GRAY" + icc[20:]
    assert decode_image(_png(im, icc_profile=grey_icc), max_pixels=100).icc == b""
    with pytest.raises(ImageTooLarge):
        decode_image(_png(im), max_pixels=27)
    with pytest.raises(ValueError, match="empty"):
        decode_image(b"", max_pixels=100)
    with pytest.raises(UnreadableImage, match=r"^corrupt or truncated image \(") as truncated:
        decode_image(b"\x89PNG\r\n\x1a\nnot really", max_pixels=100)
    with pytest.raises(UnreadableImage, match="not an image") as text:
        decode_image(b"just some text\n", max_pixels=100)
    for exc in (truncated.value, text.value):  # one line, and no "<_io.BytesIO object at 0x...>"
        assert "BytesIO" not in str(exc) and "\n" not in str(exc)


def test_encode_keeps_alpha_icc_exif() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    alpha = np.tile(np.arange(12, dtype=np.uint8) * 20, (8, 1))
    exif = Image.Exif()
    exif[0x010F] = "cam"
    icc = _srgb_icc()
    for fmt in ("png", "webp", "jpeg"):
        data = encode_image(rgb, alpha, fmt=fmt, quality=90, icc=icc, exif=exif.tobytes())
        with Image.open(io.BytesIO(data)) as out:
            assert out.format == {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}[fmt]
            assert out.mode == ("RGB" if fmt == "jpeg" else "RGBA")
            assert out.info.get("icc_profile") == icc
            assert out.getexif()[0x010F] == "cam"
            if fmt == "png":
                assert np.array_equal(np.asarray(out)[..., :3], rgb)
                assert np.array_equal(np.asarray(out)[..., 3], alpha)
    big = upscale_alpha(alpha, 4)
    assert big.shape == (32, 48) and big.dtype == np.uint8
    assert big[:, 0].max() <= 5 and big[:, -1].min() >= 215  # a bicubic ramp, not a blur to grey


def test_plan_outputs_and_collisions(tmp_path) -> None:
    root = str(tmp_path / "in")
    sources = [f"{root}/a.png", f"{root}/a.jpg", f"{root}/b.tif", f"{root}/sub/c.png"]
    out = plan_outputs(sources, root, "/o", "png")
    assert out[f"{root}/b.tif"] == "/o/b.png" and out[f"{root}/sub/c.png"] == "/o/sub/c.png"
    # a.png already has the name both want: it keeps it, a.jpg keeps its extension in the name
    assert out[f"{root}/a.png"] == "/o/a.png" and out[f"{root}/a.jpg"] == "/o/a.jpg.png"
    s3 = plan_outputs(["s3://b/in/x.jpg"], "s3://b/in", "s3://b/out", "webp")
    assert s3 == {"s3://b/in/x.jpg": "s3://b/out/x.webp"}
    assert S.image_id("s3://b/in/x.jpg") == S.image_id("s3://b/in/x.jpg") != S.image_id("s3://b/in/y.jpg")


def test_grey_inputs_come_back_grey_without_a_colour_cast() -> None:
    """Grey inputs (L, LA, 16-bit) are written as grey: the model's RGB output becomes luma, whatever
    colour it drifted to; a GRAY ICC profile is kept for them, an RGB one for colour outputs."""
    rng = np.random.default_rng(2)
    tinted = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)  # a model output with a colour cast
    grey_icc = _srgb_icc()[:16] + b"GRAY" + _srgb_icc()[20:]
    alpha = rng.integers(0, 256, (2, 3), dtype=np.uint8)
    for fmt, mode in (("png", "LA"), ("webp", "RGBA"), ("jpeg", "L")):
        data = encode_output(tinted, alpha, grey=True, scale=4, fmt=fmt, quality=100, icc=grey_icc, exif=b"")
        with Image.open(io.BytesIO(data)) as out:
            assert out.mode == mode and out.size == (12, 8)
            rgb = np.asarray(out.convert("RGB")).astype(int)
            assert (rgb.max(axis=2) - rgb.min(axis=2)).max() <= (0 if fmt == "png" else 3)  # no cast
            if fmt == "png":
                assert np.array_equal(np.asarray(out)[..., 0], to_grey(tinted))
                assert np.array_equal(np.asarray(out)[..., 1], upscale_alpha(alpha, 4))
            assert out.info.get("icc_profile") == (None if fmt == "webp" else grey_icc)  # WebP: RGB
    colour = encode_output(tinted, None, grey=False, scale=4, fmt="png", quality=95, icc=grey_icc, exif=b"")
    with Image.open(io.BytesIO(colour)) as out:
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), tinted) and "icc_profile" not in out.info
    deep = tinted[..., 0].astype(np.uint16) * 257
    for grey_file in (Image.fromarray(tinted[..., 0]), Image.fromarray(deep)):
        dec = decode_image(_png(grey_file, icc_profile=grey_icc), max_pixels=1000)
        assert dec.grey and dec.icc == grey_icc


def test_atomic_write_leaves_no_partial_files(tmp_path, monkeypatch) -> None:
    target = tmp_path / "deep" / "x.png"
    write_bytes_atomic(str(target), b"first", {})
    assert target.read_bytes() == b"first"

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        write_bytes_atomic(str(target), b"second", {})
    monkeypatch.undo()
    assert target.read_bytes() == b"first"  # the old file is intact, no temp file is left
    assert os.listdir(target.parent) == ["x.png"]
    (target.parent / ".x.png.partial-abc").write_bytes(b"half")  # as a killed run leaves it
    assert remove_partials(str(tmp_path)) == 1 and os.listdir(target.parent) == ["x.png"]


def test_dit_pool_sizes_follow_work() -> None:
    assert dit_pool_sizes({0: 100 * 8, 1: 100 * 14, 2: 100 * 20}, 3) == {0: 1, 1: 1, 2: 1}
    sizes = dit_pool_sizes({0: 10 * 8, 1: 10 * 14, 2: 100 * 20}, 10)
    assert sum(sizes.values()) == 10 and sizes[2] == 8 and sizes[0] == 1 and sizes[1] == 1
    assert dit_pool_sizes({0: 0, 1: 50, 2: 50}, 4) == {1: 2, 2: 2}
    assert dit_pool_sizes({0: 0, 1: 0, 2: 0}, 4) == {}
    assert dit_pool_sizes({0: 1, 1: 1, 2: 1}, 1) == {0: 1, 1: 1, 2: 1}  # at least one per busy group


def _row(i: str, status: str, output: str, t: float) -> dict:
    meta = S.new_meta(source=f"/in/{i}", output=output)
    if status != S.STATUS_OK:
        S.fail(meta, "decode", ValueError("bad"))
    return S.manifest_row(meta, image_id_=i, sampling="adaptive", seed=0, finished_at=t)


def test_manifest_resume_and_consolidation(tmp_path) -> None:
    out = str(tmp_path)
    for name in ("a", "b"):
        (tmp_path / f"{name}.png").write_bytes(b"x")
    write_part(out, "r1-0", [_row("a", "ok", f"{out}/a.png", 1.0), _row("b", "ok", f"{out}/b.png", 1.0),
                             _row("c", "error", f"{out}/c.png", 1.0), _row("d", "ok", f"{out}/d.png", 1.0)],
               {})
    write_part(out, "r2-0", [_row("b", "error", f"{out}/b.png", 2.0)], {})
    # a: ok + output; b: latest row is an error; c: error; d: ok but its output is gone
    planned = {i: f"{out}/{i}.png" for i in "abcd"}
    assert finished_ids(out, planned, {}) == {"a"}
    assert finished_ids(out, {"a": f"{out}/a.webp"}, {}) == set()  # another format: redo
    rows = consolidate(out, ["a", "b", "c", "d"], {})
    assert sorted(rows["id"]) == ["a", "b", "c", "d"]
    assert rows.set_index("id").loc["b", "status"] == "error"


def test_fused_sampling_equals_per_group_sampling(tiny_model, tiny_rtm) -> None:
    from patchscaler.diffusion import NoiseSchedule
    from patchscaler.sampling import shared_grid
    from patchscaler.upscaler import refine
    from pipeline.stages import fused_refine

    g = torch.Generator().manual_seed(3)
    c, v = tiny_model.config.latent_channels, tiny_model.config.sampler.patch_size
    y0 = torch.randn(7, c, v, v, generator=g)
    noise = torch.randn(7, c, v, v, generator=g)
    groups = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    scores, idx = tiny_rtm.search(tiny_model.classifier.features(y0), 4)
    values = tiny_rtm.gather(idx)
    schedule = NoiseSchedule(config=tiny_model.config.sampler)
    per_group = refine(tiny_model, y0, groups, noise, values, scores, schedule=schedule, batch_size=4)
    fused = fused_refine(tiny_model, y0, groups, noise, values, scores, schedule=schedule, batch_size=4)
    assert torch.allclose(per_group, fused, atol=1e-4, rtol=0)
    assert not torch.allclose(per_group[groups == 0], y0[groups == 0], atol=1e-2)  # it did sample
    # the grid is shared by the paper's schedules; others are refused rather than silently changed
    assert shared_grid(schedule, [400, 700, 1000], [8, 14, 20])[-1] == 50
    with pytest.raises(ValueError, match="one grid"):
        shared_grid(schedule, [400, 700, 1000], [10, 14, 20])
