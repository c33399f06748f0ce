"""Top eigenpairs of kernels and operators, and the spectral cliffs among them.

:func:`top_eigenpairs` takes a dense symmetric matrix or a matrix-free operator and returns
the largest eigenvalues with their eigenvectors and residual norms ``||A v - lambda v||``, so
a reader can see how converged a matrix-free answer is. Methods: dense ``eigh``; Lanczos
(scipy's restarted ``eigsh``, or a fixed number of steps with full reorthogonalisation as
in the paper); block Lanczos, the same Krylov method on a block of vectors per
``matmat`` call (worth it where one pass over several vectors costs less than several
passes, e.g. on a GPU), which keeps its products and so reports exact residuals at no extra
cost (block size 1 included); a block method (LOBPCG) that warm-starts from earlier eigenvectors,
which is what tracking a spectrum over training checkpoints wants.

:func:`find_cliffs` finds blocks of eigenvalues separated by sharp drops, which the paper
picked by eye: a drop is a log-gap much larger than the typical log-gap of the spectrum.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import scipy.sparse.linalg as sla
import torch
from threadpoolctl import threadpool_limits
from torch import Tensor

from ._arrays import as_tensor

EIGEN_METHODS = ("auto", "dense", "lanczos", "block_lanczos", "block")


@dataclass
class EigenResult:
    """Top eigenpairs. ``values`` (k,) descending, ``vectors`` (n, k) orthonormal columns,
    ``residuals`` (k,) = ``||A v_i - values_i v_i||``; ``n_matvecs``: for matrix-free runs,
    the products of this solve, read from the operator's counter (``KernelOperator.n_matvecs``;
    0 for operators without one; a symmetry probe before the solve counts too)."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    method: str
    n_matvecs: int = 0

    @property
    def relative_residuals(self) -> Tensor:
        """Residuals divided by the largest eigenvalue's magnitude."""
        return self.residuals / self.values.abs().max().clamp_min(1e-300)


