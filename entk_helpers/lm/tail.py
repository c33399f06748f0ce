"""The tail: the model's own blocks from the chosen one to the last, then the final norm.

``Tail(model, prefix)(o, x)`` is the final hidden state at the last position, ``(B, d)``, as a
function of the weight's module output ``o`` (``(B, P, out)``) and the hidden state entering
the block ``x`` (``(B, T, d)``): the block modules are called with the arguments they received
in the prefix pass (:mod:`entk_helpers.lm.prefix`), and a forward hook replaces the module's
output by ``o``. Autograd records only what depends on ``o``, so a product through the tail
costs what lies downstream of the weight, never a copy of the model's code.

The last-position shortcut (``last_position=True``): the last block only needs its output at
the last position. It is called twice, both times by its own code. First on the whole
sequence, its attention module given a stand-in key-value cache that records the keys and
values (normed and rotated by the model's code) at every position and stops the forward
there; then on the last position alone, the attention given those keys and values through
the same cache, the last row of its mask and the last position's rotary embedding. Queries,
attention output and MLP are then computed at the last position only, and nothing of the
first call but the keys and values enters the products. It is on by default for the
architectures in :data:`LAST_POSITION_TESTED`, where tests check it against the full model,
and off for a weight of the last block's attention that runs before its cache (queries,
keys, values). Every operator also checks at build time that the tail reproduces the
prefix pass's ``last_hidden_state[:, -1]``. If the weight sits in the last block downstream
of attention, its output matters at the last position only: ``positions`` is then 1.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .model import blocks, final_norm, locate_weight
from .prefix import Prefix

# model_type values whose last-position shortcut tests/test_lm_operator.py checks against
# brute-force Jacobians of the full model
LAST_POSITION_TESTED = frozenset({"gpt2", "llama", "qwen2", "gpt_neox", "gemma3_text"})
_CACHE_NAMES = ("cache", "past_key_values", "layer_past", "past_key_value")


class _StopForwardError(Exception):
    """Ends the last block's first call once keys and values are known."""


class _KeysValues:
    """A stand-in key-value cache: records the first ``update`` and stops the forward there,
    then hands the recorded keys and values to the next one."""

    def __init__(self) -> None:
        self.recorded: tuple[Tensor, Tensor] | None = None

    def update(self, key: Tensor, value: Tensor, *_args: Any, **_kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        if self.recorded is None:
            self.recorded = (key, value)
            raise _StopForwardError
        return self.recorded


class _LastPosition:
    """Runs the last block for its output at the last position only (see the module doc).

    The attention module's arguments are bound by name (``inspect.signature``): the cache
    (``cache`` / ``past_key_values`` / ``layer_past``) is replaced by :class:`_KeysValues`;
    in the second call the ``attention_mask`` keeps its last query row and the rotary
    ``position_embeddings`` their last position.
    """

    def __init__(self, block: nn.Module) -> None:
        attn = [m for m in block.children() if type(m).__name__.endswith("Attention")]
        names = set(inspect.signature(attn[0].forward).parameters) if len(attn) == 1 else set()
        cache = [n for n in _CACHE_NAMES if n in names]
        if not cache:
            raise ValueError(f"cannot narrow {type(block).__name__} to the last position: no "
                             "single attention module taking a key-value cache; pass "
                             "last_position=False")
        self.block, self.attention, self.cache_name = block, attn[0], cache[0]
        self.signature = inspect.signature(attn[0].forward)

    def _with(self, cache: _KeysValues, last: bool) -> Callable[..., Any]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            bound = self.signature.bind(*args, **kwargs)
            bound.arguments[self.cache_name] = cache
            if last:
                mask = bound.arguments.get("attention_mask")
                if isinstance(mask, Tensor):
                    bound.arguments["attention_mask"] = mask[..., -1:, :]
                rotary = bound.arguments.get("position_embeddings")
                if rotary is not None:
                    bound.arguments["position_embeddings"] = tuple(r[..., -1:, :] for r in rotary)
            return bound.args, bound.kwargs

        return hook

    def __call__(self, x: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """``x`` (B, T, d) -> the block's output (B, 1, d) at the last position."""
        cache = _KeysValues()
        for last, inputs in ((False, x), (True, x[..., -1:, :])):
            handle = self.attention.register_forward_pre_hook(self._with(cache, last),
                                                              with_kwargs=True)
            try:
                out = self.block(inputs, *args, **kwargs)
            except _StopForwardError:
                pass
            finally:
                handle.remove()
        if cache.recorded is None:
            raise ValueError(f"{type(self.block).__name__}'s attention did not update its cache; "
                             "pass last_position=False")
        return out[0] if isinstance(out, tuple) else out


class Tail:
    """``h = tail(o, x)``: from the weight's module output to ``last_hidden_state[:, -1]``.

    Args:
        model: the causal LM (eval mode; eager attention).
        prefix: the weight's :class:`~entk_helpers.lm.prefix.Prefix` (block arguments).
        last_position: narrow the last block to the last position; ``None``: on for
            :data:`LAST_POSITION_TESTED`. ``last_position`` (attribute): whether it is used.
    Attributes:
        positions: P, the positions of ``o`` that the tail reads (T, or 1 when the weight is
            in the last block downstream of attention and the shortcut is on).
    """

    def __init__(self, model: nn.Module, prefix: Prefix, *, last_position: bool | None = None
                 ) -> None:
        site = locate_weight(model, prefix.weight)
        self.module = site.module
        self.layer = site.layer
        self.blocks = list(blocks(model))[site.layer:]
        self.norm = final_norm(model)
        self.calls = prefix.block_calls
        if last_position is None:
            last_position = getattr(model.config, "model_type", None) in LAST_POSITION_TESTED
        self._last = _LastPosition(self.blocks[-1]) if last_position else None
        seen = self._probe(prefix.hidden_in[:1])
        if len(seen) == 2 and self._last is not None:  # in the last attention, before its cache
            self._last = None
            seen = self._probe(prefix.hidden_in[:1])
        self.last_position = self._last is not None
        if len(seen) != 1:
            raise ValueError(f"{prefix.weight}'s module ran {len(seen)} times in one pass of "
                             "its block; the layer eNTK needs a module called once")
        self.positions = seen[0]

    def _probe(self, x: Tensor) -> list[int]:
        """The sequence lengths of the module's outputs in one pass of the tail over ``x``."""
        seen: list[int] = []
        with torch.no_grad(), self._hooks(lambda out: seen.append(out.shape[-2])):
            self._run(x)
        return seen

    @contextmanager
    def _hooks(self, replace: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
        handle = self.module.register_forward_hook(lambda _m, _a, out: replace(out))
        try:
            yield
        finally:
            handle.remove()

    def _run(self, x: Tensor) -> Tensor:
        for i, (block, (args, kwargs)) in enumerate(zip(self.blocks, self.calls)):
            if self._last is not None and i == len(self.blocks) - 1:
                x = self._last(x, args, kwargs)
            else:
                out = block(x, *args, **kwargs)
                x = out[0] if isinstance(out, tuple) else out
        return self.norm(x[..., -1, :])

    def __call__(self, o: Tensor, x: Tensor) -> Tensor:
        """``o`` (B, P, out) the module's output, ``x`` (B, T, d) the block's input -> (B, d)."""

        def replace(out: Tensor) -> Tensor:
            if out.shape != o.shape:
                raise ValueError(f"the tail got a module output of shape {tuple(o.shape)}, the "
                                 f"module makes {tuple(out.shape)}")
            return o

        with self._hooks(replace):
            return self._run(x)
