"""entk_helpers: find the features a trained network uses through its empirical NTK.

The eNTK K(x, x') = J(x) J(x')^T compares how two inputs move the outputs when the parameters
move. Its top eigenvectors line up with the features the network has learned (Lin, "Feature
Identification via the Empirical NTK", arXiv 2510.00468). This package computes such kernels
(dense, per layer, or matrix-free), their top eigenpairs and spectral cliffs, and how well
eigen-subspaces match a bank of candidate features.

    >>> from entk_helpers import empirical_ntk, top_eigenpairs, find_cliffs
    >>> K = empirical_ntk(model, x, output="trace")      # (N, N)
    >>> eig = top_eigenpairs(K, k=50)                      # values, vectors, residuals
    >>> find_cliffs(eig.values)                            # blocks of near-equal modes

Layout: the general core is here (``kernels``, ``operators`` on ``kernel_operator``,
``eigen``, ``features``, ``budget``, ``causal``, ``distributed``); :mod:`entk_helpers.lm`
holds the layer eNTK of any decoder-only ``transformers`` LM; :mod:`entk_helpers.experiments`
the paper's experiments (modular tasks, frequencies, grammar, scoring, baselines);
:mod:`entk_helpers.files` atomic writes and :mod:`entk_helpers.notebook` the notebooks'
flags, paths and paper-vs-run tables.
"""

from . import _moved
from .budget import (
    MemoryBudgetError,
    get_memory_budget,
    memory_budget,
    set_memory_budget,
)
from .eigen import Cliff, EigenResult, find_cliffs, top_eigenpairs
from .features import (
    chance_overlap,
    cycle_laplacian,
    fourier_family,
    frequency_match,
    orthonormal_basis,
    principal_cosines,
    rotate_by_laplacians,
    subspace_overlap,
)
from .kernel_operator import KernelOperator
from .kernels import empirical_ntk, layerwise_ntk
from .operators import NTKOperator, ntk_operator

__version__ = "0.2.0"

_moved.install()  # old paths (entk_helpers.modular, ...) keep working, with a warning

__all__ = [
    "Cliff",
    "EigenResult",
    "KernelOperator",
    "MemoryBudgetError",
    "NTKOperator",
    "chance_overlap",
    "cycle_laplacian",
    "empirical_ntk",
    "find_cliffs",
    "fourier_family",
    "frequency_match",
    "get_memory_budget",
    "layerwise_ntk",
    "memory_budget",
    "ntk_operator",
    "orthonormal_basis",
    "principal_cosines",
    "rotate_by_laplacians",
    "set_memory_budget",
    "subspace_overlap",
    "top_eigenpairs",
]
