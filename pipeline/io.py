"""Listing, reading and atomic writing of local paths and ``s3://`` URIs (fsspec / s3fs).

Ray workers do not see environment variables that the driver set after ``ray.init``, so object-store
settings travel explicitly: every function takes ``storage_options`` (the s3fs keyword arguments built
once in the driver by ``storage_options()``), and the stages receive it as a constructor argument.

Writes never leave a partial file under the final name:
- local: the bytes go to a hidden temp file in the same folder (``.NAME.partial-<random>``), flushed and
  ``fsync``-ed, then ``os.replace``-d onto the final name (atomic on POSIX);
- S3: the object is written by one PUT (or one multipart upload, completed only after the last part)
  from bytes already complete in memory, so a reader sees either nothing or the whole object.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

PARTIAL = ".partial-"
MANIFEST_DIR = "_manifest"
SCORES_DIR = "_scores"  # IQA score parts (`upscale-dataset --score`)
MAPS_DIR = "_maps"  # per-image group maps (`upscale-dataset --maps`)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def storage_options(endpoint: str | None = None) -> dict[str, Any]:
    """s3fs options for the stages: the endpoint (``--s3-endpoint`` or the driver's ``AWS_ENDPOINT_URL``)
    and, when the driver has them, its ``AWS_*`` credentials. Empty on a cluster whose workers have
    their own credentials (instance roles, worker environment)."""
    opts: dict[str, Any] = {}
    endpoint = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    return opts


def normalize_root(uri: str) -> str:
    """Local roots become absolute paths (image ids hash the full URI); remote ones lose a trailing ``/``."""
    return uri.rstrip("/") if is_remote(uri) else os.path.abspath(uri)


def filesystem(uri: str, options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it); ``options`` apply to object stores only."""
    if is_remote(uri):
        return fsspec.core.url_to_fs(uri, **options)
    return fsspec.core.url_to_fs(uri)


def join(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts) if is_remote(root) else os.path.join(root, *parts)


def _full_uri(fs: fsspec.AbstractFileSystem, root: str, path: str) -> str:
    return fs.unstrip_protocol(path) if is_remote(root) else path


def list_files(root: str, options: dict[str, Any]) -> list[str]:
    """Every file under ``root`` (recursive, sorted), as URIs of the same kind as ``root``; hidden files
    and folders (``.name``) and the pipeline's own ``_manifest`` folder are left out. A single file
    is a list of one."""
    fs, path = filesystem(root, options)
    fs.invalidate_cache()
    if not fs.exists(path):
        raise FileNotFoundError(f"input not found: {root}")
    if fs.isfile(path):
        return [root]
    base = path.rstrip("/")
    out = []
    for found in fs.find(path):
        rel = found[len(base):].lstrip("/")
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or parts[0] == MANIFEST_DIR:
            continue
        out.append(_full_uri(fs, root, found))
    return sorted(out)


def relative(root: str, uri: str) -> str:
    """``uri`` relative to ``root`` with ``/`` separators (the file name when ``uri`` is ``root``)."""
    base, target = root.rstrip("/"), uri
    if target == base:
        return posixpath.basename(target.replace(os.sep, "/"))
    rel = target[len(base):].lstrip("/").lstrip(os.sep)
    return rel.replace(os.sep, "/")


def plan_outputs(sources: list[str], input_root: str, output_root: str, ext: str) -> dict[str, str]:
    """Output URI per source: the source's relative path with the new extension. Sources that would
    collide (``a.jpg`` and ``a.png`` both -> ``a.png``) keep their old extension in the name
    (``a.jpg.png``), so every input has its own output."""
    stems = {s: posixpath.splitext(relative(input_root, s))[0] for s in sources}
    count: dict[str, int] = {}
    for stem in stems.values():
        count[stem] = count.get(stem, 0) + 1
    out = {}
    for source, stem in stems.items():
        name = stem if count[stem] == 1 else relative(input_root, source)
        out[source] = join(output_root, *f"{name}.{ext}".split("/"))
    return out


def read_bytes(uri: str, options: dict[str, Any]) -> bytes:
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes, options: dict[str, Any]) -> None:
    """Write ``data`` to ``uri`` so that no reader ever sees a partial file (see the module doc)."""
    fs, path = filesystem(uri, options)
    if isinstance(fs, LocalFileSystem):
        folder, name = os.path.split(path)
        os.makedirs(folder or ".", exist_ok=True)
        tmp = os.path.join(folder, f".{name}{PARTIAL}{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)


def existing(uris: list[str], root: str, options: dict[str, Any]) -> set[str]:
    """The subset of ``uris`` (all under ``root``) that exist, from one listing of ``root``."""
    fs, path = filesystem(root, options)
    fs.invalidate_cache()
    if not fs.exists(path):
        return set()
    present = {_full_uri(fs, root, p) for p in fs.find(path)}
    if not is_remote(root):
        present = {os.path.normpath(p) for p in present}
        return {u for u in uris if os.path.normpath(u) in present}
    return {u for u in uris if u in present}


def remove_partials(root: str) -> int:
    """Delete temp files a killed run left behind in a local output folder; returns how many."""
    if is_remote(root) or not os.path.isdir(root):
        return 0
    removed = 0
    for folder, _, files in os.walk(root):
        for name in files:
            if name.startswith(".") and PARTIAL in name:
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed


def remove(uri: str, options: dict[str, Any]) -> None:
    fs, path = filesystem(uri, options)
    fs.rm_file(path)
