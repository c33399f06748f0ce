"""The layer eNTK of any decoder-only ``transformers`` causal LM, by concern.

* :mod:`~entk_helpers.lm.model`: where the blocks, final norm and a named weight are;
* :mod:`~entk_helpers.lm.prefix`: the prefix pass (hidden states entering the block, the
  weight's module input, the arguments every block received);
* :mod:`~entk_helpers.lm.tail`: the model's own blocks from there to the last hidden state;
* :mod:`~entk_helpers.lm.operator`: the matrix-free kernel and its memory plan;
* :mod:`~entk_helpers.lm.pipeline`: from windows of text to per-example directions;
* :mod:`~entk_helpers.lm.loading`: offline-first loading of Gemma-3-270M (:func:`load_gemma`,
  with its quantized GGUF fallback), the only Gemma-specific module.

    >>> from entk_helpers.lm import layer_ntk_operator
    >>> op = layer_ntk_operator(model, ids, weight="model.layers.3.mlp.down_proj.weight")
    >>> op.shape                                     # (N*d, N*d), row n*d + i
"""

from .loading import load_gemma
from .model import layer_weight
from .operator import (
    LayerNTKOperator,
    layer_ntk_operator,
    sqrt_psd,
    tail_memory,
    unembedding_gram,
)
from .pipeline import (
    LayerDirections,
    example_scores,
    layer_directions,
    text_windows,
    top_contexts,
)
from .prefix import Prefix, capture_prefix
from .tail import LAST_POSITION_TESTED, Tail

__all__ = [
    "LAST_POSITION_TESTED",
    "LayerDirections",
    "LayerNTKOperator",
    "Prefix",
    "Tail",
    "capture_prefix",
    "example_scores",
    "layer_directions",
    "layer_ntk_operator",
    "layer_weight",
    "load_gemma",
    "sqrt_psd",
    "tail_memory",
    "text_windows",
    "top_contexts",
    "unembedding_gram",
]
