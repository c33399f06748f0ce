"""``ntk_operator``: matrix-free products against the brute-force kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ntk_references import assert_close, brute_force_ntk, make_case, reduce_kernel, rel_err
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor, nn

from entk_helpers import MemoryBudgetError, memory_budget, ntk_operator

OUTPUTS = ("full", "trace", "mean_logit")


@pytest.mark.parametrize("name", ["mlp", "tied", "frozen", "embedding", "transformer"])
@pytest.mark.parametrize("output", OUTPUTS)
def test_products_match_brute_force(name: str, output: str) -> None:
    case = make_case(name)
    expected = reduce_kernel(case.reference(), output)
    op = ntk_operator(case.model, case.x1, output=output, select=case.select, chunk_size=2)
    assert isinstance(op, LinearOperator)
    assert op.shape == expected.shape and op.dtype == np.float64
    rng = np.random.default_rng(0)
    v = rng.standard_normal(op.shape[0])
    block = rng.standard_normal((op.shape[0], 3))
    dense = expected.numpy()
    assert rel_err(torch.as_tensor(op.matvec(v)), torch.as_tensor(dense @ v)) < 1e-10
    assert rel_err(torch.as_tensor(op @ block), torch.as_tensor(dense @ block)) < 1e-10
    assert rel_err(torch.as_tensor(op.rmatvec(v)), torch.as_tensor(dense @ v)) < 1e-10
    assert_close(op.to_dense(), expected)
    torch_block = op.matmat_torch(torch.as_tensor(block))
    assert torch.is_tensor(torch_block) and torch_block.dtype == torch.float64
    assert_close(torch_block, expected @ torch.as_tensor(block))


def test_chunk_size_does_not_change_products_and_n_matvecs_counts() -> None:
    case = make_case("transformer")
    block = torch.randn(case.x1.shape[0] * 6, 4, dtype=torch.float64)
    results = []
    for chunk_size in (1, 2, 5, None):
        op = ntk_operator(case.model, case.x1, select=case.select, chunk_size=chunk_size)
        results.append(op.matmat_torch(block))
        assert op.n_matvecs == 4
    for other in results[1:]:
        assert rel_err(other, results[0]) < 1e-12


def test_float32_model_within_1e_4() -> None:
    case = make_case("mlp", torch.float32)
    expected = reduce_kernel(make_case("mlp").reference(), "full")
    op = ntk_operator(case.model, case.x1)
    assert_close(op.to_dense(), expected, torch.float32)
    v = np.random.default_rng(0).standard_normal(op.shape[0])
    out = op.matvec(v)
    assert out.dtype == np.float64
    assert rel_err(torch.as_tensor(out), expected @ torch.as_tensor(v)) < 1e-4


def test_operator_agrees_with_empirical_ntk_on_the_paper_mlp_shape() -> None:
    """The modular MLP at a small modulus: what the benchmark does at p = 29."""
    from entk_helpers import empirical_ntk
    from entk_helpers.experiments.modular import ModularMLP, modular_addition_data

    pairs, _ = modular_addition_data(5)
    model = ModularMLP(5, width=16).double()
    op = ntk_operator(model, pairs, output="trace")
    assert_close(op.to_dense(), empirical_ntk(model, pairs, output="trace"))


def test_bad_inputs_are_refused_with_advice() -> None:
    case = make_case("attention")
    with pytest.raises(ValueError, match="select="):
        ntk_operator(case.model, case.x1)  # (N, T, C) outputs
    mlp = make_case("mlp")
    with pytest.raises(ValueError, match="no parameter of the model matches"):
        ntk_operator(mlp.model, mlp.x1, params="nothing.*")
    bad = mlp.x1.clone()
    bad[-1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        ntk_operator(mlp.model, bad, chunk_size=2)  # the bad row is in the last chunk
    with pytest.raises(ValueError, match="choose one of"):
        ntk_operator(mlp.model, mlp.x1, output="diag")


def test_to_dense_respects_the_memory_budget() -> None:
    case = make_case("mlp")
    op = ntk_operator(case.model, case.x1)
    with memory_budget("1KB"), pytest.raises(MemoryBudgetError) as err:
        op.to_dense()
    assert "matrix-free" in str(err.value) and "top_eigenpairs" in str(err.value)
    assert op.to_dense().shape == op.shape  # the budget is back


def test_scipy_sees_a_symmetric_operator() -> None:
    """``op.H`` and ``rmatvec`` are what scipy's solvers use for the adjoint: they must apply
    the brute-force kernel's transpose (before issue 17 this test checked ``op.H is op`` or
    compared the operator with its own ``to_dense``, so it could not fail)."""
    case = make_case("mlp")
    op = ntk_operator(case.model, case.x1, output="trace")
    dense = reduce_kernel(case.reference(), "trace").numpy()  # independent of the operator
    rng = np.random.default_rng(0)
    v = rng.standard_normal((op.shape[0], 3))
    np.testing.assert_allclose(op.H @ v, dense.T @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(op.rmatvec(v[:, 0]), dense.T @ v[:, 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(op.rmatmat(v), dense.T @ v, rtol=1e-10, atol=1e-12)
    values = eigsh(op, k=2, which="LA", v0=np.ones(op.shape[0]), return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(values), np.linalg.eigvalsh(dense)[-2:], rtol=1e-8)


# ------------------------------------------------ input validation (issue 17: each test
# below failed on the code before it)


class SqrtAtZero(nn.Module):
    """``sqrt(|W x + b|)``: finite outputs at x = 0 with b = 0, NaN gradients there."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        nn.init.zeros_(self.lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x).abs().sqrt()


def test_zero_examples_and_non_finite_products_are_refused() -> None:
    """Guards: zero examples built a 0 x 0 operator; NaN gradients (finite outputs) gave NaN
    products without a word. The probe: one product on two examples at construction."""
    mlp = make_case("mlp")
    with pytest.raises(ValueError, match="inputs has no examples"):
        ntk_operator(mlp.model, mlp.x1[:0])
    model = SqrtAtZero().double()
    with pytest.raises(ValueError, match="NaN / inf"):
        ntk_operator(model, torch.zeros(4, 3, dtype=torch.float64))
    fine = torch.ones(4, 3, dtype=torch.float64)
    op = ntk_operator(model, torch.cat([fine, torch.zeros(1, 3, dtype=torch.float64)]))
    with pytest.raises(ValueError, match="NaN / inf"):  # the bad example is not probed
        op.matvec(np.ones(op.shape[0]))


def test_operator_inputs_chunks_and_models_are_checked_as_for_kernels() -> None:
    """Guards: a list, float32 inputs to a float64 model, chunk_size=-1, a select that mixes
    examples, and a train-mode model with dropout (whose products differ from call to call)."""
    case = make_case("mlp")
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor"):
        ntk_operator(case.model, list(case.x1))
    with pytest.raises(TypeError, match="inputs is torch.float32"):
        ntk_operator(case.model, case.x1.float())
    with pytest.raises(ValueError, match="chunk_size=-1"):
        ntk_operator(case.model, case.x1, chunk_size=-1)
    with pytest.raises(ValueError, match="depend on the other examples"):
        ntk_operator(case.model, case.x1, select=lambda o: o - o.mean(0))
    dropout = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    with pytest.raises(ValueError, match=r"train mode.*model\.eval\(\)"):
        ntk_operator(dropout, case.x1)
    dropout.eval()
    expected = reduce_kernel(brute_force_ntk(dropout, case.x1), "full")
    assert_close(ntk_operator(dropout, case.x1).to_dense(), expected)
