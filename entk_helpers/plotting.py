"""Small matplotlib helpers shared by the notebooks: spectra, training curves, p x p images.

Each function draws on an ``Axes`` it is given and returns it, so a notebook keeps control of
the figure layout. Nothing here computes science: inputs are eigenvalues, histories and
vectors computed elsewhere; matplotlib itself is never imported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._arrays import as_tensor
from .eigen import Cliff

CLIFF_COLORS = ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive")


def plot_spectrum(
    ax: Any,
    eigenvalues: Tensor | np.ndarray,
    cliffs: Sequence[Cliff] = (),
    *,
    n_show: int | None = None,
    label: str | None = None,
    color: str = "black",
) -> Any:
    """Eigenvalues (descending) against their index on a log scale, cliffs shaded.

    Args:
        ax: a matplotlib ``Axes``.
        eigenvalues: ``(n,)`` descending.
        cliffs: from :func:`entk_helpers.find_cliffs`; each is shaded and labelled with its
            index range and size.
        n_show: plot only the first ``n_show`` eigenvalues.
    """
    lam = as_tensor(eigenvalues, torch.float64, "cpu").numpy()[:n_show]
    index = np.arange(lam.size)
    positive = lam > 0
    ax.semilogy(index[positive], lam[positive], ".", ms=3, color=color, label=label)
    for i, cliff in enumerate(cliffs):
        if cliff.start >= lam.size:
            break
        ax.axvspan(cliff.start - 0.5, min(cliff.stop, lam.size) - 0.5, alpha=0.2,
                   color=CLIFF_COLORS[i % len(CLIFF_COLORS)],
                   label=f"cliff {i}: {cliff.start}-{cliff.stop - 1} ({cliff.size})")
    ax.set_xlabel("eigenvalue index")
    ax.set_ylabel("eigenvalue")
    return ax


def plot_training_curves(
    ax: Any,
    history: Mapping[str, np.ndarray],
    *,
    metric: str = "acc",
    log_y: bool = False,
    legend_loc: str = "center right",
) -> Any:
    """Train and test curves of one metric against the epoch.

    Args:
        history: arrays ``epoch`` and ``train_<metric>``, ``test_<metric>`` (as in
            :class:`entk_helpers.experiments.modular.TrainingRun`).
        metric: ``"acc"`` or ``"loss"``.
        log_y: log scale for the y axis (useful for losses).
        legend_loc: a fixed legend position (``"best"`` is slow on long histories).
    """
    for split, color in (("train", "tab:blue"), ("test", "tab:red")):
        ax.plot(history["epoch"], history[f"{split}_{metric}"], color=color, label=split)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel({"acc": "accuracy", "loss": "loss"}.get(metric, metric))
    ax.legend(loc=legend_loc)
    return ax


def eigenvector_image(
    ax: Any, vector: Tensor | np.ndarray, p: int, *, title: str | None = None,
    axis_labels: bool = True,
) -> Any:
    """A vector over the p*p inputs (row ``a * p + b``) as a p x p image, zero in white.

    Fourier modes show as stripes: vertical/horizontal for the a/b families, diagonal for
    the sum (a + b) and diff (a - b) families.
    """
    v = as_tensor(vector, torch.float64, "cpu").numpy()
    if v.shape != (p * p,):
        raise ValueError(f"expected a vector of length p*p = {p * p}, got shape {v.shape}")
    scale = max(float(np.abs(v).max()), 1e-300)
    image = ax.imshow(v.reshape(p, p), cmap="RdBu_r", vmin=-scale, vmax=scale,
                      interpolation="nearest")
    if axis_labels:
        ax.set_xlabel("b")
        ax.set_ylabel("a")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=9)
    return image


def overlap_heatmap(
    ax: Any,
    values: Tensor | np.ndarray,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    fmt: str = "{:.1f}",
    cmap: str = "viridis",
) -> Any:
    """A small annotated heatmap, e.g. cliffs (rows) against feature families (columns)."""
    data = as_tensor(values, torch.float64, "cpu").numpy()
    image = ax.imshow(data, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    high = float(np.nanmax(data)) if data.size else 0.0
    for (i, j), value in np.ndenumerate(data):
        ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=8,
                color="black" if value > 0.6 * high else "white")
    return image

