"""Seconds per layer: this package's layer eNTK route vs the paper's route, on the real model.

Both solve the top-k eigenpairs of ``K~ = S^(1/2) K_r S^(1/2)`` for one weight of each layer
(``--weight``, default the paper's ``mlp.down_proj``) with the same fixed-step Lanczos (same
start vector) on the same N windows of T tokens:

* ours: one prefix forward, then products through the tail only
  (:class:`entk_helpers.lm.LayerNTKOperator`);
* paper: every product reruns the whole model (VJP then JVP w.r.t. the weight), the generic
  :func:`entk_helpers.ntk_operator` on ``last_hidden_state[:, -1] @ S^(1/2)``.

The paper's route is timed over ``--paper-steps`` products and scaled to ``--steps`` (printed as
such); with ``--paper-steps`` >= ``--steps`` it runs the full solve too and the subspace overlap of
the two top-k eigenvector sets is measured (it should be >= 0.99). Without that, agreement is
checked as the residual of our eigenvectors under the paper's operator for the top 3 pairs.

Ours can also run block Lanczos (``--block-size B``: B vectors per pass through the tail,
``--ours-products`` in all), which pays off where one pass over B vectors costs about as much as
one over a single vector (a GPU at small N; not a CPU, where the tail's matmuls already fill the
cores). The paper's route always takes single-vector steps.

    python benchmarks/bench_gemma_layer_entk.py --n 8 --T 64 --layers 6 16 17
    python benchmarks/bench_gemma_layer_entk.py --n 16 --layers 0 8 16 17 --paper-steps 50 \
        --block-size 25 --ours-products 150      # on a GPU
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from entk_helpers import ntk_operator
from entk_helpers.eigen import top_eigenpairs
from entk_helpers.experiments.grammar import load_corpus
from entk_helpers.lm import (
    LayerNTKOperator,
    capture_prefix,
    layer_weight,
    load_gemma,
    sqrt_psd,
    unembedding_gram,
)


def windows(tokenizer, n: int, T: int) -> torch.Tensor:
    """``<bos>`` + the first T tokens of the first n stories that are long enough: (n, T + 1)."""
    stories, _ = load_corpus()
    rows = []
    for story in stories:
        ids = tokenizer(story, add_special_tokens=False)["input_ids"]
        if len(ids) >= T:
            rows.append([tokenizer.bos_token_id] + ids[:T])
        if len(rows) == n:
            return torch.tensor(rows)
    raise RuntimeError(f"only {len(rows)} stories have {T} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--layers", type=int, nargs="+", default=[6, 16, 17])
    parser.add_argument("--weight", default="mlp.down_proj",
                        help="the weight's path inside each block, e.g. self_attn.o_proj")
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--steps", type=int, default=50, help="Lanczos steps (paper: 50)")
    parser.add_argument("--paper-steps", type=int, default=3,
                        help="products of the paper's route to time (>= steps: full solve)")
    parser.add_argument("--block-size", type=int, default=1,
                        help="ours: vectors per product (1: the paper's single-vector Lanczos)")
    parser.add_argument("--ours-products", type=int, default=None,
                        help="ours with --block-size > 1: products in all (default: --steps)")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    model, tok, info = load_gemma(device)
    print(f"model: {info['source']} (quantized={info['quantized']}); "
          f"{args.weight}, N={args.n}, T={args.T}, k={args.k}, {args.steps} Lanczos steps, "
          f"device {device}, "
          f"{torch.get_num_threads()} threads; ours: block size {args.block_size}")
    ids = windows(tok, args.n, args.T)
    s_half = sqrt_psd(unembedding_gram(model)).float()
    start = np.random.default_rng(0).standard_normal(args.n * model.config.hidden_size)
    rows = []
    for L in args.layers:
        t0 = time.perf_counter()
        weight = layer_weight(model, L, args.weight)
        prefix = capture_prefix(model, ids, [weight])[weight]
        op = LayerNTKOperator(model, prefix, output="logits", s_half=s_half)
        if args.block_size == 1:
            ours = top_eigenpairs(op, args.k, method="lanczos", max_steps=args.steps, v0=start)
        else:
            ours = top_eigenpairs(op, args.k, method="block_lanczos",
                                  block_size=args.block_size,
                                  max_steps=args.ours_products or args.steps)
        t_ours = time.perf_counter() - t0

        paper = ntk_operator(model.base_model, ids,
                             params=weight.removeprefix(model.base_model_prefix + "."),
                             select=lambda out: out.last_hidden_state[:, -1] @ s_half)
        if args.paper_steps >= args.steps:
            t0 = time.perf_counter()
            ref = top_eigenpairs(paper, args.k, method="lanczos", max_steps=args.steps, v0=start)
            t_paper, how = time.perf_counter() - t0, "measured"
            Q, F = ours.vectors.numpy(), ref.vectors.numpy()
            agreement = f"overlap {np.linalg.norm(Q.T @ F) ** 2 / args.k:.4f}"
        else:
            x = np.random.default_rng(1).standard_normal(paper.shape[0])
            t0 = time.perf_counter()
            for _ in range(args.paper_steps):
                paper.matvec(x)
            t_paper = (time.perf_counter() - t0) / args.paper_steps * args.steps
            how = f"{args.paper_steps} steps x {args.steps // args.paper_steps}"
            V = ours.vectors.numpy()[:, :3]
            res = [np.linalg.norm(paper.matvec(v) - lam * v) / ours.values[0].item()
                   for v, lam in zip(V.T, ours.values[:3].numpy())]
            agreement = f"top-3 rel. residual under paper op {max(res):.1e}"
        route = f"{op.route}, {op.n_matvecs} products"
        rows.append((L, route, t_ours, t_paper, how, agreement))
        print(f"layer {L:2d} [{route}]: ours {t_ours:7.1f} s, paper {t_paper:7.1f} s "
              f"({how}), x{t_paper / t_ours:.0f}, {agreement}", flush=True)

    print("\n| layer | route | ours (s) | paper (s) | speed-up | agreement |")
    print("|---|---|---|---|---|---|")
    for L, route, a, b, how, agree in rows:
        print(f"| {L} | {route} | {a:.1f} | {b:.1f} ({how}) | {b / a:.0f}x | {agree} |")


if __name__ == "__main__":
    main()
