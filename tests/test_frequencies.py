"""Key-frequency detection recovers planted frequencies and refuses flat profiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from entk_helpers import fourier_family, layerwise_ntk, orthonormal_basis, subspace_overlap
from entk_helpers.experiments.frequencies import (
    alignment_over_training,
    author_axis_sum,
    embedding_fourier_power,
    family_power,
    frequencies_holding,
    half_final_epoch,
    key_frequencies,
    neuron_fourier_shares,
    neuron_frequency_power,
    smoothed_peak,
    table2_overlaps,
    transformer_frequencies,
    unembedding_modes,
    unembedding_ntk,
)
from entk_helpers.experiments.modular import OneLayerTransformer

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


def small_transformer(p: int = 7, seed: int = 0) -> OneLayerTransformer:
    model = OneLayerTransformer(p, d_model=8, n_heads=2, d_mlp=12,
                                generator=torch.Generator().manual_seed(seed))
    return model.double().eval()


def hand_tokens(p: int) -> torch.Tensor:
    """``(p*p, 3)``: (a, b, "=") written out by a double loop, row a * p + b."""
    return torch.tensor([[a, b, p] for a in range(p) for b in range(p)])


def test_transformer_frequencies_finds_a_planted_embedding_and_reads_the_neurons() -> None:
    model = OneLayerTransformer(P, generator=torch.Generator().manual_seed(0)).double()
    with torch.no_grad():
        model.W_E.weight.copy_(planted_embedding([3, 8], seed=0))
    report = transformer_frequencies(model)
    assert report.embedding == [3, 8]
    assert np.allclose(report.embedding_power, embedding_fourier_power(model.W_E.weight, P))
    with torch.no_grad():
        hidden = model.residual(hand_tokens(P))["mlp_hidden"][:, -1]
    assert np.allclose(report.neuron_votes, neuron_frequency_power(hidden, P))
    untrained = OneLayerTransformer(P, generator=torch.Generator().manual_seed(0))
    assert transformer_frequencies(untrained).embedding is None   # a flat Gaussian profile


def test_author_axis_sum_adds_the_a_and_b_columns_and_has_2n() -> None:
    p, freqs = 7, [1, 3]
    got = author_axis_sum(p, freqs)
    assert got.shape == (p * p, 2 * len(freqs))
    assert fourier_family(p, "axis_sum", freqs).shape == (p * p, 4 * len(freqs))
    for a in range(p):
        for b in range(p):
            for j, k in enumerate(freqs):
                cos = np.cos(2 * np.pi * k * a / p) + np.cos(2 * np.pi * k * b / p)
                sin = np.sin(2 * np.pi * k * a / p) + np.sin(2 * np.pi * k * b / p)
                assert abs(float(got[a * p + b, 2 * j]) - cos) < 1e-12
                assert abs(float(got[a * p + b, 2 * j + 1]) - sin) < 1e-12
    # the package's 4n-column family contains the author's 2n-column one
    assert abs(subspace_overlap(got, fourier_family(p, "axis_sum", freqs)) - 4) < 1e-9


def test_table2_overlaps_of_hand_built_blocks() -> None:
    p, key = 11, [2, 5]
    n = len(key)
    block_a = orthonormal_basis(torch.cat([torch.ones(p * p, 1, dtype=torch.float64),
                                           fourier_family(p, "sum", key)], dim=1))
    block_b = orthonormal_basis(author_axis_sum(p, key))
    extra = torch.randn(p * p, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vectors = torch.cat([block_a, block_b, extra], dim=1)
    over_a, over_b = table2_overlaps(vectors, p, key)
    assert abs(over_a - 2 * n) < 1e-9 and abs(over_b - 2 * n) < 1e-9
    swapped = torch.cat([block_b, block_a, extra], dim=1)     # A sees axis_sum, B the sum modes
    over_a, over_b = table2_overlaps(swapped, p, key)
    assert over_a < 1e-9 and over_b < 1e-9
    with pytest.raises(ValueError, match="4n\\+1"):
        table2_overlaps(vectors[:, :4 * n], p, key)


def test_unembedding_ntk_is_the_layerwise_w_u_kernel_and_its_modes_its_eigenvectors() -> None:
    model = small_transformer()
    kernels = layerwise_ntk(model, hand_tokens(7), groups="module", output="mean_logit",
                            select=lambda out: out[:, -1, :])
    closed = unembedding_ntk(model)
    assert torch.allclose(closed, kernels["W_U"].double(), rtol=1e-9, atol=1e-12)
    values, vectors = torch.linalg.eigh(closed)
    top = vectors.flip(-1)[:, :3]
    assert abs(subspace_overlap(unembedding_modes(model)[:, :3], top, center_features=False)
               - 3) < 1e-8
    assert values[-1] > values[-2] > values[-3] > values[-4]    # the top 3 are separated


def test_alignment_over_training_against_eigh_per_snapshot() -> None:
    p, key = 7, [2]
    model = small_transformer(p)
    snapshots = {20: small_transformer(p, seed=2).state_dict(), 0: model.state_dict()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    epochs, curve = alignment_over_training(model, snapshots, key)
    assert epochs.tolist() == [0, 20]
    for epoch, value in zip(epochs, curve):
        probe = small_transformer(p)
        probe.load_state_dict(snapshots[epoch])
        kernel = layerwise_ntk(probe, hand_tokens(p), output="mean_logit",
                               select=lambda out: out[:, -1, :])["W_U"].double()
        top = torch.linalg.eigh(kernel)[1].flip(-1)[:, :3]
        assert abs(value - subspace_overlap(top, fourier_family(p, "sum", key)) / 2) < 1e-8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="snapshots"):
        alignment_over_training(model, {}, key)


def test_smoothed_peak_of_a_logistic_is_its_midpoint() -> None:
    epochs = np.arange(0, 2001, 20)
    curve = 1 / (1 + np.exp(-(epochs - 700) / 60))
    for sd in (50, 100, 200):
        assert abs(smoothed_peak(epochs, curve, sd) - 700) <= 20
    steep = curve.copy()
    steep[50] += 0.3                                    # one noisy snapshot at epoch 1000
    assert int(epochs[np.argmax(np.gradient(steep, epochs))]) != 700
    assert abs(smoothed_peak(epochs, steep, 100) - 700) <= 40
    with pytest.raises(ValueError, match="evenly spaced"):
        smoothed_peak(np.array([0, 1, 3]), np.array([0.0, 0.5, 1.0]), 1)


def test_half_final_epoch_known_answers() -> None:
    assert half_final_epoch(np.arange(0, 101, 10), np.linspace(0, 1, 11)) == pytest.approx(50)
    # level 0.5 between (10, 0.2) and (20, 1.0): 10 + 10 * 0.3 / 0.8
    assert half_final_epoch(np.array([0, 10, 20]), np.array([0, 0.2, 1.0])) == pytest.approx(13.75)
    assert half_final_epoch(np.array([5, 10]), np.array([0.8, 1.0])) == 5.0
    with pytest.raises(ValueError, match="increase"):
        half_final_epoch(np.array([0, 0]), np.array([0.0, 1.0]))


def test_frequencies_holding_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        power = rng.exponential(size=14) ** 3
        share = rng.uniform(0.3, 0.99)
        top = np.sort(power)[::-1]
        brute = next(m for m in range(1, 15) if top[:m].sum() >= share * power.sum())
        assert frequencies_holding(power, share) == brute
    assert frequencies_holding(np.array([0, 5.0, 0, 0])) == 1
    assert frequencies_holding(np.array([4.0, 2, 1, 1]), 0.75) == 2      # 6/8 exactly
    with pytest.raises(ValueError, match="share"):
        frequencies_holding(np.ones(3), 1.5)


def test_family_power_of_pure_waves_and_parseval() -> None:
    p = 11
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    wave = 3 * np.cos(2 * np.pi * 4 * (a + b) / p + 0.7)
    got = family_power(wave[:, None], p, "sum")
    assert abs(got[3] - (wave ** 2).sum()) < 1e-9 and np.delete(got, 3).max() < 1e-9
    rng = np.random.default_rng(1)
    g = rng.standard_normal((p, 3))                     # any function of (a + b) mod p
    outputs = g[(a + b) % p]
    centred = outputs - outputs.mean(axis=0)
    assert abs(family_power(outputs, p, "sum").sum() - (centred ** 2).sum()) < 1e-9
    assert family_power(outputs, p, "diff").max() < 1e-9      # no (a - b) content
    with pytest.raises(ValueError, match="kind"):
        family_power(outputs, p, "axis_sum")
