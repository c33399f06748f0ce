"""``entk_helpers.lm.layer_ntk_operator`` against brute-force Jacobians, five architectures.

Tiny random float64 models (``lm_tiny_models``); the dense operator (applied to the identity)
against ``J J^T`` of ``base_model(ids).last_hidden_state[:, -1]`` (``output="hidden"``), and the
spectrum of ``output="logits"`` against the kernel of all last-position logits. HF's eager
attention takes its softmax in float32 even in a float64 model: tolerances ~1e-6 relative.
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from lm_tiny_models import (  # noqa: E402
    ARCHITECTURES,
    LAYERS,
    VOCAB,
    WEIGHTS,
    WIDTH,
    hidden_jacobian,
    logit_jacobian,
    tiny_model,
)

from entk_helpers import MemoryBudgetError, memory_budget, top_eigenpairs  # noqa: E402
from entk_helpers.lm import (  # noqa: E402
    LAST_POSITION_TESTED,
    LayerNTKOperator,
    Tail,
    capture_prefix,
    layer_ntk_operator,
    layer_weight,
    sqrt_psd,
    tail_memory,
    unembedding_gram,
)
from entk_helpers.lm.model import final_norm  # noqa: E402

N, T = 3, 6
KINDS = {"mlp": 0, "attention output": 1, "attention input": 2}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest):
    model = tiny_model(request.param)
    ids = torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(1))
    return request.param, model, ids


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_the_shortcut_registry_is_what_these_tests_check() -> None:
    """A last-position shortcut is on by default only where this file proves it exact."""
    assert set(ARCHITECTURES) == LAST_POSITION_TESTED


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer", [0, LAYERS - 1])
def test_hidden_kernel_matches_brute_force(arch, kind, layer) -> None:
    name, model, ids = arch
    weight = layer_weight(model, layer, WEIGHTS[name][KINDS[kind]])
    J = hidden_jacobian(model, ids, weight)
    expected = J @ J.T
    for last_position in (None, False):  # None: the shortcut, on for these architectures
        op = layer_ntk_operator(model, ids, weight=weight, chunk_size=2,
                                last_position=last_position)
        assert op.shape == (N * WIDTH, N * WIDTH) and op.dtype == np.float64
        dense = op.to_dense()
        assert _rel(dense, expected) < 1e-6, (last_position, op.route)
        assert op.n_matvecs == N * WIDTH
        # the structured route: the weight sits downstream of attention in the last block
        structured = last_position is None and layer == LAYERS - 1 and kind != "attention input"
        assert op.route == ("structured" if structured else "tail")


@pytest.mark.parametrize(("kind", "layer"), [("mlp", 1), ("attention output", LAYERS - 1)])
def test_logits_spectrum_is_the_all_logit_kernels(arch, kind, layer) -> None:
    name, model, ids = arch
    weight = layer_weight(model, layer, WEIGHTS[name][KINDS[kind]])
    op = layer_ntk_operator(model, ids, weight=weight, output="logits")
    ours = torch.linalg.eigvalsh(op.to_dense()).flip(0)
    J = logit_jacobian(model, ids, weight)
    full = torch.linalg.eigvalsh(J @ J.T).flip(0)[: N * WIDTH]
    np.testing.assert_allclose(ours.numpy(), full.numpy(), rtol=1e-5, atol=1e-6 * full[0].item())
    # and top_eigenpairs reads the operator's product counter (this solve's products only)
    before = op.n_matvecs
    eig = top_eigenpairs(op, 3, method="lanczos", max_steps=30)
    assert eig.n_matvecs == op.n_matvecs - before == 30
    np.testing.assert_allclose(eig.values.numpy(), full[:3].numpy(), rtol=1e-5)


def test_the_tail_reproduces_the_model_with_and_without_the_shortcut(arch) -> None:
    name, model, ids = arch
    reference = model.base_model(input_ids=ids).last_hidden_state[:, -1]
    for layer in range(LAYERS):
        weight = layer_weight(model, layer, WEIGHTS[name][0])
        prefix = capture_prefix(model, ids, [weight], chunk_size=2)[weight]
        torch.testing.assert_close(prefix.hidden_last, reference, rtol=1e-12, atol=1e-12)
        for last_position in (True, False):
            tail = Tail(model, prefix, last_position=last_position)
            a = prefix.module_in[:, -tail.positions:]
            h = tail(tail.module(a), prefix.hidden_in)
            torch.testing.assert_close(h, reference, rtol=1e-7, atol=1e-7)


def test_memory_plan_keeps_what_the_budget_allows_and_the_products_do_not_change() -> None:
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (N, T))
    weight = layer_weight(model, 0, "mlp.down_proj")
    prefix = capture_prefix(model, ids, [weight])[weight]
    window = tail_memory(model, prefix)
    deeper = tail_memory(model, capture_prefix(model, ids, layer_weight(model, 1, "mlp.down_proj"))[
        layer_weight(model, 1, "mlp.down_proj")])
    assert window["vjp"] > deeper["vjp"] > 0 and window["jvp"] > 0  # more blocks, more graph
    vjp_all, jvp_all = N * window["vjp"], N * window["jvp"]
    rebuild = window["vjp"] + window["jvp"]
    V = torch.randn(N, WIDTH, 3, dtype=torch.float64)
    J = hidden_jacobian(model, ids, weight)
    expected = torch.einsum("ij,jb->ib", J @ J.T, V.reshape(N * WIDTH, 3)).reshape(N, WIDTH, 3)
    plans = {  # budget -> (VJP graph, JVP graph, windows per chunk)
        vjp_all + jvp_all: ("stored", "stored", 2),
        vjp_all + rebuild: ("stored", "rebuilt", 1),
        2 * rebuild: ("recomputed", "recomputed", 2),
        1.5 * rebuild: ("recomputed", "recomputed", 1),
    }
    for budget, plan in plans.items():
        with memory_budget(budget):
            op = LayerNTKOperator(model, prefix, chunk_size=2)
        assert (op.plan["vjp"], op.plan["jvp"], op.plan["chunk_size"]) == plan, budget
        assert _rel(op.kr_matmat(V), expected) < 1e-6
    with memory_budget(0.5 * rebuild), pytest.raises(MemoryBudgetError, match="budget"):
        LayerNTKOperator(model, prefix)
    with memory_budget(vjp_all), pytest.raises(MemoryBudgetError, match="VJP graph"):
        LayerNTKOperator(model, prefix, store_vjp=True)
    with pytest.raises(ValueError, match="store_vjp"):
        LayerNTKOperator(model, prefix, store_vjp=False, store_jvp=True)


@pytest.mark.parametrize("layer", [0, LAYERS - 1])  # the tail route, the structured route
def test_a_dropped_operator_frees_its_graphs_at_once(layer: int) -> None:
    """No reference cycle: solving layer after layer must not keep every layer's graphs."""
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(2))
    weight = layer_weight(model, layer, "mlp.down_proj")
    prefix = capture_prefix(model, ids, [weight])[weight]
    gc.collect()
    gc.disable()  # only reference counting may free it
    try:
        op = LayerNTKOperator(model, prefix, output="logits", chunk_size=2)
        op.matmat_torch(torch.randn(op.shape[0], 2, dtype=torch.float64))
        assert op.route == ("tail" if layer == 0 else "structured")
        ref = weakref.ref(op)
        del op
        assert ref() is None
    finally:
        gc.enable()


