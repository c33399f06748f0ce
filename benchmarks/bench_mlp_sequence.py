"""Benchmark: the eNTK over training (notebook 01, Fig. 2) against the training itself.

Notebook 01 trains the paper's p = 29 MLP (500 epochs, full batch) and then computes the
trace eNTK over all 841 inputs and its top eigenpairs at every 10th epoch (51 checkpoints).
The issue asks that this sequence cost no more than the training. This script measures, in
one process and one after the other:

1. training: the paper's recipe (seed 0, 70 % split, AdamW lr 0.05, weight decay 0.01, MSE),
   keeping the 51 snapshots; this is the baseline every ratio is taken against;
2. the notebook's route: ``mlp_trace_ntk`` (closed form, float32) + float32 ``eigh`` per
   checkpoint;
3. the general route: ``empirical_ntk(model, pairs, output="trace")`` (structured rule) +
   the same ``eigh`` per checkpoint, on every ``--stride``-th checkpoint, scaled to all 51.

The paper's own route (per-example Jacobians, dense (N, N, C, C) kernel) costs about 1160 s
per checkpoint here (``bench_mlp_entk.py``), i.e. about 16 hours for the sequence.

    python benchmarks/bench_mlp_sequence.py
    python benchmarks/bench_mlp_sequence.py --stride 1   # empirical_ntk on all 51 too
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from entk_helpers import empirical_ntk
from entk_helpers.experiments.modular import (
    ModularMLP,
    mlp_trace_ntk,
    modular_addition_data,
    train,
    train_test_split,
)

P, WIDTH, EPOCHS, SNAPSHOT_EVERY = 29, 512, 500, 10
N_KEEP = 200  # eigenpairs kept per checkpoint, as in the notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stride", type=int, default=5,
                        help="time empirical_ntk on every stride-th checkpoint (default 5)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")

    pairs, labels = modular_addition_data(P)
    torch.manual_seed(0)
    train_idx, test_idx = train_test_split(P * P, 0.7, seed=0)
    model = ModularMLP(P, WIDTH)
    start = time.perf_counter()
    run = train(model, pairs, labels, train_idx, test_idx, epochs=EPOCHS, lr=0.05,
                weight_decay=0.01, loss="mse", snapshot_every=SNAPSHOT_EVERY, seed=0,
                progress=False)
    train_seconds = time.perf_counter() - start
    epochs = sorted(run.snapshots)
    net = ModularMLP(P, WIDTH).eval()

    def sequence_seconds(kernel_of, checkpoints: list[int]) -> float:
        start = time.perf_counter()
        for epoch in checkpoints:
            net.load_state_dict(run.snapshots[epoch])
            values, vectors = torch.linalg.eigh(kernel_of(net).float())
            assert values[-N_KEEP:].isfinite().all() and vectors.shape == (P * P, P * P)
        return (time.perf_counter() - start) * len(epochs) / len(checkpoints)

    closed_form = sequence_seconds(lambda m: mlp_trace_ntk(m, pairs, dtype=torch.float32),
                                   epochs)
    strided = epochs[:: args.stride]
    structured = sequence_seconds(lambda m: empirical_ntk(m, pairs, output="trace"), strided)

    rows = [
        ("training (baseline)", train_seconds, "500 epochs, 51 snapshots"),
        ("closed form + eigh (notebook 01)", closed_form, "all 51 checkpoints"),
        ("empirical_ntk + eigh", structured,
         "all 51 checkpoints" if args.stride == 1
         else f"{len(strided)} checkpoints, scaled to 51"),
    ]
    print(f"\n{'route':<36}{'seconds':>10}{'x training':>12}  note")
    for name, seconds, note in rows:
        print(f"{name:<36}{seconds:>10.1f}{seconds / train_seconds:>12.2f}  {note}")


if __name__ == "__main__":
    main()
