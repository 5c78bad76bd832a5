"""Shared fixtures: the tiny preset, a random tiny model and RTM, and one Ray instance for all tests."""

from __future__ import annotations

import os
import tempfile

# The benchmark history defaults to $PATCHSCALER_HOME (eval/history.py): never the user's in a test.
os.environ["PATCHSCALER_HOME"] = tempfile.mkdtemp(prefix="patchscaler-home-")
# Idle OpenMP threads spin by default; with Ray workers beside the tests on 2 cores that costs minutes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from patchscaler.config import PatchScalerConfig
from patchscaler.model import PatchScalerModel
from patchscaler.presets import PRESETS
from patchscaler.rtm import ReferenceTextureMemory

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_config() -> PatchScalerConfig:
    return PRESETS["tiny"]


def make_tiny_model(seed: int = 0) -> PatchScalerModel:
    """A tiny model with random weights; the zero-initialised DiT gates are randomised too, so that
    every part of the network (texture prompt included) affects the output."""
    torch.manual_seed(seed)
    model = PatchScalerModel(config=PRESETS["tiny"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("autoencoder.") and p.abs().sum() == 0:
                p.normal_(0.0, 0.02)
    return model.eval()


def make_tiny_rtm(model: PatchScalerModel, entries: int = 24, seed: int = 0) -> ReferenceTextureMemory:
    g = torch.Generator().manual_seed(seed)
    c, v = model.config.latent_channels, model.config.sampler.patch_size
    values = torch.randn(entries, c, v, v, generator=g)
    with torch.no_grad():
        keys = model.classifier.features(values)
    return ReferenceTextureMemory(keys=keys, values=values)


@pytest.fixture(scope="session")
def tiny_model() -> PatchScalerModel:
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_rtm(tiny_model: PatchScalerModel) -> ReferenceTextureMemory:
    return make_tiny_rtm(tiny_model)


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray instance for the whole test session (a start costs 10-20 s here); never
    one that another process started on the machine."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # a private instance, never another process's Ray on this machine
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=512 * 1024 * 1024,
        )
    yield ray
    ray.shutdown()
