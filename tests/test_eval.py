"""Evaluation: dataset layouts, offline IQA metrics, the weight cache, the Ray scoring stage, the Parquet
tables, the report and the run history."""

from __future__ import annotations

import argparse
import math
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval.metrics as metrics_module
import jobs.evaluate as evaluate_job
from eval.datasets import (
    bicubic_degrade,
    build_synthetic_set,
    list_results,
    load_dataset,
    load_image,
    match_results,
    save_png,
)
from eval.history import HISTORY_SCHEMA
from eval.metrics import CACHE_ENV, METRICS, MetricScorer, MissingWeightsError, file_sha256, resolve_cache_dir
from eval.results import RESULT_SCHEMA, SUMMARY_SCHEMA
from jobs.checks import UsageError


def smooth_image(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    """A random but image-like (3, h, w) picture: low-frequency noise upsampled."""
    low = torch.rand(1, 3, h // 8, w // 8, generator=g)
    return F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def y_channel(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma in [0, 1] of (3, H, W) RGB in [0, 1]."""
    return (65.481 * x[0] + 128.553 * x[1] + 24.966 * x[2] + 16.0) / 255.0


def noisy_degrade(hr: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    lr = bicubic_degrade(4)(hr, generator)
    return (lr + 0.02 * torch.randn(lr.shape, generator=generator)).clamp(0, 1)


@pytest.fixture(scope="module")
def realsr_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RealSR-style set: Canon/Test/4 and Nikon/Test/4 (2 pairs each) and a Canon/Train/4 decoy."""
    root = tmp_path_factory.mktemp("realsr")
    g = torch.Generator().manual_seed(0)
    layout = {"Canon/Test/4": ["Canon_001", "Canon_002"], "Nikon/Test/4": ["Nikon_001", "Nikon_002"],
              "Canon/Train/4": ["Canon_900"]}
    for sub, names in layout.items():
        for name in names:
            hr = smooth_image(g, 48, 40)
            save_png(hr, root / sub / f"{name}_HR.png")
            save_png(bicubic_degrade(4)(hr, g), root / sub / f"{name}_LR4.png")
    return root


def test_layouts_and_matching(realsr_tree: Path, tmp_path: Path) -> None:
    entries = load_dataset("realsr", str(realsr_tree))
    assert [e.key for e in entries] == ["Canon/Test/4/Canon_001", "Canon/Test/4/Canon_002",
                                        "Nikon/Test/4/Nikon_001", "Nikon/Test/4/Nikon_002"]  # no Train
    assert all(e.hr.endswith("_HR.png") and e.lr.endswith("_LR4.png") and e.scale == 4 for e in entries)
    # results named by the LR stem, with or without _LR4, flat or nested; maps next to them
    res = tmp_path / "res"
    for name in ["Canon_001_LR4", "Canon_002", "Nikon/Test/4/Nikon_001_LR4", "x"]:
        save_png(torch.zeros(3, 8, 8), res / f"{name}.png")
    save_png(torch.zeros(3, 2, 2), res / "Canon_001_groups.png")
    matched, missing = match_results(entries, list_results(str(res)))
    assert [(e.key, Path(sr).name, sorted(m)) for e, sr, m in matched] == [
        ("Canon/Test/4/Canon_001", "Canon_001_LR4.png", ["groups"]),
        ("Canon/Test/4/Canon_002", "Canon_002.png", []),
        ("Nikon/Test/4/Nikon_001", "Nikon_001_LR4.png", []),
    ]
    assert [e.key for e in missing] == ["Nikon/Test/4/Nikon_002"]
    # paired (LR/HR folders) and LR-only layouts
    for folder in ("LR", "HR"):
        save_png(torch.zeros(3, 8, 8), tmp_path / "paired" / folder / "a.png")
    paired = load_dataset("p", str(tmp_path / "paired"))
    assert [(e.key, Path(e.lr).parent.name, Path(e.hr).parent.name) for e in paired] == [("a", "LR", "HR")]
    lr_only = load_dataset("realset", str(res), layout="lr")
    assert len(lr_only) == 4 and all(e.hr == "" for e in lr_only)  # the map is not an image of the set


def test_synthetic_set_is_reproducible(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    for name in ("a", "b"):
        save_png(smooth_image(g, 40, 48), tmp_path / "hr" / f"{name}.png")
    hr_dir = str(tmp_path / "hr")
    sets = [build_synthetic_set(hr_dir, str(tmp_path / d), degrade=noisy_degrade, seed=s, crop=32)
            for d, s in (("x", 3), ("y", 3), ("z", 4))]
    assert [e.key for e in sets[0]] == ["a", "b"]
    lr_x, lr_y, lr_z = (load_image(entries[0].lr) for entries in sets)
    assert lr_x.shape == (3, 8, 8) and load_image(sets[0][0].hr).shape == (3, 32, 32)  # centre crop, ×4
    assert torch.equal(lr_x, lr_y) and not torch.equal(lr_x, lr_z)  # the seed fixes the degradation
    assert not torch.equal(load_image(sets[0][0].lr), load_image(sets[0][1].lr))
    # the written set reads back as a RealSR-layout dataset with references
    back = load_dataset("lsdir-test", str(tmp_path / "x"))
    assert [(e.key, Path(e.lr).name, Path(e.hr).name) for e in back] == [
        ("a", "a_LR4.png", "a_HR.png"), ("b", "b_LR4.png", "b_HR.png")]


def test_offline_metrics_score_tiny_images(tmp_path: Path) -> None:
    scorer = MetricScorer(metrics=["psnr", "ssim", "piqe"], cache_dir=str(tmp_path), crop_border=4)
    g = torch.Generator().manual_seed(1)
    hr = smooth_image(g, 32, 32)
    same = {v.metric: v.value for v in scorer.score(hr, hr)}
    assert same["psnr"] == pytest.approx(80.0, abs=1e-3)  # 10 log10(1 / (0 + 1e-8))
    assert same["ssim"] == pytest.approx(1.0, abs=1e-6)
    sr = (hr + 0.05 * torch.randn(hr.shape, generator=g)).clamp(0, 1)
    values = scorer.score(sr, hr)
    got = {v.metric: v.value for v in values}
    mse = ((y_channel(sr) - y_channel(hr))[4:-4, 4:-4] ** 2).mean().item()
    assert got["psnr"] == pytest.approx(10 * math.log10(1.0 / (mse + 1e-8)), abs=1e-3)
    assert 0.0 < got["ssim"] < 0.99 and 0.0 <= got["piqe"] <= 100.0
    assert all(v.error == "" and v.seconds >= 0 for v in values)
    # only the border differs -> PSNR/SSIM as for identical images; without a reference only NR metrics
    framed = hr.clone()
    framed[:, :4] = 0.0
    assert {v.metric: v.value for v in scorer.score(framed, hr)}["psnr"] == pytest.approx(80.0, abs=1e-3)
    assert [v.metric for v in scorer.score(sr)] == ["piqe"]
    assert [v.value for v in scorer.score(sr, hr)] == [v.value for v in values]  # seeded, repeatable


def test_missing_weights_error_names_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env-cache"))
    assert resolve_cache_dir(None) == str(tmp_path / "env-cache")
    assert resolve_cache_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")
    with pytest.raises(MissingWeightsError) as info:
        MetricScorer(metrics=["psnr", "maniqa-pipal", "musiq", "lpips"])
    text = str(info.value)
    assert str(tmp_path / "env-cache") in text and CACHE_ENV in text and "docs/evaluation.md" in text
    for name in ("maniqa-pipal", "musiq", "lpips"):
        for rel, url in METRICS[name].files:
            assert str(tmp_path / "env-cache" / rel) in text and url in text
    # the job stops before starting anything, naming the files in one line (the CLI exits with 2)
    args = _job_args(["--results", str(tmp_path), "--out", str(tmp_path / "out"), "--metrics", "musiq"])
    with pytest.raises(UsageError) as stop:
        evaluate_job.run(args)
    assert METRICS["musiq"].files[0][0] in str(stop.value) and "\n" not in str(stop.value)
    assert not (tmp_path / "out").exists()


def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_learned_metrics_load_random_weights_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MUSIQ and MANIQA load their weights from the cache under pyiqa's file names, network blocked."""
    import timm
    from pyiqa.archs.maniqa_arch import MANIQA
    from pyiqa.archs.musiq_arch import MUSIQ

    torch.manual_seed(123)
    musiq = MUSIQ(pretrained=False).state_dict()
    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: original(*a, **{**k, "pretrained": False}))
    maniqa = MANIQA(pretrained=False).state_dict()  # its ViT backbone must not download ImageNet weights
    monkeypatch.undo()
    (tmp_path / "pyiqa").mkdir()
    torch.save(musiq, tmp_path / "pyiqa" / Path(METRICS["musiq"].files[0][0]).name)
    torch.save(maniqa, tmp_path / "pyiqa" / Path(METRICS["maniqa-pipal"].files[0][0]).name)
    _block_network(monkeypatch)
    hub_before = torch.hub.get_dir()
    scorer = MetricScorer(metrics=["musiq", "maniqa-pipal"], cache_dir=str(tmp_path))
    assert torch.hub.get_dir() == hub_before  # the cache redirection is undone after loading
    for name, saved in (("musiq", musiq), ("maniqa-pipal", maniqa)):
        loaded = scorer.models[name].net.state_dict()
        assert set(loaded) == set(saved)
        assert all(torch.equal(loaded[k].cpu(), v) for k, v in saved.items())
    # MUSIQ scores (MANIQA's 20 crops of 224 px through a ViT-B/8 take over a minute on CPU: load only)
    scorer.specs = [METRICS["musiq"]]
    (value,) = scorer.score(smooth_image(torch.Generator().manual_seed(2), 32, 32))
    assert value.metric == "musiq" and value.error == "" and math.isfinite(value.value)


def _save_torchscript(state: dict[str, torch.Tensor], path: Path) -> None:
    """Save ``state`` as a TorchScript archive, as OpenAI's CLIP files are (pyiqa's CLIP loader reads the
    ``state_dict()`` of ``torch.jit.load``), with the tensors under the same dotted names."""
    holder = torch.nn.Module()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = holder
        for name in parents:
            if name not in module._modules:
                module.add_module(name, torch.nn.Module())
            module = module._modules[name]
        module.register_buffer(leaf, value.clone())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(holder), str(path))


def _tiny_clip_state() -> dict[str, torch.Tensor]:
    """A randomly initialised CLIP laid out as the RN50 file (ModifiedResNet + text transformer, conv/linear
    weights in fp16) but tiny (14 MB instead of 244 MB): pyiqa's loader reads the architecture off the shapes.
    The vocabulary and context length are CLIP's, as the tokenizer needs them."""
    from pyiqa.archs.clip_model import CLIP, convert_weights

    model = CLIP(embed_dim=32, image_resolution=224, vision_layers=(1, 1, 1, 1), vision_width=8,
                 vision_patch_size=None, context_length=77, vocab_size=49408, transformer_width=64,
                 transformer_heads=1, transformer_layers=1)
    convert_weights(model)
    return model.state_dict()


def test_clipiqa_loads_random_weights_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLIP-IQA loads clip/RN50.pt from the cache, its SHA-256 checked against the expected digest (here the
    random file's, registered for the test), with the network blocked, and scores."""
    torch.manual_seed(321)
    clip_state = _tiny_clip_state()
    (rel, _url), = METRICS["clipiqa"].files
    _save_torchscript(clip_state, tmp_path / rel)
    monkeypatch.setitem(metrics_module.FILE_SHA256, rel, file_sha256(str(tmp_path / rel)))
    _block_network(monkeypatch)
    scorer = MetricScorer(metrics=["clipiqa"], cache_dir=str(tmp_path))
    loaded = scorer.models["clipiqa"].net.clip_model[0].state_dict()
    assert set(loaded) == set(clip_state)
    assert all(torch.equal(loaded[k].cpu(), v.float() if v.is_floating_point() else v)  # fp16 -> fp32 on CPU
               for k, v in clip_state.items())
    (value,) = scorer.score(smooth_image(torch.Generator().manual_seed(3), 32, 32))
    assert value.metric == "clipiqa" and value.error == "" and 0.0 <= value.value <= 1.0


def test_clip_weights_with_the_wrong_hash_are_refused(tmp_path: Path) -> None:
    """A clip/RN50.pt that is not OpenAI's file stops the job before it starts, naming file, digests, URL;
    the loader pyiqa calls checks it again."""
    (rel, url), = METRICS["clipiqa"].files
    (tmp_path / "clip").mkdir()
    (tmp_path / rel).write_bytes(b"not the RN50 weights")
    wrong = file_sha256(str(tmp_path / rel))
    with pytest.raises(MissingWeightsError) as info:
        MetricScorer(metrics=["psnr", "clipiqa"], cache_dir=str(tmp_path))
    text = str(info.value)
    assert str(tmp_path / rel) in text and wrong in text and metrics_module.FILE_SHA256[rel] in text
    assert url in text
    with pytest.raises(MissingWeightsError, match=wrong):
        metrics_module._local_clip_download(str(tmp_path))(url, str(tmp_path / "elsewhere"))
    args = _job_args(["--results", str(tmp_path), "--out", str(tmp_path / "out"), "--metrics", "clipiqa",
                      "--metric-cache", str(tmp_path)])
    with pytest.raises(UsageError, match=wrong):
        evaluate_job.run(args)
    assert not (tmp_path / "out").exists()


def test_lpips_loads_random_weights_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """LPIPS loads both of its files from the cache with the network blocked: pyiqa's linear layers
    (pyiqa/LPIPS_v0.1_alex-*.pth) and torchvision's AlexNet (checkpoints/alexnet-owt-*.pth)."""
    import torchvision
    from pyiqa.archs.lpips_arch import NetLinLayer

    torch.manual_seed(456)
    alex = torchvision.models.alexnet(weights=None).state_dict()
    # LPIPS uses AlexNet's convolutions only; its classifier (58M of 61M parameters) must be in the file for
    # torchvision's strict load, so it is stored as one random row broadcast to the full shape (a few kB).
    for key in [k for k in alex if k.startswith("classifier.")]:
        alex[key] = torch.randn(alex[key].shape[-1:]).expand(alex[key].shape)
    lins = {f"lin{i}.{k}": torch.rand_like(v)  # LPIPS' weights are >= 0
            for i, ch in enumerate((64, 192, 384, 256, 256))
            for k, v in NetLinLayer(ch, use_dropout=True).state_dict().items()}
    (lin_rel, _), (alex_rel, _) = METRICS["lpips"].files
    for rel, state in ((lin_rel, lins), (alex_rel, alex)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp_path / rel)
    assert (tmp_path / alex_rel).stat().st_size < 20e6
    _block_network(monkeypatch)
    scorer = MetricScorer(metrics=["lpips"], cache_dir=str(tmp_path))
    net = scorer.models["lpips"].net
    assert all(torch.equal(net.get_parameter(k), v) for k, v in lins.items())
    backbone = net.net.state_dict()  # slice<n>.<i>.<param> holds AlexNet's features.<i>.<param>
    assert len(backbone) == 10
    assert all(torch.equal(v, alex["features." + k.split(".", 1)[1]]) for k, v in backbone.items())
    g = torch.Generator().manual_seed(4)
    hr = smooth_image(g, 32, 32)
    sr = (hr + 0.1 * torch.randn(hr.shape, generator=g)).clamp(0, 1)
    (same,), (value,) = scorer.score(hr, hr), scorer.score(sr, hr)
    assert same.value == pytest.approx(0.0, abs=1e-6) and value.error == ""
    assert math.isfinite(value.value) and value.value > 0.0


def test_score_stage_rows_from_bytes_and_paths(ray_session, tmp_path: Path) -> None:
    """The Ray Data callable on its own: SR given as encoded bytes (as the pipeline has it), HR as a path;
    one long row per (image, metric); the full-reference metrics only where there is a reference."""
    import io as _io

    from eval.score import ScoreConfig, ScoreStage, stage_resources

    g = torch.Generator().manual_seed(7)
    hr = smooth_image(g, 32, 32)
    save_png(hr, tmp_path / "hr.png")
    buf = _io.BytesIO()
    Image.fromarray((hr.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)).save(buf, format="PNG")
    stage = ScoreStage(metrics=("psnr", "piqe"), cache_dir=str(tmp_path), device="cpu", seed=0, crop_border=4,
                       storage_options={})
    column = np.empty(2, dtype=object)
    column[:] = [buf.getvalue(), buf.getvalue()]
    batch = {"image_id": np.array(["a", "b"], dtype=object), "dataset": np.array(["d", "d"], dtype=object),
             "sr": column, "hr": np.array([str(tmp_path / "hr.png"), ""], dtype=object),
             "lr": np.array(["", ""], dtype=object), "model_version": np.array(["m", "m"], dtype=object),
             "rtm_version": np.array(["r", "r"], dtype=object), "runtime_s": np.array([1.0, 2.0])}
    out = stage(batch)
    assert set(out) == set(RESULT_SCHEMA.names)
    rows = pd.DataFrame(out)
    pairs = list(zip(rows["image_id"], rows["metric"], strict=True))
    assert pairs == [("a", "psnr"), ("a", "piqe"), ("b", "piqe")]
    assert rows.loc[0, "value"] == pytest.approx(80.0, abs=1e-3)  # the same pixels through PNG
    assert list(rows["runtime_s"]) == [1.0, 1.0, 2.0] and set(rows["model_version"]) == {"m"}
    # resources: no GPU in the cluster -> CPU actors; an explicit share means the models go to cuda
    cpu_only = stage_resources(ScoreConfig(metrics=("psnr",)))
    assert cpu_only == {"num_cpus": 1.0, "num_gpus": 0.0, "device": "cpu"}
    assert stage_resources(ScoreConfig(metrics=("psnr",), gpus_per_actor=0.25))["device"] == "cuda"


def _job_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    evaluate_job.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def two_runs(ray_session, realsr_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two nightly evaluations of the same set into one history: run 1 scores bicubic results (one file
    corrupt), run 2 scores the HR images themselves, so PSNR goes up."""
    base = tmp_path_factory.mktemp("runs")
    entries = load_dataset("realsr", str(realsr_tree))
    run1, run2 = base / "run1", base / "run2"
    for e in entries:
        name = Path(e.lr).name
        lr = load_image(e.lr)
        save_png(F.interpolate(lr[None], scale_factor=4, mode="bicubic")[0].clamp(0, 1), run1 / name)
        save_png(load_image(e.hr), run2 / name)
    (run1 / "Nikon_002_LR4.png").write_bytes(b"not a png")
    group_map = Image.fromarray(np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8))  # 0/1/2 per patch
    for results in (run1, run2):
        group_map.save(results / "Canon_001_groups.png")
    manifest = pd.DataFrame({"output": [str(run1 / "Canon_001_LR4.png")], "status": ["ok"],
                             "model_version": ["m-123"], "rtm_version": ["r-9"],
                             "seconds_grm": [1.5], "seconds_dit": [2.0]})
    manifest.to_parquet(run1 / "manifest.parquet")
    out, codes = base / "out", []
    for n, results in enumerate((run1, run2)):
        codes.append(evaluate_job.run(_job_args([
            "--results", str(results), "--dataset", f"realsr={realsr_tree}", "--metrics", "psnr,ssim,piqe",
            "--out", str(out), "--metric-cache", str(base / "empty-cache"), "--run-id", f"night-{n}",
            "--history", str(out / "history.parquet")])))
    return {"out": out, "codes": codes, "run1": run1}


def test_parquet_tables(two_runs: dict[str, object]) -> None:
    out = two_runs["out"]
    assert two_runs["codes"] == [1, 0]  # run 1 has a corrupt image
    assert pq.read_schema(out / "scores.parquet").remove_metadata() == RESULT_SCHEMA
    assert pq.read_schema(out / "summary.parquet").remove_metadata() == SUMMARY_SCHEMA
    assert pq.read_schema(out / "history.parquet").remove_metadata() == HISTORY_SCHEMA
    scores = pd.read_parquet(out / "scores.parquet")  # the latest run: HR images as results
    assert len(scores) == 4 * 3 and set(scores["metric"]) == {"psnr", "ssim", "piqe"}
    assert (scores.loc[scores["metric"] == "psnr", "value"] > 79.0).all()
    history = pd.read_parquet(out / "history.parquet")
    first = history[history["run_id"] == "night-0"].set_index("metric")
    assert first.loc["psnr", "count"] == 3 and first.loc["psnr", "failed"] == 1
    assert first.loc["psnr", "model_version"] == "m-123" and first.loc["psnr", "rtm_version"] == "r-9"
    assert first.loc["psnr", "mean_runtime_s"] == pytest.approx(3.5)  # one image known from the manifest
    assert bool(first.loc["piqe", "lower_better"]) and not bool(first.loc["psnr", "lower_better"])


def test_report_renders_with_trend(two_runs: dict[str, object]) -> None:
    out = two_runs["out"]
    history = pd.read_parquet(out / "history.parquet")
    assert list(history.drop_duplicates("run_id")["run_id"]) == ["night-0", "night-1"]
    psnr = history[history["metric"] == "psnr"].set_index("run_id")["mean"]
    assert psnr["night-1"] > psnr["night-0"]
    page = (out / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<table>" in page and "PatchScaler (paper)" in page and "0.5085" in page  # Table 2, RealSR
    assert "Trend over 2 run(s)" in page
    md = (out / "report.md").read_text()
    psnr_row = next(line for line in md.splitlines() if line.startswith("| realsr | psnr |") and "(" in line)
    assert "(better)" in psnr_row
    pngs = sorted(p.name for p in out.glob("*.png"))
    expected = ("trend.png", "runtime.png", "dist_psnr.png", "dist_ssim.png", "dist_piqe.png",
                "crops_000.png", "groups_000.png")
    for name in expected:
        assert name in pngs and f"src='{name}'" in page
    for name in pngs:
        with Image.open(out / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] > 50
