"""The layer eNTK of a causal LM as a matrix-free operator, and the memory plan of its tail.

Outputs: the final hidden state at the last position, ``h = last_hidden_state[:, -1]``
(``output="hidden"``, kernel ``K_r = J_r J_r^T`` on ``R^(N*d)``, row ``n*d + i``), or all
vocabulary logits ``f = U h`` at that position (``output="logits"``). With ``S = U^T U``
(``U`` the output embedding, (V, d)) the all-logit kernel has the nonzero spectrum of
``K~ = S^(1/2) K_r S^(1/2)`` (``S^(1/2)`` applied per window), which is what this operator is
then: ``(N*d, N*d)`` instead of ``(N*V, N*V)``. Parameters: the one weight ``W`` of an
``nn.Linear`` / ``Conv1D`` in one block, whose output is ``o = a W^T (+ b)``.

A product ``K_r v`` runs the tail only (:class:`~entk_helpers.lm.tail.Tail`): a VJP back to
``o`` (its forward graph kept once), the weight-gradient contraction ``g = go^T a``, the
tangent ``do = a g^T`` and a JVP, the transpose of that VJP (its graph kept once). Where the
tail reads ``o`` at the last position only (the weight in the last block, downstream of
attention) the route is "structured": ``K_r v_n = G_n sum_m (a_n . a_m) G_m^T v_m`` with
``G_n = dh_n / do_n`` computed once, no autograd per product.

Memory: what the tail keeps grows with N, T and the blocks above the weight. Its graphs are
measured on one window (:func:`tail_memory`) and kept only when they fit the memory budget
(:mod:`entk_helpers.budget`); otherwise they are rebuilt in every product, in chunks of
windows that fit. Float compute is the model's dtype. Logit softcapping is refused.

Sharded (``process_group=``): each rank holds its own contiguous shard of the windows (rank
order), the operator has the shape of all of them, and a product is this rank's pullback of its
slice to the weight-space gradients ``g`` (B, out, in), one all-reduce of ``g``, the
pushforward of the sum to this rank's windows and one all-gather
(:class:`entk_helpers.distributed.ShardedProduct`); on the structured route the pull is
``g = sum_n (G_n^T v_n) a_n^T`` and the push ``G_n g a_n``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..budget import MemoryBudgetError, format_bytes, get_memory_budget
from ..kernel_operator import KernelOperator
from .model import check_eager, locate_weight
from .prefix import Prefix, capture_prefix
from .tail import Tail

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

OUTPUTS = ("hidden", "logits")


def unembedding_gram(model: nn.Module, chunk_size: int = 32768) -> Tensor:
    """``S = U^T U`` (d, d) in float64, ``U`` (V, d) the output embedding, summed in chunks."""
    if getattr(model.config, "final_logit_softcapping", None) is not None:
        raise ValueError("final logit softcapping is set: logits are not linear in h, so "
                         "output='logits' does not apply; use output='hidden'")
    U = model.get_output_embeddings().weight.detach()
    S = torch.zeros(U.shape[1], U.shape[1], dtype=torch.float64, device=U.device)
    for start in range(0, U.shape[0], chunk_size):
        block = U[start : start + chunk_size].double()
        S += block.T @ block
    return S


def sqrt_psd(S: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix (negative eigenvalues from round-off set to 0)."""
    values, vectors = torch.linalg.eigh(S)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def tail_memory(model: nn.Module, prefix: Prefix, tail: Tail | None = None) -> dict[str, int]:
    """Bytes the tail's graphs keep per window, measured on the prefix's first window.

    Returns {"vjp": the autograd graph of its VJP, "jvp": what the graph of that VJP's own
    VJP (the JVP, :func:`_transpose`) adds}: the storages autograd saves
    (``torch.autograd.graph.saved_tensors_hooks``), less the model's weights and the prefix.
    """
    tail = tail or Tail(model, prefix)
    P = tail.positions
    with torch.no_grad():
        o = tail.module(prefix.module_in[:1, -P:].contiguous())
    o = o.detach().requires_grad_(True)
    known = {t.untyped_storage().data_ptr() for t in [
        *model.parameters(), *model.buffers(), prefix.hidden_in, prefix.module_in, o,
        *_tensors(prefix.block_calls)]}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            h = tail(o, prefix.hidden_in[:1])
            vjp = sum(saved.values())
            cotangent = torch.zeros_like(h, requires_grad=True)
            torch.autograd.grad(h, o, cotangent, create_graph=True)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
    return {"vjp": int(vjp), "jvp": int(sum(saved.values()) - vjp)}


