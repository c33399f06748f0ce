"""Key-frequency detection recovers planted frequencies and refuses flat profiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entk_helpers.experiments.frequencies import (
    embedding_fourier_power,
    key_frequencies,
    neuron_fourier_shares,
    neuron_frequency_power,
)

P = 29


def planted_embedding(freqs: list[int], seed: int, noise: float = 0.05) -> torch.Tensor:
    """``(p + 1, 64)``: cos/sin columns at ``freqs`` mixed randomly, plus noise and an "=" row."""
    rng = np.random.default_rng(seed)
    a = np.arange(P)[:, None]
    waves = np.concatenate([np.cos(2 * np.pi * k * a / P) for k in freqs]
                           + [np.sin(2 * np.pi * k * a / P) for k in freqs], axis=1)
    w = waves @ rng.standard_normal((waves.shape[1], 64)) + noise * rng.standard_normal((P, 64))
    return torch.as_tensor(np.vstack([w, 10 * rng.standard_normal((1, 64))]))


def planted_neurons(freqs: list[int], seed: int, n: int = 128) -> np.ndarray:
    """``(p*p, n)`` ReLU neurons of the form relu(cos(k a + x) + cos(k b + y)), k from ``freqs``."""
    rng = np.random.default_rng(seed)
    a, b = np.meshgrid(np.arange(P), np.arange(P), indexing="ij")
    a, b = a.reshape(-1, 1), b.reshape(-1, 1)
    ks = np.array(freqs)[rng.integers(len(freqs), size=n)]
    phase_a, phase_b = rng.uniform(0, 2 * np.pi, (2, n))
    pre = np.cos(2 * np.pi * ks * a / P + phase_a) + np.cos(2 * np.pi * ks * b / P + phase_b)
    return np.maximum(pre, 0) + 0.05 * rng.standard_normal((P * P, n))


@pytest.mark.parametrize("freqs", [[1, 12], [4], [3, 7, 11]])
@pytest.mark.parametrize("rule", ["gap", "mad"])
def test_embedding_power_recovers_planted_frequencies(freqs: list[int], rule: str) -> None:
    power = embedding_fourier_power(planted_embedding(freqs, seed=len(freqs)), P)
    assert power.shape == ((P - 1) // 2,)
    assert key_frequencies(power, rule=rule) == freqs


def test_embedding_power_matches_explicit_dft() -> None:
    w = torch.randn(P, 8, dtype=torch.float64)
    a = torch.arange(P, dtype=torch.float64)
    for k in (1, 5, 14):
        cos = torch.cos(2 * torch.pi * k * a / P) @ w
        sin = torch.sin(2 * torch.pi * k * a / P) @ w
        expected = float((cos**2 + sin**2).mean())
        assert embedding_fourier_power(w, P)[k - 1] == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("freqs", [[1, 12], [5, 9]])
def test_neuron_votes_recover_planted_frequencies(freqs: list[int]) -> None:
    hidden = planted_neurons(freqs, seed=0)
    shares, variance = neuron_fourier_shares(hidden, P)
    assert shares.shape == (hidden.shape[1], (P - 1) // 2)
    assert np.all(shares.sum(axis=1) <= 1 + 1e-9)
    np.testing.assert_allclose(variance, hidden.var(axis=0), rtol=1e-9)
    assert key_frequencies(neuron_frequency_power(hidden, P)) == freqs


def test_pure_wave_neuron_is_explained_by_its_frequency() -> None:
    a, b = np.meshgrid(np.arange(P), np.arange(P), indexing="ij")
    neuron = np.cos(2 * np.pi * 6 * (a + b) / P).reshape(-1, 1)
    shares, _ = neuron_fourier_shares(neuron, P)
    assert shares[0, 5] == pytest.approx(1.0)
    assert shares[0].sum() == pytest.approx(1.0)


def test_flat_profile_is_refused() -> None:
    flat = 1 + 0.01 * np.random.default_rng(0).standard_normal((P - 1) // 2)
    for rule in ("gap", "mad"):
        with pytest.raises(ValueError, match="stands out"):
            key_frequencies(flat, rule=rule)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rule"):
        key_frequencies(np.ones(14), rule="eyeball")
    with pytest.raises(ValueError, match="W_E"):
        embedding_fourier_power(torch.zeros(10, 4), P)
    with pytest.raises(ValueError, match="hidden"):
        neuron_fourier_shares(np.zeros((P, 3)), P)
