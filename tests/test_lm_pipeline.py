"""``entk_helpers.lm.layer_directions`` against dense eigh, and the README's LM example."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from lm_tiny_models import (  # noqa: E402
    VOCAB,
    WEIGHTS,
    hidden_jacobian,
    logit_jacobian,
    tiny_model,
)

from entk_helpers.lm import (  # noqa: E402
    capture_prefix,
    example_scores,
    layer_directions,
    layer_weight,
    sqrt_psd,
    text_windows,
    top_contexts,
    unembedding_gram,
)

N, T = 4, 6
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(("arch", "layer", "kind"), [("gemma3_text", 1, 0), ("llama", 2, 0),
                                                     ("gpt2", 2, 1)])
def test_layer_directions_match_dense_eigh_and_pca(arch: str, layer: int, kind: int) -> None:
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (N, T))
    weight = layer_weight(model, layer, WEIGHTS[arch][kind])
    prefix = capture_prefix(model, ids, weight)[weight]
    k = 3
    s_half = sqrt_psd(unembedding_gram(model, chunk_size=7))
    found = layer_directions(model, prefix, s_half=s_half, k=k, steps=40, progress=True)
    J = logit_jacobian(model, ids, weight)
    values = torch.linalg.eigvalsh(J @ J.T)
    np.testing.assert_allclose(found.values, values.flip(0)[:k].numpy(), rtol=1e-5)
    assert found.residuals.max() < 1e-6
    assert found.products == 40  # read from the operator by top_eigenpairs
    assert found.route == ("structured" if layer == 2 else "tail") and found.weight == weight
    assert found.memory_plan == ("" if layer == 2 else
                                 "VJP graph stored, JVP graph stored, 4 windows per chunk")
    # PCA scores: centred block outputs on their principal axes (numpy SVD)
    X = prefix.block_out_last.numpy()
    u, s, _ = np.linalg.svd(X - X.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(found.pca[:, :2]), np.abs(u[:, :2] * s[:2]), atol=1e-8)
    # per-example scores: from the eigenvectors of K~ formed densely from the brute force
    # (I kron S^1/2) J_r J_r^T (I kron S^1/2), S = U^T U from the output embedding
    U = model.get_output_embeddings().weight.detach()
    big = torch.block_diag(*[sqrt_psd(U.T @ U)] * N)
    Jr = hidden_jacobian(model, ids, weight)
    dense = big @ Jr @ Jr.T @ big
    reference = example_scores(torch.linalg.eigh(dense)[1].flip(1)[:, :k], N)
    for j in range(k):  # each column up to its arbitrary sign
        assert min(abs(found.entk[:, j] - reference[:, j]).max(),
                   abs(found.entk[:, j] + reference[:, j]).max()) < 1e-5

def test_example_scores_are_the_top_singular_pair() -> None:
    rng = np.random.default_rng(1)
    u, w = rng.standard_normal(5), rng.standard_normal(4)
    scores = example_scores(np.outer(u, w).reshape(-1, 1), 5)[:, 0]
    expected = u * np.linalg.norm(w)
    assert np.allclose(scores, expected) or np.allclose(scores, -expected)
    with pytest.raises(ValueError, match="n=3"):
        example_scores(np.ones((10, 2)), 3)


class _Words:
    """A whitespace word tokenizer with the ``__call__`` / ``decode`` of a HF tokenizer."""

    def __init__(self, words: list[str]) -> None:
        self.vocab = {w: i for i, w in enumerate(words)}
        self.words = words

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [self.vocab[w] for w in text.split()]}

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def test_text_windows_and_top_contexts() -> None:
    tok = _Words(["a", "b", "c", "d", "e"])
    ids = text_windows(tok, ["a b c d e", "e d c"], length=2)
    assert ids.tolist() == [[0, 1], [2, 3], [4, 3]]
    assert text_windows(tok, ["a b c d e"], length=2, max_windows=1).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="no text has 9 tokens"):
        text_windows(tok, ["a b"], length=9)
    scores = np.array([0.1, -3.0, 2.0])  # oriented so that the largest |score| is positive
    assert top_contexts(tok, ids, scores, n=2, context=2) == ["c[d]", "a[b]"]


def _readme_example() -> str:
    text = README.read_text()
    match = re.search(r"## Your own language model.*?```python\n(.*?)```", text, re.S)
    assert match, "README.md has no '## Your own language model' python block"
    return match.group(1)


def test_the_readme_language_model_example_runs_on_a_tiny_model(tmp_path, monkeypatch,
                                                                capsys) -> None:
    """The README's code, unchanged but for the model name, on a tiny random GPT-2 and a
    word-level tokenizer saved offline, and a small corpus in ``my_corpus.txt``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    code = _readme_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 12
    words = [f"w{i}" for i in range(VOCAB - 1)] + ["[UNK]"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    model = tiny_model("gpt2", layers=12)
    model.float().save_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    stories = [" ".join(rng.choice(words[:-1], 40)) for _ in range(30)]
    (tmp_path / "my_corpus.txt").write_text("\n\n".join(stories))
    monkeypatch.chdir(tmp_path)
    name_line = re.search(r'^name = "[^"]*"', code, re.M)
    assert name_line, "the example names its model on one line: name = \"...\""
    code = code.replace(name_line.group(0), f'name = "{tmp_path}"')
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 3 and all("[" in line for line in printed)
