"""The fast layer eNTK against brute force on a tiny random Gemma 3 (never the real model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

from entk_helpers import MemoryBudgetError, memory_budget  # noqa: E402
from entk_helpers.gemma import (  # noqa: E402
    LayerEntk,
    capture_prefix,
    example_scores,
    layer_directions,
    make_tail,
    paper_route_operator,
    sqrt_psd,
    tail_memory,
    unembedding_gram,
)

N, T = 3, 6


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    model = Gemma3ForCausalLM(config).double().eval()
    with torch.no_grad():  # random non-zero norm weights, so the norms are not trivial
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    model.requires_grad_(False)
    ids = torch.randint(0, 50, (N, T))
    return model, ids


def _dense_full_logit_kernel(model, ids, layer):
    """J J^T of all last-position logits w.r.t. the layer's down_proj weight, by jacrev."""
    name = f"model.layers.{layer}.mlp.down_proj.weight"
    W = dict(model.named_parameters())[name]

    def logits(w):
        out = torch.func.functional_call(model, {name: w}, (ids,))
        return out.logits[:, -1]  # (N, V)

    J = torch.func.jacrev(logits)(W).reshape(N * model.config.vocab_size, -1)
    return J @ J.T


def _dense_hidden_kernel(model, ids, layer):
    name = f"layers.{layer}.mlp.down_proj.weight"
    W = dict(model.model.named_parameters())[name]

    def hidden(w):
        return torch.func.functional_call(model.model, {name: w}, (ids,)).last_hidden_state[:, -1]

    J = torch.func.jacrev(hidden)(W).reshape(N * model.config.hidden_size, -1)
    return J @ J.T


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_tail_reproduces_last_hidden_state(tiny, layer):
    model, ids = tiny
    prefix = capture_prefix(model, ids, [layer])[layer]
    W = model.model.layers[layer].mlp.down_proj.weight
    h = make_tail(model, layer, T)(prefix.act @ W.T, prefix.resid_mid)
    reference = model.model(input_ids=ids).last_hidden_state[:, -1]
    torch.testing.assert_close(h, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(prefix.hidden_last, reference)
    if layer < 2:  # HF reports the last block's output after the final norm
        states = model.model(input_ids=ids, output_hidden_states=True).hidden_states
        torch.testing.assert_close(prefix.block_out_last, states[layer + 1][:, -1])
    else:
        torch.testing.assert_close(model.model.norm(prefix.block_out_last), reference)


@pytest.mark.parametrize(("layer", "store_vjp", "store_jvp"),
                         [(0, None, None), (0, None, False), (0, False, False), (2, None, None)])
def test_operator_matches_brute_force(tiny, layer, store_vjp, store_jvp):
    model, ids = tiny
    d = model.config.hidden_size
    prefix = capture_prefix(model, ids, [layer])[layer]
    S = unembedding_gram(model, chunk=7)
    U = model.lm_head.weight
    torch.testing.assert_close(S, U.T @ U)
    op = LayerEntk.build(model, prefix, sqrt_psd(S), chunk_size=2, store_vjp=store_vjp,
                         store_jvp=store_jvp)
    assert op.route == ("structured" if layer == 2 else "tail")
    if layer == 0:  # the tiny model's tail fits any default budget: kept unless refused
        assert op.extras["vjp"] == ("recomputed" if store_vjp is False else "stored")
        assert op.extras["jvp"] == {None: "stored", False: "recomputed" if store_vjp is False
                                    else "rebuilt"}[store_jvp]

    # K_r against J_r J_r^T, column by column. HF's eager attention takes its softmax in
    # float32 even in a float64 model, hence tolerances of ~1e-6 relative to the largest entry.
    Kr = _dense_hidden_kernel(model, ids, layer)
    tol = 1e-6 * Kr.abs().max().item()
    eye = torch.eye(N * d, dtype=torch.float64).reshape(N, d, N * d)
    Kr_fast = op.kr_matmat(eye).reshape(N * d, N * d)
    torch.testing.assert_close(Kr_fast, Kr, rtol=1e-5, atol=tol)

    # spectrum of S^1/2 K_r S^1/2 equals the nonzero spectrum of the all-logit kernel
    Sh = sqrt_psd(S)
    Sh_big = torch.block_diag(*[Sh] * N)
    Kt = Sh_big @ Kr_fast @ Sh_big
    ev_fast = torch.linalg.eigvalsh(Kt).flip(0).numpy()
    ev_full = torch.linalg.eigvalsh(_dense_full_logit_kernel(model, ids, layer)).flip(0).numpy()
    np.testing.assert_allclose(ev_fast, ev_full[: N * d], rtol=1e-5, atol=1e-6 * ev_full[0])

    # the scipy operator on K~, and the paper's route (full recompute per product), agree
    lin = op.linear_operator(dtype=torch.float64)
    X = np.random.default_rng(0).standard_normal((N * d, 2))
    expected = Kt.numpy() @ X
    np.testing.assert_allclose(lin.matmat(X), expected, rtol=1e-5, atol=1e-6 * abs(expected).max())
    paper = paper_route_operator(model, ids, layer, Sh)
    np.testing.assert_allclose(
        paper.matvec(X[:, 0]), expected[:, 0], rtol=1e-5, atol=1e-6 * abs(expected).max()
    )


def test_example_scores_are_top_singular_pair():
    rng = np.random.default_rng(1)
    u = rng.standard_normal(5)
    w = rng.standard_normal(4)
    vec = np.outer(u, w).reshape(-1, 1)  # rank one: score = u * |w| up to sign
    scores = example_scores(vec, 5)[:, 0]
    expected = u * np.linalg.norm(w)
    assert np.allclose(scores, expected) or np.allclose(scores, -expected)


@pytest.mark.parametrize("layer", [1, 2])
def test_layer_directions_match_dense_eigh_and_pca(tiny, layer):
    model, ids = tiny
    prefix = capture_prefix(model, ids, [layer])[layer]
    S = unembedding_gram(model)
    k = 3
    found = layer_directions(model, prefix, sqrt_psd(S), k=k, steps=40, progress=True)
    # reference: the nonzero spectrum of the all-logit kernel J J^T, by jacrev and eigh
    ev_full = torch.linalg.eigvalsh(_dense_full_logit_kernel(model, ids, layer)).flip(0).numpy()
    np.testing.assert_allclose(found.values, ev_full[:k], rtol=1e-5)
    assert found.residuals.max() < 1e-6
    assert found.entk.shape == (N, k) and found.pca.shape == (N, k)
    # PCA scores: centred block outputs projected on their principal axes (numpy SVD)
    X = prefix.block_out_last.numpy()
    u, s, _ = np.linalg.svd(X - X.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(found.pca[:, :2]), np.abs(u[:, :2] * s[:2]), atol=1e-8)
    assert found.products <= 40 and found.route == ("structured" if layer == 2 else "tail")
    assert found.memory_plan == ("" if layer == 2 else
                                 "VJP graph stored, JVP graph stored, 3 windows per chunk")


def test_tail_keeps_what_the_memory_budget_allows_and_refuses_less_than_one_window(tiny):
    model, ids = tiny
    prefix = capture_prefix(model, ids, [0])[0]
    s_half = sqrt_psd(unembedding_gram(model))
    window = tail_memory(model, 0, 1, T, element_size=8)  # float64 model
    vjp_all, jvp_all = N * window["vjp"], N * window["jvp"]
    d = model.config.hidden_size
    V = torch.randn(N, d, 3, dtype=torch.float64)
    Kr = _dense_hidden_kernel(model, ids, 0).reshape(N, d, N, d)
    expected = torch.einsum("iajb,jbk->iak", Kr, V)
    rebuild = window["vjp"] + window["jvp"]  # one window's graphs being rebuilt
    plans = {  # budget -> (VJP graph, JVP graph, windows per chunk)
        vjp_all + jvp_all: ("stored", "stored", 2),
        vjp_all + rebuild: ("stored", "rebuilt", 1),
        2 * rebuild: ("recomputed", "recomputed", 2),
        1.5 * rebuild: ("recomputed", "recomputed", 1),
    }
    for budget, plan in plans.items():
        with memory_budget(budget):
            op = LayerEntk.build(model, prefix, s_half, chunk_size=2)
        assert (op.extras["vjp"], op.extras["jvp"], op.extras["chunk_size"]) == plan, budget
        torch.testing.assert_close(op.kr_matmat(V), expected, rtol=1e-5,
                                   atol=1e-6 * expected.abs().max().item())
    with memory_budget(0.5 * rebuild), pytest.raises(MemoryBudgetError, match="budget"):
        LayerEntk.build(model, prefix, s_half)
    with memory_budget(vjp_all), pytest.raises(MemoryBudgetError, match="VJP graph"):
        LayerEntk.build(model, prefix, s_half, store_vjp=True)
    with memory_budget(vjp_all + jvp_all):  # keeping the JVP's graph keeps the VJP's
        assert LayerEntk.build(model, prefix, s_half, store_jvp=True).extras["vjp"] == "stored"
    with pytest.raises(ValueError, match="store_vjp"):
        LayerEntk.build(model, prefix, s_half, store_vjp=False, store_jvp=True)
