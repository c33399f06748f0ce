"""A memory budget that every kernel-building call checks before it allocates.

An eNTK grows as (N * C)^2: a careless ``output="full"`` on a few thousand examples asks for
tens of gigabytes. Instead of letting the process be killed, calls that would materialise
more than the budget raise :class:`MemoryBudgetError`, naming the cheaper alternative
(a trace kernel, a smaller chunk, or the matrix-free :func:`~entk_helpers.ntk_operator`).

The default budget is half the memory available on the device the computation runs on
(free GPU memory for CUDA, physical RAM for the CPU). Override it with
:func:`set_memory_budget`, the :func:`memory_budget` context manager, or the environment
variable ``ENTK_MEMORY_BUDGET`` (e.g. ``8GB``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_budget_override: int | None = None


class MemoryBudgetError(MemoryError):
    """A computation would materialise more memory than the budget allows."""


def parse_bytes(size: int | float | str) -> int:
    """``"4GB"``, ``"512 MiB"``, ``2e9`` -> a positive number of bytes (ValueError else)."""
    if isinstance(size, bool) or not isinstance(size, (int, float, str)):
        raise TypeError(f"cannot read {size!r} as a memory size; pass a number of bytes or a "
                        "string like '4GB' or '512MiB'")
    if isinstance(size, str):
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", size)
        if not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"cannot read {size!r} as a memory size; write e.g. '4GB' or "
                             "'512MiB'")
        try:
            value = float(match.group(1)) * _UNITS[match.group(2).upper()]
        except ValueError as err:
            raise ValueError(f"cannot read {size!r} as a memory size; write e.g. '4GB' or "
                             "'512MiB'") from err
    else:
        value = float(size)
    if not math.isfinite(value) or value < 1:
        raise ValueError(f"a memory budget of {size!r} makes no sense; give a positive size "
                         "such as '4GB' (or None for the default: half the device's memory)")
    return int(value)


def format_bytes(n: float) -> str:
    """A number of bytes for people: ``'6.9 GB'``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 10**9


def get_memory_budget(device: torch.device | str | None = None) -> int:
    """The budget in bytes: the override, else ``$ENTK_MEMORY_BUDGET``, else half the device."""
    if _budget_override is not None:
        return _budget_override
    if os.environ.get("ENTK_MEMORY_BUDGET"):
        try:
            return parse_bytes(os.environ["ENTK_MEMORY_BUDGET"])
        except ValueError as err:
            raise ValueError(f"ENTK_MEMORY_BUDGET: {err}. Fix or unset the variable.") from err
    return _available_bytes(torch.device(device or "cpu")) // 2


def set_memory_budget(size: int | float | str | None) -> None:
    """Set the budget (bytes or a string like ``"8GB"``); ``None`` restores the default."""
    global _budget_override
    _budget_override = None if size is None else parse_bytes(size)


@contextmanager
def memory_budget(size: int | float | str | None) -> Iterator[None]:
    """Temporarily use another budget: ``with memory_budget("2GB"): ...``."""
    previous = _budget_override
    set_memory_budget(size)
    try:
        yield
    finally:
        set_memory_budget(previous)


def check_budget(
    nbytes: int, what: str, alternative: str, device: torch.device | str | None = None
) -> None:
    """Raise :class:`MemoryBudgetError` if ``nbytes`` would exceed the budget.

    ``what`` names the matrix to be built, ``alternative`` says what to do instead.
    """
    budget = get_memory_budget(device)
    if nbytes > budget:
        raise MemoryBudgetError(
            f"{what} would need {format_bytes(nbytes)}, over the memory budget of "
            f"{format_bytes(budget)}. {alternative} (Or raise the budget with "
            f"entk_helpers.set_memory_budget('...GB') if the machine really has the room.)"
        )
