"""``empirical_ntk`` / ``layerwise_ntk`` against the brute-force vmap(jacrev) kernel."""

from __future__ import annotations

import warnings

import pytest
import torch
from ntk_references import (
    CASES,
    Case,
    assert_close,
    brute_force_ntk,
    make_case,
    reduce_kernel,
    rel_err,
)
from torch import Tensor, nn

from entk_helpers import empirical_ntk, layerwise_ntk

OUTPUTS = ("full", "trace", "mean_logit")


def methods_for(case: Case) -> list[str]:
    return ["auto", "jacobian"] + (["structured"] if case.structured else [])


@pytest.mark.parametrize("output", OUTPUTS)
def test_every_method_matches_brute_force(case: Case, output: str) -> None:
    expected = reduce_kernel(case.reference(), output)
    for method in methods_for(case):
        kernel = empirical_ntk(case.model, case.x1, output=output, select=case.select,
                               method=method)
        assert kernel.dtype == torch.float64
        assert_close(kernel, expected)


@pytest.mark.parametrize("output", OUTPUTS)
def test_cross_kernel_matches_brute_force(case: Case, output: str) -> None:
    expected = reduce_kernel(case.reference(case.x2), output)
    for method in methods_for(case):
        kernel = empirical_ntk(case.model, case.x1, case.x2, output=output, select=case.select,
                               method=method)
        assert_close(kernel, expected)


@pytest.mark.parametrize("name", ["mlp", "transformer", "tied"])
@pytest.mark.parametrize("output", OUTPUTS)
def test_float32_within_1e_4(name: str, output: str) -> None:
    case = make_case(name, torch.float32)
    expected = reduce_kernel(make_case(name).reference(), output)  # float64 reference
    for method in methods_for(case):
        kernel = empirical_ntk(case.model, case.x1, output=output, select=case.select,
                               method=method)
        assert kernel.dtype == torch.float32
        assert_close(kernel, expected, torch.float32)


def test_reference_agrees_with_a_plain_autograd_loop() -> None:
    """The brute force itself, checked once by per-example, per-output backward passes."""
    case = make_case("tied")
    params = list(case.model.parameters())  # the tied weight once
    rows = []
    for x in case.x1:
        out = case.model(x[None])[0]
        for c in range(out.shape[0]):
            grads = torch.autograd.grad(out[c], params, retain_graph=True)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    jac = torch.stack(rows)  # (N*C, P)
    assert rel_err(reduce_kernel(case.reference(), "full"), jac @ jac.T) < 1e-12


@pytest.mark.parametrize("name", ["mlp", "embedding", "attention", "transformer"])
@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_chunk_size_does_not_change_the_result(name: str, method: str) -> None:
    case = make_case(name)
    if method == "structured" and not case.structured:
        pytest.skip("structured does not apply")
    for output in ("full", "trace"):
        for inputs2 in (None, case.x2):
            base = empirical_ntk(case.model, case.x1, inputs2, output=output,
                                 select=case.select, method=method)
            for chunk_size in (1, 2, 4, 100):
                again = empirical_ntk(case.model, case.x1, inputs2, output=output,
                                      select=case.select, method=method, chunk_size=chunk_size)
                assert rel_err(again, base) < 1e-12, (output, chunk_size)


def test_kernel_is_symmetric_psd_and_trace_is_mean_of_diagonal_blocks() -> None:
    case = make_case("transformer")
    full = empirical_ntk(case.model, case.x1, output="full", select=case.select)
    trace = empirical_ntk(case.model, case.x1, output="trace", select=case.select)
    mean_logit = empirical_ntk(case.model, case.x1, output="mean_logit", select=case.select)
    n, c = case.x1.shape[0], full.shape[0] // case.x1.shape[0]
    k4 = full.reshape(n, c, n, c)
    assert torch.allclose(full, full.T, atol=1e-12 * full.abs().max())
    assert torch.linalg.eigvalsh(full).min() > -1e-10 * full.abs().max()
    assert_close(trace, torch.einsum("ncmc->nm", k4) / c)
    assert_close(mean_logit, k4.mean(dim=(1, 3)))


