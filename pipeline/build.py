"""Assembly of the Ray Data graph: the only place that applies resources, pool sizes, batch sizes and the
fault-tolerance options (the numbers come from the resource plan, ``pipeline/plan.py``).

Two layouts (``--layout``; ``auto`` picks, see ``plan.choose_layout``):

``single`` (default on CPU and for small GPU jobs)::

    job plan shards -> image actors: read, decode, GRM, Patch-DiT (all groups), assemble, write
      -> [score actors] -> manifest rows to the driver

One actor per CPU (or GPU), at most one per block of images; each builds one model from the driver's
copy in the object store (``pipeline/shared.py``). ``pipeline/single.py``.

``pools`` (per-group pools, the default for larger GPU jobs), one streaming execution::

    job plan shards -> read (tasks) -> decode (tasks) -> GRM + explode into patch rows (actors)
      -> Patch-DiT simple pool (τ=400, N=8) -> medium pool (τ=700, N=14) -> hard pool (τ=1000, N=20)
      -> assemble: merge, decode, encode, write (actors)  -> [score actors] -> manifest rows

Each GRM call explodes a batch of images into one block: the image rows, then the patch rows sorted by
group. Pool g refines the group-g rows of a block — the patches of several images in one call — with
its own (τ, N) and forwards every other row untouched. Blocks are never split on the way (the graph
runs with ``target_max_block_size=None`` and ``batch_size=None`` in the pools), so every block keeps
whole images and the assemble stage regroups patches by image inside a block: the regroup needs no
all-to-all shuffle, the graph has no barrier and streams with Ray Data's bounded backpressure.
(A Ray Data graph cannot fan out without recomputing its input; a chain of pass-through pools needs
no fan-out.) ``fused`` is the same with one Patch-DiT pool running all groups in one step loop
(``stages.fused_refine``).

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

from pipeline.plan import (
    GROUP_POOLS,
    Node,
    ResourcePlan,
    actor_memory,
    choose_layout,
    gpu_pool_counts,
    grm_images,
    plan_resources,
    single_actors,
)

if TYPE_CHECKING:
    from ray.data import Dataset

    from eval.score import ScoreConfig
    from pipeline.shared import SharedModel, SharedRTM

GROUP_KEYS = ("simple", "medium", "hard")
# Fault tolerance: Ray Data's actor pools restart dead actors and retry their tasks without limit by
# default (``max_restarts=-1, max_task_retries=-1`` in ``ActorPoolMapOperator``; Ray 2.60). They are not
# passed again here: extra remote args are deprecated in Ray Data and go away in Ray 2.64. An image that
# kills its actor every time is stopped by the ledger (``pipeline/faults.py``); the rest of the failure
# policy is ``failure_policy`` below (docs/pipeline.md, "Failure policy").
# tests/test_pipeline_faults.py kills a Patch-DiT actor mid-job and checks that the job still succeeds.
ERRORED_SHARE = 0.01  # blocks whose task raised may be dropped, up to about 1% of the job's images
ACTOR_INIT_DEATHS = 3  # consecutive actor deaths during __init__ (per pool) before the job fails


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
    refine: str = "diffusion"  # diffusion (Patch-DiT, PGS) | none (the decoded GRM output: no Patch-DiT pool)
    color_fix: str | None = None  # wavelet | adain | none; None: patchscaler.colorfix.DEFAULT_COLOR_FIX
    layout: str = "auto"  # auto | single | pools | fused (plan.choose_layout)
    fused: bool = False  # the pools layout with one Patch-DiT pool for all groups (= layout "fused")
    window: int = 64  # at most this many rows per manifest part
    commit_seconds: float = 2.0  # finished rows are recorded at least this often
    actors: int | None = None  # actors of the single layout (None: one per CPU or GPU, <= blocks)
    grm_actors: int | None = None  # None: 1 on CPU, plan.gpu_pool_counts on GPU
    dit_actors: dict[str, int] | int | None = None  # per group, a total split by work, or None: auto
    assemble_actors: int | None = None  # None: as grm_actors
    decode_tasks: int | None = None  # most concurrent read/decode tasks (pools layout; None: as CPUs allow)
    gpus_per_actor: float | None = None  # None: the plan's share
    cpus_per_actor: float | None = None  # None: the plan's share
    grm_batch: int = 4  # images per GRM call = per block (and per call of the single layout, at most)
    storage_options: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False  # ignore the manifest: redo every image
    retry_failed: bool = False  # also redo images that failed permanently (undecodable files)
    sources: list[str] | None = None  # the inputs, all under `input` (None: every file under it)
    input_list: str | None = None  # a file naming the inputs (pipeline/jobplan.py: iter_input_list)
    maps: bool = False  # write each image's group map to OUTPUT/_maps/ (pipeline/scores.py)
    score: ScoreConfig | None = None  # IQA-score the outputs in the same pass (pipeline/scores.py)
    score_dataset: str = ""  # dataset name of the score rows ("": the input folder's name)
    score_pairs: dict[str, tuple[str, str]] = field(default_factory=dict)  # source -> (image id, HR URI)
    crash_marker: str | None = None  # tests only, see PatchDiTStage
    # failure policy (docs/pipeline.md, "Failure policy")
    stall_minutes: float = 30.0  # no image finished for this long: stop (exit 1); 0: never
    max_error_rate: float = 0.5  # more failed than this share of the first `error_window` images: stop
    error_window: int = 100
    image_deaths: int = 3  # an image in flight in this many actor deaths becomes an error row

    def resolved_layout(self, todo: int) -> str:
        if self.fused and self.layout in ("auto", "fused"):
            return "fused"
        return choose_layout(self.layout, device=self.device, todo=todo,
                             fixed_dit=self.dit_actors is not None)

    def sampling(self, layout: str, fused_ok: bool = True) -> str:
        """The manifest's ``sampling`` of ``layout``: the mode (or "checkpoint") and "+fused" when all
        groups run in one loop."""
        if self.refine == "none":
            return "none"
        fused = layout == "fused" or (layout == "single" and fused_ok)
        return (self.mode or "checkpoint") + ("+fused" if fused else "")


@dataclass
class Graph:
    """What one execution runs: the layout, the actors per pool and the resource plan."""

    layout: str
    plan: ResourcePlan
    batch: int  # images per call of the first model stage
    dit: dict[int, int]  # Patch-DiT actors per group (pools), {None: n} (fused), {} (single)
    sampling: str
    ledger: Any = None  # the execution's pipeline.faults.Ledger (set by the runner), or None
    todo: int = 0  # images of the execution

    def describe(self) -> str:
        pools = ", ".join(f"{name} {p.actors}" for name, p in self.plan.pools.items())
        p = next(iter(self.plan.pools.values()))
        res = f"{p.num_cpus:g} CPU" + (f" + {p.num_gpus:g} GPU" if p.num_gpus else "")
        if p.memory:
            res += f" + {p.memory / 2**30:.1f} GiB"
        tasks = f"; read/decode tasks <= {self.plan.tasks}" if self.plan.tasks else ""
        if self.layout != "single":
            tasks += f"; {self.batch} images a block"
        return f"layout {self.layout}: actors {pools} ({res} each){tasks}"


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected Ray cluster."""
    import ray

    return [Node(cpus=float(n["Resources"].get("CPU", 0)), gpus=int(n["Resources"].get("GPU", 0)),
                 memory=float(n["Resources"].get("memory", 0)))
            for n in ray.nodes() if n.get("Alive")]


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


