"""Adaptive (PGS) against uniform sampling, and the regression-only path, on the demo's held-out sets.

    python bench/adaptive_quality.py                          # demo weights, both sets, seed 0
    python bench/adaptive_quality.py --sets mild --images camera chelsea --cache C --records part1.json
    python bench/adaptive_quality.py --merge part1.json part2.json        # the table of several runs

The paper's claim (Sec. 3.3): Patch-adaptive Group Sampling keeps the quality of uniform sampling at a
fraction of the Patch-DiT work. For every image of the held-out sets (``trainer/heldout_sets.py``), one
run upscales it three ways with the demo weights, one after the other, each timed (wall seconds of
``PatchScaler.upscale``, fp32, this machine):

- ``adaptive``: PGS, each group its own (τ, N) (the checkpoint's default mode);
- ``uniform``: every patch from τ = T with the hard group's N;
- ``refine none``: no sampling, the decoded GRM output (``patchscaler upscale --refine none``);

and scores each, with every colour fix of ``patchscaler.colorfix`` (applied after the timed call, as
``PatchScaler.upscale`` applies it): held-out mean PSNR-Y minus bicubic's (pyiqa), the largest mean channel
shift over the images (1/255), the sharpness ratio (mean luma gradient / HR's), the seam ratio
(``trainer.heldout.seam_ratio``) and the Patch-DiT patch-steps (patches x N of their group).

``--cache`` (``trainer.heldout.upscale_cached``): outputs found there are reused, and are then not timed
(their seconds are left out of the means; the table says how many images were timed); new ones are
written there. ``--records`` writes the per-image figures, ``--merge`` tabulates those of several runs
(e.g. the sets split over parallel processes).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

from heldout_args import add_heldout_arguments

from patchscaler.autoencoder import upscale_input
from patchscaler.colorfix import COLOR_FIXES
from patchscaler.pgs import group_plan
from patchscaler.upscaler import PatchScaler, fix_colors
from patchscaler.weights import load_checkpoint, load_rtm
from trainer.heldout import gradient_magnitude, seam_ratio, signed_shift, upscale_cached
from trainer.heldout_sets import heldout_pairs

WAYS = ("adaptive", "uniform", "refine none")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_heldout_arguments(p, cache_help="reuse / write the raw outputs here (upscale_cached)")
    p.add_argument("--records", default=None, help="write the per-image figures to this JSON file")
    p.add_argument("--merge", nargs="+", default=None, help="only tabulate these --records files")
    args = p.parse_args()
    if args.merge:
        records = [r for path in args.merge for r in json.loads(Path(path).read_text())]
        tabulate(records, 0.0)
        return

    import pyiqa

    psnr = pyiqa.create_metric("psnr", test_y_channel=True, color_space="ycbcr", device="cpu")
    model = load_checkpoint(args.weights)
    rtm = load_rtm(args.rtm)[0]
    sampler = model.config.sampler
    stride = (sampler.patch_size - sampler.overlap) * model.autoencoder.factor
    scale = model.config.scale
    upscalers = {"adaptive": PatchScaler(model=model, rtm=rtm, color_fix="none"),
                 "uniform": PatchScaler(model=model, rtm=rtm, color_fix="none"),
                 "refine none": PatchScaler(model=model, rtm=rtm, color_fix="none", refine="none")}
    modes = {"adaptive": "adaptive", "uniform": "uniform", "refine none": "adaptive"}
    start = time.perf_counter()
    records: list[dict] = []
    for kind in args.sets:
        pairs = heldout_pairs(kind, heldout=args.heldout, samples=args.samples, scale=scale)
        pairs = [x for x in pairs if args.images is None or x[0] in args.images]
        for i, (name, lr, hr) in enumerate(pairs, 1):
            print(f"[{kind} {i}/{len(pairs)}] {name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)
            base = float(psnr(upscale_input(lr[None], scale), hr[None]))
            hr_grad = gradient_magnitude(hr)
            for way in WAYS:
                model.config = model.config.replace(sampler=replace(sampler, mode=modes[way]))
                t0 = time.perf_counter()
                cached = upscale_cached(upscalers[way], lr, seed=args.seed, name=f"{kind}-{name}",
                                        cache=args.cache, only_cached=True)
                result = cached or upscale_cached(upscalers[way], lr, seed=args.seed, name=f"{kind}-{name}",
                                                  cache=args.cache, refresh=True)
                seconds = None if cached else time.perf_counter() - t0
                counts = [result.group_counts[g] for g in ("simple", "medium", "hard")]
                plan = group_plan(model.config.sampler)  # (tau, N) per group of this mode
                steps = sum(c * sched.steps for c, sched in zip(counts, plan, strict=True))
                steps = 0 if way == "refine none" else steps
                for fix in COLOR_FIXES:
                    out = fix_colors(result.image, lr, scale=scale, method=fix).clamp(0, 1)
                    records.append({
                        "set": kind, "sampling": way, "fix": fix, "image": name,
                        "dpsnr": float(psnr(out[None], hr[None])) - base,
                        "shift": max(abs(v) for v in signed_shift(out, hr)),
                        "sharpness": gradient_magnitude(out) / hr_grad, "seams": seam_ratio(out, stride),
                        "seconds": seconds, "steps": steps})
    model.config = model.config.replace(sampler=sampler)
    if args.records:
        Path(args.records).write_text(json.dumps(records))
    tabulate(records, time.perf_counter() - start)


def tabulate(records: list[dict], seconds: float) -> None:
    rows: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        rows.setdefault((r["set"], r["sampling"], r["fix"]), []).append(r)
    print(f"\n`{' '.join(shlex.quote(a) for a in sys.argv)}` ({seconds:.0f} s)\n")
    print("| set | sampling | colour fix | PSNR-Y − bicubic (dB) | largest mean channel shift (1/255) | "
          "sharpness | seam ratio | Patch-DiT patch-steps / image | seconds / image (images timed) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    table = []
    for (kind, way, fix), vals in rows.items():
        n = len(vals)
        timed = [v["seconds"] for v in vals if v["seconds"] is not None]
        row = {"set": kind, "sampling": way, "fix": fix, "images": n,
               "dpsnr": round(sum(v["dpsnr"] for v in vals) / n, 3),
               "largest_shift": round(max(v["shift"] for v in vals), 2),
               "sharpness": round(sum(v["sharpness"] for v in vals) / n, 3),
               "seam_ratio": round(sum(v["seams"] for v in vals) / n, 3),
               "steps": round(sum(v["steps"] for v in vals) / n),
               "timed": len(timed), "seconds": round(sum(timed) / len(timed), 2) if timed else None}
        table.append(row)
        wall = "–" if row["seconds"] is None else f"{row['seconds']:.1f}"
        print(f"| {kind} | {way} | {fix} | {row['dpsnr']:+.2f} | {row['largest_shift']:.1f} | "
              f"{row['sharpness']:.2f} | {row['seam_ratio']:.2f} | {row['steps']} | {wall} "
              f"({row['timed']}) |")
    print(json.dumps({"rows": table, "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
