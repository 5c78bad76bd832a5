"""Assembly of the Ray Data graph: the only place that sets resources, pool sizes, batch sizes and the
fault-tolerance options.

Per-pool layout (default), one streaming execution::

    from_items -> read (tasks) -> decode (tasks) -> GRM + explode into patch rows (actors)
      -> Patch-DiT simple pool (τ=400, N=8) -> medium pool (τ=700, N=14) -> hard pool (τ=1000, N=20)
      -> assemble: merge, decode, encode, write (actors)  -> manifest rows to the driver

Each GRM call explodes a batch of images into one block: the image rows, then the patch rows sorted by
group. Pool g refines the group-g rows of a block — the patches of several images in one call — with
its own (τ, N) and forwards every other row untouched. Blocks are never split on the way (the graph
runs with ``target_max_block_size=None`` and ``batch_size=None`` in the pools), so every block keeps
whole images and the assemble stage regroups patches by image inside a block: the regroup needs no
all-to-all shuffle, the graph has no barrier and streams with Ray Data's bounded backpressure.
(A Ray Data graph cannot fan out without recomputing its input; a chain of pass-through pools needs
no fan-out.)

Fused layout (``fused=True``): one Patch-DiT pool runs all groups in one step loop (``stages.fused_refine``).

Scoring (``score`` set, ``upscale-dataset --score``): a pool of ``eval.score.PipelineScoreStage`` actors
after the assembler scores every written image with the IQA metrics in the same pass; the assembler then
hands it the encoded bytes, so nothing is read back.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray
from ray.data import DataContext, Dataset

from pipeline.stages import AssembleStage, DecodeStage, GRMStage, PatchDiTStage, ReadStage

if TYPE_CHECKING:
    from eval.score import ScoreConfig

GROUP_KEYS = ("simple", "medium", "hard")
# Fault tolerance: Ray Data's actor pools restart dead actors and retry their tasks without limit by
# default (``max_restarts=-1, max_task_retries=-1`` in ``ActorPoolMapOperator``; Ray 2.60). They are not
# passed again here: extra remote args are deprecated in Ray Data and go away in Ray 2.64.
# tests/test_pipeline_faults.py kills a Patch-DiT actor mid-job and checks that the job still succeeds.


@dataclass
class PipelineConfig:
    input: str
    output: str
    weights: str
    rtm: str
    autoencoder: str | None = None
    device: str = "cpu"
    precision: str | None = None  # fp32 | bf16 | None: the device's default (patchscaler/precision.py)
    fmt: str = "png"
    quality: int = 95
    max_pixels: int = 4096 * 4096
    seed: int = 0
    mode: str | None = None  # None: the checkpoint's own sampler mode
    fused: bool = False
    window: int = 64  # images per manifest part (and per pool-sizing probe)
    grm_actors: int = 1
    dit_actors: dict[str, int] | int | None = None  # per group, a total split by work, or None: auto
    assemble_actors: int = 1
    decode_tasks: int = 4  # concurrent read/decode tasks
    gpus_per_actor: float | None = None  # None: all model actors share the cluster's GPUs
    cpus_per_actor: float | None = None  # None: the same for CPUs, leaving one CPU for tasks
    grm_batch: int = 4  # images per GRM call = per block
    storage_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False  # ignore the manifest: redo every image
    sources: list[str] | None = None  # the inputs, all under `input` (None: every file under it)
    maps: bool = False  # write each image's group map to OUTPUT/_maps/ (pipeline/scores.py)
    score: ScoreConfig | None = None  # IQA-score the outputs in the same pass (pipeline/scores.py)
    score_dataset: str = ""  # dataset name of the score rows ("": the input folder's name)
    score_pairs: dict[str, tuple[str, str]] = field(default_factory=dict)  # source -> (image id, HR URI)
    crash_marker: str | None = None  # tests only, see PatchDiTStage

    @property
    def sampling(self) -> str:
        return (self.mode or "checkpoint") + ("+fused" if self.fused else "")


def dit_pool_sizes(work: dict[int, float], total: int) -> dict[int, int]:
    """Split ``total`` actors over the groups in proportion to ``work`` (patches × steps), at least one
    per group that has work and none for a group without."""
    busy = [g for g, w in work.items() if w > 0]
    if not busy:
        return {}
    total = max(total, len(busy))
    whole = sum(work[g] for g in busy)
    ideal = {g: total * work[g] / whole for g in busy}
    sizes = {g: max(1, math.floor(ideal[g])) for g in busy}
    while sum(sizes.values()) < total:  # hand out the rest to the most under-served
        g = max(busy, key=lambda g: ideal[g] - sizes[g])
        sizes[g] += 1
    while sum(sizes.values()) > total:  # the minimum of one pushed us over: take from the most served
        g = min((g for g in busy if sizes[g] > 1), key=lambda g: ideal[g] - sizes[g])
        sizes[g] -= 1
    return sizes


def total_dit_actors(cfg: PipelineConfig) -> int:
    if isinstance(cfg.dit_actors, int):
        return cfg.dit_actors
    if isinstance(cfg.dit_actors, dict):
        return sum(cfg.dit_actors.values())
    gpus = int(ray.cluster_resources().get("GPU", 0)) if cfg.device.startswith("cuda") else 0
    return max(1 if cfg.fused else 3, gpus - cfg.grm_actors - cfg.assemble_actors)


def pool_sizes(cfg: PipelineConfig, counts: dict[int, int], steps: tuple[int, int, int]) -> dict[int, int]:
    """Actors per group pool: as given, or the total split by work (patches × steps) of ``counts``, the
    patches per group measured so far (equal counts before any). Every pool of the chain gets at least
    one actor, since it also forwards the other groups' rows."""
    if cfg.fused:
        return {}
    if isinstance(cfg.dit_actors, dict):
        return {g: max(1, cfg.dit_actors.get(name, 1)) for g, name in enumerate(GROUP_KEYS)}
    seen = counts if sum(counts.values()) else dict.fromkeys(range(3), 1)
    work = {g: max(seen.get(g, 0), 1) * steps[g] for g in range(3)}
    return dit_pool_sizes(work, total_dit_actors(cfg))