def light_and_dit(cfg: PipelineConfig, nodes: list[Node], layout: str) -> tuple[int, int, int]:
    """(GRM actors, assemble actors, Patch-DiT actors in all) of the pools/fused layouts."""
    gpus = sum(n.gpus for n in nodes) if cfg.device.startswith("cuda") else 0
    scorers = cfg.score.actors if cfg.score is not None else 0
    grm, assemble, dit = gpu_pool_counts(gpus, fused=layout == "fused", score_actors=scorers) if gpus \
        else (1, 1, 1 if layout == "fused" else 3)
    if cfg.grm_actors is not None:
        grm = cfg.grm_actors
    if cfg.assemble_actors is not None:
        assemble = cfg.assemble_actors
    if isinstance(cfg.dit_actors, int):
        dit = cfg.dit_actors
    elif isinstance(cfg.dit_actors, dict):
        dit = sum(cfg.dit_actors.values())
    return grm, assemble, dit


def pool_sizes(cfg: PipelineConfig, total: int, counts: dict[int, int], steps: tuple[int, int, int]
               ) -> dict[int, int]:
    """Actors per group pool: as given, or ``total`` split by work (patches × steps) of ``counts``, the
    patches per group measured so far (equal counts before any). Every pool of the chain gets at least
    one actor, since it also forwards the other groups' rows."""
    if isinstance(cfg.dit_actors, dict):
        return {g: max(1, cfg.dit_actors.get(name, 1)) for g, name in enumerate(GROUP_KEYS)}
    seen = counts if sum(counts.values()) else dict.fromkeys(range(3), 1)
    work = {g: max(seen.get(g, 0), 1) * steps[g] for g in range(3)}
    return dit_pool_sizes(work, total)


