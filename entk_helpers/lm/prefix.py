"""The prefix pass: one forward over the windows, keeping what a layer's tail starts from.

For the weight ``W`` of a module in block ``L`` the kernel's products only run the model from
block ``L`` up, so one no-grad forward (forward hooks) keeps, per weight: the hidden state
entering block ``L`` and the module's input ``a`` at every position (the products contract the
gradient with ``a``), the block's output and the final hidden state at the last position. The
keyword arguments every block received (rotary ``position_embeddings``, attention masks, ...)
are captured once from a batch-1 forward (``register_forward_pre_hook(with_kwargs=True)``): all
windows share one length and no padding, so they broadcast over any batch and the tail replays
them. Caching is off (``use_cache=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..progress import progress_bar
from .model import blocks, locate_weight


@dataclass
class Prefix:
    """What the tail from one weight's module needs, from the prefix pass.

    Attributes:
        weight: the parameter's full name; ``layer`` its block.
        hidden_in: (N, T, d) hidden state entering block ``layer``.
        module_in: (N, T, in) input of the weight's module (the activations ``a``).
        block_out_last: (N, d) block ``layer``'s output at the last position (PCA baseline).
        hidden_last: (N, d) ``model.base_model(input_ids).last_hidden_state[:, -1]``.
        block_calls: per block from ``layer`` to the last, (positional args after the hidden
            state, keyword args) it received, batch 1.
    """

    weight: str
    layer: int
    hidden_in: Tensor
    module_in: Tensor
    block_out_last: Tensor
    hidden_last: Tensor
    block_calls: list[tuple[tuple[Any, ...], dict[str, Any]]]


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _block_calls(model: nn.Module, ids: Tensor) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """(args after the hidden state, kwargs) of every block in a forward of ``ids`` (1, T)."""
    layers = blocks(model)
    calls: list[Any] = [None] * len(layers)

    def grab(i: int) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls[i] = (tuple(args[1:]), rest)

        return hook

    handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True)
               for i, b in enumerate(layers)]
    try:
        with torch.no_grad():
            model.base_model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for args, kwargs in calls:
        for value in (*args, *kwargs.values()):
            if type(value).__name__.endswith("Cache"):
                raise ValueError("a block received a key-value cache with use_cache=False; "
                                 "this model is not supported by entk_helpers.lm")
    return calls


def capture_prefix(
    model: nn.Module,
    input_ids: Tensor,
    weights: Sequence[str] | str,
    *,
    chunk_size: int = 32,
    progress: bool = False,
) -> dict[str, Prefix]:
    """One forward pass over ``input_ids`` (N, T), keeping each weight's :class:`Prefix`.

    Args:
        weights: full parameter names (``model.named_parameters()``), e.g. from
            :func:`entk_helpers.lm.layer_weight`.
        chunk_size: windows per forward batch.
    Memory: about ``N * T * (d + in) * element_size`` bytes per weight.
    """
    weights = [weights] if isinstance(weights, str) else list(weights)
    sites = [locate_weight(model, w) for w in weights]
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError("input_ids must be an (N, T) tensor of token ids, all windows of one "
                         f"length T, got {getattr(input_ids, 'shape', type(input_ids))}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size}; it must be at least 1")
    layers = blocks(model)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    store: dict[str, dict[str, list[Tensor]]] = {s.name: {"in": [], "a": [], "out": []}
                                                 for s in sites}
    handles = []
    for s in sites:
        keep = store[s.name]
        handles += [
            layers[s.layer].register_forward_pre_hook(
                lambda _m, args, kwargs, keep=keep: keep["in"].append(
                    _hidden_of(args, kwargs).detach()), with_kwargs=True),
            s.module.register_forward_pre_hook(
                lambda _m, args, keep=keep: keep["a"].append(args[0].detach())),
            layers[s.layer].register_forward_hook(
                lambda _m, _a, out, keep=keep: keep["out"].append(
                    (out[0] if isinstance(out, tuple) else out)[:, -1].detach())),
        ]
    finals = []
    try:
        with torch.no_grad():
            starts = range(0, input_ids.shape[0], chunk_size)
            for s in progress_bar(starts, desc="prefix forward", disable=not progress):
                out = model.base_model(input_ids=input_ids[s : s + chunk_size], use_cache=False)
                finals.append(out.last_hidden_state[:, -1])
    finally:
        for h in handles:
            h.remove()
    calls = _block_calls(model, input_ids[:1])
    hidden_last = torch.cat(finals)
    prefixes = {}
    for s in sites:
        keep = store[s.name]
        if len(keep["a"]) != len(keep["in"]):
            raise ValueError(f"{s.name}'s module ran {len(keep['a'])} times in "
                             f"{len(keep['in'])} forward batches; it must run once per block call")
        prefixes[s.name] = Prefix(
            weight=s.name, layer=s.layer, hidden_in=torch.cat(keep["in"]),
            module_in=torch.cat(keep["a"]), block_out_last=torch.cat(keep["out"]),
            hidden_last=hidden_last, block_calls=calls[s.layer:])
    return prefixes
