"""``patchscaler upscale IN OUT``: the single-process reference upscaler on an image file or a folder.

It reads, decodes, encodes and names files exactly as ``upscale-dataset`` does (``pipeline/decode.py``,
``pipeline/io.py``): EXIF orientation applied, alpha upscaled and kept, palette, ICC profile and EXIF
kept, 16-bit grey read at full precision, grey inputs written back as grey, one output per input
(``a/b.jpg`` -> ``OUT/a/b.png``, names that would collide kept apart). With the same weights and
``--seed`` both commands write the same image.

Every file in a folder (recursively; hidden files left out) is an input: one that is not an image becomes
an error line, never a silent skip.

- stdout: one JSON line per input (``status`` ``ok`` with sizes as W×H, or ``error`` naming the file and
  the reason), then ``done: N ok, M failed``;
- stderr: progress — on a terminal a bar per image (Patch-DiT patch-steps, ETA); otherwise one line per
  image when its sampling starts;
- exit code: 0 every input ok, 1 some failed, 2 a usage or configuration error (missing input, missing
  or unreadable weights/RTM, unknown output format: one line on stderr, checked before the model is
  loaded), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from jobs.defaults import DEMO_RTM, DEMO_WEIGHTS, add_refine_arguments

FORMATS_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
# the files of a checkpoint and of an RTM, as patchscaler/weights.py names them (importing it loads torch)
CHECKPOINT_FILES = ("config.json", "model.safetensors")
RTM_FILES = ("rtm.safetensors", "manifest.json")


class UsageError(Exception):
    """A mistake in the command line or its files: one line on stderr, exit code 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="an image file or a folder of images (searched recursively)")
    p.add_argument("output", help="output file (for one input image) or folder")
    p.add_argument("--weights", default=str(DEMO_WEIGHTS), help="checkpoint dir or s3:// prefix")
    p.add_argument("--rtm", default=str(DEMO_RTM), help="RTM artifact dir or s3:// prefix")
    p.add_argument("--autoencoder", default=None, help="separate SD-VAE weights (file or diffusers dir)")
    p.add_argument("--mode", choices=["adaptive", "uniform"], default=None, help="override sampling mode")
    add_refine_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--format", dest="fmt", choices=["png", "jpeg", "webp"], default=None,
                   help="output format (default: from OUT's extension for one input, else png)")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="LR pixel limit per image")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="inference precision; auto: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--save-maps", action="store_true", help="also write the confidence and group maps")


def _exists(uri: str) -> bool:
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs.exists(path)


def check_model_files(weights: str, rtm: str, autoencoder: str | None) -> None:
    """``UsageError`` when the checkpoint, RTM or autoencoder files are not where the options say."""
    kinds = (("--weights", weights, "a checkpoint", CHECKPOINT_FILES), ("--rtm", rtm, "an RTM", RTM_FILES))
    for option, root, kind, names in kinds:
        try:
            found = _exists(root)
            missing = [n for n in names if not _exists(root.rstrip("/") + "/" + n)]
        except Exception as exc:  # e.g. no credentials for an s3:// path
            raise UsageError(f"{option} {root}: cannot be read ({type(exc).__name__}: {exc})") from None
        if not found:
            raise UsageError(f"{option} {root}: not found")
        if missing:
            raise UsageError(f"{option} {root}: not {kind} folder (missing {', '.join(missing)})")
    if autoencoder and not _exists(autoencoder):
        raise UsageError(f"--autoencoder {autoencoder}: not found")


