"""The control plane of ``upscale-dataset`` at 10^3-10^6 queued inputs: time to the first finished image,
the driver's peak RSS, and resume against a manifest of a million rows.

    python bench/control_plane.py                          # 10^3, 10^5, 10^6 and the resume, ~10 min here
    python bench/control_plane.py --sizes 1000 100000 --resume-rows 100000

Inputs: hard links to a few small PNGs (``--base`` files of 16x12; ext4 allows 65,000 links a file), in
folders of 1000, named by a generated ``--input-list`` text file (the job never lists the folders).
Each run is the command as a user runs it (a subprocess: ``patchscaler upscale-dataset``, a private
local Ray, demo weights, default flags). Measured:

- **first image**: seconds from the command's start to the first output file on disk (the job is then
  stopped: SIGINT, what finished is recorded);
- **driver peak RSS**: the largest resident set of the command's own process (not Ray's workers),
  sampled every 0.1 s until the first image;
- **resume**: a manifest of ``--resume-rows`` ok rows (outputs present: hard links too) plus 20 new
  inputs, run to the end, against the same 20 inputs into an empty output (the "20-image job alone").
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


def link_tree(root: Path, base: list[Path], n: int, start: int = 0, ext: str = ".png") -> list[str]:
    """``n`` hard links to the ``base`` files under ``root`` (folders of PER_FOLDER); their paths."""
    paths = []
    for i in range(start, start + n):
        path = root / f"d{i // PER_FOLDER:04d}" / f"img{i:07d}{ext}"
        if i % PER_FOLDER == 0 or i == start:
            path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            os.link(base[i % len(base)], path)
        paths.append(str(path))
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


def write_manifest(output: Path, sources: list[str], root: Path) -> None:
    """One manifest part of ok rows for ``sources``, their outputs present (hard links)."""
    from pipeline import schema as S
    from pipeline.manifest import part_uri

    n = len(sources)
    outputs = [str(output / os.path.relpath(s, root)) for s in sources]
    for s, o in zip(sources, outputs, strict=True):
        if not os.path.exists(o):
            os.makedirs(os.path.dirname(o), exist_ok=True)
            os.link(s, o)
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    p.add_argument("--resume-rows", type=int, default=1_000_000, help="0: no resume figure")
    p.add_argument("--base", type=int, default=32, help="distinct small PNGs behind the links")
    p.add_argument("--root", default=None, help="work folder (default: a new temp folder)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="control_plane_"))
    base = make_base(root / "base", args.base)
    inputs = root / "in"
    results: dict = {"first": {}, "resume": {}}
    biggest = max([*args.sizes, args.resume_rows + 20])
    start = time.perf_counter()
    paths = link_tree(inputs, base, biggest)
    print(f"{biggest} hard links in {time.perf_counter() - start:.1f} s", flush=True)
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
        write_manifest(out, paths[:args.resume_rows], inputs)
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
