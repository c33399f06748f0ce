"""``find_cliffs`` on spectra its defaults were not tuned on: smooth ones (Marchenko-Pastur,
power laws) must give no multi-mode block, planted noisy blocks must be found at their edges,
and the paper's MLP must show its 1 / 2(p-1) / 2(p-1) structure at other seeds too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entk_helpers import find_cliffs
from entk_helpers.experiments.modular import mlp_trace_ntk, modular_addition_data, paper_mlp, train


def sizes(lam: np.ndarray, **kwargs: float) -> list[int]:
    return [c.size for c in find_cliffs(lam, **kwargs)]


@pytest.mark.parametrize("n, aspect", [(200, 0.1), (200, 0.5), (400, 0.9), (300, 2.0)])
@pytest.mark.parametrize("draw", range(3))
def test_marchenko_pastur_has_no_blocks(n: int, aspect: float, draw: int) -> None:
    x = np.random.default_rng(draw).standard_normal((n, int(n / aspect)))
    lam = np.linalg.eigvalsh(x @ x.T / x.shape[1])[::-1]
    assert all(s == 1 for s in sizes(lam)), sizes(lam)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_power_laws_have_no_blocks(alpha: float, noise: float) -> None:
    i = np.arange(1, 842, dtype=float)
    lam = np.sort(i ** -alpha * (1 + noise * np.random.default_rng(1).standard_normal(i.size)))
    assert all(s == 1 for s in sizes(lam[::-1])), sizes(lam[::-1])


def planted(r: float, sigma: float, seed: int) -> np.ndarray:
    """A top mode, two blocks of 40 (r apart), a power-law tail r below, sigma noise on each."""
    levels = np.array([10 * r * r] + [r * r] * 40 + [r] * 40 + list((np.arange(760) / 4 + 1.25)
                                                                    ** -1.0))
    noisy = levels * (1 + sigma * np.random.default_rng(seed).standard_normal(levels.size))
    return np.sort(noisy)[::-1]


@pytest.mark.parametrize("r", [1.5, 2.0])
@pytest.mark.parametrize("sigma", [0.01, 0.03, 0.05])
def test_planted_noisy_blocks_found_at_their_edges(r: float, sigma: float) -> None:
    for seed in range(4):
        lam = planted(r, sigma, seed)
        assert [(c.start, c.stop) for c in find_cliffs(lam)] == [(0, 1), (1, 41), (41, 81)], \
            (r, sigma, seed, sizes(lam))


def test_soft_edge_between_flat_blocks() -> None:
    # a x1.2 edge is far below the old fixed threshold of 1.25, but 100 times the gaps inside
    rng = np.random.default_rng(2)
    lam = np.sort(np.concatenate([1.2 * (1 + 0.001 * rng.standard_normal(30)),
                                  1.0 * (1 + 0.001 * rng.standard_normal(30)),
                                  0.5 * 0.97 ** np.arange(100)]))[::-1]
    assert sizes(lam) == [30, 30]


def test_a_large_drop_does_not_hide_a_smaller_one_next_to_it() -> None:
    rng = np.random.default_rng(3)
    lam = np.concatenate([[1000.0], [60.0, 59.0], 10 * 0.99 ** np.arange(50)])
    lam = np.sort(lam * (1 + 1e-3 * rng.standard_normal(lam.size)))[::-1]
    assert sizes(lam) == [1, 2]


@pytest.mark.parametrize("seed", [0, 3])
def test_paper_mlp_structure_at_other_seeds(seed: int) -> None:
    p = 29
    pairs, labels = modular_addition_data(p)
    model, train_idx, test_idx = paper_mlp(p, seed)
    run = train(model, pairs, labels, train_idx, test_idx, epochs=500, lr=0.05,
                weight_decay=0.01, loss="mse", snapshot_every=500, eval_every=500, seed=seed,
                progress=False)
    assert run.history["test_acc"][-1] > 0.95
    lam = torch.linalg.eigvalsh(mlp_trace_ntk(model, pairs)).flip(0)
    assert sizes(lam)[:3] == [1, 2 * (p - 1), 2 * (p - 1)]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_eigenvalues_are_refused(bad: float) -> None:
    lam = np.array([3.0, 2.0, bad, 1.0])
    with pytest.raises(ValueError, match="NaN or infinite.*index 2"):
        find_cliffs(lam)


@pytest.mark.parametrize("setting, match", [
    (dict(min_drop=1.0), "min_drop"), (dict(min_drop=0.5), "min_drop"),
    (dict(min_drop=np.nan), "min_drop"), (dict(relative_drop=-1.0), "relative_drop"),
    (dict(relative_drop=0.5), "relative_drop"), (dict(relative_drop=np.inf), "relative_drop"),
    (dict(window=0), "window"), (dict(window=2.5), "window"), (dict(floor=-0.1), "floor"),
    (dict(floor=1.0), "floor"), (dict(max_index=0), "max_index"),
])
def test_nonsensical_settings_are_refused(setting: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        find_cliffs(np.array([3.0, 2.0, 1.0]), **setting)
