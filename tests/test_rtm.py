import pytest
import torch

from patchscaler.rtm import ReferenceTextureMemory


def test_search_returns_planted_nearest_neighbour() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(200, 32, generator=g)
    values = torch.randn(200, 4, 16, 16, generator=g)
    rtm = ReferenceTextureMemory(keys=keys, values=values)
    planted = [3, 77, 150]
    # Queries are scaled, slightly perturbed copies of planted keys: normalisation must undo the scale.
    queries = keys[planted] * torch.tensor([[5.0], [0.2], [1.0]]) + 0.01 * torch.randn(3, 32, generator=g)
    scores, idx = rtm.search(queries, k=4)
    assert idx.shape == (3, 4) and scores.shape == (3, 4)
    assert idx[:, 0].tolist() == planted
    assert torch.all(scores[:, 0] > 0.99)
    assert torch.all(scores[:, :-1] >= scores[:, 1:])  # best first
    torch.testing.assert_close(rtm.gather(idx)[:, 0], values[planted])


def test_scores_are_cosine_similarities() -> None:
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    rtm = ReferenceTextureMemory(keys=keys, values=torch.zeros(3, 4, 16, 16))
    scores, idx = rtm.search(torch.tensor([[3.0, 0.0]]), k=3)
    assert idx[0].tolist() == [0, 2, 1]
    torch.testing.assert_close(scores[0], torch.tensor([1.0, 2**-0.5, 0.0]), atol=1e-6, rtol=0)


def test_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="values"):
        ReferenceTextureMemory(keys=torch.randn(3, 8), values=torch.randn(4, 4, 16, 16))
    rtm = ReferenceTextureMemory(keys=torch.randn(3, 8), values=torch.randn(3, 4, 16, 16))
    with pytest.raises(ValueError, match="top-k"):
        rtm.search(torch.randn(1, 8), k=5)
    with pytest.raises(ValueError, match="queries"):
        rtm.search(torch.randn(1, 7), k=1)
