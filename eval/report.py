"""The evaluation report: static Markdown + HTML with PNG figures, written next to the Parquet tables.

Sections: this run's scores; the same scores next to the paper's Tables 1-2 (for sets named ``lsdir…``,
``realsr…``, ``realset…``); the trend over the runs in the history; metric distributions and runtimes;
LR-bicubic / ours / HR crops; the group (or confidence) map drawn over the upscaled image, like the
paper's Fig. 7, for images that have one.
"""

from __future__ import annotations

import html
import io
import math
import time
from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.patches import Patch
from PIL import Image

from eval.datasets import load_image
from eval.metrics import METRICS, PYIQA_VERSION
from eval.paper import REPORT_BASELINES, paper_dataset, paper_rows
from pipeline.io import join, read_bytes, write_bytes_atomic

GROUP_COLORS = np.array([[46, 204, 113], [241, 196, 15], [231, 76, 60]], dtype=np.uint8)  # simple/medium/hard
GROUP_NAMES = ("simple", "medium", "hard")
TREND_RUNS = 6  # runs shown in the trend table
MD_FILE, HTML_FILE = "report.md", "report.html"


@dataclass(frozen=True)
class ReportFiles:
    markdown: str
    html: str
    images: tuple[str, ...]


class _Doc:
    """Builds the Markdown and the HTML side by side."""

    def __init__(self, title: str) -> None:
        self.md = [f"# {title}", ""]
        self.html = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                     "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:"
                     "collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
                     "th:first-child,td:first-child{text-align:left}img{max-width:100%}.ours{font-weight:"
                     "bold;background:#eef}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str) -> None:
        self.md += [f"## {text}", ""]
        self.html.append(f"<h2>{html.escape(text)}</h2>")

    def para(self, text: str) -> None:
        self.md += [text, ""]
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, headers: list[str], rows: list[list[str]],
              bold_rows: frozenset[int] = frozenset()) -> None:
        self.md.append("| " + " | ".join(headers) + " |")
        self.md.append("|" + "|".join("---" for _ in headers) + "|")
        self.html.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>")
        for i, row in enumerate(rows):
            cells = [f"**{c}**" for c in row] if i in bold_rows else row
            self.md.append("| " + " | ".join(cells) + " |")
            cls = " class='ours'" if i in bold_rows else ""
            self.html.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
        self.md.append("")
        self.html.append("</table>")

    def image(self, name: str, caption: str) -> None:
        self.md += [f"![{caption}]({name})", ""]
        self.html.append(f"<figure><img src='{html.escape(name)}' alt='{html.escape(caption)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")


_TWO_DECIMALS = frozenset({"psnr", "musiq", "piqe", "niqe", "brisque", "runtime"})  # as the paper prints them


def _fmt(value: float, metric: str = "") -> str:
    if value is None or not math.isfinite(value):
        return "—"
    two = metric in _TWO_DECIMALS or (metric not in METRICS and abs(value) >= 10)
    return f"{value:.2f}" if two else f"{value:.4f}"


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


class _Writer:
    def __init__(self, out: str, options: dict[str, Any]) -> None:
        self.out, self.options, self.images = out, options, []

    def figure(self, name: str, fig: plt.Figure) -> str:
        write_bytes_atomic(join(self.out, name), _png(fig), self.options)
        self.images.append(join(self.out, name))
        return name


def _summary_section(doc: _Doc, summary: pd.DataFrame) -> None:
    doc.heading("Scores")
    rows = [[r.dataset, r.metric + (" (lower is better)" if r.lower_better else ""),
             f"{_fmt(r.mean, r.metric)} ± {_fmt(r.std, r.metric)}", str(r.count), str(r.failed),
             _fmt(r.mean_runtime_s, "runtime")] for r in summary.itertuples()]
    doc.table(["dataset", "metric", "mean ± std", "images", "failed", "upscale s/image"], rows)
    notes = sorted({f"{m}: {METRICS[m].note}" for m in summary["metric"] if m in METRICS and METRICS[m].note})
    if notes:
        doc.para(f"pyiqa {PYIQA_VERSION}. " + "; ".join(notes) + ".")


def _paper_section(doc: _Doc, summary: pd.DataFrame) -> None:
    shown = False
    for dataset in sorted(summary["dataset"].unique()):
        paper = paper_dataset(dataset)
        if paper is None:
            continue
        if not shown:
            doc.heading("Next to the paper (Tables 1-2)")
            shown = True
        columns, table = paper_rows(paper)
        ours = summary[summary["dataset"] == dataset]
        cells, used = [], []
        for col in columns:  # the first of our metrics that is this paper column
            match = [r for r in ours.itertuples()
                     if r.metric in METRICS and METRICS[r.metric].paper_name == col]
            cells.append(_fmt(match[0].mean, match[0].metric) if match else "—")
            used += [f"{col} = {match[0].metric}"] if match else []
        rows = [[m, *table[m]] for m in REPORT_BASELINES if m in table] + [["PatchScaler (this run)", *cells]]
        doc.para(f"{dataset} vs the paper's {paper}" + (f" ({', '.join(used)})" if used else ""))
        doc.table(["method", *columns], rows, bold_rows=frozenset({len(rows) - 1}))


