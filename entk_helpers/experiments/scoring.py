"""Scoring candidate feature directions against binary labels, as in the paper's Table 3.

Each of K candidate directions (eNTK eigenvectors or principal components) gives one score per
example. For every label we pick the single best direction and sign by average precision (AP) on
a training half, then report on the held-out half: AP, AUROC, precision@quota (precision among
the top-``n_pos`` scores) and enrichment@quota (that precision divided by the base rate).

Everything is plain numpy; AP and AUROC treat tied scores the way scikit-learn does (ties share
one threshold; AUROC counts a tied positive/negative pair as one half). Limits: with few positives
in the test half (default notebook mode has ~8 per class) these numbers are noisy, so
:func:`bootstrap_macro` gives percentile intervals over resampled test sets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


def _check_binary(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    if not np.isin(labels, [0, 1, False, True]).all():
        raise ValueError("labels must be binary (0/1 or bool)")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise ValueError("labels need at least one positive and one negative")
    return scores, labels


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision: sum over distinct thresholds of (recall step) x precision.

    Args:
        scores: (n,) real scores, higher = more likely positive.
        labels: (n,) binary.
    """
    scores, labels = _check_binary(scores, labels)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tp = np.cumsum(y)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall_step = np.diff(np.r_[0, tp]) / y.sum()
    return float(np.sum(recall_step * precision))


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > random negative), ties 1/2.

    Computed from average ranks (Mann-Whitney U). Shapes as in :func:`average_precision`.
    """
    scores, labels = _check_binary(scores, labels)
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(s.size)
    start = 0
    # average rank (1-based) within each group of tied scores
    for end in np.r_[np.flatnonzero(np.diff(s)) + 1, s.size]:
        ranks[start:end] = 0.5 * (start + 1 + end)
        start = end
    full = np.empty_like(ranks)
    full[order] = ranks
    n_pos = labels.sum()
    n_neg = labels.size - n_pos
    return float((full[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def precision_at_quota(scores: np.ndarray, labels: np.ndarray) -> float:
    """Precision among the ``n_pos`` highest scores (ties broken by order of appearance)."""
    scores, labels = _check_binary(scores, labels)
    quota = int(labels.sum())
    top = np.argsort(-scores, kind="mergesort")[:quota]
    return float(labels[top].mean())


def enrichment_at_quota(scores: np.ndarray, labels: np.ndarray) -> float:
    """precision@quota divided by the base rate ``n_pos / n`` (1 = chance)."""
    scores, labels = _check_binary(scores, labels)
    return precision_at_quota(scores, labels) / float(labels.mean())


def stratified_split(groups: np.ndarray, *, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Boolean train mask taking ``fraction`` of each group (e.g. the POS class), seeded.

    Args:
        groups: (n,) group ids (any hashable dtype).
    Returns:
        (n,) bool, True = train. Each group contributes ``round(fraction * size)`` examples.
    """
    groups = np.asarray(groups)
    if not 0.0 < fraction < 1.0:
        raise ValueError("fraction must be in (0, 1)")
    rng = np.random.default_rng(seed)
    train = np.zeros(groups.size, dtype=bool)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        chosen = rng.permutation(idx)[: int(round(fraction * idx.size))]
        train[chosen] = True
    return train


@dataclass(frozen=True)
class LabelScore:
    """Held-out metrics of the best (direction, sign) for one label."""

    label: str
    direction: int
    sign: int
    train_ap: float
    test_ap: float
    test_auroc: float
    precision_at_quota: float
    enrichment_at_quota: float
    n_pos_test: int


