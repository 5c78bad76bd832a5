"""Reference Texture Memory (section 3.3, appendix B.2/B.3), in memory.

RTM-keys are texture-classifier features of the RTM-values (4x16x16 latent patches), L2-normalised, so
that faiss's inner-product index ranks by the *normalised* inner product (cosine similarity) of the
paper's texture retrieval. The artifact on disk is read by ``weights.load_rtm``; building it is the job of
``rtm_builder/``.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch
import torch.nn.functional as F


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


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
        index: faiss.Index = faiss.IndexFlatIP(self.keys.shape[1])
        if use_gpu and _gpu_available():  # faiss-gpu on GPU hosts; faiss-cpu everywhere else
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(self.keys.numpy())
        self.index = index

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
