"""The control plane of ``upscale-dataset`` at 10^3-10^6 queued inputs: time to the first finished image,
the driver's peak RSS, and resume against a manifest of a million rows.

    python bench/control_plane.py                          # 10^3, 10^5, 10^6 and the resume, ~10 min here
    python bench/control_plane.py --sizes 1000 100000 --resume-rows 100000

Inputs: a generated ``--input-list`` text file of paths in folders of 1000 (the same 1000 names in each);
the job never lists the folders. The files that are read before the first image (the first 2000 in the
job's order) and the resume's 20 new inputs are hard links to a few small PNGs (``--base`` files of
16x12); the rest are never opened before the job is stopped.
Each run is the command as a user runs it (a subprocess: ``patchscaler upscale-dataset``, a private
local Ray, demo weights, default flags). Measured:

- **first image**: seconds from the command's start to the first output file on disk (the job is then
  stopped: SIGINT, what finished is recorded);
- **driver peak RSS**: the largest resident set of the command's own process (not Ray's workers),
  sampled every 0.1 s until the first image;
- **resume**: a manifest of ``--resume-rows`` ok rows (outputs present: each folder of outputs is a
  symbolic link to one folder of 1000 files of those names) plus 20 new
  inputs, run to the end, against the same 20 inputs into an empty output (the "20-image job alone").

``--phases``: the control plane alone, each size in a fresh process that loads the checkpoint as the
command does (so its resident set starts where the command's does): ``plan_job`` (listing the input
list, names, the manifest, the shards; the input files themselves are never opened, so only their
names are generated), then a private local Ray and the time until the first block of
the job plan's dataset (``build.source_dataset``) reaches the driver, and the process's peak RSS; and
the resume: ``plan_job`` against a manifest of ``--resume-rows`` rows plus 20 new inputs, and the
rewrite of the consolidated manifest (``manifest.consolidate_table``). On a machine shared with other
jobs these are the figures that scale with the number of inputs; the model actors' start-up does not.

``--block-bytes``: instead, the bytes that the pools layout's stages write into the object store per
image (the blocks each stage outputs: GRM, the three Patch-DiT pools), measured by running the stages
in this process on ``--grm-batch`` generated images with the demo weights. Run it with
``PYTHONPATH`` at another checkout to measure that code (before/after figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PER_FOLDER = 1000


def make_base(folder: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"base{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def names(root: Path, n: int, start: int = 0) -> list[str]:
    """Paths of inputs ``start .. start + n``: folders of PER_FOLDER, the same file names in each."""
    return [str(root / f"d{i // PER_FOLDER:04d}" / f"img{i % PER_FOLDER:03d}.png")
            for i in range(start, start + n)]


def link_tree(root: Path, base: list[Path], n: int) -> list[str]:
    """``n`` hard links to the ``base`` files under ``root`` (``names``); their paths."""
    paths = names(root, n)
    for i, path in enumerate(paths):
        if i % PER_FOLDER == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            os.link(base[i % len(base)], path)
    return paths


def command(inputs: Path, output: Path, listing: Path) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "upscale-dataset", "--input", str(inputs), "--output",
            str(output), "--input-list", str(listing), "--no-progress"]


def first_image(inputs: Path, output: Path, listing: Path, timeout: float) -> dict:
    """Run until the first output file exists; then SIGINT. Seconds and the driver's peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.Popen(command(inputs, output, listing), cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    driver = psutil.Process(proc.pid)
    peak, seconds = 0, None
    while time.perf_counter() - start < timeout and proc.poll() is None:
        try:
            peak = max(peak, driver.memory_info().rss)
        except psutil.Error:
            break
        if any(output.glob("d*/*.png")):
            seconds = time.perf_counter() - start
            break
        time.sleep(0.1)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    lines = [x for x in out.splitlines() if "inputs:" in x or "running" in x]
    return {"first_image_s": seconds, "driver_peak_rss_mb": peak / 2**20, "lines": lines}