# ---------------------------------------------------------------------- parameter choice


def test_frozen_parameters_excluded_by_default_and_included_when_named() -> None:
    case = make_case("frozen")
    trainable = ["fc2.weight", "fc2.bias"]
    everything = ["fc1.weight", "fc1.bias", *trainable]
    default = empirical_ntk(case.model, case.x1, output="full")
    assert_close(default, reduce_kernel(case.reference(names=trainable), "full"))
    for params in (everything, "fc*", ["fc1.*", "fc2.*"]):
        for method in ("auto", "structured", "jacobian"):
            named = empirical_ntk(case.model, case.x1, output="full", params=params,
                                  method=method)
            assert_close(named, reduce_kernel(case.reference(names=everything), "full"))
    only_frozen = empirical_ntk(case.model, case.x1, output="trace", params=case.model.fc1)
    assert_close(only_frozen,
                 reduce_kernel(case.reference(names=["fc1.weight", "fc1.bias"]), "trace"))


def test_params_by_tensor_and_by_module_agree_with_names() -> None:
    case = make_case("transformer")
    model = case.model
    names = ["W_Q.weight", "W_K.weight", "W_V.weight"]
    expected = reduce_kernel(case.reference(names=names), "trace")
    by_name = empirical_ntk(model, case.x1, select=case.select, params=names)
    by_glob = empirical_ntk(model, case.x1, select=case.select, params="W_[QKV].weight")
    by_tensor = empirical_ntk(model, case.x1, select=case.select,
                              params=[model.W_Q.weight, model.W_K.weight, model.W_V.weight])
    for kernel in (by_name, by_glob, by_tensor):
        assert_close(kernel, expected)
    by_module = empirical_ntk(model, case.x1, select=case.select, params=model.W_U)
    assert_close(by_module, reduce_kernel(case.reference(names=["W_U.weight"]), "trace"))


def test_tied_weight_counts_every_use() -> None:
    """The embedding is also the unembedding: 'auto' must not use the one-module rule."""
    case = make_case("tied")
    expected = reduce_kernel(case.reference(names=["embed.weight"]), "full")
    for method in ("auto", "jacobian"):
        kernel = empirical_ntk(case.model, case.x1, output="full", params="embed.weight",
                               method=method)
        assert_close(kernel, expected)


# -------------------------------------------------------------------------- layerwise


@pytest.mark.parametrize("name", CASES)
def test_layerwise_groups_sum_to_the_full_kernel(name: str) -> None:
    case = make_case(name)
    full = empirical_ntk(case.model, case.x1, output="full", select=case.select)
    named = [n for n, p in case.model.named_parameters() if p.requires_grad]
    by_module = layerwise_ntk(case.model, case.x1, groups="module", output="full",
                              select=case.select)
    by_param = layerwise_ntk(case.model, case.x1, groups="parameter", output="full",
                             select=case.select)
    assert set(by_param) == set(named)
    assert set(by_module) == {n.rpartition(".")[0] or n for n in named}
    half = len(named) // 2
    by_mapping = layerwise_ntk(case.model, case.x1, groups={"first": named[:half],
                                                            "second": named[half:]},
                               output="full", select=case.select)
    assert set(by_mapping) == {"first", "second"}
    for groups in (by_module, by_param, by_mapping):
        assert_close(sum(groups.values()), full)
    for pname, kernel in by_param.items():
        assert_close(kernel, reduce_kernel(case.reference(names=[pname]), "full"))


def test_layerwise_cross_kernel_and_trace_mode() -> None:
    case = make_case("transformer")
    groups = layerwise_ntk(case.model, case.x1, case.x2, output="trace", select=case.select)
    assert all(k.shape == (case.x1.shape[0], case.x2.shape[0]) for k in groups.values())
    assert_close(sum(groups.values()), reduce_kernel(case.reference(case.x2), "trace"))


