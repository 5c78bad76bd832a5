"""The evaluation report: static Markdown + HTML with PNG figures, written next to the Parquet tables.

Sections: this run's scores (per set, method and metric); the same scores next to the paper's Tables 1-2
(only for the paper's own sets: ``lsdir-test``, ``realsr``, ``realset110``), every measured method side by
side with the paper's rows; the regression gate against the baseline run; the trend over the runs in the
history, dated, with the upscaling runtime; for triage the worst images per set and metric and the biggest
per-image drops since the baseline run (with crops of both runs' outputs); metric distributions and
runtimes; LR-bicubic / ours / HR crops; the group (or confidence) map drawn over the upscaled image, like
the paper's Fig. 7, for images that have one.
"""

from __future__ import annotations

import datetime as dt
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
from eval.gate import GateResult, lower_is_better, movers
from eval.metrics import METRICS, PAPER_METRICS
from eval.paper import REPORT_BASELINES, paper_dataset, paper_rows
from pipeline.io import join, read_bytes, write_bytes_atomic
from pipeline.scores import DEFAULT_METHOD

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


def _summary_section(doc: _Doc, summary: pd.DataFrame, iqa_version: str) -> None:
    doc.heading("Scores")
    rows = [[r.dataset, r.method, r.metric + (" (lower is better)" if r.lower_better else ""),
             f"{_fmt(r.mean, r.metric)} ± {_fmt(r.std, r.metric)}", str(r.count), str(r.failed),
             _fmt(r.mean_runtime_s, "runtime")] for r in summary.itertuples()]
    doc.table(["dataset", "method", "metric", "mean ± std", "images", "failed", "upscale s/image"], rows)
    notes = sorted({f"{m}: {METRICS[m].note}" for m in summary["metric"] if m in METRICS and METRICS[m].note})
    if notes:
        doc.para(f"pyiqa {iqa_version or 'unknown'}. " + "; ".join(notes) + ".")


def _paper_metric(rows: pd.DataFrame, column: str) -> str | None:
    """Which of our metrics fills a paper column: the paper's variant (``PAPER_METRICS``) first."""
    names = sorted({m for m in rows["metric"] if m in METRICS and METRICS[m].paper_name == column},
                   key=lambda m: (m not in PAPER_METRICS, m))
    return names[0] if names else None


def _label(method: str) -> str:
    return "PatchScaler (this run)" if method == DEFAULT_METHOD else f"{method} (this run)"


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
        chosen = {col: _paper_metric(ours, col) for col in columns}
        used = [f"{col} = {m}" for col, m in chosen.items() if m]
        rows = [[m, *table[m]] for m in REPORT_BASELINES if m in table]
        measured = [DEFAULT_METHOD] * (DEFAULT_METHOD in set(ours["method"]))
        measured += sorted(m for m in set(ours["method"]) if m != DEFAULT_METHOD)
        bold = set()
        for method in measured:  # every method measured in this run, side by side with the paper's rows
            mine = ours[ours["method"] == method].set_index("metric")
            cells = [_fmt(mine.loc[m, "mean"], m) if m and m in mine.index else "—" for m in chosen.values()]
            if method == DEFAULT_METHOD:
                bold.add(len(rows))
            rows.append([_label(method), *cells])
        doc.para(f"{dataset} vs the paper's {paper}" + (f" ({', '.join(used)})" if used else ""))
        doc.table(["method", *columns], rows, bold_rows=frozenset(bold))
        extra = sorted(set(ours["metric"]) - {m for m in chosen.values() if m})
        if extra:
            doc.para("Also measured, no column of the paper's table: " + ", ".join(
                f"{m} = {_fmt(r.mean, m)} ({r.method})" for m in extra
                for r in ours[ours["metric"] == m].itertuples()) + ".")


