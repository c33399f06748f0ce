"""Shared test fixtures: seeding, float64 on request, and each small model of
``ntk_references`` as the ``case`` fixture."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from ntk_references import CASES, Case, make_case


@pytest.fixture(autouse=True)
def _seed_everything() -> Iterator[None]:
    """Every test starts from the same random state (torch, numpy, random)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def float64() -> Iterator[None]:
    """Make float64 the default dtype for one test (restored afterwards)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    """Each small model in float64."""
    return make_case(request.param)