def _trend_section(doc: _Doc, writer: _Writer, history: pd.DataFrame) -> None:
    if history.empty:
        return
    runs = history.drop_duplicates("run_id").sort_values("timestamp", kind="stable")["run_id"].tolist()
    doc.heading(f"Trend over {len(runs)} run(s)")
    shown = runs[-TREND_RUNS:]
    rows = []
    for (dataset, metric), g in history.groupby(["dataset", "metric"], sort=True):
        means = {r.run_id: r.mean for r in g.itertuples()}
        values = [means.get(r, math.nan) for r in shown]
        change = "—"
        if len(values) >= 2 and math.isfinite(values[-1]) and math.isfinite(values[-2]):
            delta = values[-1] - values[-2]
            lower = bool(g["lower_better"].iloc[-1])
            verdict = "same" if delta == 0 else ("better" if (delta < 0) == lower else "worse")
            change = f"{delta:+.4g} ({verdict})"
        rows.append([dataset, metric, *[_fmt(v, metric) for v in values], change])
    doc.table(["dataset", "metric", *shown, "last change"], rows)
    first = float(history.loc[history["run_id"] == shown[0], "timestamp"].iloc[0])
    doc.para(f"Columns: the last {len(shown)} runs, oldest first (from "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(first))}); last change: last run minus "
             "the one before, better/worse by the metric's direction.")
    metrics = sorted(history["metric"].unique())
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for dataset, g in history[history["metric"] == metric].groupby("dataset"):
            x = [runs.index(r) for r in g["run_id"]]
            ax.plot(x, g["mean"], marker="o", label=dataset)
        ax.set_title(metric + (" ↓" if METRICS.get(metric) and METRICS[metric].lower_better else ""))
        ax.set_xticks(range(len(runs)), runs, rotation=45, ha="right", fontsize=7)
        ax.legend(fontsize=7)
    doc.image(writer.figure("trend.png", fig), "metric means per run (oldest left)")


def _distribution_section(doc: _Doc, writer: _Writer, results: pd.DataFrame) -> None:
    doc.heading("Distributions and runtime")
    for metric, g in results.groupby("metric", sort=True):
        fig, ax = plt.subplots(figsize=(5, 3))
        for dataset, d in g.groupby("dataset"):
            values = d["value"].to_numpy(dtype=np.float64)
            values = values[np.isfinite(values)]
            if values.size:
                ax.hist(values, bins=min(20, max(3, values.size)), alpha=0.6,
                        label=f"{dataset} (n={values.size})")
        ax.set_xlabel(metric)
        ax.set_ylabel("images")
        ax.legend(fontsize=7)
        doc.image(writer.figure(f"dist_{metric}.png", fig), f"{metric} per image")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3), layout="constrained")
    per_image = results.drop_duplicates(["dataset", "image_id"])
    for dataset, d in per_image.groupby("dataset"):
        runtime = d["runtime_s"].to_numpy(dtype=np.float64)
        runtime = runtime[np.isfinite(runtime)]
        if runtime.size:
            ax1.hist(runtime, bins=min(20, max(3, runtime.size)), alpha=0.6, label=dataset)
    ax1.set_xlabel("upscaling seconds per image (pipeline manifest)")
    if ax1.has_data():
        ax1.legend(fontsize=7)
    else:
        ax1.text(0.5, 0.5, "no upscaling times recorded", ha="center", va="center", transform=ax1.transAxes)
    cost = results.groupby("metric")["metric_s"].mean()
    ax2.bar(cost.index, cost.to_numpy())
    ax2.set_ylabel("scoring seconds per image")
    doc.image(writer.figure("runtime.png", fig), "runtime: upscaling (left), metrics (right)")


