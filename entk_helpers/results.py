"""Deprecated: ``entk_helpers.results`` was split into :mod:`entk_helpers.files` (atomic
writes) and :mod:`entk_helpers.notebook` (flags, device, paths, the paper-vs-run table).

Importing it still works and warns; it will be removed in 0.3.
"""

import warnings

from .files import save_arrays, save_figure, save_json, save_torch, to_jsonable  # noqa: F401
from .notebook import (  # noqa: F401
    DOWNLOADS_VARIABLE,
    FULL_MODE_VARIABLE,
    HEADLESS_VARIABLE,
    PaperComparison,
    default_device,
    downloads_allowed,
    full_mode,
    interactive_widgets,
    repo_root,
    results_dir,
)

warnings.warn("entk_helpers.results is deprecated: import from entk_helpers.files (save_*) or "
              "entk_helpers.notebook (full_mode, results_dir, PaperComparison, ...)",
              DeprecationWarning, stacklevel=2)
