"""Shared plumbing: which parameters a kernel is taken over, and which outputs.

Private module. ``select_parameters`` turns the user's ``params=`` into named tensors (tied
parameters once, as autograd sees them); ``ModelOutputs`` evaluates ``select(model(x))`` as a
function of those parameters and checks that it is a finite ``(N, C)`` matrix.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

ParamSpec = None | str | nn.Module | Iterable[str | nn.Parameter]
OutputSelector = Callable[[Any], Tensor]
OUTPUT_MODES = ("full", "trace", "mean_logit")


def select_parameters(model: nn.Module, params: ParamSpec = None) -> dict[str, nn.Parameter]:
    """Named parameters the kernel is taken over, in the model's order.

    ``params``: ``None`` (every parameter with ``requires_grad``), a name or glob pattern
    (``"fc1.*"``), a list of names / patterns / parameter tensors, or a submodule of ``model``.
    A tied parameter appears once, under its first name.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = {name: p for name, p in named.items() if p.requires_grad}
    elif isinstance(params, nn.Module):
        ids = {id(p) for p in params.parameters()}
        chosen = {name: p for name, p in named.items() if id(p) in ids}
        if ids and not chosen:
            raise ValueError("params= is a module that is not part of the model; pass a "
                             "submodule of the model (e.g. model.fc1) or parameter names.")
    else:
        specs = [params] if isinstance(params, str) else list(params)
        chosen = {}
        for spec in specs:
            if isinstance(spec, str):
                hits = [n for n in named if n == spec or fnmatch.fnmatchcase(n, spec)]
                if not hits:
                    raise ValueError(
                        f"no parameter of the model matches {spec!r}. Its parameters are: "
                        f"{_preview(named)}. Use exact names or glob patterns like 'fc1.*'."
                    )
                chosen.update({n: named[n] for n in hits})
            elif isinstance(spec, torch.Tensor):
                hits = [n for n, p in named.items() if p is spec]
                if not hits:
                    raise ValueError("a tensor passed in params= is not a parameter of the model")
                chosen[hits[0]] = named[hits[0]]
            else:
                raise TypeError(f"params entries must be names or parameters, got {type(spec)}")
        chosen = {n: named[n] for n in named if n in chosen}  # model order
    if not chosen:
        raise ValueError(
            f"no parameters selected (params={params!r}): the kernel would be zero. Pass "
            f"names, glob patterns or a submodule; the model has: {_preview(named)}. "
            "Frozen parameters (requires_grad=False) are only taken when named explicitly."
        )
    return chosen


def _preview(named: Mapping[str, Any], limit: int = 12) -> str:
    names = list(named)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_output_mode(output: str) -> None:
    if output not in OUTPUT_MODES:
        raise ValueError(f"output={output!r}; choose one of {OUTPUT_MODES}")


def validate_outputs(out: Any, n_examples: int) -> Tensor:
    """Check ``out`` is a finite ``(n_examples, C)`` tensor and return it."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(
            f"the model output (after select=) is a {type(out).__name__}, not a tensor; pass "
            "select=lambda out: out.logits[:, -1, :] (or similar) to pick an (N, C) tensor."
        )
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2 or out.shape[0] != n_examples:
        raise ValueError(
            f"the model output (after select=) has shape {tuple(out.shape)}, but the eNTK needs "
            f"(N, C) = ({n_examples}, C): one row per input example. For sequence models pass "
            "e.g. select=lambda out: out[:, -1, :] to keep the last position."
        )
    if not torch.isfinite(out).all():
        raise ValueError(
            "the model output contains NaN or inf values: the eNTK would be meaningless. "
            "Check the inputs and the model (e.g. an exploding checkpoint) before taking it."
        )
    return out


class ModelOutputs:
    """``x -> select(model(x))`` as a function of a chosen set of parameters.

    ``mean_logit=True`` replaces the ``(N, C)`` outputs by their mean over ``C`` (N, 1): the
    kernel of the mean logit equals the mean over all logit pairs of the full kernel.
    """

    def __init__(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        select: OutputSelector | None = None,
        mean_logit: bool = False,
    ) -> None:
        self.model = model
        self.params = params
        self.select = select
        self.mean_logit = mean_logit

    def apply(self, out: Any, n_examples: int, check: bool = True) -> Tensor:
        """``select`` then validation (and the mean over outputs if asked).

        ``check=False`` skips the data-dependent finiteness check (needed under ``vmap``).
        """
        out = self.select(out) if self.select else out
        if check:
            out = validate_outputs(out, n_examples)
        elif out.ndim == 1:
            out = out[:, None]
        return out.mean(dim=1, keepdim=True) if self.mean_logit else out

    def __call__(self, param_values: Mapping[str, Tensor], x: Tensor, check: bool = True) -> Tensor:
        """Outputs ``(B, C)`` for inputs ``x`` ``(B, ...)`` at the given parameter values."""
        out = functional_call(self.model, dict(param_values), (x,))
        return self.apply(out, x.shape[0], check)

    def n_outputs(self, x: Tensor) -> int:
        """C, from one example (C = 1 when ``mean_logit``)."""
        with torch.no_grad():
            return self(self.detached(), x[:1]).shape[1]

    def detached(self) -> dict[str, Tensor]:
        return {name: p.detach() for name, p in self.params.items()}


def chunks(n: int, size: int) -> list[slice]:
    """``[0:size], [size:2 size], ...`` covering ``range(n)``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, max(1, size))]
