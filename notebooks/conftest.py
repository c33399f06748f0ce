"""nbval settings for these notebooks (pytest reads this file when it collects them)."""

import pytest

# Once a cell has finished, nbval waits a fixed 5 s for each of the cell's remaining
# messages; on a loaded 2-core CI machine the kernel can be descheduled for longer.
OUTPUT_TIMEOUT_S = 60


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if hasattr(item, "output_timeout"):   # nbval's notebook cells
            item.output_timeout = OUTPUT_TIMEOUT_S
