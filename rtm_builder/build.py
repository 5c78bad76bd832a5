"""Assembly of an RTM build: the only place that sets Ray resources, pool sizes and batch sizes.

::

    list sources (driver, fsspec)
      -> probe: from_items(files) -> ProbeStage (tasks)                        -> take_all
      -> plan crops (driver, deterministic for the seed)
      -> from_items(images) -> CropStage (tasks) -> EncodeStage (actor pool, GPU when present)
                                                                                -> iter_batches
      -> [+ the stored candidate pool, with --add-source]
      -> farthest point sampling -> contact sheet (each a one-GPU Ray task on a GPU cluster, else in
         the driver) -> write the artifact (driver)

With ``incremental=True`` the sources are *added* to the artifact at ``base`` (default ``out``): only their
crops are encoded; the stored candidates are reused as they are (their keys and values are not
recomputed), which is valid only for the same weights, so a different weights hash is an error.

Fault tolerance is Ray Data's default for actor pools (dead actors restart, their batches are retried);
a bad input file never fails a task (see ``crop.py``).
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
import ray

from rtm_builder import DEFAULT_CANDIDATES, DEFAULT_ENTRIES
from rtm_builder.artifact import Candidates, read_pool, write_artifact
from rtm_builder.contact_sheet import contact_sheet_png
from rtm_builder.crop import STATUS_OK, CropStage, PlannedCrop, Probe, ProbeStage, crop_rows, plan_crops
from rtm_builder.encode import EncodeStage
from rtm_builder.fps import FPSResult, farthest_point_sampling
from rtm_builder.sources import Source, list_source_files

T = TypeVar("T")

TASK_CPUS = 0.5  # CPUs of one probe / crop task
FPS_METRIC = "squared euclidean on L2-normalised keys (= 2 - 2 cos)"
FPS_START = "the candidate farthest from the centroid of all keys"


@dataclass
class BuildConfig:
    sources: list[Source]
    out: str
    weights: str
    incremental: bool = False  # add ``sources`` to the artifact at ``base``
    base: str | None = None  # incremental: the artifact to extend (default: ``out``)
    candidates: int | None = None  # None: 20,000; incremental: the stored crops per unit of weight
    entries: int = DEFAULT_ENTRIES
    seed: int = 0
    autoencoder: str | None = None
    device: str = "auto"  # auto: cuda when the cluster has GPUs (the cluster's, not the driver's)
    encode_actors: int | None = None  # None: one per GPU-share on GPU clusters, else 1
    encode_batch: int = 64  # crops per EncodeStage call
    read_tasks: int = 4  # concurrent probe / crop tasks
    cpus_per_actor: float = 1.0  # also the torch threads of an encode actor
    gpus_per_actor: float = 1.0  # when device is cuda
    max_pixels: int = 8192 * 8192
    contact_sheet: bool = True
    per_class: int = 8
    storage_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildSummary:
    out: str
    version: str
    entries: int
    candidates: int
    encoded: int  # crops encoded by this run
    reused: int  # stored candidates reused (incremental)
    skipped: dict[str, int]
    seconds: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gpus(cfg: BuildConfig) -> float:
    return cfg.gpus_per_actor if cfg.device.startswith("cuda") else 0.0


def resolve(cfg: BuildConfig) -> BuildConfig:
    """Fill in ``device="auto"`` and the default encoder pool size from the cluster's resources, and cap
    the encoders' CPUs so that one crop task still fits beside them (the actors start first and hold
    their CPUs; without room for a crop task the job would wait forever)."""
    gpus = float(ray.cluster_resources().get("GPU", 0))
    cpus = float(ray.cluster_resources().get("CPU", 1))
    device = ("cuda" if gpus > 0 else "cpu") if cfg.device == "auto" else cfg.device
    actors = cfg.encode_actors
    if actors is None:
        actors = max(1, int(gpus / cfg.gpus_per_actor)) if device.startswith("cuda") else 1
    per_actor = round(min(cfg.cpus_per_actor, max((cpus - TASK_CPUS) / actors, 0.1)), 3)
    return replace(cfg, device=device, encode_actors=actors, cpus_per_actor=per_actor)


def crop_size(weights: str) -> int:
    """HR pixels of one RTM entry: one latent patch (``sampler.patch_size``) of the checkpoint's
    autoencoder, 16 x 8 = 128 for the paper's f=8 (B.3: 128x128 crops)."""
    from patchscaler.weights import load_config

    config = load_config(weights)
    return config.sampler.patch_size * config.autoencoder.downsample_factor


def probe_files(cfg: BuildConfig, files: list[tuple[str, str]], crop: int) -> list[Probe]:
    if not files:
        return []
    ds = ray.data.from_items([{"source": s, "path": p} for s, p in files],
                             override_num_blocks=min(len(files), 8 * cfg.read_tasks))
    ds = ds.map_batches(ProbeStage(storage_options=cfg.storage_options, max_pixels=cfg.max_pixels, crop=crop),
                        batch_size=4, batch_format="numpy", num_cpus=TASK_CPUS,
                        compute=ray.data.TaskPoolStrategy(size=cfg.read_tasks))
    probes = [Probe(str(r["source"]), str(r["path"]), str(r["status"]), int(r["width"]), int(r["height"]),
                    str(r["mode"]), str(r["error"])) for r in ds.take_all()]
    return sorted(probes, key=lambda p: (p.source, p.path))