def test_bad_arguments_say_what_to_do() -> None:
    model = tiny_model("gpt2")
    ids = torch.randint(0, VOCAB, (N, T))
    with pytest.raises(ValueError, match="full name"):
        layer_ntk_operator(model, ids, weight="mlp.c_proj.weight")
    with pytest.raises(ValueError, match="not inside a decoder block"):
        layer_ntk_operator(model, ids, weight="transformer.wte.weight")
    with pytest.raises(ValueError, match="nn.Linear or Conv1D"):
        layer_ntk_operator(model, ids, weight="transformer.h.0.ln_1.weight")
    with pytest.raises(ValueError, match="the 2-D weights of block 0"):
        layer_weight(model, 0, "mlp.down_proj")
    with pytest.raises(ValueError, match="output="):
        layer_ntk_operator(model, ids, weight=layer_weight(model, 0, "mlp.c_proj"), output="x")
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        layer_ntk_operator(model, ids[0], weight=layer_weight(model, 0, "mlp.c_proj"))
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="eager"):
        layer_ntk_operator(model, ids, weight=layer_weight(model, 0, "mlp.c_proj"))


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma3_text"])
def test_the_papers_route_through_ntk_operator_gives_the_same_logit_kernel(name: str) -> None:
    """The paper's route, every product rerunning the whole model (the package's generic
    ``ntk_operator`` on ``h S^(1/2)``, as notebook 03 and the benchmarks time it), against the
    tail route."""
    from entk_helpers import ntk_operator

    model = tiny_model(name)
    ids = torch.randint(0, VOCAB, (N, T))
    weight = layer_weight(model, 1, WEIGHTS[name][1])
    s_half = sqrt_psd(unembedding_gram(model))
    ours = layer_ntk_operator(model, ids, weight=weight, output="logits", s_half=s_half)
    paper = ntk_operator(model.base_model, ids, params=weight.removeprefix(
        model.base_model_prefix + "."), select=lambda out: out.last_hidden_state[:, -1] @ s_half)
    X = torch.randn(N * WIDTH, 2, dtype=torch.float64)
    assert _rel(paper.matmat_torch(X), ours.matmat_torch(X)) < 1e-6


