"""Independent references for the tests: a brute-force eNTK and tiny models.

The reference kernel here is deliberately the textbook route, independent of the package:
per-example Jacobians by ``torch.func.vmap(jacrev)`` over ``functional_call``, contracted with
one ``einsum`` to the dense ``(N1, C, N2, C)`` tensor, then reduced to each output mode.
Tests import it as ``from ntk_references import ...`` (pytest puts ``tests/`` on the path).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from entk_helpers.experiments.modular import OneLayerTransformer


def brute_force_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor | None = None,
    *,
    names: list[str] | None = None,
    select: Callable[[Any], Tensor] | None = None,
) -> Tensor:
    """Dense eNTK ``(N1, C, N2, C)`` by vmap(jacrev) and one einsum.

    Args:
        model: the network; ``x1`` ``(N1, ...)``, ``x2`` ``(N2, ...)`` (default ``x1``).
        names: parameter names to differentiate (default: every parameter that requires
            grad, tied ones once, as ``named_parameters`` lists them).
        select: maps the model output to ``(N, C)``.
    """
    x2 = x1 if x2 is None else x2
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad] if names is None else names
    values = {n: named[n].detach() for n in names}

    def one(vals: dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(model, vals, (x[None],))
        return (select(out) if select else out)[0]

    def jacobian(x: Tensor) -> Tensor:
        per_param = vmap(jacrev(one), in_dims=(None, 0))(values, x)
        return torch.cat([j.reshape(x.shape[0], j.shape[1], -1) for j in per_param.values()],
                         dim=2)  # (N, C, P)

    return torch.einsum("ncp,mdp->ncmd", jacobian(x1), jacobian(x2))


def reduce_kernel(k4: Tensor, output: str) -> Tensor:
    """``(N1, C, N2, C)`` -> the kernel ``empirical_ntk`` returns for ``output``."""
    n1, c, n2, _ = k4.shape
    if output == "full":
        return k4.reshape(n1 * c, n2 * c)
    if output == "trace":
        return torch.einsum("ncmc->nm", k4) / c
    if output == "mean_logit":
        return k4.sum(dim=(1, 3)) / c**2
    raise ValueError(output)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected||_F / ||expected||_F``."""
    actual = torch.as_tensor(actual).double()
    expected = torch.as_tensor(expected).double()
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


# ------------------------------------------------------------------------------ models


class MLP(nn.Module):
    """Two Linear layers with biases and a tanh: ``(N, 5) -> (N, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 7)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class TiedEmbedding(nn.Module):
    """Embedding reused as the unembedding: ``tokens (N, 3) -> logits (N, vocab)``."""

    def __init__(self, vocab: int = 6, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = torch.tanh(self.mix(self.embed(tokens).mean(dim=1)))
        return hidden @ self.embed.weight.T


class FrozenFirstLayer(MLP):
    """The MLP with ``fc1`` frozen (requires_grad=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1.requires_grad_(False)


class EmbeddingBag(nn.Module):
    """Token embedding with a padding index, summed over positions, then a Linear head:
    ``tokens (N, 4) -> (N, 3)``."""

    def __init__(self, vocab: int = 7, dim: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.sin(self.embed(tokens)).sum(dim=1))


class AttentionModel(nn.Module):
    """Embedding + ``nn.MultiheadAttention`` + Linear head: ``tokens (N, 4) -> (N, 4, 3)``.

    The attention's ``in_proj_weight`` is a bare parameter and its ``out_proj`` is applied
    functionally, so the structured rule cannot treat them.
    """

    def __init__(self, vocab: int = 6, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, num_heads=2, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        mixed, _ = self.attn(h, h, h, need_weights=False)
        return self.head(torch.tanh(h + mixed))


def last_position(out: Tensor) -> Tensor:
    """``(N, T, C) -> (N, C)``: the last sequence position."""
    return out[:, -1]


@dataclass
class Case:
    """A model, two input batches, and the options that make its output (N, C)."""

    name: str
    model: nn.Module
    x1: Tensor
    x2: Tensor
    select: Callable[[Any], Tensor] | None = None
    structured: bool = True  # whether method="structured" applies to every parameter

    def reference(self, x2: Tensor | None = None, names: list[str] | None = None) -> Tensor:
        return brute_force_ntk(self.model, self.x1, x2, names=names, select=self.select)


def make_case(name: str, dtype: torch.dtype = torch.float64) -> Case:
    """One of the small models of the test-suite, in ``dtype``, with seeded inputs."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if name in ("mlp", "frozen"):
        model = MLP() if name == "mlp" else FrozenFirstLayer()
        x1, x2 = torch.randn(6, 5, generator=gen), torch.randn(4, 5, generator=gen)
        case = Case(name, model, x1.to(dtype), x2.to(dtype))
    elif name == "tied":
        case = Case(name, TiedEmbedding(), torch.randint(0, 6, (5, 3), generator=gen),
                    torch.randint(0, 6, (3, 3), generator=gen), structured=False)
    elif name == "embedding":
        case = Case(name, EmbeddingBag(), torch.randint(0, 7, (6, 4), generator=gen),
                    torch.randint(0, 7, (4, 4), generator=gen))
    elif name == "attention":
        case = Case(name, AttentionModel(), torch.randint(0, 6, (5, 4), generator=gen),
                    torch.randint(0, 6, (3, 4), generator=gen), select=last_position,
                    structured=False)
    elif name == "transformer":
        model = OneLayerTransformer(p=5, d_model=8, n_heads=2, d_mlp=12)
        case = Case(name, model, torch.randint(0, 6, (5, 3), generator=gen),
                    torch.randint(0, 6, (3, 3), generator=gen), select=last_position)
    else:
        raise ValueError(name)
    case.model.to(dtype).eval()
    return case


CASES = ("mlp", "tied", "frozen", "embedding", "attention", "transformer")


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype = torch.float64) -> None:
    """Relative Frobenius error within the issue's tolerance for ``dtype``."""
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    err = rel_err(actual, expected)
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"
    assert math.isfinite(err)
