"""Listing, reading and atomic writing of local paths and ``s3://`` URIs (fsspec / s3fs).

Ray workers do not see environment variables that the driver set after ``ray.init``, so object-store
settings travel explicitly: every function takes ``storage_options`` (the s3fs keyword arguments built
once in the driver by ``storage_options()``), and the stages receive it as a constructor argument.

Writes never leave a partial file under the final name:
- local: the bytes go to a hidden temp file in the same folder (``.NAME.partial-<random>``), flushed and
  ``fsync``-ed, then ``os.replace``-d onto the final name (atomic on POSIX);
- S3: the object is written by one PUT (or one multipart upload, completed only after the last part)
  from bytes already complete in memory, so a reader sees either nothing or the whole object.

Storage hiccups are retried: every read, write, listing and removal here goes through ``retrying``,
which repeats an action that failed with a *transient* error (``is_transient``: lost or refused
connections, timeouts, HTTP 5xx, throttling, busy/stale errnos) with exponential backoff, within
``RETRY``'s bounds (attempts and seconds), and then raises ``StorageError`` naming the URI. Permanent
errors (a missing file, a denied permission, an invalid key) are raised at once, unchanged.

Output names (``plan_outputs``) are injective and stay inside the output root: see ``naming.py``.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.naming import UnsafeName, output_names

PARTIAL = ".partial-"
MANIFEST_DIR = "_manifest"
SCORES_DIR = "_scores"  # IQA score parts (`upscale-dataset --score`)
MAPS_DIR = "_maps"  # per-image group maps (`upscale-dataset --maps`)
WORK_DIR = "_jobplan"  # the job plan's shards of the inputs to do (pipeline/jobplan.py)
REFUSED = "refused:"  # plan_outputs' value for an input it refuses, followed by the reason
T = TypeVar("T")


# --- retries ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """How ``retrying`` repeats an action: at most ``attempts`` tries, sleeping ``first_delay`` seconds
    after the first failure and twice as long after each next one (at most ``max_delay``, with up to 25%
    random jitter), and no new try once ``deadline`` seconds have passed since the first."""

    attempts: int = 5
    first_delay: float = 0.5
    max_delay: float = 8.0
    deadline: float = 90.0


RETRY = RetryPolicy()  # the default of every function here

TRANSIENT_ERRNOS = frozenset(getattr(errno, name) for name in (
    "EAGAIN", "EBUSY", "EINTR", "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "EPIPE",
    "ENETDOWN", "ENETUNREACH", "ENETRESET", "EHOSTDOWN", "EHOSTUNREACH", "ESTALE", "EREMOTEIO",
) if hasattr(errno, name))
TRANSIENT_CODES = frozenset((
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
))
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


class StorageError(OSError):
    """A read or write that still failed after ``retrying``'s attempts; the message names the URI."""