def run_to_end(inputs: Path, output: Path, listing: Path, timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.Popen(command(inputs, output, listing), cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    driver = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None and time.perf_counter() - start < timeout:
        try:
            peak = max(peak, driver.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
    lines = [x for x in out.splitlines() if "inputs:" in x or "done:" in x]
    return {"seconds": time.perf_counter() - start, "code": proc.returncode,
            "driver_peak_rss_mb": peak / 2**20, "lines": lines}


def write_manifest(output: Path, sources: list[str], root: Path, template: Path) -> None:
    """One manifest part of ok rows for ``sources`` (whole folders of ``names``), their outputs present:
    each output folder is a symbolic link to ``template``, a folder of PER_FOLDER files of those names."""
    from pipeline import schema as S
    from pipeline.manifest import part_uri

    n = len(sources)
    outputs = [str(output / os.path.relpath(s, root)) for s in sources]
    output.mkdir(parents=True, exist_ok=True)
    for folder in sorted({os.path.dirname(o) for o in outputs}):
        if not os.path.lexists(folder):
            os.symlink(template, folder, target_is_directory=True)
    columns = {f.name: pa.array(np.zeros(n, f.type.to_pandas_dtype())) for f in S.MANIFEST_SCHEMA
               if not pa.types.is_string(f.type)}
    strings = {"id": [S.image_id(s) for s in sources], "source": sources, "output": outputs,
               "status": ["ok"] * n, "error": [""] * n, "mode_in": ["RGB"] * n,
               "model_version": ["bench"] * n, "rtm_version": ["bench"] * n,
               "sampling": ["checkpoint+fused"] * n}
    columns.update({k: pa.array(v, pa.string()) for k, v in strings.items()})
    columns["finished_at"] = pa.array(np.full(n, time.time()))
    for g in ("simple", "medium", "hard"):
        columns[f"patches_{g}"] = pa.array(np.full(n, 2, np.int64))
    table = pa.table({f.name: columns[f.name] for f in S.MANIFEST_SCHEMA}, schema=S.MANIFEST_SCHEMA)
    path = Path(part_uri(str(output), "bench-00000"))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def _nbytes(batch: dict) -> int:
    """Bytes of a numpy batch: array data, and the payload of object (bytes/str) columns."""
    total = 0
    for v in batch.values():
        if v.dtype == object:
            total += sum(len(x) for x in v)
        else:
            total += v.nbytes
    return total


def block_bytes(root: Path, size: tuple[int, int], images: int) -> dict:
    """Bytes that the GRM stage and each Patch-DiT pool output for ``images`` images of ``size``."""
    import inspect

    from jobs.defaults import DEMO_RTM, DEMO_WEIGHTS
    from pipeline import schema as S
    from pipeline.stages import DecodeStage, GRMStage, PatchDiTStage, ReadStage

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    ids, metas = [], []
    for i in range(images):
        path = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)).save(path)
        ids.append(f"img{i}")
        metas.append(S.dump_meta(S.new_meta(source=str(path), output=str(root / f"out{i}.png"))))
    batch = {S.IMAGE_ID: S.object_column(ids), S.META: S.object_column(metas)}
    model = {"weights": str(DEMO_WEIGHTS), "device": "cpu", "autoencoder": None}
    batch = DecodeStage(max_pixels=1 << 26)(ReadStage(storage_options={})(batch))
    batch = GRMStage(**model, rtm=str(DEMO_RTM), seed=0, mode=None, storage_options={})(batch)
    out = {"grm": _nbytes(batch)}
    seed = {"seed": 0} if "seed" in inspect.signature(PatchDiTStage).parameters else {}
    for g in range(3):
        batch = PatchDiTStage(**model, rtm=str(DEMO_RTM), mode=None, group=g, **seed)(batch)
        out[f"pool {g}"] = _nbytes(batch)
    patches = int((batch[S.PATCH_INDEX] != S.IMAGE_ROW).sum())
    return {"per_image": {k: v / images for k, v in out.items()}, "patches_per_image": patches / images,
            "columns": sorted(batch)}


def phase(inputs: Path, output: Path, listing: Path, consolidate: bool) -> dict:
    """In this process: load the assets, plan, first block of the source dataset (module doc)."""
    import resource

    from jobs.defaults import DEMO_RTM, DEMO_WEIGHTS
    from patchscaler.weights import load_checkpoint
    from pipeline.build import PipelineConfig, source_dataset, unsplit_blocks
    from pipeline.jobplan import plan_job
    from pipeline.manifest import consolidate_table

    load_checkpoint(str(DEMO_WEIGHTS))  # the command's driver holds the model too
    cfg = PipelineConfig(input=str(inputs), output=str(output), weights=str(DEMO_WEIGHTS), rtm=str(DEMO_RTM),
                         input_list=str(listing))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    plan = plan_job(cfg)
    out = {"plan_s": time.perf_counter() - start, "inputs": plan.inputs, "todo": plan.todo, "done": plan.done,
           "rss_before_plan_mb": rss0,
           "peak_after_plan_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out["ray_init_s"] = time.perf_counter() - start
    start = time.perf_counter()
    with unsplit_blocks():
        ds = source_dataset(cfg, plan.blocks, 1)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        out["first_block_s"], out["first_block_rows"] = time.perf_counter() - start, batch.num_rows
        break
    ray.shutdown()
    out["peak_after_ray_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if consolidate:
        start = time.perf_counter()
        out["consolidated_rows"] = consolidate_table(str(output), plan.ids, {}, columns=["id"]).num_rows
        out["consolidate_s"] = time.perf_counter() - start
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_phase(root: Path, name: str, listing: Path, inputs: Path, output: Path, consolidate: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, __file__, "--phase-of", str(listing), "--root", str(root), "--phase-out",
            str(output)] + (["--consolidate"] if consolidate else [])
    proc = subprocess.run(args, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=900)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PHASE ")]
    if not lines:
        raise RuntimeError(f"{name}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("PHASE "):])


def phases(args: argparse.Namespace, root: Path, paths: list[str], inputs: Path, template: Path) -> None:
    rows = {}
    for n in args.sizes:
        listing = root / f"list_{n}.txt"
        listing.write_text("\n".join(paths[:n]) + "\n")
        rows[n] = run_phase(root, str(n), listing, inputs, root / f"phase_out_{n}", False)
        print(f"{n}: {rows[n]}", flush=True)
    resume = {}
    if args.resume_rows:
        out = root / "phase_out_resume"
        start = time.perf_counter()
        write_manifest(out, paths[:args.resume_rows], inputs, template)
        print(f"manifest of {args.resume_rows} rows and outputs in {time.perf_counter() - start:.1f} s",
              flush=True)
        listing = root / "list_resume.txt"
        listing.write_text("\n".join(paths[:args.resume_rows + 20]) + "\n")
        resume = run_phase(root, "resume", listing, inputs, out, True)
        print(f"resume: {resume}", flush=True)
    cmd = "python bench/control_plane.py " + shlex.join(sys.argv[1:])
    print(f"\nCommand: `{cmd.strip()}`  \nDevice: {os.cpu_count()} logical CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print("| queued inputs | plan (s) | Ray start (s) | first block at the driver (s) | driver peak RSS (MB) "
          "| of which before the plan (MB) |\n|---:|---:|---:|---:|---:|---:|")
    for n, r in rows.items():
        print(f"| {n:,} | {r['plan_s']:.1f} | {r['ray_init_s']:.1f} | {r['first_block_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} | {r['rss_before_plan_mb']:.0f} |")
    if resume:
        print(f"\nresume, {args.resume_rows:,}-row manifest + 20 new inputs: plan {resume['plan_s']:.1f} s "
              f"({resume['done']:,} done, {resume['todo']} to do), consolidated manifest "
              f"({resume['consolidated_rows']:,} rows) {resume['consolidate_s']:.1f} s, driver peak RSS "
              f"{resume['peak_rss_mb']:.0f} MB (peak after the plan {resume['peak_after_plan_mb']:.0f} MB, "
              f"after Ray and the first block {resume['peak_after_ray_mb']:.0f} MB; the rest: the rewrite)")
    if args.json:
        Path(args.json).write_text(json.dumps({"phases": rows, "resume": resume}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[1000, 100_000, 1_000_000])
    p.add_argument("--resume-rows", type=int, default=1_000_000, help="0: no resume figure")
    p.add_argument("--base", type=int, default=32, help="distinct small PNGs behind the links")
    p.add_argument("--root", default=None, help="work folder (default: a new temp folder)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", default=None)
    p.add_argument("--block-bytes", action="store_true", help="measure the stages' block bytes instead")
    p.add_argument("--phases", action="store_true", help="measure the control plane alone (module doc)")
    p.add_argument("--phase-of", default=None, help=argparse.SUPPRESS)
    p.add_argument("--phase-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--consolidate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    p.add_argument("--grm-batch", type=int, default=4)
    args = p.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="control_plane_"))
    if args.block_bytes:
        r = block_bytes(root, tuple(args.size), args.grm_batch)
        total = sum(r["per_image"].values())
        print(f"columns {r['columns']}; {r['patches_per_image']:.0f} patches an image of {args.size[0]}x"
              f"{args.size[1]}; bytes per image written by "
              + ", ".join(f"{k}: {v / 1024:.0f} KiB" for k, v in r["per_image"].items())
              + f"; GRM to the last pool: {total / 1024:.0f} KiB")
        return
    inputs = root / "in"
    if args.phase_of:
        result = phase(inputs, Path(args.phase_out), Path(args.phase_of), args.consolidate)
        print("PHASE " + json.dumps(result), flush=True)
        return
    base = make_base(root / "base", args.base)
    results: dict = {"first": {}, "resume": {}}
    biggest = max([*args.sizes, args.resume_rows + 20])
    if args.phases:  # the files are never opened: names only
        template = root / "template"
        link_tree(template, base, PER_FOLDER)
        phases(args, root, names(inputs, biggest), inputs, template / "d0000")
        return
    paths = names(inputs, biggest)
    start = time.perf_counter()  # the files that are read before the first image, and the 20 new ones
    link_tree(inputs, base, min(biggest, 2 * PER_FOLDER))
    for i in range(args.resume_rows, min(biggest, args.resume_rows + 20)):
        os.makedirs(os.path.dirname(paths[i]), exist_ok=True)
        if not os.path.exists(paths[i]):
            os.link(base[i % len(base)], paths[i])
    print(f"links in {time.perf_counter() - start:.1f} s", flush=True)
    for n in args.sizes:
        listing = root / f"list_{n}.txt"
        listing.write_text("\n".join(paths[:n]) + "\n")
        r = first_image(inputs, root / f"out_{n}", listing, args.timeout)
        results["first"][n] = r
        print(f"{n} inputs: first image {r['first_image_s']} s, driver peak RSS "
              f"{r['driver_peak_rss_mb']:.0f} MB {r['lines']}", flush=True)
    if args.resume_rows:
        new = paths[args.resume_rows:args.resume_rows + 20]
        alone = root / "list_20.txt"
        alone.write_text("\n".join(new) + "\n")
        r20 = run_to_end(inputs, root / "out_20", alone, args.timeout)
        out = root / "out_resume"
        start = time.perf_counter()
        write_manifest(out, paths[:args.resume_rows], inputs, inputs / "d0000")
        print(f"manifest of {args.resume_rows} rows and outputs in {time.perf_counter() - start:.1f} s",
              flush=True)
        listing = root / "list_resume.txt"
        listing.write_text("\n".join(paths[:args.resume_rows + 20]) + "\n")
        rr = run_to_end(inputs, out, listing, args.timeout)
        results["resume"] = {"alone": r20, "resume": rr, "rows": args.resume_rows}
        print(f"20 images alone: {r20['seconds']:.1f} s {r20['lines']}; with {args.resume_rows} done: "
              f"{rr['seconds']:.1f} s, driver peak RSS {rr['driver_peak_rss_mb']:.0f} MB {rr['lines']}",
              flush=True)

    cmd = "python bench/control_plane.py " + shlex.join(sys.argv[1:])
    print(f"\nCommand: `{cmd.strip()}`  \nDevice: {os.cpu_count()} logical CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print("| queued inputs | first image (s) | driver peak RSS until then (MB) |")
    print("|---:|---:|---:|")
    for n, r in results["first"].items():
        first = f"{r['first_image_s']:.1f}" if r["first_image_s"] is not None else "none in time"
        print(f"| {n:,} | {first} | {r['driver_peak_rss_mb']:.0f} |")
    if results["resume"]:
        r = results["resume"]
        print(f"\n| job | seconds | driver peak RSS (MB) |\n|---|---:|---:|\n"
              f"| 20 new inputs alone | {r['alone']['seconds']:.1f} | "
              f"{r['alone']['driver_peak_rss_mb']:.0f} |\n"
              f"| {r['rows']:,}-row manifest + 20 new inputs | {r['resume']['seconds']:.1f} | "
              f"{r['resume']['driver_peak_rss_mb']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
