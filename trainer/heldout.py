"""Quality of a checkpoint on the held-out sets, and the demo model's gates: what its model card reports.

For every (LR, HR) pair of a held-out set (``trainer/heldout_sets.py``: ``heavy`` = ``assets/samples``,
``mild`` = a mild degradation made here; the HR images of ``assets/heldout`` were never trained on):

- ``bicubic``: the x``scale`` bicubic image;
- ``autoencoder``: decode(encode(HR)), the ceiling of everything that works in latent space;
- ``grm``: the GRM's coarse latent y_HR decoded, no diffusion, no colour fix;
- ``fast``: ``refine="none"`` with the default colour fix (``patchscaler upscale --refine none``);
- ``model_raw``: the reference upscaler (adaptive PGS, seed 0) without colour fix;
- ``model``: the same with the default colour fix (``patchscaler upscale`` with its defaults);

scored against the HR image: PSNR and SSIM on the Y channel (pyiqa, the SR convention), RGB PSNR, the
colour shift (|mean(out) - mean(HR)| per RGB channel, in 1/255), the sharpness ratio (mean gradient
magnitude of the luma relative to the HR image's: 1 is HR-sharp, bicubic is below 1) and the seam ratio
(``seam_ratio``: the mean luma step across the Patch-DiT patch borders over the mean step elsewhere; 1 is
no grid). Deterministic: the same weights, RTM and images give the same numbers. ``gates`` checks them
against the bars of issue #10 (heavy set) and issue #16 (both sets).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from trainer.heldout_sets import SETS, heldout_pairs

METHODS = ("bicubic", "autoencoder", "grm", "fast", "model_raw", "model")


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


def signed_shift(out: torch.Tensor, hr: torch.Tensor) -> list[float]:
    """mean(out_c) - mean(hr_c) per RGB channel, in 1/255 (positive: ``out`` is too bright in c)."""
    return [round(float(out[c].mean() - hr[c].mean()) * 255, 3) for c in range(3)]


def seam_steps(image: torch.Tensor, stride: int) -> tuple[float, float]:
    """(mean |luma step| across the lines x, y = k * ``stride`` (k >= 1), mean |luma step| elsewhere) of a
    (3, H, W) image: the steps between neighbouring pixels, horizontal and vertical together. With
    ``stride`` = the latent patch stride x the autoencoder factor the first are the steps across the
    Patch-DiT patch borders; a visible patch grid makes them larger than the second."""
    y = luma(image.clamp(0, 1))  # (H, W)
    dx = (y[:, 1:] - y[:, :-1]).abs()  # (H, W-1): step between column j and j+1
    dy = (y[1:, :] - y[:-1, :]).abs()  # (H-1, W)
    on_x = (torch.arange(1, y.shape[1]) % stride) == 0  # (W-1,): column j+1 starts a patch
    on_y = (torch.arange(1, y.shape[0]) % stride) == 0  # (H-1,)
    seam = torch.cat([dx[:, on_x].flatten(), dy[on_y, :].flatten()])
    inside = torch.cat([dx[:, ~on_x].flatten(), dy[~on_y, :].flatten()])
    return float(seam.mean()) if len(seam) else 0.0, float(inside.mean())


def seam_ratio(image: torch.Tensor, stride: int) -> float:
    seam, inside = seam_steps(image, stride)
    return seam / max(inside, 1e-12)


@torch.no_grad()
def upscale_cached(upscaler: Any, lr: torch.Tensor, *, seed: int, name: str, cache: str | None,
                   refresh: bool = False, only_cached: bool = False) -> Any:
    """``upscaler.upscale(lr, seed)`` (its image, group counts and group map), read from or written to
    ``cache``/KEY.pt when ``cache`` is a folder; KEY names the weights version, the image, the sampler
    mode, refine, colour fix, precision and seed, so a cached result is what the call would return
    (the computation is deterministic on CPU). For the bench scripts: sampling is their whole cost.
    ``refresh``: compute even when cached (a timed run), and write the result; ``only_cached``: return
    None instead of computing."""
    from types import SimpleNamespace

    path = None
    if cache:
        model = upscaler.model
        key = (f"{model.version}-{name}-{model.config.sampler.mode}-{upscaler.refine}-{upscaler.color_fix}"
               f"-{upscaler.precision}-seed{seed}")
        path = Path(cache) / f"{key}.pt"
        if path.exists() and not refresh:
            return SimpleNamespace(**torch.load(path))
    if only_cached:
        return None
    result = upscaler.upscale(lr, generator=torch.Generator().manual_seed(seed))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"image": result.image, "group_counts": result.group_counts,
                    "group_map": result.group_map}, path)
    return result


@torch.no_grad()
def outputs(upscaler: Any, lr: torch.Tensor, hr: torch.Tensor, seed: int, *, color_fix: str | None = None,
            name: str = "", cache: str | None = None) -> tuple[dict[str, torch.Tensor], Any]:
    """The images of one held-out pair (``METHODS``), each (3, H, W) like ``hr``, and the upscaler's
    result; ``upscaler`` must have ``color_fix="none"`` (the fix is applied here, ``color_fix`` or the
    default, exactly as ``PatchScaler.upscale`` applies it after decoding)."""
    from patchscaler.autoencoder import upscale_input
    from patchscaler.colorfix import DEFAULT_COLOR_FIX
    from patchscaler.upscaler import PatchScaler, fix_colors, restore

    if upscaler.color_fix != "none":
        raise ValueError("outputs() needs an upscaler without colour fix")
    fix = color_fix or DEFAULT_COLOR_FIX
    model = upscaler.model
    f, s = model.autoencoder.factor, model.config.scale
    h, w = hr.shape[-2:]
    hr_pad = F.pad(hr[None], (0, (-w) % f, 0, (-h) % f), mode="replicate")  # (1, 3, H', W')
    ae = model.autoencoder.decode(model.autoencoder.encode(hr_pad))[0, :, :h, :w]
    y_hr, _ = restore(model, lr)  # (C, H'/f, W'/f)
    grm = model.autoencoder.decode(y_hr[None])[0, :, : lr.shape[-2] * s, : lr.shape[-1] * s]
    fast = PatchScaler(model=model, rtm=upscaler.rtm, precision=upscaler.precision, refine="none",
                       color_fix=fix).upscale(lr, generator=torch.Generator().manual_seed(seed)).image
    result = upscale_cached(upscaler, lr, seed=seed, name=name, cache=cache)
    bicubic = upscale_input(lr[None], s)[0]
    return {"bicubic": bicubic, "autoencoder": ae, "grm": grm, "fast": fast, "model_raw": result.image,
            "model": fix_colors(result.image, lr, scale=s, method=fix)}, result


def score(img: torch.Tensor, hr: torch.Tensor, metrics: dict[str, Any], *, seam_stride: int
          ) -> dict[str, Any]:
    """The scores of one image against its HR image (module docstring)."""
    img = img.clamp(0, 1)
    scores = {k: round(float(m(img[None], hr[None])), 4) for k, m in metrics.items()}
    scores["rgb_psnr"] = round(rgb_psnr(img, hr), 4)
    scores["color_shift"] = color_shift(img, hr)
    scores["sharpness"] = round(gradient_magnitude(img) / gradient_magnitude(hr), 4)
    scores["seam_ratio"] = round(seam_ratio(img, seam_stride), 4)
    return scores


def measure_set(upscaler: Any, kind: str, *, heldout: str, samples: str, seed: int,
                metrics: dict[str, Any], cache: str | None = None) -> tuple[dict[str, Any], list]:
    """(report of held-out set ``kind``: per image, means, group counts, gates; the figure's panels)."""
    from patchscaler.pgs import GROUP_NAMES

    model = upscaler.model
    stride = model.config.sampler.patch_size - model.config.sampler.overlap
    seam_stride = stride * model.autoencoder.factor  # latent patch stride in output pixels
    results: dict[str, dict[str, dict[str, Any]]] = {}
    groups = dict.fromkeys(GROUP_NAMES, 0)
    panels = []
    for name, lr, hr in heldout_pairs(kind, heldout=heldout, samples=samples, scale=model.config.scale):
        images, result = outputs(upscaler, lr, hr, seed, name=f"{kind}-{name}", cache=cache)
        if images["model"].shape != hr.shape:
            raise ValueError(f"{name}: upscaled {tuple(images['model'].shape)} but HR is {tuple(hr.shape)}")
        results[name] = {m: score(img, hr, metrics, seam_stride=seam_stride) for m, img in images.items()}
        for group, count in result.group_counts.items():
            groups[group] += count
        panels.append((name, lr, images, hr, result))
    mean = {method: _mean([r[method] for r in results.values()]) for method in METHODS}
    report = {"images": results, "mean": mean, "groups": groups, "seam_stride": seam_stride}
    report["gates"] = gates(report, kind)
    return report, panels


def measure_heldout(weights: str, rtm: str, *, heldout: str, samples: str, seed: int = 0,
                    figure: str | None = None, cache: str | None = None) -> dict[str, Any]:
    """``{"sets": {"heavy": report, "mild": report}, ...}`` (``measure_set``); with ``figure`` also
    writes the card's comparison figures (``heldout_figure``): ``figure`` for the heavy set and
    ``figure`` with ``_mild`` before its suffix for the mild one. ``cache``: ``upscale_cached``."""
    from patchscaler.colorfix import DEFAULT_COLOR_FIX
    from patchscaler.upscaler import PatchScaler
    from patchscaler.weights import load_checkpoint, load_rtm

    model = load_checkpoint(weights)
    memory, _ = load_rtm(rtm)
    upscaler = PatchScaler(model=model, rtm=memory, color_fix="none")
    metrics = _metrics()
    sets = {}
    for kind in SETS:
        sets[kind], panels = measure_set(upscaler, kind, heldout=heldout, samples=samples, seed=seed,
                                         metrics=metrics, cache=cache)
        if figure is not None:
            heldout_figure(panels, figure if kind == "heavy" else figure_path(figure, kind))
    return {"sets": sets, "seed": seed, "color_fix": DEFAULT_COLOR_FIX, "model_version": model.version}


def figure_path(figure: str, kind: str) -> str:
    stem, dot, suffix = figure.rpartition(".")
    return f"{stem}_{kind}{dot}{suffix}"


def _mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rows[0]:
        if isinstance(rows[0][key], list):
            out[key] = [round(sum(r[key][i] for r in rows) / len(rows), 3) for i in range(len(rows[0][key]))]
        else:
            out[key] = round(sum(r[key] for r in rows) / len(rows), 4)
    return out


def gates(report: dict[str, Any], kind: str = "heavy") -> dict[str, dict[str, Any]]:
    """The bars on the held-out means of one set, each ``{"value", "bar", "pass"}``: issue #16's on both
    sets, issue #10's (the demo's first bars) on the heavy set only."""
    m = report["mean"]
    every_image = max(max(r["model"]["color_shift"]) for r in report["images"].values())
    out = {
        "model_psnr_y_vs_bicubic": (round(m["model"]["psnr"] - m["bicubic"]["psnr"], 3), ">= -0.3 dB",
                                    m["model"]["psnr"] >= m["bicubic"]["psnr"] - 0.3),
        "grm_psnr_y_vs_bicubic": (round(m["grm"]["psnr"] - m["bicubic"]["psnr"], 3), ">= 0 dB",
                                  m["grm"]["psnr"] >= m["bicubic"]["psnr"]),
        "model_color_shift_every_image": (round(every_image, 3), "<= 2/255 on every image",
                                          every_image <= 2.0),
        "model_seam_ratio": (m["model"]["seam_ratio"], "<= 1 (seam step / inside step)",
                             m["model"]["seam_ratio"] <= 1.0),
    }
    if kind == "heavy":
        total = sum(report["groups"].values())
        shares = {g: n / total for g, n in report["groups"].items()} if total else {}
        sharp_model, sharp_bic = abs(m["model"]["sharpness"] - 1), abs(m["bicubic"]["sharpness"] - 1)
        out |= {
            "autoencoder_rgb_psnr": (m["autoencoder"]["rgb_psnr"], ">= 28 dB (#10)",
                                     m["autoencoder"]["rgb_psnr"] >= 28.0),
            "grm_psnr_y_over_bicubic": (round(m["grm"]["psnr"] - m["bicubic"]["psnr"], 3), ">= +0.3 dB (#10)",
                                        m["grm"]["psnr"] >= m["bicubic"]["psnr"] + 0.3),
            "model_sharper_than_bicubic": ([m["model"]["sharpness"], m["bicubic"]["sharpness"]],
                                           "|model - 1| < |bicubic - 1| (#10)", sharp_model < sharp_bic),
            "group_shares": ({g: round(s, 3) for g, s in shares.items()}, "each in [0.10, 0.70] (#10)",
                             bool(shares) and all(0.10 <= s <= 0.70 for s in shares.values())),
        }
    margins = {  # how far inside (+) or outside (-) the bar the value is, in the value's unit
        "model_psnr_y_vs_bicubic": out["model_psnr_y_vs_bicubic"][0] + 0.3,
        "grm_psnr_y_vs_bicubic": out["grm_psnr_y_vs_bicubic"][0],
        "model_color_shift_every_image": 2.0 - out["model_color_shift_every_image"][0],
        "model_seam_ratio": 1.0 - out["model_seam_ratio"][0],
        "autoencoder_rgb_psnr": out.get("autoencoder_rgb_psnr", (28.0,))[0] - 28.0,
        "grm_psnr_y_over_bicubic": out.get("grm_psnr_y_over_bicubic", (0.3,))[0] - 0.3,
    }
    return {k: {"value": v, "bar": bar, "pass": bool(ok)}
            | ({"margin": round(margins[k], 3)} if k in margins else {})
            for k, (v, bar, ok) in out.items()}


def heldout_figure(panels: list[tuple[str, torch.Tensor, dict[str, torch.Tensor], torch.Tensor, Any]],
                   path: str, crop: int = 160) -> None:
    """One row per image: LR (nearest x4) | bicubic | GRM only | PatchScaler without and with the colour
    fix | HR | group map, each a
    ``crop`` x ``crop`` centre crop at HR size; the group map is green / yellow / red (simple / medium /
    hard) over the HR image."""
    from PIL import Image, ImageDraw

    palette = torch.tensor([[46, 204, 113], [241, 196, 15], [231, 76, 60]], dtype=torch.float32) / 255
    titles = ("LR (x4 nearest)", "bicubic", "GRM only", "PatchScaler raw", "+ colour fix", "HR", "groups")
    rows = []
    for _, lr, images, hr, result in panels:
        h, w = hr.shape[-2:]
        c = min(crop, h, w)
        top, left = (h - c) // 2, (w - c) // 2
        lr_up = F.interpolate(lr[None], size=(h, w), mode="nearest")[0]
        gmap = F.interpolate(result.group_map[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        overlay = 0.45 * hr + 0.55 * palette[gmap].permute(2, 0, 1)
        tiles = [lr_up, images["bicubic"], images["grm"], images["model_raw"], images["model"], hr, overlay]
        rows.append(torch.cat([t.clamp(0, 1)[:, top:top + c, left:left + c] for t in tiles], dim=2))
    width = max(r.shape[-1] for r in rows)
    rows = [F.pad(r, (0, width - r.shape[-1])) for r in rows]
    grid = torch.cat(rows, dim=1)  # (3, sum of crops, 7 * crop)
    arr = (grid.permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).numpy()
    header = 14
    canvas = Image.new("RGB", (arr.shape[1], arr.shape[0] + header), "white")
    canvas.paste(Image.fromarray(arr), (0, header))
    draw = ImageDraw.Draw(canvas)
    step = arr.shape[1] // len(titles)
    for i, title in enumerate(titles):
        draw.text((i * step + 3, 1), title, fill="black")
    canvas.save(path, optimize=True)
