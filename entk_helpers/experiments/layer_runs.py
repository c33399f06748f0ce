"""Notebook 03's per-layer runs of Gemma's layer eNTK, cached on disk so that runs resume.

One ``.npz`` per (windows, model, layer, weight, k, Lanczos steps) under a cache folder holds
the top eigenvalues, the per-example eNTK scores, the exact-PCA scores, the PCA input (the
block's last-token output, so other PCA variants can be scored later), the residuals and the
timings. Used by notebook 03 and by ``scripts/gemma_dataset_draws.py``; the arrays are derived
from the model's activations and stay in the (git-ignored) cache folder.

Notebook 03 also writes small per-layer score files for notebook 04 (:func:`save_layer_scores`),
each with the key of what produced it (:func:`scores_key`); 04 reads one only when
:func:`scores_mismatch` finds it equal to the key of what 04 would compute itself.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..files import save_arrays
from ..progress import progress_bar
from .grammar import DATASET_VERSION

CACHE_VERSION = 2  # 2: the PCA input is stored beside the scores
SCORES_VERSION = 1  # the per-layer score files of notebook 03 (save_layer_scores)
PAPER_WEIGHT = "mlp.down_proj"  # the paper's weight: its cache files keep their names


def run_key(input_ids: Tensor, model_source: str) -> str:
    """12 hex digits identifying the windows (N, T + 1) and the model they ran through."""
    payload = input_ids.cpu().numpy().tobytes() + model_source.encode()
    return hashlib.sha256(payload).hexdigest()[:12]


def layer_cache_path(folder: str | Path, key: str, layer: int, k: int, steps: int,
                     weight: str = PAPER_WEIGHT) -> Path:
    """Where one layer's arrays live, ``entk-<key>-L<layer>[-<weight>]-k<k>-s<steps>-v<n>.npz``.

    ``weight``: the path inside the block; the paper's ``mlp.down_proj`` is left out of the
    name, so the caches written before other weights were possible stay valid.
    """
    tag = "" if weight == PAPER_WEIGHT else f"-{weight}"
    return Path(folder) / f"entk-{key}-L{layer:02d}{tag}-k{k}-s{steps}-v{CACHE_VERSION}.npz"


def solve_layers(
    model: Any,
    input_ids: Tensor,
    layers: Sequence[int],
    s_half: Tensor,
    *,
    folder: str | Path,
    model_source: str,
    weight: str = PAPER_WEIGHT,
    k: int = 25,
    steps: int = 50,
    seed: int = 0,
    group: int = 6,
    progress: bool = True,
) -> dict[str, Any]:
    """Solve every layer not cached yet, then read all of them back.

    ``weight``: the weight's path inside each block (:func:`entk_helpers.lm.layer_weight`),
    e.g. ``"self_attn.o_proj"``; ``s_half``: ``S^(1/2)`` (d, d) of the output embedding. Layers
    are solved ``group`` at a time after one prefix forward for the group (which bounds the
    prefix memory, ``N T (in + d)`` floats per layer).

    Returns:
        {"layers": {L: dict of arrays and solver info}, "prefix_seconds": float,
         "solved": the layers solved in this call (the others were read back)}.
    """
    from ..lm import capture_prefix, layer_directions, layer_weight

    key = run_key(input_ids, model_source)

    def path(L: int) -> Path:
        return layer_cache_path(folder, key, L, k, steps, weight)

    todo = [L for L in layers if not path(L).exists()]
    prefix_seconds = 0.0
    for start in range(0, len(todo), group):
        chunk = todo[start : start + group]
        names = {L: layer_weight(model, L, weight) for L in chunk}
        t0 = time.perf_counter()
        prefixes = capture_prefix(model, input_ids, list(names.values()), progress=progress)
        prefix_seconds += time.perf_counter() - t0
        for L in progress_bar(chunk, desc="layers", disable=not progress):
            prefix = prefixes.pop(names[L])
            found = layer_directions(model, prefix, s_half=s_half, k=k, steps=steps, seed=seed,
                                     progress=progress)
            save_arrays(path(L), values=found.values, entk=found.entk, pca=found.pca,
                        pca_input=prefix.block_out_last.cpu().numpy(), route=found.route,
                        residuals=found.residuals, seconds=found.seconds,
                        products=found.products, memory_plan=found.memory_plan)
            del prefix
    out = {}
    for L in layers:
        with np.load(path(L)) as saved:
            out[L] = {
                "values": saved["values"], "entk": saved["entk"], "pca": saved["pca"],
                "pca_input": saved["pca_input"], "route": str(saved["route"]),
                "seconds": float(saved["seconds"]), "products": int(saved["products"]),
                "residuals": saved["residuals"], "memory_plan": str(saved["memory_plan"]),
                "read_back": L not in todo,
            }
    return {"layers": out, "prefix_seconds": prefix_seconds, "solved": todo}


def scores_key(*, model_source: str, quantized: bool, corpus: str, n: int, T: int, seed: int,
               layer: int, weight: str, tagger: str) -> dict[str, Any]:
    """What produced one layer's score file: model, dataset (the corpus' fingerprint,
    :func:`~entk_helpers.experiments.grammar.corpus_fingerprint`; N windows of T tokens before
    the target, draw seed, tagger), the layer and its weight's full name, and the code versions
    (dataset builder, layer runs, score files)."""
    return {"model_source": model_source, "quantized": bool(quantized), "corpus": corpus,
            "N": int(n), "T": int(T), "seed": int(seed), "layer": int(layer), "weight": weight,
            "tagger": tagger, "code_version": {"dataset": DATASET_VERSION,
                                               "layer_runs": CACHE_VERSION,
                                               "scores": SCORES_VERSION}}


def save_layer_scores(path: str | Path, key: dict[str, Any], *, entk: np.ndarray,
                      pca: np.ndarray, eigenvalues: np.ndarray, pos: np.ndarray,
                      labels: dict[str, np.ndarray]) -> Path:
    """One layer's scores for notebook 04: ``entk``, ``pca`` (N, k), ``eigenvalues`` (k,),
    ``pos`` (N,), one ``label_<name>`` (N,) bool per label, and ``key`` (:func:`scores_key`)
    as JSON in ``provenance``."""
    return save_arrays(path, entk=entk, pca=pca, eigenvalues=eigenvalues, pos=pos,
                       provenance=np.array(json.dumps(key, sort_keys=True)),
                       **{f"label_{k}": v for k, v in labels.items()})


def scores_mismatch(path: str | Path, expected: dict[str, Any]) -> str:
    """Why the score file ``path`` is not what ``expected`` (:func:`scores_key`) describes, or
    "" when it is. A file without a readable ``provenance`` never matches."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            if "provenance" not in saved.files:
                return f"{Path(path).name} records no provenance (written before it was saved)"
            found = json.loads(str(saved["provenance"]))
    except (OSError, ValueError) as err:
        return f"{Path(path).name} cannot be read ({err})"
    diffs = [f"{name}: {found.get(name)!r} in the file, {value!r} here"
             for name, value in expected.items() if found.get(name) != value]
    return f"{Path(path).name} differs: " + "; ".join(diffs) if diffs else ""