def _date(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(float(timestamp), dt.timezone.utc)


def _gate_section(doc: _Doc, gate: GateResult | None) -> None:
    if gate is None or not gate.baseline_runs:
        return
    doc.heading("Regression gate")
    doc.para(f"Against run(s) {', '.join(gate.baseline_runs)}: {gate.compared} (set, method, metric) "
             f"compared, {len(gate.regressions)} past their tolerance.")
    if gate.regressions:
        doc.table(["dataset", "method", "metric", "baseline", "this run", "change", "tolerance",
                   "images that moved most"],
                  [[g["set"], g["method"], g["metric"], _fmt(g["baseline"] or math.nan, g["metric"]),
                    _fmt(g["value"] if g["value"] is not None else math.nan, g["metric"]),
                    f"{g['delta']:+.4g}" if g["delta"] is not None else "—", f"{g['tolerance']:g}",
                    ", ".join(i["image_id"] for i in g["images"])] for g in gate.regressions])


def _trend_section(doc: _Doc, writer: _Writer, history: pd.DataFrame) -> None:
    if history.empty:
        return
    runs = history.drop_duplicates("run_id").sort_values("timestamp", kind="stable")["run_id"].tolist()
    doc.heading(f"Trend over {len(runs)} run(s)")
    shown = runs[-TREND_RUNS:]
    rows = []
    for (dataset, metric, method), g in history.groupby(["dataset", "metric", "method"], sort=True):
        means = {r.run_id: r.mean for r in g.itertuples()}
        values = [means.get(r, math.nan) for r in shown]
        change = "—"
        if len(values) >= 2 and math.isfinite(values[-1]) and math.isfinite(values[-2]):
            delta = values[-1] - values[-2]
            lower = bool(g["lower_better"].iloc[-1])
            verdict = "same" if delta == 0 else ("better" if (delta < 0) == lower else "worse")
            change = f"{delta:+.4g} ({verdict})"
        rows.append([dataset, metric, method, *[_fmt(v, metric) for v in values], change])
    dates = {r: _date(t).strftime("%Y-%m-%d %H:%M") for r, t in zip(history["run_id"], history["timestamp"],
                                                                   strict=True)}
    doc.table(["dataset", "metric", "method", *[f"{dates[r]} ({r})" for r in shown], "last change"], rows)
    first = float(history.loc[history["run_id"] == shown[0], "timestamp"].iloc[0])
    doc.para(f"Columns: the last {len(shown)} runs, oldest first (from "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(first))}); last change: last run minus "
             "the one before, better/worse by the metric's direction.")
    metrics = sorted(history["metric"].unique())
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=(4 * (len(metrics) + 1), 3), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=False):
        for (dataset, method), g in history[history["metric"] == metric].groupby(["dataset", "method"]):
            ax.plot([_date(t) for t in g["timestamp"]], g["mean"], marker="o", label=f"{dataset} {method}")
        ax.set_title(metric + (" ↓" if METRICS.get(metric) and METRICS[metric].lower_better else ""))
        ax.legend(fontsize=7)
    ax = axes[0][-1]  # the upscaling runtime, trended like the metrics
    per_run = history.drop_duplicates(["run_id", "dataset", "method"])
    for (dataset, method), g in per_run.groupby(["dataset", "method"]):
        if np.isfinite(g["mean_runtime_s"].to_numpy(dtype=np.float64)).any():
            ax.plot([_date(t) for t in g["timestamp"]], g["mean_runtime_s"], marker="o",
                    label=f"{dataset} {method}")
    ax.set_title("upscale s/image")
    if ax.has_data():
        ax.legend(fontsize=7)
    for ax in axes[0]:
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    doc.image(writer.figure("trend.png", fig),
              "metric means and upscaling seconds per image, by run date (UTC)")


def _worst_section(doc: _Doc, results: pd.DataFrame, worst: int) -> None:
    rows = []
    for (dataset, method, metric), g in results.groupby(["dataset", "method", "metric"], sort=True):
        g = g[np.isfinite(g["value"].to_numpy(dtype=np.float64))]
        g = g.sort_values(["value", "image_id"], ascending=[not lower_is_better(metric), True]).head(worst)
        rows.append([dataset, method, metric, ", ".join(f"{r.image_id} ({_fmt(r.value, metric)})"
                                                         for r in g.itertuples())])
    if rows:
        doc.heading(f"Worst {worst} images per set and metric")
        doc.table(["dataset", "method", "metric", "worst first"], rows)


def _load_or_none(uri: str, options: dict[str, Any]) -> torch.Tensor | None:
    try:
        return load_image(uri, options) if uri else None
    except (OSError, ValueError):
        return None