@functools.cache
def _client_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(connection/timeout error classes, HTTP error-response classes) of botocore and aiohttp, when
    installed (s3fs brings them)."""
    connection: list[type] = []
    response: list[type] = []
    try:
        from botocore import exceptions as bx

        connection += [bx.ConnectionError, bx.HTTPClientError]
        response.append(bx.ClientError)
    except ImportError:
        pass
    try:
        import aiohttp

        connection += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    return tuple(connection), tuple(response)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: lost/refused connections, timeouts, HTTP 5xx and 429,
    throttling, and busy/stale/network errnos — also when such an error is the ``__cause__`` of the one
    raised (s3fs re-raises botocore's errors as ``OSError``). False for everything else, in particular
    missing files, denied permissions, invalid keys and a ``StorageError`` (already retried)."""
    seen = 0
    connection, response = _client_errors()
    while exc is not None and seen < 8:
        if isinstance(exc, (StorageError, *PERMANENT)):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError, *connection)):
            return True
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return True
        if response and isinstance(exc, response):
            info = getattr(exc, "response", None) or {}
            status = int(info.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            return status >= 500 or status == 429 or info.get("Error", {}).get("Code") in TRANSIENT_CODES
        exc, seen = exc.__cause__, seen + 1
    return False


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (whitespace collapsed)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def retrying(action: Callable[[], T], *, what: str, policy: RetryPolicy | None = None,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """``action()``, repeated after transient errors (``is_transient``) within ``policy`` (default
    ``RETRY``); then ``StorageError`` whose message starts with ``what`` (e.g. ``writing s3://b/x.png``).
    Other errors propagate at once."""
    policy = policy or RETRY
    start = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return action()
        except Exception as exc:
            if not is_transient(exc):
                raise
            delay = min(policy.max_delay, policy.first_delay * 2 ** (attempt - 1))
            delay *= 1 + 0.25 * random.random()
            elapsed = time.monotonic() - start
            if attempt == policy.attempts or elapsed + delay > policy.deadline:
                raise StorageError(f"{what} failed after {attempt} attempts in {elapsed:.1f} s: "
                                   f"{one_line(exc)}") from exc
            sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises


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


def _is_hidden(segment: str) -> bool:
    """``.name`` is hidden; ``.`` and ``..`` are not (an S3 key may hold them: ``plan_outputs`` refuses
    a ``..`` by an error row, it is not silently dropped)."""
    return segment.startswith(".") and segment not in (".", "..")


def list_files(root: str, options: dict[str, Any]) -> list[str]:
    """Every file under ``root`` (recursive, sorted), as URIs of the same kind as ``root``, each key
    exactly as stored (``in//x.png`` and ``in/x.png`` are two files). Left out: hidden files and folders
    (``.name``), the pipeline's own ``_manifest`` and ``_jobplan`` folders, and S3 folder markers (keys
    ending in ``/``). A single file is a list of one. ``FileNotFoundError`` when ``root`` does not exist."""
    fs, path = filesystem(root, options)

    def find() -> tuple[bool, list[str]]:
        fs.invalidate_cache()
        if not fs.exists(path):
            return False, []
        return True, [path] if fs.isfile(path) else fs.find(path)

    exists, found = retrying(find, what=f"listing {root}")
    if not exists:
        raise FileNotFoundError(f"input not found: {root}")
    if found == [path]:
        return [root]
    base = path.rstrip("/")
    out = []
    for key in found:
        rel = key[len(base):][1:]  # exactly what follows "base/"
        parts = rel.split("/")
        if rel.endswith("/") or any(_is_hidden(p) for p in parts) or parts[0] in (MANIFEST_DIR, WORK_DIR):
            continue
        out.append(_full_uri(fs, root, key))
    return sorted(set(out))


def relative(root: str, uri: str) -> str:
    """``uri`` relative to ``root`` with ``/`` separators (the file name when ``uri`` is ``root``)."""
    base, target = root.rstrip("/"), uri
    if target == base:
        return posixpath.basename(target.replace(os.sep, "/"))
    rel = target[len(base):].lstrip("/").lstrip(os.sep)
    return rel.replace(os.sep, "/")


def exact_relative(root: str, uri: str) -> str | None:
    """What follows ``root/`` in ``uri``, character for character (``None`` when ``uri`` is not under
    ``root``); the file name when ``uri`` is ``root`` itself."""
    base = root.rstrip("/")
    if uri == root or uri == base:
        return posixpath.basename(uri.replace(os.sep, "/"))
    for sep in {"/", os.sep}:
        if uri.startswith(base + sep):
            return uri[len(base) + 1:].replace(os.sep, "/")
    return None


def plan_outputs(sources: list[str], input_root: str, output_root: str, ext: str) -> dict[str, str]:
    """Output URI per source: its path under ``input_root`` with extension ``ext`` under
    ``output_root`` (``a/b.jpg`` -> ``a/b.png``), one distinct output per source whatever the names
    (``naming.py``). A source that cannot get an output inside ``output_root`` (a ``..`` segment, not
    under ``input_root``) maps to ``REFUSED + reason`` instead: ``schema.new_meta`` turns that into the
    image's error row."""
    rels: dict[str, str] = {}
    out: dict[str, str] = {}
    for source in sources:
        rel = exact_relative(input_root, source)
        if rel is None:
            out[source] = f"{REFUSED}it is not under the input root {input_root}"
        else:
            rels[source] = rel
    for source, name in output_names(rels, ext).items():
        refused = isinstance(name, UnsafeName)
        out[source] = f"{REFUSED}{name}" if refused else join(output_root, *name.split("/"))
    return out


def refusal(output: str) -> str | None:
    """The reason ``plan_outputs`` gave instead of an output URI, or ``None`` for a real output."""
    return output[len(REFUSED):] if output.startswith(REFUSED) else None


def read_bytes(uri: str, options: dict[str, Any]) -> bytes:
    """The bytes of ``uri``, retrying transient errors (``retrying``)."""
    fs, path = filesystem(uri, options)

    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read()

    return retrying(read, what=f"reading {uri}")


def write_bytes_atomic(uri: str, data: bytes, options: dict[str, Any]) -> None:
    """Write ``data`` to ``uri`` so that no reader ever sees a partial file (see the module doc),
    retrying transient errors (``retrying``)."""
    fs, path = filesystem(uri, options)
    if isinstance(fs, LocalFileSystem):
        retrying(lambda: _write_local(path, data), what=f"writing {uri}")
    else:
        retrying(lambda: fs.pipe_file(path, data), what=f"writing {uri}")


def _write_local(path: str, data: bytes) -> None:
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


def existing(uris: list[str], root: str, options: dict[str, Any]) -> set[str]:
    """The subset of ``uris`` (all under ``root``) that exist, from one listing of ``root``."""
    fs, path = filesystem(root, options)

    def find() -> list[str]:
        fs.invalidate_cache()
        return fs.find(path) if fs.exists(path) else []

    present = {_full_uri(fs, root, p) for p in retrying(find, what=f"listing {root}")}
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
    retrying(lambda: fs.rm_file(path), what=f"removing {uri}")
