"""Baselines for eNTK directions: principal components, random directions, overlap curves.

"Why not just PCA?" is the first question about the eNTK method. To answer it on equal terms,
every method hands over the same thing: ``K`` directions over the ``N`` examples, as an
``(N, K)`` matrix whose columns are ordered from most to least important (eNTK eigenvectors
by eigenvalue, principal-component scores by variance, random directions in any order).

- :func:`pca_directions`: the top-``k`` principal-component scores of an activation matrix.
- :func:`nontrivial_pca_directions`: the same, stopping at the activations' rank (e.g. the
  pre-activations of a layer fed one-hot inputs span at most as many directions as the input).
- :func:`random_directions`: ``k`` random orthonormal directions (the chance baseline).
- :func:`overlap_curve`: for each ``k`` in a list, the subspace overlap
  ``||Q_k^T F||_F^2`` of the first ``k`` directions with a feature family, computed for all
  ``k`` at once from one QR factorisation (the first ``k`` columns of Q span the first ``k``
  directions). It equals :func:`entk_helpers.subspace_overlap` applied to each prefix.

Limits: the directions must be linearly independent up to the largest ``k`` asked for (PCA of
a ``D``-dimensional activation has at most ``D`` non-trivial components).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .._arrays import as_tensor
from ..features import orthonormal_basis


def pca_directions(activations: Tensor | np.ndarray, k: int) -> Tensor:
    """Scores of the examples on the top ``k`` principal components of their activations.

    Args:
        activations: ``(N, D)``; higher-rank inputs ``(N, ...)`` are flattened per example.
        k: how many components, ``1 <= k <= min(N, D)``.

    Returns:
        ``(N, k)`` float64, column j = ``U[:, j] * S[j]`` of the SVD of the mean-centred
        activations (so columns are orthogonal, ordered by explained variance; signs arbitrary).
    """
    x = as_tensor(activations, torch.float64, "cpu")
    x = x.reshape(x.shape[0], -1)
    n, d = x.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"k={k} principal components of ({n}, {d}) activations: "
                         f"k must be in 1..{min(n, d)}")
    x = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    return u[:, :k] * s[:k]


def nontrivial_pca_directions(activations: Tensor | np.ndarray, k: int, *, center: bool = True,
                              rtol: float = 1e-8) -> Tensor:
    """The top principal-component scores, at most as many as the activations have rank.

    Args:
        activations: ``(N, D)`` (higher ranks flattened per example).
        k: the most components wanted, >= 1.
        center: subtract the mean over examples first (PCA); False gives the uncentred
            directions, the eigenvectors of the Gram matrix ``A A^T``.
        rtol: a singular value below ``rtol`` times the largest counts as zero.

    Returns:
        ``(N, min(k, rank))`` float64, column j = ``U[:, j] * S[j]`` (descending ``S``).
    """
    if k < 1:
        raise ValueError(f"k={k}: ask for at least one component")
    x = as_tensor(activations, torch.float64, "cpu")
    x = x.reshape(x.shape[0], -1)
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    rank = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    if rank == 0:
        raise ValueError("activations: all (centred) activations are zero; nothing to rank")
    keep = min(k, rank)
    return u[:, :keep] * s[:keep]


def random_directions(n: int, k: int, seed: int = 0) -> Tensor:
    """``k`` random orthonormal directions in R^n (Haar-distributed subspace), seeded.

    Returns:
        ``(n, k)`` float64 with orthonormal columns.
    """
    if not 1 <= k <= n:
        raise ValueError(f"k={k} random directions in R^{n}: k must be in 1..{n}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(n, k, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return q * torch.sign(torch.diagonal(r))  # sign fix makes the distribution exactly Haar


def overlap_curve(
    vectors: Tensor | np.ndarray,
    family: Tensor | np.ndarray,
    ks: Sequence[int],
    *,
    center_features: bool = True,
    rtol: float = 1e-8,
) -> np.ndarray:
    """Subspace overlap of the first ``k`` directions with a feature family, for each ``k``.

    Args:
        vectors: ``(N, K)`` directions, most important first (eigenvectors, PC scores, ...).
        family: ``(N, f)`` feature columns (mean-centred first when ``center_features``).
        ks: prefix sizes, each in ``1..K``.
        rtol: a direction whose component orthogonal to the earlier ones is below ``rtol``
            times the largest column norm counts as dependent (an error).

    Returns:
        ``(len(ks),)`` float64: ``||Q_k^T F||_F^2`` in ``[0, min(k, f)]``, with ``Q_k`` an
        orthonormal basis of the first ``k`` directions and ``F`` of the family.
    """
    v = as_tensor(vectors, torch.float64, "cpu")
    if v.ndim != 2:
        raise ValueError(f"vectors must be (N, K), got shape {tuple(v.shape)}")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1 or max(ks) > v.shape[1]:
        raise ValueError(f"every k must be in 1..{v.shape[1]} (the number of directions)")
    f = orthonormal_basis(family, center=center_features)
    if f.shape[0] != v.shape[0]:
        raise ValueError(f"vectors have {v.shape[0]} rows but the family has {f.shape[0]}: "
                         "both must be indexed by the same examples")
    top = v[:, : max(ks)]
    q, r = torch.linalg.qr(top)
    diag = torch.diagonal(r).abs()
    scale = torch.linalg.vector_norm(top, dim=0).max().clamp_min(1e-300)
    dependent = torch.nonzero(diag <= rtol * scale).flatten()
    if dependent.numel():
        raise ValueError(f"direction {int(dependent[0])} is a combination of the earlier ones; "
                         "ask for fewer directions (e.g. PCA of D-dim activations has <= D)")
    per_direction = ((q.T @ f) ** 2).sum(dim=1)  # (max k,)
    cumulative = torch.cumsum(per_direction, dim=0)
    return cumulative[torch.tensor(ks) - 1].numpy()


def pca_lowrank_directions(
    activations: Tensor | np.ndarray, k: int, *, q: int = 25, niter: int = 2, seed: int = 0
) -> Tensor:
    """The paper's PCA baseline: ``torch.pca_lowrank(H, q=q, center=True, niter=niter)``.

    A *randomized* low-rank approximation (``q`` columns, no oversampling beyond ``q``, ``niter``
    power iterations; the paper's ``q = 25``, ``niter = 2``): its components are close to, not
    equal to, the exact ones of :func:`pca_directions`, and depend on the random draw, which is
    seeded here without touching the global generator.

    Args:
        activations: ``(N, D)`` (higher-rank inputs flattened per example).
        k: how many components to score, ``1 <= k <= q <= min(N, D)``.

    Returns:
        ``(N, k)`` float64: the centred activations projected on the first ``k`` returned
        right singular vectors (``(H - mean) V[:, :k]``; signs arbitrary).
    """
    x = as_tensor(activations, torch.float64, "cpu")
    x = x.reshape(x.shape[0], -1)
    n, d = x.shape
    if not 1 <= k <= q <= min(n, d):
        raise ValueError(f"k={k}, q={q} for ({n}, {d}) activations: need 1 <= k <= q <= "
                         f"{min(n, d)}")
    if niter < 0:
        raise ValueError(f"niter={niter}: the number of power iterations must be >= 0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(x, q=q, center=True, niter=niter)
    return (x - x.mean(dim=0, keepdim=True)) @ v[:, :k]


def captured_fraction(vectors: Tensor | np.ndarray, family: Tensor | np.ndarray,
                      ks: Sequence[int]) -> np.ndarray:
    """Fraction of a feature family held by the first ``k`` directions, for each ``k``.

    :func:`overlap_curve` divided by the family's dimension (after mean-centring).
    ``vectors`` (N, K), ``family`` (N, f). A ``k`` beyond K (PCA of a low-rank site has fewer
    directions than asked) counts as K: the method keeps its last value.

    Returns:
        ``(len(ks),)`` float64 in ``[0, 1]``.
    """
    n_directions = as_tensor(vectors).shape[-1]
    dim = orthonormal_basis(family, center=True).shape[1]
    return overlap_curve(vectors, family, [min(int(k), n_directions) for k in ks]) / dim


def k_to_reach(curve: Sequence[float] | np.ndarray, ks: Sequence[int],
               level: float = 0.9) -> int | None:
    """The smallest ``k`` in ``ks`` whose ``curve`` value reaches ``level`` (None if none does)."""
    values = np.asarray(curve, dtype=np.float64)
    if values.shape != (len(ks),):
        raise ValueError(f"curve has shape {values.shape}; it needs one value per k "
                         f"({len(ks)} ks)")
    hits = np.flatnonzero(values >= level)
    return int(ks[hits[0]]) if hits.size else None


def random_fraction_band(n: int, k_max: int, family: Tensor | np.ndarray, ks: Sequence[int],
                         n_draws: int) -> np.ndarray:
    """:func:`captured_fraction` of ``n_draws`` random orthonormal bases (seeds 0, 1, ...).

    Returns:
        ``(n_draws, len(ks))``: the chance band a method's curve is read against.
    """
    if n_draws < 1:
        raise ValueError(f"n_draws={n_draws}; need at least one random draw")
    return np.stack([captured_fraction(random_directions(n, k_max, seed=s), family, ks)
                     for s in range(n_draws)])
