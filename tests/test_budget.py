"""The memory budget: parsing, overrides, and refusals that name the alternative."""

from __future__ import annotations

import pytest
from ntk_references import assert_close, make_case, reduce_kernel

from entk_helpers import (
    MemoryBudgetError,
    empirical_ntk,
    get_memory_budget,
    kernels,
    layerwise_ntk,
    memory_budget,
    set_memory_budget,
)
from entk_helpers.budget import format_bytes, parse_bytes


def test_parse_and_format_bytes() -> None:
    assert parse_bytes("4GB") == 4 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5kb") == 1500
    assert parse_bytes(2e9) == 2 * 10**9
    assert format_bytes(6.9e9) == "6.9 GB"
    assert format_bytes(12) == "12 B"
    with pytest.raises(ValueError, match="'4GB'"):
        parse_bytes("four gigabytes")


def test_overrides_and_their_restoration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENTK_MEMORY_BUDGET", raising=False)
    default = get_memory_budget()
    assert default > 10**8  # half the machine's memory
    monkeypatch.setenv("ENTK_MEMORY_BUDGET", "3GB")
    assert get_memory_budget() == 3 * 10**9
    with memory_budget("1MB"):
        assert get_memory_budget() == 10**6
        with memory_budget(2048):
            assert get_memory_budget() == 2048
        assert get_memory_budget() == 10**6
    assert get_memory_budget() == 3 * 10**9
    set_memory_budget("5GB")
    try:
        assert get_memory_budget() == 5 * 10**9
    finally:
        set_memory_budget(None)
    monkeypatch.delenv("ENTK_MEMORY_BUDGET")
    assert get_memory_budget() == default


def test_budget_is_restored_after_an_error() -> None:
    before = get_memory_budget()
    with pytest.raises(RuntimeError), memory_budget("1KB"):
        raise RuntimeError("boom")
    assert get_memory_budget() == before


def test_a_kernel_over_the_budget_is_refused_with_the_alternative() -> None:
    case = make_case("mlp")  # full kernel (18, 18) float64 = 2.6 kB
    with memory_budget("2KB"):
        with pytest.raises(MemoryBudgetError) as err:
            empirical_ntk(case.model, case.x1, output="full")
        message = str(err.value)
        assert "(18, 18)" in message and "memory budget" in message
        assert "ntk_operator" in message and "output='trace'" in message
        assert "set_memory_budget" in message
        trace = empirical_ntk(case.model, case.x1, output="trace")  # (6, 6): fits
    assert_close(trace, reduce_kernel(case.reference(), "trace"))
    assert isinstance(err.value, MemoryError)  # callers catching MemoryError see it too


def test_layerwise_counts_every_group_against_the_budget() -> None:
    case = make_case("mlp")  # 4 trace kernels (6, 6) float64 = 1152 bytes
    with memory_budget(1000), pytest.raises(MemoryBudgetError, match="4 kernel"):
        layerwise_ntk(case.model, case.x1, groups="parameter")
    with memory_budget(1200):
        assert len(layerwise_ntk(case.model, case.x1, groups="parameter")) == 4


def test_per_example_jacobian_over_the_budget_names_the_way_out() -> None:
    case = make_case("attention")  # one example's Jacobian: 3 x 119 x 8 bytes, ~2.9 kB
    with memory_budget("5KB"), pytest.raises(MemoryBudgetError) as err:
        empirical_ntk(case.model, case.x1, select=case.select, method="jacobian")
    assert "Jacobian" in str(err.value) and "params=" in str(err.value)
    assert "ntk_operator" in str(err.value)


def test_chunks_follow_a_small_budget_without_changing_the_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The structured route's chunks shrink under a small budget (before issue 17 this test
    used a budget under which the chunks were the same, so it could not fail) and the kernel
    still equals the brute-force one."""
    case = make_case("transformer")  # N = 5, C = 6, full kernel (30, 30)
    seen: list[int] = []
    capture = kernels._capture_layers

    def spy(model, fn, modules, x):
        seen.append(x.shape[0])
        return capture(model, fn, modules, x)

    monkeypatch.setattr(kernels, "_capture_layers", spy)
    expected = reduce_kernel(case.reference(), "full")
    assert_close(empirical_ntk(case.model, case.x1, output="full", select=case.select),
                 expected)
    assert max(seen) == case.x1.shape[0]  # one chunk with the default budget
    seen.clear()
    with memory_budget("20KB"):
        small = empirical_ntk(case.model, case.x1, output="full", select=case.select)
    assert max(seen) < case.x1.shape[0] and sum(seen) == case.x1.shape[0]
    assert_close(small, expected)


def test_jacobian_route_recomputes_chunks_when_they_do_not_fit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The Jacobian route's uncached path (Jacobians recomputed for every pair of chunks
    when they do not all fit a quarter of the budget) against the brute-force kernel."""
    case = make_case("attention")  # one example's Jacobian: 3 x 119 x 8 bytes, ~2.9 kB
    calls: list[int] = []
    make_jac = kernels._jacobian_fn

    def counting(fn, names):
        jac = make_jac(fn, names)
        return lambda x: calls.append(x.shape[0]) or jac(x)

    monkeypatch.setattr(kernels, "_jacobian_fn", counting)
    n = case.x1.shape[0]
    for inputs2 in (None, case.x2):
        expected = reduce_kernel(case.reference(inputs2), "full")
        n2 = n if inputs2 is None else case.x2.shape[0]
        calls.clear()
        with memory_budget("20KB"):  # chunks of one example, nothing cached
            kernel = empirical_ntk(case.model, case.x1, inputs2, output="full",
                                   select=case.select, method="jacobian")
        assert_close(kernel, expected)
        assert max(calls) == 1
        # one per row chunk, plus one per column chunk of every pair above the diagonal
        assert len(calls) == n + (n * (n - 1) // 2 if inputs2 is None else n * n2)
        calls.clear()
        cached = empirical_ntk(case.model, case.x1, inputs2, output="full", select=case.select,
                               method="jacobian")
        assert_close(cached, expected)
        assert sum(calls) == n + (0 if inputs2 is None else n2)  # each chunk once


@pytest.mark.parametrize("bad", [-1, 0, -2.5, "-1GB", float("nan"), float("inf"), True, [1]])
def test_nonsense_budgets_are_refused(bad) -> None:
    """Guards: set_memory_budget(-1) was accepted (every later call then refused)."""
    with pytest.raises((ValueError, TypeError), match="memory budget|memory size"):
        set_memory_budget(bad)
    assert get_memory_budget() > 10**8  # unchanged
    with pytest.raises((ValueError, TypeError)), memory_budget(bad):
        pass


def test_a_nonsense_environment_budget_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENTK_MEMORY_BUDGET", "-3GB")
    with pytest.raises(ValueError, match="ENTK_MEMORY_BUDGET"):
        get_memory_budget()
