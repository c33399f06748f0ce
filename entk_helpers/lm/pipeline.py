"""From a model and windows of text to per-example directions of one layer's eNTK.

:func:`layer_directions` solves the top eigenpairs of one weight's ``K~`` (all-logit kernel,
:mod:`entk_helpers.lm.operator`) by fixed-step Lanczos as the paper does (50 steps for the
top 25), turns each eigenvector into a per-example score (:func:`example_scores`) and puts
the PCA baseline of the block's last-position output beside it. :func:`text_windows` and
:func:`top_contexts` are the two ends of the "your own language model" example.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._arrays import as_tensor
from ..eigen import top_eigenpairs
from ..experiments.baselines import pca_directions
from ..progress import progress_bar
from .operator import LayerNTKOperator
from .prefix import Prefix


def example_scores(vectors: np.ndarray | Tensor, n: int) -> np.ndarray:
    """Per-example score of each eigenvector: top left singular vector x top singular value.

    Args:
        vectors: (n*d, k) eigenvector columns of ``K~`` (rows ``n*d + i``).
    Returns:
        (n, k). The sign is arbitrary (scoring picks the sign).
    """
    V = np.asarray(vectors.cpu() if isinstance(vectors, Tensor) else vectors, dtype=np.float64)
    if V.ndim != 2 or V.shape[0] % n:
        raise ValueError(f"vectors must be (n*d, k) with n={n}, got {V.shape}")
    out = np.empty((n, V.shape[1]))
    for j in range(V.shape[1]):
        u, s, _ = np.linalg.svd(V[:, j].reshape(n, -1), full_matrices=False)
        out[:, j] = u[:, 0] * s[0]
    return out


@dataclass
class LayerDirections:
    """One weight's top ``k`` eNTK directions and the PCA baseline at the same block.

    ``values`` (k,) top eigenvalues of ``K~``; ``entk`` (N, k) per-example score of each
    eigenvector (:func:`example_scores`); ``pca`` (N, k) scores on the top principal
    components of the block's last-token output; ``residuals`` (k,) exact
    ``||K~ v - lambda v|| / lambda_1`` of each eigenpair; ``products`` kernel-vector
    products of the solve; ``seconds`` wall time of the operator and the solve;
    ``memory_plan`` what the tail route kept or rebuilt ("" for "structured").
    """

    layer: int
    weight: str
    route: str
    values: np.ndarray
    entk: np.ndarray
    pca: np.ndarray
    residuals: np.ndarray
    products: int
    seconds: float
    memory_plan: str = ""


def layer_directions(
    model: nn.Module, prefix: Prefix, *, s_half: Tensor | None = None, k: int = 25,
    steps: int = 50, seed: int = 0, progress: bool = False, **operator_options: Any,
) -> LayerDirections:
    """Top ``k`` eigenvectors of the all-logit ``K~`` of ``prefix.weight`` by Lanczos
    (``steps`` products, the paper's 50 by default), their per-example scores, and PCA of
    the block output.

    Lanczos keeps its products (block size 1), so all ``k`` residuals come out exactly with no
    extra products; the start vector is drawn from ``seed``. ``s_half``: ``S^(1/2)`` to reuse
    across layers (:func:`~entk_helpers.lm.sqrt_psd` of :func:`~entk_helpers.lm.unembedding_gram`);
    ``operator_options``: passed to :class:`~entk_helpers.lm.LayerNTKOperator`.
    """
    began = time.perf_counter()
    op = LayerNTKOperator(model, prefix, output="logits", s_half=s_half, **operator_options)
    v0 = np.random.default_rng(seed).standard_normal(op.shape[0])
    with progress_bar(total=steps, desc=f"layer {op.layer} products", disable=not progress,
                      leave=False) as bar:
        op.on_product = bar.update
        eig = top_eigenpairs(op, k, method="block_lanczos", block_size=1, max_steps=steps,
                             v0=v0)
        op.on_product = None
    return LayerDirections(
        layer=op.layer, weight=op.weight, route=op.route, values=eig.values.numpy(),
        entk=example_scores(eig.vectors, op.n),
        pca=pca_directions(prefix.block_out_last, k).numpy(),
        residuals=eig.relative_residuals.numpy(), products=eig.n_matvecs,
        seconds=time.perf_counter() - began, memory_plan=op.memory_plan)


def text_windows(tokenizer: Any, texts: Sequence[str], length: int, *,
                 max_windows: int | None = None) -> Tensor:
    """Non-overlapping windows of ``length`` tokens from each text, in order: (N, length).

    A text's tokens are cut into consecutive windows; a remainder shorter than ``length`` is
    dropped. Each window's last token is the position whose kernel the operator takes.
    """
    if length < 1:
        raise ValueError(f"length={length}; windows need at least one token")
    rows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        rows += [ids[s : s + length] for s in range(0, len(ids) - length + 1, length)]
    rows = rows[:max_windows]
    if not rows:
        raise ValueError(f"no text has {length} tokens: use shorter windows or longer texts")
    return torch.tensor(rows)


def top_contexts(tokenizer: Any, input_ids: Tensor, scores: np.ndarray | Tensor, *,
                 n: int = 5, context: int = 8) -> list[str]:
    """The ``n`` windows with the highest score on one direction, as text.

    ``scores`` (N,) one column of :attr:`LayerDirections.entk`; its sign is arbitrary, so the
    direction is oriented to make its largest-magnitude score positive. Each entry shows the
    last ``context`` tokens with the final (scored) token in brackets.
    """
    s = as_tensor(scores, torch.float64, "cpu").numpy().reshape(-1)
    if s.shape[0] != input_ids.shape[0]:
        raise ValueError(f"{s.shape[0]} scores for {input_ids.shape[0]} windows")
    s = s * np.sign(s[np.argmax(np.abs(s))] or 1.0)
    out = []
    for i in np.argsort(-s)[:n]:
        ids = input_ids[i].tolist()
        out.append(f"{tokenizer.decode(ids[-context:-1])}[{tokenizer.decode(ids[-1:])}]")
    return out
