"""Notebook support: the run-mode flags, the device, where results go, paper-vs-run tables.

Every notebook writes under ``results/<notebook name>/`` at the repository root (or under
``$ENTK_RESULTS_DIR/<notebook name>`` when that is set), so two runs can be compared file by
file. Flags are environment variables: ``ENTK_FULL=1`` (the paper's scale),
``ENTK_ALLOW_DOWNLOADS=1`` (loaders may use the network), ``ENTK_HEADLESS=1`` (no widgets),
``ENTK_DEVICE`` (e.g. ``cpu``, ``cuda:1``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import save_json

FULL_MODE_VARIABLE = "ENTK_FULL"


def full_mode() -> bool:
    """True when ``ENTK_FULL=1`` asks for the paper-scale run instead of the CI-sized one."""
    return _flag(FULL_MODE_VARIABLE)


def _flag(variable: str) -> bool:
    """An environment variable set to 1 / true / yes."""
    return os.environ.get(variable, "0").strip().lower() in {"1", "true", "yes"}


DOWNLOADS_VARIABLE = "ENTK_ALLOW_DOWNLOADS"


def downloads_allowed(allow: bool | None = None) -> bool:
    """Whether a loader may use the network (the Hugging Face hub model, TinyStories).

    ``allow`` (a loader's ``allow_downloads=`` argument) decides when given; else
    ``ENTK_ALLOW_DOWNLOADS=1`` allows; by default nothing is downloaded, so a run's data and
    model do not depend on the machine's network.
    """
    if allow is not None:
        if not isinstance(allow, bool):
            raise TypeError(f"allow_downloads={allow!r}; pass True, False or None (None: "
                            f"${DOWNLOADS_VARIABLE})")
        return allow
    return _flag(DOWNLOADS_VARIABLE)


HEADLESS_VARIABLE = "ENTK_HEADLESS"


def interactive_widgets() -> bool:
    """Whether to build ipywidgets explorers: ipywidgets is installed and this is not a
    headless run (``ENTK_HEADLESS=1``, which ``scripts/run_notebooks.py`` sets). Headless
    nbclient can stall after an ``interact`` cell until its cell timeout (jupyter/nbclient
    issue 312), and a widget without a frontend shows nothing anyway."""
    if _flag(HEADLESS_VARIABLE):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def default_device() -> torch.device:
    """CUDA when present, else CPU; ``ENTK_DEVICE`` overrides (e.g. ``cpu``, ``cuda:1``)."""
    chosen = os.environ.get("ENTK_DEVICE")
    if chosen:
        return torch.device(chosen)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def repo_root() -> Path:
    """The folder holding ``pyproject.toml`` above this package (or the working directory)."""
    here = Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").exists():
            return folder
    return Path.cwd()


def results_dir(name: str) -> Path:
    """``results/<name>/``, created if missing (``name``: the notebook's file name, no suffix)."""
    base = Path(os.environ.get("ENTK_RESULTS_DIR", repo_root() / "results"))
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class PaperComparison:
    """Rows of "quantity: paper's number vs this run's", with a note on any difference.

    >>> cmp = PaperComparison("01_modular_mlp_grokking")
    >>> cmp.add("final test accuracy", paper=1.0, this_run=0.998, note="")
    """

    notebook: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, quantity: str, *, paper: Any, this_run: Any, note: str = "") -> None:
        self.rows.append(
            {"quantity": quantity, "paper": paper, "this_run": this_run, "note": note}
        )

    def table(self) -> Any:
        """A pandas DataFrame of the rows (for display in the notebook)."""
        import pandas as pd

        return pd.DataFrame(self.rows, columns=["quantity", "paper", "this_run", "note"])

    def save(self, path: str | Path, **extra: Any) -> Path:
        """Write ``{"notebook", "mode", "paper_vs_run": rows, **extra}`` as JSON."""
        payload = {
            "notebook": self.notebook,
            "mode": "full" if full_mode() else "default",
            "paper_vs_run": self.rows,
            **extra,
        }
        return save_json(payload, path)
