"""``nontrivial_pca_directions`` against numpy's SVD, and the MLP's pre-activations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entk_helpers.experiments.baselines import nontrivial_pca_directions, pca_directions
from entk_helpers.experiments.modular import ModularMLP, modular_addition_data


def test_stops_at_the_rank_and_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    low_rank = rng.standard_normal((40, 3)) @ rng.standard_normal((3, 10)) + 2.0
    scores = nontrivial_pca_directions(low_rank, 8)
    assert scores.shape == (40, 3)
    centred = low_rank - low_rank.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    assert np.allclose(np.abs(scores.numpy()), np.abs(u[:, :3] * s[:3]), atol=1e-10)
    # with full rank it is pca_directions
    full = rng.standard_normal((30, 5))
    assert torch.allclose(nontrivial_pca_directions(full, 4).abs(), pca_directions(full, 4).abs())


def test_uncentred_directions_are_the_gram_eigenvectors() -> None:
    a = np.random.default_rng(1).standard_normal((20, 4)) + 1.0
    scores = nontrivial_pca_directions(a, 4, center=False).numpy()
    assert np.allclose(scores @ scores.T, a @ a.T, atol=1e-10)


def test_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="k=0"):
        nontrivial_pca_directions(np.ones((5, 2)), 0)
    with pytest.raises(ValueError, match="all .* zero"):
        nontrivial_pca_directions(np.ones((5, 2)), 2)


def test_mlp_preactivations_have_the_one_hot_rank() -> None:
    p = 7
    torch.manual_seed(0)
    model = ModularMLP(p, width=64).double()
    pairs, _ = modular_addition_data(p)
    z = model.preactivations(pairs)
    assert torch.allclose(z ** 2, model.hidden(pairs))
    # one-hot(a) ++ one-hot(b) spans 2p - 1 directions; centring removes the constant one
    assert nontrivial_pca_directions(z.detach(), 64).shape[1] == 2 * p - 2
