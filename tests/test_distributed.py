"""``ntk_operator`` and ``lm.layer_ntk_operator`` with ``process_group=`` on two CPU
processes (gloo, loopback only).

Two ranks run ``tests/distributed_worker.py`` once for the whole module (they write what they
computed to files); each test compares it with the single-process operator over the same
examples (and, for ``ntk_operator``, with the brute-force kernel), in float64.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distributed_worker import (
    CONFIGS,
    DEFAULT_SOLVER,
    HAS_TRANSFORMERS,
    LM_CONFIGS,
    cases,
    eigenpairs,
    lm_case,
    lm_eigenpairs,
    lm_operator,
    probe_vectors,
)
from ntk_references import brute_force_ntk, reduce_kernel, rel_err

from entk_helpers import ntk_operator

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT_S = 240  # the ranks finish in about 15 s on an idle 2-core machine; a hang fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env() -> dict[str, str]:
    """The environment of a rank: this checkout first on the path, one thread, loopback."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(WORLD), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def run_ranks(args: list[str], env: dict[str, str]) -> None:
    """Start ``WORLD`` ranks of ``python args``; fail with their output on error or hang."""
    procs = [subprocess.Popen([sys.executable, *args], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s (a hang)")
    for r, (proc, text) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"rank {r} exited with {proc.returncode}:\n{text[-4000:]}"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ranks")
    run_ranks([str(ROOT / "tests" / "distributed_worker.py"), str(out)], loopback_env())
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def references() -> dict[tuple[str, str, str], dict[str, Any]]:
    """Single-process operator over all examples, its eigenpairs (same solvers, same seeds)
    and the brute-force kernel, for each configuration of the worker."""
    refs, models, kernels = {}, cases(), {}
    for key in CONFIGS:
        name, output, _ = key
        model, x, select = models[name]
        if name not in kernels:
            kernels[name] = brute_force_ntk(model, x, select=select)
        op = ntk_operator(model, x, output=output, select=select)
        refs[key] = {"op": op, "kernel": reduce_kernel(kernels[name], output),
                     **eigenpairs(op, name)}
    return refs


@pytest.mark.parametrize("key", CONFIGS, ids=["-".join(key) for key in CONFIGS])
def test_products_match_the_single_process_operator(ranks, references, key) -> None:
    _, _, split = key
    ref = references[key]
    op, kernel = ref["op"], ref["kernel"].numpy()
    got = ranks[0]["products"][key]
    assert got["shape"] == op.shape
    n = op.inputs.shape[0]
    assert sum(got["sizes"]) == n and got["sizes"] == [r["products"][key]["local"] for r in ranks]
    if split == "uneven":
        assert got["sizes"] == [3, n - 3]
    v, block = probe_vectors(op.shape[0])
    for rank in ranks:
        mine = rank["products"][key]
        assert rel_err(mine["matvec"], op.matvec(v)) <= 1e-10
        assert rel_err(mine["matvec"], kernel @ v) <= 1e-10
        assert rel_err(mine["matmat"], op @ block) <= 1e-10
        assert rel_err(mine["torch"], op.matmat_torch(torch.as_tensor(block))) <= 1e-10
        assert rel_err(mine["dense"], kernel) <= 1e-10
        # replicated: every rank holds exactly the same result
        for field in ("matvec", "matmat", "dense"):
            assert np.array_equal(np.asarray(mine[field]), np.asarray(got[field]))


@pytest.mark.parametrize("key", CONFIGS, ids=["-".join(key) for key in CONFIGS])
def test_eigenpairs_match_and_are_the_same_on_every_rank(ranks, references, key) -> None:
    ref = references[key]
    dense = torch.linalg.eigvalsh(ref["kernel"]).flip(0)
    methods = [m for m in ("eig", "fixed") if m in ref]
    assert methods == (["eig", "fixed"] if key[0] == DEFAULT_SOLVER else ["fixed"])
    for method in methods:
        first = ranks[0]["products"][key][method]
        k = first.values.shape[0]
        assert rel_err(first.values, ref[method].values) <= 1e-10, method
        if method == "eig":  # converged: the dense spectrum
            assert rel_err(first.values, dense[:k]) <= 1e-10
        for rank in ranks[1:]:  # identical runs: the same Krylov vectors, bit for bit
            other = rank["products"][key][method]
            assert torch.equal(other.values, first.values)
            assert torch.equal(other.vectors, first.vectors)
            assert other.n_matvecs == first.n_matvecs > 0


@pytest.fixture(scope="module")
def lm_references() -> dict[tuple[str, str, str], dict[str, Any]]:
    """The single-process layer eNTK over all windows and its fixed-step Lanczos."""
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    refs = {}
    for key in LM_CONFIGS:
        op = lm_operator(key, *lm_case(key[0], key[2]))
        refs[key] = {"op": op, "fixed": lm_eigenpairs(op)}
    return refs


@pytest.mark.parametrize("key", LM_CONFIGS, ids=["-".join(key) for key in LM_CONFIGS])
def test_sharded_layer_entk_matches_the_single_process_operator(ranks, lm_references, key
                                                                ) -> None:
    """Windows sharded [3, 2]: products and top eigenpairs as over all windows in one
    process, on both routes, the same bits on both ranks."""
    op, ref = lm_references[key]["op"], lm_references[key]["fixed"]
    first = ranks[0]["lm"][key]
    assert op.route == key[2] and op.shards is None
    assert first["shape"] == op.shape and first["sizes"] == [3, 2]
    assert [rank["lm"][key]["local"] for rank in ranks] == first["sizes"]
    _, block = probe_vectors(op.shape[0])
    expected = op @ block
    for rank in ranks:
        mine = rank["lm"][key]
        assert mine["route"] == key[2]
        assert rel_err(mine["matmat"], expected) <= 1e-10
        assert rel_err(mine["fixed"].values, ref.values) <= 1e-10
        assert np.array_equal(mine["matmat"], first["matmat"])
        assert torch.equal(mine["fixed"].vectors, first["fixed"].vectors)
        assert mine["n_matvecs"] == first["n_matvecs"] == 3 + 12


EXPECTED_ERRORS = {
    # scenario: (what rank 0 sees, what rank 1 sees)
    "model fails on one rank": ("ShardError: set-up failed on 1 of 2 ranks (rank 1: RuntimeError",
                                "RuntimeError"),
    "example shape differs": ("ShardError: the ranks disagree on the example shape",) * 2,
    "parameters differ": ("ShardError: the ranks disagree on the parameter values",) * 2,
    "NaN on one rank": ("ShardError: set-up failed on 1 of 2 ranks (rank 1: ValueError: the "
                        "model output contains NaN", "ValueError: the model output contains NaN"),
    "empty shard": ("ShardError: set-up failed on 1 of 2 ranks (rank 1: ValueError: inputs has "
                    "no examples", "ValueError: inputs has no examples"),
    "not a group": ("TypeError: process_group must be a torch.distributed ProcessGroup",) * 2,
    "different vectors": ("ShardError: rank 0's block differs from that of ranks [1]",
                          "ShardError: rank 1's block differs from that of ranks [0]"),
    "after the errors": ("no error",) * 2,
}
LM_ERRORS = {
    "LM: another weight": ("ShardError: the ranks disagree on weight=",) * 2,
    "LM: bad input_ids": ("ShardError: set-up failed on 1 of 2 ranks (rank 1: ValueError: "
                          "input_ids must be an (N, T) tensor", "ValueError: input_ids must be"),
}
if HAS_TRANSFORMERS:
    EXPECTED_ERRORS.update(LM_ERRORS)


@pytest.mark.parametrize("scenario", list(EXPECTED_ERRORS))
def test_bad_input_on_one_rank_is_an_error_on_every_rank(ranks, scenario) -> None:
    for rank, expected in zip(ranks, EXPECTED_ERRORS[scenario]):
        assert rank["errors"][scenario].startswith(expected), rank["errors"][scenario]


def test_single_process_use_does_not_load_the_distributed_module(ranks) -> None:
    assert all(rank["single process leaves distributed unloaded"] for rank in ranks)


def test_without_an_initialised_group_the_error_says_what_to_do() -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ntk_operator(model, torch.randn(4, 3), process_group=object())


def test_the_torchrun_example_script(tmp_path: Path) -> None:
    """``scripts/distributed_eigenpairs.py`` under torchrun with two processes, against the
    dense eigenvalues of the same kernel computed here."""
    from entk_helpers import empirical_ntk
    from entk_helpers.experiments.modular import ModularMLP, modular_addition_data

    out = tmp_path / "eig.json"
    env = loopback_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
           str(WORLD), "--master-addr", "127.0.0.1", "--master-port", env["MASTER_PORT"],
           str(ROOT / "scripts" / "distributed_eigenpairs.py"), "--p", "7", "--width", "16",
           "--k", "4", "--dtype", "float64", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == WORLD and result["shards"] == [25, 24]
    torch.manual_seed(0)
    model = ModularMLP(7, width=16).double()
    pairs, _ = modular_addition_data(7)
    dense = torch.linalg.eigvalsh(empirical_ntk(model, pairs, output="trace")).flip(0)[:4]
    assert rel_err(torch.tensor(result["eigenvalues"], dtype=torch.float64), dense) <= 1e-10
    assert "top 4 eigenvalues" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_the_benchmark_nccl_path_says_it_needs_cuda() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_distributed", ROOT / "benchmarks" / "bench_distributed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit, match="needs CUDA GPUs"):
        bench.world_sizes(bench.parse_args(["--backend", "nccl"]))
