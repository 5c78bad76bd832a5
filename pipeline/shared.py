"""Model weights and RTM through Ray's object store: read once by the driver, shared by every actor.

Without this, every model actor of a job (GRM, each Patch-DiT actor, assemble) read the checkpoint
and the RTM from their files (or S3) itself. Instead the driver loads them once, strictly, before Ray
starts (a bad ``--weights`` or ``--rtm`` is a one-line error, not 5 actor tracebacks), and after
``ray.init`` puts their tensors into the object store as numpy arrays (:func:`share`). Ray keeps one
copy per node; the actors of a node map it from shared memory and build their model from it
(:func:`model_from`, :func:`rtm_from`). Inside one process the model and RTM are built once and shared
by every stage object (the single layout runs all stages in one actor: ``pipeline/single.py``).

The stages accept either a path (the old way, used by tests and scripts that build stages directly)
or a :class:`SharedModel` / :class:`SharedRTM`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

_MODELS: dict[tuple[str, str], Any] = {}  # (object id, device) -> PatchScalerModel, per process
_RTMS: dict[tuple[str, bool], Any] = {}  # (object id, use_gpu) -> ReferenceTextureMemory, per process


@dataclass(frozen=True)
class LoadedAssets:
    """What the driver loaded before Ray starts (kept in the driver until :func:`share`)."""

    model: Any  # PatchScalerModel on CPU
    rtm_keys: np.ndarray
    rtm_values: np.ndarray
    rtm_manifest: dict[str, Any]


@dataclass(frozen=True)
class SharedModel:
    ref: Any  # ray.ObjectRef -> {"config": dict, "version": str, "state": {name: array}, "dtypes": {...}}


@dataclass(frozen=True)
class SharedRTM:
    ref: Any  # ray.ObjectRef -> {"keys": array, "values": array, "manifest": dict}


def load_assets(weights: str, rtm: str, *, autoencoder: str | None) -> LoadedAssets:
    """Load the checkpoint (strictly, ``patchscaler.weights``) and the RTM on CPU, in the driver."""
    from patchscaler.weights import load_checkpoint, load_rtm

    model = load_checkpoint(weights, device="cpu", autoencoder=autoencoder)
    memory, manifest = load_rtm(rtm)
    return LoadedAssets(model=model, rtm_keys=memory.keys.numpy(), rtm_values=memory.values.numpy(),
                        rtm_manifest=manifest)


def _to_numpy(t: Any) -> tuple[np.ndarray, str]:
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the bits
        return t.view(torch.int16).numpy(), "bfloat16"
    return t.numpy(), ""


def share(assets: LoadedAssets) -> tuple[SharedModel, SharedRTM]:
    """Put the loaded model's tensors and the RTM into the object store (needs ``ray.init``)."""
    import ray

    state, dtypes = {}, {}
    for name, tensor in assets.model.state_dict().items():
        state[name], dtypes[name] = _to_numpy(tensor)
    model_doc = {"config": assets.model.config.to_dict(), "version": assets.model.version,
                 "state": state, "dtypes": dtypes}
    rtm_doc = {"keys": assets.rtm_keys, "values": assets.rtm_values, "manifest": assets.rtm_manifest}
    return SharedModel(ref=ray.put(model_doc)), SharedRTM(ref=ray.put(rtm_doc))


def _tensor(array: np.ndarray, dtype: str) -> Any:
    import torch

    with warnings.catch_warnings():  # read-only shared memory: load_state_dict copies, nothing writes it
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def model_from(shared: SharedModel, *, device: str) -> Any:
    """The model of ``shared`` on ``device``, built once per process."""
    key = (shared.ref.hex(), device)
    if key not in _MODELS:
        import ray

        from patchscaler.config import PatchScalerConfig
        from patchscaler.model import PatchScalerModel

        doc = ray.get(shared.ref)
        model = PatchScalerModel(config=PatchScalerConfig.from_dict(doc["config"]))
        state = {k: _tensor(v, doc["dtypes"].get(k, "")) for k, v in doc["state"].items()}
        model.load_state_dict(state, strict=True)
        model.version = doc["version"]
        _MODELS[key] = model.to(device).eval()
    return _MODELS[key]


def rtm_from(shared: SharedRTM, *, use_gpu: bool) -> tuple[Any, dict[str, Any]]:
    """The RTM of ``shared`` and its manifest, built once per process."""
    key = (shared.ref.hex(), use_gpu)
    import ray

    doc = ray.get(shared.ref)
    if key not in _RTMS:
        import torch

        from patchscaler.rtm import ReferenceTextureMemory

        _RTMS[key] = ReferenceTextureMemory(keys=torch.from_numpy(np.array(doc["keys"])),
                                            values=torch.from_numpy(np.array(doc["values"])),
                                            use_gpu=use_gpu)
    return _RTMS[key], dict(doc["manifest"])


def load_model_source(source: str | SharedModel, *, device: str, autoencoder: str | None) -> Any:
    """A model from a checkpoint path (loaded here) or from the object store (built once per process)."""
    if isinstance(source, SharedModel):
        return model_from(source, device=device)
    from patchscaler.weights import load_checkpoint

    return load_checkpoint(source, device=device, autoencoder=autoencoder)


def load_rtm_source(source: str | SharedRTM, *, use_gpu: bool) -> tuple[Any, dict[str, Any]]:
    if isinstance(source, SharedRTM):
        return rtm_from(source, use_gpu=use_gpu)
    from patchscaler.weights import load_rtm

    return load_rtm(source, use_gpu=use_gpu)
