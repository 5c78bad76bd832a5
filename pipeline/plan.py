"""The resource plan: which actor pools a job runs, how many actors each gets, and what every actor and
task asks Ray for. Pure functions of the cluster's nodes and the job (no Ray here), so that every
combination can be checked in a unit test (``tests/test_plan.py``); ``build.py`` applies the plan.

A plan must *fit*: all actors of all pools run at the same time (the graph streams), and beside them
one read task and one decode task must still find room, else the job waits forever (issue 11: six
actors of ``round(1/6, 3)`` CPU left 0.998 CPU for a 1-CPU decode task). Fitting is checked by placing
every request on the nodes (``fits``); a plan that cannot fit raises :class:`PlanError`, one line.

How the plan is made (derivation and GPU figures: ``docs/pipeline.md``, "Resource plan"):

- Every actor of a job asks for the same CPUs and the same GPU fraction. With equal requests any
  placement order Ray chooses fits when one placement does, so no actor can be left pending because
  others took the room it needed.
- Requests are rounded *down* to Ray's resource unit (1e-4), so their sum never exceeds the cluster.
- Read/decode tasks (the ``pools`` layout) ask for ``task_cpus`` each; two of them are kept free, and
  as many run at once as the CPUs the actors leave free hold (``task_slots``), under an optional cap.
- GPUs: ``k = ceil(actors / GPUs)`` actors share a GPU, each asking ``1/k`` (rounded down).
- Memory: every actor declares ``memory=`` (:func:`actor_memory`: the model plus the working set of one
  image at the pixel limit), or the largest equal share of the nodes' memory when that does not fit.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Any

UNIT = 1e-4  # Ray's resource granularity
RESERVED_TASKS = 2  # one read and one decode task always find room beside the actors
MEMORY_NOTE_SHARE = 0.9  # the plan notes a memory share below this part of what an actor wants
LAYOUTS = ("auto", "single", "pools", "fused")
GROUP_POOLS = ("dit-simple", "dit-medium", "dit-hard")
DIT_SLOTS_PER_GPU = 2  # Patch-DiT actors per GPU on multi-GPU nodes (docs/pipeline.md)
# Shares of an image's GPU time in the light stages, from bench/flops.py (paper preset, 512 -> 2048, bf16,
# prompt cache, adaptive shares 0.2/0.3/0.5: 893 TFLOP per image; docs/pipeline.md): the GRM stage
# (encode 30.7 + GRM 0.3 + classifier 0.1 TFLOP = 3.5%, counted twice: the encoder runs in float32, TF32
# at about half the bf16 rate) and the assemble stage (decode 69.2 TFLOP = 7.8%). Patch-DiT is the rest.
GRM_SHARE = 0.07
ASSEMBLE_SHARE = 0.08
SMALL_JOB = 16  # images: below this a GPU job runs the single layout (start-up dominates)
# Memory of a model actor (docs/pipeline.md, "Memory per actor"): the interpreter, torch, the Ray worker
# and one autoencoder tile's activations, plus the model, plus the arrays one image at the pixel limit
# holds, per LR input pixel: LR uint8 + float (15 B), the x4 image in float32 (192 B), the output in
# uint8 and encoded (96 B), the latent patches (4 channels fp32, 1/4 latent pixel per LR pixel, 4x for
# the 16/8 overlap: 16 B per tensor; y0, noise, x0: 48 B) and the K=4 gathered RTM values (64 B),
# rounded up to 448 B.
ACTOR_BASE_BYTES = 1 << 30
BYTES_PER_PIXEL = 448
MEMORY_UNIT = 1 << 20  # memory requests are whole MiB
# Blocks of the pools/fused layouts (docs/pipeline.md, "Block size"): the images of one GRM call become
# one block that rides, whole, through every Patch-DiT pool to the assembler. Its heavy columns per image:
# a patch row per latent patch (one fp32 latent of C x V x V, K fp32 scores and K int64 RTM ids, the
# int64 group, plus PATCH_ROW_OVERHEAD for the id and offsets) and the image row's LR pixels (RGB + alpha,
# uint8). Images per GRM call are capped so that such a block stays under BLOCK_BYTES_CAP for a square
# image at the pixel limit; an image that alone is over the cap makes a block of its own.
BLOCK_BYTES_CAP = 256 << 20
PATCH_ROW_OVERHEAD = 64
LR_BYTES_PER_PIXEL = 4


class PlanError(ValueError):
    """The job's pools cannot fit on the cluster; the message is one line for the user."""


@dataclass(frozen=True)
class Node:
    cpus: float
    gpus: int = 0
    memory: float = 0.0  # bytes of Ray's ``memory`` resource; 0: not planned


