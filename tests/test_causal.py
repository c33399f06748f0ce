"""``causal``: J^T v against an explicit Jacobian, ablation against a dense projection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ntk_references import brute_force_ntk, make_case, rel_err
from torch.func import functional_call

from entk_helpers.causal import (
    ablated_parameters,
    dense_jacobian,
    flat_parameters,
    random_ablations,
    random_subspace,
    unflatten_parameters,
    weight_space_directions,
)


def explicit_jacobian(case) -> torch.Tensor:
    """``(N*C, P)`` by one ``autograd.grad`` per output scalar (rows ``n*C + c``)."""
    params = [p for p in case.model.parameters() if p.requires_grad]
    rows = []
    for n in range(case.x1.shape[0]):
        out = case.model(case.x1[n:n + 1])
        out = (case.select(out) if case.select else out)[0]
        for c in range(out.shape[0]):
            grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for g, p in zip(grads, params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["mlp", "frozen", "tied", "transformer"])
def test_full_directions_are_jacobian_transpose_times_v(name: str) -> None:
    case = make_case(name)
    J = explicit_jacobian(case)
    v = torch.randn(J.shape[0], 3, dtype=torch.float64)
    got = weight_space_directions(case.model, case.x1, v, select=case.select, normalize=False,
                                  chunk_size=2)
    assert rel_err(got, J.T @ v) < 1e-12
    unit = weight_space_directions(case.model, case.x1, v, select=case.select)
    expected = J.T @ v
    assert rel_err(unit, expected / expected.norm(dim=0)) < 1e-12


def test_trace_directions_are_each_outputs_jacobian_over_sqrt_c() -> None:
    case = make_case("mlp")
    J = explicit_jacobian(case)                       # (N*C, P)
    n, c = case.x1.shape[0], 3
    v = torch.randn(n, 2, dtype=torch.float64)
    got = weight_space_directions(case.model, case.x1, v, output="trace", normalize=False)
    per_output = J.reshape(n, c, -1)
    expected = torch.stack([per_output[:, cc].T @ v[:, j] for j in range(2) for cc in range(c)],
                           dim=1) / np.sqrt(c)
    assert got.shape == (J.shape[1], 2 * c)
    assert rel_err(got, expected) < 1e-12


def test_eigenvectors_map_to_orthogonal_directions_of_norm_sqrt_lambda() -> None:
    case = make_case("mlp")
    J = explicit_jacobian(case)
    values, vectors = torch.linalg.eigh(J @ J.T)
    values, vectors = values.flip(0)[:4], vectors.flip(1)[:, :4]
    u = weight_space_directions(case.model, case.x1, vectors, normalize=False)
    gram = u.T @ u
    assert rel_err(gram, torch.diag(values)) < 1e-10


def test_ablation_is_the_dense_projection_and_leaves_the_model_alone() -> None:
    case = make_case("mlp")
    theta = torch.cat([p.detach().reshape(-1) for p in case.model.parameters()]).numpy()
    directions = torch.randn(theta.size, 4, dtype=torch.float64)
    q, _ = np.linalg.qr(directions.numpy())
    expected = theta - q @ (q.T @ theta)
    values, change = ablated_parameters(case.model, directions)
    got = torch.cat([values[name].reshape(-1) for name, _ in case.model.named_parameters()])
    assert rel_err(got, torch.as_tensor(expected)) < 1e-12
    assert abs(change - np.linalg.norm(q @ (q.T @ theta))) < 1e-12
    assert np.allclose(flat_parameters(case.model).numpy(), theta)   # untouched
    # the ablated values drive the model through functional_call
    out = functional_call(case.model, values, (case.x1,))
    assert out.shape == case.model(case.x1).shape


def test_change_norm_rescales_the_removed_component_only() -> None:
    case = make_case("mlp")
    theta = flat_parameters(case.model)
    directions = random_subspace(theta.numel(), 3, seed=1)
    values, change = ablated_parameters(case.model, directions, change_norm=0.5)
    delta = theta - torch.cat([v.reshape(-1) for v in values.values()])
    assert abs(change - 0.5) < 1e-12 and abs(float(delta.norm()) - 0.5) < 1e-12
    q = directions
    assert rel_err(q @ (q.T @ delta), delta) < 1e-12      # the change lies in the subspace


def test_partial_parameters_round_trip_and_frozen_stay() -> None:
    case = make_case("mlp")
    flat = flat_parameters(case.model, "fc2.*")
    assert flat.numel() == 7 * 3 + 3
    back = unflatten_parameters(case.model, flat, "fc2.*")
    assert set(back) == {"fc2.weight", "fc2.bias"}
    assert torch.equal(back["fc2.weight"], case.model.fc2.weight.detach())
    values, _ = ablated_parameters(case.model, torch.eye(flat.numel(), 2, dtype=torch.float64),
                                   params="fc2.*")
    assert float(values["fc2.weight"].reshape(-1)[:2].abs().max()) < 1e-15


def test_random_subspace_is_orthonormal_and_seeded() -> None:
    a = random_subspace(20, 5, seed=3)
    assert rel_err(a.T @ a, torch.eye(5, dtype=torch.float64)) < 1e-12
    assert torch.equal(a, random_subspace(20, 5, seed=3))
    assert not torch.equal(a, random_subspace(20, 5, seed=4))


def test_bad_shapes_name_the_argument() -> None:
    case = make_case("mlp")
    with pytest.raises(ValueError, match="vectors must be"):
        weight_space_directions(case.model, case.x1, torch.randn(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="output="):
        weight_space_directions(case.model, case.x1, torch.randn(18, 1), output="mean_logit")
    with pytest.raises(ValueError, match="directions must be"):
        ablated_parameters(case.model, torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="flat has shape"):
        unflatten_parameters(case.model, torch.zeros(3))
    with pytest.raises(ValueError, match="k="):
        random_subspace(4, 5, seed=0)


@pytest.mark.parametrize("name", ["mlp", "frozen"])
def test_dense_jacobian_is_the_explicit_one_and_gives_the_full_ntk(name: str) -> None:
    case = make_case(name, torch.float32)
    J = dense_jacobian(case.model, case.x1)
    assert J.dtype == torch.float64
    double = make_case(name)
    assert rel_err(J, explicit_jacobian(double)) < 1e-6
    k4 = brute_force_ntk(double.model, double.x1)                  # (N, C, N, C)
    assert rel_err(J @ J.T, k4.reshape(J.shape[0], J.shape[0])) < 1e-6
    assert J.shape[1] == flat_parameters(case.model).numel()


def test_random_ablations_are_seeded_random_subspaces_of_the_given_norm() -> None:
    case = make_case("mlp")
    theta = flat_parameters(case.model)
    draws = list(random_ablations(case.model, 3, 0.25, n_draws=4, seed=10))
    assert len(draws) == 4
    for i, values in enumerate(draws):
        flat = torch.cat([values[name].reshape(-1) for name in values])
        assert abs(float((flat - theta).norm()) - 0.25) < 1e-10
        basis = random_subspace(theta.numel(), 3, seed=10 + i)
        change = flat - theta                          # inside the random subspace
        assert rel_err(basis @ (basis.T @ change), change) < 1e-10
    assert not torch.equal(draws[0]["fc1.weight"], draws[1]["fc1.weight"])
    with pytest.raises(ValueError, match="k=0"):                  # at the call, not later
        random_ablations(case.model, 0, 0.25, n_draws=4)
