"""An image that kills its actor costs that image only (docs/pipeline.md, "Failure policy").

Ray Data restarts a dead actor and retries its task without limit (``max_restarts=-1,
max_task_retries=-1``). That is right for a lost node or a one-off crash, but an image that kills the
process every time (a segfault in a codec, the OOM killer on a huge image) would be retried forever.

The driver starts one :class:`Ledger` actor per execution (``start_ledger``; no CPU, pinned to the
driver's node so that losing a worker node does not lose it). Every model stage is wrapped in
:class:`Guarded`, which tells the ledger which images it is about to run (``begin``) and which it
finished (``end``). An image that was begun but never ended was in flight when its actor died. When the
retried task comes back:

- images seen in no death run together as usual;
- images seen in fewer than ``limit`` deaths (*suspects*) run one at a time, each begun alone, so a
  second death is charged to the image that caused it and not to its batch mates;
- images seen in ``limit`` deaths are not run: they become error rows (``crashed: ...``) and pass
  through the rest of the graph as errors.

So a poison image costs at most ``limit`` actor restarts, and its batch mates one re-run each.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline import schema as S

Batch = dict[str, np.ndarray]
CRASH_STAGE = "crashed"


class KilledItsWorker(RuntimeError):
    """The error of an image that was in flight in ``limit`` worker deaths."""


class Ledger:
    """In-flight counts per (stage, image): how many attempts began and did not end."""

    def __init__(self) -> None:
        self.inflight: dict[str, int] = {}

    def begin(self, keys: list[str], only_new: bool = False) -> list[int]:
        """The earlier unfinished attempts of each key; counts one more for each (with ``only_new``, only
        for the keys without any)."""
        prior = [self.inflight.get(k, 0) for k in keys]
        for key, n in zip(keys, prior, strict=True):
            if n == 0 or not only_new:
                self.inflight[key] = n + 1
        return prior

    def end(self, keys: list[str]) -> None:
        for key in keys:
            self.inflight.pop(key, None)

    def size(self) -> int:
        return len(self.inflight)


def start_ledger() -> Any:
    """A :class:`Ledger` actor on the driver's node (needs ``ray.init``)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0, max_restarts=0)(Ledger)
    return actor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False)).remote()


def condemn(batch: Batch, rows: np.ndarray, deaths: int) -> Batch:
    """Mark the images of ``rows`` as errors: their meta (image rows) and their patch rows' error."""
    if not len(rows):
        return batch
    error = KilledItsWorker(f"the image was in flight in {deaths} worker deaths (a crash or out of memory); "
                         "not run again")
    out = dict(batch)
    if S.META in batch:
        metas = batch[S.META].copy()
        for r in rows:
            if metas[r]:
                metas[r] = S.dump_meta(S.fail(S.load_meta(metas[r]), CRASH_STAGE, error))
        out[S.META] = metas
    if S.ERROR in batch:
        errors = batch[S.ERROR].copy()
        errors[rows] = S.error_text(CRASH_STAGE, error)
        out[S.ERROR] = errors
    return out


def _take(batch: Batch, rows: np.ndarray) -> Batch:
    return {k: v[rows] for k, v in batch.items()}


class Guarded:
    """Ray Data callable class: ``stage(**kwargs)`` behind the ledger (see the module's docstring). The
    stage's output must be a batch with the same columns whatever images it gets."""

    def __init__(self, *, stage: type, kwargs: dict[str, Any], ledger: Any, limit: int, name: str) -> None:
        self.stage = stage(**kwargs)
        self.ledger, self.limit, self.name = ledger, limit, name

    def _begin(self, ids: list[str], only_new: bool = False) -> list[int]:
        import ray

        return ray.get(self.ledger.begin.remote([f"{self.name}:{i}" for i in ids], only_new))

    def __call__(self, batch: Batch) -> Batch:
        ids = np.asarray([str(i) for i in batch[S.IMAGE_ID]], dtype=object)
        unique = list(dict.fromkeys(ids.tolist()))
        prior = dict(zip(unique, self._begin(unique, only_new=True), strict=True))
        condemned = [i for i in unique if prior[i] >= self.limit]
        if condemned:
            batch = condemn(batch, np.flatnonzero(np.isin(ids, condemned)), self.limit)
        suspects = [i for i in unique if 0 < prior[i] < self.limit]
        first = [i for i in unique if i not in suspects]
        if not suspects:  # the common case: one call
            out = self.stage(batch)
            self.ledger.end.remote([f"{self.name}:{i}" for i in first])
            return out
        parts = []
        if first:
            parts.append(self.stage(_take(batch, np.flatnonzero(np.isin(ids, first)))))
            self.ledger.end.remote([f"{self.name}:{i}" for i in first])
        for image in suspects:  # one at a time: a death now is this image's alone
            self._begin([image])
            parts.append(self.stage(_take(batch, np.flatnonzero(ids == image))))
            self.ledger.end.remote([f"{self.name}:{image}"])
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