def _crop_box(h: int, w: int, size: int) -> tuple[int, int, int, int]:
    size = min(size, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    return top, left, top + size, left + size


def crop_panels(sr: torch.Tensor, lr: torch.Tensor | None, hr: torch.Tensor | None,
                size: int = 160) -> list[tuple[str, np.ndarray]]:
    """The same centre crop of the bicubic-upscaled LR, ours and the HR (what exists), as (title, HxWx3)."""
    h, w = sr.shape[-2:]
    top, left, bottom, right = _crop_box(h, w, size)
    panels = []
    if lr is not None:
        scale = w / lr.shape[-1]
        up = F.interpolate(lr[None], size=(h, w), mode="bicubic", align_corners=False)[0].clamp(0, 1)
        panels.append((f"LR (bicubic ×{scale:g})", up))
    panels.append(("PatchScaler (ours)", sr))
    if hr is not None and hr.shape[-2] >= bottom and hr.shape[-1] >= right:
        panels.append(("HR", hr))
    return [(t, img[:, top:bottom, left:right].permute(1, 2, 0).numpy()) for t, img in panels]  # (s, s, 3)


def map_overlay(sr: torch.Tensor, map_image: np.ndarray) -> tuple[np.ndarray, bool]:
    """``map_image`` (an RGB group map, a 0/1/2 index map or an 8-bit confidence map, any size) resized
    (nearest) onto ``sr``: (H, W, 3) blend for group maps, or (H, W) confidence in [0, 1]; and whether it
    is a group map."""
    h, w = sr.shape[-2:]
    img = Image.fromarray(map_image)
    arr = np.asarray(img.resize((w, h), Image.NEAREST))
    base = sr.permute(1, 2, 0).numpy()  # (H, W, 3)
    if arr.ndim == 2 and arr.max() <= 2:
        arr = GROUP_COLORS[arr]  # (H, W, 3)
    if arr.ndim == 3:
        return 0.55 * base + 0.45 * arr[..., :3].astype(np.float32) / 255.0, True
    return arr.astype(np.float32) / 255.0, False


def _example_section(doc: _Doc, writer: _Writer, results: pd.DataFrame,
                     maps: dict[tuple[str, str], dict[str, str]], per_dataset: int,
                     options: dict[str, Any]) -> None:
    images = results.drop_duplicates(["dataset", "image_id"])
    picks = []
    for dataset, d in images.groupby("dataset", sort=True):
        d = d.assign(has_map=[bool(maps.get((dataset, i))) for i in d["image_id"]])
        d = d.sort_values(["has_map", "image_id"], ascending=[False, True])
        picks += list(d.head(per_dataset).itertuples())
    if not picks:
        return
    doc.heading("Examples")
    for n, row in enumerate(picks):
        if not row.sr_path:
            continue
        sr = load_image(row.sr_path, options)
        lr = load_image(row.lr_path, options) if row.lr_path else None
        hr = load_image(row.hr_path, options) if row.hr_path else None
        panels = crop_panels(sr, lr, hr)
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
        for ax, (title, arr) in zip(axes[0], panels, strict=True):
            ax.imshow(arr)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        doc.image(writer.figure(f"crops_{n:03d}.png", fig), f"{row.dataset}/{row.image_id}: centre crop")
        for kind, uri in sorted(maps.get((row.dataset, row.image_id), {}).items()):
            with Image.open(io.BytesIO(read_bytes(uri, options))) as im:
                raw = np.asarray(im if im.mode == "L" else im.convert("RGB"))
            blend, is_groups = map_overlay(sr, raw)
            fig, ax = plt.subplots(figsize=(6, 6 * sr.shape[-2] / sr.shape[-1]))
            if is_groups:
                ax.imshow(blend)
                ax.legend(handles=[Patch(color=c / 255.0, label=g) for c, g in zip(GROUP_COLORS, GROUP_NAMES,
                                                                                   strict=True)],
                          loc="lower right", fontsize=8)
            else:
                ax.imshow(sr.permute(1, 2, 0).numpy())
                fig.colorbar(ax.imshow(blend, cmap="magma", alpha=0.5, vmin=0, vmax=1), ax=ax, shrink=0.7)
            ax.set_title(f"{row.image_id}: {kind} map", fontsize=9)
            ax.axis("off")
            doc.image(writer.figure(f"{kind}_{n:03d}.png", fig), f"{row.dataset}/{row.image_id}: {kind} map")


def render_report(*, results: pd.DataFrame, summary: pd.DataFrame, history: pd.DataFrame, out: str,
                  maps: dict[tuple[str, str], dict[str, str]] | None = None, run_id: str = "",
                  title: str = "PatchScaler evaluation", examples_per_dataset: int = 2,
                  options: dict[str, Any] | None = None) -> ReportFiles:
    """Write ``report.md``, ``report.html`` and their PNGs under ``out`` (folder or ``s3://`` prefix).
    ``maps``: (dataset, image id) -> {"groups": URI, "confidence": URI} of the images that have maps."""
    options = options or {}
    writer = _Writer(out, options)
    doc = _Doc(title)
    versions = sorted({v for v in results["model_version"] if v}) or ["unknown"]
    rtms = sorted({v for v in results["rtm_version"] if v}) or ["unknown"]
    doc.para(f"run {run_id or '-'} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · model "
             f"{', '.join(versions)} · RTM {', '.join(rtms)} · {results['image_id'].nunique()} images")
    _summary_section(doc, summary)
    _paper_section(doc, summary)
    _trend_section(doc, writer, history)
    if not results.empty:
        _distribution_section(doc, writer, results)
        _example_section(doc, writer, results, maps or {}, examples_per_dataset, options)
    doc.html.append("</body></html>")
    md_uri, html_uri = join(out, MD_FILE), join(out, HTML_FILE)
    write_bytes_atomic(md_uri, "\n".join(doc.md).encode(), options)
    write_bytes_atomic(html_uri, "\n".join(doc.html).encode(), options)
    return ReportFiles(md_uri, html_uri, tuple(writer.images))