def top_eigenpairs(
    kernel_or_operator: Tensor | np.ndarray | sla.LinearOperator,
    k: int,
    *,
    method: str = "auto",
    tol: float | None = None,
    v0: Tensor | np.ndarray | None = None,
    max_steps: int | None = None,
    block_size: int = 5,
    seed: int = 0,
) -> EigenResult:
    """The k largest eigenvalues (descending) and eigenvectors of a symmetric kernel.

    Args:
        kernel_or_operator: ``(n, n)`` symmetric tensor / array, or a LinearOperator such as
            :func:`entk_helpers.ntk_operator`.
        k: how many eigenpairs, ``1 <= k <= n`` (``k < n`` for matrix-free methods).
        method: ``"dense"`` (eigh), ``"lanczos"``, ``"block_lanczos"``, ``"block"`` (LOBPCG)
            or ``"auto"``: dense for matrices; for operators Lanczos, or block when ``v0``
            holds several vectors.
        tol: convergence tolerance of the iterative methods (default: machine precision for
            Lanczos, 1e-7 relative for block).
        v0: warm start, ``(n,)`` or ``(n, j)`` (e.g. the previous checkpoint's eigenvectors).
        max_steps: Lanczos: run exactly this many steps without restart (the paper's recipe:
            50 steps for the top 25); block Lanczos: this many products in all, in blocks of
            ``block_size`` (default ``max(2 k, 20)``); block: at most this many iterations.
        block_size: block Lanczos only: vectors per product (one ``operator.matmat`` call).
        seed: for the random start vectors (and the operator probe): the same call gives
            the same vectors.

    Returns:
        :class:`EigenResult` (float64 tensors on the CPU for operators, on the input's device
        for dense tensors). Each eigenvector's sign is fixed: its largest-magnitude entry
        is positive.

    Raises:
        ValueError: a non-symmetric or non-finite kernel (operators are probed with two
            random vectors, except block Lanczos and fixed-step Lanczos, which check the
            symmetry of their own products), a bad ``k`` or ``v0``.
    """
    if method not in EIGEN_METHODS:
        raise ValueError(f"method={method!r}; choose one of {EIGEN_METHODS}")
    is_matrix = isinstance(kernel_or_operator, (Tensor, np.ndarray))
    if not is_matrix and not isinstance(kernel_or_operator, sla.LinearOperator):
        raise TypeError(f"kernel_or_operator is a {type(kernel_or_operator).__name__}; pass a "
                        "square tensor / array or a scipy LinearOperator (ntk_operator)")
    shape = tuple(kernel_or_operator.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"expected a square (n, n) kernel, got {shape}")
    n = shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k={k!r}: the number of eigenpairs must be an integer 1..{n}")
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"asked for k={k} eigenpairs of a {n} x {n} kernel; k must be 1..{n}")
    start = None if v0 is None else _check_v0(v0, n)
    if method == "auto":
        if is_matrix:
            method = "dense"
        else:
            method = "block" if v0 is not None and np.ndim(v0) == 2 else "lanczos"
    if method == "dense":
        if not is_matrix:
            raise ValueError("method='dense' needs a matrix; for an operator use 'lanczos' or "
                             "'block' (or operator.to_dense() when it is small)")
        matrix = as_tensor(kernel_or_operator)
        _check_finite_matrix(matrix)
        return _dense(matrix, k)
    if not is_matrix and k >= n:
        raise ValueError(f"matrix-free methods need k < n (k={k}, n={n}); use "
                         "operator.to_dense() and method='dense' for a kernel this small")
    if is_matrix:
        matrix = np.asarray(as_tensor(kernel_or_operator, torch.float64, "cpu"))
        _check_finite_matrix(torch.as_tensor(matrix))
        _check_symmetric(float(np.abs(matrix - matrix.T).max()), float(np.abs(matrix).max()),
                         _matrix_symmetry_tolerance(as_tensor(
                             kernel_or_operator).dtype), "max |K - K^T| / max |K|")
        operator = sla.aslinearoperator(matrix)
    else:
        operator = kernel_or_operator
    # numpy's BLAS on one thread: its bookkeeping here is small, and between steps its idle
    # worker threads spin and take the cores from the products' torch threads (top 25 of
    # layer 16 of Gemma-3-270M, N = 16, 2 cores: 7.8 s -> 3.9 s; benchmarks/README.md)
    rng = np.random.default_rng(seed)
    products_before = getattr(operator, "n_matvecs", 0)  # the KernelOperator counter
    with threadpool_limits(limits=1, user_api="blas"):
        if not is_matrix and not (method == "block_lanczos" or
                                  (method == "lanczos" and max_steps is not None)):
            _probe_operator(operator, rng)
        result = _iterative(operator, k, method, tol, start, max_steps, block_size, rng)
    result.n_matvecs = getattr(operator, "n_matvecs", 0) - products_before
    return result


# A product of a symmetric operator that computes in float32 inside (ntk_operator of a
# float32 model, lm.LayerNTKOperator) is symmetric to ~1e-6 relative; a non-symmetric one to
# order 1.
OPERATOR_SYMMETRY_TOL = 1e-3


def _matrix_symmetry_tolerance(dtype: torch.dtype) -> float:
    # float64 kernels are often float32 kernels cast up (float32 round-off, ~1e-7 relative);
    # a kernel of two different input sets is asymmetric at order 1.
    return 1e-4 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-5


def _check_v0(v0: Tensor | np.ndarray, n: int) -> np.ndarray:
    """``v0`` as a finite float64 ``(n,)`` or ``(n, j)`` array (ARPACK once crashed the
    interpreter on a start vector of the wrong length)."""
    if not isinstance(v0, (Tensor, np.ndarray)):
        v0 = np.asarray(v0, dtype=np.float64)
    start = np.asarray(as_tensor(v0, torch.float64, "cpu"))
    if start.ndim not in (1, 2) or start.shape[0] != n or start.size == 0:
        raise ValueError(f"v0 has shape {start.shape}; the kernel is {n} x {n}, so pass "
                         f"({n},) or ({n}, j) start vectors")
    if not np.isfinite(start).all() or not np.abs(start).max() > 0:
        raise ValueError("v0 is zero or contains NaN / inf; pass finite, nonzero start "
                         "vectors (or None for random ones)")
    return start


def _check_finite_matrix(matrix: Tensor) -> None:
    if not torch.isfinite(matrix).all():
        bad = int((~torch.isfinite(matrix)).sum())
        raise ValueError(f"the kernel has {bad} NaN / inf entries: its eigenvalues would be "
                         "meaningless. Check the model and inputs it was built from.")


