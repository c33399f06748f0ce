"""From eNTK eigenvectors to weight-space directions, and ablating them.

The eNTK is ``K = J J^T`` with ``J`` the ``(N*C, P)`` Jacobian of the outputs over a data
set. An eigenvector ``v`` of K (a function over inputs and outputs) has a partner in
parameter space, ``u = J^T v / sqrt(lambda)``, the right singular vector of J: moving the
parameters along ``u`` moves the outputs along ``v``, and along nothing else to first order.
:func:`weight_space_directions` computes ``J^T v`` for a block of eigenvectors with one
vector-Jacobian product per chunk of inputs (J is never formed). :func:`ablated_parameters`
projects the trained parameters off such a subspace (or a random one, for a control), and
the model evaluated at the result (``torch.func.functional_call``) says whether the network
*uses* those directions: a causal test of what the eigenvectors only correlate with.
:func:`random_ablations` draws its control: random subspaces of the same dimension whose
removed component has the same norm. :func:`dense_jacobian` forms J itself, for models small
enough to check the matrix-free results against (``J^T J`` has the kernel's nonzero spectrum).

Parameters are flattened in the order of :func:`entk_helpers.ntk_operator` (the model's
named parameters that the kernel is taken over, each row-major).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap

from ._model import (
    ModelOutputs,
    OutputSelector,
    ParamSpec,
    chunks,
    select_parameters,
    validate_outputs,
)
from .features import orthonormal_basis


def flat_parameters(model: nn.Module, params: ParamSpec = None) -> Tensor:
    """The chosen parameters as one detached vector ``(P,)`` (model order, row-major)."""
    return torch.cat([p.detach().reshape(-1) for p in select_parameters(model, params).values()])


def unflatten_parameters(model: nn.Module, flat: Tensor, params: ParamSpec = None
                         ) -> dict[str, Tensor]:
    """``(P,)`` -> ``{name: tensor}`` shaped like the chosen parameters (for functional_call)."""
    chosen = select_parameters(model, params)
    total = sum(p.numel() for p in chosen.values())
    if flat.shape != (total,):
        raise ValueError(f"flat has shape {tuple(flat.shape)} but the chosen parameters have "
                         f"{total} entries: pass a (P,) vector from flat_parameters")
    out, start = {}, 0
    for name, p in chosen.items():
        out[name] = flat[start:start + p.numel()].reshape(p.shape).to(p.dtype)
        start += p.numel()
    return out


def weight_space_directions(
    model: nn.Module,
    inputs: Tensor,
    vectors: Tensor,
    *,
    output: str = "full",
    select: OutputSelector | None = None,
    params: ParamSpec = None,
    normalize: bool = True,
    chunk_size: int = 1024,
) -> Tensor:
    """``J^T v`` for each column v of ``vectors``, by vector-Jacobian products.

    Args:
        model, inputs, select, params: as for :func:`entk_helpers.ntk_operator` (N inputs,
            C outputs after ``select``).
        vectors: ``output="full"``: ``(N*C, k)``, rows ``n*C + c`` (eigenvectors of the
            full kernel). ``output="trace"``: ``(N, k)`` eigenvectors of the trace kernel
            ``(1/C) sum_c J_c J_c^T``; each gives C directions ``J_c^T v / sqrt(C)``.
        normalize: scale each returned column to unit norm.

    Returns:
        ``(P, k)`` for ``"full"``; ``(P, k*C)`` for ``"trace"``, column ``j*C + c`` from
        vector j and output c. The model's dtype and device.
    """
    if output not in ("full", "trace"):
        raise ValueError(f"output={output!r}; use 'full' (vectors (N*C, k)) or 'trace' "
                         "(vectors (N, k))")
    fn = ModelOutputs(model, select_parameters(model, params), select)
    values = fn.detached()
    dtype, device = next(iter(values.values())).dtype, next(iter(values.values())).device
    n = inputs.shape[0]
    with torch.no_grad():
        c = validate_outputs(fn(values, inputs[:1]), 1).shape[1]
    v = vectors.to(dtype=dtype, device=device)
    v = v[:, None] if v.ndim == 1 else v
    rows = n * c if output == "full" else n
    if v.ndim != 2 or v.shape[0] != rows:
        raise ValueError(f"vectors must be ({rows}, k) for output={output!r} with N={n} "
                         f"inputs and C={c} outputs; got {tuple(vectors.shape)}")
    k = v.shape[1]
    if output == "full":
        cotangents = v.T.reshape(k, n, c)                                  # (k, N, C)
    else:
        eye = torch.eye(c, dtype=dtype, device=device) / math.sqrt(c)
        cotangents = torch.einsum("nj,cd->jcnd", v, eye).reshape(k * c, n, c)
    total = torch.zeros(cotangents.shape[0], sum(t.numel() for t in values.values()),
                        dtype=dtype, device=device)
    for part in chunks(n, chunk_size):
        x = inputs[part]
        _, pullback = vjp(lambda vals, x=x: fn(vals, x, check=False), values)
        (grads,) = vmap(pullback)(cotangents[:, part].contiguous())
        total += torch.cat([grads[name].reshape(cotangents.shape[0], -1) for name in values], 1)
    directions = total.T
    if normalize:
        directions = directions / torch.linalg.vector_norm(directions, dim=0,
                                                           keepdim=True).clamp_min(1e-300)
    return directions


def random_subspace(dim: int, k: int, *, seed: int, dtype: torch.dtype = torch.float64
                    ) -> Tensor:
    """An orthonormal ``(dim, k)`` basis of a uniformly random k-dim subspace of R^dim."""
    if not 1 <= k <= dim:
        raise ValueError(f"k={k} must be between 1 and dim={dim}")
    gaussian = torch.randn(dim, k, generator=torch.Generator().manual_seed(seed),
                           dtype=torch.float64)
    return torch.linalg.qr(gaussian)[0].to(dtype)


def ablated_parameters(
    model: nn.Module,
    directions: Tensor,
    *,
    params: ParamSpec = None,
    change_norm: float | None = None,
) -> tuple[dict[str, Tensor], float]:
    """The parameters with their component in ``span(directions)`` projected out.

    ``theta' = theta - Q Q^T theta``, Q an orthonormal basis of the span of ``directions``
    ``(P, k)`` (e.g. from :func:`weight_space_directions`). ``change_norm`` rescales the
    removed component ``Q Q^T theta`` to that norm instead (a control of the same size as
    another ablation). The model itself is not changed.

    Returns:
        ``({name: tensor}, ||theta' - theta||)``: values for ``functional_call(model, ...)``
        and the norm of the change.
    """
    theta = flat_parameters(model, params)
    if directions.ndim != 2 or directions.shape[0] != theta.numel():
        raise ValueError(f"directions must be (P, k) with P={theta.numel()} parameters; got "
                         f"{tuple(directions.shape)}")
    basis = orthonormal_basis(directions).to(theta.device)
    removed = basis @ (basis.T @ theta.double())
    if change_norm is not None:
        removed = removed * (change_norm / float(torch.linalg.vector_norm(removed)))
    return (unflatten_parameters(model, (theta.double() - removed).to(theta.dtype), params),
            float(torch.linalg.vector_norm(removed)))


def random_ablations(
    model: nn.Module,
    k: int,
    change_norm: float,
    *,
    n_draws: int,
    seed: int = 0,
    params: ParamSpec = None,
) -> Iterator[dict[str, Tensor]]:
    """The control of an ablation: ``n_draws`` random k-dim subspaces, same removed norm.

    Draw i is :func:`random_subspace` ``(P, k, seed=seed + i)`` ablated with
    :func:`ablated_parameters` and its removed component rescaled to ``change_norm`` (the
    norm an eNTK ablation removed): a random change of the same size and dimension.

    Returns:
        An iterator of ``{name: tensor}`` parameter values for ``functional_call(model,
        ...)``, one per draw, drawn as it is consumed (arguments are checked at the call).
    """
    if n_draws < 0 or change_norm < 0:
        raise ValueError(f"n_draws={n_draws}, change_norm={change_norm}: both must be >= 0")
    dim = flat_parameters(model, params).numel()
    if not 1 <= k <= dim:
        raise ValueError(f"k={k} must be between 1 and the number of parameters P={dim}")
    return (ablated_parameters(model, random_subspace(dim, k, seed=seed + draw), params=params,
                               change_norm=change_norm)[0] for draw in range(n_draws))


def dense_jacobian(model: nn.Module, inputs: Tensor, *, params: ParamSpec = None) -> Tensor:
    """The Jacobian ``(N*C, P)`` of the outputs, float64 on the CPU, by ``vmap(jacrev)``.

    Rows ``n*C + c`` (input n, output c of the model's ``(N, C)`` outputs), columns in the
    order of :func:`flat_parameters`. Memory ``N*C*P`` floats: for small models and checks
    (``J J^T`` is the full eNTK, ``J^T v`` what :func:`weight_space_directions` returns).
    A float64 copy of the model is differentiated; the model itself is not changed.
    """
    names = list(select_parameters(model, params))
    reference = copy.deepcopy(model).cpu().double()
    values = {name: p.detach() for name, p in reference.named_parameters() if name in names}

    def one(values: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(reference, values, (x[None],))[0]

    x = inputs.cpu()
    x = x.double() if x.is_floating_point() else x
    per_example = vmap(jacrev(one), in_dims=(None, 0))(values, x)
    n = x.shape[0]
    return torch.cat([per_example[name].reshape(n * per_example[name].shape[1], -1)
                      for name in names], dim=1)
