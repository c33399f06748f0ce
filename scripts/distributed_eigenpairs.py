"""Top eNTK eigenpairs of a model with the examples sharded over processes (torchrun).

Every rank builds the same model (seeded here; load one checkpoint for a trained model),
takes its contiguous shard of the examples, and passes the process group to
``ntk_operator``; ``top_eigenpairs`` then runs the same on every rank, and rank 0 prints and
saves the result. CPU processes talk over gloo, GPUs (one per rank) over NCCL.

    torchrun --nproc-per-node 2 scripts/distributed_eigenpairs.py --p 29 --k 25
    torchrun --nproc-per-node 4 scripts/distributed_eigenpairs.py --output full --out eig.json

The example is the modular-addition MLP of notebook 01 (untrained, seed 0) over all p^2
pairs; replace ``build()`` by your own model and examples.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from entk_helpers import ntk_operator, top_eigenpairs
from entk_helpers.distributed import shard_slice

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build(p: int, width: int, dtype: torch.dtype) -> tuple[nn.Module, Tensor]:
    """The same model and the same examples on every rank (your own model goes here)."""
    from entk_helpers.experiments.modular import ModularMLP, modular_addition_data

    torch.manual_seed(0)
    model = ModularMLP(p, width=width).to(dtype).eval()
    pairs, _ = modular_addition_data(p)
    return model, pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=int, default=29, help="modulus (N = p^2 examples)")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--k", type=int, default=25, help="eigenpairs")
    parser.add_argument("--output", default="trace", choices=["full", "trace", "mean_logit"])
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--out", default=None, help="JSON file for the eigenvalues (rank 0)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else None
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    group = dist.group.WORLD
    try:
        model, examples = build(args.p, args.width, DTYPES[args.dtype])
        mine = shard_slice(len(examples), group)
        if device is not None:
            model, examples = model.to(device), examples.to(device)
        began = time.perf_counter()
        op = ntk_operator(model, examples[mine], output=args.output, process_group=group)
        eig = top_eigenpairs(op, k=args.k, seed=0)
        seconds = time.perf_counter() - began
        if dist.get_rank() == 0:
            values = eig.values.tolist()
            print(f"{dist.get_world_size()} ranks, shards {op.shards.sizes}, operator "
                  f"{op.shape}: top {args.k} eigenvalues in {seconds:.2f} s, "
                  f"{eig.n_matvecs} products, max relative residual "
                  f"{float(eig.relative_residuals.max()):.1e}")
            print("  " + " ".join(f"{v:.6g}" for v in values))
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"world_size": dist.get_world_size(), "shards": op.shards.sizes,
                               "eigenvalues": values, "seconds": seconds,
                               "products": eig.n_matvecs}, f)
        dist.barrier()  # no rank tears gloo down while another is still using it
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
