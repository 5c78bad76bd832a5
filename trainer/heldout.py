"""Quality of a checkpoint on held-out images, and the demo model's gates: what its model card reports.

For every LR image in ``samples`` with an HR image of the same name in ``heldout`` (never trained on):

- ``bicubic``: the x``scale`` bicubic image;
- ``autoencoder``: decode(encode(HR)), the ceiling of everything that works in latent space;
- ``grm``: the GRM's coarse latent y_HR decoded, no diffusion;
- ``model``: the reference upscaler (adaptive PGS, seed 0, as ``patchscaler upscale`` by default);

scored against the HR image: PSNR and SSIM on the Y channel (pyiqa, the SR convention), RGB PSNR, the
colour shift (|mean(out) - mean(HR)| per RGB channel, in 1/255) and the sharpness ratio (mean gradient
magnitude of the luma relative to the HR image's: 1 is HR-sharp, bicubic is below 1). Deterministic: the
same weights, RTM and images give the same numbers. ``gates`` checks them against the bars of issue #10.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainer.data import list_images, read_image

METHODS = ("bicubic", "autoencoder", "grm", "model")


def _metrics() -> dict[str, Any]:
    import pyiqa

    return {name: pyiqa.create_metric(name, test_y_channel=True, color_space="ycbcr", device="cpu")
            for name in ("psnr", "ssim")}


def luma(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) RGB in [0, 1] -> (H, W) BT.601 luma."""
    return 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]


def gradient_magnitude(image: torch.Tensor) -> float:
    """Mean |Sobel gradient| of the luma of a (3, H, W) image."""
    y = luma(image)[None, None]  # (1, 1, H, W)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    gx = F.conv2d(y, kx[None, None])  # (1, 1, H-2, W-2)
    gy = F.conv2d(y, kx.T[None, None])
    return float(torch.sqrt(gx**2 + gy**2).mean())


def rgb_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(0, 1) - b) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def color_shift(out: torch.Tensor, hr: torch.Tensor) -> list[float]:
    """|mean(out_c) - mean(hr_c)| per RGB channel, in 1/255."""
    return [round(abs(float(out[c].mean() - hr[c].mean())) * 255, 3) for c in range(3)]


@torch.no_grad()
def outputs(upscaler: Any, lr: torch.Tensor, hr: torch.Tensor, seed: int
            ) -> tuple[dict[str, torch.Tensor], Any]:
    """The four images of one held-out pair, each (3, H, W) like ``hr``, and the upscaler's result."""
    from patchscaler.autoencoder import upscale_input
    from patchscaler.upscaler import restore

    model = upscaler.model
    f, s = model.autoencoder.factor, model.config.scale
    h, w = hr.shape[-2:]
    hr_pad = F.pad(hr[None], (0, (-w) % f, 0, (-h) % f), mode="replicate")  # (1, 3, H', W')
    ae = model.autoencoder.decode(model.autoencoder.encode(hr_pad))[0, :, :h, :w]
    y_hr, _ = restore(model, lr)  # (C, H'/f, W'/f)
    grm = model.autoencoder.decode(y_hr[None])[0, :, : lr.shape[-2] * s, : lr.shape[-1] * s]
    result = upscaler.upscale(lr, generator=torch.Generator().manual_seed(seed))
    bicubic = upscale_input(lr[None], s)[0]
    return {"bicubic": bicubic, "autoencoder": ae, "grm": grm, "model": result.image}, result


def measure_heldout(weights: str, rtm: str, *, heldout: str, samples: str, seed: int = 0,
                    figure: str | None = None) -> dict[str, Any]:
    """Scores per image and method, their means, the group counts and the gates; with ``figure`` also
    writes the card's comparison figure (``heldout_figure``) there as a PNG."""
    from patchscaler.pgs import GROUP_NAMES
    from patchscaler.upscaler import PatchScaler
    from patchscaler.weights import load_checkpoint, load_rtm

    model = load_checkpoint(weights)
    memory, _ = load_rtm(rtm)
    upscaler = PatchScaler(model=model, rtm=memory)
    metrics = _metrics()
    hr_by_name = {Path(p).stem: p for p in list_images(heldout)}
    results: dict[str, dict[str, dict[str, Any]]] = {}
    groups = dict.fromkeys(GROUP_NAMES, 0)
    panels = []
    for lr_path in list_images(samples):
        name = Path(lr_path).stem
        if name not in hr_by_name:
            continue
        lr, hr = read_image(lr_path), read_image(hr_by_name[name])
        if lr is None or hr is None:
            raise ValueError(f"held-out pair {name} is unreadable")
        images, result = outputs(upscaler, lr, hr, seed)
        if images["model"].shape != hr.shape:
            raise ValueError(f"{name}: upscaled {tuple(images['model'].shape)} but HR is {tuple(hr.shape)}")
        hr_grad = gradient_magnitude(hr)
        results[name] = {}
        for method, img in images.items():
            img = img.clamp(0, 1)
            scores = {k: round(float(m(img[None], hr[None])), 4) for k, m in metrics.items()}
            scores["rgb_psnr"] = round(rgb_psnr(img, hr), 4)
            scores["color_shift"] = color_shift(img, hr)
            scores["sharpness"] = round(gradient_magnitude(img) / hr_grad, 4)
            results[name][method] = scores
        for group, count in result.group_counts.items():
            groups[group] += count
        panels.append((name, lr, images, hr, result))
    if not results:
        raise ValueError(f"no LR sample in {samples} has an HR image in {heldout}")
    mean = {method: _mean([r[method] for r in results.values()]) for method in METHODS}
    report = {"images": results, "mean": mean, "groups": groups, "seed": seed, "model_version": model.version}
    report["gates"] = gates(report)
    if figure is not None:
        heldout_figure(panels, figure)
    return report


