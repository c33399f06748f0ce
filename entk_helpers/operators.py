"""The eNTK as a matrix-free linear operator, for kernels too large to form.

``K v = J (J^T v)``: one vector-Jacobian product (backward pass) followed by one
Jacobian-vector product (forward-mode pass), over all examples in chunks. Memory is that of a
few parameter-sized vectors and one chunk's activations, never (N*C)^2. The operator is a
``scipy.sparse.linalg.LinearOperator`` (float64 in and out, the model's dtype inside), so it
plugs into :func:`entk_helpers.top_eigenpairs`, ``scipy.sparse.linalg.eigsh`` or ``lobpcg``.

Limits: forward-mode AD must work through the model (PyTorch's flash / memory-efficient
attention kernels do not support it: load transformers models with
``attn_implementation="eager"``), and the operator vmaps over the vectors of a block, so the
model's ops need vmap batching rules (most do).

With ``process_group=`` the examples are sharded over the ranks of a ``torch.distributed``
group (each rank passes its own contiguous shard, in rank order) and the products are
combined by :class:`entk_helpers.distributed.ShardedProduct`: the operator has the global
shape and takes and returns whole vectors, the same on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap

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
    validate_outputs,
    warn_low_precision,
)
from .budget import check_budget, get_memory_budget
from .kernel_operator import KernelOperator

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class NTKOperator(KernelOperator):
    """Matrix-free eNTK of ``select(model(x))`` over ``inputs``; build it with :func:`ntk_operator`.

    Shape ``(N*C, N*C)`` for ``output="full"`` (index ``n*C + c``), ``(N, N)`` for
    ``"trace"`` and ``"mean_logit"``. ``matmat_torch`` works on tensors directly. With a
    ``process_group`` (build it with :func:`ntk_operator`), ``inputs`` is this rank's shard,
    N counts the examples of all ranks, and ``shards`` is the
    :class:`~entk_helpers.distributed.ShardedProduct` that combines them (None otherwise).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor,
        *,
        output: str = "full",
        select: OutputSelector | None = None,
        params: ParamSpec = None,
        chunk_size: int | None = None,
        process_group: ProcessGroup | None = None,
    ) -> None:
        check_output_mode(output)
        chunk_size = check_chunk_size(chunk_size)
        chosen = select_parameters(model, params)
        inputs = check_inputs(inputs, "inputs", next(iter(chosen.values())))
        self.output = output
        self.inputs = inputs
        self.fn = ModelOutputs(model, chosen, select, mean_logit=(output == "mean_logit"))
        self.values = self.fn.detached()
        self.chunk_size = chunk_size or min(inputs.shape[0], 1024)
        with torch.no_grad():
            first = self.fn(self.values, inputs[: self.chunk_size])
            for part in chunks(inputs.shape[0], self.chunk_size)[1:]:
                validate_outputs(self.fn(self.values, inputs[part]), part.stop - part.start)
        _check_operator_model(self.fn, self.values, inputs)
        self.n_examples = inputs.shape[0]
        self.n_outputs = first.shape[1]
        self.n_params = sum(v.numel() for v in self.values.values())
        self.shards = None
        if process_group is not None:
            from .distributed import ShardedProduct, parameter_fingerprint

            self.shards = ShardedProduct(process_group, self.n_examples, facts={
                "the example shape": tuple(inputs.shape[1:]),
                "the input dtype": str(inputs.dtype), "output=": output,
                "the outputs per example": self.n_outputs,
                "the parameters": [(n, tuple(v.shape), str(v.dtype))
                                   for n, v in self.values.items()],
                "the parameter values (sum, sum of squares)": parameter_fingerprint(self.values),
            })
            self.n_examples = self.shards.n_total
        size = self.n_examples * (self.n_outputs if output == "full" else 1)
        super().__init__(size)

    @property
    def _param_dtype(self) -> torch.dtype:
        return next(iter(self.values.values())).dtype

    @property
    def _device(self) -> torch.device:
        return next(iter(self.values.values())).device

    def _column_batch(self) -> int:
        """Vectors per vmapped pass so that their parameter-space images fit the budget."""
        per_column = 3 * self.n_params * torch.finfo(self._param_dtype).bits // 8
        return int(max(1, min(64, get_memory_budget(self._device) // (4 * per_column))))

    def _full_matmat(self, cotangents: Tensor) -> Tensor:
        """``(N, C, k) -> (N, C, k)``: the full kernel applied to k output-space vectors."""
        k = cotangents.shape[-1]
        check_budget(k * self.n_params * self.values[next(iter(self.values))].element_size(),
                     f"{k} parameter-space vectors", "Apply the operator to fewer vectors "
                     "at a time.", self._device)
        if self.shards is None:
            result = self._push(self._pull(cotangents))
        else:
            result = self.shards.matmat(cotangents, self._pull, self._push)
        self._count(k)
        return result

    def _pull(self, cotangents: Tensor) -> dict[str, Tensor]:
        """``(n, C, k)`` cotangents of this process's n examples -> J^T of them, k per
        parameter: ``{name: (k, *shape)}``."""
        k = cotangents.shape[-1]
        tangents = {name: torch.zeros(k, *v.shape, dtype=v.dtype, device=v.device)
                    for name, v in self.values.items()}
        for part in chunks(self.inputs.shape[0], self.chunk_size):
            x = self.inputs[part]
            _, pullback = vjp(lambda values, x=x: self.fn(values, x, check=False), self.values)
            (grads,) = vmap(pullback)(cotangents[part].permute(2, 0, 1).contiguous())
            for name in tangents:
                tangents[name] += grads[name]
        return tangents

    def _push(self, tangents: dict[str, Tensor]) -> Tensor:
        """``{name: (k, *shape)}`` -> ``(n, C, k)``: J of this process's n examples."""
        k = next(iter(tangents.values())).shape[0]
        result = torch.empty(self.inputs.shape[0], self.n_outputs, k, dtype=self._param_dtype,
                             device=self._device)
        for part in chunks(self.inputs.shape[0], self.chunk_size):
            x = self.inputs[part]

            def push(tangent: dict[str, Tensor], x: Tensor = x) -> Tensor:
                return jvp(lambda values: self.fn(values, x, check=False),
                           (self.values,), (tangent,))[1]

            try:
                pushed = vmap(push)(tangents)  # (k, B, C)
            except (RuntimeError, NotImplementedError) as err:
                raise RuntimeError(
                    "forward-mode AD (jvp) failed inside the model. For transformers models "
                    "load them with attn_implementation='eager'; custom autograd Functions need "
                    f"a jvp rule. Original error: {err}"
                ) from err
            result[part] = pushed.permute(1, 2, 0)
        return result

    def matmat_torch(self, vectors: Tensor) -> Tensor:
        """``(dim, k) -> (dim, k)``: K applied to k vectors (tensors, the model's dtype)."""
        vectors = vectors.to(self._param_dtype).to(self._device)
        n, c = self.n_examples, self.n_outputs
        out = []
        for cols in chunks(vectors.shape[1], self._column_batch()):
            block = vectors[:, cols]
            k = block.shape[1]
            if self.output == "trace":
                # column j, output c: cotangent v_j placed on output c only
                eye = torch.eye(c, dtype=block.dtype, device=block.device)
                cot = torch.einsum("nj,cd->ncjd", block, eye).reshape(n, c, k * c)
                res = self._full_matmat(cot).reshape(n, c, k, c)
                out.append(torch.einsum("ncjc->nj", res) / c)
            else:
                res = self._full_matmat(block.reshape(n, c, k))
                out.append(res.reshape(n * c, k))
        result = torch.cat(out, dim=1)
        if not torch.isfinite(result).all():
            raise ValueError("the eNTK product contains NaN / inf (the model's gradients are "
                             "not finite on some inputs, or the vectors were not finite)")
        return result

    def to_dense(self) -> Tensor:
        """The whole kernel (dim, dim) by applying the operator to the identity (small cases)."""
        dim = self.shape[0]
        check_budget(dim * dim * 8, f"the dense ({dim}, {dim}) kernel",
                     "Keep the operator matrix-free and use top_eigenpairs.", self._device)
        eye = torch.eye(dim, dtype=self._param_dtype, device=self._device)
        return self.matmat_torch(eye)


def _check_operator_model(fn: ModelOutputs, values: dict[str, Tensor], inputs: Tensor) -> None:
    """The kernel builders' checks, plus a cheap product probe: a VJP and a JVP on (at most)
    two examples must be finite. Examples must not mix, and outputs must not be random
    (every product must see the same matrix)."""
    check_examples_independent(fn, inputs, inputs, random_ok=False)
    reference = next(iter(values.values()))
    warn_low_precision(reference, "the operator's products are computed in that precision")
    x = inputs[:2]
    generator = torch.Generator(device=reference.device).manual_seed(0)

    def f(v: dict[str, Tensor]) -> Tensor:
        return fn(v, x, check=False)

    try:
        out, pullback = vjp(f, values)
        cotangent = torch.randn(out.shape, generator=generator, dtype=out.dtype,
                                device=out.device)
        (grads,) = pullback(cotangent)
        pushed = jvp(f, (values,), (grads,))[1]
    except (RuntimeError, NotImplementedError) as err:
        raise RuntimeError(
            "forward-mode AD (jvp) failed inside the model. For transformers models load them "
            "with attn_implementation='eager'; custom autograd Functions need a jvp rule. "
            f"Original error: {err}"
        ) from err
    finite = torch.isfinite(pushed).all() and all(torch.isfinite(g).all()
                                                   for g in grads.values())
    if not finite:
        raise ValueError(
            "the model's gradients are NaN / inf on the first inputs (a probe product "
            "J J^T u on two examples), so every eNTK product would be: check the model for "
            "non-differentiable points (sqrt or log at 0, ...) and the inputs."
        )


def ntk_operator(
    model: nn.Module,
    inputs: Tensor,
    *,
    output: str = "full",
    select: OutputSelector | None = None,
    params: ParamSpec = None,
    chunk_size: int | None = None,
    process_group: ProcessGroup | None = None,
) -> NTKOperator:
    """The eNTK over ``inputs`` as a matrix-free, symmetric ``LinearOperator``.

    Args: as :func:`entk_helpers.empirical_ntk` (``output="full"`` by default: the operator
    is for kernels too large to form). Each product costs one backward and one forward-mode
    pass over all N examples per block of vectors (``output="trace"`` multiplies the block
    by C).

    ``process_group``: a ``torch.distributed`` group (``dist.group.WORLD``): ``inputs`` is
    then this rank's contiguous shard of the examples, in rank order
    (:func:`entk_helpers.distributed.shard_slice`), the operator has the shape of all of them,
    and each product takes and returns whole vectors, the same on every rank, at one
    all-reduce of k parameter-space vectors and one all-gather per block of k vectors. Every
    rank must build it (a collective) and apply it to the same vectors in the same order:
    ``top_eigenpairs`` with the same seed does. A set-up error on one rank is raised on all.

    Example:
        >>> op = ntk_operator(model, x, select=lambda out: out[:, -1])
        >>> top = top_eigenpairs(op, k=25)
    """
    if process_group is None:
        return NTKOperator(model, inputs, output=output, select=select, params=params,
                           chunk_size=chunk_size)
    from .distributed import build_on_every_rank

    return build_on_every_rank(process_group, lambda: NTKOperator(
        model, inputs, output=output, select=select, params=params, chunk_size=chunk_size,
        process_group=process_group))
