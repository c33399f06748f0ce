"""Dense empirical NTKs: the whole kernel matrix, per layer or summed.

For a model f with outputs f(x) in R^C and parameters theta, the Jacobian J(x) = df(x)/dtheta
has shape (C, P) and the eNTK is K(x, x')_{cd} = sum_p J_cp(x) J_dp(x'). A kernel over a set
of parameters is the sum of the kernels of its parameter tensors, so the computation runs
per tensor and adds up; :func:`layerwise_ntk` returns the pieces, :func:`empirical_ntk`
their sum.

Two exact methods:

- ``"structured"``: for the weight (and bias) of an ``nn.Linear`` and the weight of an
  ``nn.Embedding``, the per-example gradient is an outer product of the layer's input and
  the gradient at its output, so the kernel is (input Gram) x (output-gradient Gram), summed
  over sequence positions. No per-example parameter gradient is ever formed; on the paper's
  modular-addition MLP this is thousands of times cheaper than the Jacobian route. A layer
  qualifies when it runs once per forward pass on batched inputs and its parameter is used
  nowhere else (checked against autograd on the first chunk, so a weight reused outside its
  module, e.g. a tied unembedding, is never silently mis-counted).
- ``"jacobian"``: per-example Jacobians by ``torch.func.vmap(jacrev)``, chunked over
  examples and contracted straight to the requested output mode. General, slower.

``"auto"`` uses the structured rule for every parameter that qualifies and the Jacobian route
for the rest. Kernels that exceed the memory budget (see :mod:`entk_helpers.budget`) are
refused with a pointer to :func:`entk_helpers.ntk_operator`.

The model is evaluated as it is: call ``model.eval()`` first if it has dropout or batch norm
(a train-mode model with random outputs gets a warning). Examples must not interact inside a
batch: a probe compares one example alone with a batch of two and refuses models or
``select=`` functions that mix examples. Half-precision models (float16 / bfloat16) get their
kernels accumulated in float32, with a warning about the precision of their Jacobians.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from ._model import (
    ModelOutputs,
    OutputSelector,
    ParamSpec,
    check_chunk_size,
    check_examples_independent,
    check_inputs,
    check_output_mode,
    chunks,
    select_parameters,
    warn_low_precision,
)
from .budget import MemoryBudgetError, check_budget, get_memory_budget

METHODS = ("auto", "structured", "jacobian")
GroupSpec = str | Mapping[str, ParamSpec]


def empirical_ntk(
    model: nn.Module,
    inputs: Tensor,
    inputs2: Tensor | None = None,
    *,
    output: str = "trace",
    select: OutputSelector | None = None,
    params: ParamSpec = None,
    chunk_size: int | None = None,
    method: str = "auto",
) -> Tensor:
    """The eNTK of ``select(model(x))`` between ``inputs`` and ``inputs2`` (default: itself).

    Args:
        model: any ``nn.Module`` mapping a batch ``(N, ...)`` to outputs.
        inputs: ``(N1, ...)`` batch of examples; ``inputs2``: ``(N2, ...)`` or None.
        output: ``"full"`` -> ``(N1*C, N2*C)``, row ``n*C + c``; ``"trace"`` -> ``(N1, N2)``,
            ``(1/C) sum_c K_cc``; ``"mean_logit"`` -> ``(N1, N2)``, the kernel of the mean
            output, ``(1/C^2) sum_{c,d} K_cd``.
        select: ``g(model_output) -> (N, C)``, applied first (e.g. the last position,
            the first p logits, a projection).
        params: None (all trainable), names / glob patterns, or a submodule.
        chunk_size: examples per chunk (default: sized to the memory budget). Results do not
            depend on it.
        method: ``"auto"``, ``"structured"`` or ``"jacobian"`` (module docstring).

    Returns:
        The kernel on the parameters' device, in their dtype (float32 for float16 /
        bfloat16 models).

    Raises:
        TypeError / ValueError: inputs that are not a non-empty tensor in the model's dtype
            and device, a bad ``chunk_size``, or a model / ``select`` that mixes examples.
    """
    kernels = layerwise_ntk(
        model, inputs, inputs2, groups={"all": params}, output=output, select=select,
        chunk_size=chunk_size, method=method,
    )
    return kernels["all"]


def layerwise_ntk(
    model: nn.Module,
    inputs: Tensor,
    inputs2: Tensor | None = None,
    *,
    groups: GroupSpec = "module",
    output: str = "trace",
    select: OutputSelector | None = None,
    params: ParamSpec = None,
    chunk_size: int | None = None,
    method: str = "auto",
) -> dict[str, Tensor]:
    """eNTKs of groups of parameters, e.g. one per layer; they sum to :func:`empirical_ntk`.

    Args:
        groups: ``"module"`` (one kernel per module owning parameters, keyed by its name),
            ``"parameter"`` (one per parameter tensor), or a mapping ``{name: params spec}``
            (names, globs or a submodule for each group; groups should not overlap).
        params: restricts the parameters considered when ``groups`` is a string.
        Other arguments: as :func:`empirical_ntk`.

    Returns:
        ``{group name: kernel}``, each shaped as :func:`empirical_ntk` would return it.
    """
    check_output_mode(output)
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    chunk_size = check_chunk_size(chunk_size)
    group_params = _resolve_groups(model, groups, params)
    chosen = {name: p for members in group_params.values() for name, p in members.items()}
    group_of = {name: g for g, members in group_params.items() for name in members}
    reference = next(iter(chosen.values()))
    x1 = check_inputs(inputs, "inputs", reference)
    x2 = x1 if inputs2 is None else check_inputs(inputs2, "inputs2", reference)

    fn = ModelOutputs(model, chosen, select, mean_logit=(output == "mean_logit"))
    n_outputs = _check_model_outputs(fn, x1, x2, chunk_size)
    check_examples_independent(fn, x1, x2)
    accumulate = torch.promote_types(reference.dtype, torch.float32)
    warn_low_precision(reference, "the kernel is accumulated in float32")
    full = output == "full"
    rows = x1.shape[0] * (n_outputs if full else 1)
    cols = x2.shape[0] * (n_outputs if full else 1)
    check_budget(
        rows * cols * accumulate.itemsize * len(group_params),
        f"{len(group_params)} kernel(s) of shape ({rows}, {cols})",
        "Use output='trace' or 'mean_logit', fewer inputs, or the matrix-free "
        "entk_helpers.ntk_operator(...) with entk_helpers.top_eigenpairs.",
        reference.device,
    )
    kernels = {
        g: torch.zeros(rows, cols, dtype=accumulate, device=reference.device)
        for g in group_params
    }

    structured: dict[str, tuple[nn.Module, bool]] = {}
    if method in ("auto", "structured"):
        structured = _structured_candidates(model, chosen)
        missing = [n for n in chosen if n not in structured]
        if method == "structured" and missing:
            raise ValueError(
                f"method='structured' applies only to nn.Linear / nn.Embedding parameters; "
                f"these are not: {missing}. Use method='auto' (structured where it applies, "
                "Jacobians elsewhere) or method='jacobian'."
            )
        if structured:
            rejected = _add_structured_kernels(
                kernels, model, fn, structured, group_of, x1, x2, full, chunk_size
            )
            if rejected and method == "structured":
                raise ValueError(
                    f"method='structured' cannot be used for {rejected}: the layer runs more "
                    "than once per forward pass, on unbatched inputs, or its parameter is used "
                    "outside it (e.g. a tied weight). Use method='auto' or 'jacobian'."
                )
            for name in rejected:
                structured.pop(name)
    rest = [n for n in chosen if n not in structured]
    if rest:
        _add_jacobian_kernels(kernels, fn, rest, group_of, x1, x2, inputs2 is None, full,
                              chunk_size)
    return kernels


def _resolve_groups(
    model: nn.Module, groups: GroupSpec, params: ParamSpec
) -> dict[str, dict[str, nn.Parameter]]:
    if isinstance(groups, str):
        chosen = select_parameters(model, params)
        if groups == "parameter":
            return {name: {name: p} for name, p in chosen.items()}
        if groups == "module":
            out: dict[str, dict[str, nn.Parameter]] = {}
            for name, p in chosen.items():
                owner = name.rpartition(".")[0] or name
                out.setdefault(owner, {})[name] = p
            return out
        raise ValueError(f"groups={groups!r}; use 'module', 'parameter' or a mapping")
    if not isinstance(groups, Mapping):
        raise TypeError(f"groups must be 'module', 'parameter' or a mapping {{name: params}}, "
                        f"got a {type(groups).__name__}")
    if not groups:
        raise ValueError("groups={} names no group: pass {name: params spec} with at least "
                         "one entry, or groups='module' / 'parameter'")
    out = {g: select_parameters(model, spec) for g, spec in groups.items()}
    seen: dict[str, str] = {}
    for g, members in out.items():
        for name in members:
            if name in seen:
                raise ValueError(f"parameter {name!r} is in both groups {seen[name]!r} and "
                                 f"{g!r}; groups must not overlap (their kernels are summed)")
            seen[name] = g
    return out


def _check_model_outputs(
    fn: ModelOutputs, x1: Tensor, x2: Tensor, chunk_size: int | None
) -> int:
    """Run the model once over both inputs (no grad): shape and finiteness checks; C."""
    n_outputs = 0
    with torch.no_grad():
        for x in (x1, x2):
            for part in chunks(x.shape[0], chunk_size or 1024):
                out = fn(fn.detached(), x[part])
                n_outputs = out.shape[1]
    return n_outputs


# ----------------------------------------------------------------------------- structured


@dataclass
class _LayerCapture:
    """What one Linear/Embedding layer saw in a forward pass over B examples.

    ``inputs``: ``(B, T, in)`` activations (Linear) or ``(B, T)`` indices (Embedding).
    ``out_grads``: ``(B, C, T, out)``, d output_c / d layer output, per example.
    """

    inputs: Tensor
    out_grads: Tensor


def _structured_candidates(
    model: nn.Module, chosen: dict[str, nn.Parameter]
) -> dict[str, tuple[nn.Module, bool]]:
    """Parameter name -> (owning Linear/Embedding module, is it the bias)."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    out = {}
    for name, p in chosen.items():
        mods = owners.get(id(p), [])
        if len(mods) != 1:
            continue  # tied across modules: the Jacobian route counts every use
        module = mods[0]
        if isinstance(module, nn.Linear):
            out[name] = (module, p is module.bias)
        elif isinstance(module, nn.Embedding) and module.max_norm is None \
                and not module.scale_grad_by_freq:
            out[name] = (module, False)
    return out