def plan(args: argparse.Namespace) -> tuple[list[tuple[str, str]], str]:
    """([(input file, output path or io.REFUSED + reason)], format), or ``UsageError``."""
    from pipeline.decode import EXTENSIONS
    from pipeline.io import list_files, plan_outputs

    src, dst = os.path.abspath(args.input), os.path.abspath(args.output)
    if not os.path.exists(src):
        raise UsageError(f"input not found: {args.input}")
    suffix = os.path.splitext(dst)[1].lower()
    if os.path.isfile(src) and not os.path.isdir(dst) and suffix:  # one image into a named file
        fmt = FORMATS_BY_SUFFIX.get(suffix)
        if fmt is None:
            raise UsageError(f"cannot write {args.output}: unknown image extension {suffix!r}; use one of "
                             f"{', '.join(FORMATS_BY_SUFFIX)} or --format with an output folder")
        if args.fmt and args.fmt != fmt:
            raise UsageError(f"--format {args.fmt} does not match the output file name {args.output}")
        return [(src, dst)], fmt
    if os.path.isfile(dst):
        raise UsageError(f"output {args.output} is a file; give a folder for {args.input}")
    if dst == src:
        raise UsageError(f"the output folder must differ from the input folder ({args.input})")
    fmt = args.fmt or "png"
    try:
        sources = [s for s in list_files(src, {}) if not s.startswith(dst + os.sep)]
    except OSError as exc:
        raise UsageError(f"cannot list {args.input} ({type(exc).__name__}: {exc})") from None
    outputs = plan_outputs(sources, src, dst, EXTENSIONS[fmt])
    return [(s, outputs[s]) for s in sources], fmt


class Progress:
    """Progress of one image on stderr: on a terminal a status line while the image is encoded and the
    GRM runs, then a tqdm bar of patch-steps with ETA; otherwise one line when sampling starts."""

    def __init__(self, label: str, *, tty: bool) -> None:
        self.label, self.tty, self.bar = label, tty, None

    def start(self) -> None:
        if self.tty:
            print(f"\r{self.label}: encoding, GRM, texture retrieval ...", end="", file=sys.stderr,
                  flush=True)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if not self.tty:
                print(f"{self.label}: sampling {total} patch-steps", file=sys.stderr, flush=True)
                self.bar = False
                return
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.label, unit="step", file=sys.stderr, leave=False,
                            dynamic_ncols=True, bar_format="{desc}: {percentage:3.0f}%|{bar}| "
                            "{n_fmt}/{total_fmt} patch-steps [{elapsed}<{remaining}{postfix}]")
        if self.bar:
            self.bar.update(done - self.bar.n)
            if done == total:
                self.bar.set_postfix_str("decoding the image", refresh=True)

    def close(self) -> None:
        """Clear the bar or status line (the image's JSON line follows on stdout)."""
        if self.bar:
            self.bar.close()
        elif self.tty:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        jobs, fmt = plan(args)
        check_model_files(args.weights, args.rtm, args.autoencoder)
        if not jobs:
            print(f"patchscaler upscale: no files in {args.input}", file=sys.stderr)
            return 0
        upscaler, info = _load(args)
    except UsageError as exc:
        print(f"patchscaler upscale: error: {exc}", file=sys.stderr)
        return 2
    outputs = {out for _, out in jobs}
    failures = done = 0
    tty = sys.stderr.isatty()
    try:
        for i, (source, output) in enumerate(jobs, 1):
            label = f"[{i}/{len(jobs)}] {os.path.relpath(source)}"
            line = upscale_one(upscaler, source, output, args=args, fmt=fmt, info=info, outputs=outputs,
                               progress=Progress(label, tty=tty))
            failures += line["status"] != "ok"
            done += 1
            print(json.dumps(line, ensure_ascii=False), flush=True)
    except KeyboardInterrupt:
        print(f"{chr(10) if tty else ''}patchscaler upscale: interrupted after {done} of {len(jobs)} inputs",
              file=sys.stderr)
        return 130
    print(f"done: {len(jobs) - failures} ok, {failures} failed", flush=True)
    return 1 if failures else 0


