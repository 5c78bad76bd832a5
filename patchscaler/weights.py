"""The one module that reads and writes files: checkpoints and RTM tensors (spandrel-style loader).

A checkpoint is a directory (local path or ``s3://`` prefix) holding
- ``config.json``: ``PatchScalerConfig.to_dict()`` and ``format_version``;
- ``model.safetensors``: every module's tensors, prefixed by module name (never pickle).
Loading is strict: missing, unexpected and mis-shaped keys are all named in one error.

An RTM artifact directory holds ``rtm.safetensors`` (``keys`` (M, D), ``values`` (M, 4, 16, 16)) and
``manifest.json``; ``rtm_builder/`` writes the rest (Parquet, faiss index) next to them.

Nothing is downloaded: paths are local or object-store URLs (fsspec/s3fs), and an absent file is a
``FileNotFoundError`` that says what was expected where.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any

import fsspec
import torch
from diffusers import AutoencoderKL
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from patchscaler.autoencoder import build_vae
from patchscaler.config import AutoencoderConfig, PatchScalerConfig
from patchscaler.model import PatchScalerModel
from patchscaler.rtm import ReferenceTextureMemory

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RTM_FILE = "rtm.safetensors"
RTM_MANIFEST = "manifest.json"


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _read_bytes(path: str, what: str) -> bytes:
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise FileNotFoundError(f"{what} not found: {path}")
    with fs.open(fs_path, "rb") as f:
        return f.read()


def _write_bytes(path: str, data: bytes) -> None:
    """Write atomically: locally a temp file renamed into place; on object stores one PUT is atomic."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{fs_path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, fs_path)
    else:
        with fs.open(fs_path, "wb") as f:
            f.write(data)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def save_checkpoint(model: PatchScalerModel, path: str) -> str:
    """Write ``config.json`` and ``model.safetensors`` under ``path``; returns the weights' version hash."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = save_safetensors_bytes(state)
    config = {"format_version": FORMAT_VERSION, **model.config.to_dict()}
    _write_bytes(_join(path, WEIGHTS_FILE), blob)
    _write_bytes(_join(path, CONFIG_FILE), json.dumps(config, indent=2).encode())
    return content_hash(blob)


def load_config(path: str) -> PatchScalerConfig:
    data = json.loads(_read_bytes(_join(path, CONFIG_FILE), "checkpoint config (config.json)"))
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {version!r}, this code reads {FORMAT_VERSION}")
    return PatchScalerConfig.from_dict(data)


def check_state_dict(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], *, source: str, ignore_prefix: str = ""
) -> None:
    """Raise one ``ValueError`` naming every missing, unexpected and mis-shaped key."""
    want = {k for k in expected if not (ignore_prefix and k.startswith(ignore_prefix))}
    missing = sorted(want - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in want & set(found)
        if tuple(found[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"checkpoint {source} does not match the model config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = ", ".join(items[:10]) + (f" (+{len(items) - 10} more)" if len(items) > 10 else "")
                lines.append(f"  {title} ({len(items)}): {shown}")
        raise ValueError("\n".join(lines))


# diffusers' AutoencoderKL config fields that change the computation without changing any tensor's name or
# shape; ``LatentAutoencoder`` implements the SD-VAE values only (no shift, no per-channel latent stats).
_KL_FIXED: dict[str, Any] = {"shift_factor": None, "latents_mean": None, "latents_std": None,
                             "in_channels": 3, "out_channels": 3, "act_fn": "silu"}


def _local_copy(path: str, tmp: str) -> str:
    """A local folder holding the autoencoder folder's ``config.json`` and weights (object stores: copied
    into ``tmp``; diffusers' ``from_pretrained`` reads local folders only)."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if isinstance(fs, LocalFileSystem):
        return fs_path
    for name in (CONFIG_FILE, *AUTOENCODER_WEIGHT_FILES):
        if fs.exists(_join(fs_path, name)):
            fs.get(_join(fs_path, name), os.path.join(tmp, name))
    return tmp


