"""The resource plan (pipeline/plan.py): every combination of pools fits every cluster of >= 1 CPU, the
read/decode tasks included, or fails at once with a one-line message; the GPU plan on 1 and 8 GPUs."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from pipeline.build import GROUP_KEYS, PipelineConfig, plan_graph
from pipeline.plan import (
    BLOCK_BYTES_CAP,
    GROUP_POOLS,
    LR_BYTES_PER_PIXEL,
    PATCH_ROW_OVERHEAD,
    RESERVED_TASKS,
    UNIT,
    Node,
    PlanError,
    ResourcePlan,
    actor_memory,
    block_bytes_of,
    choose_layout,
    fits,
    gpu_pool_counts,
    grm_images,
    plan_resources,
    single_actors,
    task_slots,
)

# the pools of every layout, with and without the scoring pool (``--score``), and bigger pools
LAYOUT_POOLS = {
    "single": {"image": 1},
    "single x16": {"image": 16},
    "pools": {"grm": 1, **dict.fromkeys(GROUP_POOLS, 1), "assemble": 1},
    "pools, large": {"grm": 2, "dit-simple": 3, "dit-medium": 5, "dit-hard": 6, "assemble": 2},
    "fused": {"grm": 1, "dit": 1, "assemble": 1},
}
SCORING = ({}, {"score": 1}, {"score": 3})


def placed(nodes: list[Node], requests: list[tuple[float, ...]], order: str) -> bool:
    """Place ``requests`` one by one as Ray might: on the first node (``pack``) or the emptiest one
    (``spread``) that has room, GPU fractions within one GPU, memory where the node's is known (an
    independent check of ``plan.fits``)."""
    cpu = [n.cpus for n in nodes]
    gpu = [[1.0] * n.gpus for n in nodes]
    mem = [n.memory or float("inf") for n in nodes]
    for c, g, *m in requests:
        need = m[0] if m else 0
        candidates = [i for i in range(len(nodes)) if cpu[i] + 1e-9 >= c and mem[i] >= need
                      and (g <= 0 or any(f + 1e-9 >= g for f in gpu[i]))]
        if not candidates:
            return False
        i = candidates[0] if order == "pack" else max(candidates, key=lambda i: cpu[i])
        cpu[i] -= c
        mem[i] -= need
        if g > 0:
            j = next(j for j, f in enumerate(gpu[i]) if f + 1e-9 >= g)
            gpu[i][j] -= g
    return True


def assert_fits(plan: ResourcePlan, nodes: list[Node], pools: dict[str, int], device: str,
                tasks: int | None) -> None:
    requests = plan.requests()
    assert [name for name in plan.pools] == list(pools)  # graph order kept
    assert {name: p.actors for name, p in plan.pools.items()} == pools
    # the sum of what is asked fits the cluster ...
    assert sum(r[0] for r in requests) <= sum(n.cpus for n in nodes) + 1e-9
    assert sum(r[1] for r in requests) <= sum(n.gpus for n in nodes) + 1e-9
    # ... with room for one read and one decode task beside all actors, in whatever order Ray places them
    reserved = RESERVED_TASKS if tasks != 0 else 0
    actors, task_requests = requests[:len(requests) - reserved], requests[len(requests) - reserved:]
    assert task_requests == [(plan.task_cpus, 0.0)] * reserved
    for order in ("pack", "spread"):
        shuffled = actors[:]
        random.Random(len(requests)).shuffle(shuffled)
        for first in (actors, shuffled, actors[::-1]):
            assert placed(nodes, first + task_requests, order), (order, plan)
    for p in plan.pools.values():
        assert p.num_cpus >= UNIT and abs(p.num_cpus / UNIT - round(p.num_cpus / UNIT)) < 1e-6
        assert (p.num_gpus > 0) == device.startswith("cuda")
        assert p.num_gpus <= 1
    if tasks != 0:  # as many read/decode tasks as the CPUs the actors leave free hold, under the cap
        free = sum(n.cpus for n in nodes) - sum(p.actors * p.num_cpus for p in plan.pools.values())
        slots = math.floor(free / plan.task_cpus + 1e-6)
        assert 0 < plan.task_cpus <= 0.5 and slots >= RESERVED_TASKS
        assert plan.tasks == min(slots, tasks if tasks is not None else slots)


@pytest.mark.parametrize("gpus", [0, 1, 8])
@pytest.mark.parametrize("layout", sorted(LAYOUT_POOLS))
def test_every_pool_combination_fits_every_cluster(layout: str, gpus: int) -> None:
    checked = 0
    for cpus, score in itertools.product(range(1, 17), SCORING):
        pools = {**LAYOUT_POOLS[layout], **score}
        tasks = 0 if layout.startswith("single") else 4
        for device in ("cpu", "cuda") if gpus else ("cpu",):
            nodes = [Node(cpus=cpus, gpus=gpus)]
            plan = plan_resources(nodes, pools, device=device, tasks=tasks)
            assert_fits(plan, nodes, pools, device, tasks)
            checked += 1
    assert checked == 16 * len(SCORING) * (2 if gpus else 1)


def test_the_default_plan_that_hung_now_fits() -> None:
    """Issue 11: ``--score`` gave six actors round(1/6, 3) = 0.167 CPU each, 1.002 in all, on 2 CPUs, and
    the 1-CPU decode task never started."""
    pools = {"grm": 1, **dict.fromkeys(GROUP_POOLS, 1), "assemble": 1, "score": 1}
    plan = plan_resources([Node(cpus=2)], pools, device="cpu", tasks=4)
    free = 2 - sum(p.actors * p.num_cpus for p in plan.pools.values())
    assert free >= RESERVED_TASKS * plan.task_cpus - 1e-9 and plan.task_cpus > 0
    assert plan.pools["grm"].num_cpus == pytest.approx(0.25)  # (2 - 2 x 0.25) / 6, rounded down


@pytest.mark.parametrize("nodes", [
    [Node(2), Node(2)], [Node(1), Node(3)], [Node(4, 1), Node(4, 1)], [Node(16, 8), Node(16, 8)],
    [Node(1), Node(1), Node(1)], [Node(8, 2), Node(2, 0)],
])
def test_multi_node_clusters(nodes: list[Node]) -> None:
    for pools in LAYOUT_POOLS.values():
        for device in ("cpu", "cuda") if any(n.gpus for n in nodes) else ("cpu",):
            plan = plan_resources(nodes, {**pools, "score": 1}, device=device, tasks=4)
            assert_fits(plan, nodes, {**pools, "score": 1}, device, 4)


def test_plans_that_cannot_fit_fail_fast_with_one_line() -> None:
    pools = LAYOUT_POOLS["pools"]
    cases = [
        dict(nodes=[Node(cpus=2)], cpus_per_actor=1.0, device="cpu"),  # 5 x 1 CPU on 2
        dict(nodes=[Node(cpus=4, gpus=1)], gpus_per_actor=0.5, device="cuda"),  # 5 x 0.5 GPU on 1
        dict(nodes=[Node(cpus=4)], device="cuda"),  # no GPU at all
        dict(nodes=[Node(cpus=0.5)], device="cpu"),  # less than one CPU
    ]
    for case in cases:
        with pytest.raises(PlanError) as info:
            plan_resources(case.pop("nodes"), pools, tasks=4, **case)
        assert "\n" not in str(info.value) and len(str(info.value)) < 300
    with pytest.raises(PlanError):
        plan_resources([Node(4)], {"image": 0}, device="cpu")


def test_fits_checks_single_gpus_and_nodes() -> None:
    assert fits([Node(2, 1)], [(0.5, 0.5), (0.5, 0.5)])
    assert not fits([Node(2, 2)], [(0.5, 0.6), (0.5, 0.6), (0.5, 0.6)])  # 1.8 GPUs in all, but 2 GPUs
    assert not fits([Node(1), Node(1)], [(0.75, 0), (0.75, 0), (0.75, 0)])  # 2.25 > 2, per node
    assert fits([Node(8, 4)], [(1, 2), (1, 2)]) and not fits([Node(8, 4)], [(1, 2), (1, 2), (1, 1)])


# --- the GPU plan (issue 12 item 6), derivation in docs/pipeline.md -----------------------------------


def test_gpu_plan_one_gpu() -> None:
    grm, assemble, dit = gpu_pool_counts(1, fused=False)
    assert (grm, assemble, dit) == (1, 1, 3)  # the three group pools need one actor each
    pools = {"grm": grm, **dict(zip(GROUP_POOLS, [1, 1, 1], strict=True)), "assemble": assemble}
    plan = plan_resources([Node(cpus=16, gpus=1)], pools, device="cuda", tasks=4)
    assert {p.num_gpus for p in plan.pools.values()} == {0.2}  # five actors share the GPU evenly
    assert {p.num_cpus for p in plan.pools.values()} == {1.0}
    # fused: three actors (a third of the GPU each as Ray counts it; the GPU's time goes to who uses it)
    assert gpu_pool_counts(1, fused=True) == (1, 1, 1)


def test_gpu_plan_eight_gpus() -> None:
    grm, assemble, dit = gpu_pool_counts(8, fused=False)
    # 2 slots per GPU, 16 in all; GRM needs 7% of 8 GPUs = 0.56 GPU (2 half-GPU actors), assemble 8% = 0.64
    assert (grm, assemble, dit) == (2, 2, 12)
    cfg = PipelineConfig(input="/in", output="/out", weights="w", rtm="r", device="cuda")
    nodes = [Node(cpus=64, gpus=8)]
    # equal patch counts: Patch-DiT actors follow the steps 8/14/20
    graph = plan_graph(cfg, nodes, layout="pools", todo=1000, counts={0: 100, 1: 100, 2: 100},
                       steps=(8, 14, 20))
    sizes = {name: graph.plan.pools[f"dit-{name}"].actors for name in GROUP_KEYS}
    assert sum(sizes.values()) == 12 and sizes["simple"] < sizes["medium"] < sizes["hard"]
    assert sizes == {"simple": 2, "medium": 4, "hard": 6}  # 12 x (8, 14, 20) / 42 = 2.3, 4, 5.7
    assert {p.num_gpus for p in graph.plan.pools.values()} == {0.5}  # two actors per GPU
    assert_fits(graph.plan, nodes, {n: p.actors for n, p in graph.plan.pools.items()}, "cuda", 1000)
    # with a scoring actor, one Patch-DiT slot less; two nodes of 8: light stages grow with the GPUs
    assert gpu_pool_counts(8, fused=False, score_actors=1) == (2, 2, 11)
    assert gpu_pool_counts(16, fused=False) == (3, 3, 26)


def test_layout_choice_and_single_layout_size() -> None:
    assert choose_layout("auto", device="cpu", todo=3, fixed_dit=False) == "single"
    assert choose_layout("auto", device="cpu", todo=10_000, fixed_dit=False) == "single"
    assert choose_layout("auto", device="cuda", todo=3, fixed_dit=False) == "single"
    assert choose_layout("auto", device="cuda", todo=10_000, fixed_dit=False) == "pools"
    assert choose_layout("auto", device="cpu", todo=3, fixed_dit=True) == "pools"  # --dit-actors set
    assert choose_layout("fused", device="cpu", todo=3, fixed_dit=False) == "fused"
    with pytest.raises(PlanError):
        choose_layout("bogus", device="cpu", todo=3, fixed_dit=False)
    assert single_actors([Node(2)], device="cpu", blocks=3) == 2  # one per CPU ...
    assert single_actors([Node(16)], device="cpu", blocks=3) == 3  # ... at most one per image
    assert single_actors([Node(16, 8)], device="cuda", blocks=100) == 8  # one per GPU
    assert single_actors([Node(1.5)], device="cpu", blocks=5) == 1
    cfg = PipelineConfig(input="/in", output="/out", weights="w", rtm="r")
    # 3 images are one call of --grm-batch 4: one actor with both CPUs; 6 images: two actors of 3
    graph = plan_graph(cfg, [Node(2)], layout="single", todo=3, counts={}, steps=(8, 14, 20))
    assert graph.plan.pools["image"].actors == 1 and graph.batch == 3 and graph.plan.tasks == 0
    assert graph.plan.pools["image"].num_cpus == 2.0 and graph.sampling == "checkpoint+fused"
    graph = plan_graph(cfg, [Node(2)], layout="single", todo=6, counts={}, steps=(8, 14, 20))
    assert graph.plan.pools["image"].actors == 2 and graph.batch == 3
    assert math.isclose(sum(p.actors * p.num_cpus for p in graph.plan.pools.values()), 2.0)
    graph = plan_graph(cfg, [Node(64)], layout="single", todo=1000, counts={}, steps=(8, 14, 20))
    assert graph.plan.pools["image"].actors == 64 and graph.batch == 4


# --- read/decode tasks and memory at cluster scale (issue 18) -----------------------------------------

GiB = 2**30


@pytest.mark.parametrize("gpus", [0, 1, 8])
@pytest.mark.parametrize("cpus", [8, 32, 96])
def test_read_decode_tasks_follow_the_free_cpus(cpus: int, gpus: int) -> None:
    """1-64 nodes x 8-96 CPUs x 0-8 GPUs, the pools layout with the GPU plan's actor counts: no fixed
    cap; the tasks fill what the actors leave free, so they grow with the cluster; a user cap holds."""
    last = 0
    for count in (1, 2, 8, 64):
        nodes = [Node(cpus=cpus, gpus=gpus, memory=256 * GiB)] * count
        device = "cuda" if gpus else "cpu"
        grm, assemble, dit = gpu_pool_counts(count * gpus, fused=False) if gpus else (1, 1, 3)
        pools = {"grm": grm, **dict(zip(GROUP_POOLS, dit_split(dit), strict=True)), "assemble": assemble}
        memory = actor_memory(model_bytes=4 * GiB, max_pixels=2048 * 2048)
        plan = plan_resources(nodes, pools, device=device, tasks=None, memory_per_actor=memory)
        if count <= 8:  # the independent placement check is slow for a thousand actors
            assert_fits(plan, nodes, pools, device, None)
        assert fits(nodes, plan.requests())
        free = count * cpus - sum(p.actors * p.num_cpus for p in plan.pools.values())
        assert plan.tasks == task_slots(nodes, count * cpus - free, plan.task_cpus)
        assert plan.tasks >= free / plan.task_cpus - 1  # every free CPU is used ...
        assert plan.tasks > 4 or free < 5 * plan.task_cpus  # ... and more than 4 where they allow
        assert plan.tasks >= last  # more nodes, more tasks
        last = plan.tasks
        assert {p.memory for p in plan.pools.values()} == {memory} and not plan.notes
        capped = plan_resources(nodes, pools, device=device, tasks=6, memory_per_actor=memory)
        assert capped.tasks == min(6, plan.tasks) and capped.pools == plan.pools


def dit_split(total: int) -> list[int]:
    return [max(1, total // 3), max(1, total // 3), max(1, total - 2 * (total // 3))]


def test_actor_memory_formula_and_a_node_too_small_for_it() -> None:
    # ACTOR_BASE_BYTES + model + BYTES_PER_PIXEL x pixel limit, in whole MiB (docs/pipeline.md)
    assert actor_memory(model_bytes=0, max_pixels=1024 * 1024) == 1 * GiB + 448 * 2**20
    assert actor_memory(model_bytes=3 * GiB + 1, max_pixels=4096 * 4096) == 4 * GiB + 7 * GiB + 2**20
    want = actor_memory(model_bytes=0, max_pixels=4096 * 4096)  # 8 GiB
    nodes = [Node(cpus=8, memory=12 * GiB)]  # two actors want 16 GiB of 12: each gets an equal 6 GiB
    plan = plan_resources(nodes, {"image": 2}, device="cpu", tasks=0, memory_per_actor=want)
    assert plan.pools["image"].memory == 6 * GiB and plan.memory_wanted == want
    assert len(plan.notes) == 1 and "--max-pixels" in plan.notes[0]
    assert_fits(plan, nodes, {"image": 2}, "cpu", 0)
    # memory is placed per node: 3 actors of 6 GiB do not fit on two nodes of 10 GiB (20 GiB in all)
    plan = plan_resources([Node(4, memory=10 * GiB)] * 2, {"image": 3}, device="cpu", tasks=0,
                          memory_per_actor=want)
    assert plan.pools["image"].memory == 5 * GiB
    assert not fits([Node(4, memory=10 * GiB)] * 2, [(1.0, 0.0, 6 * GiB)] * 3)


def test_refine_none_plans_no_patch_dit_pool() -> None:
    """``--refine none``: the pools and fused layouts run GRM and assemble actors only."""
    cfg = PipelineConfig(input="/in", output="/out", weights="w", rtm="r", refine="none")
    for layout in ("pools", "fused"):
        graph = plan_graph(cfg, [Node(4)], layout=layout, todo=8, counts={0: 5, 1: 5, 2: 5},
                           steps=(8, 14, 20))
        assert graph.dit == {} and sorted(graph.plan.pools) == ["assemble", "grm"], layout
        assert graph.sampling == "none"
    diffusion = plan_graph(PipelineConfig(input="/in", output="/out", weights="w", rtm="r"), [Node(4)],
                           layout="pools", todo=8, counts={0: 5, 1: 5, 2: 5}, steps=(8, 14, 20))
    assert set(GROUP_POOLS) <= set(diffusion.plan.pools)  # the default still starts them


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_blocks_stay_under_the_cap_at_the_pixel_limit(preset: str) -> None:
    """Issue 18 item 5: images per GRM call (= per block of the pools layouts) follow the bytes an image
    at ``--max-pixels`` adds to a block, so that a block stays under ``BLOCK_BYTES_CAP`` (one image that
    alone is over it makes a block of its own). Patches are counted as ``patching.plan_grid`` lays them."""
    from patchscaler.patching import plan_grid
    from patchscaler.presets import PRESETS

    config = PRESETS[preset]
    s, f = config.sampler, config.autoencoder.downsample_factor
    k = config.texture_encoder.top_k
    row = config.latent_channels * s.patch_size ** 2 * 4 + k * 12 + 8 + PATCH_ROW_OVERHEAD
    for side in (3, 16, 100, 512, 1000, 4096):
        grid = plan_grid(math.ceil(config.scale * side / f), math.ceil(config.scale * side / f),
                         patch=s.patch_size, overlap=s.overlap)
        pixels = side * side
        assert block_bytes_of(config, pixels) == grid.num_patches * row + pixels * LR_BYTES_PER_PIXEL
    limit = block_bytes_of(config, 4096 * 4096)
    assert limit > BLOCK_BYTES_CAP  # an image at the default pixel limit is over the cap on its own ...
    assert grm_images(image_bytes=limit, asked=4) == 1  # ... so it is a block of its own
    for pixels in (64 * 64, 256 * 256, 512 * 512, 1024 * 1024, 2048 * 2048):
        one = block_bytes_of(config, pixels)
        n = grm_images(image_bytes=one, asked=4)
        assert 1 <= n <= 4 and (n * one <= BLOCK_BYTES_CAP or n == 1)
        assert n == 4 or (n + 1) * one > BLOCK_BYTES_CAP  # no smaller than the cap requires
    assert grm_images(image_bytes=block_bytes_of(config, 64 * 64), asked=4) == 4
    assert grm_images(image_bytes=1, asked=64) == 64 and grm_images(image_bytes=1 << 40, asked=8) == 1

    nodes = [Node(cpus=64, gpus=8)]
    for layout, pixels in itertools.product(("pools", "fused", "single"), (512 * 512, 4096 * 4096)):
        cfg = PipelineConfig(input="/in", output="/out", weights="w", rtm="r", device="cuda",
                             max_pixels=pixels)
        graph = plan_graph(cfg, nodes, layout=layout, todo=1000, counts={0: 1, 1: 1, 2: 1},
                           steps=(8, 14, 20), image_bytes=block_bytes_of(config, pixels))
        if layout == "single":  # no block carries patches between actors: --grm-batch as given
            assert graph.batch == 4
        else:
            one = block_bytes_of(config, pixels)
            assert graph.batch == grm_images(image_bytes=one, asked=4)
            assert graph.batch * one <= BLOCK_BYTES_CAP or graph.batch == 1
            assert f"{graph.batch} images a block" in graph.describe()
