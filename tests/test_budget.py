"""The memory budget: parsing, overrides, and refusals that name the alternative."""

from __future__ import annotations

import pytest
import torch
from ntk_references import assert_close, make_case, reduce_kernel

from entk_helpers import (
    MemoryBudgetError,
    empirical_ntk,
    get_memory_budget,
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


def test_chunks_follow_a_small_budget_without_changing_the_result() -> None:
    case = make_case("transformer")
    expected = empirical_ntk(case.model, case.x1, output="full", select=case.select)
    with memory_budget("60KB"):
        small = empirical_ntk(case.model, case.x1, output="full", select=case.select)
    assert torch.allclose(small, expected, rtol=1e-12, atol=1e-14)
