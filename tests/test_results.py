"""The notebook helpers that read the environment: full mode and headless runs."""

from __future__ import annotations

import numpy as np
import pytest

from entk_helpers.results import full_mode, interactive_widgets, save_arrays


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


def test_save_arrays_round_trips_and_leaves_no_temporary_file(tmp_path) -> None:
    path = save_arrays(tmp_path / "layer.npz", values=np.arange(3.0), route="tail")
    saved = np.load(path)
    np.testing.assert_array_equal(saved["values"], [0.0, 1.0, 2.0])
    assert str(saved["route"]) == "tail"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer.npz"]