def _drops_section(doc: _Doc, writer: _Writer, results: pd.DataFrame, images: pd.DataFrame,
                   gate: GateResult, worst: int, options: dict[str, Any], max_figures: int = 6) -> None:
    rows, figures = [], 0
    for key, base_run in sorted(gate.baselines.items()):
        moved = movers(images, current=gate.run_id, baselines={key[2]: base_run}, key=key, top=worst)
        if not moved:
            continue
        dataset, method, metric = key
        rows.append([dataset, method, metric, base_run, ", ".join(
            f"{m['image_id']} ({m['delta']:+.4g})" if m["delta"] is not None else f"{m['image_id']} (failed)"
            for m in moved)])
        if figures >= max_figures or method != DEFAULT_METHOD:
            continue
        top = moved[0]["image_id"]
        old = images[(images["run_id"] == base_run) & (images["dataset"] == dataset)
                     & (images["image_id"] == top) & (images["metric"] == metric)]
        new = results[(results["dataset"] == dataset) & (results["method"] == method)
                      & (results["image_id"] == top)]
        if old.empty or new.empty:
            continue
        old_uri, new_uri, hr_uri = old["sr_path"].iloc[0], new["sr_path"].iloc[0], new["hr_path"].iloc[0]
        panels = [(f"{base_run} (baseline)", _load_or_none(old_uri, options) if old_uri != new_uri else None),
                  ("this run", _load_or_none(new_uri, options)), ("HR", _load_or_none(hr_uri, options))]
        panels = [(t, img) for t, img in panels if img is not None]
        if not panels or (panels[0][0] == "this run" and len(panels) < 2):
            continue
        h, w = panels[0][1].shape[-2:]
        top_, left, bottom, right = _crop_box(h, w, 160)
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
        for ax, (title, img) in zip(axes[0], panels, strict=True):
            ax.imshow(img[:, top_:bottom, left:right].permute(1, 2, 0).numpy())  # (s, s, 3)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        caption = f"{dataset}/{top}: biggest {metric} drop ({moved[0]['delta']:+.4g} vs {base_run})"
        if old_uri == new_uri:
            caption += "; the baseline's image was overwritten (same --out)"
        doc_name = writer.figure(f"drop_{figures:03d}.png", fig)
        rows[-1].append(doc_name)
        figures += 1
        doc.image(doc_name, caption)
    if rows:
        doc.heading("Biggest per-image drops since the baseline run")
        doc.table(["dataset", "method", "metric", "baseline run", "images, change", "crops"],
                  [r + [""] * (6 - len(r)) for r in rows])


def _distribution_section(doc: _Doc, writer: _Writer, results: pd.DataFrame) -> None:
    doc.heading("Distributions and runtime")
    for metric, g in results.groupby("metric", sort=True):
        fig, ax = plt.subplots(figsize=(5, 3))
        for (dataset, method), d in g.groupby(["dataset", "method"]):
            values = d["value"].to_numpy(dtype=np.float64)
            values = values[np.isfinite(values)]
            if values.size:
                ax.hist(values, bins=min(20, max(3, values.size)), alpha=0.6,
                        label=f"{dataset} {method} (n={values.size})")
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
                  options: dict[str, Any] | None = None, image_history: pd.DataFrame | None = None,
                  gate: GateResult | None = None, worst: int = 5) -> ReportFiles:
    """Write ``report.md``, ``report.html`` and their PNGs under ``out`` (folder or ``s3://`` prefix).
    ``maps``: (dataset, image id) -> {"groups": URI, "confidence": URI} of the images that have maps."""
    options = options or {}
    writer = _Writer(out, options)
    doc = _Doc(title)
    versions = sorted({v for v in results["model_version"] if v}) or ["unknown"]
    rtms = sorted({v for v in results["rtm_version"] if v}) or ["unknown"]
    doc.para(f"run {run_id or '-'} · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · model "
             f"{', '.join(versions)} · RTM {', '.join(rtms)} · {results['image_id'].nunique()} images")
    iqa = ",".join(sorted({v for v in results["iqa_version"] if v}))
    _summary_section(doc, summary, iqa)
    _paper_section(doc, summary)
    _gate_section(doc, gate)
    _trend_section(doc, writer, history)
    if not results.empty:
        _worst_section(doc, results, worst)
    if gate is not None and image_history is not None:
        _drops_section(doc, writer, results, image_history, gate, worst, options)
    if not results.empty:
        _distribution_section(doc, writer, results)
        ours = results[results["method"] == DEFAULT_METHOD]  # the crops are labelled "PatchScaler (ours)"
        _example_section(doc, writer, ours, maps or {}, examples_per_dataset, options)
    doc.html.append("</body></html>")
    md_uri, html_uri = join(out, MD_FILE), join(out, HTML_FILE)
    write_bytes_atomic(md_uri, "\n".join(doc.md).encode(), options)
    write_bytes_atomic(html_uri, "\n".join(doc.html).encode(), options)
    return ReportFiles(md_uri, html_uri, tuple(writer.images))