def plan_graph(cfg: PipelineConfig, nodes: list[Node], *, layout: str, todo: int, counts: dict[int, int],
               steps: tuple[int, int, int], fused_ok: bool = True, model_bytes: int = 0,
               image_bytes: int = 0) -> Graph:
    """The pools and resources of an execution of ``todo`` images in ``layout`` (``plan.PlanError`` when
    they cannot fit on ``nodes``). With ``model_bytes`` (the model's tensors) every actor declares
    ``plan.actor_memory`` of the pixel limit; with ``image_bytes`` (``plan.block_bytes_of`` the limit)
    the pools layouts' GRM calls take no more images than keep a block under ``plan.BLOCK_BYTES_CAP``."""
    scorers = {"score": cfg.score.actors} if cfg.score is not None else {}
    memory = actor_memory(model_bytes=model_bytes, max_pixels=cfg.max_pixels) if model_bytes else 0
    common = {"device": cfg.device, "cpus_per_actor": cfg.cpus_per_actor,
              "gpus_per_actor": cfg.gpus_per_actor, "memory_per_actor": memory}
    if layout == "single":  # one actor per CPU or GPU, but none without a full call's work (--grm-batch)
        n = cfg.actors or single_actors(nodes, device=cfg.device, blocks=math.ceil(todo / cfg.grm_batch))
        batch = max(1, min(cfg.grm_batch, math.ceil(todo / n)))
        plan = plan_resources(nodes, {"image": n, **scorers}, tasks=0, **common)
        return Graph(layout, plan, batch, {}, cfg.sampling(layout, fused_ok), todo=todo)
    grm, assemble, dit = light_and_dit(cfg, nodes, layout)
    sizes: dict[Any, int] = {None: dit} if layout == "fused" else pool_sizes(cfg, dit, counts, steps)
    sizes = {} if cfg.refine == "none" else sizes  # nothing to sample: no Patch-DiT pool
    names = {None: "dit"} | dict(enumerate(GROUP_POOLS))
    pools = {"grm": grm, **{names[g]: k for g, k in sizes.items()}, "assemble": assemble, **scorers}
    cap = max(1, min(cfg.decode_tasks or todo, todo))  # no more tasks than images
    plan = plan_resources(nodes, pools, tasks=cap, **common)
    batch = grm_images(image_bytes=image_bytes, asked=cfg.grm_batch) if image_bytes else cfg.grm_batch
    return Graph(layout, plan, batch, sizes, cfg.sampling(layout), todo=todo)


def _guarded(graph: Graph, cfg: PipelineConfig, stage: type, kwargs: dict[str, Any], name: str
             ) -> dict[str, Any]:
    """``map_batches`` arguments of ``stage``: behind the execution's ledger when it has one
    (``pipeline/faults.py``)."""
    if graph.ledger is None:
        return {"fn": stage, "fn_constructor_kwargs": kwargs}
    from pipeline.faults import Guarded

    return {"fn": Guarded, "fn_constructor_kwargs": {"stage": stage, "kwargs": kwargs, "ledger": graph.ledger,
                                                     "limit": cfg.image_deaths, "name": name}}


def _task_fn(graph: Graph, cfg: PipelineConfig, stage: type, kwargs: dict[str, Any], name: str) -> Any:
    """The callable of a task stage: ``stage(**kwargs)``, behind the ledger when there is one."""
    if graph.ledger is None:
        return stage(**kwargs)
    from pipeline.faults import Guarded

    return Guarded(stage=stage, kwargs=kwargs, ledger=graph.ledger, limit=cfg.image_deaths, name=name)


def _actor_args(pool: Any, size: int | None = None) -> dict[str, Any]:
    from ray.data import ActorPoolStrategy

    return {"compute": ActorPoolStrategy(size=size or pool.actors), "num_cpus": pool.num_cpus,
            "num_gpus": pool.num_gpus, **({"memory": pool.memory} if pool.memory else {})}