def encode_plan(cfg: BuildConfig, plan: list[PlannedCrop], crop: int) -> tuple[Candidates | None, str]:
    """Cut and encode the planned crops; returns them in plan order (None if none) and the weights hash."""
    if not plan:
        return None, ""
    rows = crop_rows(plan)
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), 8 * cfg.read_tasks))
    ds = ds.map_batches(CropStage(storage_options=cfg.storage_options, max_pixels=cfg.max_pixels, crop=crop),
                        batch_size=1, batch_format="numpy", num_cpus=TASK_CPUS,
                        compute=ray.data.TaskPoolStrategy(size=cfg.read_tasks))
    ds = ds.map_batches(
        EncodeStage, batch_size=cfg.encode_batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.encode_actors),
        fn_constructor_kwargs={"weights": cfg.weights, "device": cfg.device,
                               "autoencoder": cfg.autoencoder, "batch_size": cfg.encode_batch,
                               "threads": max(1, int(cfg.cpus_per_actor))},
        num_cpus=cfg.cpus_per_actor, num_gpus=_gpus(cfg),
    )
    batches = [b for b in ds.iter_batches(batch_size=None, batch_format="numpy") if len(b["id"])]
    if not batches:
        return None, ""
    hashes = {str(h) for b in batches for h in b["weights_hash"]}
    if len(hashes) != 1:
        raise RuntimeError(f"encode actors disagree on the weights: {sorted(hashes)}")
    found = Candidates.from_batches(batches)
    position = {c.id: i for i, c in enumerate(plan)}
    return found.take(np.argsort([position[i] for i in found.ids], kind="stable")), hashes.pop()


def _fps_task(keys: np.ndarray, k: int, device: str) -> FPSResult:
    import torch

    return farthest_point_sampling(torch.from_numpy(keys), k, device=device)


def _sheet_task(weights: str, autoencoder: str | None, device: str, values: np.ndarray, classes: np.ndarray,
                per_class: int) -> bytes:
    from patchscaler.weights import load_checkpoint

    model = load_checkpoint(weights, device=device, autoencoder=autoencoder)
    return contact_sheet_png(model, values, classes, per_class=per_class)