AUTOENCODER_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_pretrained_autoencoder(
    path: str, config: AutoencoderConfig
) -> tuple[AutoencoderKL, AutoencoderConfig]:
    """A diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
    ``.bin``; local or ``s3://``) through diffusers' own loader, which also renames the older attention
    keys (``query/key/value/proj_attn`` -> ``to_q/to_k/to_v/to_out.0``).

    Returns the autoencoder and the ``AutoencoderConfig`` that describes it: sizes and ``scaling_factor``
    from the folder's ``config.json``, tiling settings from ``config``, ``pretrained`` = ``path``. The
    autoencoder is checked to be exactly what ``build_vae`` makes of that config (so the checkpoint it is
    written into loads strictly)."""
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(_join(fs_path, CONFIG_FILE)):
        raise FileNotFoundError(f"autoencoder folder not found (no {CONFIG_FILE}): {path}")
    if not any(fs.exists(_join(fs_path, name)) for name in AUTOENCODER_WEIGHT_FILES):
        raise FileNotFoundError(
            f"autoencoder weights not found: {path} holds none of {AUTOENCODER_WEIGHT_FILES}")
    with tempfile.TemporaryDirectory() as tmp:
        vae = AutoencoderKL.from_pretrained(_local_copy(path, tmp), local_files_only=True)
    vc = vae.config
    wrong = {k: vc.get(k) for k, want in _KL_FIXED.items() if vc.get(k, want) != want}
    n = len(vc.block_out_channels)
    kinds = (tuple(vc.down_block_types), tuple(vc.up_block_types))
    if kinds != (("DownEncoderBlock2D",) * n, ("UpDecoderBlock2D",) * n):
        wrong["block types"] = kinds
    if wrong:
        raise ValueError(f"autoencoder {path}: settings this project's LatentAutoencoder does not implement: "
                         f"{wrong} (expected {_KL_FIXED}, DownEncoderBlock2D / UpDecoderBlock2D)")
    derived = dataclasses.replace(
        config, kind="kl", block_out_channels=tuple(vc.block_out_channels),
        layers_per_block=int(vc.layers_per_block), latent_channels=int(vc.latent_channels),
        norm_num_groups=int(vc.norm_num_groups), scaling_factor=float(vc.scaling_factor), pretrained=path,
    )
    check_state_dict(build_vae(derived).state_dict(), vae.state_dict(), source=path)
    return vae.eval(), derived


def load_autoencoder_weights(
    path: str, config: AutoencoderConfig
) -> tuple[torch.nn.Module, AutoencoderConfig]:
    """Separate autoencoder weights: a diffusers folder (``load_pretrained_autoencoder``: its own config,
    ``scaling_factor`` included), or one ``.safetensors`` file of SD-VAE weights in diffusers' current key
    layout, loaded strictly into ``config``'s architecture. Returns (autoencoder, its config)."""
    if not path.endswith(".safetensors"):
        return load_pretrained_autoencoder(path, config)
    state = load_safetensors_bytes(_read_bytes(path, "autoencoder weights"))
    vae = build_vae(config)
    check_state_dict(vae.state_dict(), state, source=path)
    vae.load_state_dict(state, strict=True)
    return vae, config


def load_checkpoint(
    path: str, *, device: str | torch.device = "cpu", autoencoder: str | None = None
) -> PatchScalerModel:
    """Build the model from ``path/config.json`` and load ``path/model.safetensors`` strictly.

    ``autoencoder``: optional separate autoencoder weights (a diffusers folder or a ``.safetensors``
    file); they take the place of the checkpoint's own ``autoencoder.*`` tensors, which are then neither
    required nor loaded, and a folder's ``config.json`` sets the model's autoencoder config (its
    ``scaling_factor`` included).
    """
    config = load_config(path)
    blob = _read_bytes(_join(path, WEIGHTS_FILE), "checkpoint weights (model.safetensors)")
    state = load_safetensors_bytes(blob)
    vae = None
    if autoencoder:
        vae, ae_config = load_autoencoder_weights(autoencoder, config.autoencoder)
        config = with_autoencoder(config, ae_config, source=autoencoder)
    model = PatchScalerModel(config=config, vae=vae)
    ignore = "autoencoder." if autoencoder else ""
    if ignore:
        state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    check_state_dict(model.state_dict(), state, source=path, ignore_prefix=ignore)
    model.load_state_dict(state, strict=not ignore)
    model.version = content_hash(blob)
    return model.to(device).eval()


