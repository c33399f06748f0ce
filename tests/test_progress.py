"""progress_bar redraws a bounded number of times, however long the loop."""

import io

import pytest

from entk_helpers import progress


def redraws(bar_output: str) -> int:
    """Number of times a text bar was drawn: each draw starts with a carriage return."""
    return bar_output.count("\r")


@pytest.mark.parametrize("initial", [0, 4000])
def test_redraws_are_bounded_by_the_redraw_budget(monkeypatch, initial):
    monkeypatch.setattr(progress, "MIN_INTERVAL_S", 0.0)   # only the step budget limits
    out = io.StringIO()
    for _ in progress.progress_bar(range(initial, 20_000), total=20_000, initial=initial,
                                   redraws=50, file=out):
        pass
    assert 50 <= redraws(out.getvalue()) <= 50 + 3     # first, every 1/50, and the close


def test_a_plain_tqdm_bar_would_redraw_at_every_step(monkeypatch):
    # the control: without the budget the same loop draws once per step
    from tqdm import tqdm

    out = io.StringIO()
    for _ in tqdm(range(2_000), file=out, mininterval=0, miniters=1):
        pass
    assert redraws(out.getvalue()) >= 2_000


def test_length_is_taken_from_the_iterable_and_unknown_lengths_work():
    out = io.StringIO()
    bar = progress.progress_bar([1, 2, 3], file=out)
    assert bar.total == 3
    assert list(bar) == [1, 2, 3]
    assert list(progress.progress_bar(iter([1, 2]), file=io.StringIO())) == [1, 2]
