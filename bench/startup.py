"""Start-up cost of a small ``upscale-dataset`` job against the single-process ``upscale``, and the
pipeline's steady-state throughput per layout, side by side in one run.

    python bench/startup.py                                  # 3 bundled samples, 3 rounds, 32 images steady
    python bench/startup.py --before /work/main              # also the same job with another checkout's code

1. Small job (``--images``, default the 3 bundled samples; demo weights): each command is run as a user
   runs it (``python -m jobs.cli …`` in a fresh process, a fresh output folder, wall-clock time of the
   whole process: imports, Ray start, actors, work, shutdown). Variants, in rotating order each round:
   ``upscale`` (one process), ``upscale-dataset`` with the defaults, ``upscale-dataset --layout pools``
   (the graph that was the default before: read/decode tasks, GRM, three Patch-DiT pools, assemble), and
   with ``--before DIR`` the default ``upscale-dataset`` of that checkout. Medians over ``--rounds``.
2. Steady state (``--steady-images`` generated images, tiny preset, random weights with γ1/γ2 at the
   tertiles of their patch confidences, as ``bench/pipeline_throughput.py``): ``run_pipeline`` on one
   private local Ray instance per layout; ``steady images/s`` = images finished after the first one over
   the time from the first to the last (manifest ``finished_at``), so start-up is left out.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]


def load() -> str:
    return open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"


def timed(cmd: list[str], cwd: Path, timeout: float) -> tuple[float, int, str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(cwd), env=env, capture_output=True, text=True, timeout=timeout)
    return time.perf_counter() - start, proc.returncode, (proc.stdout + proc.stderr)[-2000:]


def small_job(images: Path, rounds: int, before: Path | None, timeout: float) -> dict[str, list[float]]:
    py = [sys.executable, "-m", "jobs.cli"]
    variants: dict[str, tuple[Path, list[str]]] = {
        "upscale (one process)": (REPO, [*py, "upscale", str(images), "{out}"]),
        "upscale-dataset (default)": (REPO, [*py, "upscale-dataset", "--input", str(images), "--output",
                                              "{out}"]),
        "upscale-dataset --layout pools": (REPO, [*py, "upscale-dataset", "--input", str(images),
                                                  "--output", "{out}", "--layout", "pools"]),
    }
    if before is not None:
        variants[f"upscale-dataset (default), code of {before}"] = (
            before, [*py, "upscale-dataset", "--input", str(images), "--output", "{out}"])
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order every round
            cwd, cmd = variants[name]
            out = tempfile.mkdtemp(prefix="startup_bench_out_")
            seconds, code, tail = timed([c.replace("{out}", out) for c in cmd], cwd, timeout)
            if code != 0:
                raise SystemExit(f"{name} failed with exit code {code}:\n{tail}")
            times[name].append(seconds)
            print(f"round {r + 1}: {name}: {seconds:.1f} s (load {load()})", flush=True)
    return times


def steady(count: int) -> dict[str, dict[str, float]]:
    import numpy as np
    import ray
    from pipeline_throughput import make_images, make_weights

    from jobs.runtime import start_ray
    from pipeline.build import PipelineConfig
    from pipeline.runner import read_manifest, run_pipeline

    root = Path(tempfile.mkdtemp(prefix="startup_bench_steady_"))
    images = make_images(root / "in", count, 32, 96)
    weights, rtm = make_weights(root, "tiny", images, "cpu")
    results = {}
    for layout in ("pools", "auto"):
        start_ray(None)
        cfg = PipelineConfig(input=str(root / "in"), output=str(root / f"out_{layout}"), weights=weights,
                             rtm=rtm, layout=layout, window=1 << 30)
        summary = run_pipeline(cfg, echo=False)
        ray.shutdown()
        assert summary.failed == 0, f"{summary.failed} images failed"
        done = np.sort(read_manifest(cfg.output)["finished_at"].to_numpy())
        rate = (len(done) - 1) / (done[-1] - done[0]) if done[-1] > done[0] else 0.0
        pools = ", ".join(f"{k} {v}" for k, v in summary.pools[0].items())
        results[layout] = {"seconds": summary.seconds, "steady": rate, "pools": pools}
        print(f"steady, layout {layout}: {rate:.3f} images/s ({pools}; load {load()})", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", default=str(REPO / "assets" / "samples"), help="the small job's images")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--before", default=None, help="another checkout whose default upscale-dataset to time")
    p.add_argument("--steady-images", type=int, default=32, help="0: skip the steady-state part")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per command")
    args = p.parse_args()
    print(f"load before: {load()}, {os.cpu_count()} logical CPUs", flush=True)
    before = Path(args.before) if args.before else None
    times = small_job(Path(args.images), args.rounds, before, args.timeout)
    rates = steady(args.steady_images) if args.steady_images else {}

    command = "python bench/startup.py " + shlex.join(sys.argv[1:])
    print(f"\nCommand: `{command.strip()}`; load after: {load()}\n")
    base = statistics.median(times["upscale (one process)"])
    print("| job of the small set | median s | vs `upscale` | rounds (s) |")
    print("|---|---:|---:|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} | {med / base:.2f}x | {', '.join(f'{v:.1f}' for v in values)} |")
    if rates:
        print("\n| layout | steady images/s | job seconds | actors |")
        print("|---|---:|---:|---|")
        for layout, r in rates.items():
            print(f"| {layout} | {r['steady']:.3f} | {r['seconds']:.1f} | {r['pools']} |")


if __name__ == "__main__":
    main()
