"""Benchmark: eNTK products per second with the examples sharded over 1, 2, ... processes.

The paper's p = 29 modular-addition MLP (``ModularMLP(29)``, width 512, seed 0, untrained)
over all 841 input pairs, the full kernel (841 * 29 = 24,389 dimensions): the product a
Lanczos step asks for. Routes, each in its own fresh processes:

1. baseline: ``ntk_operator`` in one process, no process group, all the threads (``--threads``,
   default: every CPU), and the same on one thread;
2. ``ntk_operator(..., process_group=WORLD)`` with R ranks (``--world-sizes``), the threads
   split among them (gloo on CPUs, loopback only; NCCL with one GPU per rank).

Each route warms up, then times ``--repeats`` runs of ``--products`` products of ``--block``
vectors, each between two barriers, and reports the fastest and the median run (wall time;
and rank 0's CPU time, which shows how much of the wall time was spent waiting for a core on
a shared machine). The probe product of every route is compared with the baseline's
(relative error, printed). Speed-ups are against the baseline of the same run.

    python benchmarks/bench_distributed.py                        # gloo, 1 and 2 ranks, CPU
    python benchmarks/bench_distributed.py --block 8 --products 5
    python benchmarks/bench_distributed.py --backend nccl         # GPUs, 1 .. #GPUs ranks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--world-sizes", default=None,
                        help="comma-separated ranks per route (default: 1,2 for gloo, "
                             "1..#GPUs for nccl)")
    parser.add_argument("--p", type=int, default=29)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--output", default="full", choices=["full", "trace", "mean_logit"])
    parser.add_argument("--block", type=int, default=1, help="vectors per product")
    parser.add_argument("--products", type=int, default=5, help="products per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per route")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="CPU threads in all, split among the ranks")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def world_sizes(args: argparse.Namespace) -> list[int]:
    """The rank counts to time; for NCCL a clear error without CUDA or with too few GPUs."""
    if args.backend == "nccl":
        if not torch.cuda.is_available():
            raise SystemExit("--backend nccl needs CUDA GPUs, one per rank, and "
                             "torch.cuda.is_available() is False here (torch "
                             f"{torch.__version__}). On CPUs use --backend gloo.")
        gpus = torch.cuda.device_count()
        sizes = ([int(s) for s in args.world_sizes.split(",")] if args.world_sizes
                 else list(range(1, gpus + 1)))
        if max(sizes) > gpus:
            raise SystemExit(f"--world-sizes {max(sizes)} needs {max(sizes)} GPUs (NCCL takes "
                             f"one per rank); this machine has {gpus}")
        return sizes
    return [int(s) for s in args.world_sizes.split(",")] if args.world_sizes else [1, 2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    """One rank (or the baseline): build, warm up, time, print one JSON line on rank 0."""
    from entk_helpers import ntk_operator
    from entk_helpers.experiments.modular import ModularMLP, modular_addition_data

    distributed = args.worker == "sharded"
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    torch.set_num_threads(max(1, int(os.environ.get("BENCH_THREADS", args.threads)) // world))
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = None
    if distributed:
        import torch.distributed as dist

        dist.init_process_group(args.backend, timeout=timedelta(minutes=5))
        group = dist.group.WORLD
    torch.manual_seed(0)
    model = ModularMLP(args.p, width=args.width).to(DTYPES[args.dtype]).to(device).eval()
    pairs, _ = modular_addition_data(args.p)
    pairs = pairs.to(device)
    if distributed:
        from entk_helpers.distributed import shard_slice

        pairs = pairs[shard_slice(len(pairs), group)]
    op = ntk_operator(model, pairs, output=args.output, process_group=group)
    probe = np.random.default_rng(0).standard_normal((op.shape[0], args.block))
    result = op @ probe  # warm-up, and the probe compared across routes

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        if distributed:
            dist.barrier()

    runs, cpu = [], []
    for _ in range(args.repeats):
        sync()
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in range(args.products):
            op @ probe
        sync()
        runs.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    if rank == 0:
        print(json.dumps({"runs": runs, "cpu": cpu, "dim": op.shape[0],
                          "shards": op.shards.sizes if distributed else [op.shape[0]],
                          "threads": torch.get_num_threads(),
                          "probe": np.asarray(result).tolist()}))
    if distributed:
        dist.destroy_process_group()


def run_route(args: argparse.Namespace, kind: str, world: int, threads: int) -> dict[str, Any]:
    """Launch ``world`` processes of this script as ``--worker kind`` sharing ``threads``;
    rank 0's JSON."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               BENCH_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--worker", kind]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outs = [proc.communicate() for proc in procs]
    for r, (proc, (_, err)) in enumerate(zip(procs, outs)):
        if proc.returncode:
            raise SystemExit(f"{kind} route, {world} ranks: rank {r} failed:\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args)
        return
    sizes = world_sizes(args)
    print(f"# {platform.node()} | torch {torch.__version__} | {os.cpu_count()} CPUs | "
          f"backend {args.backend} | {args.dtype} | ModularMLP({args.p}, width {args.width}), "
          f"output={args.output} | {args.products} products of {args.block} vector(s) | "
          f"load average {os.getloadavg()[0]:.1f}")
    routes = [("single", 1, args.threads)] + ([("single", 1, 1)] if args.threads > 1 else [])
    routes += [("sharded", world, args.threads) for world in sizes]
    print(f"{'route':<34}{'threads':>8}{'s/product':>10}{'median':>8}{'cpu s':>7}"
          f"{'vectors/s':>10}{'x base':>7}{'probe err':>10}")
    base = probe = None
    for kind, world, threads in routes:
        got = run_route(args, kind, world, threads)
        best = min(got["runs"]) / args.products
        median = float(np.median(got["runs"])) / args.products
        cpu = got["cpu"][int(np.argmin(got["runs"]))] / args.products
        if base is None:
            base, probe = best, np.asarray(got["probe"])
        err = np.linalg.norm(np.asarray(got["probe"]) - probe) / np.linalg.norm(probe)
        label = ("1 process, no process group" if kind == "single"
                 else f"{world} rank(s), shards {got['shards']}")
        print(f"{label:<34}{got['threads']:>8}{best:>10.3f}{median:>8.3f}{cpu:>7.3f}"
              f"{args.block / best:>10.2f}{base / best:>7.2f}{err:>10.1e}")
    print(f"# dimension {got['dim']}; s/product: fastest of {args.repeats} runs, median: their "
          "median, cpu s: rank 0's CPU time per product in the fastest run; threads: torch "
          f"threads per process; load average at the end {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()