def with_autoencoder(
    config: PatchScalerConfig, ae_config: AutoencoderConfig, *, source: str
) -> PatchScalerConfig:
    """``config`` with ``ae_config`` as its autoencoder; a clear error when the other modules were built for
    another latent channel count."""
    if ae_config.latent_channels != config.latent_channels:
        raise ValueError(f"autoencoder {source} has {ae_config.latent_channels} latent channels, the model "
                         f"{config.latent_channels} (the paper and small presets take SD-VAE's 4)")
    return config.replace(autoencoder=ae_config)


def save_rtm(path: str, *, keys: torch.Tensor, values: torch.Tensor, manifest: dict[str, Any]) -> str:
    """Write the RTM tensors and manifest; returns the RTM version (hash of the tensors)."""
    blob = save_safetensors_bytes({"keys": keys.float().contiguous(), "values": values.float().contiguous()})
    version = content_hash(blob)
    _write_bytes(_join(path, RTM_FILE), blob)
    _write_bytes(_join(path, RTM_MANIFEST), json.dumps({**manifest, "version": version}, indent=2).encode())
    return version


def load_rtm(path: str, *, use_gpu: bool = False) -> tuple[ReferenceTextureMemory, dict[str, Any]]:
    """Read an RTM artifact (local or s3://): the in-memory RTM and its manifest."""
    tensors = load_safetensors_bytes(_read_bytes(_join(path, RTM_FILE), "RTM tensors (rtm.safetensors)"))
    manifest = json.loads(_read_bytes(_join(path, RTM_MANIFEST), "RTM manifest (manifest.json)"))
    for name in ("keys", "values"):
        if name not in tensors:
            raise ValueError(f"{path}/{RTM_FILE} has no {name!r} tensor")
    return ReferenceTextureMemory(keys=tensors["keys"], values=tensors["values"], use_gpu=use_gpu), manifest


# --- training state (trainer/): optimizer tensors as safetensors, everything else as JSON -------------

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINING_STATE_FILE = "training_state.json"


def save_training_state(path: str, *, optimizer_state: dict[str, Any], state: dict[str, Any]) -> None:
    """Write an optimizer ``state_dict()`` and a JSON-able ``state`` (step, loss history, ...) under ``path``.

    Tensors of the optimizer state go to ``optimizer.safetensors`` as ``state.<param>.<name>``; the
    param groups and any non-tensor entries go to ``training_state.json`` next to it."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in optimizer_state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    doc = {
        "format_version": FORMAT_VERSION,
        "optimizer": {"param_groups": optimizer_state["param_groups"], "scalars": scalars},
        "state": state,
    }
    _write_bytes(_join(path, OPTIMIZER_FILE), save_safetensors_bytes(tensors))
    _write_bytes(_join(path, TRAINING_STATE_FILE), json.dumps(doc, indent=1).encode())


def has_training_state(path: str) -> bool:
    fs, fs_path = fsspec.core.url_to_fs(_join(path, TRAINING_STATE_FILE))
    return bool(fs.exists(fs_path))


def load_training_state(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Inverse of ``save_training_state``: (optimizer state_dict, state)."""
    doc = json.loads(_read_bytes(_join(path, TRAINING_STATE_FILE), "training state (training_state.json)"))
    tensors = load_safetensors_bytes(_read_bytes(_join(path, OPTIMIZER_FILE), "optimizer state"))
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        opt_state.setdefault(int(pid), {})[name] = value
    for pid, entries in doc["optimizer"]["scalars"].items():
        opt_state.setdefault(int(pid), {}).update(entries)
    # JSON turned tuples (Adam's betas) into lists; the optimizers unpack either, but keep tuples.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
        for group in doc["optimizer"]["param_groups"]
    ]
    return {"state": opt_state, "param_groups": groups}, doc["state"]
