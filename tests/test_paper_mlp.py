"""``paper_mlp`` draws the split and the weights in the author's order, checked against an
independent draw of the recipe (``torch.manual_seed``, ``randperm``, ``nn.Linear``, ``normal_``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entk_helpers.experiments.modular import ModularMLP, paper_mlp, train_test_split


@pytest.mark.parametrize("seed", [0, 5])
def test_split_and_weights_follow_the_authors_order(seed: int) -> None:
    p, width = 11, 32
    model, train_idx, test_idx = paper_mlp(p, seed, width=width)
    torch.manual_seed(seed)
    perm = torch.randperm(p * p)
    first = nn.Linear(2 * p, width, bias=False)
    second = nn.Linear(width, p, bias=False)
    nn.init.normal_(first.weight)
    nn.init.normal_(second.weight)
    n_train = int(0.7 * p * p)
    assert torch.equal(train_idx, perm[:n_train].sort().values)
    assert torch.equal(test_idx, perm[n_train:].sort().values)
    assert torch.equal(model.layer1.weight, first.weight)
    assert torch.equal(model.layer2.weight, second.weight)


def test_paper_split_sizes() -> None:
    _, train_idx, test_idx = paper_mlp(29, 0, width=8)
    assert (len(train_idx), len(test_idx)) == (588, 253)   # the paper's 588 / 253


def test_global_generator_draws_match_a_generator_draw() -> None:
    torch.manual_seed(4)
    from_global = ModularMLP(7, width=8)
    from_generator = ModularMLP(7, width=8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(from_global.layer1.weight, from_generator.layer1.weight)
    assert torch.equal(from_global.layer2.weight, from_generator.layer2.weight)


def test_generator_and_device_must_agree() -> None:
    with pytest.raises(ValueError, match="generator is on"):
        ModularMLP(7, width=8, generator=torch.Generator(), device="meta")
    with pytest.raises(ValueError, match="empty split"):
        train_test_split(3, 0.2, seed=0)