def _capture_layers(
    model: nn.Module, fn: ModelOutputs, modules: list[nn.Module], x: Tensor
) -> tuple[dict[nn.Module, _LayerCapture], dict[nn.Module, str]]:
    """Forward ``x`` with hooks on ``modules``; per-example output gradients for every output.

    Returns the captures and, for layers that cannot be treated (called twice, unbatched),
    a reason.
    """
    batch = x.shape[0]
    inputs: dict[nn.Module, Tensor] = {}
    probes: dict[nn.Module, Tensor] = {}
    problems: dict[nn.Module, str] = {}

    def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        if module in inputs:
            problems[module] = "runs more than once per forward pass"
            return None
        if args[0].shape[:1] != (batch,) or out.shape[:1] != (batch,):
            problems[module] = "receives inputs without the batch dimension first"
            return None
        inputs[module] = args[0].detach()
        probes[module] = torch.zeros_like(out, requires_grad=True)
        return out + probes[module]

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.enable_grad():
            out = fn.apply(model(x), batch)
    finally:
        for h in handles:
            h.remove()
    live = [m for m in modules if m in probes and m not in problems]
    captures = {}
    if live:
        per_output = [
            torch.autograd.grad(out[:, c].sum(), [probes[m] for m in live], retain_graph=True,
                                allow_unused=True)
            for c in range(out.shape[1])
        ]
        for i, m in enumerate(live):
            grads = torch.stack(
                [torch.zeros_like(probes[m]) if g[i] is None else g[i] for g in per_output], dim=1
            )  # (B, C, *, out)
            grads = grads.reshape(batch, out.shape[1], -1, grads.shape[-1])
            act = inputs[m]
            act = act.reshape(batch, -1) if isinstance(m, nn.Embedding) else \
                act.reshape(batch, -1, act.shape[-1])
            captures[m] = _LayerCapture(act, grads)
    for m in modules:
        if m not in captures and m not in problems:
            problems[m] = "was not called in the forward pass"
    return captures, problems


