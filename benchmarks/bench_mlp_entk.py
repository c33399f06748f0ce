"""Benchmark: the paper's eNTK route against ``empirical_ntk`` on the p = 29 modular MLP.

Routes, each timed in its own fresh process (so peak memory is that route's alone):

1. the paper's route: per-example Jacobians of all 29 logits by ``vmap(jacrev)`` over
   ``functional_call``, contraction to the dense ``(N, N, C, C)`` kernel, then its trace
   ``(1/C) sum_c K_cc``. By default it runs on a random subset of ``--n-baseline`` inputs and
   its time and memory are extrapolated to all 841 (Jacobians scale linearly in N, the
   contraction and the (N, N, C, C) tensor quadratically); ``--full-baseline`` runs it on all
   841 inputs (about 7 GB of memory in float32).
2. ``entk_helpers.empirical_ntk(model, pairs, output="trace")`` on all 841 inputs.
3. the top-25 eigenpairs of the full (841 * 29 = 24,389)-dimensional kernel, matrix-free:
   ``ntk_operator`` + ``top_eigenpairs`` (Lanczos), with residual norms.

Both kernels are compared on the common subset (relative Frobenius error). Peak memory is the
growth of the child process's peak RSS (``getrusage``) over its value after imports, model
and a small warm-up call, so one-time import costs count for no route.

    python benchmarks/bench_mlp_entk.py                  # baseline on 128 inputs, scaled
    python benchmarks/bench_mlp_entk.py --full-baseline  # the paper's route on all 841
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_model(p: int, width: int, dtype: torch.dtype, epochs: int) -> tuple[nn.Module, Tensor]:
    """The paper's MLP (seed 0), optionally trained a few epochs; all p*p input pairs."""
    from entk_helpers.experiments.modular import (
        ModularMLP,
        modular_addition_data,
        train,
        train_test_split,
    )

    torch.manual_seed(0)
    model = ModularMLP(p, width=width)
    pairs, labels = modular_addition_data(p)
    if epochs:
        train_idx, test_idx = train_test_split(p * p, 0.4, seed=0)
        train(model, pairs, labels, train_idx, test_idx, epochs=epochs, lr=1e-3,
              weight_decay=1.0, progress=False)
    return model.to(dtype).eval(), pairs


def paper_jacobians(model: nn.Module, x: Tensor) -> list[Tensor]:
    """Per-example Jacobians ``[(N, C, numel) per parameter tensor]`` by vmap(jacrev)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def one(values: dict[str, Tensor], example: Tensor) -> Tensor:
        return functional_call(model, values, (example[None],))[0]

    jac = vmap(jacrev(one), in_dims=(None, 0))(params, x)
    return [j.flatten(2) for j in jac.values()]


def paper_contraction(jacobians: list[Tensor]) -> Tensor:
    """The dense ``(N, N, C, C)`` kernel, summed over parameter tensors."""
    kernel = None
    for j in jacobians:
        part = torch.einsum("naf,mbf->nmab", j, j)
        kernel = part if kernel is None else kernel + part
    assert kernel is not None
    return kernel


def run_paper_route(args: argparse.Namespace, subset: Tensor) -> dict[str, Any]:
    """Child process: the paper's route on ``pairs[subset]``."""
    model, pairs = build_model(args.p, args.width, DTYPES[args.dtype], args.epochs)
    x = pairs[subset]
    torch.einsum("nmcc->nm", paper_contraction(paper_jacobians(model, x[:2])))  # warm-up
    before = peak_rss_bytes()
    start = time.perf_counter()
    jacobians = paper_jacobians(model, x)
    jac_s = time.perf_counter() - start
    full = paper_contraction(jacobians)
    contract_s = time.perf_counter() - start - jac_s
    n_out = full.shape[-1]
    kernel = torch.einsum("nmcc->nm", full) / n_out
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "jacobian_s": jac_s, "contraction_s": contract_s,
            "peak_growth": peak_rss_bytes() - before, "kernel": kernel,
            "n_params": sum(j.shape[-1] for j in jacobians), "n_outputs": n_out,
            "element_size": kernel.element_size()}


def run_entk_helpers(args: argparse.Namespace) -> dict[str, Any]:
    """Child process: ``empirical_ntk(..., output="trace")`` on all inputs."""
    from entk_helpers import empirical_ntk

    model, pairs = build_model(args.p, args.width, DTYPES[args.dtype], args.epochs)
    empirical_ntk(model, pairs[:2], output="trace")  # warm-up
    before = peak_rss_bytes()
    start = time.perf_counter()
    kernel = empirical_ntk(model, pairs, output="trace")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_growth": peak_rss_bytes() - before, "kernel": kernel}


def run_operator_eigenpairs(args: argparse.Namespace) -> dict[str, Any]:
    """Child process: top-k eigenpairs of the full (N*C, N*C) kernel, matrix-free."""
    from entk_helpers import ntk_operator, top_eigenpairs

    model, pairs = build_model(args.p, args.width, DTYPES[args.dtype], args.epochs)
    ntk_operator(model, pairs[:4]).matvec(torch.ones(4 * args.p).numpy())  # warm-up
    before = peak_rss_bytes()
    start = time.perf_counter()
    op = ntk_operator(model, pairs, output="full")
    result = top_eigenpairs(op, k=args.k, method="lanczos", max_steps=args.max_steps)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_growth": peak_rss_bytes() - before, "dim": op.shape[0],
            "n_matvecs": result.n_matvecs, "values": result.values,
            "relative_residuals": result.relative_residuals}