def on_device(cfg: BuildConfig, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` where the device is: a one-GPU Ray task on a GPU cluster (the driver may have no
    GPU), else in the driver itself (no worker to start)."""
    if cfg.device.startswith("cuda"):
        task = ray.remote(fn).options(num_cpus=1, num_gpus=_gpus(cfg))
        return ray.get(task.remote(*args))
    return fn(*args)


def candidate_budget(cfg: BuildConfig, stored: int, manifest: dict[str, Any] | None) -> int:
    """Crops to plan in this run: ``cfg.candidates``, else 20,000 for a new build, else as many per unit
    of source weight as the stored pool has (so an added source of weight 1 gets what an old one got)."""
    if cfg.candidates is not None:
        return cfg.candidates
    if manifest is None:
        return DEFAULT_CANDIDATES
    used = [s["weight"] for s in manifest["sources"] if s["candidates"] > 0]
    return round(stored * sum(s.weight for s in cfg.sources) / sum(used)) if used else DEFAULT_CANDIDATES


def _source_report(source: Source, probes: list[Probe], candidates: int) -> dict[str, Any]:
    mine = [p for p in probes if p.source == source.name]
    return {
        **source.to_dict(),
        "files": len(mine),
        "usable": sum(p.status == STATUS_OK for p in mine),
        "skipped": dict(Counter(p.status for p in mine if p.status != STATUS_OK)),
        "modes": dict(Counter(p.mode for p in mine if p.status == STATUS_OK)),
        "candidates": candidates,
    }



def _skipped(
    probes: list[Probe], plan: list[PlannedCrop], encoded: Candidates | None
) -> list[dict[str, str]]:
    """Skipped files (probe) and files that failed when cut after a good probe (planned ids not encoded)."""
    out = [{"source": p.source, "path": p.path, "reason": p.status, "error": p.error}
           for p in probes if p.status != STATUS_OK]
    got = set(encoded.ids.tolist()) if encoded is not None else set()
    lost = Counter((c.source, c.path) for c in plan if c.id not in got)
    out += [{"source": s, "path": p, "reason": "unreadable", "error": f"failed when cut: {n} crops lost"}
            for (s, p), n in lost.items()]
    return out


@dataclass
class _Run:
    """What one run found and made, for the manifest."""

    probes: list[Probe]
    plan: list[PlannedCrop]
    per_source: dict[str, int]
    budget: int
    encoded: Candidates | None
    reused: int
    weights_hash: str
    pool: Candidates
    entries: Candidates
    fps: FPSResult
    crop: int  # HR pixels of one crop (crop_size)
    fps_device: str


def make_manifest(cfg: BuildConfig, run: _Run, old: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest (``artifact.write_artifact`` adds kind, format and RTM version); with ``old``, the
    stored sources, skipped inputs and history are carried over."""
    sources = (old["sources"] if old else []) + [
        _source_report(s, run.probes, run.per_source[s.name]) for s in cfg.sources]
    in_rtm = Counter(run.entries.sources.tolist())
    for s in sources:
        s["entries"] = in_rtm.get(s["name"], 0)
    skipped = (old["skipped_inputs"] if old else []) + _skipped(run.probes, run.plan, run.encoded)
    converted: Counter[str] = Counter()
    for s in sources:
        converted.update({m: n for m, n in s["modes"].items() if m != "RGB"})
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    encoded = len(run.encoded) if run.encoded is not None else 0
    history = {"created": created, "mode": "add-source" if old else "build", "seed": cfg.seed,
               "sources": [s.name for s in cfg.sources], "planned": len(run.plan), "encoded": encoded}
    return {
        "created": created,
        "weights": {"uri": cfg.weights, "hash": run.weights_hash, "autoencoder": cfg.autoencoder},
        "config": {"entries": cfg.entries, "candidates": run.budget, "seed": cfg.seed, "crop_size": run.crop,
                   "fps": {"metric": FPS_METRIC, "start": FPS_START}},
        "sources": sources,
        "counts": {
            "entries": len(run.entries), "candidates": len(run.pool), "encoded": encoded,
            "reused": run.reused,
            "files": sum(s["files"] for s in sources), "usable": sum(s["usable"] for s in sources),
            "skipped": dict(Counter(r["reason"] for r in skipped)), "converted": dict(converted),
        },
        "skipped_inputs": skipped,
        "fps": {"start_index": run.fps.start, "covering_radius": run.fps.covering_radius,
                "device": run.fps_device},
        "key_dim": int(run.pool.keys.shape[1]),
        "history": (old["history"] if old else []) + [history],
    }


def build_rtm(cfg: BuildConfig) -> BuildSummary:
    """Run one build (or one ``--add-source`` extension) and write the artifact to ``cfg.out``."""
    if not cfg.sources:
        raise ValueError("no sources given")
    if cfg.entries < 1:
        raise ValueError("entries must be positive")
    cfg = resolve(cfg)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    base = cfg.base or cfg.out
    stored, old = read_pool(base, cfg.storage_options) if cfg.incremental else (None, None)
    if old is not None:
        clash = sorted({s.name for s in cfg.sources} & {s["name"] for s in old["sources"]})
        if clash:
            raise ValueError(f"sources {clash} are already in the RTM at {base}; use new names")
    files = [(s.name, path) for s in cfg.sources for path in list_source_files(s, cfg.storage_options)]
    lap("list")
    crop = crop_size(cfg.weights)
    probes = probe_files(cfg, files, crop)
    lap("probe")
    budget = candidate_budget(cfg, len(stored) if stored is not None else 0, old)
    plan, per_source = plan_crops(probes, {s.name: s.weight for s in cfg.sources}, budget, seed=cfg.seed,
                                  crop=crop)
    lap("plan")
    encoded, weights_hash = encode_plan(cfg, plan, crop)
    lap("encode")
    if old is not None:
        if encoded is not None and weights_hash != old["weights"]["hash"]:
            raise ValueError(f"weights {cfg.weights} (hash {weights_hash}) differ from those the stored "
                             f"candidates were encoded with ({old['weights']['hash']}); rebuild instead")
        weights_hash = old["weights"]["hash"]
    parts = [p for p in (stored, encoded) if p is not None]
    if not parts:
        raise ValueError(f"no usable crops: none of the {len(files)} files is a readable image of at least "
                         f"{crop}x{crop} pixels")
    pool = Candidates.concat(parts)
    fps_device = "cuda" if cfg.device.startswith("cuda") else "cpu"
    fps = on_device(cfg, _fps_task, pool.keys, min(cfg.entries, len(pool)), fps_device)
    entries = pool.take(fps.indices.numpy())
    lap("fps")
    sheet = None
    if cfg.contact_sheet:
        sheet = on_device(cfg, _sheet_task, cfg.weights, cfg.autoencoder, cfg.device, entries.values,
                          entries.classes, cfg.per_class)
    lap("contact_sheet")
    run = _Run(probes=probes, plan=plan, per_source=per_source, budget=budget, encoded=encoded,
               reused=len(stored) if stored is not None else 0, weights_hash=weights_hash, pool=pool,
               entries=entries, fps=fps, fps_device=fps_device, crop=crop)
    manifest = make_manifest(cfg, run, old)
    version = write_artifact(cfg.out, entries=entries, pool=pool, manifest=manifest, contact_sheet=sheet,
                             storage_options=cfg.storage_options)
    lap("write")
    counts = manifest["counts"]
    return BuildSummary(out=cfg.out, version=version, entries=counts["entries"], candidates=len(pool),
                        encoded=counts["encoded"], reused=run.reused, skipped=counts["skipped"],
                        seconds=seconds)