@dataclass(frozen=True)
class PoolPlan:
    actors: int
    num_cpus: float
    num_gpus: float = 0.0
    memory: int = 0  # bytes (Ray's ``memory=``); 0: none declared


@dataclass(frozen=True)
class ResourcePlan:
    pools: dict[str, PoolPlan]  # graph order
    task_cpus: float = 0.0  # CPUs of each read/decode task (0: the layout has none)
    tasks: int = 0  # at most this many read (and decode) tasks at once
    notes: list[str] = field(default_factory=list)
    memory_wanted: int = 0  # what actor_memory asked per actor (PoolPlan.memory: what fits)

    @property
    def actors(self) -> int:
        return sum(p.actors for p in self.pools.values())

    def requests(self) -> list[tuple[float, ...]]:
        """(CPUs, GPUs[, memory]) of every actor, then (CPUs, GPUs) of the reserved tasks: what must fit
        at once."""
        out = [(p.num_cpus, p.num_gpus, *([p.memory] if p.memory else []))
               for p in self.pools.values() for _ in range(p.actors)]
        return out + [(self.task_cpus, 0.0)] * (RESERVED_TASKS if self.tasks else 0)


def floor_unit(x: float) -> float:
    """``x`` rounded down to Ray's resource unit (and never below 0)."""
    return max(0.0, math.floor(x / UNIT + 1e-9) * UNIT)


def _place(nodes: list[Node], requests: list[tuple[float, ...]], order: str) -> bool:
    """Place ``requests`` (CPUs, GPUs[, memory bytes]) one by one: on the first node with room (``pack``),
    the last (``reverse``) or the emptiest (``spread``); a GPU fraction within one GPU, whole GPUs for
    >= 1; memory only on nodes whose memory is known."""
    free_cpu = [n.cpus for n in nodes]
    free_gpu = [[1.0] * n.gpus for n in nodes]
    free_mem = [n.memory if n.memory > 0 else math.inf for n in nodes]

    def gpu_slots(i: int, gpu: float) -> list[int] | None:
        if gpu <= 0:
            return []
        if gpu >= 1:
            whole = [j for j, f in enumerate(free_gpu[i]) if f >= 1 - 1e-9][: math.ceil(gpu - 1e-9)]
            return whole if len(whole) == math.ceil(gpu - 1e-9) else None
        j = next((j for j, f in enumerate(free_gpu[i]) if f + 1e-9 >= gpu), None)
        return None if j is None else [j]

    def room(i: int, cpu: float, gpu: float, mem: float) -> bool:
        return free_cpu[i] + 1e-9 >= cpu and free_mem[i] >= mem and gpu_slots(i, gpu) is not None

    def take(i: int, cpu: float, gpu: float, mem: float) -> None:
        for j in gpu_slots(i, gpu) or []:
            free_gpu[i][j] = 0.0 if gpu >= 1 else free_gpu[i][j] - gpu
        free_cpu[i] -= cpu
        free_mem[i] -= mem

    # runs of equal requests are placed together: a node without room for one has none for the next
    for (cpu, gpu, *rest), group in itertools.groupby(requests):
        mem, n = (rest[0] if rest else 0), len(list(group))
        if order == "spread":  # each on the emptiest node with room
            heap = [(-free_cpu[i], i) for i in range(len(nodes)) if room(i, cpu, gpu, mem)]
            heapq.heapify(heap)
            while n:
                if not heap:
                    return False
                i = heapq.heappop(heap)[1]
                take(i, cpu, gpu, mem)
                n -= 1
                if room(i, cpu, gpu, mem):
                    heapq.heappush(heap, (-free_cpu[i], i))
            continue
        for i in range(len(nodes)) if order == "pack" else reversed(range(len(nodes))):
            while n and room(i, cpu, gpu, mem):
                take(i, cpu, gpu, mem)
                n -= 1
        if n:
            return False
    return True


def fits(nodes: list[Node], requests: list[tuple[float, ...]]) -> bool:
    """Whether ``requests`` fit on ``nodes`` however Ray places them: the actors (GPU requests first,
    then by size) packed onto the first nodes, onto the last ones or spread, and the tasks (requests
    without GPU that come last with ``ResourcePlan.requests``) in the room that is left."""
    return all(_place(nodes, requests, order) for order in ("pack", "reverse", "spread"))


def task_cpus(nodes: list[Node]) -> float:
    """CPUs of one read/decode task: half a CPU, less on the smallest nodes (1 CPU: 1/8)."""
    return floor_unit(min(0.5, min(n.cpus for n in nodes) / 8))


