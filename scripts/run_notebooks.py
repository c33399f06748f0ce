"""Execute every notebook headless, in place, then print what each one found.

Used by ``make reproduce``; runs them in number order (03 before 04, which then reuses 03's
results). Each notebook writes
``results/<name>/summary.json`` with a ``paper_vs_run`` table; this script prints those tables
on one screen. ``ENTK_FULL=1``
switches the notebooks to the paper's scale. The kernels run with ``ENTK_HEADLESS=1``, so the
notebooks skip their ipywidgets explorers (nothing to interact with here, and headless
nbclient can stall after an ``interact`` cell); their static figures are unaffected.

    python scripts/run_notebooks.py [notebooks/01_*.ipynb ...] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def strip_widgets(notebook: nbformat.NotebookNode) -> None:
    """Drop widget state and widget views (progress bars, sliders): they only render in a live
    kernel, and a saved view without its state shows as an error or a stale 0% bar."""
    notebook.metadata.pop("widgets", None)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [out for out in cell.outputs
                            if WIDGET_VIEW not in out.get("data", {})]


def execute_in_place(path: Path, timeout: int) -> float:
    """Run one notebook top to bottom and write it back with its outputs; seconds taken."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        strip_widgets(notebook)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".ipynb")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            nbformat.write(notebook, handle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return time.perf_counter() - start


def _cell(value: object, width: int) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= width else text[: width - 1] + "~"


def print_summaries(results: Path) -> None:
    """Print the paper-vs-run table of every ``results/*/summary.json``."""
    for summary in sorted(results.glob("*/summary.json")):
        data = json.loads(summary.read_text())
        print(f"\n== {data.get('notebook', summary.parent.name)} "
              f"({data.get('mode', '?')} mode) -> {summary.parent.relative_to(ROOT)}/")
        print(f"  {'quantity':<46} {'paper':>16} {'this run':>16}")
        for row in data.get("paper_vs_run", []):
            print(f"  {_cell(row['quantity'], 46):<46} {_cell(row['paper'], 16):>16} "
                  f"{_cell(row['this_run'], 16):>16}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args()
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    os.environ["ENTK_HEADLESS"] = "1"   # the kernels inherit it: no widget explorers
    failed = []
    for path in paths:
        print(f"running {path.name} ...", flush=True)
        try:
            seconds = execute_in_place(path.resolve(), args.timeout)
            print(f"  done in {seconds / 60:.1f} min", flush=True)
        except CellExecutionError as err:
            failed.append(path.name)
            print(f"  FAILED: {str(err).strip().splitlines()[-1]}", flush=True)
    print_summaries(ROOT / "results")
    if failed:
        print(f"\n{len(failed)} notebook(s) failed: {', '.join(failed)} (their outputs show where)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
