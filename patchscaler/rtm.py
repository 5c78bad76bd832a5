"""Reference Texture Memory (section 3.3, appendix B.2/B.3), in memory.

RTM-keys are texture-classifier features of the RTM-values (4x16x16 latent patches), L2-normalised, so
that faiss's inner-product index ranks by the *normalised* inner product (cosine similarity) of the
paper's texture retrieval. The artifact on disk is read by ``weights.load_rtm``; building it is the job of
``rtm_builder/``.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F

GPU_TEMP_MEMORY = 256 << 20  # faiss's scratch memory per GPU index (its default is ~18% of the GPU)


def gpu_available() -> bool:
    """Whether this faiss build has GPU support (``faiss-gpu``, the ``gpu`` extra) and sees a GPU (in a
    Ray actor: the GPU Ray gave it, as device 0)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(keys: np.ndarray, *, use_gpu: bool) -> tuple[faiss.Index, Any]:
    """An exact inner-product index over ``keys`` (M, D) float32: on this process's first GPU when
    ``use_gpu`` and :func:`gpu_available`, else on CPU. Returns the index and the GPU resources that
    must live as long as it (None on CPU). Both indexes give the same top-K (flat, exact search)."""
    index: faiss.Index = faiss.IndexFlatIP(keys.shape[1])
    resources = None
    if use_gpu and gpu_available():  # not run on a GPU yet (docs/pipeline.md, "GPU hosts")
        resources = faiss.StandardGpuResources()
        resources.setTempMemory(GPU_TEMP_MEMORY)
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    index.add(np.ascontiguousarray(keys, dtype=np.float32))
    return index, resources


class ReferenceTextureMemory:
    """Keys (M, D) and values (M, 4, 16, 16) with a faiss inner-product index over the keys."""

    def __init__(self, *, keys: torch.Tensor, values: torch.Tensor, use_gpu: bool = False) -> None:
        if keys.ndim != 2:
            raise ValueError(f"RTM keys must be (M, D), got {tuple(keys.shape)}")
        if values.ndim != 4 or values.shape[0] != keys.shape[0]:
            raise ValueError(
                f"RTM values must be (M, C, V, V) with M = {keys.shape[0]}, got {tuple(values.shape)}"
            )
        if keys.shape[0] == 0:
            raise ValueError("RTM is empty")
        self.keys = F.normalize(keys.float(), dim=1).contiguous()  # (M, D)
        self.values = values.float().contiguous()  # (M, 4, 16, 16)
        # faiss-gpu on GPU hosts (the ``gpu`` extra), faiss-cpu everywhere else
        self.index, self._gpu_resources = build_index(self.keys.numpy(), use_gpu=use_gpu)

    @property
    def on_gpu(self) -> bool:
        return self._gpu_resources is not None

    def __len__(self) -> int:
        return self.keys.shape[0]

    @property
    def key_dim(self) -> int:
        return self.keys.shape[1]

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k keys by normalised inner product: (scores (B, k) float32, idx (B, k) int64), best first."""
        if queries.ndim != 2 or queries.shape[1] != self.key_dim:
            raise ValueError(f"queries must be (B, {self.key_dim}), got {tuple(queries.shape)}")
        if k > len(self):
            raise ValueError(f"top-k of {k} asked from an RTM of {len(self)} entries")
        q = F.normalize(queries.detach().float().cpu(), dim=1)  # (B, D)
        scores, idx = self.index.search(np.ascontiguousarray(q.numpy()), k)  # (B, k) each
        return torch.from_numpy(scores), torch.from_numpy(idx).long()

    def gather(self, idx: torch.Tensor) -> torch.Tensor:
        """RTM-values of the retrieved entries: (B, k) -> (B, k, 4, 16, 16)."""
        return self.values[idx.cpu()]