def _check_symmetric(asym: float, scale: float, tolerance: float, what: str) -> None:
    if asym > tolerance * max(scale, 1e-300):
        raise ValueError(f"the kernel is not symmetric ({what} = {asym / scale:.1e}); an eNTK "
                         "of one input set with itself always is: check the inputs (a cross "
                         "kernel K(x, x') has no eigenvectors)")


def _probe_operator(operator: sla.LinearOperator, rng: np.random.Generator) -> None:
    """Two random vectors u, v: ``A [u v]`` must be finite and ``u.Av = v.Au``."""
    probe = rng.standard_normal((operator.shape[0], 2))
    images = np.asarray(operator.matmat(probe), dtype=np.float64)
    if images.shape != probe.shape or not np.isfinite(images).all():
        raise ValueError("the operator's products contain NaN / inf (or have the wrong "
                         f"shape {images.shape}): check the model and inputs it was built from")
    u, v = probe.T
    au, av = images.T
    scale = np.linalg.norm(au) * np.linalg.norm(v) + np.linalg.norm(av) * np.linalg.norm(u)
    _check_symmetric(abs(u @ av - v @ au), scale, OPERATOR_SYMMETRY_TOL,
                     "|u.Av - v.Au| / (|Au| |v|) for random u, v")


def _fix_signs(vectors: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """Each column times the sign of its largest-magnitude entry (ties: the first)."""
    if vectors.shape[1] == 0:
        return vectors
    if isinstance(vectors, Tensor):
        pick = vectors.abs().argmax(dim=0)
        signs = torch.sign(vectors[pick, torch.arange(vectors.shape[1])])
        return vectors * torch.where(signs == 0, torch.ones_like(signs), signs)
    pick = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[pick, np.arange(vectors.shape[1])])
    return vectors * np.where(signs == 0, 1.0, signs)


def _iterative(
    operator: sla.LinearOperator, k: int, method: str, tol: float | None,
    start: np.ndarray | None, max_steps: int | None, block_size: int, rng: np.random.Generator,
) -> EigenResult:
    """The matrix-free methods of :func:`top_eigenpairs` (arguments as there)."""
    n = operator.shape[0]
    if method == "block_lanczos":
        steps = max_steps if max_steps is not None else max(2 * k, 20)
        values, vectors, residuals = _block_lanczos(operator, k, steps, block_size, start, rng)
        return _result(values, vectors, residuals, method)
    if method == "lanczos":
        if max_steps is not None:
            values, vectors, residuals = _fixed_lanczos(operator, k, max_steps, start, rng)
            return _result(values, vectors, residuals, "lanczos")
        if start is not None and start.ndim == 2:
            start = start.sum(axis=1)
        if start is None:  # ARPACK's own start is drawn from OS entropy (scipy >= 1.15)
            start = rng.uniform(-1.0, 1.0, n)
        values, vectors = sla.eigsh(operator, k=k, which="LA", tol=tol or 0.0, v0=start,
                                    ncv=min(n, max(2 * k + 1, 20)))
    else:
        values, vectors = _lobpcg(operator, k, start, tol, max_steps, rng)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    residuals = np.linalg.norm(operator.matmat(vectors) - vectors * values, axis=0)
    return _result(values, vectors, residuals, method)


def _result(values, vectors, residuals, method: str) -> EigenResult:
    if not (np.isfinite(values).all() and np.isfinite(vectors).all()):
        raise ValueError(f"{method} returned NaN / inf eigenpairs: the operator's products "
                         "are not finite; check the model and inputs it was built from")
    return EigenResult(
        as_tensor(values),
        as_tensor(_fix_signs(vectors)),
        as_tensor(residuals),
        method,
    )


def _dense(matrix: Tensor, k: int) -> EigenResult:
    _check_symmetric(float((matrix - matrix.T).abs().max()), float(matrix.abs().max()),
                     _matrix_symmetry_tolerance(matrix.dtype), "max |K - K^T| / max |K|")
    try:
        values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    except RuntimeError as err:  # torch.linalg.LinAlgError: ill-conditioned beyond repair
        raise ValueError(f"the dense eigensolver failed on this kernel ({err}); check it for "
                         "huge or tiny entries (scale it) before calling top_eigenpairs") from err
    values, vectors = values.flip(0)[:k], _fix_signs(vectors.flip(1)[:, :k])
    residuals = torch.linalg.vector_norm(matrix @ vectors - vectors * values, dim=0)
    return EigenResult(values, vectors, residuals, "dense")


