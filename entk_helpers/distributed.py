"""Kernel-vector products over the ranks of a ``torch.distributed`` process group.

An eNTK product ``K V = J (J^T V)`` is a sum over examples in its middle: with the examples
split in contiguous shards over ``R`` ranks (rank order), ``J^T V = sum_r J_r^T V_r``. Each
rank applies its shard's ``J_r^T`` to its slice ``V_r`` of the (replicated) block, one
all-reduce sums the parameter-space images, each rank applies its shard's ``J_r`` to the sum,
and an all-gather puts the output slices back together, replicated on every rank. An
eigensolver that runs the same on every rank (same seed, same start vector) then sees the
same products everywhere, so every rank ends with the same eigenpairs.

:class:`ShardedProduct` does this for any pair of per-shard callables (``pull``: slice ->
parameter-space tensor(s) summed over the shard, ``push``: parameter-space tensor(s) ->
slice); :func:`build_on_every_rank` makes a failure during set-up on one rank an error on
every rank instead of a hang. :func:`entk_helpers.ntk_operator` and
:func:`entk_helpers.lm.layer_ntk_operator` (windows sharded; the parameter-space tensor is the
weight gradient) use them. ``torch.distributed`` is imported only here, and only when a
process group is given: single-process users never load it.

    >>> import torch.distributed as dist
    >>> dist.init_process_group("gloo")             # torchrun sets RANK, WORLD_SIZE, ...
    >>> x_mine = x[shard_slice(len(x), dist.group.WORLD)]
    >>> op = ntk_operator(model, x_mine, process_group=dist.group.WORLD)   # global shape
    >>> top = top_eigenpairs(op, k=25)               # the same on every rank
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

ParamVector = Tensor | Mapping[str, Tensor]
BUCKET_BYTES = 64 * 2**20  # all-reduce buckets: at most this much extra memory per product


class ShardError(RuntimeError):
    """Raised on every rank when the ranks' shards, models or inputs do not fit together."""


def _dist() -> Any:
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("process_group= needs torch.distributed, which this torch build "
                           "lacks; run in one process (process_group=None).")
    if not dist.is_initialized():
        raise RuntimeError("process_group= was given but torch.distributed is not initialised: "
                           "call torch.distributed.init_process_group(...) first (torchrun "
                           "sets the environment it reads), then pass dist.group.WORLD.")
    return dist


def _check_group(group: Any) -> Any:
    dist = _dist()
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD), got {type(group).__name__}")
    return dist