def in_fresh_process(fn: Callable[..., dict[str, Any]], *fn_args: Any) -> dict[str, Any]:
    """Run ``fn`` in a new spawned interpreter and return its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *fn_args).result()


def gb(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=int, default=29, help="modulus (the paper: 29)")
    parser.add_argument("--width", type=int, default=512, help="hidden width (the paper: 512)")
    parser.add_argument("--n-baseline", type=int, default=128,
                        help="inputs for the paper's route; time and memory are scaled to p*p")
    parser.add_argument("--full-baseline", action="store_true",
                        help="run the paper's route on all p*p inputs (~7 GB at p=29)")
    parser.add_argument("--epochs", type=int, default=0, help="train this many epochs first")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--k", type=int, default=25, help="eigenpairs of the full kernel")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="fixed Lanczos steps (the paper: 50 for the top 25); default: "
                             "scipy's restarted Lanczos to machine precision")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()

    n_all = args.p * args.p
    n_base = n_all if args.full_baseline else min(args.n_baseline, n_all)
    subset = torch.randperm(n_all, generator=torch.Generator().manual_seed(0))[:n_base].sort()[0]
    print(f"p={args.p}, width={args.width}, {n_all} inputs, {args.dtype}, epochs={args.epochs}; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")

    paper = in_fresh_process(run_paper_route, args, subset)
    ours = in_fresh_process(run_entk_helpers, args)
    eig = in_fresh_process(run_operator_eigenpairs, args)

    common = ours["kernel"][subset][:, subset].double()
    agreement = float((common - paper["kernel"].double()).norm() / paper["kernel"].double().norm())
    scale = n_all / n_base
    paper_s = paper["seconds"] if n_base == n_all else (
        paper["jacobian_s"] * scale + paper["contraction_s"] * scale**2)
    c, elt = paper["n_outputs"], paper["element_size"]

    def paper_tensor_bytes(n: int) -> int:
        """The paper route's two big tensors: Jacobians (n, C, P) and the (n, n, C, C) kernel."""
        return n * c * paper["n_params"] * elt + n**2 * c**2 * elt

    paper_bytes = paper_tensor_bytes(n_all)
    measured_bytes = paper["peak_growth"] if n_base == n_all else paper_bytes
    tag = "measured" if n_base == n_all else f"extrapolated from N={n_base}"

    rows = [
        ("paper route: vmap(jacrev) + (N,N,C,C)", f"{paper_s:10.2f}", gb(measured_bytes), tag),
        ("entk_helpers.empirical_ntk(trace)", f"{ours['seconds']:10.3f}", gb(ours["peak_growth"]),
         f"measured, N={n_all}"),
        ("ratio (paper / entk_helpers)", f"{paper_s / ours['seconds']:9.0f}x",
         f"{measured_bytes / max(ours['peak_growth'], 1):.0f}x", ""),
        (f"top-{args.k} eigenpairs, ntk_operator", f"{eig['seconds']:10.2f}",
         gb(eig["peak_growth"]), f"dim {eig['dim']}, {eig['n_matvecs']} matvecs"),
    ]
    print(f"\n{'route':42s} {'seconds':>10s} {'peak memory':>12s}  note")
    for name, seconds, memory, note in rows:
        print(f"{name:42s} {seconds:>10s} {memory:>12s}  {note}")
    if n_base < n_all:
        print(f"\npaper route measured on N={n_base}: {paper['seconds']:.2f} s "
              f"(Jacobians {paper['jacobian_s']:.2f} s, contraction {paper['contraction_s']:.2f}"
              f" s), peak RSS growth {gb(paper['peak_growth'])}; scaled to N={n_all} as "
              f"Jacobians x{scale:.1f} + contraction x{scale ** 2:.0f}; memory = the Jacobians "
              f"+ the (N, N, C, C) tensor = {gb(paper_bytes)} (at N={n_base} the same formula "
              f"gives {gb(paper_tensor_bytes(n_base))}).")
    residuals = eig["relative_residuals"]
    print(f"kernel agreement on the {n_base} common inputs: relative error {agreement:.1e}")
    print(f"operator eigenpairs: lambda_1 = {float(eig['values'][0]):.4g}, "
          f"lambda_{args.k} = {float(eig['values'][-1]):.4g}, max relative residual "
          f"{float(residuals.max()):.1e}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "n_inputs": n_all, "n_baseline": n_base, "dtype": args.dtype,
            "paper_seconds": paper_s, "paper_seconds_measured": paper["seconds"],
            "paper_bytes": measured_bytes, "paper_bytes_measured": paper["peak_growth"],
            "entk_seconds": ours["seconds"], "entk_bytes": ours["peak_growth"],
            "speedup": paper_s / ours["seconds"],
            "memory_ratio": measured_bytes / max(ours["peak_growth"], 1),
            "relative_error": agreement, "eig_seconds": eig["seconds"],
            "eig_bytes": eig["peak_growth"], "eig_matvecs": eig["n_matvecs"],
            "eig_max_relative_residual": float(residuals.max()),
        }, indent=2))
    assert agreement <= 1e-5, f"the kernels disagree: relative error {agreement:.1e} > 1e-5"


if __name__ == "__main__":
    main()
