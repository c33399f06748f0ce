"""Corpus loading, token/word alignment and label filters (no Gemma weights needed)."""

from __future__ import annotations

import numpy as np
import pytest

from entk_helpers.experiments import grammar


def test_shipped_corpus_loads(monkeypatch):
    monkeypatch.setattr("entk_helpers.lm.loading._hub_reachable", lambda timeout=3.0: False)
    stories, name = grammar.load_corpus()
    assert len(stories) >= 20 and "shipped" in name
    assert all(grammar.STORY_SEPARATOR not in s for s in stories)


def test_thresholds_scale_with_n():
    assert grammar._thresholds(1024)["min_support"] == 30
    assert grammar._thresholds(1024)["min_distinct_words"] == 12
    assert grammar._thresholds(128)["min_support"] == 8


class _ToyTokenizer:
    """Whitespace-and-punctuation tokenizer with leading-space tokens, like Gemma's."""

    bos_token_id = 0

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=True):
        import re

        spans = [m.span() for m in re.finditer(r" ?\w+| ?[^\w\s]|\s", text)]
        return {"input_ids": [hash(text[a:b]) % 1000 + 1 for a, b in spans],
                "offset_mapping": spans}


def test_candidates_align_words_to_tokens():
    try:
        nlp = grammar.load_tagger()
    except RuntimeError:
        pytest.skip("no spaCy English model installed")
    story = "Tom had a red ball. He kicked the ball and it flew far away."
    cands = grammar._candidates([story], _ToyTokenizer(), nlp, T=3)
    assert cands, "expected targets"
    for c in cands:
        tok = _ToyTokenizer()(story)["offset_mapping"][c["token"]]
        assert story[tok[0]:tok[1]].strip() == c["word"]
        assert c["pos"] in grammar.UPOS_CLASSES and len(c["ids"]) == 3
    pos = {c["word"]: c["pos"] for c in cands}
    assert pos.get("ball") == "NOUN" and pos.get("kicked") == "VERB" and pos.get(".") == "PUNCT"
    kicked = next(c for c in cands if c["word"] == "kicked")
    assert "Tense=Past" in kicked["morph"]


class _StubTagger:
    """Only what the cache key reads: spaCy's ``meta``."""

    def __init__(self, version: str = "3.8.0") -> None:
        self.meta = {"lang": "en", "name": "core_web_sm", "version": version}


def _toy_dataset() -> grammar.GrammarDataset:
    import numpy as np
    import torch

    pos = np.array(["NOUN", "VERB", "NOUN", "DET"])
    return grammar.GrammarDataset(
        input_ids=torch.tensor([[2, 5, 6], [2, 7, 8], [2, 9, 1], [2, 3, 4]]),
        pos=pos, words=["ball", "ran", "cat", "the"],
        contexts=["Tom had a", "The dog", "A ", "He saw"],
        labels={"NOUN": pos == "NOUN", "Number=Sing": np.array([True, False, True, False])},
        info={"N": 4, "seed": 3, "checked": {"NOUN": 5}})


def test_dataset_cache_round_trip_without_pickle(tmp_path):
    import numpy as np

    data = _toy_dataset()
    grammar.save_dataset(data, tmp_path / "grammar-x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grammar-x.json", "grammar-x.npz"]
    with np.load(tmp_path / "grammar-x.npz", allow_pickle=False) as arrays:
        assert all(arrays[k].dtype != object for k in arrays.files)
    back = grammar.load_dataset(tmp_path / "grammar-x")
    assert back.input_ids.dtype == data.input_ids.dtype
    assert (back.input_ids == data.input_ids).all() and (back.pos == data.pos).all()
    assert back.words == data.words and back.contexts == data.contexts and back.info == data.info
    assert list(back.labels) == list(data.labels)
    assert all((back.labels[k] == data.labels[k]).all() for k in data.labels)


def test_cache_key_depends_on_everything_that_shapes_the_dataset():
    base = {"model_source": "m", "tagger": grammar.tagger_id(_StubTagger()),
            "corpus": ["a story", "another"], "n": 32, "T": 8, "seed": 0}
    changed = [{"model_source": "m2"}, {"tagger": grammar.tagger_id(_StubTagger("3.9.0"))},
               {"corpus": ["a story", "another!"]}, {"n": 40}, {"T": 9}, {"seed": 1}]
    key = grammar.dataset_cache_key(**base)
    assert key == grammar.dataset_cache_key(**base)
    keys = {grammar.dataset_cache_key(**{**base, **c}) for c in changed}
    assert len(keys) == len(changed) and key not in keys


def test_build_dataset_reads_its_cache_without_the_model(tmp_path):
    data = _toy_dataset()
    stories = ["Tom had a ball.", "The dog ran."]
    nlp = _StubTagger()
    key = grammar.dataset_cache_key(model_source="m", tagger=grammar.tagger_id(nlp),
                                    corpus=stories, n=8, T=2, seed=3)
    grammar.save_dataset(data, tmp_path / f"grammar-{key}")
    # model and tokenizer None: a cache hit must not touch them
    back = grammar.build_dataset(None, None, stories, n_per_class=1, T=2, seed=3,
                                 model_source="m", cache_folder=tmp_path, nlp=nlp)
    assert back.words == data.words
    with pytest.raises(AttributeError):  # another seed misses the cache and starts building
        grammar.build_dataset(None, None, stories, n_per_class=1, T=2, seed=4,
                              model_source="m", cache_folder=tmp_path, nlp=nlp)
    with pytest.raises(ValueError, match="n_per_class"):
        grammar.build_dataset(None, None, stories, n_per_class=0, cache_folder=tmp_path, nlp=nlp)


def test_top_windows_orders_by_signed_score_and_lists_morphology():
    data = _toy_dataset()
    n = len(data.pos)
    scores = np.arange(n, dtype=float)
    rows = grammar.top_windows(data, scores, n=2)
    assert [r["score"] for r in rows] == [n - 1, n - 2]
    assert rows[0]["next word"] == data.words[n - 1] and rows[0]["POS"] == data.pos[n - 1]
    morph = [lab for lab in data.labels if lab not in grammar.UPOS_CLASSES]
    assert rows[0]["morphology"] == ", ".join(m for m in morph if data.labels[m][n - 1])
    assert grammar.top_windows(data, scores, n=1, sign=-1)[0]["score"] == 0.0
    with pytest.raises(ValueError, match="one column"):
        grammar.top_windows(data, np.zeros((n, 2)))