def _mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        if isinstance(rows[0][key], list):
            out[key] = [round(sum(r[key][i] for r in rows) / len(rows), 3) for i in range(len(rows[0][key]))]
        else:
            out[key] = round(sum(r[key] for r in rows) / len(rows), 4)
    return out


def gates(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue #10's bars on the held-out means: each ``{"value", "bar", "pass"}``."""
    m = report["mean"]
    total = sum(report["groups"].values())
    shares = {g: n / total for g, n in report["groups"].items()} if total else {}
    sharp_model, sharp_bic = abs(m["model"]["sharpness"] - 1), abs(m["bicubic"]["sharpness"] - 1)
    out = {
        "autoencoder_rgb_psnr": (m["autoencoder"]["rgb_psnr"], ">= 28 dB",
                                 m["autoencoder"]["rgb_psnr"] >= 28.0),
        "grm_psnr_y_over_bicubic": (round(m["grm"]["psnr"] - m["bicubic"]["psnr"], 3), ">= +0.3 dB",
                                    m["grm"]["psnr"] >= m["bicubic"]["psnr"] + 0.3),
        "model_psnr_y_over_bicubic": (round(m["model"]["psnr"] - m["bicubic"]["psnr"], 3), ">= -0.5 dB",
                                      m["model"]["psnr"] >= m["bicubic"]["psnr"] - 0.5),
        "model_color_shift": (max(m["model"]["color_shift"]), "<= 3/255 per channel",
                              max(m["model"]["color_shift"]) <= 3.0),
        "model_sharper_than_bicubic": ([m["model"]["sharpness"], m["bicubic"]["sharpness"]],
                                       "|model - 1| < |bicubic - 1|", sharp_model < sharp_bic),
        "group_shares": ({g: round(s, 3) for g, s in shares.items()}, "each in [0.10, 0.70]",
                         bool(shares) and all(0.10 <= s <= 0.70 for s in shares.values())),
    }
    return {k: {"value": v, "bar": bar, "pass": bool(ok)} for k, (v, bar, ok) in out.items()}


def heldout_figure(panels: list[tuple[str, torch.Tensor, dict[str, torch.Tensor], torch.Tensor, Any]],
                   path: str, crop: int = 160) -> None:
    """One row per image: LR (nearest x4) | bicubic | GRM only | PatchScaler | HR | group map, each a
    ``crop`` x ``crop`` centre crop at HR size; the group map is green / yellow / red (simple / medium /
    hard) over the HR image."""
    from PIL import Image, ImageDraw

    palette = torch.tensor([[46, 204, 113], [241, 196, 15], [231, 76, 60]], dtype=torch.float32) / 255
    titles = ("LR (x4 nearest)", "bicubic", "GRM only", "PatchScaler", "HR", "groups")
    rows = []
    for _, lr, images, hr, result in panels:
        h, w = hr.shape[-2:]
        c = min(crop, h, w)
        top, left = (h - c) // 2, (w - c) // 2
        lr_up = F.interpolate(lr[None], size=(h, w), mode="nearest")[0]
        gmap = F.interpolate(result.group_map[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        overlay = 0.45 * hr + 0.55 * palette[gmap].permute(2, 0, 1)
        tiles = [lr_up, images["bicubic"], images["grm"], images["model"], hr, overlay]
        rows.append(torch.cat([t.clamp(0, 1)[:, top:top + c, left:left + c] for t in tiles], dim=2))
    width = max(r.shape[-1] for r in rows)
    rows = [F.pad(r, (0, width - r.shape[-1])) for r in rows]
    grid = torch.cat(rows, dim=1)  # (3, sum of crops, 6 * crop)
    arr = (grid.permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy()
    header = 14
    canvas = Image.new("RGB", (arr.shape[1], arr.shape[0] + header), "white")
    canvas.paste(Image.fromarray(arr), (0, header))
    draw = ImageDraw.Draw(canvas)
    step = arr.shape[1] // len(titles)
    for i, title in enumerate(titles):
        draw.text((i * step + 3, 1), title, fill="black")
    canvas.save(path, optimize=True)