def _reconstructed_grad(module: nn.Module, is_bias: bool, cap: _LayerCapture) -> Tensor:
    """Gradient of sum_{n,c} f_c(x_n) w.r.t. the parameter, from the factorised pieces."""
    g = cap.out_grads.sum(dim=1)  # (B, T, out)
    if is_bias:
        return g.sum(dim=(0, 1))
    if isinstance(module, nn.Embedding):
        grad = torch.zeros_like(module.weight)
        grad.index_add_(0, cap.inputs.reshape(-1), g.reshape(-1, g.shape[-1]))
        if module.padding_idx is not None:
            grad[module.padding_idx] = 0
        return grad
    return torch.einsum("bto,bti->oi", g, cap.inputs)


def _input_gram(
    module: nn.Module, is_bias: bool, a1: Tensor, a2: Tensor, dtype: torch.dtype
) -> Tensor:
    """``(B1, B2, T1, T2)``: the input-side factor of the kernel for each position pair."""
    if is_bias:
        return torch.ones(a1.shape[0], a2.shape[0], a1.shape[1], a2.shape[1], dtype=dtype,
                          device=a1.device)
    if isinstance(module, nn.Embedding):
        same = a1[:, None, :, None] == a2[None, :, None, :]
        if module.padding_idx is not None:
            same &= (a1 != module.padding_idx)[:, None, :, None]
        return same.to(dtype)
    return torch.einsum("nti,msi->nmts", a1.to(dtype), a2.to(dtype))