def actor_memory(*, model_bytes: int, max_pixels: int) -> int:
    """Bytes a model actor declares (Ray's ``memory=``): ``ACTOR_BASE_BYTES`` + the model +
    ``BYTES_PER_PIXEL`` x the pixel limit (one image at the limit in flight), in whole MiB."""
    need = ACTOR_BASE_BYTES + model_bytes + BYTES_PER_PIXEL * max_pixels
    return -(-need // MEMORY_UNIT) * MEMORY_UNIT


def image_block_bytes(*, pixels: int, scale: int, downsample: int, latent_channels: int, patch: int,
                      overlap: int, top_k: int) -> int:
    """Bytes that one square LR image of ``pixels`` pixels adds to a GRM block (the comment on
    ``BLOCK_BYTES_CAP``); its patches are those of ``patching.plan_grid``."""
    from patchscaler.patching import plan_grid

    side = math.isqrt(max(1, pixels))
    latent = math.ceil(scale * side / downsample)  # latent pixels a side
    patches = plan_grid(latent, latent, patch=patch, overlap=overlap).num_patches
    row = latent_channels * patch * patch * 4 + top_k * (4 + 8) + 8 + PATCH_ROW_OVERHEAD
    return patches * row + pixels * LR_BYTES_PER_PIXEL


def block_bytes_of(config: Any, max_pixels: int) -> int:
    """``image_block_bytes`` of an image at ``max_pixels`` for the model ``config``
    (``patchscaler.config.PatchScalerConfig``)."""
    s = config.sampler
    return image_block_bytes(pixels=max_pixels, scale=config.scale,
                             downsample=config.autoencoder.downsample_factor,
                             latent_channels=config.latent_channels, patch=s.patch_size, overlap=s.overlap,
                             top_k=config.texture_encoder.top_k)


def grm_images(*, image_bytes: int, asked: int, cap: int = BLOCK_BYTES_CAP) -> int:
    """Images per GRM call (= per block): ``asked`` (``--grm-batch``), fewer when that many images of
    ``image_bytes`` would make a block over ``cap``, and never fewer than one."""
    return max(1, min(asked, cap // max(1, image_bytes)))


def task_slots(nodes: list[Node], actor_cpus: float, task_cpus_: float) -> int:
    """Read/decode tasks of ``task_cpus_`` CPUs each that fit in what the actors leave free."""
    if task_cpus_ <= 0:
        return 0
    return max(0, math.floor((sum(n.cpus for n in nodes) - actor_cpus) / task_cpus_ + 1e-6))


def _largest_memory(nodes: list[Node], requests: Any, want: int) -> int:
    """The largest equal memory request <= ``want`` (whole MiB) with which ``requests(memory)`` fits."""
    lo, hi = 0, want // MEMORY_UNIT
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(nodes, requests(mid * MEMORY_UNIT)) else (lo, mid - 1)
    return lo * MEMORY_UNIT


def plan_resources(nodes: list[Node], pools: dict[str, int], *, device: str, tasks: int | None = 0,
                   cpus_per_actor: float | None = None, gpus_per_actor: float | None = None,
                   memory_per_actor: int = 0) -> ResourcePlan:
    """The plan of ``pools`` (name -> actors, graph order) on ``nodes``. ``tasks``: 0 when the layout
    reads inside its actors, else the most read/decode tasks to run at once (None: no cap); either way
    no more than the CPUs the actors leave free hold (at least ``RESERVED_TASKS``, which are always kept
    free). ``memory_per_actor``: what each actor should declare (``actor_memory``; 0: nothing), lowered
    to the largest equal share that fits the nodes' memory. ``PlanError`` when the plan cannot fit."""
    if not nodes or sum(n.cpus for n in nodes) < 1 - 1e-9:
        raise PlanError("the Ray cluster has less than 1 CPU")
    actors = sum(pools.values())
    if actors < 1 or min(pools.values()) < 1:
        raise PlanError(f"every pool needs at least one actor, got {pools}")
    gpus = sum(n.gpus for n in nodes)
    cuda = device.startswith("cuda")
    if cuda and gpus == 0:
        raise PlanError(f"--device {device} but the Ray cluster has no GPU")
    has_tasks = tasks is None or tasks > 0
    t = task_cpus(nodes) if has_tasks else 0.0
    reserve = [(t, 0.0)] * (RESERVED_TASKS if has_tasks else 0)

    gpu = 0.0
    if cuda:
        gpu = gpus_per_actor if gpus_per_actor is not None else floor_unit(1 / math.ceil(actors / gpus))

    def requests(cpu: float) -> list[tuple[float, float]]:  # actors first, then the reserved tasks
        return [(cpu, gpu)] * actors + reserve

    if cpus_per_actor is not None:
        cpu = cpus_per_actor
    else:  # the largest equal share that fits: at most 1 CPU per actor on GPU nodes, a node on CPU
        cap = 1.0 if cuda else max(n.cpus for n in nodes)
        lo, hi = 0, int(cap / UNIT + 1e-9)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(nodes, requests(mid * UNIT)) else (lo, mid - 1)
        cpu = lo * UNIT
    if cpu < UNIT or not fits(nodes, requests(cpu)):
        want = f"{actors} actors x {cpu:g} CPU" + (f" x {gpu:g} GPU" if cuda else "")
        room = f"{sum(n.cpus for n in nodes):g} CPUs" + (f", {gpus} GPUs" if cuda else "")
        extra = f" + {len(reserve)} read/decode tasks x {t:g} CPU" if reserve else ""
        raise PlanError(f"the pipeline's actors do not fit on the Ray cluster: {want}{extra} on {room} in "
                        f"{len(nodes)} node(s); lower --cpus-per-actor/--gpus-per-actor or the actor counts")
    memory, notes = 0, []
    if memory_per_actor > 0 and any(n.memory > 0 for n in nodes):
        memory = _largest_memory(nodes, lambda m: [(cpu, gpu, m)] * actors + reserve, memory_per_actor)
        if memory < MEMORY_NOTE_SHARE * memory_per_actor:  # a rounding short of it is not worth a line
            notes.append(f"memory: {memory / 2**30:.1f} GiB per actor, not the "
                         f"{memory_per_actor / 2**30:.1f} GiB an image at the pixel limit needs "
                         "(lower --max-pixels or the actor counts)")
    elif memory_per_actor > 0:
        memory = memory_per_actor
    plan = {name: PoolPlan(actors=n, num_cpus=cpu, num_gpus=gpu, memory=memory) for name, n in pools.items()}
    count = 0
    if has_tasks:
        slots = max(RESERVED_TASKS, task_slots(nodes, actors * cpu, t))
        count = max(1, min(slots, tasks if tasks is not None else slots))
    return ResourcePlan(pools=plan, task_cpus=t, tasks=count, notes=notes, memory_wanted=memory_per_actor)


# --- which pools, how many actors ------------------------------------------------------------------


def choose_layout(layout: str, *, device: str, todo: int, fixed_dit: bool) -> str:
    """``auto`` -> ``single`` (one actor per image: read, GRM, fused Patch-DiT, assemble) on CPU and
    for small GPU jobs, where start-up and moving patches between processes cost more than pools
    gain; ``pools`` (per-group Patch-DiT pools) for larger GPU jobs or when ``--dit-actors`` is set."""
    if layout not in LAYOUTS:
        raise PlanError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if layout != "auto":
        return layout
    if fixed_dit:
        return "pools"
    return "single" if not device.startswith("cuda") or todo < SMALL_JOB else "pools"


def single_actors(nodes: list[Node], *, device: str, blocks: int) -> int:
    """Actors of the single layout: one per CPU (CPU) or per GPU, no more than there are ``blocks``
    (model calls of ``--grm-batch`` images): every actor process costs a torch import and a model build,
    worth it only with a call's work to do."""
    if device.startswith("cuda"):
        per = sum(n.gpus for n in nodes)
    else:
        per = sum(max(1, int(n.cpus)) for n in nodes)
    return max(1, min(per, blocks))


def light_actors(gpus: int, slots: int, share: float) -> int:
    """GRM or assemble actors on a GPU cluster: enough for ``share`` of the cluster's GPU time when each
    gets ``1/slots`` of a GPU, at least one."""
    return max(1, math.ceil(gpus * slots * share - 1e-9))


def gpu_pool_counts(gpus: int, *, fused: bool, score_actors: int = 0) -> tuple[int, int, int]:
    """(GRM actors, assemble actors, Patch-DiT actors in all) of the pools layout on ``gpus`` GPUs: the
    GPUs are cut into equal slots, ``DIT_SLOTS_PER_GPU`` per GPU (more on small nodes, so that the
    three group pools and the light actors all get one); the light stages get what ``GRM_SHARE`` and
    ``ASSEMBLE_SHARE`` need and Patch-DiT every other slot (docs/pipeline.md, "Resource plan")."""
    need_dit = 1 if fused else 3
    slots = DIT_SLOTS_PER_GPU
    while True:
        grm, assemble = light_actors(gpus, slots, GRM_SHARE), light_actors(gpus, slots, ASSEMBLE_SHARE)
        dit = gpus * slots - grm - assemble - score_actors
        if dit >= need_dit:
            return grm, assemble, dit
        slots += 1
