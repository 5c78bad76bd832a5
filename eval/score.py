"""IQA scoring as a Ray Data stage: metric models live in actors, images stream through them.

Input rows (:data:`INPUT_COLUMNS`): ``image_id``, ``dataset``, ``sr`` (URI or encoded bytes of the upscaled
image), ``hr`` (URI or bytes of the reference, ``""`` when none), ``lr`` (URI of the LR input, for the
report), ``model_version``, ``rtm_version``, ``runtime_s``, ``method`` (who made ``sr``; ``""``: PatchScaler).
Output rows: one per (image, metric), the columns of :data:`eval.results.RESULT_SCHEMA`.

:func:`score_dataset` is the only place that sets the stage's resources: the actor pool size and
``num_gpus`` (a fraction of a GPU per actor when the cluster has GPUs: the metric models are small, so
several actors share one GPU). ``upscale-dataset --score`` appends :class:`PipelineScoreStage` (the same
scoring on the pipeline's manifest rows) to its graph; ``pipeline/build.py`` sets that pool's resources.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from eval.datasets import decode_image
from eval.metrics import MetricScorer, check_weights, get_spec, installed_version, resolve_cache_dir
from eval.results import RESULT_SCHEMA, results_frame
from pipeline import schema as S
from pipeline.io import read_bytes
from pipeline.scores import DEFAULT_METHOD

INPUT_COLUMNS = ("image_id", "dataset", "sr", "hr", "lr", "model_version", "rtm_version", "runtime_s",
                 "method")
DEFAULT_GPU_FRACTION = 0.25


@dataclass
class ScoreConfig:
    metrics: tuple[str, ...]
    cache_dir: str | None = None  # None: $PATCHSCALER_IQA_CACHE, else torch hub's folder
    device: str = "auto"  # auto: cuda when the actors get a GPU share
    seed: int = 0  # torch seed before every metric call (random crops)
    crop_border: int = 4  # pixels cropped off each side for PSNR/SSIM (the scale, by convention)
    actors: int = 1
    gpus_per_actor: float | None = None  # None: DEFAULT_GPU_FRACTION when the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # None: 1 (in upscale-dataset: the share of its model actors)
    batch_size: int = 4  # images per call
    storage_options: dict[str, Any] = field(default_factory=dict)
    size_slack: int = 3  # px per side SR and HR may differ (scale - 1); more is an error on the image
    reference_metrics: tuple[str, ...] = field(init=False)  # those of `metrics` that need an HR image

    def __post_init__(self) -> None:
        self.reference_metrics = tuple(m for m in self.metrics if get_spec(m).needs_reference)


def _load(value: Any, options: dict[str, Any]) -> torch.Tensor | None:
    """A (3, H, W) image from bytes or a URI; None for an empty value."""
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return decode_image(bytes(value)) if len(value) else None
    if isinstance(value, str) and value:
        return decode_image(read_bytes(value, options))
    return None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


class ScoreStage:
    """Ray Data callable class: builds the metric models once per actor, scores batches of images."""

    def __init__(self, *, metrics: tuple[str, ...], cache_dir: str, device: str, seed: int, crop_border: int,
                 storage_options: dict[str, Any], size_slack: int = 3) -> None:
        self.scorer = MetricScorer(metrics=metrics, cache_dir=cache_dir, device=device, seed=seed,
                                   crop_border=crop_border, size_slack=size_slack)
        self.storage_options = storage_options
        self.iqa_version = installed_version("pyiqa")

    def score_row(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        base = {
            "image_id": str(row["image_id"]), "dataset": str(row["dataset"]),
            "model_version": _text(row.get("model_version")), "rtm_version": _text(row.get("rtm_version")),
            "runtime_s": float(row.get("runtime_s", math.nan)),
            "sr_path": _text(row.get("sr_path")) or _text(row.get("sr")),
            "hr_path": _text(row.get("hr")), "lr_path": _text(row.get("lr")), "iqa_version": self.iqa_version,
            "method": _text(row.get("method")) or DEFAULT_METHOD,
        }
        try:
            sr = _load(row["sr"], self.storage_options)
            if sr is None:
                raise ValueError("no upscaled image")
            hr = _load(row.get("hr"), self.storage_options)
        except Exception as exc:  # unreadable image: every metric fails for it, the batch goes on
            error = f"{type(exc).__name__}: {exc}"
            return [{**base, "metric": s.name, "value": math.nan, "metric_s": 0.0, "error": error}
                    for s in self.scorer.specs if not s.needs_reference or base["hr_path"]]
        return [{**base, "metric": v.metric, "value": v.value, "metric_s": v.seconds, "error": v.error}
                for v in self.scorer.score(sr, hr)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        rows = []
        for i in range(n):
            rows.extend(self.score_row({k: v[i] for k, v in batch.items()}))
        out = {}
        for f in RESULT_SCHEMA:
            values = [r[f.name] for r in rows]
            if pa.types.is_string(f.type):
                col = np.empty(len(values), dtype=object)
                col[:] = values
                out[f.name] = col
            else:
                out[f.name] = np.asarray(values, dtype=np.float64)
        return out


class PipelineScoreStage(ScoreStage):
    """The scoring pool of ``upscale-dataset --score``, after the assembler. In: the images' manifest rows
    with the written file's bytes (``encoded``) and their scoring info (``eval``: image id, dataset, HR
    and LR URIs). Out: the manifest rows with the image's score rows as JSON (``iqa_scores``; ``[]`` for
    error rows, which get no scores). The upscaling runtime of a score row is the sum of its image's
    stage seconds; its ``sr_path`` is the written output."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k not in (S.ENCODED, S.EVAL)}
        scores = []
        for i in range(len(batch["id"])):
            if batch["status"][i] != S.STATUS_OK:
                scores.append("[]")
                continue
            info = json.loads(batch[S.EVAL][i] or "{}")
            rows = self.score_row({
                "image_id": info.get("image_id", str(batch["id"][i])), "dataset": info.get("dataset", ""),
                "sr": bytes(batch[S.ENCODED][i]), "sr_path": str(batch["output"][i]),
                "hr": info.get("hr", ""), "lr": info.get("lr", ""),
                "model_version": str(batch["model_version"][i]), "rtm_version": str(batch["rtm_version"][i]),
                "runtime_s": sum(float(batch[f"seconds_{s}"][i]) for s in S.STAGES),
            })
            scores.append(json.dumps(rows))
        out[S.IQA] = S.object_column(scores)
        return out


