"""Starting Ray for a job: a private local instance unless ``--address`` names a cluster, and quiet.

Without ``--address`` every job starts its own local Ray (``address="local"``) and never joins an
instance that another process started on the machine (``ray.init()`` without an address would).

Unless ``--verbose``: Ray's Python loggers and Ray Data's console handler show errors only, Ray Data's
per-operator progress bars are off (the job prints its own progress line), worker output is not
forwarded, and Ray's C++ core logs only fatal errors (``RAY_BACKEND_LOG_LEVEL``; the one line that
setting prints itself during ``ray.init`` is sent to /dev/null).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def _stderr_fd_to_devnull() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null (C++ writes there directly), restoring it after."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's console logging and progress bars: on with ``verbose``, errors only without."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.enable_operator_progress_bars = verbose
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":  # the session's ray-data.log keeps everything
            handler.setLevel(logging.INFO if verbose else logging.ERROR)


def start_ray(address: str | None, *, verbose: bool = False, **init_args: Any) -> None:
    """Start a private local Ray (``address`` None) or connect to ``address``; no-op when Ray is up."""
    import ray

    if ray.is_initialized():
        quiet_ray_data(verbose)
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle torch threads must not spin (local workers)
    quiet = contextlib.nullcontext() if verbose else _stderr_fd_to_devnull()
    if not verbose:
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    with quiet:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=verbose,
                 logging_level=logging.INFO if verbose else logging.ERROR, **init_args)
    quiet_ray_data(verbose)
