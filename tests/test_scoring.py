"""Scoring metrics against independent references (pair counting, scikit-learn, by hand)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from entk_helpers.experiments.scoring import (
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
    from entk_helpers.experiments.scoring import LabelScore

    def row(label, auroc_value):
        return LabelScore(label, 0, 1, 0.5, 0.5, auroc_value, 0.5, 1.0, 4)

    rows = [row("NOUN", 0.9), row("VERB", 0.7), row("Number=Sing", 0.6), row("Tense=Past", 0.4)]
    macros = family_macros(rows)
    assert macros["macro_pos"]["test_auroc"] == pytest.approx(0.8)
    assert macros["macro_morphology"]["test_auroc"] == pytest.approx(0.5)
    assert set(family_macros(rows[:2])) == {"macro_pos"}


def _pair_count_macro(scores, rows, labels, idx):
    """Macro AUROC of one resample by pair counting over the given labels' rows."""
    return float(np.mean([
        _pair_count_auroc(r.sign * scores[idx, r.direction], labels[r.label][idx].astype(int))
        for r in rows]))


def test_bootstrap_family_filter_matches_direct_pos_macro():
    """The POS-family bootstrap equals a direct pair-counting computation on the same resamples:
    one resample (n_boot=1) drawn with the generator the docstring promises (seeded, test
    indices with replacement), macro over the UPOS labels only."""
    rng = np.random.default_rng(3)
    n = 80
    pos = np.array(["NOUN", "VERB"] * (n // 2))
    labels = {"NOUN": pos == "NOUN", "VERB": pos == "VERB",
              "Number=Sing": rng.random(n) < 0.4}
    scores = rng.standard_normal((n, 4)) + 1.5 * labels["NOUN"][:, None] * np.eye(4)[0]
    train = stratified_split(pos, seed=0)
    rows = score_labels(scores, labels, train)
    test = np.flatnonzero(~train)
    for seed in range(3):
        got = bootstrap_macro({"a": scores}, {"a": rows}, labels, train, n_boot=1, seed=seed,
                              family="macro_pos")["a"]
        idx = np.random.default_rng(seed).choice(test, size=test.size, replace=True)
        pos_rows = [r for r in rows if "=" not in r.label]
        want = _pair_count_macro(scores, pos_rows, labels, idx)
        assert got["mean"] == pytest.approx(want, abs=1e-12)
        everything = bootstrap_macro({"a": scores}, {"a": rows}, labels, train, n_boot=1,
                                     seed=seed)["a"]
        assert everything["mean"] == pytest.approx(_pair_count_macro(scores, rows, labels, idx))


def test_bootstrap_pos_family_known_answer_and_bad_family():
    """Perfectly separating POS directions give a POS macro of exactly 1 in every resample,
    whatever the (random) morphology label does; an unknown family name is refused."""
    rng = np.random.default_rng(0)
    n = 60
    pos = np.array(["NOUN", "VERB", "DET"] * (n // 3))
    labels = {c: pos == c for c in ("NOUN", "VERB", "DET")}
    labels["Number=Sing"] = rng.random(n) < 0.5
    scores = np.stack([labels[c].astype(float) for c in ("NOUN", "VERB", "DET")]
                      + [rng.standard_normal(n)], axis=1)
    train = stratified_split(pos, seed=1)
    rows = score_labels(scores, labels, train)
    out = bootstrap_macro({"a": scores, "b": scores}, {"a": rows, "b": rows}, labels, train,
                          n_boot=50, family="macro_pos")
    assert out["a"] == {"mean": 1.0, "low": 1.0, "high": 1.0}
    assert out["a-b"]["mean"] == 0.0
    morph = bootstrap_macro({"a": scores}, {"a": rows}, labels, train, n_boot=50,
                            family="macro_morphology")["a"]
    assert morph["mean"] < 1.0
    with pytest.raises(ValueError, match="family"):
        bootstrap_macro({"a": scores}, {"a": rows}, labels, train, family="pos")
