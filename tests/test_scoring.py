"""Scoring metrics against independent references (pair counting, scikit-learn, by hand)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from entk_helpers.scoring import (
    auroc,
    average_precision,
    best_direction,
    bootstrap_macro,
    enrichment_at_quota,
    family_macros,
    macro_means,
    precision_at_quota,
    score_labels,
    stratified_split,
)


def _pair_count_auroc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_pair_counting_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40).astype(float)  # many ties
    labels = rng.integers(0, 2, 40)
    assert auroc(scores, labels) == pytest.approx(_pair_count_auroc(scores, labels))


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_sklearn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    scores = np.round(rng.standard_normal(50), 1)
    labels = rng.integers(0, 2, 50)
    assert average_precision(scores, labels) == pytest.approx(
        metrics.average_precision_score(labels, scores))
    assert auroc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores))


def test_hand_computed_values():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    labels = np.array([1, 0, 1, 0])
    assert average_precision(scores, labels) == pytest.approx((1 + 2 / 3) / 2)
    assert precision_at_quota(scores, labels) == 0.5
    assert enrichment_at_quota(scores, labels) == 1.0
    assert auroc(scores, labels) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        auroc(scores, np.zeros(4))


def test_split_and_best_direction():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 10)
    train = stratified_split(groups, seed=0)
    assert all(train[groups == g].sum() == 5 for g in range(4))
    y = groups == 2
    scores = rng.standard_normal((40, 5))
    scores[:, 3] = -y.astype(float) + 0.01 * rng.standard_normal(40)  # direction 3, negative
    assert best_direction(scores, y, train)[:2] == (3, -1)
    rows = score_labels(scores, {"g2": y, "g0": groups == 0}, train)
    assert rows[0].test_auroc == 1.0 and rows[0].n_pos_test == 5
    macro = macro_means(rows)
    assert 0.0 <= macro["test_auroc"] <= 1.0
    ci = bootstrap_macro({"a": scores, "b": -scores}, {"a": rows, "b": rows},
                         {"g2": y, "g0": groups == 0}, train, n_boot=50)
    assert ci["a"]["low"] <= ci["a"]["mean"] <= ci["a"]["high"]
    assert "a-b" in ci


def test_family_macros_average_each_family_apart():
    from entk_helpers.scoring import LabelScore

    def row(label, auroc_value):
        return LabelScore(label, 0, 1, 0.5, 0.5, auroc_value, 0.5, 1.0, 4)

    rows = [row("NOUN", 0.9), row("VERB", 0.7), row("Number=Sing", 0.6), row("Tense=Past", 0.4)]
    macros = family_macros(rows)
    assert macros["macro_pos"]["test_auroc"] == pytest.approx(0.8)
    assert macros["macro_morphology"]["test_auroc"] == pytest.approx(0.5)
    assert set(family_macros(rows[:2])) == {"macro_pos"}