class ReadShard:
    """Ray Data task: one block of the job plan's shards (``pipeline/jobplan.py``: a row group of about
    a thousand rows) -> the pipeline's first rows (image id + meta)."""

    def __init__(self, *, storage_options: dict[str, Any]) -> None:
        self.storage_options = storage_options

    def __call__(self, batch: Any) -> dict[str, Any]:
        from pipeline.jobplan import read_block, to_items

        return to_items(read_block(batch["shard"][0].as_py(), batch["group"][0].as_py(),
                                   self.storage_options))


def source_dataset(cfg: PipelineConfig, blocks: list[tuple[str, int]], rows_per_block: int) -> Dataset:
    """The todo rows of the job plan, ``rows_per_block`` images a block. Ray Data gets one small item
    per shard block (about a thousand images each; a million images are a thousand items), reads each
    in a task and cuts it into blocks of ``rows_per_block`` rows as it streams (a streaming
    repartition, no barrier), so neither the driver nor the object store holds a block per image up
    front. These tasks ask for no CPU: they read a few KB each and must never wait behind the actors,
    which may hold every CPU (the single layout)."""
    import ray

    ds = ray.data.from_items([{"shard": uri, "group": g} for uri, g in blocks],
                             override_num_blocks=max(1, len(blocks)))
    ds = ds.map_batches(ReadShard(storage_options=cfg.storage_options), batch_size=1, batch_format="pyarrow",
                        num_cpus=0, concurrency=1)
    ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    # Dataset.repartition takes no resource arguments; its tasks would ask for Ray Data's default of
    # one CPU, which the actors may all hold: ask for none (the logical operator's remote args). Ray 2.60
    # has no public way: under unsplit_blocks() a map task (num_cpus=0) makes one block per input block.
    ds._logical_plan.dag.ray_remote_args["num_cpus"] = 0
    return ds


def pipeline_dataset(cfg: PipelineConfig, blocks: list[tuple[str, int]], graph: Graph, model: SharedModel,
                     rtm: SharedRTM) -> Dataset:
    """The whole graph over the job plan's ``blocks`` (``jobplan.JobPlan.blocks``); its rows are the
    images' manifest rows. Build it inside ``unsplit_blocks()``."""
    from ray.data import TaskPoolStrategy

    pools = graph.plan.pools
    model_args = {"weights": model, "device": cfg.device, "autoencoder": cfg.autoencoder,
                  "precision": cfg.precision}
    score = cfg.score is not None
    fix = {"refine": cfg.refine, "color_fix": cfg.color_fix}
    ds = source_dataset(cfg, blocks, graph.batch if graph.layout == "single" else 1)
    if graph.layout == "single":
        from pipeline.single import ImageStage

        ds = ds.map_batches(
            batch_size=graph.batch, batch_format="numpy", **_actor_args(pools["image"]),
            **_guarded(graph, cfg, ImageStage, {
                **model_args, "rtm": rtm, "seed": cfg.seed, "mode": cfg.mode,
                "fused": graph.sampling.endswith("+fused"), "fmt": cfg.fmt, "quality": cfg.quality,
                "max_pixels": cfg.max_pixels, "storage_options": cfg.storage_options, "score": score,
                "crash_marker": cfg.crash_marker, **fix}, "image"),
        )
        return ds if cfg.score is None else with_scoring(ds, cfg, pools["score"])

    from pipeline.stages import AssembleStage, DecodeStage, GRMStage, PatchDiTStage, ReadStage

    tasks = {"compute": TaskPoolStrategy(size=graph.plan.tasks), "num_cpus": graph.plan.task_cpus}
    read = {"storage_options": cfg.storage_options}
    ds = ds.map_batches(_task_fn(graph, cfg, ReadStage, read, "read"), batch_size=1, batch_format="numpy",
                        **tasks)
    ds = ds.map_batches(_task_fn(graph, cfg, DecodeStage, {"max_pixels": cfg.max_pixels}, "decode"),
                        batch_size=1, batch_format="numpy", **tasks)
    ds = ds.map_batches(
        batch_size=graph.batch, batch_format="numpy", **_actor_args(pools["grm"]),
        **_guarded(graph, cfg, GRMStage, {**model_args, "rtm": rtm, "seed": cfg.seed, "mode": cfg.mode,
                                          "storage_options": cfg.storage_options, **fix}, "grm"),
    )
    for group, n in graph.dit.items():
        name = "dit" if group is None else GROUP_POOLS[group]
        ds = ds.map_batches(  # batch_size=None: whole blocks, so images stay whole
            batch_size=None, batch_format="numpy", **_actor_args(pools[name], n),
            **_guarded(graph, cfg, PatchDiTStage, {**model_args, "rtm": rtm, "mode": cfg.mode, "group": group,
                                                   "seed": cfg.seed, "crash_marker": cfg.crash_marker}, name),
        )
    ds = ds.map_batches(
        batch_size=None, batch_format="numpy", **_actor_args(pools["assemble"]),
        **_guarded(graph, cfg, AssembleStage, {
            **model_args, "fmt": cfg.fmt, "quality": cfg.quality, "storage_options": cfg.storage_options,
            "sampling": graph.sampling, "seed": cfg.seed, "score": score, **fix}, "assemble"),
    )
    return ds if cfg.score is None else with_scoring(ds, cfg, pools["score"])


