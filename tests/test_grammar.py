"""Corpus loading, token/word alignment and label filters (no Gemma weights needed)."""

from __future__ import annotations

import pytest

from entk_helpers import grammar


def test_shipped_corpus_loads(monkeypatch):
    monkeypatch.setattr("entk_helpers.gemma._hub_reachable", lambda timeout=3.0: False)
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