def _fixed_lanczos(
    operator: sla.LinearOperator, k: int, steps: int, start: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``steps`` Lanczos steps with full reorthogonalisation; Ritz pairs and residual norms.

    The residual of a Ritz pair (theta, V s) is exactly ``|beta_m * s_m|`` in exact
    arithmetic; full reorthogonalisation keeps it close in floating point. Symmetry is checked
    on the way at no cost: for a symmetric operator ``q_i . A q_j`` is ``beta_{j-1}`` for
    ``i = j - 1`` and 0 below.
    """
    n = operator.shape[0]
    steps = min(max(steps, k), n)
    v = rng.standard_normal(n) if start is None else (
        start.sum(axis=1) if start.ndim == 2 else start.copy())
    basis = np.zeros((n, steps))
    alpha, beta = np.zeros(steps), np.zeros(steps)
    basis[:, 0] = v / np.linalg.norm(v)
    m = steps
    asym = 0.0
    for j in range(steps):
        w = np.asarray(operator.matvec(basis[:, j]), dtype=np.float64).reshape(-1)
        if not np.isfinite(w).all():
            raise ValueError("the operator's products contain NaN / inf: check the model and "
                             "inputs it was built from")
        coefficients = basis[:, : j + 1].T @ w
        alpha[j] = coefficients[j]
        if j:
            coefficients[j - 1] -= beta[j - 1]
            asym = max(asym, float(np.abs(coefficients[:j]).max()))
        w -= basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        w -= basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        beta[j] = np.linalg.norm(w)
        if j + 1 == steps:
            break
        if beta[j] < 1e-12 * max(1.0, abs(alpha[: j + 1]).max()):
            m = j + 1  # invariant subspace found: the Ritz pairs are exact
            break
        basis[:, j + 1] = w / beta[j]
    _check_symmetric(asym, max(np.abs(alpha[:m]).max(), beta[: m].max()),
                     OPERATOR_SYMMETRY_TOL, "max |q_i . A q_j - q_j . A q_i| / ||T||")
    if m < k:
        raise ValueError(f"the Krylov space stopped at dimension {m} < k={k}: the kernel has "
                         "rank below k from this start vector; ask for fewer eigenpairs")
    tri = np.diag(alpha[:m]) + np.diag(beta[: m - 1], 1) + np.diag(beta[: m - 1], -1)
    theta, s = np.linalg.eigh(tri)
    order = np.argsort(theta)[::-1][:k]
    residuals = np.abs(beta[m - 1] * s[m - 1, order])
    return theta[order], basis[:, :m] @ s[:, order], residuals


def _block_lanczos(
    operator: sla.LinearOperator, k: int, steps: int, block: int, start: np.ndarray | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block Lanczos: ``ceil(steps / block)`` products of ``block`` vectors, full
    reorthogonalisation, then Rayleigh-Ritz on the whole Krylov basis.

    The products ``A Q_j`` are kept, so the residuals ``||A v - theta v||`` of the Ritz pairs
    are computed exactly (``A V = (A Q) S``), without further products.
    """
    n = operator.shape[0]
    if block < 1:
        raise ValueError(f"block_size={block}; it must be at least 1")
    block = min(block, n)
    n_blocks = max(1, min(-(-steps // block), n // block))
    if n_blocks * block < k:
        raise ValueError(f"{n_blocks} blocks of {block} vectors span fewer than k={k} "
                         "dimensions; ask for more steps")
    Q = rng.standard_normal((n, block))
    if start is not None:
        columns = start.reshape(n, -1)[:, :block]
        Q[:, : columns.shape[1]] = columns
    Q = np.linalg.qr(Q)[0]
    basis: list[np.ndarray] = []
    images: list[np.ndarray] = []
    for j in range(n_blocks):
        AQ = np.asarray(operator.matmat(Q), dtype=np.float64)
        if not np.isfinite(AQ).all():
            raise ValueError("the operator's products contain NaN / inf: check the model and "
                             "inputs it was built from")
        basis.append(Q)
        images.append(AQ)
        if j + 1 == n_blocks:
            break
        B = np.hstack(basis)
        W = AQ - B @ (B.T @ AQ)
        W -= B @ (B.T @ W)
        Q, R = np.linalg.qr(W)
        lost = np.abs(np.diag(R)) < 1e-12 * max(1.0, np.abs(images[0]).max())
        if lost.any():  # the Krylov space closed in some directions: continue with random ones
            fresh = rng.standard_normal((n, int(lost.sum())))
            for _ in range(2):
                fresh -= B @ (B.T @ fresh)
                fresh -= Q[:, ~lost] @ (Q[:, ~lost].T @ fresh)
            Q[:, lost] = np.linalg.qr(fresh)[0]
    B, AB = np.hstack(basis), np.hstack(images)
    H = B.T @ AB  # symmetric exactly when the operator is (on the Krylov space)
    _check_symmetric(float(np.abs(H - H.T).max()), float(np.abs(H).max()),
                     OPERATOR_SYMMETRY_TOL, "max |Q^T A Q - (Q^T A Q)^T| / max |Q^T A Q|")
    theta, S = np.linalg.eigh((H + H.T) / 2)
    order = np.argsort(theta)[::-1][:k]
    vectors, images_of_vectors = B @ S[:, order], AB @ S[:, order]
    residuals = np.linalg.norm(images_of_vectors - vectors * theta[order], axis=0)
    return theta[order], vectors, residuals


def _lobpcg(
    operator: sla.LinearOperator, k: int, start: np.ndarray | None, tol: float | None,
    max_steps: int | None, rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    n = operator.shape[0]
    block = min(n - 1, k + max(2, k // 4))  # a few guard vectors speed convergence
    x0 = rng.standard_normal((n, block))
    if start is not None:
        start = start.reshape(n, -1)[:, :block]
        x0[:, : start.shape[1]] = start
    values, vectors = sla.lobpcg(operator, x0, largest=True, tol=tol or 1e-7,
                                 maxiter=max_steps or 200)
    order = np.argsort(values)[::-1][:k]
    return values[order], vectors[:, order]


@dataclass(frozen=True)
class Cliff:
    """Eigenvalues ``start .. stop-1`` form a block; ``drop`` = lambda[stop-1] / lambda[stop]."""

    start: int
    stop: int
    drop: float

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def indices(self) -> slice:
        return slice(self.start, self.stop)


def find_cliffs(
    eigenvalues: Tensor | np.ndarray,
    *,
    min_drop: float = 1.1,
    relative_drop: float = 20.0,
    window: int = 10,
    max_index: int | None = None,
    floor: float = 1e-8,
) -> list[Cliff]:
    """Blocks of eigenvalues that each end in a sharp drop, from the top down.

    On a log scale, a gap ``log(lambda_i / lambda_{i+1})`` is a drop when it is at least
    ``log(min_drop)`` and at least ``relative_drop`` times the typical gap *inside a block
    next to it*: the median of up to ``window`` gaps above it (back to the previous drop) or
    of up to ``window`` below it (down to the next drop), whichever is smaller, i.e. the
    flatter neighbour. So a drop is the end of a flat block, whether a block or a smooth tail
    follows. Drops are accepted largest first and the neighbourhoods re-read after each, so a
    big drop never hides a smaller one next to it. A gap judged against its own neighbourhood
    keeps smooth spectra free of blocks, whatever their overall slope: in a power law or a
    Marchenko-Pastur spectrum each gap is about as large as its neighbours, while a block edge
    is tens of times larger than the gaps inside the block it ends, even when it is a modest
    ratio (the paper's MLP: x1.5 after its second 56-block). ``benchmarks/bench_cliffs.py``
    measures the defaults on spectra they were not tuned on (Marchenko-Pastur, power laws,
    planted noisy blocks, the MLP at six seeds) beside the rule used before.

    Eigenvalues below ``floor * lambda_0`` count as numerically zero and are ignored. The
    blocks between consecutive drops are returned; what follows the last drop (a smooth tail)
    is not a cliff.

    Args:
        eigenvalues: (n,) in descending order, finite.
        min_drop: the smallest ratio ``lambda_i / lambda_{i+1}`` that can be a drop (> 1).
        relative_drop: how many times the typical gap in the flatter neighbouring block a
            drop must be (>= 1).
        window: how many gaps on each side make up the neighbourhood (>= 1).
        max_index: look only at the top ``max_index`` eigenvalues (None: all).
        floor: relative level below which eigenvalues are treated as zero, in [0, 1).

    Returns:
        ``[Cliff(start, stop, drop), ...]`` in order. A top mode on its own is a cliff of size 1.
    """
    _check_cliff_settings(min_drop, relative_drop, window, max_index, floor)
    lam = np.asarray(as_tensor(eigenvalues, torch.float64, "cpu"))
    if lam.ndim != 1 or lam.size < 3:
        raise ValueError(f"eigenvalues: find_cliffs needs a 1-D array of at least 3 values, got "
                         f"shape {lam.shape}")
    bad = np.flatnonzero(~np.isfinite(lam))
    if bad.size:
        raise ValueError(f"eigenvalues: {bad.size} value(s) are NaN or infinite (first at index "
                         f"{int(bad[0])}): check the kernel or the eigensolver's output")
    if np.any(np.diff(lam) > 1e-9 * abs(lam[0])):
        raise ValueError("eigenvalues must be sorted in descending order")
    keep = lam > floor * lam[0]
    lam = lam[: int(np.argmin(keep)) if not keep.all() else lam.size][:max_index]
    if lam.size < 3:
        return []
    gaps = np.log(lam[:-1] / lam[1:])
    drops = _accept_drops(gaps, np.log(min_drop), relative_drop, window)
    cliffs, start = [], 0
    for i in drops:
        cliffs.append(Cliff(start, i + 1, float(np.exp(gaps[i]))))
        start = i + 1
    return cliffs


def _check_cliff_settings(min_drop: float, relative_drop: float, window: int,
                          max_index: int | None, floor: float) -> None:
    """Refuse thresholds that cannot mean anything, naming the argument."""
    if not (np.isfinite(min_drop) and min_drop > 1):
        raise ValueError(f"min_drop={min_drop}: a drop is a ratio lambda_i / lambda_(i+1) above "
                         "1; use a finite value > 1 (default 1.1)")
    if not (np.isfinite(relative_drop) and relative_drop >= 1):
        raise ValueError(f"relative_drop={relative_drop}: a drop must be at least as large as "
                         "the gaps around it; use a finite value >= 1 (default 20)")
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window={window!r}: use a whole number of gaps >= 1 (default 10)")
    if max_index is not None and (isinstance(max_index, bool) or max_index < 1):
        raise ValueError(f"max_index={max_index!r}: use None (all eigenvalues) or a count >= 1")
    if not (np.isfinite(floor) and 0 <= floor < 1):
        raise ValueError(f"floor={floor}: a relative level in [0, 1) (default 1e-8)")


def _accept_drops(gaps: np.ndarray, log_min: float, relative: float, window: int) -> list[int]:
    """Indices of the gaps (``gaps[i]`` between eigenvalues i and i+1) that are drops, sorted.

    Greedy: among the gaps of at least ``log_min`` not yet accepted, take the largest whose
    ratio to its neighbourhood scale (:func:`_neighbourhood_scale`) is at least ``relative``;
    repeat until none is left.
    """
    candidates = [int(i) for i in np.flatnonzero(gaps >= log_min)]
    drops: list[int] = []
    while candidates:
        passing = [i for i in candidates
                   if gaps[i] >= relative * _neighbourhood_scale(gaps, i, drops, window)]
        if not passing:
            break
        best = max(passing, key=lambda i: gaps[i])
        drops.append(best)
        candidates.remove(best)
    return sorted(drops)


def _neighbourhood_scale(gaps: np.ndarray, i: int, drops: list[int], window: int) -> float:
    """The typical gap inside the flatter block next to gap ``i``: the smaller of the medians of
    up to ``window`` gaps above it (stopping at an accepted drop) and below it (likewise). When
    both neighbouring blocks are single modes, the non-drop gaps within ``window`` either side."""
    above_stop = max((d for d in drops if d < i), default=-1)
    below_stop = min((d for d in drops if d > i), default=gaps.size)
    sides = [gaps[max(above_stop + 1, i - window):i], gaps[i + 1:min(below_stop, i + 1 + window)]]
    medians = [float(np.median(side)) for side in sides if side.size]
    if medians:
        return min(medians)
    nearby = [j for j in range(max(0, i - window), min(gaps.size, i + 1 + window))
              if j != i and j not in drops]
    return float(np.median(gaps[nearby])) if nearby else 0.0