def _structured_block(
    module: nn.Module, is_bias: bool, c1: _LayerCapture, c2: _LayerCapture, full: bool
) -> Tensor:
    """Kernel block between two chunks: ``(B1*C, B2*C)`` if ``full`` else ``(B1, B2)``.

    One matrix product per position pair (t, s), so memory stays at the block's size; in
    float32 at least (half-precision models).
    """
    dtype = torch.promote_types(c1.out_grads.dtype, torch.float32)
    gram_in = _input_gram(module, is_bias, c1.inputs, c2.inputs, dtype)  # (n, m, t, s)
    g1, g2 = c1.out_grads.to(dtype), c2.out_grads.to(dtype)  # (n, C, t, o), (m, C, s, o)
    n, n_out, n_pos, _ = g1.shape
    m = g2.shape[0]
    shape = (n * n_out, m * n_out) if full else (n, m)
    block = g1.new_zeros(shape)
    for t in range(n_pos):
        for s in range(g2.shape[2]):
            if full:
                grads = (g1[:, :, t].reshape(n * n_out, -1) @ g2[:, :, s].reshape(m * n_out, -1).T)
                weight = gram_in[:, :, t, s].repeat_interleave(n_out, 0)
                block += grads * weight.repeat_interleave(n_out, 1)
            else:
                grads = g1[:, :, t].reshape(n, -1) @ g2[:, :, s].reshape(m, -1).T
                block += grads * gram_in[:, :, t, s]
    return block if full else block / n_out


