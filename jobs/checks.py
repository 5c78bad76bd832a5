"""Checks that every job runs before anything starts (before Ray, before the first image).

A user mistake is a :class:`UsageError`; ``jobs/cli.py`` prints its message as one line on stderr and
exits with code 2. The checks name the option and the path: a missing input, a ``--weights`` that is
not a checkpoint, an RTM that does not load, an S3 prefix that cannot be reached (no credentials, an
endpoint that does not answer, no such bucket), an output path that is a file.
"""

from __future__ import annotations

import os
from typing import Any

# The checks talk to S3 with short timeouts and one attempt: a wrong endpoint fails in seconds.
_PROBE = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 1}}}


class UsageError(Exception):
    """A mistake in the command line or its files, found before the job starts (exit code 2)."""


def short(exc: BaseException) -> str:
    """One line: the exception type and the first line of its message."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def storage_problem(exc: BaseException) -> str:
    """A user-facing reason for a failed object-store call."""
    name = type(exc).__name__
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return "no S3 credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return f"cannot reach the S3 endpoint ({short(exc)}; check --s3-endpoint)"
    if isinstance(exc, PermissionError) or "AccessDenied" in str(exc) or "Forbidden" in str(exc):
        return f"access denied ({short(exc)})"
    return short(exc)


def _probe_options(uri: str, options: dict[str, Any]) -> dict[str, Any]:
    from pipeline.io import is_remote

    if not is_remote(uri) or not uri.startswith("s3://"):
        return options
    return {**options, **_PROBE}


def _found(uri: str, options: dict[str, Any], *, what: str, bucket: bool = False) -> bool:
    """Whether ``uri`` (or, with ``bucket``, its bucket) exists; ``UsageError`` when it cannot be asked."""
    from pipeline.io import filesystem

    try:
        fs, path = filesystem(uri, _probe_options(uri, options))
        fs.invalidate_cache()
        return fs.exists(uri.split("://", 1)[1].split("/", 1)[0] if bucket else path)
    except Exception as exc:
        raise UsageError(f"{what} {uri}: {storage_problem(exc)}") from None


def check_exists(uri: str, options: dict[str, Any], *, what: str) -> None:
    """``uri`` (local path or object-store URL) exists and can be reached; else ``UsageError``."""
    if not _found(uri, options, what=what):
        raise UsageError(f"{what} not found: {uri}")


def check_output(uri: str, options: dict[str, Any], *, what: str = "--output") -> None:
    """The output location can be written: a local folder, or a folder that can be made there (nothing
    is created here), or an object store prefix whose bucket can be reached."""
    from pipeline.io import is_remote

    if not is_remote(uri):
        path = os.path.abspath(uri)
        if os.path.isfile(path):
            raise UsageError(f"{what} {uri} is a file, not a folder")
        existing = path
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise UsageError(f"{what} {uri}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"{what} {uri}: {existing} is not writable")
        return
    if not _found(uri, options, what=what, bucket=True):
        scheme, rest = uri.split("://", 1)
        raise UsageError(f"{what} {uri}: bucket {scheme}://{rest.split('/', 1)[0]} not found")


def check_checkpoint(path: str, options: dict[str, Any], *, what: str = "--weights") -> None:
    """``path`` holds a checkpoint: its ``config.json`` is a PatchScaler config and ``model.safetensors``
    is there. Cheap (no torch); the job then loads it strictly, a failure there being one line too."""
    import json

    from patchscaler.config import PatchScalerConfig
    from pipeline.io import join, read_bytes

    check_exists(path, options, what=what)
    config = join(path, "config.json")
    check_exists(config, options, what=f"{what} is not a checkpoint:")
    check_exists(join(path, "model.safetensors"), options, what=f"{what} is not a checkpoint:")
    try:
        data = json.loads(read_bytes(config, options))
        if not isinstance(data, dict) or "format_version" not in data:
            raise ValueError("no format_version")
        data.pop("format_version")
        PatchScalerConfig.from_dict(data)
    except Exception as exc:
        raise UsageError(f"{what} {path}: config.json is not a PatchScaler checkpoint config "
                         f"({short(exc)})") from None
    weights = join(path, "model.safetensors")
    try:
        check_safetensors(weights, options)
    except Exception as exc:
        raise UsageError(f"{what} {path} does not load: model.safetensors is not a safetensors file "
                         f"({short(exc)})") from None


def check_safetensors(uri: str, options: dict[str, Any]) -> None:
    """The file's safetensors header parses and its tensors lie within the file (no tensor is read)."""
    from pipeline.io import is_remote

    if not is_remote(uri):
        from safetensors import safe_open

        with safe_open(uri, framework="numpy") as f:
            f.keys()
        return
    import json
    import struct

    from pipeline.io import filesystem

    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 100 << 20:
            raise ValueError(f"header of {size} bytes")
        header = json.loads(f.read(size))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + size + end > fs.size(path):
        raise ValueError("the file is shorter than its header says")


def check_rtm(path: str, options: dict[str, Any], *, what: str = "--rtm") -> None:
    from pipeline.io import join

    check_exists(path, options, what=what)
    for name in ("rtm.safetensors", "manifest.json"):
        check_exists(join(path, name), options, what=f"{what} is not an RTM artifact:")


def loaded(what: str, path: str, load: Any, *args: Any, **kwargs: Any) -> Any:
    """``load(*args, **kwargs)``, any failure becoming a one-line ``UsageError`` about ``what``."""
    try:
        return load(*args, **kwargs)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{what} {path} does not load: {short(exc)}") from None


def check_shared_storage(paths: dict[str, str | None], *, nodes: int, shared_fs: bool) -> None:
    """On a cluster of more than one node every worker reads and writes ``paths`` (flag -> path) on its
    own node: a local path there scatters the outputs and hides the inputs, so it is refused unless the
    user says it is on a shared filesystem (``--shared-fs``). Object-store URLs are always fine."""
    from pipeline.io import is_remote

    if nodes <= 1 or shared_fs:
        return
    for flag, path in paths.items():
        if path and not is_remote(path):
            raise UsageError(f"{flag} {path} is a local path but the Ray cluster has {nodes} nodes, each "
                             "reading and writing its own disk: use an s3:// URL, or --shared-fs if every "
                             "node mounts it at the same path")


def check_positive(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value}")
