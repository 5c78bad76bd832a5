"""The regression gate of the nightly benchmark: this run against a baseline run of the same history.

A (set, method, metric) regresses when its mean moved in the metric's bad direction (``lower_better`` of
``eval.metrics.METRICS``) by more than its tolerance: ``baseline - value > tolerance`` for higher-is-better
metrics, ``value - baseline > tolerance`` for lower-is-better ones. A mean that became NaN (every image
failed) regresses too. The baseline is a pinned run id, or else the latest earlier run of the history
that measured the same (set, method, metric). Each regression names the images whose scores moved most
in the bad direction (from the per-image history).

Tolerances are absolute, in the metric's units: :data:`DEFAULT_TOLERANCES`, overridden per metric with
``--tolerance musiq=0.5,psnr=0.05``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from eval.metrics import METRICS

# Absolute tolerances, a little above the run-to-run noise of a fixed model on a ~100-image set.
DEFAULT_TOLERANCES: dict[str, float] = {
    "psnr": 0.1, "ssim": 0.005, "lpips": 0.01, "maniqa-pipal": 0.01, "maniqa-koniq": 0.01,
    "clipiqa": 0.01, "musiq": 0.5, "piqe": 1.0, "niqe": 0.2, "brisque": 1.0,
}
FALLBACK_TOLERANCE = 0.0  # a metric without a default: any move in the bad direction
KEYS = ["dataset", "method", "metric"]


def parse_tolerances(text: str) -> dict[str, float]:
    """``"musiq=0.5,psnr=0.05"`` -> ``{"musiq": 0.5, "psnr": 0.05}`` (known metrics, values >= 0)."""
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in METRICS:
            raise ValueError(f"expected METRIC=VALUE with a metric of {', '.join(METRICS)}; got {part!r}")
        try:
            tol = float(value)
        except ValueError:
            raise ValueError(f"tolerance of {name} is not a number: {value!r}") from None
        if not tol >= 0:
            raise ValueError(f"tolerance of {name} must be >= 0, got {value}")
        out[name] = tol
    return out


def tolerance_of(metric: str, overrides: dict[str, float] | None = None) -> float:
    return (overrides or {}).get(metric, DEFAULT_TOLERANCES.get(metric, FALLBACK_TOLERANCE))


def lower_is_better(metric: str) -> bool:
    return bool(METRICS[metric].lower_better) if metric in METRICS else False


def runs_in_order(history: pd.DataFrame) -> list[str]:
    return history.sort_values("timestamp", kind="stable").drop_duplicates("run_id")["run_id"].tolist()


def baseline_rows(history: pd.DataFrame, run_id: str, pinned: str | None = None) -> pd.DataFrame:
    """The baseline's history row for each (set, method, metric) of run ``run_id``: run ``pinned`` when
    given (``KeyError`` when the history lacks it), else the latest earlier run that has that row."""
    if pinned:
        if pinned not in set(history["run_id"]):
            raise KeyError(f"baseline run {pinned!r} is not in the history")
        return history[history["run_id"] == pinned]
    runs = runs_in_order(history)
    earlier = runs[: runs.index(run_id)] if run_id in runs else runs
    before = history[history["run_id"].isin(earlier)].sort_values("timestamp", kind="stable")
    return before.drop_duplicates(KEYS, keep="last")


def _bad_delta(metric: str, delta: float) -> float:
    """How much worse (> 0) a change of ``delta`` is for ``metric``."""
    return delta if lower_is_better(metric) else -delta


def movers(images: pd.DataFrame, *, current: str, baselines: dict[str, str], key: tuple[str, str, str],
           top: int) -> list[dict[str, Any]]:
    """The ``top`` images of (set, method, metric) ``key`` whose score moved most in the bad direction
    between their baseline run and run ``current``."""
    dataset, method, metric = key
    sel = images[(images["dataset"] == dataset) & (images["method"] == method) & (images["metric"] == metric)]
    now = sel[sel["run_id"] == current].set_index("image_id")["value"]
    then = sel[sel["run_id"] == baselines.get(metric, "")].set_index("image_id")["value"]
    both = pd.DataFrame({"baseline": then, "value": now}).dropna(how="all")
    if both.empty:
        return []
    both["delta"] = both["value"] - both["baseline"]
    # an image that failed now (NaN) moved most; one new in this run (no baseline score) did not move
    both["worse_by"] = [_bad_delta(metric, d) if math.isfinite(d) else (math.inf if math.isfinite(b) else 0.0)
                        for d, b in zip(both["delta"], both["baseline"], strict=True)]
    both = both.sort_values(["worse_by"], ascending=False, kind="stable").head(top)
    return [{"image_id": str(i), "baseline": _num(r.baseline), "value": _num(r.value), "delta": _num(r.delta)}
            for i, r in both.iterrows() if r.worse_by > 0]


def _num(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class GateResult:
    run_id: str
    baseline_runs: tuple[str, ...]  # the runs compared with ("" when there was none)
    compared: int  # (set, method, metric) rows that had a baseline
    regressions: tuple[dict[str, Any], ...]
    baselines: dict[tuple[str, str, str], str] = field(default_factory=dict)  # (set, method, metric) -> run

    @property
    def passed(self) -> bool:
        return not self.regressions

    def record(self) -> dict[str, Any]:
        """The JSON line of the gate."""
        return {"gate": "pass" if self.passed else "regression", "run_id": self.run_id,
                "baseline_run": ",".join(r for r in self.baseline_runs if r) or None,
                "compared": self.compared, "regressions": list(self.regressions)}


def check(history: pd.DataFrame, images: pd.DataFrame, *, run_id: str, baseline_run: str | None = None,
          tolerances: dict[str, float] | None = None, top: int = 5) -> GateResult:
    """Compare run ``run_id`` of ``history`` with its baseline (see the module's docstring)."""
    now = history[history["run_id"] == run_id]
    base = baseline_rows(history, run_id, baseline_run).set_index(KEYS)
    regressions, compared, used, baselines = [], 0, set(), {}
    for r in now.itertuples():
        key = (r.dataset, r.method, r.metric)
        if key not in base.index:
            continue
        b = base.loc[key]
        compared += 1
        used.add(b["run_id"])
        baselines[key] = b["run_id"]
        tol = tolerance_of(r.metric, tolerances)
        delta = r.mean - b["mean"]
        became_nan = not math.isfinite(r.mean) and math.isfinite(b["mean"])
        if not became_nan and not (math.isfinite(delta) and _bad_delta(r.metric, delta) > tol):
            continue
        regressions.append({
            "set": r.dataset, "metric": r.metric, "method": r.method, "baseline_run": b["run_id"],
            "baseline": _num(b["mean"]), "value": _num(r.mean), "delta": _num(delta), "tolerance": tol,
            "lower_better": lower_is_better(r.metric),
            "dataset_changed": bool(r.dataset_fingerprint and b["dataset_fingerprint"]
                                    and r.dataset_fingerprint != b["dataset_fingerprint"]),
            "images": movers(images, current=run_id, baselines={r.metric: b["run_id"]}, key=key, top=top),
        })
    return GateResult(run_id, tuple(sorted(used)), compared, tuple(regressions), baselines)