def _add_structured_kernels(
    kernels: dict[str, Tensor],
    model: nn.Module,
    fn: ModelOutputs,
    structured: dict[str, tuple[nn.Module, bool]],
    group_of: dict[str, str],
    x1: Tensor,
    x2: Tensor,
    full: bool,
    chunk_size: int | None,
) -> list[str]:
    """Add the structured kernels in place; return parameter names that did not qualify."""
    modules = list(dict.fromkeys(m for m, _ in structured.values()))
    size = chunk_size or _structured_chunk_size(x1, fn)
    parts1 = chunks(x1.shape[0], size)
    parts2 = parts1 if x2 is x1 else chunks(x2.shape[0], size)
    caps1 = []
    rejected: set[str] = set()
    for i, part in enumerate(parts1):
        caps, problems = _capture_layers(model, fn, modules, x1[part])
        if i == 0:
            rejected |= {n for n, (m, _) in structured.items() if m in problems}
            rejected |= _used_elsewhere(model, fn, structured, caps, x1[part], rejected)
        caps1.append(caps)
    caps2 = caps1 if x2 is x1 else [_capture_layers(model, fn, modules, x2[p])[0]
                                    for p in parts2]
    n_out = next(iter(caps1[0].values())).out_grads.shape[1] if caps1[0] else 1
    scale = n_out if full else 1
    for name, (module, is_bias) in structured.items():
        if name in rejected:
            continue
        target = kernels[group_of[name]]
        for i, p1 in enumerate(parts1):
            for j, p2 in enumerate(parts2):
                if x2 is x1 and j < i:
                    continue
                block = _structured_block(module, is_bias, caps1[i][module],
                                          caps2[j][module], full)
                rows = slice(p1.start * scale, p1.stop * scale)
                cols = slice(p2.start * scale, p2.stop * scale)
                target[rows, cols] += block
                if x2 is x1 and j > i:
                    target[cols, rows] += block.T
    return sorted(rejected)


def _used_elsewhere(
    model: nn.Module,
    fn: ModelOutputs,
    structured: dict[str, tuple[nn.Module, bool]],
    caps: dict[nn.Module, _LayerCapture],
    x: Tensor,
    already: set[str],
) -> set[str]:
    """Parameters whose autograd gradient differs from the one their layer alone explains."""
    names = [n for n in structured if n not in already and structured[n][0] in caps]
    if not names:
        return set()
    targets = [fn.params[n] for n in names]
    frozen = [p for p in targets if not p.requires_grad]  # named explicitly by the user
    try:
        for p in frozen:
            p.requires_grad_(True)
        with torch.enable_grad():
            total = fn.apply(model(x), x.shape[0]).sum()
            grads = torch.autograd.grad(total, targets, allow_unused=True)
    finally:
        for p in frozen:
            p.requires_grad_(False)
    bad = set()
    for name, grad in zip(names, grads):
        module, is_bias = structured[name]
        rebuilt = _reconstructed_grad(module, is_bias, caps[module])
        actual = torch.zeros_like(rebuilt) if grad is None else grad
        scale = actual.norm() + rebuilt.norm() + 1e-30
        tolerance = max(1e-4, 16 * torch.finfo(actual.dtype).eps)  # bfloat16: round-off
        if (actual - rebuilt).norm() > tolerance * scale:
            bad.add(name)
    return bad


