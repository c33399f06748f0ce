"""Fourier families, subspace overlaps with known answers, and the Laplacian rotation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from entk_helpers import (
    chance_overlap,
    cycle_laplacian,
    fourier_family,
    frequency_match,
    orthonormal_basis,
    principal_cosines,
    rotate_by_laplacians,
    subspace_overlap,
)

P = 7
KINDS = ("a", "b", "sum", "diff")


def random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return q


@pytest.mark.parametrize("kind", [*KINDS, "axis_sum"])
def test_fourier_families_are_orthogonal_with_equal_norms_after_centering(kind: str) -> None:
    family = fourier_family(P, kind)
    n_freqs = (P - 1) // 2
    assert family.shape == (P * P, (4 if kind == "axis_sum" else 2) * n_freqs)
    assert family.dtype == torch.float64
    centred = family - family.mean(dim=0)
    assert torch.allclose(centred, family, atol=1e-12)  # non-zero frequencies: mean zero
    gram = centred.T @ centred
    assert torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64) * P * P / 2,
                          atol=1e-9)


def test_fourier_rows_are_in_row_major_order() -> None:
    family = fourier_family(P, "sum", [2])
    for a, b in ((0, 0), (3, 5), (6, 6)):
        angle = 2 * math.pi * 2 * ((a + b) % P) / P
        assert torch.allclose(family[a * P + b], torch.tensor([math.cos(angle), math.sin(angle)],
                                                              dtype=torch.float64))


def test_families_are_mutually_orthogonal() -> None:
    for first, second in itertools.combinations(KINDS, 2):
        cross = fourier_family(P, first).T @ fourier_family(P, second)
        assert cross.abs().max() < 1e-9, (first, second)
        assert subspace_overlap(fourier_family(P, first), fourier_family(P, second)) < 1e-20


def test_fourier_family_bad_input() -> None:
    with pytest.raises(ValueError, match="choose one of"):
        fourier_family(P, "product")
    with pytest.raises(ValueError, match="multiples of p"):
        fourier_family(P, "a", [0, 1])
    with pytest.raises(ValueError, match="non-empty"):
        fourier_family(P, "a", [])


@pytest.mark.parametrize("freqs", [[1, 8], [1, 6], [2, 2], [3, -3]])
def test_aliased_frequencies_are_refused(freqs: list[int]) -> None:
    """Guards (issue 17): fourier_family(7, "a", [1, 8]) returned the k = 1 columns twice
    (8 = 1 mod 7); k = 6 = -1 spans the same plane. Each mode must appear once."""
    with pytest.raises(ValueError, match=r"same Fourier mode mod p=7.*once"):
        fourier_family(P, "a", freqs)
    with pytest.raises(ValueError, match="p/2"):  # even p: the sine of k = p/2 is zero
        fourier_family(8, "sum", [1, 4])
    family = fourier_family(P, "a", [1, 3])  # distinct modes: full column rank
    assert torch.linalg.matrix_rank(family).item() == 4


def test_chance_overlap_is_refused_beyond_the_possible_maximum() -> None:
    """Guards (issue 17): chance_overlap(10, 10, 5) returned 20, above the largest possible
    overlap, for 10-dimensional subspaces that cannot exist in R^5."""
    for args in ((10, 10, 5), (6, 1, 5), (0, 3, 5), (3, 3, 0)):
        with pytest.raises(ValueError, match="dim_f <= n"):
            chance_overlap(*args)
    with pytest.raises(TypeError, match="integer"):
        chance_overlap(2.5, 3, 10)
    for dim_q, dim_f, n in ((5, 5, 5), (1, 5, 5), (3, 4, 10)):
        assert chance_overlap(dim_q, dim_f, n) <= min(dim_q, dim_f)
    assert chance_overlap(5, 5, 5) == 5.0  # the whole space: the overlap is exact


# ---------------------------------------------------------------------------- overlaps


def test_overlap_of_identical_spaces_is_their_dimension() -> None:
    family = fourier_family(P, "sum")
    assert subspace_overlap(family, family) == pytest.approx(family.shape[1], abs=1e-10)
    rotated = orthonormal_basis(family) @ random_rotation(family.shape[1], 0)
    assert subspace_overlap(rotated, family) == pytest.approx(family.shape[1], abs=1e-10)
    q = torch.randn(30, 4, dtype=torch.float64)
    assert subspace_overlap(q, q @ random_rotation(4, 1), center_features=False) \
        == pytest.approx(4.0, abs=1e-10)
    smaller = family[:, :2]  # contained in the bigger space: min(dim Q, dim F)
    assert subspace_overlap(family, smaller) == pytest.approx(2.0, abs=1e-10)


def test_overlap_of_orthogonal_spaces_is_zero() -> None:
    eye = torch.eye(10, dtype=torch.float64)
    assert subspace_overlap(eye[:, :3], eye[:, 3:7], center_features=False) == 0.0
    assert subspace_overlap(fourier_family(P, "a"), fourier_family(P, "diff")) < 1e-20
    reversed_view = eye.numpy()[:, ::-1]  # numpy views with negative strides are accepted
    assert subspace_overlap(reversed_view[:, :3], eye[:, :3], center_features=False) == 0.0


def test_overlap_of_random_spaces_is_near_chance() -> None:
    n, dim_q, dim_f = 200, 10, 8
    draws = [subspace_overlap(torch.randn(n, dim_q, dtype=torch.float64),
                              torch.randn(n, dim_f, dtype=torch.float64), center_features=False)
             for _ in range(30)]
    chance = chance_overlap(dim_q, dim_f, n)
    assert chance == pytest.approx(0.4)
    assert abs(np.mean(draws) - chance) < 0.2 * chance
    assert max(draws) < 4 * chance


def test_centering_removes_the_constant_direction() -> None:
    ones = torch.ones(P * P, 1, dtype=torch.float64)
    features = torch.cat([ones, fourier_family(P, "a", [1])], dim=1)
    assert subspace_overlap(ones, features, center_features=False) == pytest.approx(1.0)
    assert subspace_overlap(ones, features) == pytest.approx(0.0, abs=1e-20)


def test_principal_cosines_known_angle() -> None:
    theta = 0.3
    eye = torch.eye(5, dtype=torch.float64)
    q = torch.stack([eye[0], math.cos(theta) * eye[1] + math.sin(theta) * eye[2]], dim=1)
    f = eye[:, :2]
    cosines = principal_cosines(q, f, center_features=False)
    assert torch.allclose(cosines, torch.tensor([1.0, math.cos(theta)], dtype=torch.float64))
    assert subspace_overlap(q, f, center_features=False) == pytest.approx(
        1 + math.cos(theta) ** 2)
    with pytest.raises(ValueError, match="same inputs"):
        principal_cosines(q, torch.randn(6, 1))


def test_orthonormal_basis_drops_dependent_columns() -> None:
    x = torch.randn(20, 3, dtype=torch.float64)
    basis = orthonormal_basis(torch.cat([x, x[:, :1] + x[:, 1:2]], dim=1))
    assert basis.shape == (20, 3)
    assert torch.allclose(basis.T @ basis, torch.eye(3, dtype=torch.float64), atol=1e-12)
    with pytest.raises(ValueError, match="span nothing"):
        orthonormal_basis(torch.ones(5, 2), center=True)


# ------------------------------------------------------------------ Laplacians, rotation


def mode_eigenvalue(k_a: int, k_b: int, direction: tuple[int, int]) -> float:
    return 2 - 2 * math.cos(2 * math.pi * (k_a * direction[0] + k_b * direction[1]) / P)


@pytest.mark.parametrize("direction", [(1, 0), (0, 1), (1, 1), (1, -1)])
def test_cycle_laplacian_eigen_relations(direction: tuple[int, int]) -> None:
    lap = cycle_laplacian(P, direction)
    assert lap.shape == (P * P, P * P)
    assert torch.allclose(lap, lap.T)
    assert torch.allclose(lap.sum(dim=1), torch.zeros(P * P, dtype=lap.dtype))
    assert torch.linalg.eigvalsh(lap.double()).min() > -1e-10
    wave = {"a": (1, 0), "b": (0, 1), "sum": (1, 1), "diff": (1, -1)}
    for kind, (u, v) in wave.items():
        for k in (1, 2, 3):
            family = fourier_family(P, kind, [k])
            expected = mode_eigenvalue(k * u, k * v, direction)
            assert torch.allclose(lap.double() @ family, expected * family, atol=1e-9), \
                (kind, k)


def test_rotate_by_laplacians_recovers_single_modes() -> None:
    """a_1, sum_1 (tied under the (1, 0) cycles) and b_2, randomly mixed, come apart."""
    modes = [("a", 1), ("sum", 1), ("b", 2)]
    block = torch.cat([orthonormal_basis(fourier_family(P, kind, [k])) for kind, k in modes],
                      dim=1)
    mixed = block @ random_rotation(6, 2)
    before = frequency_match(mixed, P)
    assert before.reshape(6, -1).max(dim=1).values.max() < 0.95  # mixed: no pure mode
    laplacians = [cycle_laplacian(P, (1, 0)), cycle_laplacian(P, (1, -1))]
    rotated = rotate_by_laplacians(mixed, laplacians)
    assert torch.allclose(rotated.T @ rotated, torch.eye(6, dtype=torch.float64), atol=1e-10)
    assert subspace_overlap(rotated, block, center_features=False) == pytest.approx(6.0)
    scores = frequency_match(rotated, P)  # (6, kinds, freqs)
    best = scores.reshape(6, -1).max(dim=1)
    assert best.values.min() > 1 - 1e-8
    found = sorted({(("a", "b", "sum", "diff")[int(i) // 3], int(i) % 3 + 1)
                    for i in best.indices})
    assert found == sorted(modes)
    only_first = rotate_by_laplacians(mixed, laplacians[:1])  # a_1 and sum_1 stay mixed
    assert frequency_match(only_first, P).reshape(6, -1).max(dim=1).values.min() < 0.99