def stage_resources(config: ScoreConfig) -> dict[str, Any]:
    """``num_cpus``/``num_gpus`` of one scoring actor and the device its models run on."""
    import ray

    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else (
        DEFAULT_GPU_FRACTION if has_gpu else 0.0)
    device = config.device if config.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    return {"num_cpus": config.cpus_per_actor or 1.0, "num_gpus": gpus, "device": device}


def score_dataset(ds: Any, config: ScoreConfig) -> Any:
    """``ds`` (rows of :data:`INPUT_COLUMNS`) -> a Dataset of per-(image, metric) rows. The weight files
    are checked here, in the driver, before any actor starts (and again in each actor)."""
    cache = resolve_cache_dir(config.cache_dir)
    check_weights(config.metrics, cache)
    from ray.data import ActorPoolStrategy

    res = stage_resources(config)
    return ds.map_batches(
        ScoreStage, batch_size=config.batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=config.actors),
        num_cpus=res["num_cpus"], num_gpus=res["num_gpus"],
        fn_constructor_kwargs={"metrics": tuple(config.metrics), "cache_dir": cache, "device": res["device"],
                               "seed": config.seed, "crop_border": config.crop_border,
                               "storage_options": config.storage_options, "size_slack": config.size_slack},
    )


def score_rows(rows: list[dict[str, Any]], config: ScoreConfig) -> pd.DataFrame:
    """Score ``rows`` (dicts of :data:`INPUT_COLUMNS`) on the running Ray instance; returns the per-image
    long table (:data:`RESULT_SCHEMA`), sorted by dataset, image and metric."""
    import ray

    if not rows:
        return results_frame([])
    items = [{c: (r.get(c) if r.get(c) is not None else ("" if c != "runtime_s" else math.nan))
              for c in INPUT_COLUMNS} for r in rows]
    for item in items:
        item["runtime_s"] = float(item["runtime_s"])
    frame = score_dataset(ray.data.from_items(items), config).to_pandas()
    frame = results_frame(frame.to_dict("records"))
    return frame.sort_values(["dataset", "image_id", "metric"], kind="stable").reset_index(drop=True)
