"""Training on CPU with the tiny preset: degradations, losses, one step per module, data, Ray Train loop."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_rtm
from PIL import Image

from patchscaler.presets import PRESETS
from patchscaler.training.degradations import (
    DegradationConfig,
    PairPool,
    degrade,
    degrade_image,
    filter2d,
    mixed_gaussian_kernel,
    random_blur_kernels,
    sinc_kernel,
)
from patchscaler.training.jpeg import jpeg_compress
from patchscaler.training.steps import (
    AutoencoderForTraining,
    TextureDenoiser,
    autoencoder_step,
    classifier_step,
    grm_step,
    patchdit_step,
)
from trainer.data import DTD_CLASSES, CropBatches, RandomCrops, list_images, list_textures
from trainer.tasks import TrainConfig


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Images with structure at several scales (a few sinusoids), in [0, 1]: (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.zeros(n, 3, size, size)
    for _ in range(4):
        f = torch.rand(n, 3, 2, 1, 1, generator=g) * 0.3
        phase = torch.rand(n, 3, 1, 1, generator=g) * 6.28
        out += torch.sin(f[:, :, 0] * xx + f[:, :, 1] * yy + phase)
    return (out / 8 + 0.5).clamp(0, 1)


# --- degradations -------------------------------------------------------------------------------


def test_degradation_is_deterministic_per_seed_and_sized_by_scale() -> None:
    hr = _smooth_images(3, 64, seed=0)
    cfg = DegradationConfig()
    a = degrade(hr, config=cfg, generator=torch.Generator().manual_seed(7))
    b = degrade(hr, config=cfg, generator=torch.Generator().manual_seed(7))
    c = degrade(hr, config=cfg, generator=torch.Generator().manual_seed(8))
    assert a.shape == (3, 3, 16, 16)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a, (a * 255).round() / 255)  # 8-bit quantised, in [0, 1]
    assert a.min() >= 0 and a.max() <= 1
    x2 = degrade_image(hr[0], config=DegradationConfig(scale=2), seed=1)
    assert x2.shape == (3, 32, 32)


def test_degradation_removes_detail() -> None:
    """The LR image, upscaled back, is far from the HR image (blur, noise, JPEG), unlike plain bicubic."""
    hr = _smooth_images(4, 64, seed=1)
    down = degrade(hr, config=DegradationConfig(kind="bicubic"), generator=torch.Generator())
    real = degrade(hr, config=DegradationConfig(), generator=torch.Generator().manual_seed(0))

    def err(lr: torch.Tensor) -> float:
        up = torch.nn.functional.interpolate(lr, scale_factor=4, mode="bicubic").clamp(0, 1)
        return float((up - hr).pow(2).mean())

    assert err(real) > 2 * err(down)


def test_blur_kernels_are_normalised_and_oriented() -> None:
    k = mixed_gaussian_kernel("aniso", 21, 4.0, 0.5, 0.0)
    assert k.shape == (21, 21) and math.isclose(float(k.sum()), 1.0, rel_tol=1e-5)
    assert float(k[10].sum()) > 3 * float(k[:, 10].sum())  # wide along x, narrow along y
    s = sinc_kernel(13, math.pi / 3)
    assert math.isclose(float(s.sum()), 1.0, rel_tol=1e-5) and float(s.min()) < 0  # ringing lobes


def test_batched_degradation_range_is_deterministic_and_typed() -> None:
    """Clean, mild and heavy pairs in one batch: shapes, dtype, 8-bit values, same seed same result."""
    hr = _smooth_images(8, 64, seed=3)
    cfg = DegradationConfig(clean_share=0.3, mild_share=0.3)
    a = degrade(hr, config=cfg, generator=torch.Generator().manual_seed(4))
    b = degrade(hr, config=cfg, generator=torch.Generator().manual_seed(4))
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and torch.equal(a, (a * 255).round() / 255)
    assert a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, degrade(hr, config=cfg, generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="sum to at most 1"):
        DegradationConfig(clean_share=0.7, mild_share=0.5)


def test_clean_pairs_equal_bicubic_and_the_shares_mix() -> None:
    hr = _smooth_images(16, 32, seed=4)
    bicubic = degrade(hr, config=DegradationConfig(kind="bicubic"), generator=torch.Generator())
    every = degrade(hr, config=DegradationConfig(clean_share=1.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(every, bicubic)
    mixed = degrade(hr, config=DegradationConfig(clean_share=0.5, mild_share=0.25),
                    generator=torch.Generator().manual_seed(0))
    clean_rows = [i for i in range(16) if torch.equal(mixed[i], bicubic[i])]
    assert 2 <= len(clean_rows) <= 14  # about half of the batch is clean, the rest is not
    # mild pairs stay much closer to bicubic than Real-ESRGAN's heavy ones
    mild = degrade(hr, config=DegradationConfig(mild_share=1.0), generator=torch.Generator().manual_seed(1))
    heavy = degrade(hr, config=DegradationConfig(), generator=torch.Generator().manual_seed(1))
    assert float((mild - bicubic).abs().mean()) < float((heavy - bicubic).abs().mean())


def test_keep_color_removes_the_clipping_cast_of_saturated_images() -> None:
    """Warm, saturated images (red near 1, blue near 0): the heavy pipeline's clipped noise pulls red
    down and blue up; with keep_color each LR has its bicubic's channel means (up to the re-clip and the
    8-bit rounding), and the structure of the degradation is the same draw."""
    hr = _smooth_images(16, 64, seed=7)
    hr = torch.stack([0.85 + 0.15 * hr[:, 0], 0.5 * hr[:, 1], 0.1 * hr[:, 2]], dim=1)  # (16, 3, 64, 64)
    bicubic = degrade(hr, config=DegradationConfig(kind="bicubic"), generator=torch.Generator())
    shift = {}
    for keep in (False, True):
        g = torch.Generator().manual_seed(2)
        lr = degrade(hr, config=DegradationConfig(keep_color=keep), generator=g)
        shift[keep] = ((lr - bicubic).mean(dim=(2, 3)) * 255).mean(dim=0)  # (3,) in 1/255
    assert shift[False][0] < -1.0 and shift[False][2] > 1.0  # the cast: red down, blue up
    assert float(shift[True].abs().max()) < 0.5 * float(shift[False].abs().max())
    assert float(shift[True][0].abs()) < 0.5  # red is where the clipping costs most


def test_per_sample_kernels_differ_and_grouped_filtering_matches_one_by_one() -> None:
    g = torch.Generator().manual_seed(0)
    kernels = random_blur_kernels(g, DegradationConfig(), 6, second=False, device=torch.device("cpu"))
    assert kernels.shape == (6, 21, 21)
    torch.testing.assert_close(kernels.sum(dim=(1, 2)), torch.ones(6))
    assert all(not torch.allclose(kernels[i], kernels[j]) for i in range(6) for j in range(i + 1, 6))
    images = _smooth_images(6, 32, seed=5)
    batched = filter2d(images, kernels)
    for i in range(6):
        torch.testing.assert_close(batched[i:i + 1], filter2d(images[i:i + 1], kernels[i]))


def test_pair_pool_mixes_batches_and_keeps_pairs_together() -> None:
    pool = PairPool(size=6)
    g = torch.Generator().manual_seed(0)
    seen = []
    for step in range(6):
        hr = torch.full((2, 3, 8, 8), float(step)) + torch.arange(2.0)[:, None, None, None] / 10
        lr = hr[:, :, ::4, ::4] * 2  # the pair's LR: recognisably its own
        out_hr, out_lr = pool.mix(hr, lr, g)
        assert out_hr.shape == hr.shape and out_lr.shape == lr.shape
        torch.testing.assert_close(out_lr, out_hr[:, :, ::4, ::4] * 2)
        seen.append(sorted(out_hr[:, 0, 0, 0].tolist()))
        if step < 3:
            assert torch.equal(out_hr, hr)  # the pool fills first
    assert len(pool) == 6
    assert any(value < step for step, values in enumerate(seen[3:], start=3) for value in values)


def test_batched_jpeg_equals_one_by_one() -> None:
    images = _smooth_images(3, 40, seed=6)
    quality = torch.tensor([30.0, 60.0, 95.0])
    batched = jpeg_compress(images, quality)
    for i in range(3):
        assert torch.equal(batched[i:i + 1], jpeg_compress(images[i:i + 1], float(quality[i])))


def test_jpeg_matches_pillow() -> None:
    rgb = (_smooth_images(1, 64, seed=2)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    for q in (30, 90):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=q)
        ref = torch.from_numpy(np.asarray(Image.open(buf), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        ours = jpeg_compress(x, q)
        assert float((ours - ref).pow(2).mean()) < 0.25 * float((ref - x).pow(2).mean()) + 1e-5
    assert float((jpeg_compress(x, 20) - x).abs().mean()) > float((jpeg_compress(x, 95) - x).abs().mean())


# --- one step per module reduces the loss on a fixed batch ---------------------------------------


def _repeat(fn, n: int) -> list[float]:
    return [fn()["loss"] for _ in range(n)]


def test_autoencoder_steps_reduce_loss() -> None:
    model = make_tiny_model(seed=0)
    module = AutoencoderForTraining(vae=model.autoencoder.vae, config=model.config.autoencoder)
    module.requires_grad_(True).train()
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    hr = _smooth_images(4, 32, seed=3)
    losses = _repeat(lambda: autoencoder_step(module, hr, opt, kl_weight=1e-6,
                                              generator=torch.Generator().manual_seed(0)), 8)
    assert losses[-1] < 0.8 * losses[0]


def test_grm_steps_reduce_loss() -> None:
    model = make_tiny_model(seed=0)
    grm = model.grm.requires_grad_(True).train()
    opt = torch.optim.Adam(grm.parameters(), lr=1e-3)
    hr = _smooth_images(2, 64, seed=4)
    lr = degrade(hr, config=DegradationConfig(), generator=torch.Generator().manual_seed(0))
    losses = _repeat(lambda: grm_step(grm, model.autoencoder, lr, hr, opt, scale=4, lam=0.1, eta=0.05), 8)
    assert losses[-1] < losses[0]


def test_classifier_steps_reduce_loss() -> None:
    model = make_tiny_model(seed=0)
    clf = model.classifier.requires_grad_(True).train()
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    images, labels = _smooth_images(4, 128, seed=5), torch.tensor([0, 5, 11, 46])
    losses = _repeat(lambda: classifier_step(clf, model.autoencoder, images, labels, opt), 6)
    assert losses[-1] < 0.8 * losses[0]


def test_patchdit_steps_reduce_loss() -> None:
    from patchscaler.diffusion import NoiseSchedule

    model = make_tiny_model(seed=0)
    rtm = make_tiny_rtm(model, entries=16)
    denoiser = TextureDenoiser(patch_dit=model.patch_dit, texture_encoder=model.texture_encoder)
    denoiser.requires_grad_(True).train()
    opt = torch.optim.Adam(denoiser.parameters(), lr=1e-3)
    hr = _smooth_images(2, 128, seed=6)
    lr = degrade(hr, config=DegradationConfig(), generator=torch.Generator().manual_seed(0))
    schedule = NoiseSchedule(config=model.config.sampler)

    def step() -> dict[str, float]:  # the same t and noise every time: a fixed batch
        return patchdit_step(denoiser, grm=model.grm, classifier=model.classifier,
                             autoencoder=model.autoencoder, rtm=rtm, schedule=schedule, lr=lr, hr=hr,
                             optimizer=opt, scale=4, patch=16, stride=8, top_k=4,
                             generator=torch.Generator().manual_seed(1))

    first = step()
    side = 128 // model.autoencoder.factor  # latent side of a 128 px crop
    per_image = (1 + (side - 16) // 8) ** 2  # every 16x16 window at stride 8
    assert first["patches"] == 2 * per_image
    losses = [first["loss"], *_repeat(step, 7)]
    assert losses[-1] < 0.85 * losses[0]
    for frozen in (model.grm, model.classifier, model.autoencoder):  # no gradient reaches them
        assert all(p.grad is None for p in frozen.parameters())


# --- data ---------------------------------------------------------------------------------------


def _write_png(path: Path, size: tuple[int, int], seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def test_unreadable_and_small_files_are_skipped_and_counted(tmp_path: Path) -> None:
    _write_png(tmp_path / "a" / "good.png", (80, 72), 0)
    _write_png(tmp_path / "b" / "tiny.png", (20, 20), 1)
    (tmp_path / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    files = list_images(str(tmp_path))
    assert [Path(f).name for f in files] == ["good.png", "broken.jpg", "tiny.png"]
    batches = CropBatches(RandomCrops(files=files, crop=64, seed=0, crops_per_image=2), batch_size=4)
    for _ in range(6):
        images, labels = next(batches)
        assert images.shape == (4, 3, 64, 64) and bool((labels == -1).all())
    assert batches.skipped["unreadable"] >= 1 and batches.skipped["too_small"] >= 1


def test_all_unreadable_is_an_error_not_a_hang(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    batches = CropBatches(RandomCrops(files=list_images(str(tmp_path)), crop=32, seed=0), batch_size=2)
    with pytest.raises(RuntimeError, match="no usable image"):
        next(batches)


def test_dtd_layout_labels(tmp_path: Path) -> None:
    for name, seed in (("striped", 0), ("bumpy", 1)):
        _write_png(tmp_path / "dtd" / "images" / name / f"{name}_0001.jpg", (64, 64), seed)
    samples = list_textures(str(tmp_path / "dtd"))
    expected = sorted([DTD_CLASSES.index("striped"), DTD_CLASSES.index("bumpy")])
    assert sorted(lab for _, lab in samples) == expected
    assert len(DTD_CLASSES) == 47
    _write_png(tmp_path / "bad" / "bricks" / "b.png", (64, 64), 2)
    with pytest.raises(ValueError, match="not DTD classes"):
        list_textures(str(tmp_path / "bad"))


def test_images_from_s3(tmp_path: Path) -> None:
    from s3util import moto_s3

    with moto_s3("train-bucket"):
        import fsspec

        fs = fsspec.filesystem("s3")
        buf = io.BytesIO()
        Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
        fs.pipe("train-bucket/lsdir/0001000/0000001.png", buf.getvalue())
        fs.pipe("train-bucket/lsdir/0001000/readme.txt", b"x")
        files = list_images("s3://train-bucket/lsdir")
        assert files == ["s3://train-bucket/lsdir/0001000/0000001.png"]
        images, _ = next(CropBatches(RandomCrops(files=files, crop=32, seed=0), batch_size=2))
        assert images.shape == (2, 3, 32, 32)


# --- the Ray Train loop: checkpoints, resume, two workers -----------------------------------------


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    from patchscaler.weights import save_checkpoint

    path = tmp_path_factory.mktemp("init") / "ckpt"
    save_checkpoint(make_tiny_model(seed=0), str(path))
    return str(path)


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("hr")
    for i in range(3):
        img = (_smooth_images(1, 96, seed=10 + i)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"{i:04d}.png")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return str(root)


def _config(task: str, init: str, out: Path, data: str, **overrides) -> TrainConfig:
    base = dict(task=task, init=init, out=str(out), data=(data,), steps=2, batch_size=2, lr=1e-3, crop=32,
                crops_per_image=2, log_every=1, checkpoint_every=2, num_workers=1, use_gpu=False)
    return TrainConfig(**{**base, **overrides})


def test_resume_restores_step_and_optimizer_state(
    tmp_path: Path, init_checkpoint: str, hr_folder: str
) -> None:
    from trainer.checkpoints import EMA_FILE, TRAINABLE_FILE
    from trainer.loop import build_worker_state, export_final, rng_states, save_checkpoint_dir

    cfg = _config("autoencoder", init_checkpoint, tmp_path / "out", hr_folder, steps=3)
    cpu = torch.device("cpu")
    run = build_worker_state(cfg, source=None, device=cpu, rank=0)
    assert run.state["step"] == 0
    for step in (1, 2):
        run.task.step(run.module, next(run.batches), run.optimizer, run.generator)
        run.ema.update(step)
    run.state.update(step=2, history=[[1, 0.5], [2, 0.4]])
    ckpt = tmp_path / "step_00000002"
    save_checkpoint_dir(run, str(ckpt), rng_states(run, 0, cpu))
    saved = run.optimizer.state_dict()
    # only what training changes: the autoencoder's weights, not the frozen GRM, classifier, Patch-DiT
    from safetensors.torch import load_file

    kept = load_file(ckpt / TRAINABLE_FILE)
    assert kept and all(k.startswith("autoencoder.") for k in kept)
    assert set(load_file(ckpt / EMA_FILE)) <= set(kept)
    next_draw = torch.rand(4, generator=run.generator)

    resumed = build_worker_state(cfg, source=str(ckpt), device=cpu, rank=0)
    assert torch.equal(torch.rand(4, generator=resumed.generator), next_draw)  # RNG state restored
    assert all(torch.equal(resumed.ema.shadow[k], v) for k, v in run.ema.shadow.items())
    assert resumed.state["step"] == 2 and resumed.state["history"] == [[1, 0.5], [2, 0.4]]
    loaded = resumed.optimizer.state_dict()
    assert loaded["param_groups"][0]["betas"] == saved["param_groups"][0]["betas"]
    assert set(loaded["state"]) == set(saved["state"]) and len(saved["state"]) > 0
    for pid, entry in saved["state"].items():
        for name, value in entry.items():
            got = torch.as_tensor(loaded["state"][pid][name])
            assert torch.equal(got, torch.as_tensor(value)), (pid, name)
    resumed_state = resumed.model.state_dict()
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, resumed_state[k]), k
    export_final(run)
    assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 1000
    scale = json.loads((tmp_path / "out" / "config.json").read_text())["autoencoder"]["scaling_factor"]
    assert scale != PRESETS["tiny"].autoencoder.scaling_factor  # calibrated to 1 / std(latents)


def test_grm_task_trains_on_the_pair_pool_and_bad_shares_are_refused(
    tmp_path: Path, init_checkpoint: str, hr_folder: str
) -> None:
    from jobs.cli import main
    from trainer.loop import build_worker_state

    cfg = _config("grm", init_checkpoint, tmp_path / "out", hr_folder, pair_pool=4, clean_share=0.5,
                  mild_share=0.25)
    run = build_worker_state(cfg, source=None, device=torch.device("cpu"), rank=0)
    assert run.task.degradation().clean_share == 0.5 and run.task.degradation().mild_share == 0.25
    for _ in range(3):
        metrics = run.task.step(run.module, next(run.batches), run.optimizer, run.generator)
        assert math.isfinite(metrics["loss"])
    assert len(run.task.extras["pair_pool"]) == 4
    code = main(["train-grm", "--init", init_checkpoint, "--out", str(tmp_path / "bad"), "--data", hr_folder,
                 "--clean-share", "0.8", "--mild-share", "0.5"])
    assert code == 2  # refused before Ray starts


def test_two_worker_ray_train_run_and_rerun_resumes(
    ray_session, tmp_path: Path, init_checkpoint: str, hr_folder: str
) -> None:
    from patchscaler.weights import load_checkpoint
    from trainer.loop import run_training

    out = tmp_path / "grm"
    cfg = _config("grm", init_checkpoint, out, hr_folder, crop=64, num_workers=2, steps=2)
    state = run_training(cfg, progress=False)
    assert state["step"] == 2 and state["world_size"] == 2
    assert state["skipped"]["unreadable"] >= 0 and [h[0] for h in state["history"]] == [1, 2]
    trained = load_checkpoint(str(out))
    init = load_checkpoint(init_checkpoint)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, init.state_dict()[k])]
    assert changed and all(k.startswith("grm.") for k in changed)  # only the GRM was trained

    state = run_training(dataclasses.replace(cfg, steps=3, num_workers=1))  # the same command, longer
    assert state["step"] == 3 and [h[0] for h in state["history"]] == [1, 2, 3]
    assert state["resumes"] == [2]  # from the run's last checkpoint in its storage (OUT/ray)


def test_latent_windows_cover_every_patch_position() -> None:
    from patchscaler.patching import plan_grid, split_patches
    from patchscaler.training.steps import latent_windows

    x = torch.randn(2, 4, 32, 40)
    windows = latent_windows(x, 16, 8)
    grid = plan_grid(32, 40, patch=16, overlap=8)
    assert windows.shape == (2 * grid.num_patches, 4, 16, 16) and grid.num_patches == 3 * 4
    for i in range(2):  # the same windows, in the same order, as inference's patch split
        assert torch.equal(windows[i * 12:(i + 1) * 12], split_patches(x[i], grid))


def test_sampler_times_are_the_pgs_grid() -> None:
    from trainer.tasks import sampler_times

    config = make_tiny_model().config
    assert sampler_times(config, "uniform") is None
    assert sampler_times(config, "sampler").tolist() == list(range(50, 1001, 50))
