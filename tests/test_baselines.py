"""Baselines against independent references: numpy SVD, scikit-learn PCA, the overlap formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entk_helpers import subspace_overlap
from entk_helpers.experiments.baselines import (
    overlap_curve,
    pca_directions,
    pca_lowrank_directions,
    random_directions,
)


def _numpy_overlap(q: np.ndarray, f: np.ndarray) -> float:
    """||Q^T F||_F^2 from numpy alone: orthonormal bases by SVD, F centred first."""
    uq = np.linalg.svd(q, full_matrices=False)[0]
    fc = f - f.mean(axis=0)
    uf, sf, _ = np.linalg.svd(fc, full_matrices=False)
    uf = uf[:, sf > 1e-8 * sf[0]]
    return float(np.sum((uq.T @ uf) ** 2))


def test_pca_directions_match_numpy_svd() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 12)) @ np.diag(np.linspace(3, 0.5, 12)) + 5.0
    scores = pca_directions(torch.tensor(x), 4).numpy()
    xc = x - x.mean(axis=0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    # same columns up to sign; scores = projections of the centred data on the components
    np.testing.assert_allclose(np.abs(scores), np.abs(u[:, :4] * s[:4]), atol=1e-10)
    np.testing.assert_allclose(np.abs(scores), np.abs(xc @ vt[:4].T), atol=1e-10)
    variances = (scores**2).sum(axis=0)
    assert np.all(np.diff(variances) <= 0)


def test_pca_directions_match_sklearn() -> None:
    decomposition = pytest.importorskip("sklearn.decomposition")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 3, 5))  # higher-rank activations are flattened per example
    ours = pca_directions(x, 6).numpy()
    theirs = decomposition.PCA(n_components=6, svd_solver="full").fit_transform(x.reshape(40, -1))
    np.testing.assert_allclose(np.abs(ours), np.abs(theirs), atol=1e-10)


def test_pca_directions_rejects_too_many_components() -> None:
    with pytest.raises(ValueError, match="k must be in"):
        pca_directions(np.ones((10, 3)), 4)


def test_random_directions_are_orthonormal_and_seeded() -> None:
    a = random_directions(50, 7, seed=3)
    assert a.shape == (50, 7)
    np.testing.assert_allclose(a.T @ a, np.eye(7), atol=1e-12)
    assert torch.equal(a, random_directions(50, 7, seed=3))
    assert not torch.allclose(a, random_directions(50, 7, seed=4))


def test_random_directions_hit_chance_overlap_on_average() -> None:
    n, k, f = 80, 10, 6
    family = np.random.default_rng(0).standard_normal((n, f))
    mean = np.mean([overlap_curve(random_directions(n, k, seed=s), family, [k])[0]
                    for s in range(2000)])
    # for a Haar-random k-dim Q and any fixed f-dim F in R^n: E ||Q^T F||^2 = k f / n
    assert mean == pytest.approx(k * f / n, rel=0.05)


def test_overlap_curve_matches_subspace_overlap_and_numpy() -> None:
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((70, 15))
    family = rng.standard_normal((70, 5))
    ks = [1, 2, 5, 9, 15]
    curve = overlap_curve(vectors, family, ks)
    for k, value in zip(ks, curve):
        assert value == pytest.approx(subspace_overlap(vectors[:, :k], family), abs=1e-10)
        assert value == pytest.approx(_numpy_overlap(vectors[:, :k], family), abs=1e-10)
    assert np.all(np.diff(curve) >= -1e-12)
    assert curve[-1] <= 5 + 1e-9


def test_overlap_curve_reaches_the_family_dimension_when_it_contains_it() -> None:
    rng = np.random.default_rng(3)
    family = rng.standard_normal((30, 4))
    family -= family.mean(axis=0)
    vectors = np.concatenate([family, rng.standard_normal((30, 3))], axis=1)
    np.testing.assert_allclose(overlap_curve(vectors, family, [4, 7]), [4.0, 4.0], atol=1e-10)


def test_overlap_curve_rejects_dependent_directions_and_bad_k() -> None:
    x = np.random.default_rng(4).standard_normal((20, 3))
    dependent = np.concatenate([x, x[:, :1] + x[:, 1:2]], axis=1)
    with pytest.raises(ValueError, match="combination"):
        overlap_curve(dependent, x, [4])
    with pytest.raises(ValueError, match="every k"):
        overlap_curve(x, x, [0])
    with pytest.raises(ValueError, match="rows"):
        overlap_curve(x, x[:10], [1])


def test_pca_lowrank_is_exact_on_low_rank_data_and_seeded() -> None:
    """On data of rank r <= q the randomized range finder captures the whole range, so the
    paper's ``pca_lowrank`` scores equal numpy's exact PCA scores (up to sign); on full-rank
    data it depends on the seed, reproducibly, and leaves the global generator alone."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((70, 6)) * np.linspace(4, 1, 6)) @ rng.standard_normal((6, 20)) + 2
    xc = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    got = pca_lowrank_directions(torch.tensor(x), 4, q=8, niter=2, seed=0).numpy()
    np.testing.assert_allclose(np.abs(got), np.abs(u[:, :4] * s[:4]), atol=1e-8)
    full = rng.standard_normal((70, 30))
    state = torch.random.get_rng_state()
    a = pca_lowrank_directions(full, 5, q=5, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, pca_lowrank_directions(full, 5, q=5, seed=0))
    assert not torch.allclose(a.abs(), pca_lowrank_directions(full, 5, q=5, seed=1).abs())
    with pytest.raises(ValueError, match="q="):
        pca_lowrank_directions(full, 6, q=5)


def test_captured_fraction_known_answers_and_the_kept_last_value():
    from entk_helpers.experiments.baselines import captured_fraction
    n = 12
    eye = torch.eye(n, dtype=torch.float64)
    family = eye[:, :3] - eye[:, :3].mean(0)          # centred, 3-dim
    basis = torch.linalg.qr(family)[0]                 # (n, 3): spans the family exactly
    others = torch.linalg.qr(torch.cat([basis, torch.randn(n, 2, dtype=torch.float64)], 1))[0]
    curve = captured_fraction(others, family, [1, 3, 5, 9])   # k = 9 > 5 directions
    np.testing.assert_allclose(curve[1:], [1.0, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(curve[0], 1 / 3, atol=1e-12)   # one of three basis vectors


def test_k_to_reach_and_random_band():
    from entk_helpers.experiments.baselines import k_to_reach, random_fraction_band
    assert k_to_reach([0.2, 0.95, 1.0], [1, 5, 10]) == 5
    assert k_to_reach([0.2, 0.5], [1, 5]) is None
    with pytest.raises(ValueError, match="one value per k"):
        k_to_reach([0.2], [1, 5])
    family = torch.randn(20, 4, dtype=torch.float64)
    band = random_fraction_band(20, 10, family, [5, 10, 20], n_draws=3)
    assert band.shape == (3, 3) and np.all(np.diff(band, axis=1) >= -1e-12)
    np.testing.assert_allclose(band[:, 2], band[:, 1])         # k = 20 beyond the 10 directions
