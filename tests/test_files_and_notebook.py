"""Atomic files (entk_helpers.files) and the notebook helpers that read the environment."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from entk_helpers.files import save_arrays, save_figure, save_json, save_torch
from entk_helpers.notebook import full_mode, interactive_widgets, results_dir


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


# -------------------------------------------- failed writes (issue 17: untested before)


class DiskFullError(OSError):
    pass


def _fail_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write through a file handle fails half-way, as on a full disk."""
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, handle) -> None:
            self.handle = handle

        def write(self, payload: bytes) -> int:
            self.handle.write(payload[: len(payload) // 2])
            raise DiskFullError("No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.handle.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k:
                        HalfWriter(real_fdopen(fd, mode, *a, **k)))


@pytest.mark.parametrize("save", ["json", "torch"])
def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, save: str
) -> None:
    path = tmp_path / ("summary.json" if save == "json" else "state.pt")
    writer = {"json": lambda p, v: save_json({"value": v}, p),
              "torch": lambda p, v: save_torch({"value": torch.tensor(v)}, p)}[save]
    writer(path, 1.0)
    before = path.read_bytes()
    with monkeypatch.context() as patch:
        _fail_writes(patch)
        with pytest.raises(DiskFullError):
            writer(path, 2.0)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    with pytest.raises(TypeError):  # not serialisable: refused before anything is written
        save_json({"value": object()}, path)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_a_failed_figure_save_keeps_the_old_figure(tmp_path: Path) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = save_figure(fig, tmp_path / "curve")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        Path(args[0]).write_bytes(b"\x89PNG half")
        raise DiskFullError("No space left on device")

    fig.savefig = broken
    with pytest.raises(DiskFullError):
        save_figure(fig, tmp_path / "curve.png")
    plt.close(fig)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curve.png"]


def test_results_dir_honours_its_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENTK_RESULTS_DIR", str(tmp_path / "run"))
    assert results_dir("00_quickstart") == tmp_path / "run" / "00_quickstart"
    assert (tmp_path / "run" / "00_quickstart").is_dir()


def test_make_test_sends_results_to_a_temporary_folder() -> None:
    """Guards (issue 17): ``make test`` rewrote the committed results/ (summaries, figures).
    The test recipe must set ENTK_RESULTS_DIR to a fresh folder outside the checkout; ``make
    reproduce`` must not (it writes results/)."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]

    def recipe(target: str) -> str:
        return subprocess.run(["make", "-n", "-W", "pyproject.toml", target], cwd=root,
                              capture_output=True, text=True, check=True).stdout

    test = recipe("test")
    pytest_line = next(line for line in test.split("&&") if "-m pytest" in line)
    assert 'ENTK_RESULTS_DIR="$results"' in pytest_line
    assert "mktemp -d" in test and "rm -rf" in test
    assert "ENTK_RESULTS_DIR" not in recipe("reproduce")
