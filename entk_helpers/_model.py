"""Shared plumbing: which parameters a kernel is taken over, and which outputs.

Private module. ``select_parameters`` turns the user's ``params=`` into named tensors (tied
parameters once, as autograd sees them); ``ModelOutputs`` evaluates ``select(model(x))`` as a
function of those parameters and checks that it is a finite ``(N, C)`` matrix.
"""

from __future__ import annotations

import fnmatch
import numbers
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
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


def check_chunk_size(chunk_size: Any) -> int | None:
    """``chunk_size`` as given by the user: None or a positive integer."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size={chunk_size!r} is not an integer; pass a positive number "
                        "of examples per chunk, or None to size the chunks to the memory budget")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}; pass a positive number of examples per "
                         "chunk, or None to size the chunks to the memory budget")
    return int(chunk_size)


def check_inputs(x: Any, name: str, reference: Tensor) -> Tensor:
    """``x``: a non-empty ``(N, ...)`` tensor on ``reference``'s device (floating point
    inputs in its dtype); a clear error naming ``name`` otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor with the examples along dim 0, got a "
            f"{type(x).__name__}; build one with torch.stack(...) or torch.tensor(...)."
        )
    if x.ndim == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} has no examples (shape {tuple(x.shape)}); pass a batch "
                         "(N, ...) with N >= 1.")
    if x.is_floating_point() and x.dtype != reference.dtype:
        raise TypeError(
            f"{name} is {x.dtype} but the model's parameters are {reference.dtype}; convert "
            f"the inputs ({name}.to({reference.dtype})) or the model (model.to(...)) first."
        )
    if x.device != reference.device:
        raise ValueError(f"{name} is on {x.device} but the model's parameters are on "
                         f"{reference.device}; move them with {name}.to('{reference.device}').")
    return x


LOW_PRECISION = (torch.float16, torch.bfloat16)


def warn_low_precision(reference: Tensor, what: str) -> None:
    """Warn that a half-precision model's Jacobians carry half-precision round-off."""
    if reference.dtype in LOW_PRECISION:
        warnings.warn(
            f"the model's parameters are {reference.dtype}: its forward and backward passes "
            f"carry relative errors near {torch.finfo(reference.dtype).eps:.0e}; {what}. For "
            "an accurate kernel convert the model and inputs to float32 first.",
            UserWarning, stacklevel=3,
        )


def check_examples_independent(
    fn: ModelOutputs, x1: Tensor, x2: Tensor, random_ok: bool = True
) -> None:
    """Probe: each example's outputs computed alone must equal those computed in a batch.

    A train-mode model whose outputs are random (dropout) gets a warning instead (the probe
    cannot tell randomness from mixing), or a ValueError when not ``random_ok``. Costs a few
    forward passes on two examples.
    """
    if x1.shape[0] >= 2:
        pair = x1[:2]
    elif x2.shape[0] >= 1 and x2.shape[1:] == x1.shape[1:] and x2.dtype == x1.dtype:
        pair = torch.cat([x1[:1], x2[:1]])
    else:
        pair = x1
    values = fn.detached()
    with torch.no_grad():
        together = fn(values, pair)
        if any(m.training for m in fn.model.modules()) and \
                not torch.equal(together, fn(values, pair)):
            if not random_ok:
                raise ValueError(
                    "the model is in train mode and its outputs are random (dropout?): a "
                    "matrix-free kernel must be the same matrix in every product. Call "
                    "model.eval() first."
                )
            warnings.warn(
                "the model is in train mode and its outputs are random (dropout?): the eNTK "
                "is then that of one random draw. Call model.eval() first.",
                UserWarning, stacklevel=3,
            )
            return
        if pair.shape[0] < 2:
            return
        try:
            alone = torch.cat([fn(values, pair[i : i + 1]) for i in range(pair.shape[0])])
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                "the model fails on one example alone, so its outputs depend on the batch "
                "(batch norm in train mode? call model.eval()); the eNTK needs each "
                f"example's outputs on their own. The error on one example: {err}"
            ) from err
    scale = float(torch.maximum(together.abs().max(), alone.abs().max()))
    tolerance = torch.finfo(together.dtype).eps ** 0.5 * scale
    gap = float((together - alone).abs().max())
    if gap > tolerance:
        raise ValueError(
            "the outputs of one example depend on the other examples in its batch (an "
            f"example alone and in a batch of two differ by {gap:.2e}, outputs up to "
            f"{scale:.2e}), so the eNTK would be wrong. Common causes: a select= that mixes "
            "rows (e.g. out - out.mean(0)), batch norm in train mode (call model.eval()). "
            "The model and select= must act on each example separately."
        )


def chunks(n: int, size: int) -> list[slice]:
    """``[0:size], [size:2 size], ...`` covering ``range(n)``."""
    return [slice(i, min(i + size, n)) for i in range(0, n, max(1, size))]


@contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads (None: as they are), restoring them after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
