"""Toy Models of Superposition (Elhage et al. 2022) as the paper's v1-v3 set them up.

The model is ``y = ReLU(W^T W x + b)`` with ``W`` of shape ``(m, n)``: n features squeezed
through m < n hidden dimensions and read back out. Features are sparse: each is nonzero with
probability ``1 - S`` and then uniform on [0, 1]; every data point is scaled to unit L2 norm
(the fixed-dataset variant of "Superposition, Memorization and Double Descent"). Feature i
carries importance ``I_i = decay**i`` in an importance-weighted MSE. A feature counts as
*represented* when ``(W^T W)_ii >= 0.75``.

Because the loss weights output i by ``I_i``, the function-space kernel of the training
dynamics is ``D^(1/2) K D^(1/2)`` with ``D = diag(I)`` on the outputs (index ``n*C + c``):
:func:`output_weighted` wraps a full eNTK operator that way. :func:`output_mass` shows
which outputs (features) an eigenvector of the ``(N*C, N*C)`` kernel lives on, and
:func:`feature_coverage` whether an eigen-block lives where each feature is present (a
represented feature) or everywhere (the bias mode of an output that is always on).
:func:`train_tms` runs the paper's whole recipe for one model; :func:`indicator_mass` is the
per-mode heatmap of notebook 05 and :func:`ablation_target` picks the feature and the modes
that its causal check removes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from .._arrays import as_tensor
from .._model import intra_op_threads
from ..progress import progress_bar


def feature_importance(n_features: int, decay: float = 0.8) -> Tensor:
    """``(n_features,)`` float32: ``decay**i`` for i = 0 .. n-1 (the paper's 0.8**i)."""
    if n_features < 1 or not 0 < decay <= 1:
        raise ValueError(f"n_features={n_features}, decay={decay}: need n_features >= 1 and "
                         "0 < decay <= 1")
    return decay ** torch.arange(n_features, dtype=torch.float32)


def tms_data(n_points: int, n_features: int, sparsity: float, *, seed: int = 0) -> Tensor:
    """A fixed TMS data set ``(n_points, n_features)`` float32, every row of unit L2 norm.

    Each entry is nonzero with probability ``1 - sparsity``, then uniform on [0, 1]; the
    values are drawn before the mask, from a generator seeded with ``seed``. A row with no
    nonzero entry stays zero.
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity={sparsity}: it is the probability that a feature is "
                         "zero, so it must lie in [0, 1)")
    if n_points < 1 or n_features < 1:
        raise ValueError(f"n_points={n_points}, n_features={n_features}: both must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    values = torch.rand(n_points, n_features, generator=generator)
    mask = torch.rand(n_points, n_features, generator=generator) < 1 - sparsity
    x = values * mask
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / norms.clamp_min(1e-12)


class ToyModel(nn.Module):
    """``forward(x (N, n)) -> ReLU(x W^T W + b) (N, n)``; ``W`` (m, n) Xavier-normal, b zero."""

    def __init__(self, n_features: int, n_hidden: int, *, seed: int = 0) -> None:
        super().__init__()
        if n_hidden < 1:
            raise ValueError(f"n_hidden={n_hidden} must be at least 1")
        generator = torch.Generator().manual_seed(seed)
        self.W = nn.Parameter(nn.init.xavier_normal_(torch.empty(n_hidden, n_features),
                                                     generator=generator))
        self.b = nn.Parameter(torch.zeros(n_features))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x @ self.W.T @ self.W + self.b)


def importance_weighted_mse(output: Tensor, target: Tensor, importance: Tensor) -> Tensor:
    """Mean over points and features of ``I_i (output_i - target_i)**2`` (a scalar)."""
    return (importance * (output - target) ** 2).mean()


def train_toy_model(
    model: ToyModel,
    data: Tensor,
    importance: Tensor,
    *,
    epochs: int = 5000,
    lr: float = 1e-3,
    progress: bool = True,
    cpu_threads: int | None = 1,
) -> np.ndarray:
    """Full-batch Adam on the importance-weighted MSE of reconstructing ``data`` (N, n).

    Returns the loss before each step, ``(epochs,)``. ``cpu_threads`` as in
    :func:`entk_helpers.experiments.modular.train` (one thread: these ops are tiny).
    """
    if data.ndim != 2 or data.shape[1] != model.W.shape[1] or importance.shape != data.shape[1:]:
        raise ValueError(f"data {tuple(data.shape)} and importance {tuple(importance.shape)} "
                         f"must be (N, {model.W.shape[1]}) and ({model.W.shape[1]},)")
    device = model.W.device
    data, importance = data.to(device), importance.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = np.empty(epochs)
    with intra_op_threads(cpu_threads if device.type == "cpu" else None):
        for epoch in progress_bar(range(epochs), desc="training", disable=not progress):
            optimizer.zero_grad(set_to_none=True)
            loss = importance_weighted_mse(model(data), data, importance)
            loss.backward()
            optimizer.step()
            losses[epoch] = loss.item()
    return losses


@dataclass
class TMSRun:
    """One trained TMS model: ``model`` (eval mode), its fixed ``data`` (N, n), the loss
    before each step ``losses`` (epochs,), ``train_seconds``, and ``represented`` (n,) bool
    on the CPU (:func:`represented_features`)."""

    model: ToyModel
    data: Tensor
    losses: np.ndarray
    train_seconds: float
    represented: Tensor

    @property
    def count(self) -> int:
        """How many features are represented."""
        return int(self.represented.sum())

    @property
    def n_params(self) -> int:
        """P = m*n + n, the parameters the kernel is taken over (W and b)."""
        return sum(p.numel() for p in self.model.parameters())


def train_tms(
    n_hidden: int,
    sparsity: float,
    *,
    seed: int = 0,
    n_features: int = 50,
    n_points: int = 500,
    decay: float = 0.8,
    epochs: int = 5000,
    lr: float = 1e-3,
    threshold: float = 0.75,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> TMSRun:
    """The paper's v1-v3 recipe for one model: one fixed data set, one model, full-batch Adam.

    :func:`tms_data` and :class:`ToyModel` both seeded with ``seed``, trained by
    :func:`train_toy_model` on the importances :func:`feature_importance` ``(n_features,
    decay)``; ``threshold`` as in :func:`represented_features`. The defaults are the paper's.
    """
    data = tms_data(n_points, n_features, sparsity, seed=seed).to(device)
    model = ToyModel(n_features, n_hidden, seed=seed).to(device)
    start = time.perf_counter()
    losses = train_toy_model(model, data, feature_importance(n_features, decay), epochs=epochs,
                             lr=lr, progress=progress)
    return TMSRun(model.eval(), data, losses, time.perf_counter() - start,
                  represented_features(model.W, threshold).cpu())


def represented_features(W: Tensor, threshold: float = 0.75) -> Tensor:
    """``(n,)`` bool: features with ``(W^T W)_ii = ||W[:, i]||**2 >= threshold``."""
    return (W.detach() ** 2).sum(dim=0) >= threshold


def per_feature_error(output: Tensor, target: Tensor) -> Tensor:
    """``(n,)``: the mean over points of ``(output_i - target_i)**2`` (no importance)."""
    return ((output - target) ** 2).mean(dim=0)


class _OutputWeighted(LinearOperator):
    def __init__(self, operator: LinearOperator, scale: np.ndarray) -> None:
        self.operator, self.scale = operator, scale
        super().__init__(dtype=np.float64, shape=operator.shape)

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(self.shape[0], -1)
        return self.scale[:, None] * self.operator.matmat(self.scale[:, None] * x)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

    def _adjoint(self) -> LinearOperator:
        return self

    @property
    def n_matvecs(self) -> int:
        """Products of the wrapped operator so far (0 if it does not count them)."""
        return getattr(self.operator, "n_matvecs", 0)


def output_weighted(operator: LinearOperator, weights: Tensor | np.ndarray) -> LinearOperator:
    """``D^(1/2) K D^(1/2)`` for a full ``(N*C, N*C)`` kernel K, ``D = I_N kron diag(weights)``.

    Args:
        operator: e.g. ``ntk_operator(model, x, output="full")``, rows ``n*C + c``.
        weights: ``(C,)`` nonnegative per-output weights (the TMS importances).
    """
    w = as_tensor(weights, torch.float64, "cpu").numpy()
    dim = operator.shape[0]
    if w.ndim != 1 or dim % w.size or (w < 0).any():
        raise ValueError(f"weights must be (C,) nonnegative with C dividing the operator's "
                         f"dimension {dim}; got shape {w.shape}")
    return _OutputWeighted(operator, np.tile(np.sqrt(w), dim // w.size))


def output_mass(vectors: Tensor | np.ndarray, n_outputs: int) -> Tensor:
    """``(k, C)``: the share of each unit eigenvector's squared norm on each output.

    Args:
        vectors: ``(N*C, k)`` eigenvectors of a full kernel, rows ``n*C + c``.
        n_outputs: C.

    Returns:
        Rows sum to 1; entry [j, c] = sum over n of ``v_j[n*C + c]**2 / ||v_j||**2``.
    """
    v = as_tensor(vectors, torch.float64, "cpu")
    if v.ndim != 2 or v.shape[0] % n_outputs:
        raise ValueError(f"vectors must be (N*C, k) with C={n_outputs} dividing N*C; got "
                         f"{tuple(v.shape)}")
    mass = (v.reshape(-1, n_outputs, v.shape[1]) ** 2).sum(dim=0).T
    return mass / mass.sum(dim=1, keepdim=True).clamp_min(1e-300)


@dataclass
class ModeFeatures:
    """Which output (feature) each eigenvector of a full TMS kernel lives on.

    ``feature`` (k,) long: the output with the largest share of the mode's squared norm;
    ``share`` (k,): that share.
    """

    feature: Tensor
    share: Tensor


def mode_features(vectors: Tensor | np.ndarray, n_outputs: int) -> ModeFeatures:
    """:class:`ModeFeatures` of eigenvectors ``(N*C, k)`` (rows ``n*C + c``), C = n_outputs."""
    share, feature = output_mass(vectors, n_outputs).max(dim=1)
    return ModeFeatures(feature, share)


def indicator_mass(vectors: Tensor | np.ndarray, data: Tensor) -> Tensor:
    """``(k, C)``: the share of each mode's squared norm on output i where feature i is present.

    Args:
        vectors: ``(N*C, k)`` eigenvectors of a full TMS kernel, rows ``n*C + c``.
        data: ``(N, C)`` the kernel's inputs; feature i is present at point n when
            ``data[n, i] > 0``.

    Returns:
        float64; entry [j, i] = sum over n with ``data[n, i] > 0`` of ``v_j[n*C + i]**2 /
        ||v_j||**2``. A row sums to at most 1 (to 1 when the mode lives where features are).
    """
    n, c = data.shape
    v = as_tensor(vectors, torch.float64, "cpu")
    if v.ndim != 2 or v.shape[0] != n * c:
        raise ValueError(f"vectors must be (N*C, k) = ({n * c}, k) for data of shape "
                         f"{tuple(data.shape)}; got {tuple(v.shape)}")
    squares = v.reshape(n, c, -1) ** 2
    present = (data.detach().cpu() > 0).double()[:, :, None]
    return ((squares * present).sum(0) / squares.sum((0, 1)).clamp_min(1e-300)).T


def ablation_target(modes: ModeFeatures, tracked: Tensor, min_share: float = 0.5
                    ) -> tuple[int, Tensor]:
    """The feature a causal check removes, and the modes that carry it, chosen by the eNTK.

    The feature is the dominant output of the first (largest-eigenvalue) mode with at least
    ``min_share`` of its mass on one output, among outputs that ``tracked`` ``(C,)`` bool
    marks (e.g. :meth:`FeatureCoverage.tracked`). Its modes are every mode with at least
    ``min_share`` on it.

    Returns:
        ``(feature, mode indices (m,) long)``.
    """
    eligible = torch.nonzero((modes.share >= min_share) & tracked[modes.feature]).flatten()
    if eligible.numel() == 0:
        raise ValueError(f"no mode has {min_share:.0%} of its mass on one tracked output: "
                         "lower min_share or pass more modes")
    feature = int(modes.feature[eligible[0]])
    return feature, torch.nonzero((modes.feature == feature)
                                  & (modes.share >= min_share)).flatten()


@dataclass
class FeatureCoverage:
    """How an eigen-block of a full TMS kernel covers each feature (output).

    ``coverage`` (C,): the block's squared norm on output c, summed over its orthonormal
    vectors (the trace of the block's projector on that output; they add up to the block's
    dimension, and a block with one mode per output gives about 1 each). ``off_ratio`` (C,):
    the share of that mass on data points where feature c is zero, divided by the fraction
    of such points. About 1: the block ignores whether the feature is present (e.g. the
    bias mode of an output that is always on); near 0: it lives where the feature is.
    Both are invariant under rotations inside the block, so near-degenerate eigenvalues that
    mix their vectors do not change them.
    """

    coverage: Tensor
    off_ratio: Tensor

    def tracked(self, min_coverage: float = 0.5, max_off_ratio: float = 0.75) -> Tensor:
        """``(C,)`` bool: features the block covers and that it sees only where present."""
        return (self.coverage >= min_coverage) & (self.off_ratio < max_off_ratio)


def feature_coverage(vectors: Tensor | np.ndarray, data: Tensor) -> FeatureCoverage:
    """:class:`FeatureCoverage` of an orthonormal block ``(N*C, k)`` (rows ``n*C + c``) of the
    full kernel of a TMS model over ``data`` ``(N, C)``."""
    n, c = data.shape
    v = as_tensor(vectors, torch.float64, "cpu")
    if v.ndim != 2 or v.shape[0] != n * c:
        raise ValueError(f"vectors must be (N*C, k) = ({n * c}, k) for data of shape "
                         f"{tuple(data.shape)}; got {tuple(v.shape)}")
    squares = (v.reshape(n, c, -1) ** 2).sum(dim=2)            # (N, C)
    coverage = squares.sum(dim=0)
    off = (data.detach().cpu() == 0).double()
    off_fraction = off.mean(dim=0).clamp_min(1e-300)
    off_ratio = (squares * off).sum(dim=0) / coverage.clamp_min(1e-300) / off_fraction
    return FeatureCoverage(coverage, off_ratio)