def shard_slice(n_total: int, group: ProcessGroup) -> slice:
    """This rank's contiguous share of ``n_total`` examples: sizes differ by at most one,
    lower ranks first (``x[shard_slice(len(x), group)]``)."""
    dist = _check_group(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if n_total < world:
        raise ValueError(f"{n_total} examples cannot be shared over {world} ranks (each "
                         "needs at least one); use fewer processes or more examples")
    size, extra = divmod(n_total, world)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def exchange(group: ProcessGroup, item: Any) -> list[Any]:
    """All-gather one picklable ``item`` per rank, or raise :class:`ShardError` on every rank
    when any rank passed an exception (a failure before the collective set-up)."""
    dist = _check_group(group)
    world = dist.get_world_size(group)
    gathered: list[Any] = [None] * world
    sent = f"{type(item).__name__}: {item}" if isinstance(item, BaseException) else item
    dist.all_gather_object(gathered, (isinstance(item, BaseException), sent), group=group)
    failed = [(rank, msg) for rank, (bad, msg) in enumerate(gathered) if bad]
    if failed:
        lines = "; ".join(f"rank {rank}: {msg}" for rank, msg in failed)
        raise ShardError(f"set-up failed on {len(failed)} of {world} ranks ({lines}). "
                         "Fix it there; every rank stopped with this error.")
    return [value for _, value in gathered]


def build_on_every_rank(group: ProcessGroup, build: Callable[[], Any]) -> Any:
    """``build()`` on every rank; an exception before ``build``'s :class:`ShardedProduct`
    set-up (a bad input on one rank) is sent to the others, so that every rank raises
    instead of waiting in a collective until the group's timeout.

    ``build`` must create its :class:`ShardedProduct` as its last step that can fail.
    """
    _check_group(group)
    try:
        return build()
    except ShardError:
        raise  # already raised on every rank
    except Exception as err:
        try:
            exchange(group, err)
        except ShardError as collective:
            raise err from collective
        raise


def _same(a: Any, b: Any) -> bool:
    """Equal, floats within 1e-9 relative (a rank may sum its parameters in another order)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-300)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def parameter_fingerprint(tensors: Mapping[str, Tensor]) -> tuple[float, float]:
    """(sum, sum of squares) of all parameter entries in float64, to tell models apart."""
    total = sum(float(v.sum(dtype=torch.float64)) for v in tensors.values())
    squares = sum(float(torch.linalg.vector_norm(v, dtype=torch.float64)) ** 2
                  for v in tensors.values())
    return total, squares


class ShardedProduct:
    """The replicated product ``J (J^T V)`` over examples sharded across ``group``'s ranks.

    Args:
        group: a ``torch.distributed`` process group (``dist.group.WORLD`` for all ranks).
        n_local: examples in this rank's shard (shards in rank order, contiguous, unequal
            sizes allowed, none empty).
        facts: what must agree on every rank (example shape, output mode, parameter names,
            :func:`parameter_fingerprint`, ...): compared exactly, floats within 1e-9
            relative; a difference raises :class:`ShardError` on every rank naming the fact.
        check_inputs: check in each product that every rank passed the same block (a cheap
            fingerprint: one small all-gather), so that ranks whose solvers diverged fail
            loudly instead of returning a mix of different products.

    The constructor is a collective: every rank must build its product in the same order.
    Attributes: ``rank``, ``world_size``, ``sizes`` (examples per rank), ``n_total``,
    ``local`` (this rank's ``slice`` of the global examples).
    """

    def __init__(self, group: ProcessGroup, n_local: int, *, facts: Mapping[str, Any] | None = None,
                 check_inputs: bool = True) -> None:
        dist = _check_group(group)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.check_inputs = check_inputs
        mine = dict(facts or {})
        everyone = exchange(group, {"n_local": int(n_local), **mine})
        self.sizes = [entry["n_local"] for entry in everyone]
        if min(self.sizes) < 1:
            empty = [r for r, s in enumerate(self.sizes) if s < 1]
            raise ShardError(f"ranks {empty} passed no examples; every rank needs a shard of "
                             "at least one (entk_helpers.distributed.shard_slice splits evenly)")
        for key in mine:
            values = [entry.get(key) for entry in everyone]
            odd = [r for r, v in enumerate(values) if not _same(v, values[0])]
            if odd:
                raise ShardError(
                    f"the ranks disagree on {key}: rank 0 has {values[0]!r}, "
                    + ", ".join(f"rank {r} has {values[r]!r}" for r in odd)
                    + ". Every rank must pass the same model and examples of the same kind "
                    "(seed the model's construction or load one checkpoint on every rank).")
        self.n_total = sum(self.sizes)
        start = sum(self.sizes[: self.rank])
        self.local = slice(start, start + self.sizes[self.rank])

    def matmat(self, vectors: Tensor, pull: Callable[[Tensor], ParamVector],
               push: Callable[[ParamVector], Tensor]) -> Tensor:
        """``(n_total, ...) -> (n_total, ...)``, the same on every rank.

        ``vectors``: the whole block, the same on every rank, examples first. ``pull`` maps
        this rank's slice ``vectors[self.local]`` to parameter space, summed over the shard
        (a tensor or a dict of tensors; all-reduced in place); ``push`` maps the summed
        parameter-space vector to this rank's output slice ``(n_local, ...)``.
        """
        if vectors.shape[0] != self.n_total:
            raise ValueError(f"the block has {vectors.shape[0]} rows of examples; the sharded "
                             f"operator has {self.n_total} (all ranks together)")
        if self.check_inputs:
            self._check_replicated(vectors)
        summed = self.all_reduce(pull(vectors[self.local]))
        return self.gather(push(summed))

    def smallest(self, value: int) -> int:
        """The smallest of the ranks' ``value`` (a column count each rank's memory budget
        allows), so that every rank runs the same number of products."""
        return min(exchange(self.group, int(value)))

    def all_reduce(self, value: ParamVector) -> ParamVector:
        """Sum over ranks, in place; a dict's tensors in buckets of ``BUCKET_BYTES``."""
        dist = _dist()
        tensors = [value] if isinstance(value, Tensor) else list(value.values())
        bucket: list[Tensor] = []

        def flush() -> None:
            if len(bucket) == 1:
                dist.all_reduce(bucket[0], group=self.group)
            elif bucket:
                flat = torch.cat([t.reshape(-1) for t in bucket])
                dist.all_reduce(flat, group=self.group)
                for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
                    t.copy_(part.view_as(t))
            bucket.clear()

        for t in tensors:
            if not t.is_contiguous():
                raise ValueError("pull must return contiguous tensors (all-reduced in place)")
            if bucket and (t.dtype, t.device) != (bucket[0].dtype, bucket[0].device):
                flush()
            if bucket and sum(b.nbytes for b in bucket) + t.nbytes > BUCKET_BYTES:
                flush()
            bucket.append(t)
        flush()
        return value

    def gather(self, local: Tensor) -> Tensor:
        """``(n_local, ...)`` slices of every rank -> ``(n_total, ...)`` in rank order."""
        dist = _dist()
        if local.shape[0] != self.sizes[self.rank]:
            raise ValueError(f"push returned {local.shape[0]} rows; this rank's shard has "
                             f"{self.sizes[self.rank]} examples")
        longest = max(self.sizes)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([part[:size] for part, size in zip(parts, self.sizes)])

    def _check_replicated(self, vectors: Tensor) -> None:
        v = vectors.detach().reshape(-1).to(torch.float64)
        weights = torch.arange(1, v.numel() + 1, dtype=torch.float64, device=v.device) / v.numel()
        norm = torch.linalg.vector_norm(v)
        mine = torch.stack([norm, v.sum(), (weights * v).sum()])
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        _dist().all_gather(parts, mine, group=self.group)
        scale = float(norm) * (1 + math.sqrt(v.numel()))
        odd = [r for r, p in enumerate(parts) if float((p - mine).abs().max()) > 1e-6 * scale]
        if odd:
            raise ShardError(
                f"rank {self.rank}'s block differs from that of ranks {odd}: a sharded product "
                "needs the same vectors on every rank. Run the same solver with the same seed "
                "or start vector v0 on every rank (top_eigenpairs(..., seed=...)).")