def actor_resources(cfg: PipelineConfig, actors: int) -> dict[str, float]:
    """``num_cpus``/``num_gpus`` of every model actor. By default all ``actors`` (GRM, the Patch-DiT
    pools, assemble: they run at the same time) fit on the cluster at once, leaving one CPU for the
    read/decode tasks; on one GPU they share it (fractional GPUs)."""
    cpus = float(ray.cluster_resources().get("CPU", 1))
    res = {"num_cpus": cfg.cpus_per_actor or round(min(1.0, max(cpus - 1.0, 0.5) / actors), 3)}
    if cfg.device.startswith("cuda"):
        gpus = float(ray.cluster_resources().get("GPU", 0))
        res["num_gpus"] = cfg.gpus_per_actor or round(min(1.0, gpus / actors), 3)
    return res


def pipeline_dataset(cfg: PipelineConfig, items: list[dict[str, str]], sizes: dict[int, int]) -> Dataset:
    """The whole graph over ``items`` (image id + meta); its rows are the images' manifest rows.
    Build it inside ``unsplit_blocks()``."""
    dit = [(None, total_dit_actors(cfg))] if cfg.fused else list(sizes.items())
    scorers = cfg.score.actors if cfg.score is not None else 0
    res = actor_resources(cfg, cfg.grm_actors + cfg.assemble_actors + sum(n for _, n in dit) + scorers)
    model_args = {"weights": cfg.weights, "device": cfg.device, "autoencoder": cfg.autoencoder,
                  "precision": cfg.precision}
    tasks = max(1, min(cfg.decode_tasks, len(items)))
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(ReadStage(storage_options=cfg.storage_options), batch_size=1, batch_format="numpy",
                        concurrency=tasks, num_cpus=0.25)  # I/O bound
    ds = ds.map_batches(DecodeStage(max_pixels=cfg.max_pixels), batch_size=1, batch_format="numpy",
                        concurrency=tasks, num_cpus=1)
    ds = ds.map_batches(
        GRMStage, batch_size=cfg.grm_batch, batch_format="numpy", concurrency=cfg.grm_actors,
        fn_constructor_kwargs={**model_args, "rtm": cfg.rtm, "seed": cfg.seed, "mode": cfg.mode,
                               "storage_options": cfg.storage_options}, **res,
    )
    for group, n in dit:
        ds = ds.map_batches(  # batch_size=None: whole blocks, so images stay whole
            PatchDiTStage, batch_size=None, batch_format="numpy", concurrency=n,
            fn_constructor_kwargs={**model_args, "rtm": cfg.rtm, "mode": cfg.mode, "group": group,
                                   "crash_marker": cfg.crash_marker}, **res,
        )
    ds = ds.map_batches(
        AssembleStage, batch_size=None, batch_format="numpy", concurrency=cfg.assemble_actors,
        fn_constructor_kwargs={**model_args, "fmt": cfg.fmt, "quality": cfg.quality,
                               "storage_options": cfg.storage_options, "sampling": cfg.sampling,
                               "seed": cfg.seed, "score": cfg.score is not None}, **res,
    )
    return ds if cfg.score is None else with_scoring(ds, cfg, res)


def with_scoring(ds: Dataset, cfg: PipelineConfig, res: dict[str, Any]) -> Dataset:
    """Append the scoring pool. Its actors count among the model actors that share the cluster
    (``res``), unless the score config sets their CPUs/GPUs; the metric models run on a GPU when the
    actors get a share of one."""
    from eval.metrics import resolve_cache_dir
    from eval.score import PipelineScoreStage

    sc = cfg.score
    gpus = sc.gpus_per_actor if sc.gpus_per_actor is not None else res.get("num_gpus", 0.0)
    device = sc.device if sc.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    return ds.map_batches(
        PipelineScoreStage, batch_size=sc.batch_size, batch_format="numpy", concurrency=sc.actors,
        num_cpus=sc.cpus_per_actor or res["num_cpus"], num_gpus=gpus,
        fn_constructor_kwargs={"metrics": tuple(sc.metrics), "cache_dir": resolve_cache_dir(sc.cache_dir),
                               "device": device, "seed": sc.seed, "crop_border": sc.crop_border,
                               "storage_options": cfg.storage_options},
    )


@contextlib.contextmanager
def unsplit_blocks() -> Iterator[None]:
    """Datasets built inside keep every block a map stage outputs whole (no size-based splitting)."""
    ctx = DataContext.get_current()
    old = ctx.target_max_block_size
    ctx.target_max_block_size = None
    try:
        yield
    finally:
        ctx.target_max_block_size = old


def iter_manifest_rows(cfg: PipelineConfig, items: list[dict[str, str]], sizes: dict[int, int]
                       ) -> Iterator[dict[str, Any]]:
    """Run the graph over ``items``, yielding each image's manifest row as soon as it is written (with
    its score rows as JSON in ``schema.IQA`` when scoring)."""
    with unsplit_blocks():
        ds = pipeline_dataset(cfg, items, sizes)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        yield from batch.to_pylist()