def with_scoring(ds: Dataset, cfg: PipelineConfig, pool: Any) -> Dataset:
    """Append the scoring pool (resources from the plan); the metric models run on a GPU when its
    actors get a share of one."""
    from eval.metrics import resolve_cache_dir
    from eval.score import PipelineScoreStage

    sc = cfg.score
    device = sc.device if sc.device != "auto" else ("cuda" if pool.num_gpus > 0 else "cpu")
    return ds.map_batches(
        PipelineScoreStage, batch_size=sc.batch_size, batch_format="numpy", **_actor_args(pool),
        fn_constructor_kwargs={"metrics": tuple(sc.metrics), "cache_dir": resolve_cache_dir(sc.cache_dir),
                               "device": device, "seed": sc.seed, "crop_border": sc.crop_border,
                               "storage_options": cfg.storage_options},
    )


@contextlib.contextmanager
def unsplit_blocks() -> Iterator[None]:
    """Datasets built inside keep every block a map stage outputs whole (no size-based splitting)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = ctx.target_max_block_size
    ctx.target_max_block_size = None
    try:
        yield
    finally:
        ctx.target_max_block_size = old


@contextlib.contextmanager
def failure_policy(cfg: PipelineConfig, *, todo: int, batch: int) -> Iterator[None]:
    """Datasets built inside run with the pipeline's failure policy (docs/pipeline.md, "Failure policy"):
    a block whose task raised outside the stages' per-image ``try`` is dropped (its images come back as
    lost rows, redone by the next run) up to about ``ERRORED_SHARE`` of the images, then the execution
    fails; ``ACTOR_INIT_DEATHS`` consecutive actor deaths during ``__init__`` fail it; no progress of any
    operator for ``--stall-minutes`` fails it (Ray Data's own watchdog, beside the driver's)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    names = ("max_errored_blocks", "max_consecutive_actor_init_deaths", "execution_no_progress_timeout_s")
    old = {name: getattr(ctx, name) for name in names}
    ctx.max_errored_blocks = max(2, math.ceil(ERRORED_SHARE * todo / max(1, batch)))
    ctx.max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS
    # Ray Data's watchdog ends a stalled execution a minute after the driver's (``--stall-minutes``)
    ctx.execution_no_progress_timeout_s = cfg.stall_minutes * 60 + 60 if cfg.stall_minutes > 0 else -1
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(ctx, name, value)


def iter_manifest_rows(cfg: PipelineConfig, blocks: list[tuple[str, int]], graph: Graph, model: SharedModel,
                       rtm: SharedRTM) -> Iterator[dict[str, Any]]:
    """Run the graph over the job plan's ``blocks``, yielding each image's manifest row as soon as it
    is written (with its score rows as JSON in ``schema.IQA`` when scoring). Closing the generator ends
    the execution."""
    with unsplit_blocks(), failure_policy(cfg, todo=graph.todo, batch=graph.batch):
        ds = pipeline_dataset(cfg, blocks, graph, model, rtm)
    # prefetch_batches=0: with the default of 1 a block is handed over only once the next one has
    # arrived, so every row reached the driver (and the manifest) one model call late
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    try:
        for batch in batches:
            yield from batch.to_pylist()
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()
