"""Progress bars that stay cheap in a notebook however long the loop runs.

In Jupyter a ``tqdm.auto`` bar is a widget, and each redraw is a message to the frontend
(by default up to ten a second). nbval reads a cell's messages only once the cell has
finished, and ZeroMQ queues only so many (1000 per socket by default, plus OS buffers): in
a half-hour training loop the rest, the cell's closing message included, are dropped, and
nbval fails the cell with "Timeout of 5 seconds exceeded waiting for output" (on the CI
machine a cell with 3,000 display updates passed, one with 20,000 failed). Bars made here
redraw a bounded number of times, whatever the loop's length or the machine's speed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

REDRAWS = 100          # redraws of a bar with a known length, at most (plus the last one)
MIN_INTERVAL_S = 1.0   # and never more often than once a second


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 desc: str | None = None, disable: bool = False, redraws: int = REDRAWS,
                 **tqdm_kwargs: Any) -> tqdm:
    """A ``tqdm.auto`` bar that redraws about ``redraws`` times at most.

    It redraws every ``total / redraws`` steps and at most once per ``MIN_INTERVAL_S``
    (only the time limit applies when the length is unknown). Other keywords go to tqdm.
    """
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    steps = total - tqdm_kwargs.get("initial", 0) if total is not None else 0
    return tqdm(iterable, total=total, desc=desc, disable=disable,
                miniters=max(1, steps // max(1, redraws)), mininterval=MIN_INTERVAL_S,
                **tqdm_kwargs)
