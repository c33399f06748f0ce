"""Benchmark: training the paper's one-layer transformer (notebook 02) on the CPU.

The paper's recipe is 4000 epochs of mini-batch AdamW (batch 64, 420 training pairs): 28,000
steps of a model whose ops are tiny, so the time goes to per-op overhead, not arithmetic.
This script times ``train`` on ``--epochs`` epochs of that recipe, in one process and one
after the other, with torch's default intra-op threads (the baseline every ratio is taken
against) and with one thread (``train``'s default, ``cpu_threads=1``), first on an otherwise
idle machine and then while a second process spins on one core (as a CI runner's other jobs
or a laptop's browser would). It also times a bare step with AdamW's for-loop and fused
implementations. Times are scaled to the recipe's 4000 epochs.

    python benchmarks/bench_training.py
    python benchmarks/bench_training.py --epochs 300
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from entk_helpers.experiments.modular import (
    OneLayerTransformer,
    modular_addition_data,
    train,
    train_test_split,
    with_equals_token,
)

P, SEED, RECIPE_EPOCHS, BATCH = 29, 2, 4000, 64


def seconds_to_train(epochs: int, cpu_threads: int | None) -> float:
    """Wall seconds for ``epochs`` epochs of notebook 02's recipe (fresh seed-2 model)."""
    pairs, labels = modular_addition_data(P)
    train_idx, test_idx = train_test_split(P * P, 0.5, SEED)
    torch.manual_seed(SEED)
    model = OneLayerTransformer(P)
    start = time.perf_counter()
    train(model, with_equals_token(pairs, P), labels, train_idx, test_idx, epochs=epochs,
          lr=3e-4, weight_decay=1.0, loss="cross_entropy", batch_size=BATCH, logits_at=-1,
          n_classes=P, snapshot_every=20, eval_every=10, seed=SEED, cpu_threads=cpu_threads,
          progress=False)
    return time.perf_counter() - start


def milliseconds_per_step(fused: bool, steps: int = 700) -> float:
    """One AdamW step on a batch of 64 (forward, backward, update), one thread."""
    pairs, labels = modular_addition_data(P)
    tokens = with_equals_token(pairs, P)[:BATCH]
    torch.manual_seed(SEED)
    model = OneLayerTransformer(P)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1.0, fused=fused)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens)[:, -1, :P], labels[:BATCH]).backward()
        optimizer.step()

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(50):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) / steps * 1e3
    finally:
        torch.set_num_threads(before)


def with_competitor(measure: Callable[[], float]) -> float:
    """``measure()`` while another process keeps one core busy."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        return measure()
    finally:
        spinner.kill()
        spinner.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=150,
                        help="epochs timed per variant, scaled to 4000 (default 150)")
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {default_threads} default threads, "
          f"{platform.machine()}, {args.epochs} epochs per variant, scaled to {RECIPE_EPOCHS}")

    scale = RECIPE_EPOCHS / args.epochs
    rows = [
        (f"{default_threads} threads, idle (baseline)", None, False),
        ("1 thread, idle (train's default)", 1, False),
        (f"{default_threads} threads, one core busy", None, True),
        ("1 thread, one core busy", 1, True),
    ]
    timed = []
    for name, threads, busy in rows:
        def measure(threads: int | None = threads) -> float:
            return seconds_to_train(args.epochs, threads)
        timed.append((name, (with_competitor(measure) if busy else measure()) * scale))
    baseline = timed[0][1]
    print(f"\n{'training, 4000 epochs':<40}{'seconds':>10}{'x baseline':>12}")
    for name, seconds in timed:
        print(f"{name:<40}{seconds:>10.1f}{seconds / baseline:>12.2f}")

    loop, fused = milliseconds_per_step(fused=False), milliseconds_per_step(fused=True)
    print(f"\n{'one step, 1 thread':<40}{'ms':>10}{'x for-loop':>12}")
    print(f"{'AdamW for-loop (baseline)':<40}{loop:>10.2f}{1.0:>12.2f}")
    print(f"{'AdamW fused (train)':<40}{fused:>10.2f}{fused / loop:>12.2f}")


if __name__ == "__main__":
    main()