def _load(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """(PatchScaler, its versions); any failure is a ``UsageError`` (a bad checkpoint is a config error)."""
    import logging
    from dataclasses import replace

    # diffusers imports bitsandbytes, whose CPU backend warns at import about an optional kernel package
    # that this project never uses: not the user's concern
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    from jobs.defaults import pick_device
    from patchscaler.colorfix import DEFAULT_COLOR_FIX
    from patchscaler.upscaler import PatchScaler
    from patchscaler.weights import load_checkpoint, load_rtm

    try:
        device = pick_device(args.device)
        model = load_checkpoint(args.weights, device=device, autoencoder=args.autoencoder)
        if args.mode:
            model.config = model.config.replace(sampler=replace(model.config.sampler, mode=args.mode))
        rtm, manifest = load_rtm(args.rtm, use_gpu=device.startswith("cuda"))
        upscaler = PatchScaler(model=model, rtm=rtm, device=device, precision=args.precision,
                               refine=args.refine, color_fix=args.color_fix or DEFAULT_COLOR_FIX)
    except Exception as exc:
        reason = " ".join(str(exc).split())
        raise UsageError(f"cannot load the model ({type(exc).__name__}: {reason})") from exc
    return upscaler, {"precision": upscaler.precision, "refine": upscaler.refine,
                      "color_fix": upscaler.color_fix, "model_version": model.version,
                      "rtm_version": manifest.get("version")}


def upscale_one(upscaler: Any, source: str, output: str, *, args: argparse.Namespace, fmt: str,
                info: dict[str, Any], outputs: set[str], progress: Progress) -> dict[str, Any]:
    """One input -> its JSON line; every failure becomes an error line naming the stage and the file."""
    import torch

    from pipeline import schema as S
    from pipeline.decode import decode_image, encode_output, to_float, to_uint8
    from pipeline.io import read_bytes, refusal, write_bytes_atomic

    line: dict[str, Any] = {"input": source, "status": "error"}
    reason = refusal(output)
    if reason is not None:
        return {**line, "error": S.error_text(S.PLAN, S.UnsafeOutput(reason), subject=source)}
    stage, subject = "read", source
    try:
        data = read_bytes(source, {})
        stage = "decode"
        dec = decode_image(data, max_pixels=args.max_pixels)
        stage = "upscale"
        start = time.perf_counter()
        progress.start()
        try:
            result = upscaler.upscale(to_float(dec.rgb), generator=torch.Generator().manual_seed(args.seed),
                                      progress=progress)
        finally:
            progress.close()
        seconds = time.perf_counter() - start
        stage = "encode"
        rgb = to_uint8(result.image)  # (H, W, 3)
        encoded = encode_output(rgb, dec.alpha, grey=dec.grey, scale=upscaler.model.config.scale, fmt=fmt,
                                quality=args.quality, icc=dec.icc, exif=dec.exif)
        stage, subject = "write", output
        write_bytes_atomic(output, encoded, {})
        maps = _save_maps(result, output, outputs) if args.save_maps else {}
    except Exception as exc:  # one bad file must not stop the others
        return {**line, "error": S.error_text(stage, exc, subject=subject)}
    (h, w), (big_h, big_w) = dec.rgb.shape[:2], rgb.shape[:2]
    return {"input": source, "output": output, "status": "ok", "mode_in": dec.mode,
            "size_in": f"{w}×{h}", "size_out": f"{big_w}×{big_h}", "patches": result.group_counts,
            "seconds": round(seconds, 3), **info, **maps}


def _save_maps(result: Any, output: str, outputs: set[str]) -> dict[str, Any]:
    """Write ``NAME_confidence.png`` and ``NAME_groups.png`` next to the output, unless one of them would
    overwrite another input's output; returns what to add to the JSON line."""
    import numpy as np
    import torch

    from pipeline.decode import GROUP_PALETTE, encode_image
    from pipeline.io import write_bytes_atomic
    from pipeline.naming import fold

    stem = os.path.splitext(output)[0]
    paths = {"confidence": stem + "_confidence.png", "groups": stem + "_groups.png"}
    clash = [p for p in paths.values() if fold(p) in {fold(o) for o in outputs}]
    if clash:
        return {"warning": f"maps not written: {clash[0]} is the output of another input"}
    conf = (result.confidence[0].clamp(0, 1) * 255).to(torch.uint8).numpy()  # (h_lat, w_lat)
    palette = np.array(GROUP_PALETTE, dtype=np.uint8)
    images = {"confidence": conf, "groups": palette[result.group_map.numpy()]}  # (h_lat, w_lat[, 3])
    for name, path in paths.items():
        png = encode_image(images[name], None, fmt="png", quality=95, icc=b"", exif=b"")
        write_bytes_atomic(path, png, {})
    return {"maps": list(paths.values())}
