"""Notebook 03's per-layer runs of Gemma's layer eNTK, cached on disk so that runs resume.

One ``.npz`` per (windows, model, layer, k, Lanczos steps) under a cache folder holds the top
eigenvalues, the per-example eNTK scores, the exact-PCA scores, the PCA input (the block's
last-token output, so other PCA variants can be scored later), the residuals and the timings.
Used by notebook 03 and by ``scripts/gemma_dataset_draws.py``; the arrays are derived from the
model's activations and stay in the (git-ignored) cache folder.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..files import save_arrays
from ..progress import progress_bar

CACHE_VERSION = 2  # 2: the PCA input is stored beside the scores


def run_key(input_ids: Tensor, model_source: str) -> str:
    """12 hex digits identifying the windows (N, T + 1) and the model they ran through."""
    payload = input_ids.cpu().numpy().tobytes() + model_source.encode()
    return hashlib.sha256(payload).hexdigest()[:12]


def layer_cache_path(folder: str | Path, key: str, layer: int, k: int, steps: int) -> Path:
    """Where one layer's arrays live: ``entk-<key>-L<layer>-k<k>-s<steps>-v<version>.npz``."""
    return Path(folder) / f"entk-{key}-L{layer:02d}-k{k}-s{steps}-v{CACHE_VERSION}.npz"


def solve_layers(
    model: Any,
    input_ids: Tensor,
    layers: Sequence[int],
    s_half: Tensor,
    *,
    folder: str | Path,
    model_source: str,
    k: int = 25,
    steps: int = 50,
    seed: int = 0,
    group: int = 6,
    progress: bool = True,
) -> dict[str, Any]:
    """Solve every layer not cached yet, then read all of them back.

    Layers are solved ``group`` at a time after one prefix forward for the group (which bounds
    the prefix memory, ``N T (F + d)`` floats per layer).

    Returns:
        {"layers": {L: dict of arrays and solver info}, "prefix_seconds": float,
         "solved": the layers solved in this call (the others were read back)}.
    """
    from ..gemma import capture_prefix, layer_directions

    key = run_key(input_ids, model_source)
    todo = [L for L in layers if not layer_cache_path(folder, key, L, k, steps).exists()]
    prefix_seconds = 0.0
    for start in range(0, len(todo), group):
        chunk = todo[start : start + group]
        t0 = time.perf_counter()
        prefixes = capture_prefix(model, input_ids, chunk, progress=progress)
        prefix_seconds += time.perf_counter() - t0
        for L in progress_bar(chunk, desc="layers", disable=not progress):
            prefix = prefixes.pop(L)
            found = layer_directions(model, prefix, s_half, k=k, steps=steps, seed=seed,
                                     progress=progress)
            save_arrays(layer_cache_path(folder, key, L, k, steps), values=found.values,
                        entk=found.entk, pca=found.pca,
                        pca_input=prefix.block_out_last.cpu().numpy(), route=found.route,
                        residuals=found.residuals, seconds=found.seconds,
                        products=found.products, memory_plan=found.memory_plan)
            del prefix
    out = {}
    for L in layers:
        with np.load(layer_cache_path(folder, key, L, k, steps)) as saved:
            out[L] = {
                "values": saved["values"], "entk": saved["entk"], "pca": saved["pca"],
                "pca_input": saved["pca_input"], "route": str(saved["route"]),
                "seconds": float(saved["seconds"]), "products": int(saved["products"]),
                "residuals": saved["residuals"], "memory_plan": str(saved["memory_plan"]),
                "read_back": L not in todo,
            }
    return {"layers": out, "prefix_seconds": prefix_seconds, "solved": todo}
