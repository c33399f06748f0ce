"""``superposition``: TMS data, model and counts against their definitions; the weighted
operator and the output mass against dense references; the kernel's rank bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ntk_references import brute_force_ntk, rel_err

from entk_helpers import ntk_operator, top_eigenpairs
from entk_helpers.experiments.superposition import (
    ModeFeatures,
    ToyModel,
    ablation_target,
    feature_coverage,
    feature_importance,
    importance_weighted_mse,
    indicator_mass,
    mode_features,
    output_mass,
    output_weighted,
    per_feature_error,
    represented_features,
    tms_data,
    train_tms,
    train_toy_model,
)


def test_data_is_sparse_uniform_and_unit_norm() -> None:
    x = tms_data(4000, 20, 0.7, seed=0)
    assert x.shape == (4000, 20) and x.dtype == torch.float32
    nonzero_rows = x.abs().sum(dim=1) > 0
    norms = torch.linalg.vector_norm(x[nonzero_rows], dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    assert (x >= 0).all()
    assert abs(float((x > 0).float().mean()) - 0.3) < 0.01          # 1 - S nonzero
    assert torch.equal(x, tms_data(4000, 20, 0.7, seed=0))
    assert not torch.equal(x, tms_data(4000, 20, 0.7, seed=1))
    dense = tms_data(20000, 1, 0.0, seed=0)          # one feature: norm 1 whatever the value
    assert torch.allclose(dense, torch.ones_like(dense))


def test_importance_and_loss_follow_their_formulas() -> None:
    importance = feature_importance(4, 0.8)
    assert torch.allclose(importance, torch.tensor([1.0, 0.8, 0.64, 0.512]))
    out, target = torch.rand(6, 4), torch.rand(6, 4)
    by_hand = sum(float(importance[i]) * float(((out[:, i] - target[:, i]) ** 2).sum())
                  for i in range(4)) / 24
    assert abs(float(importance_weighted_mse(out, target, importance)) - by_hand) < 1e-6
    assert torch.allclose(per_feature_error(out, target), ((out - target) ** 2).mean(0))


def test_model_is_relu_of_wtw_x_plus_b() -> None:
    model = ToyModel(7, 3, seed=0)
    assert model.W.shape == (3, 7) and torch.equal(model.b, torch.zeros(7))
    with torch.no_grad():
        model.b.normal_()
    x = torch.rand(5, 7)
    W, b = model.W.detach(), model.b.detach()
    expected = torch.stack([torch.clamp(W.T @ W @ x[n] + b, min=0) for n in range(5)])
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert torch.equal(ToyModel(7, 3, seed=0).W, ToyModel(7, 3, seed=0).W)
    big = ToyModel(400, 300, seed=0).W   # Xavier normal: std sqrt(2 / (fan_in + fan_out))
    assert abs(float(big.detach().std()) - np.sqrt(2 / 700)) < 0.002


def test_represented_features_is_the_diagonal_of_wtw() -> None:
    W = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.5, 0.9]])
    gram = W.T @ W
    assert torch.equal(represented_features(W), torch.diagonal(gram) >= 0.75)
    assert represented_features(W).tolist() == [True, False, True]


def test_training_reduces_the_loss_and_learns_the_top_features() -> None:
    x = tms_data(200, 5, 0.5, seed=0)
    model = ToyModel(5, 2, seed=0)
    losses = train_toy_model(model, x, feature_importance(5), epochs=1500, lr=1e-2,
                             progress=False)
    assert losses.shape == (1500,) and losses[-1] < 0.5 * losses[0]
    assert represented_features(model.W)[:2].all()     # the two most important features
    with pytest.raises(ValueError, match="must be"):
        train_toy_model(model, x[:, :4], feature_importance(5), epochs=1, progress=False)


def test_output_weighted_is_the_dense_rescaled_kernel() -> None:
    model = ToyModel(6, 2, seed=0).double()
    x = tms_data(5, 6, 0.5, seed=0).double()
    dense = brute_force_ntk(model, x).reshape(30, 30)
    weights = feature_importance(6).double()
    scale = torch.sqrt(weights).repeat(5)          # row n*C + c has weight I_c
    expected = scale[:, None] * dense * scale[None, :]
    op = output_weighted(ntk_operator(model, x, output="full"), weights)
    v = np.random.default_rng(0).standard_normal((30, 3))
    assert rel_err(torch.as_tensor(op @ v), expected @ torch.as_tensor(v)) < 1e-10
    assert rel_err(torch.as_tensor(op.matvec(v[:, 0])), expected @ torch.as_tensor(v[:, 0])) < 1e-10
    assert op.n_matvecs == 3 + 1                     # the wrapped operator's products
    with pytest.raises(ValueError, match="weights must be"):
        output_weighted(ntk_operator(model, x, output="full"), torch.ones(7))


def test_kernel_rank_is_at_most_the_parameter_count() -> None:
    model = ToyModel(6, 2, seed=0).double()
    with torch.no_grad():
        model.b.fill_(0.3)                           # every output active: full rank P
    x = tms_data(8, 6, 0.3, seed=0).double()
    dense = brute_force_ntk(model, x).reshape(48, 48)
    n_params = 6 * 2 + 6
    values = torch.linalg.eigvalsh(dense).flip(0)
    assert float(values[n_params] / values[0]) < 1e-12
    top = top_eigenpairs(ntk_operator(model, x, output="full"), n_params)
    assert rel_err(top.values, values[:n_params]) < 1e-8


def test_output_mass_sums_each_outputs_squares() -> None:
    v = torch.randn(4 * 3, 2, dtype=torch.float64)
    mass = output_mass(v, 3)
    by_hand = torch.tensor([[sum(float(v[n * 3 + c, j]) ** 2 for n in range(4)) for c in range(3)]
                            for j in range(2)], dtype=torch.float64)
    assert rel_err(mass, by_hand / by_hand.sum(1, keepdim=True)) < 1e-12
    with pytest.raises(ValueError, match="vectors must be"):
        output_mass(torch.randn(10, 2), 3)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="sparsity"):
        tms_data(4, 3, 1.0)
    with pytest.raises(ValueError, match="decay"):
        feature_importance(3, 0.0)
    with pytest.raises(ValueError, match="n_hidden"):
        ToyModel(3, 0)


def test_mode_features_is_the_largest_output_share() -> None:
    v = torch.randn(4 * 3, 5, dtype=torch.float64)
    got = mode_features(v, 3)
    mass = output_mass(v, 3)
    assert torch.equal(got.feature, mass.argmax(1)) and torch.equal(got.share, mass.max(1).values)


def test_feature_coverage_against_a_loop() -> None:
    data = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    v = torch.zeros(4 * 3, 2, dtype=torch.float64)
    v[torch.arange(4) * 3 + 0, 0] = torch.tensor([2.0, 0.0, 3.0, 0.0], dtype=torch.float64)
    v[torch.arange(4) * 3 + 2, 1] = 5.0             # output 2, spread over all points
    v[4, 0] = 1.0                                   # a little of output 1, at point 1
    v = torch.linalg.qr(v)[0]
    got = feature_coverage(v, data)
    for c in range(3):
        mass = sum(float(v[n * 3 + c, j]) ** 2 for n in range(4) for j in range(2))
        assert abs(float(got.coverage[c]) - mass) < 1e-12
        off = [n for n in range(4) if data[n, c] == 0]
        off_mass = sum(float(v[n * 3 + c, j]) ** 2 for n in off for j in range(2))
        expected = off_mass / mass / (len(off) / 4) if mass else 0.0
        assert abs(float(got.off_ratio[c]) - expected) < 1e-12
    assert abs(float(got.coverage.sum()) - 2) < 1e-12            # the block's dimension
    assert float(got.off_ratio[0]) < 1e-12                       # only where feature 0 is on
    assert abs(float(got.off_ratio[2]) - 1.0) < 1e-12            # ignores feature 2's presence
    assert got.tracked().tolist() == [True, False, False]
    rotated = v @ torch.linalg.qr(torch.randn(2, 2, dtype=torch.float64))[0]
    again = feature_coverage(rotated, data)                      # rotation invariant
    assert torch.allclose(again.coverage, got.coverage) and torch.allclose(again.off_ratio,
                                                                           got.off_ratio)
    with pytest.raises(ValueError, match="vectors must be"):
        feature_coverage(torch.randn(10, 2), data)


def test_train_tms_is_the_recipe_step_by_step() -> None:
    run = train_tms(3, 0.8, seed=4, n_features=6, n_points=40, decay=0.7, epochs=30, lr=1e-2,
                    threshold=0.5, progress=False)
    data = tms_data(40, 6, 0.8, seed=4)
    model = ToyModel(6, 3, seed=4)
    losses = train_toy_model(model, data, feature_importance(6, 0.7), epochs=30, lr=1e-2,
                             progress=False)
    assert torch.equal(run.data, data) and np.array_equal(run.losses, losses)
    assert torch.equal(run.model.W, model.W) and not run.model.training
    norms = (model.W.detach() ** 2).sum(0)
    assert run.represented.tolist() == (norms >= 0.5).tolist()
    assert run.count == int((norms >= 0.5).sum()) and run.n_params == 3 * 6 + 6
    assert run.train_seconds > 0


def test_indicator_mass_against_a_loop() -> None:
    data = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    v = torch.randn(4 * 3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = indicator_mass(v, data)
    assert got.shape == (5, 3)
    for j in range(5):
        total = float((v[:, j] ** 2).sum())
        for i in range(3):
            on = sum(float(v[n * 3 + i, j]) ** 2 for n in range(4) if data[n, i] > 0)
            assert abs(float(got[j, i]) - on / total) < 1e-12
    with pytest.raises(ValueError, match="vectors"):
        indicator_mass(v[:-1], data)


def test_ablation_target_picks_the_first_clean_tracked_mode() -> None:
    modes = ModeFeatures(feature=torch.tensor([2, 0, 1, 1, 0, 1]),
                         share=torch.tensor([0.9, 0.4, 0.8, 0.3, 0.7, 0.6]))
    tracked = torch.tensor([True, True, False])
    # mode 0 lies on an untracked output and mode 1 is not clean: mode 2 picks output 1
    feature, chosen = ablation_target(modes, tracked)
    assert feature == 1 and chosen.tolist() == [2, 5]
    feature, chosen = ablation_target(modes, torch.tensor([True, False, False]))   # mode 4
    assert feature == 0 and chosen.tolist() == [4]
    with pytest.raises(ValueError, match="min_share"):
        ablation_target(modes, tracked, min_share=0.95)