def best_direction(
    scores: np.ndarray, labels: np.ndarray, train: np.ndarray
) -> tuple[int, int, float]:
    """Direction index and sign (+1/-1) with the highest AP on the training examples.

    Args:
        scores: (n, K) one column per candidate direction.
        labels: (n,) binary.
        train: (n,) bool mask.
    Returns:
        (direction, sign, train AP).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n, K), got {scores.shape}")
    best = (-1, 1, -np.inf)
    for k in range(scores.shape[1]):
        for sign in (1, -1):
            ap = average_precision(sign * scores[train, k], labels[train])
            if ap > best[2]:
                best = (k, sign, ap)
    return best


def score_label(
    name: str, scores: np.ndarray, labels: np.ndarray, train: np.ndarray
) -> LabelScore:
    """Pick the direction on ``train``, report held-out metrics on ``~train``."""
    labels = np.asarray(labels).astype(bool)
    train = np.asarray(train, dtype=bool)
    k, sign, train_ap = best_direction(scores, labels, train)
    s, y = sign * np.asarray(scores)[~train, k], labels[~train]
    return LabelScore(
        label=name,
        direction=k,
        sign=sign,
        train_ap=train_ap,
        test_ap=average_precision(s, y),
        test_auroc=auroc(s, y),
        precision_at_quota=precision_at_quota(s, y),
        enrichment_at_quota=enrichment_at_quota(s, y),
        n_pos_test=int(y.sum()),
    )


def score_labels(
    scores: np.ndarray, labels: Mapping[str, np.ndarray], train: np.ndarray
) -> list[LabelScore]:
    """:func:`score_label` for every label; ``scores`` is (n, K), each label (n,) binary."""
    return [score_label(name, scores, y, train) for name, y in labels.items()]


def macro_means(rows: list[LabelScore]) -> dict[str, float]:
    """Unweighted means over labels of test AP, AUROC, precision@ and enrichment@quota."""
    if not rows:
        raise ValueError("no labels to average")
    keys = ("test_ap", "test_auroc", "precision_at_quota", "enrichment_at_quota")
    return {k: float(np.mean([getattr(r, k) for r in rows])) for k in keys}


def is_morphology_label(name: str) -> bool:
    """UD morphology features are named ``Key=Value`` (``Number=Sing``); UPOS classes are not."""
    return "=" in name


def family_macros(rows: list[LabelScore]) -> dict[str, dict[str, float]]:
    """The paper's two macros, never one: ``{"macro_pos": ..., "macro_morphology": ...}``.

    ``macro_pos`` averages the UPOS labels only, ``macro_morphology`` the morphology labels
    only (:func:`is_morphology_label`); each value is :func:`macro_means` of that family. A
    family with no labels (e.g. every morphology label failed the support filter) is left out.
    """
    families = {
        "macro_pos": [r for r in rows if not is_morphology_label(r.label)],
        "macro_morphology": [r for r in rows if is_morphology_label(r.label)],
    }
    return {name: macro_means(family) for name, family in families.items() if family}


def bootstrap_macro(
    score_sets: Mapping[str, np.ndarray],
    rows: Mapping[str, list[LabelScore]],
    labels: Mapping[str, np.ndarray],
    train: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    family: str | None = None,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap of the macro test AUROC, directions held fixed.

    The test examples are resampled with replacement (the same resample for every method, so
    differences are paired); each label keeps the direction and sign chosen on train.

    Args:
        score_sets: method -> (n, K) scores (e.g. {"entk": ..., "pca": ...}).
        rows: method -> the :class:`LabelScore` list from :func:`score_labels`.
        labels: label name -> (n,) binary.
        train: (n,) bool mask.
        family: ``"macro_pos"`` or ``"macro_morphology"`` to average only that family's labels
            (as :func:`family_macros` does); ``None`` averages every label in ``rows``.
    Returns:
        {method: {"mean", "low", "high"}} plus, with two methods a and b, {"a-b": ...} for the
        paired difference of macro AUROCs.
    """
    if family not in (None, "macro_pos", "macro_morphology"):
        raise ValueError(f"family={family!r}: use 'macro_pos', 'macro_morphology' or None")
    if family is not None:
        morph = family == "macro_morphology"
        rows = {m: [r for r in rs if is_morphology_label(r.label) == morph]
                for m, rs in rows.items()}
        if not all(rows[m] for m in score_sets):
            raise ValueError(f"no labels of family {family!r} in rows")
    test = np.flatnonzero(~np.asarray(train, dtype=bool))
    rng = np.random.default_rng(seed)
    methods = list(score_sets)
    draws: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(n_boot):
        idx = rng.choice(test, size=test.size, replace=True)
        for m in methods:
            values = []
            for r in rows[m]:
                y = np.asarray(labels[r.label]).astype(bool)[idx]
                if y.all() or not y.any():
                    continue
                values.append(auroc(r.sign * score_sets[m][idx, r.direction], y))
            draws[m].append(float(np.mean(values)))
    alpha = (1.0 - level) / 2
    out: dict[str, dict[str, float]] = {}
    arrays = {m: np.asarray(v) for m, v in draws.items()}
    if len(methods) == 2:
        arrays[f"{methods[0]}-{methods[1]}"] = arrays[methods[0]] - arrays[methods[1]]
    for m, a in arrays.items():
        out[m] = {
            "mean": float(a.mean()),
            "low": float(np.quantile(a, alpha)),
            "high": float(np.quantile(a, 1 - alpha)),
        }
    return out