def _structured_chunk_size(x: Tensor, fn: ModelOutputs) -> int:
    """Examples per chunk so that a (chunk, C, chunk, C) block stays well inside the budget."""
    n_out = fn.n_outputs(x)
    budget = get_memory_budget(x.device) // 16
    per_pair = max(1, n_out * n_out * 4)
    return int(max(1, min(x.shape[0], (budget // per_pair) ** 0.5, 4096)))


# ------------------------------------------------------------------------------ jacobian


def _jacobian_fn(fn: ModelOutputs, names: list[str]) -> Callable[[Tensor], dict[str, Tensor]]:
    """``x (B, ...) -> {name: (B, C, numel)}``: per-example Jacobians by vmap(jacrev)."""

    def one_example(values: dict[str, Tensor], x: Tensor) -> Tensor:
        return fn(values, x[None], check=False)[0]

    def jac(x: Tensor) -> dict[str, Tensor]:
        values = {n: fn.params[n].detach() for n in names}
        # "different": a train-mode model with dropout (warned about) draws per example
        per_param = vmap(jacrev(one_example), in_dims=(None, 0), randomness="different")(
            values, x)
        return {n: j.reshape(j.shape[0], j.shape[1], -1) for n, j in per_param.items()}

    return jac


def _add_jacobian_kernels(
    kernels: dict[str, Tensor],
    fn: ModelOutputs,
    names: list[str],
    group_of: dict[str, str],
    x1: Tensor,
    x2: Tensor,
    symmetric: bool,
    full: bool,
    chunk_size: int | None,
) -> None:
    """Add the Jacobian-route kernels of parameters ``names`` in place."""
    n_out = fn.n_outputs(x1)
    reference = fn.params[names[0]]
    per_example = n_out * sum(fn.params[n].numel() for n in names) * reference.element_size()
    budget = get_memory_budget(reference.device)
    if 3 * per_example > budget:
        raise MemoryBudgetError(
            f"one example's Jacobian over {len(names)} parameter tensors needs "
            f"{per_example / 1e9:.2f} GB (x3 while computed), over the budget. Select fewer "
            "parameters (params=...), fewer outputs (select=...), or use the matrix-free "
            "entk_helpers.ntk_operator."
        )
    size = chunk_size or int(max(1, min(x1.shape[0], budget // (8 * per_example))))
    jac = _jacobian_fn(fn, names)
    accumulate = torch.promote_types(reference.dtype, torch.float32)
    parts1 = chunks(x1.shape[0], size)
    parts2 = parts1 if symmetric else chunks(x2.shape[0], size)
    keep_all = per_example * (x1.shape[0] + (0 if symmetric else x2.shape[0])) < budget // 4
    cache1: dict[int, dict[str, Tensor]] = {}
    cache2: dict[int, dict[str, Tensor]] = {} if not symmetric else cache1

    def jac_of(cache: dict[int, dict[str, Tensor]], x: Tensor, i: int, part: slice):
        if i in cache:
            return cache[i]
        with torch.no_grad():  # the transforms still differentiate; nothing else is tracked
            result = {n: j.to(accumulate) for n, j in jac(x[part]).items()}
        if keep_all:
            cache[i] = result
        return result

    scale = n_out if full else 1
    for i, p1 in enumerate(parts1):
        j1 = jac_of(cache1, x1, i, p1)
        for j, p2 in enumerate(parts2):
            if symmetric and j < i:
                continue
            j2 = j1 if symmetric and i == j else jac_of(cache2, x2, j, p2)
            rows = slice(p1.start * scale, p1.stop * scale)
            cols = slice(p2.start * scale, p2.stop * scale)
            for name in names:
                a, b = j1[name], j2[name]
                if full:
                    block = torch.einsum("ncp,mdp->ncmd", a, b).reshape(
                        a.shape[0] * n_out, b.shape[0] * n_out)
                else:
                    block = torch.einsum("ncp,mcp->nm", a, b) / n_out
                target = kernels[group_of[name]]
                target[rows, cols] += block
                if symmetric and j > i:
                    target[cols, rows] += block.T


__all__ = ["empirical_ntk", "layerwise_ntk"]
