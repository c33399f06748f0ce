"""``top_eigenpairs`` against dense eigh, and ``find_cliffs`` on planted spectra."""

from __future__ import annotations

import numpy as np
import pytest
import threadpoolctl
import torch
from ntk_references import make_case
from scipy.sparse.linalg import LinearOperator, aslinearoperator

from entk_helpers import Cliff, find_cliffs, ntk_operator, top_eigenpairs


def psd_matrix(n: int, spectrum: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(n, n)`` symmetric with the given eigenvalues (padded with zeros) in a random basis."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    values = np.zeros(n)
    values[: spectrum.size] = spectrum
    return (basis * values) @ basis.T


def decaying(n: int) -> np.ndarray:
    """A well-separated spectrum, like an eNTK's top: 1, 0.8, 0.64, ..."""
    return 0.8 ** np.arange(n)


class CountingOperator(LinearOperator):
    """A matrix as an operator that counts the vectors it is applied to (``n_matvecs``)."""

    def __init__(self, matrix: np.ndarray) -> None:
        self.matrix = matrix
        self.n_matvecs = 0
        super().__init__(dtype=np.float64, shape=matrix.shape)

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        self.n_matvecs += x.shape[1]
        return self.matrix @ x

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(x.reshape(-1, 1)).reshape(-1)


def subspace_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``||P_a - P_b||_2`` for orthonormal column bases: the sine of the largest angle."""
    return float(np.linalg.norm(a @ a.T - b @ b.T, ord=2))


def test_dense_matches_numpy_eigh() -> None:
    matrix = psd_matrix(40, decaying(40) + 0.1)
    result = top_eigenpairs(torch.as_tensor(matrix), k=10)
    values, vectors = np.linalg.eigh(matrix)
    assert result.method == "dense"
    np.testing.assert_allclose(result.values.numpy(), values[::-1][:10], rtol=1e-12)
    assert np.all(np.diff(result.values.numpy()) < 0)
    for i in range(10):  # each eigenvector up to sign
        assert abs(result.vectors[:, i].numpy() @ vectors[:, -1 - i]) > 1 - 1e-10
    np.testing.assert_allclose(result.vectors.T @ result.vectors, np.eye(10), atol=1e-12)
    assert result.residuals.max() < 1e-12
    assert top_eigenpairs(matrix, k=3).values.shape == (3,)  # numpy input too
    flipped = vectors[:, ::-1]  # a numpy view with negative strides
    assert top_eigenpairs(flipped.T @ matrix @ flipped, k=2).values.shape == (2,)


@pytest.mark.parametrize("method,options", [
    ("lanczos", {}),
    ("lanczos", {"max_steps": 60}),
    ("block_lanczos", {"max_steps": 60, "block_size": 5}),
    ("block", {"tol": 1e-9}),
])
def test_iterative_methods_agree_with_dense_eigh(method: str, options: dict) -> None:
    n, k = 300, 12
    matrix = psd_matrix(n, decaying(60))
    op = CountingOperator(matrix)
    result = top_eigenpairs(op, k=k, method=method, **options)
    dense = top_eigenpairs(matrix, k=k)
    assert result.method == method
    np.testing.assert_allclose(result.values.numpy(), dense.values.numpy(), rtol=1e-7)
    for size in (1, 4, k):  # leading subspaces
        assert subspace_distance(result.vectors[:, :size].numpy(),
                                 dense.vectors[:, :size].numpy()) < 1e-5
    lam = result.values.numpy()
    actual = np.linalg.norm(matrix @ result.vectors.numpy() - result.vectors.numpy() * lam,
                            axis=0)
    assert np.all(actual < 1e-6 * lam[0])
    np.testing.assert_allclose(result.residuals.numpy(), actual, atol=1e-8 * lam[0])
    assert result.n_matvecs == op.n_matvecs > 0


def test_fixed_step_lanczos_residuals_are_honest_when_not_converged() -> None:
    """Too few steps: the reported residuals are large, and they are the true ones."""
    matrix = psd_matrix(200, 1.0 / np.arange(1, 201) ** 0.3)
    result = top_eigenpairs(aslinearoperator(matrix), k=5, method="lanczos", max_steps=8)
    lam, vec = result.values.numpy(), result.vectors.numpy()
    actual = np.linalg.norm(matrix @ vec - vec * lam, axis=0)
    np.testing.assert_allclose(result.residuals.numpy(), actual, rtol=1e-6, atol=1e-12)
    assert actual.max() > 1e-3


def test_block_lanczos_calls_the_operator_once_per_block_and_reports_exact_residuals() -> None:
    """Few products (24 for k = 6 of a slow spectrum): not converged, and the residuals
    reported are the true ones (computed from the kept products, no extra calls)."""
    matrix = psd_matrix(200, 1.0 / np.arange(1, 201) ** 0.3)
    calls = []
    op = LinearOperator(matrix.shape, matvec=lambda x: matrix @ x,
                        matmat=lambda x: calls.append(x.shape[1]) or matrix @ x)
    result = top_eigenpairs(op, k=6, method="block_lanczos", max_steps=24, block_size=4)
    assert calls == [4] * 6
    lam, vec = result.values.numpy(), result.vectors.numpy()
    np.testing.assert_allclose(vec.T @ vec, np.eye(6), atol=1e-10)
    actual = np.linalg.norm(matrix @ vec - vec * lam, axis=0)
    np.testing.assert_allclose(result.residuals.numpy(), actual, rtol=1e-8, atol=1e-12)
    assert actual.max() > 1e-4
    with pytest.raises(ValueError, match="fewer than k=6"):
        top_eigenpairs(op, k=6, method="block_lanczos", max_steps=4, block_size=2)


def test_lanczos_on_an_ntk_operator_matches_the_dense_kernel() -> None:
    case = make_case("transformer")
    op = ntk_operator(case.model, case.x1, select=case.select)  # (30, 30)
    dense = top_eigenpairs(op.to_dense(), k=5)
    for method in ("lanczos", "block"):
        result = top_eigenpairs(op, k=5, method=method)
        np.testing.assert_allclose(result.values.numpy(), dense.values.numpy(), rtol=1e-6)
        assert subspace_distance(result.vectors.numpy(), dense.vectors.numpy()) < 1e-4
        assert result.relative_residuals.max() < 1e-5
        assert result.n_matvecs > 0


def test_warm_start_converges_faster() -> None:
    """Eigenvectors of a nearby kernel (the previous checkpoint) as the start block."""
    n, k = 400, 10
    rng = np.random.default_rng(1)
    before = psd_matrix(n, decaying(80), seed=3)
    noise = rng.standard_normal((n, n))
    after = before + 1e-6 * (noise + noise.T)
    previous = top_eigenpairs(before, k=k).vectors
    counts = {}
    for label, v0 in (("cold", None), ("warm", previous)):
        op = CountingOperator(after)
        result = top_eigenpairs(op, k=k, method="block", v0=v0, tol=1e-8)
        assert result.relative_residuals.max() < 1e-6
        counts[label] = op.n_matvecs
    # the block carries a few random guard vectors, which a warm start cannot supply
    assert counts["warm"] < 0.8 * counts["cold"], counts
    auto = top_eigenpairs(CountingOperator(after), k=k, v0=previous)
    assert auto.method == "block"
    exact = top_eigenpairs(after, k=k)
    np.testing.assert_allclose(auto.values.numpy(), exact.values.numpy(), rtol=1e-6)
    warm_lanczos = top_eigenpairs(CountingOperator(after), k=k, method="lanczos", v0=previous)
    np.testing.assert_allclose(warm_lanczos.values.numpy(), exact.values.numpy(), rtol=1e-8)


def test_k_larger_than_the_dimension_is_refused() -> None:
    matrix = psd_matrix(6, decaying(6))
    with pytest.raises(ValueError, match="k must be 1..6"):
        top_eigenpairs(matrix, k=7)
    with pytest.raises(ValueError, match="k must be"):
        top_eigenpairs(matrix, k=0)
    with pytest.raises(ValueError, match="to_dense"):
        top_eigenpairs(aslinearoperator(matrix), k=6, method="lanczos")
    assert top_eigenpairs(matrix, k=6).values.shape == (6,)


def test_other_bad_inputs() -> None:
    with pytest.raises(ValueError, match="square"):
        top_eigenpairs(np.zeros((4, 3)), k=1)
    with pytest.raises(ValueError, match="not symmetric"):
        top_eigenpairs(np.triu(np.ones((5, 5))), k=2)
    # a float32 kernel cast to float64 keeps float32 round-off in K - K^T: still accepted
    features = torch.randn(50, 20, dtype=torch.float64)
    kernel = features @ features.T
    roundoff = 1e-6 * kernel.abs().max() * torch.randn(50, 50, dtype=torch.float64)
    assert top_eigenpairs(kernel + roundoff, k=2).values[0] > 0
    with pytest.raises(ValueError, match="needs a matrix"):
        top_eigenpairs(aslinearoperator(np.eye(5)), k=2, method="dense")
    with pytest.raises(ValueError, match="choose one of"):
        top_eigenpairs(np.eye(5), k=2, method="power")


# ------------------------------------------------------------------------------- cliffs


def planted_spectrum(rng: np.random.Generator) -> np.ndarray:
    """Blocks of 2, 4, 6 near-equal values, each 5x below the previous, then a smooth tail."""
    blocks = [level * (1 + 0.02 * rng.standard_normal(size))
              for level, size in ((100.0, 2), (20.0, 4), (4.0, 6))]
    tail = 0.8 * (np.arange(60) / 8 + 1) ** -0.5
    return np.sort(np.concatenate([*blocks, tail]))[::-1]


def test_find_cliffs_finds_planted_cliffs() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        cliffs = find_cliffs(planted_spectrum(rng))
        assert [(c.start, c.stop) for c in cliffs] == [(0, 2), (2, 6), (6, 12)]
        assert all(3.5 < c.drop < 7 for c in cliffs)
    assert cliffs[1].size == 4 and cliffs[1].indices == slice(2, 6)
    lam = torch.as_tensor(planted_spectrum(rng).copy())
    assert [c.stop for c in find_cliffs(lam, max_index=8)] == [2, 6]
    ascending = np.sort(planted_spectrum(rng))
    assert len(find_cliffs(ascending[::-1])) == 3  # a reversed view (negative strides)


def test_find_cliffs_ignores_numerical_zeros() -> None:
    lam = np.concatenate([[10.0, 10.0, 10.0], [1.0, 0.99, 0.98, 0.97], np.zeros(50)])
    assert find_cliffs(lam) == [Cliff(0, 3, pytest.approx(10.0))]


@pytest.mark.parametrize("spectrum", [
    (np.arange(100) + 10.0) ** -1.5,  # power law
    0.9 ** np.arange(100),  # geometric
    np.linspace(5.0, 1.0, 50),  # linear
])
def test_find_cliffs_reports_nothing_in_a_smooth_spectrum(spectrum: np.ndarray) -> None:
    assert find_cliffs(spectrum) == []


def test_find_cliffs_bad_input() -> None:
    with pytest.raises(ValueError, match="descending"):
        find_cliffs(np.arange(10.0))
    with pytest.raises(ValueError, match="at least 3"):
        find_cliffs(np.array([2.0, 1.0]))


@pytest.mark.parametrize("method", ["lanczos", "block_lanczos", "block"])
def test_matrix_free_solves_run_numpy_blas_on_one_thread(method: str) -> None:
    # numpy's BLAS workers spin after each call and would take the cores from the products
    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpoolctl.threadpool_info()
                if pool["user_api"] == "blas"}

    matrix = psd_matrix(60, decaying(60))
    seen: set[int] = set()

    def matmat(x: np.ndarray) -> np.ndarray:
        seen.update(blas_threads())
        return matrix @ x

    operator = LinearOperator(matrix.shape, matvec=matmat, matmat=matmat, dtype=np.float64)
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        result = top_eigenpairs(operator, 4, method=method, max_steps=40)
        assert blas_threads() == before
    assert seen == {1}
    np.testing.assert_allclose(result.values.numpy(), decaying(4), rtol=1e-6)


# ---------------------------------------- bad input and reproducibility (issue 17: each
# test below failed on the code before it)

ALL_ITERATIVE = [("lanczos", {}), ("lanczos", {"max_steps": 30}),
                 ("block_lanczos", {"max_steps": 30}), ("block", {})]


@pytest.mark.parametrize("method,options", ALL_ITERATIVE)
def test_a_non_symmetric_operator_or_matrix_is_refused(method: str, options: dict) -> None:
    """Guards: Lanczos on a non-symmetric operator returned residuals around 3, the block
    method accepted a non-symmetric matrix."""
    rng = np.random.default_rng(0)
    symmetric = psd_matrix(60, decaying(60))
    skewed = symmetric + 0.3 * np.triu(rng.standard_normal((60, 60)), 1)
    with pytest.raises(ValueError, match="not symmetric"):
        top_eigenpairs(aslinearoperator(skewed), k=3, method=method, **options)
    with pytest.raises(ValueError, match="not symmetric"):
        top_eigenpairs(skewed, k=3, method=method, **options)
    result = top_eigenpairs(aslinearoperator(symmetric), k=3, method=method, **options)
    np.testing.assert_allclose(result.values.numpy(), decaying(3), rtol=1e-5)


@pytest.mark.parametrize("method,options", [("dense", {}), *ALL_ITERATIVE])
def test_a_kernel_with_nan_or_inf_is_refused(method: str, options: dict) -> None:
    """Guards: a kernel with inf gave NaN eigenvalues (dense: eigh 'failed to converge')."""
    for bad in (np.inf, np.nan):
        matrix = psd_matrix(40, decaying(40))
        matrix[3, 5] = matrix[5, 3] = bad
        with pytest.raises(ValueError, match="NaN / inf"):
            top_eigenpairs(torch.as_tensor(matrix), k=3, method=method, **options)
        if method != "dense":
            with pytest.raises(ValueError, match="NaN / inf"):
                top_eigenpairs(aslinearoperator(matrix), k=3, method=method, **options)


@pytest.mark.parametrize("method,options", ALL_ITERATIVE)
def test_a_start_vector_of_the_wrong_length_is_refused(method: str, options: dict) -> None:
    """Guards: a v0 of the wrong length went to ARPACK (it once crashed the interpreter)."""
    matrix = psd_matrix(50, decaying(50))
    for v0 in (np.ones(49), np.ones((51, 2)), np.ones((50, 2, 1)), np.zeros(50),
               np.full(50, np.nan)):
        with pytest.raises(ValueError, match="v0"):
            top_eigenpairs(aslinearoperator(matrix), k=3, method=method, v0=v0, **options)


def test_k_must_be_an_integer() -> None:
    """Guards: k=2.5 failed inside the solver ('slice indices must be integers')."""
    matrix = psd_matrix(10, decaying(10))
    for bad in (2.5, "3", True):
        with pytest.raises(TypeError, match="k=.*integer"):
            top_eigenpairs(matrix, k=bad)
    assert top_eigenpairs(matrix, k=np.int64(3)).values.shape == (3,)


@pytest.mark.parametrize("method,options", [("dense", {}), *ALL_ITERATIVE])
def test_the_same_call_gives_the_same_sign_fixed_vectors(method: str, options: dict) -> None:
    """Guards: top_eigenpairs(op, seed=0) ignored its seed on the default route (ARPACK's own
    random start), so three identical calls gave eigenvectors whose signs flipped."""
    matrix = psd_matrix(80, decaying(80), seed=2)
    target = matrix if method == "dense" else aslinearoperator(matrix)
    runs = [top_eigenpairs(target, k=4, method=method, seed=0, **options) for _ in range(3)]
    for run in runs[1:]:
        assert torch.equal(run.vectors, runs[0].vectors)
    vectors = runs[0].vectors.numpy()
    columns = np.arange(vectors.shape[1])
    assert np.all(vectors[np.abs(vectors).argmax(axis=0), columns] > 0)
    _, exact = np.linalg.eigh(matrix)
    for i in range(4):  # the sign convention applied to the exact eigenvectors
        reference = exact[:, -1 - i] * np.sign(exact[np.abs(exact[:, -1 - i]).argmax(), -1 - i])
        np.testing.assert_allclose(vectors[:, i], reference, atol=1e-5)
