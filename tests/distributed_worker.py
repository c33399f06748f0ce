"""One rank of the two-process tests of ``tests/test_distributed.py`` (not a test module).

Run as ``python tests/distributed_worker.py OUT_DIR`` with ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT`` set; joins a gloo group on loopback, builds sharded
operators over :func:`cases` (and sharded layer eNTKs over :func:`lm_case`, where
``transformers`` is installed) and writes what it computed, and the errors the bad-input
scenarios raised, to ``OUT_DIR/rank{RANK}.pt``. The test compares them with single-process
references in its own process.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ntk_references import make_case  # noqa: E402

from entk_helpers import ntk_operator, top_eigenpairs  # noqa: E402
from entk_helpers.lm import layer_ntk_operator, layer_weight  # noqa: E402

OUTPUTS = ("full", "trace", "mean_logit")
SPLITS = {"even": None, "uneven": 3}  # uneven: rank 0 takes the first 3 examples
# (model, output, split): the MLP in every mode and split, the transformer evenly split
CONFIGS = [("mlp", output, split) for output in OUTPUTS for split in SPLITS] + [
    ("transformer", output, "even") for output in OUTPUTS]
CHUNKED = ("mlp", "full", "uneven")  # chunks of 2 examples within each shard
DEFAULT_SOLVER = "mlp"  # top_eigenpairs' default (ARPACK) on this model; fixed Lanczos on all
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
# the layer eNTK: (architecture, output, route); the MLP weight of the last block takes the
# structured route, that of the first block the tail route, in chunks of 3 windows: the shards'
# batches are then the reference's (Llama's float32 rotary / softmax make a window's product
# depend on its batch at ~1e-8 relative, in one process too)
LM_CONFIGS = [(arch, output, route) for arch in ("gpt2", "llama")
              for output in ("hidden", "logits") for route in ("structured", "tail")]
LM_WINDOWS, LM_LENGTH = 5, 6  # shards [3, 2]


def cases() -> dict[str, tuple[torch.nn.Module, torch.Tensor, Any]]:
    """name -> (model, all examples, select): the test-suite's MLP on 11 examples (full
    dimension 33) and its one-layer transformer on 8 token windows."""
    mlp = make_case("mlp")
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    transformer = make_case("transformer")
    tokens = torch.cat([transformer.x1, transformer.x2])
    return {"mlp": (mlp.model, x, None),
            "transformer": (transformer.model, tokens, transformer.select)}


def lm_case(arch: str, route: str) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """A tiny random float64 LM of ``lm_tiny_models``, 5 windows of 6 tokens and the full
    name of the MLP weight whose layer eNTK takes ``route``."""
    from lm_tiny_models import LAYERS, VOCAB, WEIGHTS, tiny_model

    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (LM_WINDOWS, LM_LENGTH),
                        generator=torch.Generator().manual_seed(2))
    layer = LAYERS - 1 if route == "structured" else 0
    return model, ids, layer_weight(model, layer, WEIGHTS[arch][0])


def lm_operator(key: tuple[str, str, str], model: torch.nn.Module, ids: torch.Tensor,
                weight: str, **kwargs: Any) -> Any:
    _, output, route = key
    return layer_ntk_operator(model, ids, weight=weight, output=output,
                              chunk_size=3 if route == "tail" else 64, **kwargs)


def lm_eigenpairs(op: Any) -> Any:
    return top_eigenpairs(op, k=3, method="lanczos", max_steps=12)


def shard(n: int, split: str, rank: int, world: int) -> slice:
    first = SPLITS[split]
    if first is None:
        size, extra = divmod(n, world)
        start = rank * size + min(rank, extra)
        return slice(start, start + size + (rank < extra))
    return slice(0, first) if rank == 0 else slice(first, n)


def probe_vectors(dim: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(dim)
    return rng.standard_normal(dim), rng.standard_normal((dim, 3))


def eigenpairs(op: Any, name: str) -> dict[str, Any]:
    """The fixed-step Lanczos of the paper (and ARPACK, the default, on ``DEFAULT_SOLVER``)."""
    k = min(3, op.shape[0] - 1)
    out = {"fixed": top_eigenpairs(op, k=k, method="lanczos", max_steps=8)}
    if name == DEFAULT_SOLVER:
        out["eig"] = top_eigenpairs(op, k=k)  # its start vector drawn from seed=0
    return out


def products(rank: int, world: int) -> dict[tuple[str, str, str], dict[str, Any]]:
    out = {}
    models = cases()
    for key in CONFIGS:
        name, output, split = key
        model, x, select = models[name]
        op = ntk_operator(model, x[shard(len(x), split, rank, world)], output=output,
                          select=select, chunk_size=2 if key == CHUNKED else None,
                          process_group=dist.group.WORLD)
        v, block = probe_vectors(op.shape[0])
        out[key] = {
            "shape": op.shape, "local": op.inputs.shape[0], "sizes": op.shards.sizes,
            "matvec": op.matvec(v), "matmat": op @ block,
            "torch": op.matmat_torch(torch.as_tensor(block)), "dense": op.to_dense(),
            **eigenpairs(op, name),
        }
    return out


def lm_products(rank: int, world: int) -> dict[tuple[str, str, str], dict[str, Any]]:
    from entk_helpers.distributed import shard_slice

    out = {}
    for key in LM_CONFIGS:
        model, ids, weight = lm_case(key[0], key[2])
        op = lm_operator(key, model, ids[shard_slice(len(ids), dist.group.WORLD)], weight,
                         process_group=dist.group.WORLD)
        _, block = probe_vectors(op.shape[0])
        out[key] = {"shape": op.shape, "route": op.route, "sizes": op.shards.sizes,
                    "local": op.n_local, "matmat": op @ block, "fixed": lm_eigenpairs(op),
                    "n_matvecs": op.n_matvecs}
    return out


def lm_bad_inputs(rank: int) -> dict[str, str]:
    """Rank 1 alone passes another weight, or token ids of the wrong shape."""
    world = dist.group.WORLD
    key = ("gpt2", "hidden", "structured")
    model, ids, weight = lm_case(key[0], key[2])
    mine = ids[:3] if rank == 0 else ids[3:]
    other = weight if rank == 0 else weight.replace("c_proj", "c_fc")
    errors = {"LM: another weight": caught(
        lambda: lm_operator(key, model, mine, other, process_group=world))}
    flat = mine if rank == 0 else mine[0]
    errors["LM: bad input_ids"] = caught(
        lambda: lm_operator(key, model, flat, weight, process_group=world))
    return errors


def caught(build: Any) -> str:
    try:
        build()
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


def bad_inputs(rank: int) -> dict[str, str]:
    """Each scenario: rank 1 alone does something wrong; both ranks must raise."""
    world = dist.group.WORLD
    mlp, x, _ = cases()["mlp"]
    mine = x[:6] if rank == 0 else x[6:]
    errors = {}
    # the model refuses rank 1's examples (7 features for a 5-feature layer): local failure
    wide = torch.cat([mine, mine[:, :2]], 1)
    errors["model fails on one rank"] = caught(
        lambda: ntk_operator(mlp, mine if rank == 0 else wide, process_group=world))
    # windows of another length: the model (a sum over positions) accepts them
    bag = make_case("embedding")
    windows = bag.x1 if rank == 0 else torch.cat([bag.x1, bag.x1[:, :1]], 1)
    errors["example shape differs"] = caught(
        lambda: ntk_operator(bag.model, windows, process_group=world))
    # a model initialised with another seed on rank 1
    torch.manual_seed(rank)
    other = type(mlp)().double()
    errors["parameters differ"] = caught(lambda: ntk_operator(other, mine, process_group=world))
    # NaN in rank 1's examples (caught by the output check during set-up)
    nan = mine.clone()
    if rank == 1:
        nan[0, 0] = float("nan")
    errors["NaN on one rank"] = caught(lambda: ntk_operator(mlp, nan, process_group=world))
    errors["empty shard"] = caught(
        lambda: ntk_operator(mlp, mine if rank == 0 else mine[:0], process_group=world))
    errors["not a group"] = caught(lambda: ntk_operator(mlp, mine, process_group="WORLD"))
    # every rank builds it fine, then the ranks apply it to different vectors
    op = ntk_operator(mlp, mine, process_group=world)
    errors["different vectors"] = caught(
        lambda: op.matvec(np.random.default_rng(rank).standard_normal(op.shape[0])))
    errors["after the errors"] = caught(lambda: op.matvec(np.ones(op.shape[0])))
    return errors


def single_process_leaves_distributed_unloaded() -> bool:
    """Whether a single-process operator and its eigenpairs leave entk_helpers.distributed
    unimported (checked before this process touches a process group)."""
    model, x, _ = cases()["mlp"]
    top_eigenpairs(ntk_operator(model, x), k=2, method="lanczos", max_steps=4)
    if HAS_TRANSFORMERS:
        key = ("gpt2", "logits", "structured")
        lm_eigenpairs(lm_operator(key, *lm_case(key[0], key[2])))
    return "entk_helpers.distributed" not in sys.modules


def main() -> None:
    torch.set_num_threads(1)
    unloaded = single_process_leaves_distributed_unloaded()
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    rank, world = dist.get_rank(), dist.get_world_size()
    errors = bad_inputs(rank)
    lm = {}
    if HAS_TRANSFORMERS:
        lm = lm_products(rank, world)
        errors.update(lm_bad_inputs(rank))
    result = {"products": products(rank, world), "errors": errors, "lm": lm,
              "single process leaves distributed unloaded": unloaded}
    torch.save(result, Path(sys.argv[1]) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
