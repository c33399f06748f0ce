"""The tail: the model's own blocks from the chosen one to the last, then the final norm.

``Tail(model, prefix)(o, x)`` is the final hidden state at the last position, ``(B, d)``, as a
function of the weight's module output ``o`` (``(B, P, out)``) and the hidden state entering
the block ``x`` (``(B, T, d)``): the block modules are called with the arguments they received
in the prefix pass (:mod:`entk_helpers.lm.prefix`), and a forward hook replaces the module's
output by ``o``. Autograd records only what depends on ``o``, so a product through the tail
costs what lies downstream of the weight, never a copy of the model's code.

The last-position shortcut (``last_position=True``): the last block only needs its output at
the last position, so forward hooks on the model's own modules narrow it there: the query
projection, the attention output projection and the MLP see the last position only, and the
attention function (the model's own, through ``transformers``' ``AttentionInterface``) gets the
last query row with keys and values at every position. It is on by default for the
architectures in :data:`LAST_POSITION_TESTED`, where tests check it against the full model;
every operator also checks at build time that the tail reproduces the prefix pass's
``last_hidden_state[:, -1]``. If the weight sits in the last block downstream of attention,
its output matters at the last position only: ``positions`` is then 1.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .model import blocks, final_norm, locate_weight
from .prefix import Prefix

# model_type values whose last-position shortcut tests/test_lm_operator.py checks against
# brute-force Jacobians of the full model
LAST_POSITION_TESTED = frozenset({"gpt2", "llama", "qwen2", "gpt_neox", "gemma3_text"})
_ATTENTION_NAME = "entk_last_query"
_OUT_PROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj")


class _ConfigView:
    """An attention module's config, but dispatching to the last-query attention function."""

    def __init__(self, config: Any, attention: Callable[..., Any]) -> None:
        self._config = config
        self._attn_implementation = _ATTENTION_NAME
        self.entk_attention = attention

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def _last_query_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, **kwargs: Any) -> tuple[Tensor, Any]:
    """The module's own attention function on the last query row; (B, T, H, hd) by expansion."""
    mask = attention_mask[..., -1:, :] if isinstance(attention_mask, Tensor) else attention_mask
    out, weights = module.config.entk_attention(module, query[..., -1:, :], key, value, mask,
                                                **kwargs)
    return out.expand(*out.shape[:-3], query.shape[-2], *out.shape[-2:]), weights


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION_NAME, _last_query_attention)


def _last_position_input(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if not args:
        raise ValueError("the last-position shortcut needs the hidden states as the first "
                         "positional argument of the attention projection and MLP; pass "
                         "last_position=False")
    return (args[0][..., -1:, :].contiguous(), *args[1:])


@contextmanager
def _last_position(block: nn.Module) -> Iterator[None]:
    """Hooks that narrow ``block`` to its output at the last position (see the module doc)."""
    attn = [m for m in block.children() if type(m).__name__.endswith("Attention")]
    out_proj = [getattr(attn[0], n) for n in _OUT_PROJ_NAMES if hasattr(attn[0], n)] if attn else []
    original = getattr(sys.modules[type(attn[0]).__module__], "eager_attention_forward",
                       None) if attn else None
    mlp = getattr(block, "mlp", None)
    if len(attn) != 1 or not out_proj or original is None or mlp is None:
        raise ValueError(f"cannot narrow {type(block).__name__} to the last position (no single "
                         "attention module with an output projection and eager attention "
                         "function, or no mlp); pass last_position=False")
    _register_attention()
    attention, config = attn[0], attn[0].config
    length: list[int] = []
    hooks = [out_proj[0].register_forward_pre_hook(_last_position_input),
             mlp.register_forward_pre_hook(_last_position_input)]
    query = getattr(attention, "q_proj", None)  # a separate query projection: last row only
    if isinstance(query, nn.Module):

        def narrow(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            length.append(args[0].shape[-2])
            return _last_position_input(module, args)

        def widen(_module: nn.Module, _args: Any, out: Tensor) -> Tensor:
            return out.expand(*out.shape[:-2], length.pop(), out.shape[-1])

        hooks += [query.register_forward_pre_hook(narrow), query.register_forward_hook(widen)]
    attention.config = _ConfigView(config, original)
    try:
        yield
    finally:
        attention.config = config
        for h in hooks:
            h.remove()


class Tail:
    """``h = tail(o, x)``: from the weight's module output to ``last_hidden_state[:, -1]``.

    Args:
        model: the causal LM (eval mode; eager attention).
        prefix: the weight's :class:`~entk_helpers.lm.prefix.Prefix` (block arguments).
        last_position: narrow the last block to the last position; ``None``: on for
            :data:`LAST_POSITION_TESTED`.
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
        self.last_position = bool(last_position)
        seen: list[int] = []
        with torch.no_grad(), self._hooks(lambda out: seen.append(out.shape[-2])):
            self._run(prefix.hidden_in[:1])
        if len(seen) != 1:
            raise ValueError(f"{prefix.weight}'s module ran {len(seen)} times in one pass of "
                             "its block; the layer eNTK needs a module called once")
        self.positions = seen[0]

    @contextmanager
    def _hooks(self, replace: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
        with ExitStack() as stack:
            handle = self.module.register_forward_hook(lambda _m, _a, out: replace(out))
            stack.callback(handle.remove)
            if self.last_position:
                stack.enter_context(_last_position(self.blocks[-1]))
            yield

    def _run(self, x: Tensor) -> Tensor:
        for block, (args, kwargs) in zip(self.blocks, self.calls):
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
