"""Gemma-3-270M layer eNTK at a large N: what ``LayerNTKOperator`` keeps, its memory and speed.

For each layer: the plan chosen under the memory budget, the build time, seconds per kernel-vector
product, and the growth of the process's RSS over building the operator and the products, next to
the estimate of what the plan keeps (N x :func:`entk_helpers.lm.tail_memory`, the graphs
measured on one window; the ratio checks that measurement). Windows are T consecutive tokens
of the shipped stories (overlapping when N needs it). Each layer runs in its own process, so
the RSS of one does not mask the next.

    python benchmarks/bench_gemma_memory_plan.py --n 1024 --layers 16 14 0 --products 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import torch

from entk_helpers.experiments.grammar import load_corpus
from entk_helpers.lm import (
    LayerNTKOperator,
    capture_prefix,
    layer_weight,
    load_gemma,
    sqrt_psd,
    tail_memory,
    unembedding_gram,
)


def rss_gb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 1e9


def stream_windows(tokenizer, n: int, T: int) -> torch.Tensor:
    """``<bos>`` + T consecutive tokens at n evenly spaced starts of the corpus: (n, T + 1)."""
    ids: list[int] = []
    for story in load_corpus()[0]:
        ids += tokenizer(story, add_special_tokens=False)["input_ids"]
    stride = (len(ids) - T) // n
    if stride < 1:
        raise RuntimeError(f"the corpus has {len(ids)} tokens, too few for {n} windows of {T}")
    return torch.tensor([[tokenizer.bos_token_id] + ids[i * stride : i * stride + T]
                         for i in range(n)])


def one_layer(layer: int, n: int, T: int, products: int) -> str:
    model, tok, _ = load_gemma()
    ids = stream_windows(tok, n, T)
    weight = layer_weight(model, layer, "mlp.down_proj")
    prefix = capture_prefix(model, ids, [weight])[weight]
    s_half = sqrt_psd(unembedding_gram(model)).float()
    per_window = tail_memory(model, prefix)
    before = rss_gb()
    t0 = time.perf_counter()
    op = LayerNTKOperator(model, prefix, output="logits", s_half=s_half)
    build = time.perf_counter() - t0
    V = torch.randn(n, op.d, 1)
    t0 = time.perf_counter()
    for _ in range(products):
        op.kr_matmat(V)
    per_product = (time.perf_counter() - t0) / products
    grown = rss_gb() - before
    if op.route == "structured":
        return f"| {layer} | structured | {build:.0f} | {per_product:.1f} | {grown:.1f} | - | - |"
    kept = n * (per_window["vjp"] * (op.plan["vjp"] == "stored")
                + per_window["jvp"] * (op.plan["jvp"] == "stored")) / 1e9
    plan = f"VJP {op.plan['vjp']}, JVP {op.plan['jvp']}, chunk {op.plan['chunk_size']}"
    ratio = f"{grown / kept:.2f}" if kept else "-"
    return (f"| {layer} | {plan} | {build:.0f} | {per_product:.1f} | {grown:.1f} | {kept:.1f} "
            f"| {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 14])
    parser.add_argument("--products", type=int, default=2)
    args = parser.parse_args()
    print(f"N = {args.n}, T = {args.T}, {args.products} products per layer, "
          f"{torch.get_num_threads()} threads")
    print("| layer | plan | build (s) | s / product | RSS growth (GB) | kept, estimated (GB) "
          "| growth / estimate |")
    print("|---|---|---|---|---|---|---|")
    context = multiprocessing.get_context("spawn")
    for layer in args.layers:
        with context.Pool(1) as pool:
            print(pool.apply(one_layer, (layer, args.n, args.T, args.products)), flush=True)


if __name__ == "__main__":
    main()
