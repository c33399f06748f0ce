"""Seconds per product: ``entk_helpers.lm`` (generic) against ``gemma.LayerEntk`` (Gemma-only).

Both apply ``K~ = S^(1/2) K_r S^(1/2)`` of one layer's ``mlp.down_proj.weight`` of Gemma-3-270M
on the same N windows of T tokens (``<bos>`` + T story tokens, as notebook 03): the old
operator runs a hand-written copy of Gemma's last block at the last position, the new one
the model's own blocks through forward hooks (:mod:`entk_helpers.lm.tail`). Products of the
two alternate on the same random vectors, after one warm-up each, so that a busy machine
slows both alike; the script prints the median seconds per product (wall clock, and the
process's CPU time, which a shared machine disturbs less), their ratios new / old, the build
times (prefix pass included) and the relative difference of the two products.

    HF_HUB_OFFLINE=1 python benchmarks/bench_lm_layer_entk.py --n 16 --T 64 --layers 16 17
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from entk_helpers import gemma
from entk_helpers.experiments.grammar import load_corpus
from entk_helpers.lm import (
    LayerNTKOperator,
    capture_prefix,
    layer_weight,
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
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 17])
    parser.add_argument("--products", type=int, default=8, help="timed products per operator")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok, info = gemma.load_gemma(device)
    ids = windows(tok, args.n, args.T)
    print(f"model: {info['source']} (quantized={info['quantized']}); N={args.n}, "
          f"T={ids.shape[1]}, {args.products} products each, device {device}, "
          f"{torch.get_num_threads()} threads")
    s_half = sqrt_psd(unembedding_gram(model)).float()
    rng = np.random.default_rng(0)
    rows = []
    for L in args.layers:
        t0 = time.perf_counter()
        old = gemma.LayerEntk.build(model, gemma.capture_prefix(model, ids, [L])[L], s_half)
        old_op = old.linear_operator()
        build_old = time.perf_counter() - t0
        t0 = time.perf_counter()
        weight = layer_weight(model, L, "mlp.down_proj")
        new = LayerNTKOperator(model, capture_prefix(model, ids, [weight])[weight],
                               output="logits", s_half=s_half)
        build_new = time.perf_counter() - t0
        times: dict[str, list[float]] = {"old": [], "new": []}
        cpu: dict[str, list[float]] = {"old": [], "new": []}
        diffs = []
        for i in range(args.products + 1):
            x = rng.standard_normal(new.shape[0])
            out = {}
            for name, op in (("old", old_op), ("new", new)) if i % 2 else (("new", new),
                                                                          ("old", old_op)):
                t0, c0 = time.perf_counter(), time.process_time()
                out[name] = op.matvec(x)
                if i:  # the first product of each is a warm-up
                    times[name].append(time.perf_counter() - t0)
                    cpu[name].append(time.process_time() - c0)
            diffs.append(np.abs(out["new"] - out["old"]).max() / np.abs(out["old"]).max())
        t_old, t_new = np.median(times["old"]), np.median(times["new"])
        c_old, c_new = np.median(cpu["old"]), np.median(cpu["new"])
        rows.append((L, f"{old.route} / {new.route}", t_old, t_new, c_old, c_new, build_old,
                     build_new, max(diffs)))
        print(f"layer {L}: old {t_old:.4f} s, new {t_new:.4f} s per product (x{t_new / t_old:.2f}"
              f"; CPU x{c_new / c_old:.2f}); build {build_old:.1f} s / {build_new:.1f} s; new "
              f"plan: {new.memory_plan or new.route}; max rel. difference {max(diffs):.1e}",
              flush=True)
    print("\n| layer | route (old / new) | s / product, old / new | new / old | CPU s / product, "
          "old / new | new / old | build (s), old / new | max rel. difference |")
    print("|---|---|---|---|---|---|---|---|")
    for L, route, t_old, t_new, c_old, c_new, b_old, b_new, diff in rows:
        print(f"| {L} | {route} | {t_old:.4f} / {t_new:.4f} | {t_new / t_old:.2f} | "
              f"{c_old:.4f} / {c_new:.4f} | {c_new / c_old:.2f} | {b_old:.1f} / {b_new:.1f} | "
              f"{diff:.1e} |")


if __name__ == "__main__":
    main()
