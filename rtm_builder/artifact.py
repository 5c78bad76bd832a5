"""The RTM artifact: one folder (local or ``s3://``) written by ``build-rtm``.

=====================  ==========================================================================
``rtm.safetensors``    ``keys`` (M, D) float32, L2-normalised; ``values`` (M, 4, 16, 16) float32
                       (``patchscaler.weights.save_rtm``; what ``weights.load_rtm`` and the upscaler read)
``manifest.json``      format version, RTM version (hash of the tensors), config, counts, skipped
                       inputs, weights hash, creation time, build history; written last
``entries.parquet``    one row per RTM entry, in RTM order: rtm_index, id, source, source_path,
                       crop_box [x0, y0, x1, y1] (end-exclusive, in pixels of the source image after
                       its EXIF orientation), key, value (flattened; shape in the schema metadata),
                       texture_class (predicted)
``index.faiss``        ``faiss.IndexFlatIP`` over the keys (ids = RTM rows), ``faiss.serialize_index``
``candidates.parquet`` the whole candidate pool the entries were sampled from (same columns, no
                       rtm_index): what ``--add-source`` extends without re-encoding
``contact_sheet.png``  decoded entries grouped by predicted texture class, for people
=====================  ==========================================================================

Every file is written whole (local: temp file + rename; S3: one complete PUT), the manifest last, so a
reader that finds a manifest finds the files of that build next to it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from patchscaler.weights import RTM_FILE, RTM_MANIFEST, save_rtm
from pipeline.io import join, read_bytes, write_bytes_atomic

FORMAT_VERSION = 1
KIND = "patchscaler-rtm"
CANDIDATES_FILE = "candidates.parquet"
ENTRIES_FILE = "entries.parquet"
INDEX_FILE = "index.faiss"
CONTACT_SHEET_FILE = "contact_sheet.png"
ARTIFACT_FILES = (RTM_FILE, RTM_MANIFEST, ENTRIES_FILE, INDEX_FILE, CANDIDATES_FILE, CONTACT_SHEET_FILE)


def _objects(values: Sequence[str]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = [str(v) for v in values]
    return out


def _fixed_list(array: np.ndarray, dtype: pa.DataType) -> pa.FixedSizeListArray:
    flat = array.reshape(array.shape[0], -1)  # (N, prod(shape[1:]))
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), type=dtype), flat.shape[1])


def _from_fixed_list(column: pa.ChunkedArray, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    flat = column.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return flat.reshape(-1, *shape)  # (N, *shape)


@dataclass
class Candidates:
    """Encoded candidate crops, column-wise (also the RTM entries, as a subset in RTM order)."""

    ids: np.ndarray  # (N,) str
    sources: np.ndarray  # (N,) str: source name
    paths: np.ndarray  # (N,) str: source image URI
    boxes: np.ndarray  # (N, 4) int32: x0, y0, x1, y1
    keys: np.ndarray  # (N, D) float32, unit norm
    values: np.ndarray  # (N, 4, 16, 16) float32
    classes: np.ndarray  # (N,) int32: predicted texture class

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def take(self, index: np.ndarray | Sequence[int]) -> Candidates:
        idx = np.asarray(index, dtype=np.int64)
        return Candidates(self.ids[idx], self.sources[idx], self.paths[idx], self.boxes[idx],
                          self.keys[idx], self.values[idx], self.classes[idx])

    @staticmethod
    def concat(parts: Sequence[Candidates]) -> Candidates:
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("no candidates")
        return Candidates(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                            ("ids", "sources", "paths", "boxes", "keys", "values", "classes")))

    @classmethod
    def from_batches(cls, batches: Sequence[dict[str, np.ndarray]]) -> Candidates:
        """From the encode stage's numpy batches (columns id, source, path, box, key, value, ...)."""
        batches = [b for b in batches if len(b["id"])]
        if not batches:
            raise ValueError("no candidates")

        def cat(name: str) -> np.ndarray:
            return np.concatenate([np.asarray(b[name]) for b in batches])

        return cls(_objects(cat("id")), _objects(cat("source")), _objects(cat("path")),
                   cat("box").astype(np.int32), cat("key").astype(np.float32),
                   cat("value").astype(np.float32), cat("texture_class").astype(np.int32))

    def to_table(self, *, rtm_index: bool = False) -> pa.Table:
        columns: dict[str, pa.Array] = {}
        if rtm_index:
            columns["rtm_index"] = pa.array(np.arange(len(self), dtype=np.int32))
        columns.update(
            id=pa.array(self.ids.tolist(), type=pa.string()),
            source=pa.array(self.sources.tolist(), type=pa.string()),
            source_path=pa.array(self.paths.tolist(), type=pa.string()),
            crop_box=_fixed_list(self.boxes.astype(np.int32), pa.int32()),
            key=_fixed_list(self.keys.astype(np.float32), pa.float32()),
            value=_fixed_list(self.values.astype(np.float32), pa.float32()),
            texture_class=pa.array(self.classes.astype(np.int32)),
        )
        meta = {"value_shape": json.dumps(list(self.values.shape[1:])), "key_dim": str(self.keys.shape[1])}
        return pa.table(columns).replace_schema_metadata(meta)

    @classmethod
    def from_table(cls, table: pa.Table) -> Candidates:
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        value_shape = tuple(json.loads(meta["value_shape"]))
        key_dim = int(meta["key_dim"])
        return cls(
            _objects(table.column("id").to_pylist()),
            _objects(table.column("source").to_pylist()),
            _objects(table.column("source_path").to_pylist()),
            _from_fixed_list(table.column("crop_box"), np.int32, (4,)),
            _from_fixed_list(table.column("key"), np.float32, (key_dim,)),
            _from_fixed_list(table.column("value"), np.float32, value_shape),
            table.column("texture_class").to_numpy().astype(np.int32),
        )


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def read_parquet(uri: str, storage_options: dict[str, Any]) -> pa.Table:
    return pq.read_table(pa.BufferReader(read_bytes(uri, storage_options)))