def _plan_tail(
    per_window: dict[str, int], n: int, chunk_size: int, store_vjp: bool | None,
    store_jvp: bool | None, layer: int, device: torch.device,
) -> tuple[bool, bool, int]:
    """(store_vjp, store_jvp, chunk_size) for ``n`` windows within the memory budget.

    The VJP graph is kept first (the JVP's graph is built from it). What is not kept is rebuilt
    in every product, one chunk at a time: room for one chunk's graphs stays free.
    """
    if store_jvp:  # the JVP's graph is built from the VJP's
        if store_vjp is False:
            raise ValueError("store_jvp=True needs the VJP graph kept: pass store_vjp=True "
                             "or leave it to None")
        store_vjp = True
    budget = get_memory_budget(device)
    vjp_all, jvp_all = n * per_window["vjp"], n * per_window["jvp"]
    transient = max(1, per_window["vjp"] + per_window["jvp"])  # per window being rebuilt
    chunk = min(chunk_size, n)
    if store_vjp is None:  # with the JVP's graph kept too, or next to one window's rebuild
        store_vjp = vjp_all + min(jvp_all, transient) <= budget
    if store_jvp is None:
        store_jvp = store_vjp and vjp_all + jvp_all <= budget
    kept = vjp_all * store_vjp + jvp_all * store_jvp
    rebuilds = not (store_vjp and store_jvp)
    need = kept + rebuilds * transient
    if need > budget:
        parts = [name for name, on in (("its VJP graph", store_vjp), ("its JVP graph", store_jvp),
                                       ("one window's rebuild", rebuilds)) if on]
        raise MemoryBudgetError(
            f"the layer-{layer} eNTK tail needs {format_bytes(need)} for {' + '.join(parts)} "
            f"({n} windows), over the memory budget of {format_bytes(budget)}. Use shorter "
            "windows (T) or a later layer, leave store_vjp / store_jvp to None (or pass False), "
            "or raise the budget with entk_helpers.set_memory_budget('...GB') if the machine "
            "has the room.")
    if rebuilds:  # as many windows as fit at once next to what is kept
        chunk = min(chunk, (budget - kept) // transient)
    return store_vjp, store_jvp, int(chunk)


def _transpose(vjp_fn: Callable[[Tensor], tuple[Tensor]], cotangent: Tensor
               ) -> Callable[[Tensor], Tensor]:
    """``u -> J u`` from ``vjp_fn: v -> J^T v``, as the VJP of that linear map (taken at 0).

    ``cotangent``: a tensor of the VJP's input shape. Records one backward pass as a graph;
    each call then runs its (double) backward, no forward-mode AD.
    """
    _, back = torch.func.vjp(lambda v: vjp_fn(v)[0], torch.zeros_like(cotangent))
    return lambda u: back(u)[0]


def _check_replay(h: Tensor, reference: Tensor, layer: int) -> None:
    """The tail must reproduce the prefix pass's last hidden state (catches a bad replay)."""
    tol = 1e-5 if h.dtype == torch.float64 else 1e-3
    err = ((h - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()
    if not err <= tol:
        raise RuntimeError(
            f"the tail from block {layer} does not reproduce the model's last hidden state "
            f"(max relative error {err:.1e} > {tol:.0e}): this architecture's blocks do not "
            "replay as captured. Pass last_position=False; if that fails too, the model is not "
            "supported by entk_helpers.lm")


class LayerNTKOperator(KernelOperator):
    """Matrix-free layer eNTK of one weight of a causal LM (see the module docstring).

    Build with :func:`layer_ntk_operator` (or from a :class:`~entk_helpers.lm.prefix.Prefix`).
    Shape ``(N*d, N*d)``, row ``n*d + i``; float64 numpy in and out (scipy), tensors through
    :meth:`matmat_torch`; :meth:`kr_matmat` applies ``K_r`` to ``(N, d, B)`` tensors in the
    model's dtype. ``route``: "structured" or "tail"; ``plan``: for the tail route what is
    kept ({"vjp": "stored" | "recomputed", "jvp": "stored" | "rebuilt" | "recomputed",
    "chunk_size": windows per chunk}), for the structured route {}. ``n``: windows (of all
    ranks), ``n_local``: this rank's; ``shards``: the
    :class:`~entk_helpers.distributed.ShardedProduct` of a sharded operator, else None.

    Args:
        output: "hidden" (``K_r``) or "logits" (``K~``; ``s_half`` = ``S^(1/2)`` (d, d) can be
            passed to reuse it across layers, else it is computed from the output embedding).
        chunk_size: windows per pass through the tail (shrunk to fit the budget).
        store_vjp, store_jvp: keep the tail's VJP graph / its JVP's graph for every product
            (``None``: when they fit the budget; :func:`tail_memory`).
        last_position: the last block's last-position shortcut (:class:`Tail`).
        process_group: a ``torch.distributed`` group: ``prefix`` holds this rank's contiguous
            shard of the windows (rank order), ``V`` and the results are those of all windows,
            the same on every rank (the module docstring). A collective: every rank builds it
            and applies it to the same vectors; :func:`layer_ntk_operator` also turns a
            set-up error on one rank into an error on all.
    Raises:
        MemoryBudgetError: when even one window's rebuild does not fit.
    """

    def __init__(
        self, model: nn.Module, prefix: Prefix, *, output: str = "hidden",
        s_half: Tensor | None = None, chunk_size: int = 64, store_vjp: bool | None = None,
        store_jvp: bool | None = None, last_position: bool | None = None,
        process_group: ProcessGroup | None = None,
    ) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"output={output!r}; choose one of {OUTPUTS}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size}; it must be at least 1")
        check_eager(model)
        site = locate_weight(model, prefix.weight)
        tail = Tail(model, prefix, last_position=last_position)
        N, T, d = prefix.hidden_in.shape
        self.n = self.n_local = N
        self.d, self.layer, self.weight, self.output = d, site.layer, site.name, output
        self.device = prefix.hidden_in.device
        self.compute_dtype = prefix.hidden_in.dtype
        self.s_half = None if output == "hidden" else (
            sqrt_psd(unembedding_gram(model)) if s_half is None else s_half
        ).to(self.device, torch.float64)
        P = tail.positions
        a = prefix.module_in[:, -P:].contiguous()  # (N, P, in)
        with torch.no_grad():
            o = site.module(a)  # (N, P, out)
        self._flat = a.reshape(N * P, -1)
        self._positions, self._out = P, o.shape[-1]
        x, ref = prefix.hidden_in, prefix.hidden_last
        chunk_size = min(chunk_size, N)
        g_bytes = N * d * o.shape[-1] * o.element_size()
        sharded = process_group is not None
        if P == 1 and g_bytes + N * N * 8 <= get_memory_budget(self.device):
            self.route, self.plan = "structured", {}
            self._pull, self._push, self._apply = self._structured(
                tail, o, x, ref, chunk_size, sharded)
        else:
            self.route = "tail"
            pull, push = self._tail(model, prefix, tail, o, chunk_size, store_vjp, store_jvp)
            # no closure over self: a reference cycle would keep the stored graphs (GBs at the
            # paper's N) alive after the operator is dropped, until Python's cycle collector ran
            self._pull, self._push, self._apply = pull, push, lambda V: push(pull(V))
        self.shards = None
        if sharded:
            from ..distributed import ShardedProduct, parameter_fingerprint

            facts = {"weight=": self.weight, "its block": self.layer, "output=": output,
                     "the hidden size d": d, "the window length T": T,
                     "the dtype": str(self.compute_dtype),
                     "the weight's shape": tuple(site.module.weight.shape),
                     "the weight's values (sum, sum of squares)": parameter_fingerprint(
                         {self.weight: site.module.weight.detach()})}
            if self.s_half is not None:
                facts["S^(1/2) (sum, sum of squares)"] = parameter_fingerprint(
                    {"s_half": self.s_half})
            self.shards = ShardedProduct(process_group, N, facts=facts)
            self.n = self.shards.n_total
        super().__init__(self.n * d)

    def _structured(self, tail: Tail, o: Tensor, x: Tensor, ref: Tensor, chunk_size: int,
                    sharded: bool) -> tuple[Callable[[Tensor], Tensor], ...]:
        """(pull, push, apply) from ``G_n = dh_n / do_n`` (N, d, out), by VJPs of the basis
        vectors, chunked in memory. ``apply`` (one process) contracts through the window Gram
        ``A = a a^T`` (N, N); pull ``(N, d, B) -> g (B, out, in)`` and push ``g -> (N, d, B)``
        go through weight space (sharded: ``A`` is not formed)."""
        N, d = self.n_local, self.d
        T = x.shape[1]
        # a backward of one basis vector through one window carries (T, d) buffers
        per = 4 * T * d * o.element_size()
        basis_chunk = max(1, min(d, get_memory_budget(self.device) // 8 // (chunk_size * per)))
        G = o.new_empty(N, d, o.shape[-1])
        eye = torch.eye(d, dtype=o.dtype, device=o.device)
        for s in range(0, N, chunk_size):
            c = slice(s, min(s + chunk_size, N))
            h, vjp_fn = torch.func.vjp(lambda oc, c=c: tail(oc, x[c]), o[c])
            _check_replay(h, ref[c], self.layer)
            basis = eye[:, None, :].expand(d, c.stop - c.start, d)
            (rows,) = torch.func.vmap(vjp_fn, chunk_size=basis_chunk)(basis)  # (d, c, 1, out)
            G[c] = rows[:, :, 0].transpose(0, 1)
        a_last = self._flat  # (N, in): one position per window

        def pull(V: Tensor) -> Tensor:
            Z = torch.einsum("nio,nib->nob", G, V)
            return torch.einsum("nob,na->boa", Z, a_last).contiguous()

        def push(g: Tensor) -> Tensor:
            Z = torch.einsum("boa,na->nob", g, a_last)
            return torch.einsum("nio,nob->nib", G, Z)

        if sharded:
            return pull, push, lambda V: push(pull(V))
        A = a_last @ a_last.T

        def apply(V: Tensor) -> Tensor:
            Z = torch.einsum("nio,nib->nob", G, V)
            Z = torch.einsum("nm,mob->nob", A, Z)
            return torch.einsum("nio,nob->nib", G, Z)

        return pull, push, apply

    def _tail(self, model: nn.Module, prefix: Prefix, tail: Tail, o: Tensor, chunk_size: int,
              store_vjp: bool | None, store_jvp: bool | None
              ) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """(pull, push): VJP and transposed-VJP products through the tail, kept or rebuilt per
        the plan. pull ``(N, d, B) -> g (B, out, in)``, the weight gradients; push ``g ->
        (N, d, B)``."""
        N, d, P, flat = self.n_local, self.d, self._positions, self._flat
        x, ref = prefix.hidden_in, prefix.hidden_last
        store_vjp, store_jvp, chunk_size = _plan_tail(
            tail_memory(model, prefix, tail), N, chunk_size, store_vjp, store_jvp, self.layer,
            self.device)
        chunks = [slice(s, min(s + chunk_size, N)) for s in range(0, N, chunk_size)]

        def tail_of(c: slice) -> Callable[[Tensor], Tensor]:
            return lambda oc: tail(oc, x[c])

        # the JVP as the VJP of the (linear) VJP: no forward-mode AD, a graph 1-2x the VJP's
        cotangent = x.new_zeros(chunk_size, d)
        vjps = []
        if store_vjp:
            for c in chunks:
                h, vjp_fn = torch.func.vjp(tail_of(c), o[c])
                _check_replay(h, ref[c], self.layer)
                vjps.append(vjp_fn)
        else:
            with torch.no_grad():
                _check_replay(tail(o[chunks[0]], x[chunks[0]]), ref[chunks[0]], self.layer)
        jvps = [_transpose(f, cotangent[: c.stop - c.start]) for f, c in zip(vjps, chunks)
                ] if store_jvp else []
        self.plan = {"vjp": "stored" if store_vjp else "recomputed",
                     "jvp": "stored" if store_jvp else "rebuilt" if store_vjp else "recomputed",
                     "chunk_size": chunk_size}

        def pullback(i: int) -> Callable[[Tensor], tuple[Tensor]]:
            return vjps[i] if vjps else torch.func.vjp(tail_of(chunks[i]), o[chunks[i]])[1]

        def pushforward(i: int) -> Callable[[Tensor], Tensor]:
            c = chunks[i]
            if jvps:
                return jvps[i]
            if vjps:
                return _transpose(vjps[i], cotangent[: c.stop - c.start])
            return lambda t: torch.func.jvp(tail_of(c), (o[c],), (t,))[1]

        def pull(V: Tensor) -> Tensor:
            Vb = V.movedim(-1, 0)  # (B, N, d): the B products share each pass through the tail
            B = Vb.shape[0]
            go = torch.cat([torch.func.vmap(pullback(i))(Vb[:, c])[0]
                            for i, c in enumerate(chunks)], 1)  # (B, N, P, out)
            return go.reshape(B, N * P, -1).transpose(1, 2) @ flat  # weight gradients

        def push(g: Tensor) -> Tensor:
            do = (g @ flat.T).transpose(1, 2).reshape(g.shape[0], N, P, -1)
            out = [torch.func.vmap(pushforward(i))(do[:, c]) for i, c in enumerate(chunks)]
            return torch.cat(out, 1).movedim(0, -1)

        return pull, push

    @property
    def memory_plan(self) -> str:
        """What the tail route keeps, in words ("" for the structured route)."""
        if not self.plan:
            return ""
        return (f"VJP graph {self.plan['vjp']}, JVP graph {self.plan['jvp']}, "
                f"{self.plan['chunk_size']} windows per chunk")

    def kr_matmat(self, V: Tensor) -> Tensor:
        """``K_r V`` for V (N, d, B) (or (N, d)), in the model's dtype (sharded: all N windows,
        the same V on every rank, the same result returned on every rank)."""
        squeeze = V.ndim == 2
        V = V[..., None] if squeeze else V
        if V.shape[:2] != (self.n, self.d):
            raise ValueError(f"expected ({self.n}, {self.d}, B), got {tuple(V.shape)}")
        V = V.to(self.device, self.compute_dtype)
        # columns per pass: the tail's cotangents and tangents, (N, P, out) each, per column
        per_column = 4 * self.n_local * self._positions * max(self._out, self._flat.shape[1],
                                                              self.d)
        cols = max(1, get_memory_budget(self.device) // 4 // (per_column * V.element_size()))
        if self.shards is None:
            apply = self._apply
        else:  # every rank runs the same passes (the collectives in each)
            cols = self.shards.smallest(cols)

            def apply(block: Tensor) -> Tensor:
                return self.shards.matmat(block, self._pull, self._push)

        with torch.no_grad():
            out = torch.cat([apply(V[..., s : s + cols])
                             for s in range(0, V.shape[-1], cols)], -1)
        self._count(V.shape[-1])
        return out[..., 0] if squeeze else out

    def matmat_torch(self, vectors: Tensor) -> Tensor:
        """``(N*d, k) -> (N*d, k)`` float64: ``K_r`` or ``K~`` applied to k vectors."""
        vectors = torch.as_tensor(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != self.shape[0]:
            raise ValueError(f"expected vectors of shape ({self.shape[0]}, k), got "
                             f"{tuple(vectors.shape)}")
        X = vectors.to(self.device, torch.float64).reshape(self.n, self.d, -1)
        if self.s_half is not None:
            X = torch.einsum("ij,njb->nib", self.s_half, X)
        Y = self.kr_matmat(X).to(torch.float64)
        if self.s_half is not None:
            Y = torch.einsum("ij,njb->nib", self.s_half, Y)
        return Y.reshape(self.n * self.d, -1)


def layer_ntk_operator(
    model: nn.Module, input_ids: Tensor, *, weight: str, output: str = "hidden",
    s_half: Tensor | None = None, chunk_size: int = 64, store_vjp: bool | None = None,
    store_jvp: bool | None = None, last_position: bool | None = None,
    process_group: ProcessGroup | None = None,
) -> LayerNTKOperator:
    """The eNTK of one weight of a causal LM over ``input_ids`` (N, T), matrix-free.

    ``output="hidden"``: the eNTK of ``model.base_model(input_ids).last_hidden_state[:, -1]``
    with respect to the parameter ``weight`` (its full name in ``model.named_parameters()``),
    shape ``(N*d, N*d)``, row ``n*d + i``. ``output="logits"``: the reduced
    ``K~ = S^(1/2) K_r S^(1/2)`` whose nonzero spectrum is the kernel of all last-position
    logits. Other arguments: :class:`LayerNTKOperator`. Load the model with
    ``attn_implementation="eager"``.

    ``process_group``: a ``torch.distributed`` group (``dist.group.WORLD``): ``input_ids`` is
    then this rank's contiguous shard of the windows, in rank order
    (:func:`entk_helpers.distributed.shard_slice`), the operator has the shape of all of them
    and its products take and return whole vectors, the same on every rank (one all-reduce of
    the (B, out, in) weight gradients and one all-gather per block of B vectors), so
    ``top_eigenpairs`` with the same seed gives the same eigenpairs on every rank. Every rank
    must build it (a collective) with the same model, weight and output; a set-up error on
    one rank is raised on all.

    Example:
        >>> op = layer_ntk_operator(model, ids, weight="model.layers.16.mlp.down_proj.weight",
        ...                         output="logits")
        >>> top = top_eigenpairs(op, k=25, method="lanczos", max_steps=50)
    """

    def build() -> LayerNTKOperator:
        prefix = capture_prefix(model, input_ids, [weight], chunk_size=chunk_size)[weight]
        return LayerNTKOperator(
            model, prefix, output=output, s_half=s_half, chunk_size=chunk_size,
            store_vjp=store_vjp, store_jvp=store_jvp, last_position=last_position,
            process_group=process_group)

    if process_group is None:
        return build()
    from ..distributed import build_on_every_rank

    return build_on_every_rank(process_group, build)
