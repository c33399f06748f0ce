"""The notebook helpers that read the environment: full mode and headless runs."""

from __future__ import annotations

import pytest

from entk_helpers.results import full_mode, interactive_widgets


def test_headless_runs_build_no_widgets(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ipywidgets")
    monkeypatch.delenv("ENTK_HEADLESS", raising=False)
    assert interactive_widgets()
    monkeypatch.setenv("ENTK_HEADLESS", "1")
    assert not interactive_widgets()


def test_full_mode_reads_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENTK_FULL", "0")
    assert not full_mode()
    monkeypatch.setenv("ENTK_FULL", "1")
    assert full_mode()