def index_bytes(keys: np.ndarray) -> bytes:
    """A ``faiss.IndexFlatIP`` over ``keys`` (M, D), serialised (the same bytes ``faiss.write_index``
    writes to a file)."""
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(np.ascontiguousarray(keys, dtype=np.float32))
    return faiss.serialize_index(index).tobytes()


def read_index(out: str, storage_options: dict[str, Any]) -> faiss.Index:
    data = np.frombuffer(read_bytes(join(out, INDEX_FILE), storage_options), dtype=np.uint8)
    return faiss.deserialize_index(data)


def read_manifest(out: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    try:
        data = read_bytes(join(out, RTM_MANIFEST), storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"no RTM artifact at {out} ({RTM_MANIFEST} not found)") from None
    manifest = json.loads(data)
    if manifest.get("kind") != KIND or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{out}: not a build-rtm artifact of format {FORMAT_VERSION} "
                         f"(kind {manifest.get('kind')!r}, format {manifest.get('format_version')!r})")
    return manifest


def read_entries(out: str, storage_options: dict[str, Any]) -> Candidates:
    return Candidates.from_table(read_parquet(join(out, ENTRIES_FILE), storage_options))


def read_pool(out: str, storage_options: dict[str, Any]) -> tuple[Candidates, dict[str, Any]]:
    """The stored candidate pool of an artifact and its manifest (for ``--add-source``)."""
    manifest = read_manifest(out, storage_options)
    pool = Candidates.from_table(read_parquet(join(out, CANDIDATES_FILE), storage_options))
    return pool, manifest


def write_artifact(out: str, *, entries: Candidates, pool: Candidates, manifest: dict[str, Any],
                   contact_sheet: bytes | None, storage_options: dict[str, Any]) -> str:
    """Write every file of the artifact, the manifest last; returns the RTM version."""
    write_bytes_atomic(join(out, CANDIDATES_FILE), parquet_bytes(pool.to_table()), storage_options)
    write_bytes_atomic(join(out, ENTRIES_FILE), parquet_bytes(entries.to_table(rtm_index=True)),
                       storage_options)
    write_bytes_atomic(join(out, INDEX_FILE), index_bytes(entries.keys), storage_options)
    if contact_sheet is not None:
        write_bytes_atomic(join(out, CONTACT_SHEET_FILE), contact_sheet, storage_options)
    return save_rtm(out, keys=torch.from_numpy(entries.keys), values=torch.from_numpy(entries.values),
                    manifest={"kind": KIND, "format_version": FORMAT_VERSION, **manifest})