# ---------------------------------------------------------------------------- bad input


class SequenceOut(nn.Module):
    """Returns ``(N, T, C)``: the eNTK needs a ``select=``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def test_no_parameter_matched_names_the_model_parameters() -> None:
    case = make_case("mlp")
    with pytest.raises(ValueError, match="no parameter of the model matches") as err:
        empirical_ntk(case.model, case.x1, params="encoder.*")
    assert "fc1.weight" in str(err.value) and "glob" in str(err.value)
    frozen = make_case("frozen")
    frozen.model.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters selected") as err:
        empirical_ntk(frozen.model, frozen.x1)
    assert "named explicitly" in str(err.value)
    with pytest.raises(ValueError, match="not part of the model"):
        empirical_ntk(case.model, case.x1, params=nn.Linear(2, 2))


def test_output_of_the_wrong_shape_says_to_pass_select() -> None:
    model = SequenceOut().double()
    x = torch.randn(5, 6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(N, C\)") as err:
        empirical_ntk(model, x)
    assert "select=" in str(err.value) and "(5, 6, 3)" in str(err.value)
    with pytest.raises(ValueError, match="select="):  # a select that keeps the wrong shape
        empirical_ntk(model, x, select=lambda out: out.transpose(0, 1))
    with pytest.raises(TypeError, match="not a tensor"):
        empirical_ntk(model, x, select=lambda out: (out,))
    kernel = empirical_ntk(model, x, select=lambda out: out[:, -1], output="full")
    assert kernel.shape == (15, 15)


def test_non_finite_model_output_is_refused() -> None:
    case = make_case("mlp")
    bad = case.x1.clone()
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        empirical_ntk(case.model, bad)
    with pytest.raises(ValueError, match="NaN or inf"):
        empirical_ntk(case.model, case.x1, bad)
    with pytest.raises(ValueError, match="NaN or inf"):
        empirical_ntk(case.model, case.x1, select=lambda out: out / 0.0 * 0.0 + out.log())


@pytest.mark.parametrize("name", ["tied", "attention"])
def test_structured_refuses_models_it_cannot_treat(name: str) -> None:
    case = make_case(name)
    with pytest.raises(ValueError, match="method='structured'") as err:
        empirical_ntk(case.model, case.x1, select=case.select, method="structured")
    assert "method='auto'" in str(err.value) and "'jacobian'" in str(err.value)


def test_structured_refuses_a_layer_called_twice() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(torch.tanh(self.lin(x)))

    model = Twice().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than once"):
        empirical_ntk(model, x, method="structured")
    assert_close(empirical_ntk(model, x, output="full"),
                 reduce_kernel(brute_force_ntk(model, x), "full"))


def test_unknown_output_mode_and_method() -> None:
    case = make_case("mlp")
    with pytest.raises(ValueError, match="choose one of"):
        empirical_ntk(case.model, case.x1, output="diagonal")
    with pytest.raises(ValueError, match="choose one of"):
        empirical_ntk(case.model, case.x1, method="fast")
    with pytest.raises(ValueError, match="groups must not overlap"):
        layerwise_ntk(case.model, case.x1, groups={"a": "fc1.*", "b": ["fc1.weight"]})


# ------------------------------------------------ input validation (issue 17: each test
# below failed on the code before it: a raw torch error, a silent answer, or no warning)


def test_inputs_that_are_not_a_batch_are_refused_by_name() -> None:
    """Guards: zero examples (was a bare AssertionError), a list of examples (a raw
    AttributeError), float32 inputs to a float64 model (torch's 'mat1 and mat2')."""
    case = make_case("mlp")
    with pytest.raises(ValueError, match="inputs has no examples"):
        empirical_ntk(case.model, case.x1[:0])
    with pytest.raises(ValueError, match="inputs2 has no examples"):
        empirical_ntk(case.model, case.x1, case.x2[:0])
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor.*torch.stack"):
        empirical_ntk(case.model, list(case.x1))
    with pytest.raises(TypeError, match=r"inputs is torch.float32 .* torch.float64.*\.to\("):
        empirical_ntk(case.model, case.x1.float())
    with pytest.raises(TypeError, match="inputs2 is torch.float32"):
        layerwise_ntk(case.model, case.x1, case.x2.float())


def test_bad_chunk_size_and_empty_groups_are_refused_by_name() -> None:
    """Guards: chunk_size=-1 (was 'cannot reshape tensor'), groups={} (StopIteration)."""
    case = make_case("mlp")
    for bad in (-1, 0):
        with pytest.raises(ValueError, match=f"chunk_size={bad}.*positive"):
            empirical_ntk(case.model, case.x1, chunk_size=bad)
    with pytest.raises(TypeError, match="chunk_size=2.5"):
        empirical_ntk(case.model, case.x1, chunk_size=2.5)
    with pytest.raises(ValueError, match="groups=\\{\\} names no group"):
        layerwise_ntk(case.model, case.x1, groups={})
    with pytest.raises(TypeError, match="groups must be"):
        layerwise_ntk(case.model, case.x1, groups=["fc1.weight"])


@pytest.mark.parametrize("method", ["auto", "jacobian"])
def test_a_select_that_mixes_examples_is_refused(method: str) -> None:
    """Guards: ``o - o.mean(0)`` gave an all-zero kernel without a word (each example is
    alone in its vmap call). The probe: one example alone against a batch of two."""
    case = make_case("mlp")
    with pytest.raises(ValueError, match="depend on the other examples.*select="):
        empirical_ntk(case.model, case.x1, select=lambda o: o - o.mean(0), method=method)
    one = case.x1[:1]  # one example in inputs: the probe pairs it with inputs2's first
    with pytest.raises(ValueError, match="depend on the other examples"):
        empirical_ntk(case.model, one, case.x2, select=lambda o: o - o.mean(0), method=method)


def test_batch_norm_in_train_mode_is_refused_and_eval_mode_accepted() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    model = model.double()
    x = torch.randn(6, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"model\.eval\(\)"):
        empirical_ntk(model, x)
    model.eval()
    assert_close(empirical_ntk(model, x, output="full"),
                 reduce_kernel(brute_force_ntk(model, x), "full"))


def test_a_train_mode_model_with_dropout_warns() -> None:
    """Guards: dropout in train mode gave the kernel of one random draw without a word."""
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 2))
    model = model.double().train()
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"train mode.*random.*model\.eval\(\)"):
        kernel = empirical_ntk(model, x)
    assert kernel.shape == (4, 4) and torch.isfinite(kernel).all()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(empirical_ntk(model, x), reduce_kernel(brute_force_ntk(model, x), "trace"))


def test_a_bfloat16_model_accumulates_its_kernel_in_float32() -> None:
    """Guards: a bf16 model's kernel was summed in bf16 (relative error ~1e-2 and worse with
    more terms). Now float32 accumulation and a warning about the Jacobians' precision. The
    reference: the float64 kernel of the same (bf16-rounded) weights and inputs."""
    case = make_case("mlp", torch.bfloat16)
    x = torch.randn(40, 5).to(torch.bfloat16)
    exact = make_case("mlp")
    exact.model.load_state_dict({k: v.double() for k, v in case.model.state_dict().items()})
    expected = reduce_kernel(brute_force_ntk(exact.model, x.double()), "trace")
    for method in ("structured", "jacobian"):
        with pytest.warns(UserWarning, match="bfloat16.*float32"):
            kernel = empirical_ntk(case.model, x, output="trace", method=method)
        assert kernel.dtype == torch.float32
        assert rel_err(kernel, expected) < 2e-2, method
