"""Feature banks and how well a spectral subspace lines up with them.

For modular arithmetic the ground-truth features are Fourier modes over the p*p inputs
(a, b): :func:`fourier_family` builds them. :func:`subspace_overlap` measures alignment as
``||Q^T F||_F^2`` for orthonormal bases Q (eigenvectors) and F (features): the sum of the
squared cosines of the principal angles, from 0 to min(dim Q, dim F); two random subspaces
score about ``dim Q * dim F / n`` (:func:`chance_overlap`).

Inside a cliff of degenerate eigenvalues the eigenvectors are an arbitrary rotation of the
feature basis. :func:`rotate_by_laplacians` undoes it as in the paper: diagonalise a graph
Laplacian restricted to the cliff (cycle graphs along one direction of the (a, b) torus, see
:func:`cycle_laplacian`), then break remaining ties with a second Laplacian.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._arrays import as_tensor

FAMILIES = ("a", "b", "sum", "diff", "axis_sum")


def default_frequencies(p: int) -> list[int]:
    """``1 .. (p-1)//2``: every non-trivial frequency of Z_p up to conjugation."""
    return list(range(1, (p - 1) // 2 + 1))


def fourier_family(p: int, kind: str, freqs: Sequence[int] | None = None) -> Tensor:
    """Fourier features over all inputs (a, b), rows in row-major order ``a * p + b``.

    Args:
        p: the modulus.
        kind: ``"a"``, ``"b"``, ``"sum"`` ((a+b) mod p), ``"diff"`` ((a-b) mod p), or
            ``"axis_sum"`` (the a-family and the b-family at the same frequencies, side by
            side: 4 columns per k; the paper's own axis_sum *adds* them, 2 columns per k:
            :func:`entk_helpers.experiments.frequencies.author_axis_sum`).
        freqs: frequencies k (default 1..(p-1)/2). Two frequencies that are equal or
            conjugate mod p (k' = +-k) would give the same features twice and are refused.

    Returns:
        ``(p*p, 2 * len(freqs))`` float64, columns ``cos, sin`` of ``2 pi k v / p`` per k
        (``4 * len(freqs)`` columns for ``"axis_sum"``). Not normalised.
    """
    if kind not in FAMILIES:
        raise ValueError(f"kind={kind!r}; choose one of {FAMILIES}")
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 2:
        raise ValueError(f"p={p!r}; the modulus must be an integer >= 2")
    freqs = default_frequencies(p) if freqs is None else [int(k) for k in freqs]
    bad = [k for k in freqs if k % p == 0]
    if not freqs or bad:
        raise ValueError(f"frequencies must be non-empty and not multiples of p={p} "
                         f"(got {freqs}); a constant is not a Fourier feature here")
    first: dict[int, int] = {}
    for k in freqs:
        mode = min(k % p, -k % p)  # k and -k give the same cos and sin (up to sign)
        if mode in first:
            raise ValueError(
                f"frequencies {first[mode]} and {k} are the same Fourier mode mod p={p} "
                f"(equal or conjugate: k' = +-k mod {p}), so their columns would repeat; "
                f"pass each mode once, e.g. in 1..{(p - 1) // 2}"
            )
        if 2 * mode == p:
            raise ValueError(f"frequency {k} = p/2: its sine column is zero; leave it out")
        first[mode] = k
    if kind == "axis_sum":
        return torch.cat([fourier_family(p, "a", freqs), fourier_family(p, "b", freqs)], dim=1)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    v = {"a": a, "b": b, "sum": (a + b) % p, "diff": (a - b) % p}[kind].reshape(-1).double()
    angles = 2 * torch.pi * v[:, None] * torch.tensor(freqs, dtype=torch.float64)[None] / p
    return torch.stack([angles.cos(), angles.sin()], dim=2).reshape(p * p, 2 * len(freqs))


def orthonormal_basis(x: Tensor | np.ndarray, center: bool = False, rtol: float = 1e-8) -> Tensor:
    """An orthonormal basis ``(n, r)`` of the column span of ``x`` ``(n, d)``.

    ``center=True`` removes each column's mean first. Directions with singular value below
    ``rtol`` times the largest are dropped, so r is the numerical rank.
    """
    x = as_tensor(x, torch.float64, "cpu")
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"expected an (n, d) matrix of column vectors, got shape {tuple(x.shape)}")
    if center:
        x = x - x.mean(dim=0, keepdim=True)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    if s.numel() == 0 or s[0] == 0:
        raise ValueError("the columns span nothing (all zero after centering?)")
    return u[:, s > rtol * s[0]]


def principal_cosines(
    Q: Tensor | np.ndarray, F: Tensor | np.ndarray, *, center_features: bool = True
) -> Tensor:
    """Cosines of the principal angles between span(Q) and span(F), descending.

    Args:
        Q: ``(n, q)`` e.g. eigenvectors (orthonormalised here).
        F: ``(n, f)`` feature columns (mean-centred first when ``center_features``).

    Returns:
        ``(min(q', f'),)`` cosines in [0, 1], q' and f' the ranks.
    """
    q = orthonormal_basis(Q)
    f = orthonormal_basis(F, center=center_features)
    if q.shape[0] != f.shape[0]:
        raise ValueError(f"Q has {q.shape[0]} rows but F has {f.shape[0]}: both must be "
                         "indexed by the same inputs")
    return torch.linalg.svdvals(q.T @ f).clamp(0.0, 1.0)


def subspace_overlap(
    Q: Tensor | np.ndarray, F: Tensor | np.ndarray, *, center_features: bool = True
) -> float:
    """``||Q^T F||_F^2`` of orthonormal bases: the sum of squared principal cosines.

    Ranges from 0 (orthogonal) to min(dim Q, dim F) (one space contains the other).
    """
    return float((principal_cosines(Q, F, center_features=center_features) ** 2).sum())


def chance_overlap(dim_q: int, dim_f: int, n: int) -> float:
    """Expected :func:`subspace_overlap` of two random subspaces of R^n: ``dim_q*dim_f/n``.

    Needs ``1 <= dim_q, dim_f <= n`` (a subspace of R^n has at most n dimensions); the
    value is then at most ``min(dim_q, dim_f)``, the largest possible overlap.
    """
    for name, value in (("dim_q", dim_q), ("dim_f", dim_f), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}={value!r} must be an integer (a dimension)")
    if n < 1 or not (1 <= dim_q <= n and 1 <= dim_f <= n):
        raise ValueError(f"chance_overlap({dim_q}, {dim_f}, {n}): subspaces of R^{n} have "
                         f"1..{n} dimensions; pass dim_q, dim_f <= n (the number of inputs)")
    return dim_q * dim_f / n


def cycle_laplacian(p: int, direction: tuple[int, int]) -> Tensor:
    """Graph Laplacian ``(p*p, p*p)`` of the cycles through (a, b) along ``direction`` mod p.

    Its eigenvectors are the Fourier modes of the (a, b) torus; mode (k_a, k_b) has
    eigenvalue ``2 - 2 cos(2 pi (k_a d_a + k_b d_b) / p)``. So ``(1, 0)`` separates the
    a-frequencies and leaves b-modes at 0; ``(1, 1)`` separates sum-modes and leaves
    diff-modes at 0; ``(1, -1)`` the reverse.
    """
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    index = (a * p + b).reshape(-1)
    step = (((a + direction[0]) % p) * p + (b + direction[1]) % p).reshape(-1)
    adjacency = np.zeros((p * p, p * p))
    adjacency[index, step] = 1
    adjacency = adjacency + adjacency.T
    return torch.as_tensor(np.diag(adjacency.sum(axis=1)) - adjacency)


def rotate_by_laplacians(
    Q: Tensor | np.ndarray, laplacians: Sequence[Tensor], *, tie_tol: float = 1e-2
) -> Tensor:
    """Rotate an eigen-block so each new vector is a single Fourier mode (the paper's method).

    Diagonalise ``Q^T L_1 Q`` inside span(Q); eigenvalues within ``tie_tol`` (relative to the
    largest) are ties, and each tied group is rotated again by ``L_2``, and so on.

    Args:
        Q: ``(n, d)`` orthonormal block (e.g. one cliff's eigenvectors).
        laplacians: ``(n, n)`` symmetric matrices, applied in order.

    Returns:
        ``(n, d)`` orthonormal, spanning the same subspace.
    """
    q = orthonormal_basis(Q)
    groups = [q]
    for lap in laplacians:
        lap = as_tensor(lap, torch.float64, "cpu")
        new_groups = []
        for block in groups:
            vals, vecs = torch.linalg.eigh(block.T @ lap @ block)
            rotated = block @ vecs
            scale = max(float(vals.abs().max()), 1e-12)
            cuts = [0, *(i + 1 for i in range(len(vals) - 1)
                         if vals[i + 1] - vals[i] > tie_tol * scale), len(vals)]
            new_groups += [rotated[:, s:e] for s, e in zip(cuts[:-1], cuts[1:])]
        groups = new_groups
    return torch.cat(groups, dim=1)


def frequency_match(
    vectors: Tensor | np.ndarray, p: int, kinds: Sequence[str] = ("a", "b", "sum", "diff")
) -> Tensor:
    """Squared overlap of each vector with each single-frequency family.

    Returns:
        ``(d, len(kinds), (p-1)//2)``: entry [i, f, k-1] is ``||P_{kind f, freq k} v_i||^2``
        for unit vectors v_i; a vector that is one Fourier mode scores 1 in one cell.
    """
    v = as_tensor(vectors, torch.float64, "cpu")
    v = v / torch.linalg.vector_norm(v, dim=0, keepdim=True)
    out = torch.zeros(v.shape[1], len(kinds), (p - 1) // 2, dtype=torch.float64)
    for f, kind in enumerate(kinds):
        for k in default_frequencies(p):
            basis = orthonormal_basis(fourier_family(p, kind, [k]), center=True)
            out[:, f, k - 1] = ((basis.T @ v) ** 2).sum(dim=0)
    return out