def test_unembedding_gram_is_u_transpose_u_in_chunks_and_refuses_softcapping() -> None:
    model = tiny_model("gemma3_text")
    U = model.get_output_embeddings().weight
    S = unembedding_gram(model, chunk_size=7)  # 50 rows: 8 chunks, the last one short
    torch.testing.assert_close(S, U.T @ U)
    root = sqrt_psd(S)
    torch.testing.assert_close(root @ root, S)
    torch.testing.assert_close(root, root.T)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="softcapping"):
        unembedding_gram(model)


@pytest.mark.parametrize("name", ["gemma3_text", "gpt2"])
def test_the_prefix_keeps_the_block_outputs_and_the_last_hidden_state(name: str) -> None:
    """Against the model's own ``output_hidden_states``: block L's output at the last position
    (the PCA input), and the final-normed hidden state (HF reports the last block's output
    after the final norm)."""
    model = tiny_model(name)
    ids = torch.randint(0, VOCAB, (N, T))
    out = model.base_model(input_ids=ids, output_hidden_states=True, use_cache=False)
    weights = [layer_weight(model, L, WEIGHTS[name][0]) for L in range(LAYERS)]
    prefixes = capture_prefix(model, ids, weights, chunk_size=2)
    for L, w in enumerate(weights):
        torch.testing.assert_close(prefixes[w].hidden_last, out.last_hidden_state[:, -1])
        torch.testing.assert_close(prefixes[w].hidden_in, out.hidden_states[L])
        if L < LAYERS - 1:
            torch.testing.assert_close(prefixes[w].block_out_last, out.hidden_states[L + 1][:, -1])
        else:
            torch.testing.assert_close(final_norm(model)(prefixes[w].block_out_last),
                                       out.last_hidden_state[:, -1])


def test_a_tail_that_does_not_reproduce_the_model_is_refused() -> None:
    """The build-time check: the tail's output at the prefix must be the model's."""
    model = tiny_model("qwen2")
    ids = torch.randint(0, VOCAB, (N, T))
    for layer in (0, LAYERS - 1):  # the tail and the structured routes
        weight = layer_weight(model, layer, "mlp.down_proj")
        prefix = capture_prefix(model, ids, weight)[weight]
        prefix.hidden_last = prefix.hidden_last + 1e-2 * prefix.hidden_last.abs().max()
        with pytest.raises(RuntimeError, match="does not reproduce"):
            LayerNTKOperator(model, prefix)
        with pytest.raises(RuntimeError, match="does not reproduce"):
            LayerNTKOperator(model, prefix, store_vjp=False)  # the check without a stored VJP


def test_the_shortcut_keeps_a_sliding_window_in_the_last_block() -> None:
    """Gemma-3 with a sliding window (4 < T) in its last block: the mask's last row says so."""
    model = tiny_model("gemma3_text", sliding_last=True)
    ids = torch.randint(0, VOCAB, (N, T))
    for path in ("mlp.down_proj", "self_attn.k_proj"):
        weight = layer_weight(model, LAYERS - 1, path)
        J = hidden_jacobian(model, ids, weight)
        op = layer_ntk_operator(model, ids, weight=weight)
        assert _rel(op.to_dense(), J @ J.T) < 1e-6
    weight = layer_weight(model, 0, "mlp.down_proj")
    prefix = capture_prefix(model, ids, weight)[weight]
    assert Tail(model, prefix).last_position
    J = hidden_jacobian(model, ids, weight)
    assert _rel(LayerNTKOperator(model, prefix).to_dense(), J @ J.T) < 1e-6
