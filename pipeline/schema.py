"""Column names and row layouts shared by the pipeline stages, and the manifest's Parquet schema.

Rows travel between stages as Ray Data batches (dicts of numpy arrays). Per-image facts that are not
tensors (source, output, sizes, timings, status) ride in one JSON string column, ``meta``, so that every
stage keeps the same few columns whatever it adds; binary side data (pixels, alpha, ICC, EXIF) has its own
columns.

After the GRM stage one image becomes ``1 + M`` rows sharing its ``image_id`` (``ROW_COLUMNS``):

- one *image row* (``patch_index == group == IMAGE_ROW``) carrying ``meta``, ``alpha``, ``icc``, ``exif``,
  the LR ``pixels`` (the assembler's colour-fix reference; b"" without colour fix) and zero tensors —
  error rows are image rows whose ``meta["status"] == "error"`` and that have no patch rows;
- ``M`` *patch rows* carrying the tensors of one latent patch and empty side data.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.io import one_line, refusal

# --- columns -------------------------------------------------------------------------------------------
IMAGE_ID = "image_id"
META = "meta"  # JSON string, see new_meta()
DATA = "data"  # the source file's bytes (read stage -> decode stage)
PIXELS = "pixels"  # decoded RGB, raw bytes, shape and dtype in meta (decode -> GRM -> assemble stage)
ALPHA = "alpha"  # raw uint8 alpha of the LR image, b"" when the image has none
ICC = "icc"
EXIF = "exif"
PATCH_INDEX = "patch_index"
GROUP = "group"
PATCH = "patch"  # (C, V, V) float32: the coarse HR latent patch y0, which its group's pool replaces by the
# refined x0. Eq. 7's noise does not travel: the pool draws it again from the seed (stages.redraw_noise).
SCORES = "scores"  # (K,) float32: RTM similarity scores
RTM_IDX = "rtm_idx"  # (K,) int64: RTM entry ids
SECONDS = "seconds"  # float64: Patch-DiT seconds spent on this patch (batch time / batch rows)
ERROR = "error"  # str: a Patch-DiT failure for this patch, "" when fine
# With scoring on (``upscale-dataset --score``) the assembler's manifest rows carry two more columns to the
# scoring pool, which replaces them with one:
ENCODED = "encoded"  # bytes: the written output file, b"" for error rows
EVAL = "eval"  # JSON: the image's scoring info, meta["eval"] (image id, dataset, hr, lr)
IQA = "iqa_scores"  # JSON list: the image's score rows (pipeline.scores.RESULT_SCHEMA), "[]" for error rows

IMAGE_ROW = -1  # patch_index and group of an image row

# Every row after the GRM stage has ROW_COLUMNS: the Patch-DiT pools refine the patch (and fill seconds and
# error) of their group's rows and pass the rest through, so blocks keep one schema along the chain; one
# latent a patch row (y0, then x0), not three (y0, noise, x0): a third of the bytes in the object store.
# PIXELS (the LR image, the colour fix's reference) rides on the image row only, and only with a colour fix.
ROW_COLUMNS = (IMAGE_ID, PATCH_INDEX, GROUP, PATCH, SCORES, RTM_IDX, SECONDS, ERROR, META, ALPHA, ICC, EXIF,
               PIXELS)

STAGES = ("read", "decode", "grm", "dit", "assemble", "write")
PLAN = "plan"  # the stage named in the error of an input refused by ``io.plan_outputs`` (no seconds)
STATUS_OK = "ok"
STATUS_ERROR = "error"

MANIFEST_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("output", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("mode_in", pa.string()),
    ("bytes_in", pa.int64()),
    ("bytes_out", pa.int64()),
    ("height_in", pa.int64()),
    ("width_in", pa.int64()),
    ("height_out", pa.int64()),
    ("width_out", pa.int64()),
    ("patches_simple", pa.int64()),
    ("patches_medium", pa.int64()),
    ("patches_hard", pa.int64()),
    *[(f"seconds_{s}", pa.float64()) for s in STAGES],
    ("model_version", pa.string()),
    ("rtm_version", pa.string()),
    ("sampling", pa.string()),  # "adaptive", "uniform", "adaptive+fused", ...
    ("seed", pa.int64()),
    ("finished_at", pa.float64()),  # unix time the row was written
])


def image_id(source: str) -> str:
    """Stable id of an input: a hash of its URI (the same file under another URI is another image)."""
    return hashlib.sha256(source.encode()).hexdigest()[:20]


def new_meta(*, source: str, output: str, map_uri: str = "", eval_info: dict[str, str] | None = None
             ) -> dict[str, Any]:
    """The ``meta`` dict an image starts with; stages fill in the rest. An ``output`` that
    ``io.plan_outputs`` refused (``io.REFUSED`` + reason) makes it an error row from the start."""
    meta = {
        "source": source,
        "output": output,
        "status": STATUS_OK,
        "error": "",
        "mode_in": "",
        "bytes_in": 0,
        "shape": [0, 0],  # LR (h, w)
        "dtype": "",  # of the pixels column
        "latent": [0, 0],  # latent (h, w) on the HR grid
        "num_patches": 0,
        "groups": [0, 0, 0],  # patches per group
        "seconds": dict.fromkeys(STAGES, 0.0),
        "model_version": "",
        "rtm_version": "",
        "map": map_uri,  # where the GRM stage writes the group map (``--maps``), "" for none
        "eval": eval_info or {},  # scoring info (``--score``): image_id, dataset, hr, lr
    }
    reason = refusal(output)
    if reason is not None:
        meta["output"] = meta["map"] = ""
        fail(meta, PLAN, UnsafeOutput(reason), subject=source)
    return meta


class UnsafeOutput(ValueError):
    """An input refused by ``io.plan_outputs`` (its output would not be a file inside the output root)."""


def dump_meta(meta: dict[str, Any]) -> str:
    return json.dumps(meta, separators=(",", ":"))


def load_meta(text: str) -> dict[str, Any]:
    return json.loads(text)


def fail(meta: dict[str, Any], stage: str, exc: BaseException, *, subject: str = "") -> dict[str, Any]:
    """Mark ``meta`` as an error row: one line ``stage: [subject: ]Type: message``. ``subject`` is the
    file the error is about (the source, or the output being written) when the message does not name
    it already."""
    meta["status"] = STATUS_ERROR
    meta["error"] = error_text(stage, exc, subject=subject)
    return meta


def error_text(stage: str, exc: BaseException, *, subject: str = "") -> str:
    """``stage: [subject: ]Type: message`` on one line (``subject`` left out when the message names it)."""
    text = one_line(exc)
    return f"{stage}: {subject}: {text}" if subject and subject not in text else f"{stage}: {text}"


def object_column(values: list[Any]) -> np.ndarray:
    """A 1-D object array (bytes or str per row) that numpy does not try to broadcast or stack."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def manifest_row(meta: dict[str, Any], *, image_id_: str, sampling: str, seed: int, finished_at: float,
                 out_shape: tuple[int, int] = (0, 0), bytes_out: int = 0) -> dict[str, Any]:
    """One manifest row (``MANIFEST_SCHEMA``) from an image's final ``meta``."""
    groups = meta["groups"]
    ok = meta["status"] == STATUS_OK
    return {
        "id": image_id_,
        "source": meta["source"],
        "output": meta["output"] if ok else "",
        "status": meta["status"],
        "error": meta["error"],
        "mode_in": meta["mode_in"],
        "bytes_in": int(meta["bytes_in"]),
        "bytes_out": int(bytes_out),
        "height_in": int(meta["shape"][0]),
        "width_in": int(meta["shape"][1]),
        "height_out": int(out_shape[0]),
        "width_out": int(out_shape[1]),
        "patches_simple": int(groups[0]),
        "patches_medium": int(groups[1]),
        "patches_hard": int(groups[2]),
        **{f"seconds_{s}": float(meta["seconds"].get(s, 0.0)) for s in STAGES},
        "model_version": meta["model_version"],
        "rtm_version": meta["rtm_version"],
        "sampling": sampling,
        "seed": int(seed),
        "finished_at": float(finished_at),
    }
